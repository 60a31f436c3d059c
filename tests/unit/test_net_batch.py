"""Python network back-ends' batch path (issue 17): inject_many delivers
many frames with one flush and one notification, hands a transmitted frame
back or on to another device copied once, from guest memory to guest
memory, and a frame used after transmit() returned is refused, not read."""
import os
import struct

import pytest

from vhostuser.native import ffi, lib
from vhostuser.net import Frame, FrameBatch, NetBackend, NetDevice, NetFeature, StaleFrameError
from vhostuser.protocol import Feature, bits
from vhostuser_devkit.ringlab import Lab

HDR = struct.Struct("<BBHHHHH")
ZERO_HDR = HDR.pack(0, 0, 0, 0, 0, 0, 0)


class Batcher(NetBackend):
    """Does what `action(self, queue_pair, frames)` says with each batch."""

    def __init__(self, action):
        super().__init__()
        self.action = action
        self.results = []
        self.kept = []

    def transmit(self, queue_pair, frames):
        self.results.append(self.action(self, queue_pair, frames))


def make_lab():
    lab = Lab(nqueues=2, size=64)
    for q in range(2):
        lab.vq(q).enabled = True
    return lab


def device(lab, backend, mrg=True):
    d = NetDevice(backend)
    feats = [Feature.VERSION_1] + ([NetFeature.MRG_RXBUF] if mrg else [])
    d.on_features(bits(*feats))
    d._net.rxq[0] = lab.vq(0)
    return d


@pytest.fixture
def rig():
    """(lab, call eventfd of the receive queue, make(action, mrg=True) -> device)"""
    lab = make_lab()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    lab.vq(0).call_fd = efd
    devs = []

    def make(action, mrg=True):
        d = device(lab, Batcher(action), mrg)
        devs.append(d)
        return d
    yield lab, efd, make
    lab.vq(0).call_fd = -1
    os.close(efd)
    for d in devs:
        d._net.rxq[0] = ffi.NULL
        d.close()
    lab.close()


def calls(efd) -> int:
    try:
        return os.eventfd_read(efd)
    except BlockingIOError:
        return 0


def post_rx(lab, sizes, q=0):
    gpas, heads = [], []
    for n in sizes:
        g = lab.alloc(n)
        gpas.append(g)
        heads.append(lab.add_split_chain(q, [(g, n, True)]))
    lab.publish_split(q, heads)
    return gpas


def transmit(lab, dev, frames, split_at=None, q=1):
    lab.publish_readable(q, [ZERO_HDR + f for f in frames], split_at)
    lib.vu_net_handler(dev._net, lab.vq(q))
    return lab.used_split(q)


def received(lab, gpas, used):
    """The frames in the used receive buffers (one buffer each)."""
    out = []
    for (head, length), gpa in zip(used, gpas):
        hdr = HDR.unpack(lab.read(gpa, 12))
        assert hdr[:6] == (0, 0, 0, 0, 0, 0) and hdr[6] == 1    # no offloads, one buffer
        out.append(lab.read(gpa + 12, length - 12))
    return out


def frames_of(n, size=64):
    return [bytes((i * 31 + j) & 0xFF for j in range(size)) for i in range(n)]


@pytest.mark.parametrize("split_at", [None, 7, 12 + 20])    # one buffer; header split; frame split
def test_a_whole_batch_goes_back_with_one_notification(rig, split_at):
    lab, efd, make = rig
    dev = make(lambda be, qp, frames: be.inject_many(frames, qp))
    gpas = post_rx(lab, [2048] * 8)
    calls(efd)
    sent = frames_of(8)
    assert len(transmit(lab, dev, sent, split_at)) == 8
    assert dev.backend.results == [8]
    assert received(lab, gpas, lab.used_split(0)) == sent
    assert calls(efd) == 1
    s = dev.stats()
    assert s["tx_packets"] == s["rx_packets"] == 8 and s["rx_bytes"] == 8 * 64


def test_bytes_and_frames_mixed(rig):
    lab, efd, make = rig

    def action(be, qp, frames):
        out = []
        for f in frames:
            out.append(f)                                   # as it is, from guest memory
            out.append(b"copy:" + f.tobytes())              # a new frame, from Python
        out.append(bytearray(b"x" * 60))
        out.append(memoryview(b"y" * 70))
        return be.inject_many(out, qp)
    dev = make(action)
    gpas = post_rx(lab, [2048] * 8)
    sent = frames_of(3, 100)
    transmit(lab, dev, sent)
    assert dev.backend.results == [8]
    want = [x for f in sent for x in (f, b"copy:" + f)] + [b"x" * 60, b"y" * 70]
    assert received(lab, gpas, lab.used_split(0)) == want


