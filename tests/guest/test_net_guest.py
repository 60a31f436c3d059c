"""virtio-net served by vhostuser-net to a real Linux guest (QEMU 7.2, TCG),
bridged to a TAP in a network namespace the test creates: ping with small
and 1400-byte packets, and 1 MiB over TCP whose checksum the host checks;
once with one queue pair and once with two.

QEMU 7.2 segfaults under TCG with vhost-user net and MSI-X, hence
``vectors=0`` on the virtio-net-pci device (the harness default).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from vhostuser.testing import guest

HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
SINK_PORT = 5001

pytestmark = pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 not installed")


@pytest.fixture
def netns():
    name = f"vhu-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns, *cmd, **kw):
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, **kw)


def wait_for(path, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


SINK = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(120)
c, _ = s.accept(); c.settimeout(60); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

WORKLOAD = f"""
ip link set lo up
ip link set eth0 up || exit 10
ip addr add {GUEST_IP}/24 dev eth0 || exit 11
echo "RESULT queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
ping -c 3 -W 3 {HOST_IP} > /tmp/ping1 2>&1; echo "RESULT ping_small=$?"
ping -c 3 -W 3 -s 1400 {HOST_IP} > /tmp/ping2 2>&1; echo "RESULT ping_1400=$?"
dd if=/dev/urandom of=/tmp/blob bs=1024 count=1024 2>/dev/null
echo "RESULT blob_sha=$(sha256sum /tmp/blob | cut -d' ' -f1)"
nc {HOST_IP} {SINK_PORT} < /tmp/blob; echo "RESULT nc=$?"
"""


@pytest.mark.parametrize("queue_pairs", [1, 2])
def test_guest_pings_tap_peer_and_sends_1mib_over_tcp(guest_kit, netns, sock_dir, queue_pairs):
    sock = str(sock_dir / "net.sock")
    log = open(sock_dir / "vhostuser-net.log", "wb")
    backend = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "vhostuser.cli.net",
         "--socket-path", sock, "--tap", "vhu0", "--queues", str(queue_pairs), "-v"],
        stdout=log, stderr=log)
    sink = None
    try:
        wait_for(sock)
        in_ns(netns, "ip", "addr", "add", f"{HOST_IP}/24", "dev", "vhu0")
        in_ns(netns, "ip", "link", "set", "vhu0", "up")
        sink = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", SINK,
                                 HOST_IP, str(SINK_PORT)], stdout=subprocess.PIPE, text=True)
        result = guest.run_guest(
            guest_kit, WORKLOAD, smp=queue_pairs, timeout=180,
            net_sockets=[guest.NetDevice(socket=sock, queues=queue_pairs)])
        res = result.results()
        assert result.exit_code == 0, result.tail()
        assert res["queues"] == str(queue_pairs)
        assert res["ping_small"] == "0" and res["ping_1400"] == "0", result.tail()
        assert res["nc"] == "0"
        out, _ = sink.communicate(timeout=60)
        nbytes, digest = out.split()
        assert int(nbytes) == 1 << 20
        assert digest == res["blob_sha"]
    finally:
        if sink and sink.poll() is None:
            sink.kill()
        backend.terminate()
        try:
            assert backend.wait(10) == 0      # SIGTERM: clean exit
        finally:
            log.close()
            if backend.poll() is None:
                backend.kill()
