"""virtio-net data path in C (csrc/vu_net*.c), virtio 1.4 5.1.6: transmitted
headers are validated and bad frames dropped and counted; received frames
fill guest buffers with a correct header (num_buffers with mergeable
buffers); no room means drop and count, with the buffers left for later."""

import struct
import time

import pytest

from vhostuser.native import ffi, lib
from vhostuser.net.backends import LoopbackBackend, NetBackend, SinkBackend
from vhostuser.net.device import NetDevice
from vhostuser.net.spec import GSO_TCPV4, HDR, HDR_F_NEEDS_CSUM, NetFeature
from vhostuser.protocol import Feature, bit, bits
from vhostuser_devkit.ringlab import Lab

D = {name: getattr(lib, f"VU_NET_D_{name}") for name in
     ("SHORT", "TOO_LONG", "BAD_GSO", "BAD_CSUM", "DISABLED", "NO_BUFFERS")}


class Recorder(NetBackend):
    def __init__(self):
        super().__init__()
        self.frames = []

    def transmit(self, queue_pair, frames):
        self.frames += [(queue_pair, f.header, f.tobytes()) for f in frames]


@pytest.fixture
def lab():
    lab = Lab(nqueues=2, size=64)
    for q in range(2):
        lab.vq(q).enabled = True
    yield lab
    lab.close()


@pytest.fixture
def dev(lab):
    backend = Recorder()
    d = NetDevice(backend, mtu=1500)
    features = bits(Feature.VERSION_1, NetFeature.MRG_RXBUF, NetFeature.CSUM)
    d.on_features(features)
    d._net.rxq[0] = lab.vq(0)
    yield d
    d._net.rxq[0] = ffi.NULL
    d.close()


def frame(n=60):
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


def tx(lab, dev, header: bytes, payload: bytes):
    gpa = lab.alloc(len(header) + len(payload))
    lab.write(gpa, header + payload)
    head = lab.add_split_chain(1, [(gpa, len(header) + len(payload), False)])
    lab.publish_split(1, [head])
    lib.vu_net_handler(dev._net, lab.vq(1))
    return lab.used_split(1)


def test_valid_frame_reaches_python_backend_without_header(lab, dev):
    hdr = HDR.pack(0, 0, 0, 0, 0, 0, 0)
    used = tx(lab, dev, hdr, frame(100))
    assert len(used) == 1 and used[0][1] == 0
    assert dev.backend.frames == [(0, hdr, frame(100))]
    assert dev.stats()["tx_packets"] == 1


@pytest.mark.parametrize("header,payload,reason", [
    (b"\0" * 8, b"", "SHORT"),                                        # shorter than the header
    (HDR.pack(0, 0, 0, 0, 0, 0, 0), b"\0" * 10, "SHORT"),             # not even an Ethernet header
    (HDR.pack(0, 0, 0, 0, 0, 0, 0), b"\0" * 1600, "TOO_LONG"),        # over MTU without GSO
    (HDR.pack(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16, 0), b"\0" * 3000, "BAD_GSO"),  # TSO not negotiated
    (HDR.pack(0, 7, 0, 0, 0, 0, 0), b"\0" * 60, "BAD_GSO"),           # unknown GSO type
    (HDR.pack(HDR_F_NEEDS_CSUM, 0, 0, 0, 50, 16, 0), b"\0" * 60, "BAD_CSUM"),  # csum beyond frame
])
def test_bad_frames_are_dropped_counted_and_the_queue_goes_on(lab, dev, header, payload, reason):
    used = tx(lab, dev, header, payload)
    assert len(used) == 1                      # the chain is returned
    assert dev.backend.frames == []
    assert dev.stats()[f"tx_dropped_{reason.lower()}"] == 1
    assert not lab.vq(1).broken
    tx(lab, dev, HDR.pack(0, 0, 0, 0, 0, 0, 0), frame())
    assert len(dev.backend.frames) == 1


