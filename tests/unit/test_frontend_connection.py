"""The front-end's messages on the wire, against a scripted peer on a socketpair.

Replies are queued on the peer before the front-end asks (the socket
buffers them), so everything runs in one thread.
"""
from __future__ import annotations

import os
import socket

import pytest

from vhostuser import protocol
from vhostuser.frontend import (BackendClosed, FrontendConnection, FeatureError, Frontend,
                                FrontendTimeout, GuestMemory, Message, ReplyError)
from vhostuser.protocol import (FLAG_NEED_REPLY, FLAG_REPLY, U64, VERSION, VRING_STATE, Feature,
                                ProtocolFeature, Request, bit, bits)


class Peer:
    """The back-end's end: queue replies, then read what the front-end sent."""

    def __init__(self, sock: socket.socket):
        self.conn = FrontendConnection(sock, timeout=1.0)

    def reply(self, request: int, payload: bytes = b"", flags: int = VERSION | FLAG_REPLY):
        self.conn.send(request, payload, flags=flags)

    def ack(self, request: int, status: int = 0):
        self.reply(request, U64.pack(status))

    def received(self) -> list[Message]:
        """Everything sent so far (fds closed)."""
        msgs = []
        try:
            while True:
                msgs.append(self.conn.recv(timeout=0.1))
        except FrontendTimeout:
            pass
        for m in msgs:
            m.close_fds()
        return msgs


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fe = Frontend(FrontendConnection(ours, timeout=1.0))
    yield fe, Peer(theirs)
    fe.close()
    theirs.close()


def test_negotiation_order_and_acked_subset(pair):
    fe, peer = pair
    offered = bits(Feature.VERSION_1, Feature.RING_EVENT_IDX, Feature.PROTOCOL_FEATURES, 40)
    offered_protocol = bits(ProtocolFeature.REPLY_ACK, ProtocolFeature.MQ,
                            ProtocolFeature.PAGEFAULT)
    peer.reply(Request.GET_FEATURES, U64.pack(offered))
    peer.reply(Request.GET_PROTOCOL_FEATURES, U64.pack(offered_protocol))
    peer.ack(Request.SET_FEATURES)
    features, protocol_features = fe.negotiate()
    assert features == bits(Feature.VERSION_1, Feature.RING_EVENT_IDX, Feature.PROTOCOL_FEATURES)
    assert protocol_features == bits(ProtocolFeature.REPLY_ACK, ProtocolFeature.MQ)
    sent = peer.received()
    assert [m.request for m in sent] == [Request.SET_OWNER, Request.GET_FEATURES,
                                         Request.GET_PROTOCOL_FEATURES,
                                         Request.SET_PROTOCOL_FEATURES, Request.SET_FEATURES]
    # REPLY_ACK only applies once it is negotiated.
    assert [bool(m.flags & FLAG_NEED_REPLY) for m in sent] == [False] * 4 + [True]
    assert U64.unpack(sent[4].payload)[0] == features


def test_required_feature_missing(pair):
    fe, peer = pair
    peer.reply(Request.GET_FEATURES, U64.pack(bit(Feature.VERSION_1)))
    with pytest.raises(FeatureError, match="required"):
        fe.negotiate(required=bits(Feature.VERSION_1, Feature.RING_PACKED))


def test_mem_table_carries_one_fd_per_region(pair):
    fe, peer = pair
    with GuestMemory([(0, 1 << 20), (1 << 30, 1 << 20, 4096)]) as mem:
        fe.set_mem_table(mem)
        msg = peer.conn.recv()
        assert msg.request == Request.SET_MEM_TABLE and len(msg.fds) == 2
        assert protocol.unpack_memory_table(msg.payload) == mem.table()
        # The fds are the regions' memfds.
        for fd, region in zip(msg.fds, mem.regions):
            assert os.fstat(fd).st_ino == os.fstat(region.fd).st_ino
        msg.close_fds()


def test_setup_queue_messages(pair):
    fe, peer = pair
    fe.features = bits(Feature.VERSION_1, Feature.PROTOCOL_FEATURES)
    with GuestMemory([(0x10000, 1 << 20)]) as mem:
        fe.memory = mem
        vq = fe.setup_queue(1, 32)
        sent = [peer.conn.recv() for _ in range(6)]
        assert [m.request for m in sent] == [Request.SET_VRING_NUM, Request.SET_VRING_BASE,
                                             Request.SET_VRING_ADDR, Request.SET_VRING_KICK,
                                             Request.SET_VRING_CALL, Request.SET_VRING_ENABLE]
        assert VRING_STATE.unpack(sent[0].payload) == (1, 32)
        assert VRING_STATE.unpack(sent[1].payload) == (1, 0)
        index, flags, desc, used, avail, log = protocol.VRING_ADDR.unpack(sent[2].payload)
        assert (index, desc, used, avail) == (1, mem.uva(vq.ring.desc_gpa),
                                              mem.uva(vq.ring.used_gpa), mem.uva(vq.ring.avail_gpa))
        assert U64.unpack(sent[3].payload)[0] == 1 and len(sent[3].fds) == 1
        assert U64.unpack(sent[4].payload)[0] == 1 and len(sent[4].fds) == 1
        assert VRING_STATE.unpack(sent[5].payload) == (1, 1)
        # The kick fd the back-end got is our eventfd.
        vq.kick()
        assert os.eventfd_read(sent[3].fds[0]) == 1
        for m in sent:
            m.close_fds()


def test_nofd_flag_when_no_fd(pair):
    fe, peer = pair
    fe.set_vring_call(2, None)
    msg = peer.conn.recv()
    assert U64.unpack(msg.payload)[0] == 2 | protocol.VRING_NOFD_MASK and msg.fds == []


def test_failed_ack_raises_reply_error(pair):
    fe, peer = pair
    fe.protocol_features = bit(ProtocolFeature.REPLY_ACK)
    peer.ack(Request.SET_VRING_NUM, status=1)
    with pytest.raises(ReplyError) as err:
        fe.set_vring_num(0, 256)
    assert err.value.status == 1 and err.value.request == Request.SET_VRING_NUM


@pytest.mark.parametrize("request_id, flags, payload, problem", [
    (Request.GET_QUEUE_NUM, VERSION | FLAG_REPLY, U64.pack(1), "reply is for"),
    (Request.GET_FEATURES, VERSION, U64.pack(1), "REPLY flag"),
    (Request.GET_FEATURES, 2 | FLAG_REPLY, U64.pack(1), "version"),
    (Request.GET_FEATURES, VERSION | FLAG_REPLY, b"\0" * 4, "u64"),
])
def test_malformed_replies(pair, request_id, flags, payload, problem):
    fe, peer = pair
    peer.reply(request_id, payload, flags)
    with pytest.raises(ReplyError, match=problem):
        fe.get_features()


def test_get_config_empty_reply_is_an_error(pair):
    fe, peer = pair
    peer.reply(Request.GET_CONFIG, b"")
    with pytest.raises(ReplyError, match="0-byte reply"):
        fe.get_config(0, 60)


def test_silence_times_out(pair):
    fe, peer = pair
    fe.conn.timeout = 0.1
    with pytest.raises(FrontendTimeout):
        fe.get_features()


@pytest.mark.parametrize("partial", [b"", protocol.HEADER.pack(1, VERSION | FLAG_REPLY, 8)])
def test_peer_closing_is_backend_closed(pair, partial):
    fe, peer = pair
    peer.conn.send_bytes(partial)
    peer.conn.close()
    with pytest.raises(BackendClosed):
        fe.get_features()


def test_send_raw_can_lie_about_the_size(pair):
    fe, peer = pair
    fe.send_raw(Request.SET_FEATURES, VERSION | FLAG_NEED_REPLY, b"\1\2\3", size=4000)
    data = peer.conn.sock.recv(100)
    assert data == protocol.HEADER.pack(Request.SET_FEATURES, VERSION | FLAG_NEED_REPLY, 4000) \
        + b"\1\2\3"


def test_fds_in_a_reply_are_received(pair):
    fe, peer = pair
    r, w = os.pipe()
    try:
        peer.conn.send(Request.GET_INFLIGHT_FD, bytes(protocol.INFLIGHT_SIZE), [w],
                       flags=VERSION | FLAG_REPLY)
        msg = fe.recv_raw()
        assert len(msg.fds) == 1
        os.write(msg.fds[0], b"!")
        assert os.read(r, 1) == b"!"
        msg.close_fds()
    finally:
        os.close(r)
        os.close(w)
