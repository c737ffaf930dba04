#!/usr/bin/env bash
# `make test`: the whole suite in three pytest runs. First the fault tests, alone (they stop
# RabbitMQ and the tests' PostgreSQL, and spend minutes waiting on outages, restarts and timeouts
# with the CPU idle), with the in-process tests (the diarizer's and the unit tests: CPU alone, no
# broker, database or object store) beside them; then the rest in TEST_WORKERS pytest-xdist workers (2 by default; 0 runs them in one
# process), a test file to a worker, each worker with a stack of its own. Arguments go to every
# run; an argument naming tests (a path under tests/, not an option's value) runs just those, in
# one run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/python -m pytest -ra)
FAULTS=(tests/test_faults.py)
IN_PROCESS=(tests/test_diarizer_offline.py tests/test_diarizer_pipeline.py tests/test_units.py tests/test_audio.py
            tests/test_rewrites.py)
WORKERS=${TEST_WORKERS:-2}  # devstack.test_pg_connections reads it so too

# pytest's options whose value may come as the next argument (the ones used with a path or a
# word that may be one): that value names no tests (`-k cli`, `--deselect tests/test_cli.py::test_x`).
VALUE_OPTIONS=" -c -k -m -n -o -p -r -W --basetemp --confcutdir --deselect --dist --durations --ignore --ignore-glob
  --junit-xml --junitxml --log-file --maxfail --numprocesses --override-ini --rootdir --tb "
TESTS_DIR="$(pwd -P)/tests"

takes_next_argument() {  # an option written without its value: `-k`, `-vk`, `--deselect`
  local option=$1 i
  if [[ "$option" == --* ]]; then
    [[ "$option" != *=* && "$VALUE_OPTIONS" == *[[:space:]]"$option"[[:space:]]* ]]
    return
  fi
  for ((i = 1; i < ${#option}; i++)); do  # -vk: flags, then one that takes the rest or the next
    if [[ "$VALUE_OPTIONS" == *[[:space:]]"-${option:i:1}"[[:space:]]* ]]; then
      ((i == ${#option} - 1))
      return
    fi
  done
  return 1
}

names_tests() {  # a path under tests/ (a file, a folder, file::test)
  local path
  path=$(realpath -e -- "${1%%::*}" 2>/dev/null) || return 1
  [[ "$path" == "$TESTS_DIR" || "$path" == "$TESTS_DIR"/* ]]
}

value_next=false
for arg in "$@"; do
  if $value_next; then
    value_next=false
  elif [[ "$arg" == -* ]]; then
    takes_next_argument "$arg" && value_next=true
  elif names_tests "$arg"; then
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
# Each run its own cache, kept across runs (--lf, --sw): the first two run at once, and runs
# sharing one would lose each other's failures and test counts. Its own temp folder too.
"${PYTEST[@]}" "$@" --basetemp="$in_process_tmp" -o cache_dir=.pytest_cache/in-process "${IN_PROCESS[@]}" \
  > "$in_process_log" 2>&1 &
in_process=$!
trap 'kill "$in_process" 2>/dev/null; exit 130' INT TERM
"${PYTEST[@]}" "$@" -o cache_dir=.pytest_cache/faults "${FAULTS[@]}"
faults_status=$?
wait "$in_process"
in_process_status=$?
echo
echo "=== the in-process tests (${IN_PROCESS[*]}), run beside the fault tests ==="
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
