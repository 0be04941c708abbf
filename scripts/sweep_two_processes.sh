#!/usr/bin/env bash
# Run one sweep as two one-thread processes on a 2-core machine: the presses named in $2 in one, the config's other
# presses in the other. Both write the same output_dir (each run has its own directory) and resume as a single
# `run` does; each sample's compression is seeded from its run's key (evaluation/runs.py), so the split changes no
# record. The packed PiKV layers decode row by row in Python-bound steps that a second thread hardly speeds up, so
# two one-thread processes finish a 2k leaderboard prompt about 1.5x sooner than one two-thread process
# (docs/leaderboard.md, "Machine time").
#
#   scripts/sweep_two_processes.sh evaluation/configs/leaderboard.yaml \
#       pikv_int4,pikv_int4_top2,quantization_int4,compactor,adakv_compactor,critical_adakv_expected_attention,critical_adakv_snapkv,block_keydiff
#
# Logs: $LOG_DIR (default /tmp)/sweep_a.log and sweep_b.log. Stop both with: pkill -f "evaluation run --config"
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: $0 CONFIG PRESS,PRESS,... [field=value ...]}
first=${2:?usage: $0 CONFIG PRESS,PRESS,... [field=value ...]}
shift 2
python=${PYTHON:-.venv/bin/python}
log_dir=${LOG_DIR:-/tmp}
rest=$("$python" scripts/other_presses.py "$config" "$first")
OMP_NUM_THREADS=1 nohup setsid "$python" -m evaluation run --config "$config" "press_name=[$first]" "$@" \
    > "$log_dir/sweep_a.log" 2>&1 &
OMP_NUM_THREADS=1 nohup setsid "$python" -m evaluation run --config "$config" "press_name=[$rest]" "$@" \
    > "$log_dir/sweep_b.log" 2>&1 &
echo "started: [$first] -> $log_dir/sweep_a.log; [$rest] -> $log_dir/sweep_b.log"