def test_a_subset_of_the_batch(rig):
    lab, efd, make = rig
    dev = make(lambda be, qp, frames: be.inject_many(
        [f for f in frames if f.tobytes()[0] % 2 == 0], qp))
    gpas = post_rx(lab, [2048] * 8)
    sent = [bytes([i]) * 64 for i in range(6)]
    transmit(lab, dev, sent)
    assert dev.backend.results == [3]
    assert received(lab, gpas, lab.used_split(0)) == [sent[0], sent[2], sent[4]]


def test_out_of_buffers_the_rest_are_dropped_and_counted(rig):
    lab, efd, make = rig
    dev = make(lambda be, qp, frames: be.inject_many(frames, qp))
    gpas = post_rx(lab, [2048] * 3)
    sent = frames_of(5)
    transmit(lab, dev, sent)
    assert dev.backend.results == [3]
    assert received(lab, gpas, lab.used_split(0)) == sent[:3]
    s = dev.stats()
    assert (s["rx_packets"], s["rx_dropped_no_buffers"]) == (3, 2)


def test_too_long_for_a_buffer_is_dropped_and_the_next_delivered(rig):
    lab, efd, make = rig
    dev = make(lambda be, qp, frames: be.inject_many([b"a" * 1000, b"b" * 60], qp), mrg=False)
    gpas = post_rx(lab, [512, 512])
    transmit(lab, dev, frames_of(1))
    assert dev.backend.results == [1]
    assert received(lab, gpas, lab.used_split(0)) == [b"b" * 60]
    assert dev.stats()["rx_dropped_too_long"] == 1


def test_mergeable_buffers_take_a_long_frame(rig):
    lab, efd, make = rig
    big = bytes(range(256)) * 6
    dev = make(lambda be, qp, frames: be.inject_many([big], qp))
    gpas = post_rx(lab, [512] * 4)
    transmit(lab, dev, frames_of(1))
    used = lab.used_split(0)
    assert len(used) == 4 and HDR.unpack(lab.read(gpas[0], 12))[6] == 4
    data = b"".join(lab.read(g, n) for g, (_h, n) in zip(gpas, used))
    assert data[12:] == big


def test_frames_go_on_to_another_device(rig):
    """A frame of one device's transmit batch injected into another's
    receive queue: copied straight from the first guest's memory."""
    lab, efd, make = rig
    other_lab = make_lab()
    other = device(other_lab, Batcher(lambda *a: None))
    try:
        dev = make(lambda be, qp, frames: other.inject_many(frames, 0))
        gpas = post_rx(other_lab, [2048] * 4)
        sent = frames_of(4, 200)
        transmit(lab, dev, sent, split_at=50)
        assert dev.backend.results == [4]
        assert received(other_lab, gpas, other_lab.used_split(0)) == sent
        assert lab.used_split(0) == []
    finally:
        other._net.rxq[0] = ffi.NULL
        other.close()
        other_lab.close()


def test_frames_are_read_only_when_looked_at_and_match(rig):
    lab, efd, make = rig
    seen = []

    def action(be, qp, frames):
        assert isinstance(frames, FrameBatch) and len(frames) == 2
        for f in frames:
            seen.append((f.length, f.header, f.tobytes(), b"".join(bytes(v) for v in f.views)))
        assert frames[-1] is frames[1] and frames[0:1] == [frames[0]]
    dev = make(action)
    sent = frames_of(2, 90)
    transmit(lab, dev, sent, split_at=40)
    assert seen == [(90, ZERO_HDR, f, f) for f in sent]


def test_a_frame_used_after_transmit_is_refused(rig):
    lab, efd, make = rig

    def keep(be, qp, frames):
        be.kept.append(frames)
        be.kept.extend(frames)
    dev = make(keep)
    post_rx(lab, [2048] * 4)
    transmit(lab, dev, frames_of(2))
    batch, f0, f1 = dev.backend.kept
    for use in (lambda: f0.tobytes(), lambda: f1.views, lambda: f0.header,
                lambda: dev.inject_many(batch), lambda: dev.inject_many([f0])):
        with pytest.raises(StaleFrameError):
            use()
    assert lab.used_split(0) == []


def test_a_frame_looked_at_during_transmit_is_refused_afterwards(rig):
    """A frame whose views (or data) were read during transmit, kept: its
    views are released and the frame raises StaleFrameError, rather than
    reading or writing the buffer the guest may have reused."""
    lab, efd, make = rig

    def keep(be, qp, frames):
        for f in frames:
            be.kept.append((f, f.views, f.tobytes()))
    dev = make(keep)
    post_rx(lab, [2048] * 4)
    sent = frames_of(2)
    transmit(lab, dev, sent, split_at=30)
    assert [k[2] for k in dev.backend.kept] == sent
    for f, views, _data in dev.backend.kept:
        for use in (lambda: f.tobytes(), lambda: f.views, lambda: dev.inject_many([f])):
            with pytest.raises(StaleFrameError):
                use()
        for v in views:
            with pytest.raises(ValueError):
                v[:1] = b"x"
            with pytest.raises(ValueError):
                bytes(v)
    assert lab.used_split(0) == []


