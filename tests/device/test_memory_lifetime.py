"""Guest memory outlives every request that uses it (issue 14, point 1).

An async Python back-end holds a read while the front-end changes what the
request's memory is: the same table again, another table, REM_MEM_REG of the
buffers' region, RESET_DEVICE, a disconnect. With a short drain timeout the
session goes on without the request. Then the back-end answers late (or
never). Nothing may crash (a crash here kills the test process), the late
answer may land only where the guest still expects it (the same table), the
device and a second device go on serving, and the memory the front-end took
back is detached while the request holds it and unmapped once it ends.
"""
import asyncio
import contextlib
import gc
import threading
import time
import typing

import pytest

from vhostuser import protocol
from vhostuser.blk import BlkDevice, BlockBackend, RamBackend
from vhostuser.frontend import BlkClient, Frontend
from vhostuser.frontend.blk import OUTHDR, BlkStatus, BlkType
from vhostuser.frontend.memory import GuestMemory
from vhostuser.frontend.virtqueue import Buffer
from vhostuser.memory import detached_mappings
from vhostuser.native import ffi
from vhostuser.protocol import Request
from vhostuser.testing.server import BackgroundServer

MiB = 1 << 20
LATE = b"L"               # what the late read writes
BUFS_GPA = 16 * MiB        # region 1: the held request's buffers only


class GateBackend(BlockBackend):
    """Reads of sector 0 wait for the gate; everything else is answered at
    once from a bytearray."""

    def __init__(self):
        self.disk = bytearray(4 * MiB)
        self.arrived = threading.Event()
        self.finished = threading.Event()
        self.gate: asyncio.Event | None = None
        self.loop = None

    def size(self):
        return len(self.disk)

    async def read(self, offset, bufs):
        if offset == 0:
            self.loop = asyncio.get_running_loop()
            self.gate = asyncio.Event()
            self.arrived.set()
            try:
                await self.gate.wait()
                self.answer_late(bufs)
            finally:
                self.finished.set()
            return
        self.answer(offset, bufs)

    def answer_late(self, bufs):
        for b in bufs:
            b[:] = LATE * len(b)

    def answer(self, offset, bufs):
        for b in bufs:
            b[:] = self.disk[offset:offset + len(b)]
            offset += len(b)

    def write(self, offset, bufs):
        for b in bufs:
            self.disk[offset:offset + len(b)] = b
            offset += len(b)

    def open_gate(self):
        self.loop.call_soon_threadsafe(self.gate.set)


def mapping_at(address: int) -> str:
    """What /proc/self/maps says is mapped at ``address`` ("" if nothing)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return line.strip()
    return ""


def buffers_mapping(device) -> int:
    """Where the back-end maps region 1 (the held request's buffers)."""
    mem = device.session.dataplane._dev.mem
    for i in range(mem.nregions):
        if mem.regions[i].gpa == BUFS_GPA:
            return int(ffi.cast("uintptr_t", mem.regions[i].host))
    raise AssertionError("region 1 not mapped")


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def other_disk(tmp_path):
    """A second device, served meanwhile: it must not notice anything."""
    device = BlkDevice(RamBackend(4 * MiB))
    path = str(tmp_path / "other.sock")
    with BackgroundServer(device, path):
        with Frontend.connect(path) as fe:
            yield BlkClient.setup(fe)
    device.close()


@contextlib.contextmanager
def gated_device(backend, tmp_path, name: str):
    """A BlkDevice over ``backend`` with a short drain timeout, its socket
    path, the guest memory the held requests use (rings in region 0, their
    buffers in region 1) and a spare region; all closed after."""
    device = BlkDevice(backend)
    device.drain_timeout = 0.2
    mem = GuestMemory([(0, 2 * MiB), (BUFS_GPA, MiB)], name=name)
    spare = GuestMemory([(64 * MiB, MiB)], name="spare")
    try:
        yield device, str(tmp_path / "gate.sock"), mem, spare
    finally:
        device.close()
        mem.close()
        spare.close()


def held_read(blk: BlkClient, mem: GuestMemory, sector: int = 0, token: str = "held",
              notify: bool = True, write: bytes | None = None) -> dict:
    """A read of `sector` (a write of `write` there) whose every buffer lies
    in region 1."""
    hdr = mem.alloc(OUTHDR.size, 16, region=1)
    mem.write(hdr, OUTHDR.pack(BlkType.IN if write is None else BlkType.OUT, 0, sector))
    data = mem.alloc(4096, 512, region=1)
    if write is None:
        mem.fill(data, 4096, 0)
    else:
        mem.write(data, write)
    status = mem.alloc(1, 1, region=1)
    mem.write(status, b"\xff")
    blk.queues[0].add([Buffer(hdr, OUTHDR.size, False), Buffer(data, 4096, write is None),
                       Buffer(status, 1, True)], token)
    if notify:
        blk.queues[0].notify()
    return {"data": data, "status": status}


class Held(typing.NamedTuple):
    device: BlkDevice
    path: str
    mem: GuestMemory
    spare: GuestMemory
    srv: BackgroundServer
    fe: Frontend
    blk: BlkClient
    gpas: dict          # the held request's data and status buffers
    held_at: int        # an address in the back-end's mapping of them


@contextlib.contextmanager
def one_request_held(backend, tmp_path, name: str, write: bytes | None = None,
                     packed: bool = False):
    """gated_device over `backend`, served, with a front-end whose read of
    sector 0 (write of `write`) the back-end holds at its gate."""
    with gated_device(backend, tmp_path, name) as (device, path, mem, spare):
        with BackgroundServer(device, path) as srv, Frontend.connect(path) as fe:
            blk = BlkClient.setup(fe, memory=mem, packed=packed)
            gpas = held_read(blk, mem, write=write)
            assert backend.arrived.wait(10)
            yield Held(device, path, mem, spare, srv, fe, blk, gpas, buffers_mapping(device))


def answer_late(backend, device) -> None:
    """Lets the held request finish, and waits until the device is done
    with its completion."""
    backend.open_gate()
    assert backend.finished.wait(10)
    wait_for(lambda: device._late == 0, what="the late completion")


def assert_untouched(mem: GuestMemory, gpas: dict) -> None:
    """Nothing of the held read's answer reached the guest's buffers."""
    assert mem.read(gpas["status"], 1) == b"\xff"
    assert mem.read(gpas["data"], 4096) == bytes(4096)


def serves_a_new_front_end(path: str) -> None:
    with Frontend.connect(path) as fe:
        blk = BlkClient.setup(fe)
        blk.write(16, b"z" * 512)
        assert blk.read(16, 512) == b"z" * 512


def change(scenario: str, fe: Frontend, mem: GuestMemory, spare: GuestMemory) -> None:
    if scenario == "same-table":
        fe.set_mem_table(mem)
    elif scenario == "other-table":
        # Region 0 (the rings) stays, region 1 (the held buffers) goes, a
        # new region comes.
        regions = [mem.regions[0], spare.regions[0]]
        fe.request(Request.SET_MEM_TABLE,
                   protocol.pack_memory_table([r.to_wire() for r in regions]),
                   [r.fd for r in regions])
    elif scenario == "split-table":
        # The same pages again, region 1 as two regions (QEMU splits and
        # merges sections): still the guest's memory.
        r0, r1 = mem.regions
        w1 = r1.to_wire()
        half = w1.size // 2
        wires = [r0.to_wire(), protocol.MemRegion(w1.gpa, half, w1.uva, w1.mmap_offset),
                 protocol.MemRegion(w1.gpa + half, half, w1.uva + half, w1.mmap_offset + half)]
        fe.request(Request.SET_MEM_TABLE, protocol.pack_memory_table(wires),
                   [r0.fd, r1.fd, r1.fd])
    elif scenario == "rem-mem-reg":
        fe.remove_mem_region(mem, 1)
    elif scenario == "reset":
        fe.reset()
    elif scenario == "disconnect":
        fe.close()
    else:
        raise ValueError(scenario)


SCENARIOS = ["same-table", "split-table", "other-table", "rem-mem-reg", "reset", "disconnect"]
#: the held request's buffers are still the guest's after these
SAME_PAGES = ("same-table", "split-table")


@pytest.mark.parametrize("answer", ["late", "never"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_held_request_survives_memory_change(tmp_path, other_disk, scenario, answer):
    backend = GateBackend()
    detached_before = detached_mappings()
    with one_request_held(backend, tmp_path, "lifetime") as held:
        device, path, mem, spare, srv, fe, blk, gpas, held_at = held
        assert f"/memfd:lifetime@{BUFS_GPA:#x} " in mapping_at(held_at)

        started = time.monotonic()
        change(scenario, fe, mem, spare)
        # Nothing waits for the held request longer than the drain timeout.
        assert time.monotonic() - started < 5
        memfd = f"/memfd:lifetime@{BUFS_GPA:#x} "
        if scenario in SAME_PAGES:
            assert memfd in mapping_at(held_at)
        else:
            # What the front-end took back (or everything, at a reset or
            # disconnect) is detached while the request holds it: the
            # back-end's mapping there no longer reaches the guest's pages.
            wait_for(lambda: memfd not in mapping_at(held_at), what="detach")
            assert mapping_at(held_at), "detached, not unmapped, while still held"
            assert detached_mappings() > detached_before

        if scenario in (*SAME_PAGES, "other-table", "rem-mem-reg"):
            # The new table is in force for new requests at once, with the
            # old request still held: I/O through region 0 (and the new
            # region) works on the same connection.
            blk.write(8, b"n" * 4096)
            assert blk.read(8, 4096) == b"n" * 4096
            if scenario == "other-table":
                fe.memory = None
                req_mem = spare
                data = req_mem.alloc(512, 512)
                hdr = mem.alloc(OUTHDR.size, 16, region=0)
                mem.write(hdr, OUTHDR.pack(BlkType.IN, 0, 8))
                status = mem.alloc(1, 1, region=0)
                mem.write(status, b"\xff")
                blk.queues[0].add([Buffer(hdr, OUTHDR.size, False),
                                   Buffer(data, 512, True), Buffer(status, 1, True)], "new")
                blk.queues[0].notify()
                used = blk.queues[0].wait(1)
                assert [u.token for u in used] == ["new"]
                assert mem.read(status, 1) == b"\0"
                assert spare.read(data, 512) == b"n" * 512

        if answer == "late":
            answer_late(backend, device)
            if scenario in SAME_PAGES:
                # Still the guest's memory and ring: the answer arrives.
                used = blk.queues[0].wait(1)
                assert [u.token for u in used] == ["held"]
                assert mem.read(gpas["status"], 1)[0] == BlkStatus.OK
                assert mem.read(gpas["data"], 4096) == LATE * 4096
            else:
                # Taken back (or reset): nothing of the answer reaches it.
                assert_untouched(mem, gpas)
                if scenario in ("other-table", "rem-mem-reg"):
                    # The ring lives on in region 0: the driver gets its
                    # descriptor back, so nothing waits for it forever.
                    assert [u.token for u in blk.queues[0].wait(1)] == ["held"]
            # Once the request is gone, so is what it kept mapped.
            wait_for(lambda: detached_mappings() <= detached_before, what="unmap")

        # The other device never noticed.
        other_disk.write(0, b"o" * 512)
        assert other_disk.read(0, 512) == b"o" * 512
        if scenario not in ("disconnect",):
            fe.close()
        serves_a_new_front_end(path)
        assert srv.error is None
    # A request never answered was given up at exit: nothing it kept
    # mapped is left behind either.
    gc.collect()
    # (<=: a mapping an earlier test left to the garbage collector may go meanwhile)
    wait_for(lambda: detached_mappings() <= detached_before, what="no leftover mapping")


@pytest.mark.parametrize("packed", [False, True])
def test_completion_while_the_ring_is_stopped_is_published_when_it_restarts(tmp_path, packed):
    """GET_VRING_BASE gives up on the held request after the drain timeout;
    its answer comes while the ring is stopped and is kept until the same
    ring starts again (as QEMU restarts it after a VM stop): published then,
    so the driver, which still waits for it, gets it."""
    backend = GateBackend()
    with one_request_held(backend, tmp_path, "stopped", packed=packed) as held:
        device, path, mem, spare, srv, fe, blk, gpas, held_at = held
        vq = blk.queues[0]
        started = time.monotonic()
        base = fe.get_vring_base(0)
        assert time.monotonic() - started < 5
        answer_late(backend, device)
        time.sleep(0.1)
        assert vq.poll() == []              # stopped: nothing published
        fe.resume_queue(vq, base, mem=mem)
        assert [u.token for u in vq.wait(1)] == ["held"]
        assert mem.read(gpas["status"], 1)[0] == BlkStatus.OK
        assert mem.read(gpas["data"], 4096) == LATE * 4096
        blk.write(8, b"r" * 512)
        assert blk.read(8, 512) == b"r" * 512


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("answer", ["before-restart", "after-restart"])
def test_a_ring_started_over_gets_no_answer_owed_to_the_old_driver(tmp_path, answer, packed):
    """A guest that reboots gets new rings (base 0, new addresses) and QEMU
    sends no RESET_DEVICE. A request GET_VRING_BASE gave up on belongs to
    the old driver: its answer never reaches the new ring (a used entry the
    driver never made available breaks it: Linux marks the device broken).
    One that ends after the new ring started does not reach the buffers the
    new driver may use for something else either. (One that ended while
    the ring was stopped wrote its buffers then, as it must when the same
    ring resumes after a VM stop: nothing could tell the two apart yet.)"""
    backend = GateBackend()
    with one_request_held(backend, tmp_path, "fresh", packed=packed) as held:
        device, path, mem, spare, srv, fe, blk, gpas, held_at = held
        fe.stop_queue(0)                     # gives up after the drain timeout
        if answer == "before-restart":
            answer_late(backend, device)
        vq = fe.setup_queue(0, 128, mem=mem)     # the new driver's ring
        if answer == "after-restart":
            answer_late(backend, device)
        time.sleep(0.2)
        assert vq.poll() == []
        if answer == "after-restart":
            assert_untouched(mem, gpas)
        blk.queues[0] = vq
        blk.write(8, b"r" * 512)            # the new ring serves
        assert blk.read(8, 512) == b"r" * 512
        fe.close()
        serves_a_new_front_end(path)
        assert srv.error is None


class BlockingGateBackend(GateBackend):
    """The same with a plain read(): a read of sector 0 blocks the queue's
    worker thread until the gate opens."""

    def read(self, offset, bufs):
        if offset == 0:
            self.gate = threading.Event()
            self.arrived.set()
            try:
                assert self.gate.wait(60)
                self.answer_late(bufs)
            finally:
                self.finished.set()
            return
        self.answer(offset, bufs)

    def open_gate(self):
        self.gate.set()


@pytest.mark.parametrize("scenario", ["same-table", "other-table", "rem-mem-reg", "reset",
                                      "stop"])
def test_a_blocked_plain_method_holds_up_no_front_end_message(tmp_path, other_disk, scenario):
    """A plain (not async) read() that blocks its worker, as storage that
    stopped answering does: the front-end's messages are answered all the
    same, within the drain timeout (a Python batch runs without the device
    lock the control plane takes). When the read returns, its answer goes
    where a late async one's goes, and the device serves on."""
    backend = BlockingGateBackend()
    with one_request_held(backend, tmp_path, "blocked") as held:
        device, path, mem, spare, srv, fe, blk, gpas, held_at = held
        vq = blk.queues[0]
        started = time.monotonic()
        if scenario == "stop":
            fe.get_vring_base(0)
        else:
            change(scenario, fe, mem, spare)
        assert time.monotonic() - started < 5
        other_disk.write(0, b"o" * 512)              # served meanwhile
        assert other_disk.read(0, 512) == b"o" * 512

        backend.open_gate()
        assert backend.finished.wait(10)
        if scenario == "same-table":
            assert [u.token for u in vq.wait(1)] == ["held"]
            assert mem.read(gpas["status"], 1)[0] == BlkStatus.OK
            assert mem.read(gpas["data"], 4096) == LATE * 4096
        elif scenario in ("other-table", "rem-mem-reg"):
            # The buffers were taken back: the answer reaches only the
            # ring, which lives on in region 0.
            assert [u.token for u in vq.wait(1)] == ["held"]
            assert_untouched(mem, gpas)
        elif scenario == "stop":
            # The buffers are still the guest's; the used entry waits for
            # the ring to start again (as the async case above shows).
            wait_for(lambda: mem.read(gpas["status"], 1)[0] == BlkStatus.OK, what="status")
            assert mem.read(gpas["data"], 4096) == LATE * 4096
            time.sleep(0.1)
            assert vq.poll() == []
        else:
            # Reset: the answer is an orphan's, nothing of it arrives.
            time.sleep(0.1)
            assert vq.poll() == []
            assert_untouched(mem, gpas)
        if scenario in ("same-table", "other-table", "rem-mem-reg"):
            if scenario == "other-table":
                fe.memory = None      # the client's own allocations can't follow
            else:
                blk.write(8, b"n" * 4096)
                assert blk.read(8, 4096) == b"n" * 4096
        fe.close()
        serves_a_new_front_end(path)
        assert srv.error is None


def test_a_batch_running_across_a_table_change_leaves_no_old_mapping_pinned(tmp_path):
    """A Python batch runs without the device lock: the table may change
    between its requests. Views it then makes of the old table's mappings
    (for the requests after the blocked one) serve those requests, and are
    not kept in the view cache, which would pin the old mapping after every
    request using it is gone."""
    backend = BlockingGateBackend()
    device = BlkDevice(backend)
    device.drain_timeout = 0.2
    path = str(tmp_path / "gate.sock")
    mem = GuestMemory([(0, 2 * MiB), (BUFS_GPA, MiB)], name="batchtable")
    detached_before = detached_mappings()
    try:
        with BackgroundServer(device, path):
            with Frontend.connect(path) as fe:
                blk = BlkClient.setup(fe, memory=mem)
                vq = blk.queues[0]
                # Two reads in one batch, buffers in region 1: the first
                # blocks, the second's views are made after it returns.
                held_read(blk, mem, 0, "held", notify=False)
                held_read(blk, mem, 8, "next")
                assert backend.arrived.wait(10)
                fe.remove_mem_region(mem, 1)            # detached while the batch holds it
                assert detached_mappings() > detached_before
                backend.open_gate()
                got = set()
                deadline = time.monotonic() + 10
                while len(got) < 2 and time.monotonic() < deadline:
                    got.update(u.token for u in vq.wait(1))
                assert got == {"held", "next"}          # the ring is in region 0
                gc.collect()
                wait_for(lambda: detached_mappings() <= detached_before,
                         what="the detached mapping unmapped")
                blk.write(16, b"w" * 512)
                assert blk.read(16, 512) == b"w" * 512
    finally:
        device.close()
        mem.close()


class WriteGateBackend(GateBackend):
    """Writes of sector 0 wait for the gate, then store what their buffers
    hold by then."""

    async def write(self, offset, bufs):
        if offset != 0:
            GateBackend.write(self, offset, bufs)
            return
        self.loop = asyncio.get_running_loop()
        self.gate = asyncio.Event()
        self.arrived.set()
        try:
            await self.gate.wait()
            GateBackend.write(self, offset, bufs)
        finally:
            self.finished.set()


@pytest.mark.parametrize("resent", [False, True], ids=["", "after-resent-table"])
@pytest.mark.parametrize("scenario", ["other-table", "rem-mem-reg", "reset", "disconnect"])
def test_a_late_write_stores_the_guests_data_after_its_memory_is_detached(tmp_path, scenario,
                                                                         resent):
    """A write still under way when the front-end takes its memory back (or
    the session gives up on it) stores the data the guest gave it: the
    private pages that replace the guest's hold a copy of what requests in
    flight read, not zeroes, and what the guest puts in its pages afterwards
    does not reach the write either. Also when the table was re-sent
    unchanged in between (QEMU does it routinely): the write then holds the
    table before, which shares its mappings with the one retired."""
    backend = WriteGateBackend()
    with one_request_held(backend, tmp_path, "latewrite", write=b"W" * 4096) as held:
        device, path, mem, spare, srv, fe, blk, gpas, held_at = held
        if resent:
            change("same-table", fe, mem, spare)
        change(scenario, fe, mem, spare)
        memfd = f"/memfd:latewrite@{BUFS_GPA:#x} "
        wait_for(lambda: memfd not in mapping_at(held_at), what="detach")
        mem.write(gpas["data"], b"G" * 4096)  # the guest's page, reused: not the write's
        backend.open_gate()
        assert backend.finished.wait(10)
        assert bytes(backend.disk[:4096]) == b"W" * 4096
        if scenario != "disconnect":
            fe.close()
        serves_a_new_front_end(path)
        assert srv.error is None


@pytest.mark.parametrize("end", ["reset", "disconnect"])
@pytest.mark.parametrize("resend", SAME_PAGES)
def test_giving_up_detaches_an_orphan_popped_before_the_table_was_resent(tmp_path, resend,
                                                                         end):
    """A request popped before the front-end re-sent its table (the same
    pages, maybe split into other regions) holds the table before, which
    still reaches the guest's pages. A reset or a disconnect that gives up
    on it must detach them all the same: nothing of its late answer may
    reach the guest's buffers after that."""
    backend = GateBackend()
    with one_request_held(backend, tmp_path, "resent") as held:
        device, path, mem, spare, srv, fe, blk, gpas, held_at = held
        change(resend, fe, mem, spare)
        change(end, fe, mem, spare)     # given up on: an orphan now
        memfd = f"/memfd:resent@{BUFS_GPA:#x} "
        wait_for(lambda: memfd not in mapping_at(held_at), what="detach")
        answer_late(backend, device)
        assert_untouched(mem, gpas)
        if end != "disconnect":
            fe.close()
        serves_a_new_front_end(path)
        assert srv.error is None
