#!/bin/sh
# Builds what feedback mode's coverage needs into fuzz/build/cov/:
#   libcovmap.so   the runtime that exports trace-pc-guard counters through
#                  shared memory (fuzz/cov/covmap.c)
#   vhostuser/     our package with its C data plane compiled by clang with
#                  -fsanitize-coverage=trace-pc-guard; the Python files are
#                  symlinks to the tree's, so only the C part is a copy.
#   run            runs a module of that package with both, C edges and
#                  Python lines counted into the map vhostuser-fuzz names:
#   vhostuser-fuzz --coverage --spawn "fuzz/build/cov/run -m vhostuser.cli.blk --socket-path {socket} ..."
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
# PYTHONSAFEPATH: the working directory must not come first on sys.path, or
# a checkout's own (uninstrumented) vhostuser would be imported instead.
cat > "$OUT/run" <<RUN
#!/bin/sh
exec env LD_PRELOAD="$OUT/libcovmap.so" PYTHONPATH="$OUT" PYTHONSAFEPATH=1 \\
    "\${PYTHON:-python3}" -m vhostuser.fuzz.pytrace "\$@"
RUN
chmod +x "$OUT/run"
echo "built $OUT/run"
