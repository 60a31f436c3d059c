"""Control plane against hostile front-end messages (vhost-user.rst
"Communication", "REPLY_ACK"): each bad message gets a non-zero REPLY_ACK
where negotiated, otherwise the connection is closed; the process and other
connections keep serving, and every fd we sent but the back-end did not keep
is closed."""
import array
import contextlib
import mmap
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from vhostuser import protocol
from vhostuser.device import EchoDevice
from vhostuser.inflight import queue_region_size
from vhostuser.native import ffi
from vhostuser.protocol import Feature, ProtocolFeature, Request, bit, bits
from vhostuser.testing.server import BackgroundServer

R = Request


class RawClient:
    """Writes arbitrary bytes and fds to a back-end socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)

    def send(self, request, payload=b"", flags=protocol.VERSION, fds=(), size=None):
        header = protocol.pack_header(request, flags, len(payload) if size is None else size)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([header + payload], anc)

    def recv(self):
        header = self.sock.recv(protocol.HEADER_SIZE, socket.MSG_WAITALL)
        if len(header) < protocol.HEADER_SIZE:
            raise ConnectionError("closed")
        request, flags, size = protocol.HEADER.unpack(header)
        payload = self.sock.recv(size, socket.MSG_WAITALL) if size else b""
        assert flags & protocol.FLAG_REPLY
        return request, payload

    def call_u64(self, request, payload=b"", **kw):
        self.send(request, payload, **kw)
        got, reply = self.recv()
        assert got == request
        return struct.unpack("<Q", reply)[0]

    def closed_by_peer(self, timeout=5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def enable_reply_ack(self, *protocol_features):
        """Negotiates REPLY_ACK and ``protocol_features``."""
        features = self.call_u64(R.GET_FEATURES)
        assert features & bit(Feature.PROTOCOL_FEATURES)
        self.send(R.SET_FEATURES, struct.pack("<Q", bit(Feature.PROTOCOL_FEATURES)))
        self.send(R.SET_PROTOCOL_FEATURES,
                  struct.pack("<Q", bits(ProtocolFeature.REPLY_ACK, *protocol_features)))

    def acked(self, request, payload=b"", **kw) -> int:
        """Sends with NEED_REPLY and returns the REPLY_ACK value."""
        return self.call_u64(request, payload, flags=protocol.VERSION | protocol.FLAG_NEED_REPLY, **kw)

    def close(self):
        self.sock.close()


@pytest.fixture
def served(tmp_path):
    path = str(tmp_path / "echo.sock")
    with BackgroundServer(EchoDevice(num_queues=2), path) as srv:
        yield srv


@pytest.fixture
def client(served):
    c = RawClient(served.path)
    yield c
    c.close()


def open_fds():
    """Open fds of this process (the back-end runs in it too). listdir's own
    directory fd is gone by the time we check each one."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


def test_get_features_offers_protocol_features_and_ring_layouts(client):
    features = client.call_u64(R.GET_FEATURES)
    for f in (Feature.PROTOCOL_FEATURES, Feature.VERSION_1, Feature.RING_PACKED,
              Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX, Feature.LOG_ALL):
        assert features & bit(f), f.name


def test_protocol_features_include_the_required_set(client):
    pf = client.call_u64(R.GET_PROTOCOL_FEATURES)
    for f in (ProtocolFeature.MQ, ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK,
              ProtocolFeature.BACKEND_REQ, ProtocolFeature.CONFIG, ProtocolFeature.INFLIGHT_SHMFD,
              ProtocolFeature.RESET_DEVICE, ProtocolFeature.CONFIGURE_MEM_SLOTS,
              ProtocolFeature.STATUS):
        assert pf & bit(f), f.name


def test_queue_num_and_mem_slots(client):
    client.enable_reply_ack(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    assert client.call_u64(R.GET_QUEUE_NUM) == 2
    assert client.call_u64(R.GET_MAX_MEM_SLOTS) == 509


def test_wrong_payload_size_is_nacked_and_connection_survives(client):
    client.enable_reply_ack()
    assert client.acked(R.SET_VRING_NUM, b"\0" * 4) != 0
    assert client.acked(R.SET_VRING_NUM, struct.pack("<II", 0, 256)) == 0
    assert client.call_u64(R.GET_QUEUE_NUM) == 2


def test_wrong_payload_size_without_reply_ack_disconnects(client):
    client.send(R.SET_VRING_NUM, b"\0" * 3)
    assert client.closed_by_peer()


@pytest.mark.parametrize("request_id", [0, 99, 1000, int(R.IOTLB_MSG), int(R.POSTCOPY_ADVISE)])
def test_unknown_or_unsupported_request_is_refused(client, request_id):
    client.enable_reply_ack()
    assert client.acked(request_id) != 0
    assert client.call_u64(R.GET_QUEUE_NUM) == 2


def test_out_of_range_ring_index_is_refused(client):
    client.enable_reply_ack()
    assert client.acked(R.SET_VRING_NUM, struct.pack("<II", 2, 256)) != 0
    assert client.acked(R.SET_VRING_ENABLE, struct.pack("<II", 200, 1)) != 0
    assert client.acked(R.SET_VRING_NUM, struct.pack("<II", 1, 256)) == 0


def test_bad_queue_sizes_are_refused(client):
    client.enable_reply_ack()
    for size in (0, 3, 100, 65536):
        assert client.acked(R.SET_VRING_NUM, struct.pack("<II", 0, size)) != 0, size


def test_ring_address_before_memory_table_is_refused(client):
    client.enable_reply_ack()
    addr = protocol.VRING_ADDR.pack(0, 0, 0x1000, 0x2000, 0x3000, 0)
    assert client.acked(R.SET_VRING_ADDR, addr) != 0


def test_kick_with_unmapped_ring_breaks_only_that_ring(served, client):
    # Like every other malformed ring: the ring breaks and says so on its
    # error eventfd; the connection (and the other rings) go on.
    client.enable_reply_ack()
    kick, err = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert client.acked(R.SET_VRING_NUM, struct.pack("<II", 0, 8)) == 0
        assert client.acked(R.SET_VRING_ERR, struct.pack("<Q", 0), fds=[err]) == 0
        assert client.acked(R.SET_VRING_KICK, struct.pack("<Q", 0), fds=[kick]) == 0
        assert os.eventfd_read(err) == 1
        queue = served.device.session.dataplane.queues[0]
        assert queue.broken and not queue.started
        assert "VU_ERR_RING_UNMAPPED" in queue.error
        assert client.call_u64(R.GET_QUEUE_NUM) == 2
    finally:
        os.close(kick)
        os.close(err)


def test_fds_on_a_message_that_takes_none_are_closed(served, client):
    client.enable_reply_ack()
    r, w = os.pipe()
    try:
        before = open_fds()
        # GET_QUEUE_NUM answers with a value, not an ack: refused by closing
        client.send(R.GET_QUEUE_NUM, flags=protocol.VERSION | protocol.FLAG_NEED_REPLY, fds=[r])
        assert client.closed_by_peer()
        time.sleep(0.1)
        # nothing leaked (the session's own fds went with the connection)
        assert open_fds() <= before
        os.close(r)
        # with every reader closed, a write fails: proves the back-end closed its copy
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
    finally:
        os.close(w)


def test_too_many_fds_for_call_are_closed(served, client):
    client.enable_reply_ack()
    fds = [os.eventfd(0) for _ in range(3)]
    before = open_fds()
    assert client.acked(R.SET_VRING_CALL, struct.pack("<Q", 0), fds=fds) != 0
    time.sleep(0.1)
    assert open_fds() == before
    for fd in fds:
        os.close(fd)


def test_fds_over_the_recvmsgs_of_one_message_are_limited(served):
    """A front-end sending one message byte by byte, each byte with 8 fds,
    gets no more than MAX_FDS of them held: the count is over the whole
    message, not per recvmsg (where MSG_CTRUNC alone limited it), so one
    partial message cannot pin thousands of fds. The connection is closed
    and every fd received for that message with it."""
    c = RawClient(served.path)
    before = len(open_fds())
    src = [os.eventfd(0) for _ in range(8)]
    try:
        header = protocol.pack_header(R.SET_OWNER, protocol.VERSION, 200)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", src).tobytes())]
        try:
            for b in header + bytes(50):       # 12 header bytes, then payload bytes
                c.sock.sendmsg([bytes([b])], anc)
                time.sleep(0.002)
        except OSError:                        # the back-end hung up: what we want
            pass
        time.sleep(0.5)
        held = len(open_fds()) - before - len(src)
        assert held <= protocol.MAX_FDS, f"back-end holds {held} fds for one partial message"
        assert c.closed_by_peer()
        time.sleep(0.2)
        assert len(open_fds()) - before - len(src) <= 0
    finally:
        for fd in src:
            os.close(fd)
        c.close()


def test_truncated_message_closes_only_that_connection(served):
    victim = RawClient(served.path)
    victim.send(R.SET_FEATURES, b"\0\0", size=8)   # promises 8 bytes, sends 2
    victim.close()
    time.sleep(0.2)
    other = RawClient(served.path)
    try:
        assert other.call_u64(R.GET_QUEUE_NUM) == 2
    finally:
        other.close()


def test_huge_size_in_header_closes_the_connection(client):
    client.send(R.SET_FEATURES, b"", size=1 << 30)
    assert client.closed_by_peer()


def test_features_not_offered_are_refused(client):
    client.enable_reply_ack()
    assert client.acked(R.SET_FEATURES, struct.pack("<Q", bit(Feature.PROTOCOL_FEATURES) | bit(63))) != 0


def test_second_front_end_is_refused_while_one_is_connected(served, client):
    assert client.call_u64(R.GET_QUEUE_NUM) == 2
    second = RawClient(served.path)
    try:
        assert second.closed_by_peer()
    finally:
        second.close()
    assert client.call_u64(R.GET_QUEUE_NUM) == 2


def test_status_round_trip(client):
    client.enable_reply_ack(ProtocolFeature.STATUS)
    assert client.acked(R.SET_STATUS, struct.pack("<Q", 0x0B)) == 0   # ACK|DRIVER|FEATURES_OK
    assert client.call_u64(R.GET_STATUS) == 0x0B
    assert client.acked(R.SET_STATUS, struct.pack("<Q", 0x1FF)) != 0


def test_inflight_fd_round_trip(client):
    client.enable_reply_ack(ProtocolFeature.INFLIGHT_SHMFD)
    client.send(R.GET_INFLIGHT_FD, protocol.INFLIGHT.pack(0, 0, 2, 128),
                flags=protocol.VERSION)
    msg, anc, _, _ = client.sock.recvmsg(64, socket.CMSG_SPACE(4))
    _, _, size = protocol.HEADER.unpack_from(msg)
    mmap_size, offset, nq, qs = protocol.INFLIGHT.unpack_from(msg, protocol.HEADER_SIZE)
    assert (nq, qs, offset) == (2, 128, 0) and mmap_size >= 2 * (16 + 16 * 128)
    fd = array.array("i", anc[0][2])[0]
    assert os.fstat(fd).st_size == mmap_size
    assert client.acked(R.SET_INFLIGHT_FD, protocol.INFLIGHT.pack(mmap_size, 0, 2, 128),
                        fds=[fd]) == 0
    os.close(fd)


def test_config_change_goes_over_the_backend_channel(served, client):
    client.enable_reply_ack()
    pf = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.BACKEND_REQ) | bit(ProtocolFeature.CONFIG)
    client.send(R.SET_PROTOCOL_FEATURES, struct.pack("<Q", pf))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert client.acked(R.SET_BACKEND_REQ_FD, fds=[theirs.fileno()]) == 0
        theirs.close()
        ours.settimeout(5)
        import threading
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "told", served.call(served.device.notify_config_change)))
        t.start()
        request, flags, size = protocol.HEADER.unpack(ours.recv(12, socket.MSG_WAITALL))
        assert request == protocol.BackendRequest.CONFIG_CHANGE_MSG
        assert flags & protocol.FLAG_NEED_REPLY and size == 0
        ours.sendall(protocol.pack_header(request, protocol.VERSION | protocol.FLAG_REPLY, 8)
                     + struct.pack("<Q", 0))
        t.join(5)
        assert result["told"] is True
    finally:
        ours.close()


