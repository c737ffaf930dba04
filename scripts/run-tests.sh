#!/usr/bin/env bash
# `make test`: the whole suite as two pytest runs side by side. The in-process diarizer tests use
# the CPU alone (no broker, database or services); the fault tests, run first in the other, spend
# minutes waiting on outages, restarts and timeouts with the CPU idle. Side by side they take the
# time of the longer, not of both. Arguments go to both runs; an argument naming tests (not an
# option) runs just those, in one run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/python -m pytest -ra)
IN_PROCESS=(tests/test_diarizer_offline.py tests/test_diarizer_pipeline.py)

for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    exec "${PYTEST[@]}" "$@"
  fi
done

others=(tests/test_faults.py)
for file in tests/test_*.py; do
  case " ${IN_PROCESS[*]} tests/test_faults.py " in
    *" $file "*) ;;
    *) others+=("$file") ;;
  esac
done

in_process_log=$(mktemp)
in_process_tmp=$(mktemp -d)  # its own: pytest prunes the older numbered temp folders of a run
trap 'rm -rf "$in_process_log" "$in_process_tmp"' EXIT
# Its own temp folder and no cache: the other run keeps .pytest_cache (--lf) as one run would.
"${PYTEST[@]}" "$@" --basetemp="$in_process_tmp" -p no:cacheprovider "${IN_PROCESS[@]}" > "$in_process_log" 2>&1 &
in_process=$!
trap 'kill "$in_process" 2>/dev/null; exit 130' INT TERM
"${PYTEST[@]}" "$@" "${others[@]}"
others_status=$?
wait "$in_process"
in_process_status=$?
echo
echo "=== the in-process diarizer tests (${IN_PROCESS[*]}), run beside the rest ==="
cat "$in_process_log"
# pytest's 5 is "no tests collected": a -k that selects none of one run's tests is no failure.
for status in "$others_status" "$in_process_status"; do
  if [[ "$status" != 0 && "$status" != 5 ]]; then
    exit "$status"
  fi
done
if [[ "$others_status" == 5 && "$in_process_status" == 5 ]]; then
  exit 5
fi
