#!/usr/bin/env bash
# kvpress 0.5.5's own test suite (the tests/ of its PyPI sdist), run offline with pikvpress imported.
#
# Every kvpress test that passes without pikvpress must pass with it: importing pikvpress patches kvpress
# (pikvpress.compat), and this is the check that the patches break nothing kvpress itself tests.
#
#   bash scripts/kvpress_suite.sh                       # with pikvpress imported (what CI runs)
#   bash scripts/kvpress_suite.sh --without-pikvpress   # plain kvpress (or KVPRESS_SUITE_PIKVPRESS=0)
#   bash scripts/kvpress_suite.sh --compare             # both; fails unless passed(with) ⊇ passed(without)
#   bash scripts/kvpress_suite.sh -- tests/test_generate.py -x   # pytest targets/options instead of `tests`
#
# The sdist is downloaded with pip into a temporary folder (removed on exit) and its tests run there, from
# the sdist's root, unchanged. Hub checkpoints are replaced by local stand-ins (kvpress_suite/standins.py:
# a tiny random Llama with llama2-0b-unit-test's shapes and SmolLM2's real tokenizer, Q-filters and query
# statistics of its shape) in a temporary hub cache, read with HF_HUB_OFFLINE=1 by the pytest plugin
# kvpress_suite/conftest_plugin.py, which also imports pikvpress (or makes sure nothing does).
# The whole suite runs (not only tests/presses): 3.5-5 minutes on 2 cores, 659 passed, 3 skipped, 116 deselected,
# in both modes (measured on the CPU-only dev machine).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
KVPRESS_VERSION="0.5.5"

mode=with
case "${KVPRESS_SUITE_PIKVPRESS:-1}" in 0 | false | no | off) mode=without ;; esac
targets=(tests)
while [ $# -gt 0 ]; do
    case "$1" in
        --without-pikvpress) mode=without ;;
        --with-pikvpress) mode=with ;;
        --compare) mode=compare ;;
        -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
        --) shift; targets=("$@"); break ;;
        *) echo "kvpress_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Deselected, each with its reason (they need what no local stand-in can give). The tests that need a GPU
# or flash-attention are skipped by kvpress itself on a CPU machine; they are deselected too because on a
# GPU machine they would load hub checkpoints (Llama-3.1-8B, Llama-3.2-1B, Qwen3-4B) and datasets.
DESELECT=(
    # the network: downloads DuoAttention's patterns for every model it knows from raw.githubusercontent.com
    tests/presses/test_duo_attention_press.py::test_load_attention_pattern
    # the hub: lists a hub collection, then downloads every query-statistics repository in it
    tests/presses/test_ea_with_stats.py::test_load_stats
    # the hub: lists a hub collection, then downloads every Q-filters repository in it
    tests/presses/test_qfilters_press.py::test_load_qfilters
    # a trained model: asserts h2oai/h2o-danube3-500m-chat's exact answer and token counts
    tests/test_pipeline.py::test_pipeline_answer_is_correct
    # optimum-quanto (not installed) and h2o-danube3-500m-chat's exact answer
    tests/test_pipeline.py::test_pipeline_with_quantized_cache
    # GPU + flash-attention + meta-llama/Llama-3.2-1B-Instruct from the hub
    tests/test_pipeline.py::TestPipelineFA2
    # GPU + flash-attention + Qwen/Qwen3-4B-Instruct-2507 from the hub
    tests/presses/test_flash_attention.py
    # RULER: GPU + flash-attention + Llama-3.2-1B / Qwen3-4B from the hub + the simonjegou/ruler dataset
    tests/integration
)
deselect_args=()
for node in "${DESELECT[@]}"; do deselect_args+=(--deselect "$node"); done

work="$(mktemp -d "${TMPDIR:-/tmp}/kvpress-suite.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

if ! "$PY" -m pip download --disable-pip-version-check -q --no-binary :all: --no-deps \
    "kvpress==$KVPRESS_VERSION" -d "$work/sdist" >"$work/pip.log" 2>&1; then
    cat "$work/pip.log" >&2
    exit 1
fi
tar -xzf "$work/sdist/kvpress-$KVPRESS_VERSION.tar.gz" -C "$work"
src="$work/kvpress-$KVPRESS_VERSION"
[ -d "$src/tests" ] || { echo "kvpress_suite.sh: no tests/ in the kvpress $KVPRESS_VERSION sdist" >&2; exit 1; }

# the stand-ins, in their own process (it imports pikvpress, which the plain run must not have imported)
if ! HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error \
    "$PY" "$REPO/kvpress_suite/standins.py" "$work/hub" >"$work/standins.log" 2>&1; then
    cat "$work/standins.log" >&2
    exit 1
fi

run_suite() {  # $1: 1 = pikvpress imported, 0 = not; $2: results file. Prints pytest's summary line.
    local label="with pikvpress imported" rc=0 t0
    [ "$1" = 1 ] || label="WITHOUT pikvpress"
    echo "== kvpress $KVPRESS_VERSION tests, $label =="
    t0=$(date +%s)
    (
        cd "$src"
        PYTHONPATH="$REPO/kvpress_suite${PYTHONPATH:+:$PYTHONPATH}" KVPRESS_SUITE_HF_CACHE="$work/hub" \
            KVPRESS_SUITE_PIKVPRESS="$1" KVPRESS_SUITE_RESULTS="$2" \
            "$PY" -m pytest -p conftest_plugin -p no:cacheprovider -q -rfE --tb=short --timeout=900 \
            "${deselect_args[@]}" "${targets[@]}"
    ) 2>&1 | tee "$work/pytest.log" || rc=$?
    summary="$(grep -E '^=*[ ]*[0-9]+ (passed|failed|errors?|skipped|deselected)' "$work/pytest.log" | tail -1)"
    summary="$(echo "$summary" | tr -d '=' | sed 's/^ *//;s/ *$//')"
    echo "kvpress suite ($label): ${summary:-no pytest summary line} [$(( $(date +%s) - t0 )) s]"
    return "$rc"
}

rc=0
case "$mode" in
    with) run_suite 1 "$work/with.json" || rc=$? ;;
    without) run_suite 0 "$work/without.json" || rc=$? ;;
    compare)
        run_suite 0 "$work/without.json" || true  # its failures are kvpress's own (or need the hub)
        run_suite 1 "$work/with.json" || rc=$?
        "$PY" "$REPO/kvpress_suite/compare.py" "$work/without.json" "$work/with.json" || rc=1
        ;;
esac
echo "kvpress suite finished in $(( $(date +%s) - start )) s"
exit "$rc"
