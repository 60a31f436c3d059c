"""The TAP back-end's receive side across sessions and stopped rings. A
SOCK_SEQPACKET socket pair stands in for the TAP's fd: the receive worker
only reads frames (virtio-net header first) from it, one per read, as from
a TAP; its ioctls fail harmlessly."""
import os
import socket
import time

import pytest

from vhostuser.frontend import Frontend
from vhostuser.net import NetDevice
from vhostuser.net.backends import TapBackend
from vhostuser.testing.server import BackgroundServer

FRAME = bytes.fromhex("020000000001" "020000000002" "88b5") + bytes(46)
HDR = bytes(12)


@pytest.fixture
def tap(tmp_path):
    """(device, socket path, the TAP's other end)"""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    device = NetDevice(TapBackend("fake", fds=[ours.detach()]))
    try:
        yield device, str(tmp_path / "net.sock"), theirs
    finally:
        device.close()
        theirs.close()


def receive_one(fe, peer) -> int:
    """Posts one receive buffer, lets the worker see the TAP empty, then a
    frame arrives on the TAP: how many buffers came back within 5 s."""
    rx = fe.queues[0]
    rx.submit([(fe.memory.alloc(2048), 2048, True)])
    time.sleep(0.1)
    peer.send(HDR + FRAME)
    return len(rx.wait(1, timeout=5.0))


def test_frames_reach_every_session_in_turn(tap):
    """A session's workers are freed at its end and the next one's often get
    the same address: the TAP used to stay unwatched then (its worker
    pointer looked current), and frames waited for a kick that a guest with
    a full receive ring never sends."""
    device, path, peer = tap
    with BackgroundServer(device, path):
        for _ in range(6):
            with Frontend.setup(path, queues=2) as fe:
                assert receive_one(fe, peer) == 1


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def test_a_stopped_receive_ring_with_traffic_waiting_does_not_spin(tap):
    """Frames on the TAP while the receive ring is stopped (GET_VRING_BASE,
    as at a guest reset) stay unread: the worker used to be woken by the
    still-readable fd without end, a whole CPU."""
    device, path, peer = tap
    with BackgroundServer(device, path):
        with Frontend.setup(path, queues=2) as fe:
            assert receive_one(fe, peer) == 1
            fe.stop_queue(0)
            time.sleep(0.1)
            before = cpu_seconds()
            for _ in range(3):
                peer.send(HDR + FRAME)
            time.sleep(1.0)
            used = cpu_seconds() - before
        # (a spinning worker used a whole second of CPU in that second)
        assert used < 0.5, f"{used:.2f} s of CPU in 1 s with the receive ring stopped"
        with Frontend.setup(path, queues=2) as fe:      # and the TAP still serves
            assert receive_one(fe, peer) == 1
