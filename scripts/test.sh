#!/usr/bin/env bash
# `make test`: lint, typecheck, lint-infra and pytest, with pytest's long path kept short.
#
# The path that takes time is: create .venv, then pytest. What does not need pytest's results
# runs beside it, each in the background with its report held in a file and printed after
# pytest's, so pytest's output stays in one piece:
#   lint-infra  from the start: its tools live in venvs of their own under .local/venvs
#   typecheck   once .venv exists (mypy needs it): about 20 s that pytest need not wait for
#   test-packages  from the start, waited for before pytest: on a clean machine apt-get
#               (PostgreSQL, chromium) runs meanwhile the venvs build, since it needs none
# lint runs first (under a second). Any of them failing fails the run; an interrupt stops all.
# Every venv is built with the Makefile's pinned uv, which is built (once) before all of them.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

MAKE=${MAKE:-make}
logs=$(mktemp -d)
pids=()
names=()

# beside TARGET: `make TARGET` in the background, in its own process group (setsid) so that
# an interrupt can stop it and its children; its output goes to $logs/TARGET.
beside() {
    setsid --wait "$MAKE" --no-print-directory "$1" >"$logs/$1" 2>&1 </dev/null &
    pids+=("$!")
    names+=("$1")
    echo "== make $1: running in the background, its report follows pytest's"
}

stop_all() {
    local pid
    for pid in "${pids[@]}" ${packages_pid:+"$packages_pid"}; do
        kill -TERM -- "-$pid" 2>/dev/null
    done
}
trap 'stop_all; rm -rf "$logs"; exit 130' INT TERM
trap 'rm -rf "$logs"' EXIT

failed=()
setsid --wait "$MAKE" --no-print-directory test-packages >"$logs/test-packages" 2>&1 </dev/null &
packages_pid=$!
# The pinned uv first: lint-infra and venv both build their venvs with it, and two makes
# building it at once would race.
if ! "$MAKE" --no-print-directory uv; then
    echo "make test: FAILED: make uv"
    exit 1
fi
beside lint-infra
if "$MAKE" --no-print-directory venv lint; then
    beside typecheck
    wait "$packages_pid"
    packages_status=$?
    cat "$logs/test-packages"
    if ((packages_status == 0)); then
        "$MAKE" --no-print-directory pytest || failed+=(pytest)
    else
        failed+=(test-packages)
    fi
else
    failed+=("venv or lint")
    wait "$packages_pid"
fi

for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    status=$?
    echo "== make ${names[$i]} (exit $status)"
    cat "$logs/${names[$i]}"
    ((status == 0)) || failed+=("${names[$i]}")
done

if ((${#failed[@]})); then
    echo "make test: FAILED: ${failed[*]}"
    exit 1
fi
