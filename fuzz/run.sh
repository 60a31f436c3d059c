#!/bin/sh
# Runs one libFuzzer target for SECONDS, starting from the seed corpus.
#   fuzz/run.sh TARGET SECONDS [libFuzzer options...]
# New inputs go to fuzz/work/TARGET (not the checked-in seeds), crashes to
# fuzz/artifacts/TARGET/. The last lines print stat::number_of_executed_units,
# the execution count. For hours: fuzz/run.sh ring_blk 14400
# (add -fork=N to use N cores). Exit status is non-zero on any finding.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 2 ] || { echo "usage: $0 TARGET SECONDS [libFuzzer options]" >&2; exit 2; }
TARGET=$1
SECONDS_=$2
shift 2
[ -x "$HERE/build/$TARGET" ] || "$HERE/build.sh" "$TARGET" >/dev/null
WORK="$HERE/work/$TARGET"
ART="$HERE/artifacts/$TARGET"
mkdir -p "$WORK" "$ART"
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
exec "$HERE/build/$TARGET" -max_total_time="$SECONDS_" -print_final_stats=1 \
    -artifact_prefix="$ART/" "$@" "$WORK" "$HERE/corpus/$TARGET"