class _PausingLib:
    """vhostuser.net.device's lib, with vu_net_inject_frames held until
    `go` is set (at most 1 s): an injection racing the end of transmit()."""

    def __init__(self, real, go):
        self._real, self._go = real, go

    def __getattr__(self, name):
        return getattr(self._real, name)

    def vu_net_inject_frames(self, *args):
        self._go.wait(1.0)
        return self._real.vu_net_inject_frames(*args)


def inject_from_another_thread(whole: bool) -> None:
    """The scenario of the test below (run in a child process: it may
    crash). Prints the outcome: "stale", or whether what reached the guest
    is what it sent."""
    import threading

    import vhostuser.net.device as netdev
    lab = make_lab()
    go = threading.Event()
    netdev.lib = _PausingLib(lib, go)
    outcome = []

    def inject(frames):
        try:
            outcome.append(dev.inject_many(frames if whole else list(frames)))
        except StaleFrameError:
            outcome.append("stale")

    threads = []

    def hand_off(be, qp, frames):
        t = threading.Thread(target=inject, args=(frames,))
        t.start()
        threads.append(t)
    dev = device(lab, Batcher(hand_off))
    gpas = post_rx(lab, [2048] * 4)
    sent = frames_of(2)
    tx = []
    for f in sent:
        g = lab.alloc(12 + len(f))
        lab.write(g, ZERO_HDR + f)
        tx.append((lab.add_split_chain(1, [(g, 12 + len(f), False)]), g, 12 + len(f)))
    lab.publish_split(1, [h for h, _, _ in tx])
    lib.vu_net_handler(dev._net, lab.vq(1))
    for _, g, n in tx:                     # the guest reuses its buffers
        lab.write(g, b"R" * n)
    go.set()
    threads[0].join(5)
    assert not threads[0].is_alive()
    if outcome == ["stale"]:
        print("stale")
    else:
        assert outcome == [2], outcome
        print("intact" if received(lab, gpas, lab.used_split(0)) == sent else "reused")
    dev._net.rxq[0] = ffi.NULL
    dev.close()
    lab.close()


@pytest.mark.parametrize("whole", [True, False], ids=["batch", "frames"])
def test_a_batch_injected_from_another_thread_is_not_read_after_transmit_returned(whole):
    """A back-end hands its batch to a thread of its own, which injects it
    while transmit() returns: the frames go back to the guest, which reuses
    their buffers. The injection either runs before they go back (the
    batch's end waits for it) or raises StaleFrameError; it read the reused
    buffers, and the frames' elements, released (segfaults)."""
    import subprocess
    import sys
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
              f"import test_net_batch as t; t.inject_from_another_thread({whole})")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() in ("intact", "stale"), out.stdout


def test_frames_looked_at_keep_their_values(rig):
    """length and header read during transmit stay readable afterwards."""
    lab, efd, make = rig

    def keep(be, qp, frames):
        for f in frames:
            f.length, f.header
            be.kept.append(f)
    dev = make(keep)
    transmit(lab, dev, frames_of(1, 77))
    [f] = dev.backend.kept
    assert (f.length, f.header) == (77, ZERO_HDR)


def test_eager_frames_as_before():
    f = Frame([memoryview(b"ab"), memoryview(b"cd")], ZERO_HDR, 4)
    assert (f.tobytes(), f.length, f.header) == (b"abcd", 4, ZERO_HDR)


def test_not_connected_drops_and_counts(rig):
    lab, efd, make = rig
    dev = make(lambda *a: None)
    dev._net.rxq[0] = ffi.NULL
    assert dev.inject_many([b"a" * 60, b"b" * 60]) == 0
    assert dev.stats()["rx_dropped_disabled"] == 2
    with pytest.raises(ValueError):
        dev.inject_many([b"a" * 60], queue_pair=1)
    assert dev.inject_many([]) == 0


def test_many_bytes_frames_in_one_call():
    """More frames than fit the C side's stack arrays (64), bytes and
    bytearrays (laid end to end for one C call), in order."""
    lab = Lab(nqueues=2, size=256)
    for q in range(2):
        lab.vq(q).enabled = True
    frames = [bytes([i]) * (60 + i) if i % 2 else bytearray([i]) * (60 + i) for i in range(100)]
    dev = device(lab, Batcher(lambda be, qp, fs: be.inject_many(frames, qp)))
    try:
        gpas = post_rx(lab, [2048] * 100)
        transmit(lab, dev, frames_of(1))
        assert dev.backend.results == [100]
        assert received(lab, gpas, lab.used_split(0)) == [bytes(f) for f in frames]
    finally:
        dev._net.rxq[0] = ffi.NULL
        dev.close()
        lab.close()
