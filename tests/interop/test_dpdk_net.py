"""DPDK's testpmd, through its virtio-user PMD, as a third-party vhost-user
front-end for our virtio-net device.

virtio-user is the driver side of virtio-net written by other people (it
sends SET_VRING_CALL before SET_FEATURES, uses SET_STATUS, and indirect
descriptor tables for chained mbufs). Our device serves it in-process with a
Python back-end that records what testpmd transmits; testpmd runs in
interactive mode driven over stdin (it quits by itself when stdin closes),
and its own port counters tell what it received:

* txonly: the frames testpmd generates (64 and 1500 bytes, and 1500 bytes in
  three chained mbufs) reach our back-end intact, every one it counted;
* rxonly: every frame our back-end injects is counted by testpmd, bytes too;
* macswap: injected frames come back to our back-end with the MAC addresses
  swapped and nothing else changed.

Each over split rings without mergeable receive buffers and over packed rings
with them; with small mbufs, frames that span two mergeable buffers too.

It found two bugs of ours, fixed (see the note further down): a chained
mbuf over a packed ring (DPDK's indirect table marks its header
device-writable) broke the transmit queue, and a frame spanning mergeable
buffers of a packed ring could be seen half-written.

No hugepages: EAL runs on memfd-backed memory (--no-huge), which virtio-user
can share (it needs --single-file-segments). testpmd's two lcores are pinned
to one CPU so that its busy polling leaves the other to us.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import struct
import tempfile
import threading
import time

import pytest

from vhostuser.net import LoopbackBackend, NetBackend, NetDevice
from vhostuser.testing.server import BackgroundServer
from vhostuser_devkit.testpmd import TESTPMD, TestPmd


pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(TESTPMD is None, reason="dpdk-testpmd is not installed "
                       "(apt-get install dpdk-dev librte-net-virtio23)"),
]

OUR_MAC = bytes.fromhex("525400123456")
PMD_MAC = bytes.fromhex("0200000000aa")     # given to virtio-user with mac=
PEER_MAC = bytes.fromhex("020000000000")    # testpmd's default peer of port 0
ETH_P_IP = 0x0800
ETH_P_LOCAL = 0x88B5                        # IEEE 802 local experimental

STARTUP_TIMEOUT = 60.0
TRAFFIC_TIMEOUT = 20.0

SPLIT = dict(devargs="queues=1,packed_vq=0,mrg_rxbuf=0")
PACKED_MRG = dict(devargs="queues=1,packed_vq=1,mrg_rxbuf=1")
# 1024-byte mbufs leave 896 bytes of data room: a 1514-byte frame from us
# spans two mergeable receive buffers and reaches testpmd as two segments;
# sent back (macswap), it is a chain of two mbufs again.
SMALL_MBUFS = ["--mbuf-size=1024", "--enable-scatter"]
# in_order=0: with VIRTIO_F_IN_ORDER (which we offer) DPDK's split-ring
# transmit sends a chain of mbufs as plain descriptors, not an indirect table;
# this rig is the one for its indirect path.
SPLIT_MRG_SMALL = dict(devargs="queues=1,packed_vq=0,mrg_rxbuf=1,in_order=0",
                       app_args=SMALL_MBUFS)
PACKED_MRG_SMALL = dict(devargs="queues=1,packed_vq=1,mrg_rxbuf=1", app_args=SMALL_MBUFS)

# Two things this test found, both fixed:
# - DPDK's virtio PMD leaves VRING_DESC_F_WRITE on the header entry of its
#   packed indirect transmit tables; the device only reads transmit queues,
#   so the net device ignores WRITE there (as DPDK's vhost does).
# - A frame spread over mergeable buffers of a packed ring must become
#   visible to a polling driver all at once: the first descriptor of a batch
#   is handed back last, at flush.

BASIC = [pytest.param(SPLIT, id="split"), pytest.param(PACKED_MRG, id="packed-mrg")]


# -- testpmd ---------------------------------------------------------------------------

def _testpmd_cpu() -> int:
    """The CPU testpmd's busy-polling lcores share: the last one we may use."""
    try:
        return max(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return 0


def start_testpmd(sock: str, devargs: str, log_path: str, app_args=()) -> TestPmd:
    """testpmd with one virtio-user port on ``sock``, its port up."""
    cpu = _testpmd_cpu()
    pmd = TestPmd(f"net_virtio_user0,path={sock},mac={fmt_mac(PMD_MAC)},{devargs}",
                  f"0@{cpu},1@{cpu}", log_path, app_args=app_args, tag="vhu-test")
    try:
        pmd.wait_ready(STARTUP_TIMEOUT)
    except BaseException:
        pmd.close()
        raise
    return pmd


# -- our side ---------------------------------------------------------------------------

class Recorder(NetBackend):
    """Keeps (header, frame, length) of what testpmd transmits, up to ``keep``."""

    def __init__(self, keep: int = 4000):
        super().__init__()
        self.keep = keep
        self.cond = threading.Condition()
        self.frames: list[tuple[bytes, bytes, int]] = []
        self.count = 0
        self.queues: set[int] = set()

    def transmit(self, queue_pair, frames):
        with self.cond:
            self.queues.add(queue_pair)
            for f in frames:
                self.count += 1
                if len(self.frames) < self.keep:
                    self.frames.append((f.header, f.tobytes(), f.length))
            self.cond.notify_all()

    def reset(self) -> None:
        with self.cond:
            self.frames = []
            self.count = 0

    def wait_count(self, n: int, timeout: float, abort=lambda: False) -> int:
        """Waits until ``n`` frames arrived, time is up or ``abort()``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0 or abort():
                    break
                self.cond.wait(min(left, 0.2))
            return self.count


class Rig:
    def __init__(self, device: NetDevice, backend: Recorder, pmd: TestPmd, variant: dict,
                 caplog):
        self.device = device
        self.backend = backend
        self.pmd = pmd
        self.variant = variant
        self.caplog = caplog

    def check_quiet(self) -> None:
        """Nothing went wrong on our side of the protocol: no refused
        message, no closed connection, no broken ring."""
        assert not self.ring_errors()
        trouble = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.caplog.records
                   if r.name.startswith("vhostuser") and r.levelno >= logging.WARNING]
        assert not trouble, "our device complained:\n" + "\n".join(trouble)

    def ring_errors(self) -> list[str]:
        """Our rings that broke on something testpmd put in them."""
        session = self.device.session
        if session is None:
            return []
        return [f"ring {q.index}: {q.error}" for q in session.dataplane.queues if q.broken]

    def inject_all(self, frames: list[bytes], timeout: float = TRAFFIC_TIMEOUT,
                   window: int | None = None) -> int:
        """Injects every frame in order, retrying one while testpmd has no
        buffer posted for it; returns how many went. With ``window``, no
        more than that many are on their way back to our transmit at once
        (so a forwarding testpmd never finds its transmit ring full)."""
        deadline = time.monotonic() + timeout
        sent = 0
        for frame in frames:
            if window is not None and sent - self.backend.count >= window:
                self.backend.wait_count(sent - window + 1, deadline - time.monotonic(),
                                        abort=self.ring_errors)
                if sent - self.backend.count >= window:
                    return sent
            while not self.backend.inject(frame):
                if time.monotonic() > deadline or self.ring_errors():
                    return sent
                time.sleep(0.0005)
            sent += 1
        return sent


def fmt_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def wait_until(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@contextlib.contextmanager
def served_to_testpmd(device: NetDevice, devargs: str, log_path: str, app_args=()):
    """Serves ``device`` on a fresh socket with testpmd connected to it and
    yields testpmd; afterwards both are stopped and testpmd's output is
    printed (pytest shows it when the test failed)."""
    sockdir = tempfile.mkdtemp(prefix="vhu-dpdk-", dir="/tmp")
    sock = os.path.join(sockdir, "net.sock")
    pmd = None
    try:
        with BackgroundServer(device, sock):
            pmd = start_testpmd(sock, devargs, log_path, app_args)
            print("testpmd command:", " ".join(pmd.command))
            yield pmd
    finally:
        if pmd is not None:
            pmd.close()
            print(f"--- testpmd output ---\n{pmd.output()[-6000:]}")
        device.close()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture
def rig(request, tmp_path, caplog):
    """Our device with a recording back-end, testpmd connected to it; testpmd
    must exit cleanly after the test."""
    variant = request.param
    caplog.set_level(logging.INFO, logger="vhostuser")
    backend = Recorder()
    device = NetDevice(backend, mac=OUR_MAC)
    with served_to_testpmd(device, variant["devargs"], str(tmp_path / "testpmd.log"),
                    variant.get("app_args", [])) as pmd:
        yield Rig(device, backend, pmd, variant, caplog)
        status = pmd.close()
        assert status == 0, f"testpmd exited with {status}"
        assert "Bye..." in pmd.output()


# -- frame helpers -------------------------------------------------------------------------

def ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def check_txonly_frame(frame: bytes, length: int, header: bytes, expect_len: int) -> None:
    """What testpmd's txonly engine builds: Ethernet to the peer address,
    IPv4 198.18.0.1 -> 198.18.0.2, TTL 64, UDP port 9 -> 9, no checksum."""
    assert len(frame) == length == expect_len
    # no offload asked for: no checksum to fill in, no segmentation
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from(
        "<BBHHHH", header)
    assert (flags, gso_type, gso_size, csum_start, csum_offset) == (0, 0, 0, 0, 0), header.hex()
    dst, src, ethertype = frame[0:6], frame[6:12], struct.unpack_from("!H", frame, 12)[0]
    assert (dst, src, ethertype) == (PEER_MAC, PMD_MAC, ETH_P_IP), frame[:14].hex()
    ip = frame[14:34]
    ver_ihl, _tos, total_len, _ident, frag, ttl, proto, _csum, saddr, daddr = struct.unpack(
        "!BBHHHBBH4s4s", ip)
    assert ver_ihl == 0x45
    assert total_len == expect_len - 14
    assert frag & 0x1FFF == 0 and ttl == 64 and proto == 17
    assert ip_checksum(ip) == 0, f"bad IPv4 header checksum in {ip.hex()}"
    assert ipaddress.IPv4Address(saddr) == ipaddress.IPv4Address("198.18.0.1")
    assert ipaddress.IPv4Address(daddr) == ipaddress.IPv4Address("198.18.0.2")
    sport, dport, udp_len, udp_csum = struct.unpack_from("!HHHH", frame, 34)
    assert (sport, dport, udp_len, udp_csum) == (9, 9, expect_len - 34, 0)


SIZES = [60, 64, 65, 128, 511, 512, 1000, 1400, 1513, 1514]


def make_frames(n: int, seed: int) -> list[bytes]:
    """Frames to testpmd's port, numbered, of assorted sizes up to 1514."""
    frames = []
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        head = PMD_MAC + OUR_MAC + struct.pack("!HII", ETH_P_LOCAL, seed, i)
        body = bytes((i + j) & 0xFF for j in range(size - len(head)))
        frames.append(head + body)
    return frames


# -- tests ------------------------------------------------------------------------------------

def run_txonly(rig: Rig, txpkts: str, seconds: float = 1.0) -> None:
    """testpmd's txonly engine sends ``txpkts`` frames for about ``seconds``
    (longer if nothing arrived yet); every frame it counts as sent must
    arrive once, as its known IPv4/UDP frame."""
    pmd, device, backend = rig.pmd, rig.device, rig.backend
    expect_len = sum(int(s) for s in txpkts.split(","))
    pmd.cmd("set fwd txonly")
    out = pmd.cmd(f"set txpkts {txpkts}")
    assert "error" not in out.lower() and "invalid" not in out.lower(), out
    before, ours_before = pmd.stats(), device.stats()
    backend.reset()
    t0 = time.monotonic()
    pmd.cmd("start")
    got = backend.wait_count(1, TRAFFIC_TIMEOUT, abort=rig.ring_errors)
    if got:
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
    pmd.cmd("stop")
    elapsed = time.monotonic() - t0
    after = pmd.stats()
    sent = after["TX-packets"] - before["TX-packets"]
    assert got > 0, (f"none of the {sent} {txpkts}-byte frames testpmd sent arrived; "
                     f"{rig.ring_errors()}")
    # testpmd stopped: what it put on the ring is all there for us to take.
    # (The device counts a Python batch once transmit() has returned.)
    wait_until(lambda: (backend.count >= sent and
                        device.stats()["tx_packets"] - ours_before["tx_packets"] >= sent)
               or rig.ring_errors(), 10)
    ours = device.stats()
    assert not rig.ring_errors()
    assert backend.count == sent, (backend.count, sent)
    assert ours["tx_packets"] - ours_before["tx_packets"] == sent
    assert ours["tx_bytes"] - ours_before["tx_bytes"] == sent * expect_len
    assert after["TX-bytes"] - before["TX-bytes"] == sent * expect_len
    for key, value in ours.items():
        if key.startswith("tx_dropped"):
            assert value == ours_before[key], (key, value)
    assert backend.queues == {0}
    assert backend.frames
    for header, frame, length in backend.frames:
        check_txonly_frame(frame, length, header, expect_len)
    print(f"txonly {txpkts}: {sent} frames in {elapsed:.1f}s "
          f"({sent / elapsed:.0f} frames/s into the Python back-end)")
    rig.check_quiet()


def run_rxonly(rig: Rig, frames: list[bytes]) -> None:
    """Every frame we inject is received by testpmd's rxonly engine: packets
    and bytes, nothing missed or in error."""
    pmd, device = rig.pmd, rig.device
    pmd.cmd("set fwd rxonly")
    pmd.cmd("start")
    before, ours_before = pmd.stats(), device.stats()
    t0 = time.monotonic()
    sent = rig.inject_all(frames)
    elapsed = time.monotonic() - t0
    assert sent == len(frames), (f"only {sent} of {len(frames)} frames could be injected; "
                                 f"{rig.ring_errors()}")
    wait_until(lambda: pmd.stats()["RX-packets"] - before["RX-packets"] >= sent
               or rig.ring_errors(), 10, 0.2)
    after = pmd.stats()
    pmd.cmd("stop")
    assert not rig.ring_errors()
    assert after["RX-packets"] - before["RX-packets"] == sent, (after, before)
    assert after["RX-bytes"] - before["RX-bytes"] == sum(len(f) for f in frames)
    for key in ("RX-errors", "RX-missed", "RX-nombuf"):
        assert after.get(key, 0) == before.get(key, 0), (key, after, before)
    ours = device.stats()
    assert ours["rx_packets"] - ours_before["rx_packets"] == sent
    assert ours["rx_bytes"] - ours_before["rx_bytes"] == sum(len(f) for f in frames)
    assert ours["rx_dropped_too_long"] == ours_before["rx_dropped_too_long"]
    print(f"inject -> rxonly: {sent} frames in {elapsed:.1f}s ({sent / elapsed:.0f} frames/s)")
    rig.check_quiet()


def run_macswap(rig: Rig, frames: list[bytes]) -> None:
    """testpmd's macswap engine sends each injected frame back: it reaches
    our transmit with source and destination swapped, the rest unchanged,
    in order."""
    pmd, backend = rig.pmd, rig.backend
    # retry: testpmd waits for room on its transmit ring rather than drop
    pmd.cmd("set fwd macswap retry")
    pmd.cmd("start")
    before = pmd.stats()
    backend.reset()
    t0 = time.monotonic()
    sent = rig.inject_all(frames, window=128)
    assert sent == len(frames), (f"only {sent} of {len(frames)} frames could be injected "
                                 f"({backend.count} came back); {rig.ring_errors()}")
    got = backend.wait_count(sent, TRAFFIC_TIMEOUT, abort=rig.ring_errors)
    elapsed = time.monotonic() - t0
    after = pmd.stats()
    pmd.cmd("stop")
    assert got == sent, f"{got} of {sent} frames came back; {rig.ring_errors()}"
    assert not rig.ring_errors()
    assert after["RX-packets"] - before["RX-packets"] == sent
    assert after["TX-packets"] - before["TX-packets"] == sent
    returned = [frame for _header, frame, _length in backend.frames]
    for i, (frame, original) in enumerate(zip(returned, frames)):
        assert len(frame) == len(original), i
        assert frame[0:6] == OUR_MAC and frame[6:12] == PMD_MAC, (i, frame[:12].hex())
        assert frame[12:] == original[12:], f"frame {i} changed past the MAC addresses"
    print(f"inject -> macswap -> transmit: {sent} frames round trip in {elapsed:.1f}s "
          f"({sent / elapsed:.0f} frames/s)")
    rig.check_quiet()


@pytest.mark.parametrize("rig", BASIC, indirect=True)
def test_testpmd_txonly_frames_reach_our_backend_intact(rig):
    """64-byte and 1500-byte frames, each in one mbuf."""
    run_txonly(rig, "64")
    run_txonly(rig, "1500")


@pytest.mark.parametrize("rig", BASIC, indirect=True)
def test_frames_we_inject_are_counted_by_testpmd_rxonly(rig):
    run_rxonly(rig, make_frames(3000, seed=1))


@pytest.mark.parametrize("rig", BASIC, indirect=True)
def test_injected_frames_come_back_macswapped(rig):
    run_macswap(rig, make_frames(1000, seed=2))


@pytest.mark.parametrize("rig", [
    pytest.param(SPLIT, id="split"),
    pytest.param(PACKED_MRG, id="packed-mrg"),
], indirect=True)
def test_testpmd_txonly_chained_mbufs_reach_our_backend_intact(rig):
    """A 1500-byte frame in three mbufs: testpmd sends it through an
    indirect descriptor table (header + three segments)."""
    run_txonly(rig, "64,700,736")


@pytest.mark.parametrize("rig", [
    pytest.param(SPLIT_MRG_SMALL, id="split-mrg"),
    pytest.param(PACKED_MRG_SMALL, id="packed-mrg"),
], indirect=True)
def test_frames_spanning_mergeable_buffers_are_counted_by_testpmd(rig):
    """With small mbufs each 1514-byte frame takes two receive buffers
    (num_buffers=2 in the header); testpmd counts whole frames and bytes."""
    run_rxonly(rig, make_frames(1000, seed=3))


@pytest.mark.parametrize("rig", [
    pytest.param(SPLIT_MRG_SMALL, id="split-mrg"),
    pytest.param(PACKED_MRG_SMALL, id="packed-mrg"),
], indirect=True)
def test_frames_spanning_mergeable_buffers_come_back_macswapped(rig):
    """Received in two mbufs, sent back as a two-mbuf chain (indirect)."""
    run_macswap(rig, make_frames(300, seed=4))


@pytest.mark.parametrize("devargs", [SPLIT["devargs"], PACKED_MRG["devargs"]],
                         ids=["split", "packed-mrg"])
@pytest.mark.parametrize("poll", [0, 1000], ids=["eventfd", "busy-poll"])
def test_c_loopback_under_flowgen_keeps_forwarding(tmp_path, devargs, poll):
    """testpmd floods the C loopback back-end (flowgen) and counts what comes
    back. Under this load the transmit handler keeps running out of its
    round budget with notifications off; a worker that then slept (a
    polling window ending on a time limit) got no kick ever again and the
    traffic stopped for good. Every half second must see frames back."""
    device = NetDevice(LoopbackBackend(), mac=OUR_MAC, poll_us=poll)
    device.queues_per_worker = 2 if poll else 1
    with served_to_testpmd(device, devargs, str(tmp_path / "testpmd.log")) as pmd:
        pmd.cmd("set fwd flowgen")
        pmd.cmd("start")
        last = pmd.stats()["RX-packets"]
        for _ in range(8):
            time.sleep(0.5)
            now = pmd.stats()["RX-packets"]
            assert now > last, f"no frames back for 0.5 s (device: {device.stats()})"
            last = now
        pmd.cmd("stop")
        stats = device.stats()
        assert stats["tx_packets"] > 0 and stats["rx_packets"] > 0
        assert pmd.close() == 0
