#!/usr/bin/env bash
# Run what is left of the leaderboard (docs/leaderboard.md, "Two tiers") as two chains of one-thread processes on a
# 2-core machine, so that the machine stays busy from one part to the next without anyone restarting it. Every part
# resumes where it stopped (run directories are keyed by what changes their results), so this can be started again
# at any time; a finished part costs a few seconds (its runs are read, not rerun).
#
#   chain A: tier 1 (2k), the slow presses ($SLOW) -> 4k, the same presses -> tier 2 (leaderboard_more.yaml)
#   chain B: tier 1 (2k), the other presses        -> 4k, the other presses -> own prefill (leaderboard_own_prefill.yaml)
#
# Two processes write the same run directories only for disjoint presses (tier 1 and 4k), which is safe. The 4k part
# answers 8 samples at once instead of 16: the rows set aside while answering hold their caches (twice as large at
# 4k), and `batch_size` changes no result (evaluation/runs.py). Logs: $LOG_DIR (default /tmp)/rest_a.log, rest_b.log.
# `scripts/leaderboard_rest.sh a` (or b) runs one chain in the foreground. Stop both chains with:
#   pkill -f leaderboard_rest.sh; pkill -f "evaluation run --config"
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
log_dir=${LOG_DIR:-/tmp}
slow=${SLOW:-pikv_int4,pikv_int4_top2,quantization_int4,compactor,adakv_compactor,critical_adakv_expected_attention}
tier1=evaluation/configs/leaderboard.yaml
at_4k=(context_length=4096 num_samples=10
    "tasks=[niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery,fwe]"
    "compression_ratio=[0.5,0.875]" output_dir=results/leaderboard_4k batch_size=8)  # as in leaderboard.yaml's header
rest=$("$python" scripts/other_presses.py "$tier1" "$slow") || exit 1

run() {  # run CONFIG [field=value ...]: one part, one thread; a failed part is logged and the chain goes on
    echo "=== $(date -u +%FT%TZ) start: $*"
    OMP_NUM_THREADS=1 "$python" -m evaluation run --config "$@"
    local status=$?  # before the echo's $(date ...), which would reset $? to 0
    echo "=== $(date -u +%FT%TZ) exit $status: $*"
}

case "${1:-start}" in
    a)
        run "$tier1" "press_name=[$slow]"
        run "$tier1" "press_name=[$slow]" "${at_4k[@]}"
        run evaluation/configs/leaderboard_more.yaml
        ;;
    b)
        run "$tier1" "press_name=[$rest]"
        run "$tier1" "press_name=[$rest]" "${at_4k[@]}"
        run evaluation/configs/leaderboard_own_prefill.yaml
        ;;
    start)  # each chain in its own session, so that it outlives the shell that started it
        nohup setsid "$0" a > "$log_dir/rest_a.log" 2>&1 < /dev/null &
        nohup setsid "$0" b > "$log_dir/rest_b.log" 2>&1 < /dev/null &
        echo "started: chain A [$slow] -> $log_dir/rest_a.log; chain B [$rest] -> $log_dir/rest_b.log"
        ;;
    *)
        echo "usage: $0 [start | a | b]" >&2
        exit 2
        ;;
esac
