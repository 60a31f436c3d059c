"""The C sink and loopback network back-ends (no Python per frame)."""
import pytest

from vhostuser.native import ffi, lib
from vhostuser.net import LoopbackBackend, NetDevice, SinkBackend
from vhostuser.net.spec import HDR, NetFeature
from vhostuser.protocol import Feature, bits
from vhostuser.testing.ringlab import Lab

HEADER = HDR.pack(0, 0, 0, 0, 0, 0, 0)


@pytest.fixture
def lab():
    lab = Lab(nqueues=2, size=64)
    for q in range(2):
        lab.vq(q).enabled = True
    yield lab
    lab.close()


def device(lab, backend):
    d = NetDevice(backend)
    d.on_features(bits(Feature.VERSION_1, NetFeature.MRG_RXBUF))
    d._net.rxq[0] = lab.vq(0)
    return d


def transmit(lab, dev, frames, split_at=None):
    """Each frame with its header; split_at puts the frame in two buffers."""
    heads = []
    for f in frames:
        data = HEADER + f
        cut = len(data) if split_at is None else split_at
        parts = []
        for chunk in (data[:cut], data[cut:]):
            if chunk:
                gpa = lab.alloc(len(chunk))
                lab.write(gpa, chunk)
                parts.append((gpa, len(chunk), False))
        heads.append(lab.add_split_chain(1, parts))
    lab.publish_split(1, heads)
    lib.vu_net_handler(dev._net, lab.vq(1))
    return lab.used_split(1)


def post_rx(lab, sizes):
    gpas, heads = [], []
    for n in sizes:
        g = lab.alloc(n)
        gpas.append(g)
        heads.append(lab.add_split_chain(0, [(g, n, True)]))
    lab.publish_split(0, heads)
    return gpas


def test_sink_counts_and_returns_every_frame(lab):
    dev = device(lab, SinkBackend())
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
    dev = device(lab, LoopbackBackend())
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
    dev = device(lab, LoopbackBackend())
    try:
        post_rx(lab, [2048])
        assert len(transmit(lab, dev, [b"a" * 60, b"b" * 60])) == 2   # both sent
        s = dev.stats()
        assert s["tx_packets"] == 2
        assert (s["rx_packets"], s["rx_dropped_no_buffers"]) == (1, 1)
    finally:
        dev._net.rxq[0] = ffi.NULL
        dev.close()
