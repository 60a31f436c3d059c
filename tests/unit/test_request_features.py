"""Requests that belong to a protocol feature (vhost-user.rst, "Front-end
message types") are refused unless the front-end negotiated that feature
with SET_PROTOCOL_FEATURES: a non-zero REPLY_ACK where it asked for one,
otherwise a logged reason and the connection closed, as for an unknown
request. Once negotiated, the same message is served. The spec's own
exceptions stay legal, and reserved header flag bits are refused."""
import contextlib
import os
import socket

import pytest

from vhostuser import protocol
from vhostuser.device import EchoDevice
from vhostuser.frontend import Buffer, Frontend, GuestMemory
from vhostuser.frontend.connection import BackendClosed
from vhostuser.protocol import (FLAG_NEED_REPLY, FLAG_REPLY, REQUEST_SPECS, STATUS_REPLIES, U64,
                                VERSION, Feature,
                                MemRegion, bit, bits)
from vhostuser.protocol import ProtocolFeature as P
from vhostuser.protocol import Request as R
from vhostuser.testing.server import BackgroundServer

MIB = 1 << 20

# The feature vhost-user.rst ties each request to, from its row; pinned here
# so the table cannot drift from the spec unnoticed.
SPEC = {
    R.SET_LOG_BASE: P.LOG_SHMFD, R.SET_LOG_FD: P.LOG_SHMFD, R.SEND_RARP: P.RARP,
    R.NET_SET_MTU: P.MTU, R.SET_BACKEND_REQ_FD: P.BACKEND_REQ, R.SET_VRING_ENDIAN: P.CROSS_ENDIAN,
    R.GET_CONFIG: P.CONFIG, R.SET_CONFIG: P.CONFIG, R.GET_INFLIGHT_FD: P.INFLIGHT_SHMFD,
    R.SET_INFLIGHT_FD: P.INFLIGHT_SHMFD, R.RESET_DEVICE: P.RESET_DEVICE,
    R.VRING_KICK: P.INBAND_NOTIFICATIONS, R.GET_MAX_MEM_SLOTS: P.CONFIGURE_MEM_SLOTS,
    R.ADD_MEM_REG: P.CONFIGURE_MEM_SLOTS, R.REM_MEM_REG: P.CONFIGURE_MEM_SLOTS,
    R.SET_STATUS: P.STATUS, R.GET_STATUS: P.STATUS,
}
GATED = sorted(SPEC)
# No device offers these, so their requests can never be served.
NEVER_OFFERED = {P.CROSS_ENDIAN, P.INBAND_NOTIFICATIONS}
MAC = bytes.fromhex("525400abcdef")
REGION = MemRegion(gpa=0, size=MIB, uva=0x7F0000000000, mmap_offset=0)


class Probe(EchoDevice):
    """EchoDevice that also takes RARP, MTU and config writes, so every
    protocol feature a device can offer has a request that succeeds, and
    records them so a test sees whether a handler ran."""

    def __init__(self):
        super().__init__(num_queues=1)
        self.config = bytearray(b"\1\2\3\4")
        self.rarps: list[bytes] = []
        self.mtus: list[int] = []

    def protocol_features(self) -> int:
        return super().protocol_features() | bits(P.RARP, P.MTU)

    def config_space(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset, data, flags) -> None:
        self.config[offset:offset + len(data)] = data

    def send_rarp(self, mac) -> None:
        self.rarps.append(bytes(mac))

    def set_mtu(self, mtu) -> None:
        self.mtus.append(mtu)


@pytest.fixture
def probe(tmp_path):
    device = Probe()
    with BackgroundServer(device, str(tmp_path / "probe.sock")) as srv:
        yield srv


@pytest.fixture
def fe(probe):
    with Frontend.connect(probe.path) as fe:
        yield fe


