"""SEND_RARP (vhost-user.rst: after a migration, announce the guest's MAC)
over a socket: offered only by back-ends with a network to announce to,
refused cleanly by the others, and for a Python back-end delivered through
transmit() without overlapping the queue pair's own calls."""
import contextlib
import threading

import pytest

from vhostuser.errors import ProtocolError
from vhostuser.frontend import Frontend
from vhostuser.frontend.device import DEFAULT_PROTOCOL_FEATURES
from vhostuser.net import NetBackend, NetDevice
from vhostuser.net.backends import LoopbackBackend, SinkBackend
from vhostuser.protocol import FLAG_NEED_REPLY, VERSION, ProtocolFeature, Request, bit
from vhostuser.testing.server import BackgroundServer

MAC = bytes.fromhex("525400abcdef")
FRAME = bytes.fromhex("020000000001" "020000000002" "88b5") + bytes(46)


def send_frame(fe, frame: bytes) -> None:
    """The driver's side: one frame on queue pair 0's transmit queue."""
    mem, tx = fe.memory, fe.queues[1]
    buf = mem.alloc(12 + len(frame))
    mem.write(buf, bytes(12) + frame)
    tx.submit([(buf, 12 + len(frame))])


def send_rarp(fe) -> int:
    """SEND_RARP with NEED_REPLY; the REPLY_ACK status."""
    fe.send_raw(Request.SEND_RARP, VERSION | FLAG_NEED_REPLY, MAC + bytes(2))
    return fe.recv_raw().u64()


@pytest.mark.parametrize("backend", [SinkBackend, LoopbackBackend], ids=["sink", "loopback"])
def test_a_back_end_without_a_network_does_not_offer_rarp(tmp_path, caplog, backend):
    device = NetDevice(backend())
    try:
        with pytest.raises(ProtocolError):
            device.send_rarp(MAC)             # a ProtocolError, not an AttributeError
        path = str(tmp_path / "net.sock")
        with BackgroundServer(device, path):
            with Frontend.setup(path, queues=2,
                                protocol_features=DEFAULT_PROTOCOL_FEATURES
                                | bit(ProtocolFeature.RARP)) as fe:
                offered = fe.offered_protocol_features
                assert not offered & bit(ProtocolFeature.RARP)
                assert offered & bit(ProtocolFeature.MTU)
                # A front-end that sends it anyway is refused, and served on.
                assert send_rarp(fe) != 0
                assert "protocol feature RARP not negotiated" in caplog.text
                send_frame(fe, FRAME)
                fe.queues[1].wait(1, timeout=10)
        assert device.stats()["tx_packets"] == 1
    finally:
        device.close()


class Overlaps(NetBackend):
    """Holds the guest's first frame inside transmit() until released, and
    records whether another transmit() for the same queue pair ran meanwhile."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.active = {0: 0}
        self.most = 0
        self.holding = threading.Event()
        self.release = threading.Event()
        self.rarp = threading.Event()
        self.frames: list[bytes] = []

    def transmit(self, queue_pair, frames):
        with self.lock:
            self.active[queue_pair] += 1
            self.most = max(self.most, self.active[queue_pair])
        try:
            data = [f.tobytes() for f in frames]
            self.frames += data
            if FRAME in data:
                self.holding.set()
                self.release.wait(10)
            if any(d[12:14] == b"\x80\x35" for d in data):     # ETH_P_RARP
                self.rarp.set()
        finally:
            with self.lock:
                self.active[queue_pair] -= 1


@contextlib.contextmanager
def held_in_transmit(tmp_path, backend: "Overlaps"):
    """A front-end with RARP whose first frame the worker holds inside
    transmit() until backend.release; yields the front-end. The device is
    closed after."""
    device = NetDevice(backend)
    path = str(tmp_path / "net.sock")
    try:
        with BackgroundServer(device, path):
            with Frontend.setup(path, queues=2,
                                protocol_features=DEFAULT_PROTOCOL_FEATURES
                                | bit(ProtocolFeature.RARP)) as fe:
                send_frame(fe, FRAME)
                assert backend.holding.wait(10)      # the worker is inside transmit()
                yield fe
    finally:
        backend.release.set()
        device.close()


def test_a_rarp_waits_for_the_queue_pairs_transmit_and_does_not_block_the_loop(tmp_path):
    backend = Overlaps()
    with held_in_transmit(tmp_path, backend) as fe:
        # Acked while the worker still holds transmit(): the event loop did
        # not wait for it.
        assert send_rarp(fe) == 0
        assert fe.request(Request.GET_FEATURES).u64()
        assert not backend.rarp.wait(0.3)    # its turn comes after
        backend.release.set()
        assert backend.rarp.wait(10)
        fe.queues[1].wait(1, timeout=10)
    assert backend.most == 1, "two transmit() calls for queue pair 0 overlapped"
    rarp = backend.frames[-1]
    assert rarp[:6] == b"\xff" * 6 and rarp[6:12] == MAC


def test_after_close_a_late_rarp_does_not_reach_the_back_end(tmp_path):
    backend = Overlaps()
    device = NetDevice(backend)
    device.close()
    device.send_rarp(MAC)
    assert not backend.rarp.wait(0.3)


def test_rarps_while_transmit_is_busy_take_one_thread_and_the_last_mac_wins(tmp_path):
    """Each SEND_RARP used to start a thread waiting for queue pair 0's
    transmit(): a front-end could pile up any number. Now one waits, and
    announces the MAC of the latest."""
    backend = Overlaps()
    with held_in_transmit(tmp_path, backend) as fe:
        before = threading.active_count()
        for i in range(200):
            mac = MAC[:5] + bytes([i])
            fe.send_raw(Request.SEND_RARP, VERSION | FLAG_NEED_REPLY, mac + bytes(2))
            assert fe.recv_raw().u64() == 0
        assert threading.active_count() - before <= 1
        backend.release.set()
        assert backend.rarp.wait(10)
        fe.queues[1].wait(1, timeout=10)
    rarps = [f for f in backend.frames if f[12:14] == b"\x80\x35"]
    assert [r[6:12] for r in rarps] == [MAC[:5] + bytes([199])]
