#!/bin/sh
# Builds what feedback mode's coverage needs into fuzz/build/cov/:
#   libcovmap.so   the runtime that exports trace-pc-guard counters through
#                  shared memory (fuzz/cov/covmap.c)
#   vhostuser/     our package with its C data plane compiled by clang with
#                  -fsanitize-coverage=trace-pc-guard; the Python files are
#                  symlinks to the tree's, so only the C part is a copy.
# Run our back-end with coverage (vhostuser-fuzz --coverage does the rest):
#   LD_PRELOAD=fuzz/build/cov/libcovmap.so PYTHONPATH=fuzz/build/cov \
#       python3 -m vhostuser.fuzz.pytrace -m vhostuser.cli.blk ...
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=${FUZZ_COV_DIR:-"$HERE/build/cov"}
CC=${CC:-clang}
mkdir -p "$OUT"
$CC -O2 -g -fPIC -shared -o "$OUT/libcovmap.so" "$HERE/cov/covmap.c"
echo "built $OUT/libcovmap.so"

rm -rf "$OUT/vhostuser" "$OUT/csrc"
mkdir -p "$OUT/vhostuser"
for f in "$ROOT"/vhostuser/*; do
    case "$(basename "$f")" in _native*|__pycache__) continue ;; esac
    ln -s "$f" "$OUT/vhostuser/"
done
cp -r "$ROOT/csrc" "$OUT/csrc"   # a copy: objects land beside the sources
# The C data plane as build_native.py builds it (run from $OUT, it writes
# $OUT/vhostuser/_native*.so), plus coverage guards; the hooks they call stay
# undefined until libcovmap.so provides them.
(cd "$OUT" && CC="$CC" LDSHARED="$CC -shared" \
    CFLAGS="-fsanitize-coverage=trace-pc-guard -Wno-unused-command-line-argument" \
    python3 csrc/build_native.py >/dev/null 2>&1)
rm -rf "$OUT/csrc" "$OUT/build" "$OUT"/vhostuser/_native.[co]
echo "built $OUT/vhostuser ($(cd "$OUT/vhostuser" && ls _native*.so))"
