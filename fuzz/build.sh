#!/bin/sh
# Builds the libFuzzer targets with AddressSanitizer and UBSan into
# fuzz/build/. Each target links the csrc/*.c files it exercises directly
# (not the Python module), plus stubs for the cffi callbacks.
#   fuzz/build.sh            # all targets
#   fuzz/build.sh ring_blk   # one
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=${FUZZ_BUILD_DIR:-"$HERE/build"}
CC=${CC:-clang}
CFLAGS="-std=gnu11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer \
 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
 -I$ROOT/csrc -I$HERE/targets ${EXTRA_CFLAGS:-}"

# The data plane without the network device and switch (other targets need
# none of it, and it is compiled only where a target needs it).
core() {
    for f in "$ROOT"/csrc/vu_*.c; do
        case "$(basename "$f")" in
            vu_net*|vu_switch*) ;;
            *) echo "$f" ;;
        esac
    done
}

sources() {
    case "$1" in
        ring_blk) core
                  echo "$HERE/targets/guest.c $HERE/targets/stubs.c" ;;
        ring_net) core
                  echo "$ROOT"/csrc/vu_net*.c
                  echo "$HERE/targets/guest.c $HERE/targets/stubs.c" ;;
        mem_translate) echo "$ROOT/csrc/vu_memory.c" ;;
        *) echo "unknown target $1" >&2; exit 2 ;;
    esac
}

# What a target's oracle watches of the data plane (calls from one csrc file
# into another, through a __wrap_ of the target's).
ldflags() {
    case "$1" in
        ring_net) echo "-Wl,--wrap=vu_vq_pop,--wrap=vu_vq_pop_burst,--wrap=vu_vq_unpop\
,--wrap=vu_vq_push,--wrap=vu_vq_push_burst" ;;
    esac
}

TARGETS=${*:-"ring_blk ring_net mem_translate"}
mkdir -p "$OUT"
for t in $TARGETS; do
    # shellcheck disable=SC2046
    $CC $CFLAGS -o "$OUT/$t" "$HERE/targets/$t.c" $(sources "$t") $(ldflags "$t") -lpthread
    echo "built $OUT/$t"
done