def negotiate(fe, *protocol_features) -> None:
    """VHOST_USER_F_PROTOCOL_FEATURES acked, then exactly these protocol features."""
    fe.get_features()
    fe.set_features(bit(Feature.PROTOCOL_FEATURES))
    fe.set_protocol_features(bits(*protocol_features))


def message(request, fds: contextlib.ExitStack) -> tuple[bytes, list[int]]:
    """A well-formed payload and fds for ``request`` (our fds closed with ``fds``)."""
    def own(fd):
        fds.callback(os.close, fd)
        return fd

    def memfd(size):
        fd = own(os.memfd_create("probe"))
        os.ftruncate(fd, size)
        return fd

    if request == R.SET_LOG_BASE:
        return protocol.LOG.pack(4096, 0), [memfd(4096)]
    if request == R.SET_LOG_FD:
        return U64.pack(0), [own(os.eventfd(0))]
    if request == R.SEND_RARP:
        return MAC + bytes(2), []
    if request == R.NET_SET_MTU:
        return U64.pack(9000), []
    if request == R.SET_BACKEND_REQ_FD:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds.callback(ours.close)
        fds.callback(theirs.close)
        return b"", [theirs.fileno()]
    if request in (R.SET_VRING_ENDIAN, R.VRING_KICK):
        return protocol.VRING_STATE.pack(0, 0), []
    if request == R.GET_CONFIG:
        return protocol.CONFIG_HEADER.pack(0, 4, 0) + bytes(4), []
    if request == R.SET_CONFIG:
        return protocol.CONFIG_HEADER.pack(0, 4, 0) + b"wxyz", []
    if request == R.GET_INFLIGHT_FD:
        return protocol.INFLIGHT.pack(0, 0, 1, 64) + bytes(4), []
    if request == R.SET_INFLIGHT_FD:
        return protocol.INFLIGHT.pack(4096, 0, 1, 64) + bytes(4), [memfd(4096)]
    if request == R.ADD_MEM_REG:
        return protocol.pack_single_region(REGION), [memfd(MIB)]
    if request == R.REM_MEM_REG:
        return protocol.pack_single_region(REGION), []
    if request == R.SET_STATUS:
        return U64.pack(protocol.DeviceStatus.ACKNOWLEDGE), []
    assert request in (R.RESET_DEVICE, R.GET_MAX_MEM_SLOTS, R.GET_STATUS), request
    return b"", []


def send(fe, request, flags=VERSION | FLAG_NEED_REPLY):
    with contextlib.ExitStack() as fds:
        payload, fd_list = message(request, fds)
        fe.send_raw(request, flags, payload, fd_list)


def answer(fe, request):
    msg = fe.recv_raw()
    msg.close_fds()
    assert msg.request == request and msg.flags == VERSION | FLAG_REPLY
    return msg


def still_served(fe) -> bool:
    """A request every front-end may send is still answered."""
    return fe.request(R.GET_FEATURES).u64() & bit(Feature.PROTOCOL_FEATURES) != 0


def test_the_table_names_the_feature_the_spec_ties_each_request_to():
    gated = {r: s.protocol_feature for r, s in REQUEST_SPECS.items() if s.protocol_feature}
    assert gated == SPEC
    # Only SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES itself.
    assert [r for r, s in REQUEST_SPECS.items() if s.needs_protocol_features] == \
        [R.SET_VRING_ENABLE]


@pytest.mark.parametrize("request_id", GATED, ids=lambda r: r.name)
def test_without_its_feature_a_request_is_refused_and_serving_goes_on(probe, fe, caplog,
                                                                      request_id):
    feature = SPEC[request_id]
    others = [f for f in P if f != feature and f not in NEVER_OFFERED and
              probe.device.protocol_features() & bit(f)]
    negotiate(fe, *others)          # everything the device offers but that one
    assert fe.has_protocol(P.REPLY_ACK)
    send(fe, request_id)
    if REQUEST_SPECS[request_id].reply and request_id not in STATUS_REPLIES:
        # A GET_* reply has no room for a failure (a non-zero u64 would read
        # as a slot count or a status): refused by closing the connection.
        with pytest.raises(BackendClosed):
            answer(fe, request_id)
        assert f"protocol feature {feature.name} not negotiated" in caplog.text
        with Frontend.connect(probe.path) as again:     # the device serves the next one
            assert still_served(again)
        return
    assert answer(fe, request_id).u64() != 0
    assert f"protocol feature {feature.name} not negotiated" in caplog.text
    assert still_served(fe)
    device = probe.device
    assert (device.rarps, device.mtus, device.config) == ([], [], bytearray(b"\1\2\3\4"))


