#!/usr/bin/env bash
# CI smoke: build every target and run each for SMOKE_SECONDS (default 60),
# from the seed corpus. Fails on any crash, sanitizer report or oracle abort.
#   SMOKE_SECONDS=10 fuzz/smoke.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
"$HERE/build.sh"
for t in ring_blk ring_net mem_translate; do
    log=$(mktemp)
    if ! "$HERE/run.sh" "$t" "${SMOKE_SECONDS:-60}" > "$log" 2>&1; then
        tail -40 "$log"
        echo "$t: FAILED (see fuzz/artifacts/$t/)" >&2
        rm -f "$log"
        exit 1
    fi
    grep -E "^stat::number_of_executed_units" "$log" | sed "s/^/$t: /"
    rm -f "$log"
done
