#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine:
#   ./dev.sh demo   set everything up, serve a fresh image with vhostuser-blk
#                   and boot a small Linux guest on it, printing what it did
#   ./dev.sh test   set everything up and run the whole test suite, then the
#                   C data plane's tests again under AddressSanitizer + UBSan,
#                   then each libFuzzer target for a minute
#   ./dev.sh setup  only install what the above need
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(qemu-system-x86 qemu-utils qemu-system-common busybox-static cpio
              e2fsprogs util-linux kmod gcc python3-dev
              dpdk-dev librte-net-vhost23 librte-net-virtio23
              iproute2 clang libclang-rt-14-dev
              systemd libvirt-clients libxml2-utils
              libnbd0 nbdkit libseccomp2)
# A one-node Ceph cluster for the RBD back-end's tests; without recommends it
# is ~50 packages (ceph-common, librbd1, librados2 come along), with them ~100.
APT_NO_RECOMMENDS=(ceph-mon ceph-osd)

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
    python3 -m pip install -q -e '.[test]'
}

run_tests() {
    FUZZ_CLI_CASES=${FUZZ_CLI_CASES:-200} python3 -m pytest -q -rs -p no:cacheprovider tests "$@"
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
    find "$build" -name '_native*' -o -name __pycache__ | xargs rm -rf
    (cd "$build" && VHOSTUSER_SANITIZE=1 python3 csrc/build_native.py >/dev/null 2>&1)
    local asan
    asan=$(gcc -print-file-name=libasan.so)
    echo "== C data plane under ASan/UBSan =="
    # Leak checking would report CPython's own allocations; ASan's other checks stay on.
    (cd "$build" && LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        python3 -c 'import vhostuser._native as n, sys; sys.exit(0 if n.__file__.startswith(sys.argv[1]) else 1)' "$build" &&
     LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        python3 -m pytest -q -p no:cacheprovider tests/unit tests/property \
            tests/device/test_blk_metrics_qos.py tests/device/test_blk_device.py \
            tests/device/test_blk_mapped_reads.py tests/device/test_adaptive_poll.py \
            tests/device/test_memory_lifetime.py tests/device/test_write_through.py \
            -k "not never_runs_dry")
    local rc=$?
    rm -rf "$build"
    return $rc
}

case "${1:-}" in
    setup) setup ;;
    demo) setup; shift; python3 -m vhostuser.demo "$@" ;;
    test) setup; shift; run_tests "$@" ;;
    *) echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac
