#!/usr/bin/env bash
# `make test`: `make lint typecheck pytest`, with `make lint-infra` running beside them.
#
# lint-infra shares nothing with the rest: its tools live in venvs of their own under
# .local/venvs, and on a clean clone most of its time goes to installing them (checkov alone
# about two minutes). One after the other, the two durations add up; side by side, `make test`
# takes about as long as lint, typecheck and pytest. lint-infra's report is held in a file and
# printed after theirs, so pytest's output stays in one piece. Either failing fails the run;
# an interrupt stops both.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

MAKE=${MAKE:-make}
log=$(mktemp)
# Its own process group (setsid), so that an interrupt can stop lint-infra and its children.
setsid --wait "$MAKE" --no-print-directory lint-infra >"$log" 2>&1 </dev/null &
infra=$!
trap 'kill -TERM -- "-$infra" 2>/dev/null; rm -f "$log"; exit 130' INT TERM
trap 'rm -f "$log"' EXIT
echo "== make lint-infra: running in the background, its report follows pytest's"

"$MAKE" --no-print-directory lint typecheck pytest
status=$?

wait "$infra"
infra_status=$?
echo "== make lint-infra (exit $infra_status)"
cat "$log"

if ((status != 0 || infra_status != 0)); then
    echo "make test: FAILED (lint, typecheck, pytest: exit $status; lint-infra: exit $infra_status)"
    exit 1
fi