@pytest.mark.parametrize("request_id", GATED, ids=lambda r: r.name)
def test_without_its_feature_and_without_reply_ack_the_connection_closes(probe, fe, caplog,
                                                                        request_id):
    negotiate(fe)                   # protocol features, but none of them
    send(fe, request_id, flags=VERSION)
    with pytest.raises(BackendClosed):
        still_served(fe)
    assert f"protocol feature {SPEC[request_id].name} not negotiated" in caplog.text
    with Frontend.connect(probe.path) as again:     # the device serves the next one
        assert still_served(again)


@pytest.mark.parametrize("request_id", [r for r in GATED if SPEC[r] not in NEVER_OFFERED],
                         ids=lambda r: r.name)
def test_with_its_feature_the_same_request_is_served(probe, fe, request_id):
    negotiate(fe, P.REPLY_ACK, SPEC[request_id])
    if request_id == R.REM_MEM_REG:
        send(fe, R.ADD_MEM_REG)
        assert answer(fe, R.ADD_MEM_REG).u64() == 0
    send(fe, request_id)
    reply = answer(fe, request_id)
    if request_id == R.GET_CONFIG:
        assert reply.payload == protocol.CONFIG_HEADER.pack(0, 4, 0) + b"\1\2\3\4"
    elif request_id == R.GET_INFLIGHT_FD:
        size, _, queues, queue_size = protocol.INFLIGHT.unpack_from(reply.payload)
        assert size > 0 and (queues, queue_size) == (1, 64)
    elif request_id == R.GET_MAX_MEM_SLOTS:
        assert reply.u64() == protocol.MAX_MEM_SLOTS
    else:                               # GET_STATUS: nothing set yet; others: ack
        assert reply.u64() == 0
    device = probe.device
    if request_id == R.SEND_RARP:
        assert device.rarps == [MAC]
    if request_id == R.NET_SET_MTU:
        assert device.mtus == [9000]
    if request_id == R.SET_CONFIG:
        assert device.config == bytearray(b"wxyz")
    assert still_served(fe)


@pytest.mark.parametrize("feature", sorted(NEVER_OFFERED), ids=lambda f: f.name)
def test_a_feature_no_device_offers_cannot_be_negotiated(fe, feature):
    negotiate(fe, P.REPLY_ACK)
    fe.send_raw(R.SET_PROTOCOL_FEATURES, VERSION | FLAG_NEED_REPLY,
                U64.pack(bits(P.REPLY_ACK, feature)))
    assert answer(fe, R.SET_PROTOCOL_FEATURES).u64() != 0


# ---- the spec's exceptions ---------------------------------------------------

def test_protocol_features_are_read_and_set_before_set_features(fe):
    # "must support this message even before VHOST_USER_SET_FEATURES was called"
    offered = fe.get_protocol_features()
    fe.set_protocol_features(offered & bits(P.REPLY_ACK, P.STATUS))
    assert fe.get_protocol_features() == offered
    assert fe.get_status() == 0          # STATUS is in force without SET_FEATURES
    assert fe.features == 0


def test_queue_num_needs_mq_only_offered(fe):
    # "only when VHOST_USER_PROTOCOL_F_MQ is set in queried protocol features"
    assert fe.get_protocol_features() & bit(P.MQ)
    negotiate(fe, P.REPLY_ACK)
    assert fe.get_queue_num() == 1


