#!/usr/bin/env bash
# `make test`: the whole suite in three pytest runs. First the fault tests, alone (they stop
# RabbitMQ and the tests' PostgreSQL, and spend minutes waiting on outages, restarts and timeouts
# with the CPU idle), with the in-process diarizer tests (CPU alone, no broker or database) beside
# them; then the rest in TEST_WORKERS pytest-xdist workers (2 by default; 0 runs them in one
# process), a test file to a worker, each worker with a stack of its own. Arguments go to every
# run; an argument naming tests (not an option) runs just those, in one run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/python -m pytest -ra)
FAULTS=(tests/test_faults.py)
IN_PROCESS=(tests/test_diarizer_offline.py tests/test_diarizer_pipeline.py)
WORKERS=${TEST_WORKERS:-2}

for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    exec "${PYTEST[@]}" "$@"
  fi
done

# The slowest files first, so that no worker is left with a long one at the end.
SLOWEST_FIRST=(tests/test_page.py tests/test_cli.py tests/test_transcripts.py tests/test_webhooks.py
               tests/test_bad_input.py tests/test_handlers.py tests/test_reindex.py tests/test_broker_outages.py
               tests/test_speakers.py)
rest=("${SLOWEST_FIRST[@]}")
for file in tests/test_*.py; do
  case " ${FAULTS[*]} ${IN_PROCESS[*]} ${SLOWEST_FIRST[*]} " in
    *" $file "*) ;;
    *) rest+=("$file") ;;
  esac
done

# Started once, before the workers, with connections enough for all their stacks.
.venv/bin/python devstack.py test-database || exit 1

in_process_log=$(mktemp)
in_process_tmp=$(mktemp -d)  # its own: pytest prunes the older numbered temp folders of a run
trap 'rm -rf "$in_process_log" "$in_process_tmp"' EXIT
# Its own temp folder and no cache: the other runs keep .pytest_cache (--lf) as one run would.
"${PYTEST[@]}" "$@" --basetemp="$in_process_tmp" -p no:cacheprovider "${IN_PROCESS[@]}" > "$in_process_log" 2>&1 &
in_process=$!
trap 'kill "$in_process" 2>/dev/null; exit 130' INT TERM
"${PYTEST[@]}" "$@" "${FAULTS[@]}"
faults_status=$?
wait "$in_process"
in_process_status=$?
echo
echo "=== the in-process diarizer tests (${IN_PROCESS[*]}), run beside the fault tests ==="
cat "$in_process_log"
trap 'exit 130' INT TERM
echo
echo "=== the other tests, in $WORKERS workers ==="
"${PYTEST[@]}" "$@" -n "$WORKERS" --dist loadfile "${rest[@]}"
rest_status=$?

# pytest's 5 is "no tests collected": a -k that selects none of one run's tests is no failure.
statuses=("$faults_status" "$in_process_status" "$rest_status")
for status in "${statuses[@]}"; do
  if [[ "$status" != 0 && "$status" != 5 ]]; then
    exit "$status"
  fi
done
if [[ " ${statuses[*]} " == " 5 5 5 " ]]; then
  exit 5
fi