def test_transmit_returns_chains_in_ring_order_with_drops_between(lab, dev):
    """VIRTIO_F_IN_ORDER is offered: a burst mixing frames for the Python
    back-end with dropped ones comes back in the order it was made
    available (drops are not returned ahead of the back-end's frames)."""
    ok, bad = HDR.pack(0, 0, 0, 0, 0, 0, 0), HDR.pack(0, 7, 0, 0, 0, 0, 0)
    heads = []
    for i, header in enumerate([ok, bad, ok, bad, bad, ok]):
        data = header + frame(60 + i)
        gpa = lab.alloc(len(data))
        lab.write(gpa, data)
        heads.append(lab.add_split_chain(1, [(gpa, len(data), False)]))
    lab.publish_split(1, heads)
    lib.vu_net_handler(dev._net, lab.vq(1))
    assert [head for head, _len in lab.used_split(1)] == heads
    assert [f for _qp, _h, f in dev.backend.frames] == [frame(60), frame(62), frame(65)]
    assert dev.stats()["tx_dropped_bad_gso"] == 3


def test_in_order_is_offered_by_default_and_can_be_withheld():
    for in_order in (True, False):
        d = NetDevice(Recorder(), in_order=in_order)
        try:
            assert bool(d.features() & bit(Feature.IN_ORDER)) is in_order
        finally:
            d.close()


def test_disabled_tx_ring_drops_what_it_is_given(lab, dev):
    lab.vq(1).enabled = False
    used = tx(lab, dev, HDR.pack(0, 0, 0, 0, 0, 0, 0), frame())
    assert len(used) == 1 and dev.backend.frames == []
    assert dev.stats()["tx_dropped_disabled"] == 1


def post_rx(lab, sizes):
    gpas = []
    heads = []
    for n in sizes:
        g = lab.alloc(n)
        gpas.append(g)
        heads.append(lab.add_split_chain(0, [(g, n, True)]))
    lab.publish_split(0, heads)
    return gpas


def test_mergeable_receive_spreads_a_frame_over_buffers(lab, dev):
    gpas = post_rx(lab, [512, 512, 512, 512])
    data = frame(1400)
    assert dev.inject(data)
    used = lab.used_split(0)
    assert [u[1] for u in used] == [512, 512, 1400 + 12 - 1024]   # header in the first buffer
    hdr = HDR.unpack(lab.read(gpas[0], 12))
    assert hdr[6] == 3                                      # num_buffers
    got = lab.read(gpas[0] + 12, 500) + lab.read(gpas[1], 512) + lab.read(gpas[2], 388)
    assert got == data
    assert dev.stats()["rx_packets"] == 1


def test_no_buffers_drops_and_counts(lab, dev):
    assert not dev.inject(frame())
    assert dev.stats()["rx_dropped_no_buffers"] == 1


def test_frame_that_does_not_fit_leaves_buffers_for_the_next(lab, dev):
    dev.on_features(bit(Feature.VERSION_1))                 # no mergeable buffers
    post_rx(lab, [256, 2048])
    assert not dev.inject(frame(1000))                      # first buffer too small
    assert dev.stats()["rx_dropped_too_long"] == 1
    assert lab.used_split(0) == []                          # nothing consumed
    assert dev.inject(frame(200))                           # fits the same first buffer
    assert [u[1] for u in lab.used_split(0)] == [212]


def test_disabled_rx_ring_receives_nothing(lab, dev):
    post_rx(lab, [2048])
    lab.vq(0).enabled = False
    assert not dev.inject(frame())
    assert dev.stats()["rx_dropped_disabled"] == 1
    assert lab.used_split(0) == []


def test_send_rarp_broadcasts_a_rarp_for_the_mac(dev):
    # vhost-user.rst SEND_RARP: after migration, announce the guest's MAC.
    # A Python back-end gets it from a thread of its own (not the caller's).
    mac = bytes.fromhex("525400abcdef")
    dev.send_rarp(mac + b"\0\0")
    deadline = time.monotonic() + 10
    while not dev.backend.frames and time.monotonic() < deadline:
        time.sleep(0.01)
    (qp, _, frame), = dev.backend.frames
    assert qp == 0
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert frame[12:14] == b"\x80\x35"          # ETH_P_RARP
    assert frame[20:22] == b"\x00\x03"          # RARP request
    assert frame[22:28] == mac and frame[32:38] == mac


