"""What each QEMU asks of a back-end. One guest per QEMU (Debian's 7.2 and
QEMU 10) with a vhostuser-blk disk and a vhostuser-net NIC, both logging
every front-end message (-vv): disk I/O, the link up, power off. Every
request either QEMU sends is one the back-ends handle (no protocol error,
nothing refused, clean exit), and the requests and protocol features
QEMU 10 uses that 7.2 does not are reported (``qemu_protocol.json`` in the
test's directory, and the test's properties): issue 16 lists them."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qemus
from vhostuser.protocol import ProtocolFeature, Request
from vhostuser_devkit import guest

REPO = Path(__file__).resolve().parents[2]
MESSAGE = re.compile(r": ([A-Z_0-9]+|request \d+) \(\d+ bytes, \d+ fds\)")
# Log lines at ERROR or above, and any refused or malformed request.
PROBLEM = re.compile(r" (ERROR|CRITICAL): |[Pp]rotocol ?[Ee]rror|refus|Traceback")
WORKLOAD = """
dd if=/dev/urandom of=/tmp/blob bs=4096 count=64 2>/dev/null
dd if=/tmp/blob of=/dev/vda bs=4096 oflag=direct 2>/dev/null || exit 10
dd if=/dev/vda of=/tmp/back bs=4096 count=64 iflag=direct 2>/dev/null || exit 11
cmp /tmp/blob /tmp/back || exit 12
ip link set eth0 up || exit 13
sleep 1
echo "RESULT done=1"
"""
# What a back-end needs from any front-end to serve a disk or a NIC at all.
# (the memory table comes whole or, with CONFIGURE_MEM_SLOTS, region by region)
CORE = {"GET_FEATURES", "SET_FEATURES", "SET_OWNER", "SET_VRING_NUM",
        "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_KICK", "SET_VRING_CALL",
        "GET_VRING_BASE"}


def start(command: list[str], log: Path, sock: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def negotiated_protocol_features(log: str) -> set[str]:
    """From the handler's INFO line "protocol features 0x..." if it logs one,
    else empty (the requests are the reliable record)."""
    names = set()
    for m in re.finditer(r"protocol features (0x[0-9a-f]+)", log):
        value = int(m.group(1), 16)
        names |= {f.name for f in ProtocolFeature if value & (1 << f.value)}
    return names


def session(kit, qemu, sock_dir: Path) -> dict:
    """Boots one guest on `qemu`; returns the requests each back-end saw."""
    tag = qemu.label
    blk_sock, net_sock = sock_dir / f"{tag}-blk.sock", sock_dir / f"{tag}-net.sock"
    blk_log, net_log = blk_sock.with_suffix(".log"), net_sock.with_suffix(".log")
    blk = start([sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", str(blk_sock),
                 "--ramdisk", "16M", "--num-queues", "2", "-vv"], blk_log, blk_sock)
    try:
        net = start([sys.executable, "-m", "vhostuser.cli.net", "--socket-path", str(net_sock),
                     "--loopback", "-vv"], net_log, net_sock)
        try:
            result = guest.run_guest(kit, WORKLOAD, qemu=qemu, smp=2, timeout=180,
                                     blk_sockets=[guest.QemuBlk(socket=str(blk_sock),
                                                                num_queues=2)],
                                     net_sockets=[guest.QemuNet(socket=str(net_sock))])
        finally:
            net_rc = stop(net)
    finally:
        blk_rc = stop(blk)
    assert result.exit_code == 0, result.tail()
    assert result.results().get("done") == "1", result.tail()
    out = {}
    for kind, log, rc in (("blk", blk_log.read_text(), blk_rc), ("net", net_log.read_text(), net_rc)):
        assert rc == 0, (tag, kind, rc, log[-3000:])
        problems = [line for line in log.splitlines() if PROBLEM.search(line)]
        assert not problems, (tag, kind, problems[:10])
        seen = sorted(set(MESSAGE.findall(log)))
        unknown = [name for name in seen if name not in Request.__members__]
        assert not unknown, (tag, kind, unknown)
        assert CORE <= set(seen), (tag, kind, sorted(CORE - set(seen)))
        assert {"SET_MEM_TABLE", "ADD_MEM_REG"} & set(seen), (tag, kind, seen)
        assert negotiated_protocol_features(log), (tag, kind, "no protocol features negotiated")
        out[kind] = {"requests": seen,
                     "protocol_features": sorted(negotiated_protocol_features(log))}
    return out


def test_every_request_of_qemu_7_2_and_10_is_served_and_their_differences_reported(
        guest_kit, sock_dir, tmp_path, record_property):
    found = [q for q in (qemus.system_qemu(), qemus.backport_qemu()) if q is not None]
    if len(found) < 2:
        pytest.skip("needs both Debian's QEMU 7.2 and QEMU 10 (./dev.sh setup)")
    old, new = found
    seen = {q.label: session(guest_kit, q, sock_dir) for q in (old, new)}
    report = {}
    for kind in ("blk", "net"):
        a, b = seen[old.label][kind], seen[new.label][kind]
        report[kind] = {
            f"requests only {new.label}": sorted(set(b["requests"]) - set(a["requests"])),
            f"requests only {old.label}": sorted(set(a["requests"]) - set(b["requests"])),
            f"protocol features only {new.label}": sorted(set(b["protocol_features"])
                                                          - set(a["protocol_features"])),
            "requests": {old.label: a["requests"], new.label: b["requests"]},
            "protocol features": {old.label: a["protocol_features"],
                                  new.label: b["protocol_features"]},
        }
    (tmp_path / "qemu_protocol.json").write_text(json.dumps(report, indent=2))
    record_property("qemu_protocol", json.dumps(report))
    print(json.dumps(report, indent=2))
