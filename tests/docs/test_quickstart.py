"""docs/quickstart.md, run as written: its back-end commands serve a disk and
a NIC, and its QEMU command line boots a real guest (QEMU 7.2, TCG) that
uses both. Only paths are changed (into a temporary directory), the TAP
gets a unique name, and ``-kernel``/``-initrd`` point at the test guest kit
(vhostuser_devkit.guest) whose workload checks the devices."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from docblocks import DOCS, PROGRAMS, commands, named_block, python_argv
from vhostuser_devkit import guest

QUICKSTART = DOCS / "quickstart.md"
QEMU = "qemu-system-x86_64"
MARK = "written-through-vhostuser-blk"
MIB = 1 << 20

WORKLOAD = guest._SH_PRELUDE + f"""
[ -b /dev/vda ] || fail "no /dev/vda"
echo "RESULT size=$(blockdev --getsize64 /dev/vda) queues=$(ls /sys/block/vda/mq | wc -l)"
printf '{MARK}' > /tmp/mark
dd if=/tmp/mark of=/dev/vda bs=512 seek=2048 count=1 conv=sync oflag=direct 2>/dev/null || fail write
back=$(dd if=/dev/vda bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | tr -d '\\000')
[ "$back" = "{MARK}" ] || fail "read back '$back'"
[ -e /sys/class/net/eth0 ] || fail "no eth0"
echo "RESULT net_driver=$(basename $(readlink /sys/class/net/eth0/device/driver))"
ip addr add 10.213.0.2/24 dev eth0 && ip link set eth0 up || fail "eth0 up"
arping -c 2 -w 2 -I eth0 10.213.0.1 >/dev/null 2>&1
echo "RESULT done=1"
"""

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed"),
]


def wait_for_socket(path: Path, proc: subprocess.Popen, log: Path, timeout=20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"back-end exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear:\n{log.read_text()}")
        time.sleep(0.05)


def logged_stats(log: Path) -> dict:
    for line in log.read_text(errors="replace").splitlines():
        if " stats: {" in line:
            return ast.literal_eval(line.split(" stats: ", 1)[1])
    raise AssertionError(f"no stats line in {log}:\n{log.read_text()}")


def can_make_tap() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


def test_quickstart_serves_a_guest_with_the_documented_command_lines(tmp_path):
    kit = guest.build_guest()
    backends = commands(named_block(QUICKSTART, "backends").text)
    [qemu] = commands(named_block(QUICKSTART, "qemu").text)

    # The documented paths, moved into tmp_path (short: sockets max 107 bytes).
    run = Path(tmp_path)
    tap = f"vhud{os.getpid() % 100000}"
    paths = {"/var/tmp/vm1.img": str(run / "vm1.img"),
             "/tmp/vm1-disk.sock": str(run / "disk.sock"),
             "/tmp/vm1-net.sock": str(run / "net.sock")}

    def moved(argv):
        out = []
        for arg in argv:
            for old, new in paths.items():
                arg = arg.replace(old, new)
            out.append(arg)
        return out

    procs: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        for argv in map(moved, backends):
            if argv[0] not in PROGRAMS:
                subprocess.run(argv, check=True)             # truncate -s 1G ...
                continue
            if argv[0] == "vhostuser-net" and "--tap" in argv:
                i = argv.index("--tap")
                argv[i:i + 2] = ["--tap", tap] if can_make_tap() else ["--loopback"]
            log = run / f"{argv[0]}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(python_argv(argv) + ["-v"], stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=out)
            procs.append((argv[0], proc, log))
            sock = Path(argv[argv.index("--socket-path") + 1])
            wait_for_socket(sock, proc, log)
        assert sorted(name for name, _, _ in procs) == ["vhostuser-blk", "vhostuser-net"]
        if can_make_tap() and shutil.which("ip"):
            subprocess.run(["ip", "link", "set", tap, "up"], check=False)

        assert "vmlinuz" in qemu and "initrd.img" in qemu, "the test swaps these for the kit's"
        initrd = kit.initramfs_with(WORKLOAD, run / "initrd.img")
        argv = [str(kit.kernel) if a == "vmlinuz" else str(initrd) if a == "initrd.img" else a
                for a in moved(qemu)]
        console = run / "console.log"
        with open(console, "wb") as out:
            try:
                result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, timeout=240)
            except subprocess.TimeoutExpired:
                pytest.fail(f"guest did not power off:\n{console.read_text(errors='replace')[-3000:]}")
        text = console.read_text(errors="replace").replace("\r", "")
        assert f"{guest.EXIT_MARKER}0" in text, f"QEMU exit {result.returncode}:\n{text[-3000:]}"
        results = guest.GuestResult(text, 0, result.returncode, 0, None, argv).results()
        assert results["size"] == str(1 << 30)            # truncate -s 1G
        assert results["queues"] == "2"                   # --queues 2 / num-queues=2
        assert results["net_driver"] == "virtio_net"
        assert results["done"] == "1"
    finally:
        for name, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
        codes = {name: proc.wait(30) for name, proc, _ in procs}

    # Both back-ends exit cleanly on SIGTERM, as documented.
    assert codes == {"vhostuser-blk": 0, "vhostuser-net": 0}
    logs = {name: log for name, _, log in procs}
    assert "front-end connected" in logs["vhostuser-blk"].read_text()
    with open(paths["/var/tmp/vm1.img"], "rb") as image:
        image.seek(MIB)
        assert image.read(len(MARK)).decode() == MARK
    net = logged_stats(logs["vhostuser-net"])
    # The guest's ARP requests reached the back-end (sent on, or dropped by a
    # TAP that is down).
    assert net["tx_packets"] + net["tx_dropped_io"] >= 1, net