def test_vring_enable_after_protocol_features_without_set_features(fe):
    # QEMU's virtio-net enables queue pairs when the guest sets its features,
    # before vhost-user SET_FEATURES; protocol features were set at connect.
    fe.get_features()
    fe.set_protocol_features(bit(P.REPLY_ACK))
    fe.set_vring_enable(0, True)            # acked with zero, or ReplyError
    fe.set_vring_enable(0, False)


def test_vring_enable_after_acking_protocol_features_without_setting_any(fe):
    fe.get_features()
    fe.set_features(bit(Feature.PROTOCOL_FEATURES))
    fe.set_vring_enable(0, True)
    assert still_served(fe)


@pytest.mark.parametrize("acked", [0, bit(Feature.VERSION_1)], ids=["nothing", "no-bit-30"])
def test_vring_enable_without_protocol_features_closes_the_connection(fe, caplog, acked):
    fe.get_features()
    if acked:
        fe.set_features(acked)
    fe.send_raw(R.SET_VRING_ENABLE, VERSION, protocol.VRING_STATE.pack(0, 1))
    with pytest.raises(BackendClosed):
        still_served(fe)
    assert "SET_VRING_ENABLE: protocol features not negotiated" in caplog.text


def test_a_front_end_without_protocol_features_is_served(probe, fe):
    """The requests no feature gates, as a legacy front-end (one that never
    acks VHOST_USER_F_PROTOCOL_FEATURES) sends them: rings start enabled,
    RESET_OWNER is its reset (QEMU 7.2 sends it without RESET_DEVICE)."""
    fe.set_owner()
    assert fe.get_features() & bit(Feature.VERSION_1)
    fe.set_features(bit(Feature.VERSION_1))
    assert fe.get_queue_num() == 1
    mem = fe.own(GuestMemory([(0, 4 * MIB)], name="legacy"))
    fe.set_mem_table(mem)
    for _ in range(2):
        vq = fe.setup_queue(0, 64, err=True)        # NUM, BASE, ADDR, KICK, CALL, ERR
        # Without REPLY_ACK nothing above was waited for: a reply proves the
        # call fd is in place before the request (a completion before
        # SET_VRING_CALL is the lost-notification case of issue 14, point 2).
        assert still_served(fe)
        src, dst = mem.alloc(64), mem.alloc(64)
        mem.write(src, b"legacy".ljust(64, b"."))
        vq.add([Buffer(src, 64), Buffer(dst, 64, True)])
        vq.notify()
        (used,) = vq.wait(1, timeout=10)
        assert used.length == 64 and mem.read(dst, 6) == b"legacy"
        assert fe.stop_queue(0) == 1                 # GET_VRING_BASE
        fe.reset()                                   # RESET_OWNER
        fe.set_features(bit(Feature.VERSION_1))
    assert still_served(fe)


# ---- header flags -------------------------------------------------------------

@pytest.mark.parametrize("flag_bit", [2] + list(range(4, 32)))
def test_reserved_or_reply_flag_bits_in_a_request_are_refused(fe, caplog, flag_bit):
    negotiate(fe, P.REPLY_ACK)
    fe.send_raw(R.SET_OWNER, VERSION | FLAG_NEED_REPLY | (1 << flag_bit))
    assert answer(fe, R.SET_OWNER).u64() != 0
    assert "reserved or reply bits set" in caplog.text
    fe.send_raw(R.SET_OWNER, VERSION | FLAG_NEED_REPLY)
    assert answer(fe, R.SET_OWNER).u64() == 0


def test_reserved_flag_bits_without_reply_ack_close_the_connection(fe, caplog):
    fe.send_raw(R.GET_FEATURES, VERSION | 1 << 7)
    with pytest.raises(BackendClosed):
        fe.recv_raw()
    assert "reserved or reply bits set" in caplog.text
