#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine:
#   ./dev.sh demo   set everything up, serve a fresh image with vhostuser-blk
#                   and boot a small Linux guest on it, printing what it did
#   ./dev.sh test   set everything up and run the whole test suite, then the
#                   C data plane's tests again under AddressSanitizer + UBSan,
#                   then each libFuzzer target for a minute
#   ./dev.sh setup  only install what the above need
#
# Python: everything runs from a virtual environment, .venv in the checkout
# ($VHOSTUSER_VENV to put it elsewhere), made from `python3` on $PATH (on
# Debian, /usr/bin/python3 with python3-venv) or from $PYTHON, any Python
# 3.11 or newer: PYTHON=/usr/local/bin/python3.12 ./dev.sh test. A venv made
# from another interpreter is replaced.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(qemu-system-x86 qemu-utils qemu-system-common busybox-static cpio
              e2fsprogs util-linux kmod gcc python3-dev python3-venv
              dpdk-dev librte-net-vhost23 librte-net-virtio23
              iproute2 clang libclang-rt-14-dev
              systemd libvirt-clients libxml2-utils
              libvirt-daemon-system libvirt-daemon-driver-qemu
              libnbd0 nbdkit libseccomp2)
# A one-node Ceph cluster for the RBD back-end's tests; without recommends it
# is ~50 packages (ceph-common, librbd1, librados2 come along), with them ~100.
APT_NO_RECOMMENDS=(ceph-mon ceph-osd)

VENV=${VHOSTUSER_VENV:-$PWD/.venv}
PY=$VENV/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing_packages() {
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
    done
}

setup() {
    local missing lean
    missing=$(missing_packages "${APT_PACKAGES[@]}")
    lean=$(missing_packages "${APT_NO_RECOMMENDS[@]}")
    if [ -n "$missing$lean" ]; then
        as_root apt-get update -qq
    fi
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
    if [ -n "$lean" ]; then
        # shellcheck disable=SC2086
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends $lean >/dev/null
    fi
    make_venv
    "$PY" -m pip install -q -e '.[test]' -e ./devkit
    # QEMU 10 from bookworm-backports in a private prefix (Debian's 7.2 stays
    # the system's QEMU): the guest tests run on both.
    "$PY" tests/guest/qemus.py fetch
}

# The venv, made (again) when missing, broken, or from another interpreter.
make_venv() {
    local base made
    # shellcheck disable=SC2016
    local which='import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))'
    base=$("${PYTHON:-python3}" -c "$which") ||
        { echo "dev.sh: cannot run ${PYTHON:-python3}" >&2; exit 1; }
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "dev.sh: vhostuser needs Python 3.11 or newer; $base is $("$base" -V 2>&1)" >&2
        exit 1
    fi
    made=$("$PY" -c "$which" 2>/dev/null || true)
    if [ "$made" = "$base" ] && "$PY" -c 'import pip' 2>/dev/null; then
        return
    fi
    if [ -e "$VENV" ]; then
        echo "dev.sh: replacing $VENV (made from ${made:-an interpreter that no longer runs}) by one from $base" >&2
        rm -rf "$VENV"
    fi
    "$base" -m venv "$VENV"
}

# Commands below run the venv's programs first (python3, pip, vhostuser-*).
use_venv() {
    export VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH
    unset PYTHONHOME
}

run_tests() {
    # A missing QEMU 10 is an error here, not a skip.
    VHOSTUSER_REQUIRE_QEMUS=1 FUZZ_CLI_CASES=${FUZZ_CLI_CASES:-200} "$PY" -m pytest -q -rs -p no:cacheprovider tests "$@"
    sanitizer_tests
    echo "== coverage-guided fuzz smoke (libFuzzer, ASan+UBSan) =="
    SMOKE_SECONDS=${SMOKE_SECONDS:-60} fuzz/smoke.sh
}

# The C data plane once more, built with -fsanitize=address,undefined and
# exercised by the unit and property tests (which drive it hardest) and the
# device tests that run real worker threads (QoS timers, io_uring, metrics).
sanitizer_tests() {
    local build
    build=$(mktemp -d)
    cp -r csrc vhostuser tests examples "$build"/
    find "$build" -name '_native*' -o -name '_blkload*' -o -name __pycache__ | xargs rm -rf
    (cd "$build" && VHOSTUSER_SANITIZE=1 "$PY" csrc/build_native.py >/dev/null 2>&1)
    local asan
    asan=$(gcc -print-file-name=libasan.so)
    echo "== C data plane under ASan/UBSan =="
    # Leak checking would report CPython's own allocations; ASan's other checks stay on.
    (cd "$build" && LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$PY" -c 'import vhostuser._native as n, sys; sys.exit(0 if n.__file__.startswith(sys.argv[1]) else 1)' "$build" &&
     LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$PY" -m pytest -q -p no:cacheprovider tests/unit tests/property \
            tests/device/test_blk_metrics_qos.py tests/device/test_blk_device.py \
            tests/device/test_blk_mapped_reads.py tests/device/test_adaptive_poll.py \
            tests/device/test_memory_lifetime.py tests/device/test_write_through.py \
            tests/device/test_mapped_writes.py tests/device/test_write_cache.py \
            tests/device/test_net_backend_contract.py tests/device/test_generic_device.py \
            -k "not never_runs_dry")
    local rc=$?
    rm -rf "$build"
    return $rc
}

case "${1:-}" in
    setup) setup ;;
    demo) setup; use_venv; shift; "$PY" -m vhostuser_devkit.demo "$@" ;;
    test) setup; use_venv; shift; run_tests "$@" ;;
    *) echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac
