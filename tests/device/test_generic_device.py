"""The core runtime end to end with a Python device (EchoDevice: readable
bytes copied into the writable buffers) over a real socket: batches into
Python, split and packed rings, busy-poll mode, buffers across memory
regions, and a malformed ring that breaks only its own queue until reset."""
import threading

import pytest

from vhostuser.device import EchoDevice
from vhostuser.frontend import Buffer, Frontend, GuestMemory
from vhostuser.frontend.device import DEFAULT_FEATURES
from vhostuser.protocol import Feature, bit
from vhostuser.testing.server import BackgroundServer

MIB = 1 << 20


def setup(fe, *, packed, queues=2, mem=None, err=False):
    features = DEFAULT_FEATURES | (bit(Feature.RING_PACKED) if packed else 0)
    fe.negotiate(features, required=bit(Feature.VERSION_1) | (bit(Feature.RING_PACKED) if packed else 0))
    mem = mem or fe.own(GuestMemory([(0, 4 * MIB)], name="echo"))
    fe.set_mem_table(mem)
    return mem, [fe.setup_queue(i, 64, packed=packed, mem=mem, err=err) for i in range(queues)]


def echo(mem, vq, payloads, *, indirect=False):
    tokens = []
    for i, data in enumerate(payloads):
        src = mem.alloc(len(data))
        mem.write(src, data)
        dst = mem.alloc(len(data))
        mem.write(dst, bytes(len(data)))
        vq.add([Buffer(src, len(data)), Buffer(dst, len(data), True)], (dst, data),
               indirect=indirect)
        tokens.append(dst)
    vq.notify()
    done = vq.wait(len(payloads), timeout=10)
    for used in done:
        dst, data = used.token
        assert used.length == len(data)
        assert mem.read(dst, len(data)) == data
    return done


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("poll_us", [0, 500])
def test_echo_batches(serve, packed, poll_us):
    with serve(EchoDevice(num_queues=2, poll_us=poll_us)) as (srv, fe):
        mem, vqs = setup(fe, packed=packed)
        payloads = [bytes([i]) * (i * 37 + 1) for i in range(30)]
        assert len(echo(mem, vqs[0], payloads)) == 30
        assert len(echo(mem, vqs[1], payloads[:5], indirect=True)) == 5
        stats = srv.device.session.dataplane.queues[0].stats()
        assert stats.popped == stats.pushed == 30
        # one kick can cover many chains; notifications are per batch, not per chain
        assert stats.notifies < 30


def test_buffer_across_two_memory_regions(serve):
    with serve(EchoDevice(num_queues=1)) as (srv, fe):
        mem = fe.own(GuestMemory([(0, MIB), (MIB, MIB)], name="two"))
        mem, (vq,) = setup(fe, packed=False, queues=1, mem=mem)
        data = bytes(range(256)) * 16
        src = mem.alloc_at(MIB - 1000, len(data))    # straddles the region edge
        mem.write(src, data)
        dst = mem.alloc(len(data), region=1)
        vq.add([Buffer(src, len(data)), Buffer(dst, len(data), True)])
        vq.notify()
        (used,) = vq.wait(1, timeout=10)
        assert mem.read(dst, len(data)) == data


@pytest.mark.parametrize("packed", [False, True])
def test_malformed_ring_breaks_only_its_queue_until_reset(serve, packed, caplog):
    with serve(EchoDevice(num_queues=2)) as (srv, fe):
        mem, vqs = setup(fe, packed=packed, err=True)
        ring = vqs[0].ring
        if packed:
            # an available descriptor (AVAIL=1, USED=0 in lap 1) far outside guest memory
            ring.write_desc(0, 1 << 40, 64, 0, 1 << 7)
        else:
            ring.write_desc(0, 0x1000, 16, 1, 1)         # 0 -> 1 -> 0: a loop
            ring.write_desc(1, 0x1000, 16, 1, 0)
            ring.write_avail(0, 0)
            ring.set_avail_idx(1)
        vqs[0].kick()
        import time
        deadline = time.monotonic() + 5
        errors = 0
        while not errors and time.monotonic() < deadline:
            errors = vqs[0].take_errors()      # the error eventfd fired
            time.sleep(0.01)
        assert errors
        queue = srv.device.session.dataplane.queues[0]
        expected = "ADDR_UNMAPPED" if packed else "CHAIN_LOOP"
        assert queue.broken and expected in queue.error
        # one log line says which queue and why
        lines = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
        assert len(lines) == 1 and "queue 0" in lines[0] and expected in lines[0]
        # the other queue keeps serving
        echo(mem, vqs[1], [b"still here"])
        # a device reset restores the broken queue
        fe.reset()
        mem2, vqs2 = setup(fe, packed=packed)
        echo(mem2, vqs2[0], [b"back again"])


def test_several_queues_share_one_worker_thread(serve):
    device = EchoDevice(num_queues=4)
    device.queues_per_worker = 4
    with serve(device) as (srv, fe):
        mem, vqs = setup(fe, packed=False, queues=4)
        assert len(srv.device.session.dataplane._workers) == 1
        for vq in vqs:
            echo(mem, vq, [b"shared thread"])


def test_refused_memory_table_leaves_running_rings_intact(serve):
    # Found by vhostuser-fuzz: the old table used to be unmapped before the
    # new one was known to be good, leaving rings pointing at nothing.
    import os
    import struct
    from vhostuser import protocol
    from vhostuser.frontend import ReplyError
    with serve(EchoDevice(num_queues=1)) as (srv, fe):
        mem, (vq,) = setup(fe, packed=False, queues=1)
        echo(mem, vq, [b"before"])
        fds = [os.memfd_create("a"), os.memfd_create("b")]
        for fd in fds:
            os.ftruncate(fd, MIB)
        overlapping = protocol.pack_memory_table([
            protocol.MemRegion(0, MIB, 0x7000_0000_0000, 0),
            protocol.MemRegion(MIB // 2, MIB, 0x7100_0000_0000, 0)])
        with pytest.raises(ReplyError):
            fe.request(protocol.Request.SET_MEM_TABLE, overlapping, fds)
        beyond_fd = protocol.pack_memory_table([protocol.MemRegion(0, 4 * MIB, 0x7200_0000_0000, 0)])
        with pytest.raises(ReplyError):
            fe.request(protocol.Request.SET_MEM_TABLE, beyond_fd, fds[:1])
        for fd in fds:
            os.close(fd)
        echo(mem, vq, [b"after"])              # the old table still serves


def test_frontend_setup_waits_for_a_backend_still_starting(tmp_path):
    """Frontend.setup(wait=) retries like Frontend.connect(wait=)."""
    path = str(tmp_path / "late.sock")
    with pytest.raises(FileNotFoundError):
        Frontend.setup(path)
    server = BackgroundServer(EchoDevice(), path)
    timer = threading.Timer(0.3, server.start)
    timer.start()
    try:
        with Frontend.setup(path, queues=1, wait=20) as fe:
            assert set(fe.queues) == {0}
    finally:
        timer.join()
        server.stop()


class GatedEcho(EchoDevice):
    """Echo whose batch blocks while it holds a chain starting with 0xFF,
    until the gate opens (a Python handler stuck in a blocking call)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gate, self.arrived, self.finished = (threading.Event() for _ in range(3))

    def handle_batch(self, queue, elements):
        gated = any(e.read_all()[:1] == b"\xff" for e in elements)
        if gated:
            self.arrived.set()
            self.gate.wait(20)
        super().handle_batch(queue, elements)
        if gated:
            self.finished.set()


@pytest.mark.parametrize("message", ["set_mem_table", "get_vring_base", "reset"])
def test_a_blocked_batch_holds_up_no_front_end_message(serve, message):
    """The worker runs a Python batch without the device lock: messages that
    take it (a memory table, stopping a ring, a reset) are answered while a
    handler blocks, the other queue is served meanwhile, and the blocked
    batch's completion goes where the ring is by then."""
    device = GatedEcho(num_queues=2)
    device.drain_timeout = 0.2
    with serve(device) as (srv, fe):
        mem, vqs = setup(fe, packed=False)
        src, dst = mem.alloc(16), mem.alloc(16)
        mem.write(src, b"\xff" * 16)
        mem.write(dst, bytes(16))
        vqs[0].submit([Buffer(src, 16), Buffer(dst, 16, True)], "gated")
        assert device.arrived.wait(10)
        if message == "set_mem_table":
            fe.set_mem_table(mem)                      # the same table again
        elif message == "get_vring_base":
            fe.get_vring_base(0)
        else:
            fe.reset()
        if message != "reset":
            assert len(echo(mem, vqs[1], [b"other"])) == 1
        device.gate.set()
        assert device.finished.wait(10)
        if message == "set_mem_table":
            assert [u.token for u in vqs[0].wait(1)] == ["gated"]
            assert mem.read(dst, 16) == b"\xff" * 16
            assert len(echo(mem, vqs[0], [b"after"])) == 1
        else:
            # Stopped: the used entry waits for the ring to start again.
            # Reset: the chain is an orphan and its completion only frees it.
            assert vqs[0].poll() == []
        assert srv.error is None


class AnswersThenBlocks(EchoDevice):
    """Completes its batch, then blocks before returning (bookkeeping after
    the answers, a slow log call) until the gate opens."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gate, self.answered, self.finished = (threading.Event() for _ in range(3))

    def handle_batch(self, queue, elements):
        super().handle_batch(queue, elements)
        self.answered.set()
        self.gate.wait(20)
        self.finished.set()


@pytest.mark.parametrize("packed", [False, True])
def test_a_completion_made_before_a_stop_reaches_the_ring(serve, packed):
    """A batch completes a chain and goes on running when GET_VRING_BASE
    stops the ring: the base counts the chain as taken, so its used entry
    must be in the ring the driver resumes from (it was pushed but left for
    the batch's end to publish, and a stopped ring publishes nothing)."""
    device = AnswersThenBlocks(num_queues=1)
    device.drain_timeout = 5
    with serve(device) as (srv, fe):
        mem, (vq,) = setup(fe, packed=packed, queues=1)
        src, dst = mem.alloc(16), mem.alloc(16)
        mem.write(src, b"\xaa" * 16)
        vq.submit([Buffer(src, 16), Buffer(dst, 16, True)], "answered")
        assert device.answered.wait(10)
        base = fe.get_vring_base(0)         # nothing in flight: answered at once
        device.gate.set()
        assert device.finished.wait(10)
        assert [u.token for u in vq.poll()] == ["answered"]
        assert mem.read(dst, 16) == b"\xaa" * 16
        fe.resume_queue(vq, base, mem=mem)
        device.gate.clear()
        device.gate.set()
        assert len(echo(mem, vq, [b"resumed"])) == 1
        assert srv.error is None


class KeepingEcho(EchoDevice):
    """Misuses the API: keeps each element's views past its completion."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.kept = []

    def handle_batch(self, queue, elements):
        for element in elements:
            self.kept.append(element.readable + element.writable)
        super().handle_batch(queue, elements)


def test_a_view_kept_after_its_element_completed_is_released(serve):
    """vhostuser/queue.py: an element's views are the guest's again once it
    completes. One kept longer read and wrote guest memory the guest had
    reused since; it is now released (ValueError)."""
    device = KeepingEcho(num_queues=1)
    with serve(device) as (srv, fe):
        mem, (vq,) = setup(fe, packed=False, queues=1)
        echo(mem, vq, [b"abc" * 100, b"de" * 7])
        assert len(device.kept) == 2
        for views in device.kept:
            assert len(views) == 2
            for v in views:
                with pytest.raises(ValueError):
                    v[:1] = b"x"
                with pytest.raises(ValueError):
                    bytes(v)


class AskingAfterCompleteEcho(EchoDevice):
    """Misuses the API: asks for an element's views after completing it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.errors = []

    def handle_batch(self, queue, elements):
        super().handle_batch(queue, elements)
        for element in elements:
            for name in ("readable", "writable"):
                try:
                    getattr(element, name)
                except ValueError as exc:
                    self.errors.append(str(exc))


def ask_for_views_after_complete(path):
    """Run in a child process (the old code died of a segfault)."""
    device = AskingAfterCompleteEcho(num_queues=1)
    with BackgroundServer(device, path):
        with Frontend.connect(path) as fe:
            mem, (vq,) = setup(fe, packed=False, queues=1)
            echo(mem, vq, [b"abc" * 100, b"de" * 7])
    assert len(device.errors) == 4, device.errors
    assert all("completed" in e for e in device.errors), device.errors
    print("refused")


def test_views_asked_for_after_complete_are_refused(tmp_path):
    """vhostuser/queue.py: readable/writable asked after complete() translated
    the released element's buffers (its mem is NULL by then: a segfault)
    before checking that it had completed. They now raise ValueError."""
    import os
    import subprocess
    import sys
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
              f"import test_generic_device as t; "
              f"t.ask_for_views_after_complete({str(tmp_path / 'dev.sock')!r})")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() == "refused", out.stdout


class BadLengthEcho(EchoDevice):
    """Completes each element with a wrong `written` first, then right."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.errors = []

    def handle_batch(self, queue, elements):
        for element in elements:
            n = element.write(element.read_all())
            for wrong in (-1, 1 << 32, 2.0, "3", None):
                try:
                    element.complete(wrong)
                except (TypeError, ValueError) as exc:
                    self.errors.append(type(exc))
            element.complete(n)


def test_complete_with_a_wrong_length_is_refused_and_leaves_the_element_to_complete(serve):
    """complete(-1) (or a float, a str) raised cffi's OverflowError or
    TypeError after marking the element done: it could never be completed,
    and the guest waited for it for ever. It is now refused before (a
    ValueError or TypeError) and the element completes as usual."""
    device = BadLengthEcho(num_queues=1)
    with serve(device) as (srv, fe):
        mem, (vq,) = setup(fe, packed=False, queues=1)
        assert len(echo(mem, vq, [b"abc" * 100, b"de" * 7])) == 2
    assert device.errors == [ValueError, ValueError, TypeError, TypeError, TypeError] * 2


def lock_while_closing():
    """Run in a child process (the old code died of a segfault)."""
    from vhostuser.dataplane import DataPlane
    dp = DataPlane(1)
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with dp.locked():
            inside.set()
            leave.wait(5)
    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(5)
    closer = threading.Thread(target=dp.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "the device freed while a thread held its lock"
    leave.set()
    closer.join(5)
    holder.join(5)
    assert not closer.is_alive() and not holder.is_alive()
    with dp.locked():       # closed: no worker left, nothing to lock
        pass
    print("excluded")


def test_the_device_lock_and_close_exclude_each_other():
    """vhostuser/dataplane.py: locked() (set_read_only, resize from any
    thread) took the write lock of a device close() freed meanwhile, or
    close() freed it under a thread holding it. close() now waits for a
    locked() block to end, and locked() after close() is a no-op."""
    import os
    import subprocess
    import sys
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
              f"import test_generic_device as t; "
              f"t.lock_while_closing()")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() == "excluded", out.stdout
