#!/usr/bin/env bash
# Soak the tests that run real qcluster workers: N runs in a row while two CPU burners compete
# for the cores, the conditions under which races between the test and its worker show up.
#
#     scripts/soak_worker_tests.sh                 # 10 runs of the worker and fault tests
#     scripts/soak_worker_tests.sh 3 tests/test_worker.py
#     BURNERS=0 scripts/soak_worker_tests.sh 5     # no burners (a machine busy enough already)
#
# Every run goes on after a failure (so the count is honest); each run's output is kept in
# $SOAK_LOGS (default: a temporary folder) and the failures' names are printed at the end.
# The burners end by themselves after $BURN_SECONDS at the latest and are killed on exit.
set -u
cd "$(dirname "$0")/.."

RUNS=${1:-10}
shift || true
TESTS=("$@")
[ ${#TESTS[@]} -eq 0 ] && TESTS=(tests/test_worker.py tests/test_faults.py)
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
BURNERS=${BURNERS:-2}
BURN_SECONDS=${BURN_SECONDS:-7200}
SOAK_LOGS=${SOAK_LOGS:-$(mktemp -d -t imagetags-soak-XXXXXX)}
mkdir -p "$SOAK_LOGS"

burners=()
stop_burners() {
    for pid in "${burners[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${burners[@]}"; do
        wait "$pid" 2>/dev/null
    done
    burners=()
}
trap stop_burners EXIT
trap 'exit 130' INT TERM

for _ in $(seq "$BURNERS"); do
    timeout "$BURN_SECONDS" python3 -c 'while True: pass' &
    burners+=($!)
done

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
passed=0
failed=0
started=$(date +%s)
echo "soak: $RUNS run(s) of ${TESTS[*]} with $BURNERS CPU burner(s); logs in $SOAK_LOGS"
for run in $(seq "$RUNS"); do
    log="$SOAK_LOGS/run-$run.log"
    run_started=$(date +%s)
    if "$PYTHON" -m pytest "${TESTS[@]}" -q -p no:cacheprovider >"$log" 2>&1; then
        passed=$((passed + 1))
        outcome=passed
    else
        failed=$((failed + 1))
        outcome=FAILED
    fi
    echo "run $run/$RUNS: $outcome in $(($(date +%s) - run_started)) s: $(tail -n 1 "$log")"
    if [ "$outcome" = FAILED ]; then
        grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
    fi
done
echo "$passed passed, $failed failed ($RUNS runs in $(($(date +%s) - started)) s)"
[ "$failed" -eq 0 ]