def test_net_set_mtu_bounds(dev):
    from vhostuser.errors import ProtocolError
    dev.set_mtu(9000)
    assert dev.mtu == 9000
    for bad in (0, 67, 65536):
        with pytest.raises(ProtocolError):
            dev.set_mtu(bad)


def test_net_set_mtu_holds_until_reset(dev):
    """A front-end's NET_SET_MTU is undone by a reset: the MTU configured
    at construction (the operator's mtu=) is what the next driver sees in
    config space, not the last front-end's choice."""
    dev.set_mtu(68)
    assert dev.mtu == 68
    dev.on_reset()
    assert dev.mtu == 1500


# -- the C sink and loopback back-ends (no Python per frame) --------------------

def c_device(lab, backend):
    d = NetDevice(backend)
    d.on_features(bits(Feature.VERSION_1, NetFeature.MRG_RXBUF))
    d._net.rxq[0] = lab.vq(0)
    return d


def transmit(lab, dev, frames, split_at=None):
    """Each frame with its header; split_at puts the frame in two buffers."""
    lab.publish_readable(1, [HDR.pack(0, 0, 0, 0, 0, 0, 0) + f for f in frames], split_at)
    lib.vu_net_handler(dev._net, lab.vq(1))
    return lab.used_split(1)


def test_sink_counts_and_returns_every_frame(lab):
    dev = c_device(lab, SinkBackend())
    try:
        used = transmit(lab, dev, [bytes([i]) * 60 for i in range(5)] + [b"\0" * 5])
        assert len(used) == 6                      # the bad one is returned too
        s = dev.stats()
        assert (s["tx_packets"], s["tx_bytes"], s["tx_dropped_short"]) == (5, 300, 1)
        assert s["rx_packets"] == 0
    finally:
        dev._net.rxq[0] = ffi.NULL
        dev.close()


@pytest.mark.parametrize("split_at", [None, 7, 12 + 30])   # one buffer; header split; frame split
def test_loopback_sends_each_frame_back_intact(lab, split_at):
    dev = c_device(lab, LoopbackBackend())
    try:
        gpas = post_rx(lab, [2048] * 3)
        frames = [bytes(range(i, i + 64)) for i in range(3)]
        assert len(transmit(lab, dev, frames, split_at)) == 3
        used = lab.used_split(0)
        assert [u[1] for u in used] == [12 + 64] * 3
        for gpa, f in zip(gpas, frames):
            hdr = HDR.unpack(lab.read(gpa, 12))
            assert hdr[6] == 1 and hdr[0] == 0 and hdr[1] == 0   # num_buffers, no offloads
            assert lab.read(gpa + 12, 64) == f
        s = dev.stats()
        assert s["tx_packets"] == s["rx_packets"] == 3
    finally:
        dev._net.rxq[0] = ffi.NULL
        dev.close()


def test_loopback_without_receive_buffers_drops_on_the_way_back(lab):
    dev = c_device(lab, LoopbackBackend())
    try:
        post_rx(lab, [2048])
        assert len(transmit(lab, dev, [b"a" * 60, b"b" * 60])) == 2   # both sent
        s = dev.stats()
        assert s["tx_packets"] == 2
        assert (s["rx_packets"], s["rx_dropped_no_buffers"]) == (1, 1)
    finally:
        dev._net.rxq[0] = ffi.NULL
        dev.close()


