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
CORE="vu_memory.c vu_queue.c vu_split.c vu_packed.c vu_dev.c vu_blk.c vu_filemap.c vu_qos.c vu_uring.c vu_worker.c vu_fault.c"

sources() {
    case "$1" in
        ring_blk) echo "$CORE" | sed "s|vu_|$ROOT/csrc/vu_|g"
                  echo "$HERE/targets/guest.c $HERE/targets/stubs.c" ;;
        mem_translate) echo "$ROOT/csrc/vu_memory.c" ;;
        *) echo "unknown target $1" >&2; exit 2 ;;
    esac
}

TARGETS=${*:-"ring_blk mem_translate"}
mkdir -p "$OUT"
for t in $TARGETS; do
    # shellcheck disable=SC2046
    $CC $CFLAGS -o "$OUT/$t" "$HERE/targets/$t.c" $(sources "$t") -lpthread
    echo "built $OUT/$t"
done
