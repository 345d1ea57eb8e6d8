#!/usr/bin/env bash
# Set up everything the tests need, run the whole trial suite, and end with one line "N passed, N failed".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! MTERELAY_NEED_REDIS=1 bash scripts/setup.sh; then
    echo "0 passed, 1 failed"  # setting up failed: no test ran
    exit 1
fi
log=$(mktemp)
.venv/bin/python -m twisted.trial --temp-directory=_trial_temp -j2 "${@:-tests}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
.venv/bin/python scripts/trial_summary.py "$log" || status=1
rm -f "$log"
exit "$status"