def _backend_channel_that_nobody_reads(client):
    """Sets up a back-end channel (CONFIG, no REPLY_ACK) whose front-end
    end is never read; returns that end."""
    client.send(R.GET_FEATURES)
    client.recv()
    pf = bit(ProtocolFeature.BACKEND_REQ) | bit(ProtocolFeature.CONFIG)
    client.send(R.SET_PROTOCOL_FEATURES, struct.pack("<Q", pf))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client.send(R.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
    theirs.close()
    assert client.call_u64(R.GET_QUEUE_NUM) == 2
    return ours


def test_config_changes_to_a_front_end_that_never_reads_are_coalesced(served, client):
    """Config changes queued for a front-end that never reads its back-end
    channel are coalesced: at most one waits besides the one being sent,
    so 5000 changes leave at most three tasks on the loop. Before, each made
    a task blocked on the back-end lock for as long as the session lived."""
    import asyncio
    ours = _backend_channel_that_nobody_reads(client)
    try:
        base = served.call(lambda: len(asyncio.all_tasks()))
        for _ in range(5000):
            served.call(served.device.notify_config_change)
        time.sleep(0.5)
        pending = served.call(lambda: len(asyncio.all_tasks())) - base
        # the one being sent (and the task wait_for runs its send in), one queued
        assert pending <= 3, f"{pending} config-change tasks pending on the loop"
    finally:
        ours.close()


def test_a_config_change_the_front_end_never_takes_is_dropped(served, client, monkeypatch):
    """A config change that cannot be sent within BACKEND_CHANNEL_TIMEOUT
    (the front-end reads nothing, its socket buffer is full) is dropped and
    the back-end channel closed (part of the message may be out); the
    session goes on, and later changes report there is no channel. Before,
    the send waited forever, holding the back-end lock."""
    from vhostuser import handler
    monkeypatch.setattr(handler, "BACKEND_CHANNEL_TIMEOUT", 0.3)
    ours = _backend_channel_that_nobody_reads(client)
    try:
        deadline = time.time() + 10
        while served.call(served.device.notify_config_change):
            assert time.time() < deadline, "the back-end channel is never given up"
        assert client.call_u64(R.GET_QUEUE_NUM) == 2
    finally:
        ours.close()


def _backend_channel_with_acks(client):
    """Sets up a back-end channel with REPLY_ACK and CONFIG; returns the
    front-end's end of it."""
    client.enable_reply_ack(ProtocolFeature.BACKEND_REQ, ProtocolFeature.CONFIG)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    assert client.acked(R.SET_BACKEND_REQ_FD, fds=[theirs.fileno()]) == 0
    theirs.close()
    ours.settimeout(5)
    return ours


def _read_backend_request(ours):
    request, flags, size = protocol.HEADER.unpack(ours.recv(12, socket.MSG_WAITALL))
    assert request == protocol.BackendRequest.CONFIG_CHANGE_MSG and size == 0
    assert flags & protocol.FLAG_NEED_REPLY
    return request


def test_a_backend_request_whose_ack_times_out_closes_the_channel(served, client, monkeypatch):
    """Acks carry no request id: after one timed out, a late ack would be
    taken for the next request's. So the channel closes, and later changes
    report there is none. Before, it stayed open and out of step."""
    from vhostuser import handler
    monkeypatch.setattr(handler, "BACKEND_CHANNEL_TIMEOUT", 0.3)
    ours = _backend_channel_with_acks(client)
    try:
        assert served.call(served.device.notify_config_change) is True
        request = _read_backend_request(ours)
        time.sleep(0.6)
        # the late ack (if our end still takes it), then the channel is found closed
        with contextlib.suppress(BrokenPipeError):
            ours.sendall(protocol.pack_header(request, protocol.VERSION | protocol.FLAG_REPLY, 8)
                         + struct.pack("<Q", 0))
        assert ours.recv(1) == b""
        assert served.call(served.device.notify_config_change) is False
        assert client.call_u64(R.GET_QUEUE_NUM) == 2
    finally:
        ours.close()


def test_a_backend_reply_that_is_no_ack_of_the_request_closes_the_channel(served, client):
    """A reply for another request (or no reply at all) means the two ends
    are out of step: the channel closes rather than guess."""
    ours = _backend_channel_with_acks(client)
    try:
        assert served.call(served.device.notify_config_change) is True
        _read_backend_request(ours)
        ours.sendall(protocol.pack_header(protocol.BackendRequest.VRING_CALL,
                                          protocol.VERSION | protocol.FLAG_REPLY, 8)
                     + struct.pack("<Q", 0))
        assert ours.recv(1) == b""
        assert served.call(served.device.notify_config_change) is False
    finally:
        ours.close()


def test_front_end_reconnecting_at_once_is_served(served):
    # QEMU reconnects as soon as it closed: the newcomer must not be refused
    # just because we have not yet noticed the old connection end.
    for _ in range(5):
        first = RawClient(served.path)
        assert first.call_u64(R.GET_QUEUE_NUM) == 2
        first.close()
        second = RawClient(served.path)
        try:
            assert second.call_u64(R.GET_QUEUE_NUM) == 2
        finally:
            second.close()


def test_one_session_at_a_time_even_when_two_connect_together(served):
    a, b = RawClient(served.path), RawClient(served.path)
    try:
        assert a.call_u64(R.GET_QUEUE_NUM) == 2
        b.send(R.GET_QUEUE_NUM)
        b.sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            b.sock.recv(1)             # b waits its turn while a is served
        a.close()
        b.sock.settimeout(5)
        request, payload = b.recv()
        assert request == R.GET_QUEUE_NUM and struct.unpack("<Q", payload)[0] == 2
    finally:
        b.close()


def test_unusable_inflight_area_is_ignored_not_fatal(client):
    # e.g. an area another version of the back-end sized differently
    client.enable_reply_ack(ProtocolFeature.INFLIGHT_SHMFD)
    fd = os.memfd_create("small")
    os.ftruncate(fd, 64)
    try:
        assert client.acked(R.SET_INFLIGHT_FD, protocol.INFLIGHT.pack(64, 0, 2, 128), fds=[fd]) == 0
    finally:
        os.close(fd)
    assert client.call_u64(R.GET_QUEUE_NUM) == 2


def test_inflight_area_beyond_its_file_is_not_used(served, client):
    """An area the front-end says is larger than its file is ignored (acked,
    session goes on): mapped as announced, the rings' first write past the
    file's end would be SIGBUS in a queue worker, the whole process gone."""
    client.enable_reply_ack(ProtocolFeature.INFLIGHT_SHMFD)
    size = 2 * queue_region_size(128)
    fd = os.memfd_create("inflight")
    os.ftruncate(fd, 4096)
    try:
        assert client.acked(R.SET_INFLIGHT_FD, protocol.INFLIGHT.pack(size, 0, 2, 128),
                            fds=[fd]) == 0
    finally:
        os.close(fd)
    assert served.device.session.inflight is None
    assert client.call_u64(R.GET_QUEUE_NUM) == 2


def test_the_inflight_area_we_create_cannot_be_resized_under_us(client):
    """The front-end gets the fd of the area we map (GET_INFLIGHT_FD): it is
    sealed, so shrinking it, which would make the rings' writes SIGBUS, fails."""
    client.enable_reply_ack(ProtocolFeature.INFLIGHT_SHMFD)
    client.send(R.GET_INFLIGHT_FD, protocol.INFLIGHT.pack(0, 0, 2, 128),
                flags=protocol.VERSION)
    msg, anc, _, _ = client.sock.recvmsg(64, socket.CMSG_SPACE(4))
    mmap_size = protocol.INFLIGHT.unpack_from(msg, protocol.HEADER_SIZE)[0]
    fd = array.array("i", anc[0][2])[0]
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == mmap_size
    finally:
        os.close(fd)


def test_inflight_area_past_any_file_end_is_ignored_not_fatal(client):
    """An inflight area with an offset (or size) of 2**63 or more is ignored
    like any other unusable area (acked, session goes on): mmap raised
    OverflowError for it, which was not caught, and the session died as an
    internal error without a reply."""
    client.enable_reply_ack(ProtocolFeature.INFLIGHT_SHMFD)
    fd = os.memfd_create("inflight")
    os.ftruncate(fd, 4096)
    try:
        for size, offset in ((4096, 1 << 63), (1 << 63, 0), ((1 << 64) - 4096, 4096)):
            assert client.acked(R.SET_INFLIGHT_FD,
                                protocol.INFLIGHT.pack(size, offset, 1, 16), fds=[fd]) == 0
    finally:
        os.close(fd)
    assert client.call_u64(R.GET_QUEUE_NUM) == 2


def test_net_set_mtu_of_one_front_end_ends_with_its_session(tmp_path):
    """The MTU a front-end sets with NET_SET_MTU is dropped when it
    disconnects: the next session's guest reads the configured MTU (1500)
    in config space. Before, the device-wide MTU stayed 68 for good, and the
    next guest's larger frames were dropped."""
    from vhostuser.net.backends import SinkBackend
    from vhostuser.net.device import NetDevice
    dev = NetDevice(SinkBackend(), mtu=1500)
    with BackgroundServer(dev, str(tmp_path / "net.sock")) as srv:
        a = RawClient(srv.path)
        a.enable_reply_ack(ProtocolFeature.MTU)
        assert a.acked(R.NET_SET_MTU, struct.pack("<Q", 68)) == 0
        assert dev.mtu == 68
        a.close()
        time.sleep(0.5)
        b = RawClient(srv.path)
        try:
            assert b.call_u64(R.GET_QUEUE_NUM) == 2
            assert dev.mtu == 1500, f"second session starts with MTU {dev.mtu}"
        finally:
            b.close()


# -- fds and areas a front-end hands over that can't be trusted ----------------------
# (each of these crashed the process or blocked its event loop before)

GUEST_UVA = 0x7f0000000000


def guest_memory(client, size=4 << 20):
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    assert client.acked(R.SET_MEM_TABLE, protocol.pack_memory_table(
        [protocol.MemRegion(0, size, GUEST_UVA, 0)]), fds=[fd]) == 0
    return fd, mmap.mmap(fd, size)


def start_ring(client, index, num, kick=None, log_addr=0, flags=0):
    """A split ring at guest address 0 (descriptors), started by its kick."""
    avail = 16 * num
    used = (avail + 6 + 2 * num + 4095) & ~4095
    assert client.acked(R.SET_VRING_NUM, struct.pack("<II", index, num)) == 0
    assert client.acked(R.SET_VRING_ADDR, protocol.VRING_ADDR.pack(
        index, flags, GUEST_UVA, GUEST_UVA + used, GUEST_UVA + avail, log_addr)) == 0
    assert client.acked(R.SET_VRING_BASE, struct.pack("<II", index, 0)) == 0
    kick = os.eventfd(0) if kick is None else kick
    assert client.acked(R.SET_VRING_KICK, struct.pack("<Q", index), fds=[kick]) == 0
    return kick


def inflight_area(client, num_queues, queue_size, size=None):
    size = num_queues * queue_region_size(queue_size) if size is None else size
    fd = os.memfd_create("inflight")
    os.ftruncate(fd, size)
    try:
        return client.acked(R.SET_INFLIGHT_FD,
                            protocol.INFLIGHT.pack(size, 0, num_queues, queue_size), fds=[fd])
    finally:
        os.close(fd)


class HoldingRing1(EchoDevice):
    """Echoes, except that requests of ring 1 are held (a slow back-end)
    until the test completes them."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.held = []

    def handle_batch(self, queue, elements):
        if queue.index == 1:
            self.held.extend(elements)
        else:
            super().handle_batch(queue, elements)


def hold_one_request(dev, mem, num: int, kick: int) -> None:
    """Makes descriptor 0 (at guest address 0 of the ring starting there,
    `num` entries) available, kicks, and waits until `dev` holds it."""
    mem[0:16] = struct.pack("<QIHH", 0x10000, 16, 0, 0)      # desc 0
    avail = 16 * num
    mem[avail:avail + 6] = struct.pack("<HHH", 0, 1, 0)      # avail idx 1, ring[0]=0
    os.eventfd_write(kick, 1)
    deadline = time.time() + 5
    while not dev.held and time.time() < deadline:
        time.sleep(0.01)
    assert dev.held


def ring1_holding_a_request(client, dev, num: int = 8):
    """Guest memory, ring 1 started and enabled (REPLY_ACK on), and one
    request on it that `dev` holds. Returns the memory's fd, the memory and
    ring 1's kick eventfd."""
    client.enable_reply_ack()
    fd, mem = guest_memory(client)
    kick = start_ring(client, 1, num)
    assert client.acked(R.SET_VRING_ENABLE, struct.pack("<II", 1, 1)) == 0
    hold_one_request(dev, mem, num, kick)
    return fd, mem, kick


def test_stopping_an_idle_ring_does_not_wait_for_another_rings_requests(tmp_path):
    """GET_VRING_BASE of an idle ring answers at once while another ring has
    a request in flight: the drain counts only the stopped ring's requests.
    Before, it waited for every ring's, so an idle ring's stop took the
    whole drain timeout (30 s by default) behind a slow request elsewhere."""
    dev = HoldingRing1(num_queues=2)
    dev.drain_timeout = 3.0
    with BackgroundServer(dev, str(tmp_path / "d.sock")) as srv:
        c = RawClient(srv.path)
        try:
            fd, mem, kick = ring1_holding_a_request(c, dev)
            t0 = time.monotonic()
            c.send(R.GET_VRING_BASE, struct.pack("<II", 0, 0))
            c.recv()
            elapsed = time.monotonic() - t0
            assert elapsed < 1.0, f"stopping idle ring 0 took {elapsed:.1f}s"
        finally:
            for e in dev.held:
                srv.call(lambda e=e: e.complete(0))
            c.close()
            os.close(fd)
            os.close(kick)


def test_a_reset_takes_no_new_request_while_it_drains(tmp_path):
    """RESET_DEVICE takes every ring out of service before it waits for
    the requests in flight: a request made available on a running ring
    during the drain is not taken (it would be answered into a ring the
    driver is resetting, and a guest that keeps submitting leaves no moment
    with nothing in flight). Before, the rings stayed enabled while it
    drained."""
    dev = HoldingRing1(num_queues=2)
    dev.drain_timeout = 1.5
    with BackgroundServer(dev, str(tmp_path / "d.sock")) as srv:
        c = RawClient(srv.path)
        kick1 = kick0 = None
        try:
            c.enable_reply_ack(ProtocolFeature.RESET_DEVICE)
            fd, mem = guest_memory(c)
            num = 8
            kick1 = start_ring(c, 1, num)
            # ring 0 at guest address 1 MiB: descriptors, avail, used
            r0 = 1 << 20
            avail0, used0 = r0 + 16 * num, r0 + 4096
            assert c.acked(R.SET_VRING_NUM, struct.pack("<II", 0, num)) == 0
            assert c.acked(R.SET_VRING_ADDR, protocol.VRING_ADDR.pack(
                0, 0, GUEST_UVA + r0, GUEST_UVA + used0, GUEST_UVA + avail0, 0)) == 0
            assert c.acked(R.SET_VRING_BASE, struct.pack("<II", 0, 0)) == 0
            kick0 = os.eventfd(0)
            assert c.acked(R.SET_VRING_KICK, struct.pack("<Q", 0), fds=[kick0]) == 0
            for ring in (0, 1):
                assert c.acked(R.SET_VRING_ENABLE, struct.pack("<II", ring, 1)) == 0
            # one request on ring 1, held by the device
            hold_one_request(dev, mem, num, kick1)
            c.send(R.RESET_DEVICE, flags=protocol.VERSION | protocol.FLAG_NEED_REPLY)
            time.sleep(0.3)                                  # the reset is draining
            mem[r0:r0 + 16] = struct.pack("<QIHH", 0x20000, 16, 0, 0)
            mem[avail0:avail0 + 6] = struct.pack("<HHH", 0, 1, 0)
            os.eventfd_write(kick0, 1)
            _, reply = c.recv()
            assert struct.unpack("<Q", reply)[0] == 0
            used_idx = struct.unpack_from("<H", mem, used0 + 2)[0]
            assert used_idx == 0, "ring 0 took and answered a request during the reset"
        finally:
            for e in dev.held:
                srv.call(lambda e=e: e.complete(0))
            c.close()
            os.close(fd)
            for k in (kick0, kick1):
                if k is not None:
                    os.close(k)


def test_a_ring_is_not_enabled_again_while_a_stop_drains(tmp_path):
    """A daemon's stop (Session.stop) takes every ring out of service and
    waits for the requests in flight, while the session goes on reading
    the front-end: a SET_VRING_ENABLE then is refused and the ring stays
    disabled. Before, it enabled the ring again, so the drain could wait
    its whole timeout and new requests ran on a back-end being closed."""
    import asyncio
    dev = HoldingRing1(num_queues=2)
    dev.drain_timeout = 3.0
    with BackgroundServer(dev, str(tmp_path / "d.sock")) as srv:
        c = RawClient(srv.path)
        kick = None
        try:
            fd, mem, kick = ring1_holding_a_request(c, dev)
            session = dev.session
            stopping = asyncio.run_coroutine_threadsafe(session.stop("exit"), srv.loop)
            time.sleep(0.2)                                  # the stop is draining
            assert not stopping.done()
            assert c.acked(R.SET_VRING_ENABLE, struct.pack("<II", 1, 1)) != 0
            assert not session.dataplane.queues[1].enabled
            for e in dev.held:
                srv.call(lambda e=e: e.complete(0))
            dev.held.clear()
            stopping.result(5)
            assert not session.dataplane.queues[1].enabled
        finally:
            for e in dev.held:
                srv.call(lambda e=e: e.complete(0))
            c.close()
            os.close(fd)
            if kick is not None:
                os.close(kick)


def test_a_ring_started_after_a_stop_is_not_enabled(served, client):
    """Without PROTOCOL_FEATURES a ring starts enabled at its kick, except
    once the session is stopping: that would enable it behind stop()."""
    import asyncio
    client.enable_reply_ack()
    assert client.acked(R.SET_FEATURES, struct.pack("<Q", 0)) == 0
    fd, _ = guest_memory(client)
    try:
        session = served.device.session
        asyncio.run_coroutine_threadsafe(session.stop("exit"), served.loop).result(5)
        os.close(start_ring(client, 0, 8))
        assert session.dataplane.queues[0].started
        assert not session.dataplane.queues[0].enabled
    finally:
        os.close(fd)


def test_a_ring_larger_than_its_inflight_region_is_not_tracked(served, client):
    """An area for 1-entry rings, then a ring of 32768: it runs untracked
    (the C side would write 32768 entries into a region of 1)."""
    client.enable_reply_ack(ProtocolFeature.INFLIGHT_SHMFD)
    assert inflight_area(client, 1, 1, size=4096) == 0
    _, mem = guest_memory(client)
    os.close(start_ring(client, 0, 32768))
    assert client.call_u64(R.GET_QUEUE_NUM) == 2
    assert served.device.session.dataplane.queues[0].started


def test_a_second_inflight_area_leaves_no_ring_pointing_into_the_first(served, client):
    """The second area covers fewer queues: ring 1 must not keep its
    pointer into the first area, which is unmapped."""
    client.enable_reply_ack(ProtocolFeature.INFLIGHT_SHMFD)
    assert inflight_area(client, 2, 256) == 0
    assert inflight_area(client, 1, 256) == 0
    vqs = served.device.session.dataplane._dev.vqs
    assert vqs[1].inflight_area == ffi.NULL
    assert vqs[0].inflight_area != ffi.NULL
    _, mem = guest_memory(client)
    os.close(start_ring(client, 1, 256))
    assert client.call_u64(R.GET_QUEUE_NUM) == 2


def test_an_inflight_area_while_a_ring_runs_is_refused_and_the_old_one_kept(served, client):
    client.enable_reply_ack(ProtocolFeature.INFLIGHT_SHMFD)
    assert inflight_area(client, 1, 256) == 0
    _, mem = guest_memory(client)
    kick = start_ring(client, 0, 256)
    assert inflight_area(client, 1, 256) != 0
    client.send(R.GET_VRING_BASE, struct.pack("<II", 0, 0))
    client.recv()
    # restarting the ring rebuilds its state from the area it still has
    assert client.acked(R.SET_VRING_KICK, struct.pack("<Q", 0), fds=[kick]) == 0
    assert client.call_u64(R.GET_QUEUE_NUM) == 2
    os.close(kick)


def test_a_dirty_log_larger_than_its_fd_is_refused(served, client):
    """Mapped as announced, its first dirty page past the file's end would
    be SIGBUS in a worker."""
    client.enable_reply_ack(ProtocolFeature.LOG_SHMFD)
    client.send(R.SET_FEATURES, struct.pack("<Q", bit(Feature.PROTOCOL_FEATURES)
                                            | bit(Feature.LOG_ALL)))
    log_fd = os.memfd_create("log")
    os.ftruncate(log_fd, 4096)
    try:
        assert client.acked(R.SET_LOG_BASE, protocol.LOG.pack(1 << 30, 0), fds=[log_fd]) != 0
        assert client.acked(R.SET_LOG_BASE, protocol.LOG.pack(4096, 0), fds=[log_fd]) == 0
    finally:
        os.close(log_fd)
    assert client.call_u64(R.GET_QUEUE_NUM) == 2


def test_a_backend_channel_that_is_no_socket_is_refused_and_closed(served, client):
    client.enable_reply_ack(ProtocolFeature.BACKEND_REQ)
    r, w = os.pipe()
    try:
        before = open_fds()
        for _ in range(20):
            assert client.acked(R.SET_BACKEND_REQ_FD, fds=[r]) != 0
        time.sleep(0.1)
        assert open_fds() <= before
        os.close(r)
        with pytest.raises(BrokenPipeError):     # no reader left: the back-end's copy is gone
            os.write(w, b"x")
    finally:
        os.close(w)


def test_a_full_call_eventfd_does_not_block_the_event_loop(served, client):
    """SET_VRING_CALL signals the new fd once; a counter at its maximum
    would make that write wait for the front-end to read it."""
    client.enable_reply_ack()
    call = os.eventfd(0)
    os.eventfd_write(call, 0xfffffffffffffffe)
    try:
        assert client.acked(R.SET_VRING_CALL, struct.pack("<Q", 0), fds=[call]) == 0
        assert client.call_u64(R.GET_QUEUE_NUM) == 2
    finally:
        os.close(call)


def test_the_front_ends_eventfds_are_made_non_blocking(served, client):
    """Kick, call, error and log-call fds: a worker holding the device lock
    reads a kick the front-end may have read back itself, and writes calls
    into counters the front-end may have filled; neither may wait."""
    client.enable_reply_ack(ProtocolFeature.LOG_SHMFD)
    fds = {name: os.eventfd(0) for name in ("kick", "call", "err", "log")}
    try:
        assert client.acked(R.SET_VRING_CALL, struct.pack("<Q", 0), fds=[fds["call"]]) == 0
        assert client.acked(R.SET_VRING_ERR, struct.pack("<Q", 0), fds=[fds["err"]]) == 0
        assert client.acked(R.SET_LOG_FD, struct.pack("<Q", 0), fds=[fds["log"]]) == 0
        _, mem = guest_memory(client)
        start_ring(client, 0, 8, kick=fds["kick"])
        for name, fd in fds.items():
            assert not os.get_blocking(fd), name
    finally:
        for fd in fds.values():
            os.close(fd)


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_kick_fd_whose_writer_is_gone_breaks_the_ring_instead_of_spinning(served, client, kind):
    """vhost-user.rst allows a pipe as kick fd. One whose write end is
    closed (a socket whose peer is) stays readable with nothing to read
    (end of file): watched level-triggered, it woke the worker without end,
    at full CPU. The ring breaks instead (error eventfd, logged), and the
    connection and the other ring go on."""
    client.enable_reply_ack()
    if kind == "pipe":
        kick, writer = os.pipe()
    else:
        a, b = socket.socketpair()
        kick, writer = a.detach(), b.detach()
    err = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        guest_memory(client)
        assert client.acked(R.SET_VRING_ERR, struct.pack("<Q", 0), fds=[err]) == 0
        os.close(writer)
        start_ring(client, 0, 8, kick=kick)
        time.sleep(0.2)
        cpu = time.process_time()
        time.sleep(1)
        spent = time.process_time() - cpu
        assert spent < 0.2, f"{spent:.2f} s of CPU in 1 s with the ring idle"
        assert os.eventfd_read(err) == 1
        queue = served.device.session.dataplane.queues[0]
        assert queue.broken and "VU_ERR_KICK_FD" in queue.error
        start_ring(client, 1, 8)
        assert not served.device.session.dataplane.queues[1].broken
        assert client.call_u64(R.GET_QUEUE_NUM) == 2
        # a new kick fd brings the ring back
        new_kick = os.eventfd(0)
        try:
            assert client.acked(R.SET_VRING_KICK, struct.pack("<Q", 0), fds=[new_kick]) == 0
            assert queue.started and not queue.broken
        finally:
            os.close(new_kick)
    finally:
        os.close(kick)
        os.close(err)


@pytest.fixture
def small_block_device(tmp_path):
    """A 1 MiB block device (a loop device over a file), opened read-write."""
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup")
    backing = tmp_path / "small.img"
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    loop = made.stdout.strip()
    try:
        fd = os.open(loop, os.O_RDWR)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_memory_log_and_inflight_area_past_a_block_devices_end_are_refused(
        served, client, small_block_device):
    """A block device (guest memory on /dev/pmem0, say) has no size in
    fstat: a region, dirty log or inflight area past its end was mapped as
    announced, and the first touch past the end (a ring's index, a dirty
    page, an inflight entry) was SIGBUS, the whole process gone. Each is
    refused as past a file's end is; what fits is taken."""
    fd = small_block_device
    client.enable_reply_ack(ProtocolFeature.LOG_SHMFD, ProtocolFeature.INFLIGHT_SHMFD)
    client.send(R.SET_FEATURES, struct.pack("<Q", bit(Feature.PROTOCOL_FEATURES)
                                            | bit(Feature.LOG_ALL)))
    table = protocol.pack_memory_table

    assert client.acked(R.SET_MEM_TABLE, table([protocol.MemRegion(0, 4 << 20, GUEST_UVA, 0)]),
                        fds=[fd]) != 0
    assert client.acked(R.SET_MEM_TABLE, table([protocol.MemRegion(0, 1 << 20, GUEST_UVA,
                                                                   4096)]), fds=[fd]) != 0
    assert len(served.device.session.dataplane.memory) == 0
    assert client.acked(R.SET_MEM_TABLE, table([protocol.MemRegion(0, 1 << 20, GUEST_UVA, 0)]),
                        fds=[fd]) == 0

    assert client.acked(R.SET_LOG_BASE, protocol.LOG.pack(2 << 20, 0), fds=[fd]) != 0
    assert client.acked(R.SET_LOG_BASE, protocol.LOG.pack(4096, 0), fds=[fd]) == 0

    size = 2 * queue_region_size(32768)           # 4 MiB
    assert client.acked(R.SET_INFLIGHT_FD, protocol.INFLIGHT.pack(size, 0, 2, 32768),
                        fds=[fd]) == 0
    assert served.device.session.inflight is None   # not used
    size = 2 * queue_region_size(128)
    assert client.acked(R.SET_INFLIGHT_FD, protocol.INFLIGHT.pack(size, 0, 2, 128),
                        fds=[fd]) == 0
    assert served.device.session.inflight is not None
    assert client.call_u64(R.GET_QUEUE_NUM) == 2


def test_rem_mem_reg_must_name_the_regions_user_address_too(served, client):
    """vhost-user.rst identifies the region REM_MEM_REG removes by its guest
    address, user address and size: one naming another user address is no
    region of ours and is refused, the region and a ring in it untouched."""
    client.enable_reply_ack(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    size = 4 << 20
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    region = protocol.MemRegion(0, size, GUEST_UVA, 0)
    try:
        assert client.acked(R.ADD_MEM_REG, protocol.pack_single_region(region), fds=[fd]) == 0
    finally:
        os.close(fd)
    start_ring(client, 0, 8)
    other = protocol.MemRegion(0, size, GUEST_UVA + size, 0)
    assert client.acked(R.REM_MEM_REG, protocol.pack_single_region(other)) != 0
    session = served.device.session
    assert len(session.dataplane.memory) == 1
    assert not session.dataplane.queues[0].broken
    assert client.acked(R.REM_MEM_REG, protocol.pack_single_region(region)) == 0
    assert len(session.dataplane.memory) == 0


def _a_tracked_ring_restarted_larger(packed):
    """Run in a process of its own by the test below (a heap overflow
    takes the whole process down)."""
    with tempfile.TemporaryDirectory() as d, \
            BackgroundServer(EchoDevice(num_queues=2), os.path.join(d, "s.sock")) as srv:
        client = RawClient(srv.path)
        client.enable_reply_ack(ProtocolFeature.INFLIGHT_SHMFD)
        if packed:
            assert client.acked(R.SET_FEATURES, struct.pack("<Q", bits(
                Feature.PROTOCOL_FEATURES, Feature.VERSION_1, Feature.RING_PACKED))) == 0
        assert inflight_area(client, 1, 32768) == 0
        guest_memory(client)
        for num in (1, 32768, 2, 4096, 1, 32768):
            os.close(start_ring(client, 0, num))
            assert srv.device.session.dataplane.queues[0].started
            client.send(R.GET_VRING_BASE, struct.pack("<II", 0, 0))
            assert client.recv()[0] == R.GET_VRING_BASE
        assert client.call_u64(R.GET_QUEUE_NUM) == 2
        client.close()


@pytest.mark.parametrize("packed", [False, True])
def test_a_tracked_ring_restarted_at_a_larger_size_keeps_within_its_buffers(packed):
    """GET_VRING_BASE, then SET_VRING_NUM larger and a kick, in one session
    with an inflight area: the ring's resubmit list, its blockers and the
    packed batch list, sized at the first start, were kept and written at
    the new size (a memset of the blockers at each start), a heap overflow
    that took the process down. They are sized afresh with the ring."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    done = subprocess.run([sys.executable, "-c", "import test_handler as t; "
                           f"t._a_tracked_ring_restarted_larger({packed})"],
                          env=env, cwd=here, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_set_log_fd_without_a_payload_is_taken(served, client):
    """vhost-user.rst gives SET_LOG_FD no payload (its eventfd rides as
    ancillary data): a front-end sending it so was refused as malformed.
    Taken with no payload, and with the u64 some front-ends send."""
    client.enable_reply_ack(ProtocolFeature.LOG_SHMFD)
    for payload in (b"", struct.pack("<Q", 0)):
        fd = os.eventfd(0)
        try:
            assert client.acked(R.SET_LOG_FD, payload, fds=[fd]) == 0
        finally:
            os.close(fd)
        assert served.device.session.dataplane._dev.log_call_fd >= 0
    assert client.call_u64(R.GET_QUEUE_NUM) == 2