def test_loopback_leaves_receive_buffers_of_dropped_frames_for_the_next_ones(lab):
    """The loopback takes receive buffers for a whole transmit burst before it
    checks the frames: those of frames dropped on the way out go back to the
    ring, in order, for later frames."""
    dev = c_device(lab, LoopbackBackend())
    try:
        gpas = post_rx(lab, [2048] * 4)
        good = [bytes([0xA0 + i]) * 60 for i in range(3)]
        used = transmit(lab, dev, [good[0], b"\0" * 5, good[1], b"\0" * 5, good[2]])
        assert len(used) == 5
        s = dev.stats()
        assert (s["tx_packets"], s["tx_dropped_short"], s["rx_packets"]) == (3, 2, 3)
        # the three frames in the first three buffers, in order
        assert [u[1] for u in lab.used_split(0)] == [12 + 60] * 3
        assert [lab.read(g + 12, 60) for g in gpas[:3]] == good
        # the fourth buffer is still the driver's, and the next frame gets it
        assert len(transmit(lab, dev, [b"z" * 60])) == 1
        assert [u[1] for u in lab.used_split(0)] == [12 + 60]
        assert lab.read(gpas[3] + 12, 60) == b"z" * 60
    finally:
        dev._net.rxq[0] = ffi.NULL
        dev.close()


def test_a_resubmitted_receive_buffer_given_back_is_neither_lost_nor_used_twice():
    """Receive buffers the front-end handed over as in flight (an inflight
    area after a reconnect) are popped from the resubmit list, not the
    ring. One too small for a frame is given back: it used to step the
    ring's index back (which its pop never advanced) and forget its mark,
    so it was never completed and another chain was completed twice."""
    lab = Lab(nqueues=2, size=16)
    for q in range(2):
        lab.vq(q).enabled = True
    vq = lab.vq(0)
    lib.vu_vq_stop(vq)
    small, big = lab.alloc(64), lab.alloc(2048)
    a = lab.add_split_chain(0, [(small, 64, True)])
    b = lab.add_split_chain(0, [(big, 2048, True)])
    lab.publish_split(0, [a, b])
    # QueueRegionSplit (vhost-user.rst): a and b in flight, a older
    region = ffi.new("uint8_t[]", 16 + 16 * 16)
    struct.pack_into("<QHHHH", ffi.buffer(region), 0, 0, 1, 16, 0, 0)
    for head, counter in ((a, 1), (b, 2)):
        struct.pack_into("<B5xHQ", ffi.buffer(region), 16 + 16 * head, 1, 0, counter)
    assert lib.vu_vq_set_inflight(vq, region) == 0
    assert lib.vu_vq_start(vq) == 0
    vq.enabled = True
    dev = NetDevice(Recorder())
    dev.on_features(bits(Feature.VERSION_1))          # no mergeable buffers
    dev._net.rxq[0] = vq
    try:
        lib.vu_dev_rdlock(lab.dev)
        try:
            # 200 bytes don't fit a (64 with the 12-byte header): a goes
            # back; then one frame that fits a, one that fits b
            results = [lib.vu_net_rx_deliver(dev._net, 0, ffi.NULL, frame(n), n)
                       for n in (200, 40, 60)]
        finally:
            lib.vu_dev_unlock(lab.dev)
        lib.vu_vq_flush(vq)
        used = lab.used_split(0)
        assert results == [lib.VU_NET_D_TOO_LONG, 0, 0]
        assert sorted(used) == sorted([(a, 12 + 40), (b, 12 + 60)]), used
    finally:
        dev._net.rxq[0] = ffi.NULL
        dev.close()
        lab.close()


def test_receive_counters_lose_nothing_to_deliveries_from_several_threads(lab, dev):
    """The loop's inject() and a worker's TAP or loopback deliveries go into
    one receive queue from different threads (one frame at a time under the
    queue's receive lock), and each counts what it delivered or dropped:
    counted outside that lock without atomics, counts were lost."""
    data = frame()
    sent = 0
    for _ in range(5):      # threads that happen not to overlap lose nothing
        assert lib.vu_fault_net_inject_threads(dev._net, 0, data, len(data), 4, 500_000) == 0
        sent += 4 * 500_000
        if dev.stats()["rx_dropped_no_buffers"] != sent:
            break
    assert dev.stats()["rx_dropped_no_buffers"] == sent
