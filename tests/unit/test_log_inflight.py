"""Dirty logging (vhost-user.rst "Migration") and inflight tracking
("Inflight I/O tracking", split rings) in the C data plane."""
import mmap
import os
import struct
import time

import pytest

from vhostuser.blk.spec import OUTHDR, BlkStatus, BlkType
from vhostuser.inflight import InflightArea, queue_region_size
from vhostuser.native import ffi, lib
from vhostuser.protocol import Feature, bit
from vhostuser_devkit.ringlab import GPA_BASE, REGION, Lab

PAGE = 4096


def make_log(lab: Lab, size: int):
    fd = os.memfd_create("log")
    os.ftruncate(fd, size)
    assert lib.vu_dev_set_log(lab.dev, fd, size, 0) == 0
    view = mmap.mmap(fd, size)
    os.close(fd)
    return view


def dirty_pages(log) -> set[int]:
    pages = set()
    for i, byte in enumerate(bytes(log)):
        for b in range(8):
            if byte & (1 << b):
                pages.add(i * 8 + b)
    return pages


def test_writes_and_used_ring_are_logged_only_with_log_all():
    lab = Lab(nqueues=1)
    try:
        log = make_log(lab, (GPA_BASE + (16 << 20)) // PAGE // 8)
        buf = GPA_BASE + 5 * PAGE + 100                      # spans pages 5 and 6
        head = lab.add_split_chain(0, [(buf, PAGE, True)])
        lab.publish_split(0, [head])
        rc, e = lab.pop(0)
        lib.vu_vq_push(lab.vq(0), e, PAGE)
        lib.vu_vq_flush(lab.vq(0))
        assert dirty_pages(log) == set()                    # LOG_ALL not negotiated

        lib.vu_dev_set_features(lab.dev, lab.dev.features | bit(Feature.LOG_ALL))
        # the front-end asks for used-ring logging with VHOST_VRING_F_LOG
        used_log_gpa = GPA_BASE + 0x1000
        r = lab.rings[0]
        assert lib.vu_vq_set_addr(lab.vq(0), 1, lab.to_uva(r["desc"]), lab.to_uva(r["used"]),
                                  lab.to_uva(r["avail"]), used_log_gpa) == 0
        head = lab.add_split_chain(0, [(buf, 200, True)])
        lab.publish_split(0, [head])
        rc, e = lab.pop(0)
        lib.vu_vq_push(lab.vq(0), e, 150)    # only what was written is dirty
        lib.vu_vq_flush(lab.vq(0))
        base = GPA_BASE // PAGE
        assert dirty_pages(log) == {base + 5, base + 1}
    finally:
        lab.close()


def test_a_completion_popped_before_a_table_change_is_logged():
    """The buffer's guest address comes from the table it was translated
    with: the table installed since maps the same pages at other host
    addresses, and through it the page would not be marked dirty (a
    migration would miss the data)."""
    lab = Lab(nqueues=1)
    try:
        log = make_log(lab, (GPA_BASE + (16 << 20)) // PAGE // 8)
        lib.vu_dev_set_features(lab.dev, lab.dev.features | bit(Feature.LOG_ALL))
        buf = GPA_BASE + 5 * REGION + 2 * PAGE                # in region 5
        lab.publish_split(0, [lab.add_split_chain(0, [(buf, PAGE, True)])])
        rc, e = lab.pop(0)
        assert rc == 1
        lab.remap_same_pages()
        assert lib.vu_vq_push(lab.vq(0), e, PAGE) == 0
        lib.vu_vq_flush(lab.vq(0))
        assert buf // PAGE in dirty_pages(log)
    finally:
        lab.close()


def reconnect(lab: Lab, area: InflightArea, base: int, ended=()) -> None:
    """The front-end connects again and gives the same inflight area back:
    queue 0 set up afresh, restarted at ``base`` (its used index). What was
    in flight became an orphan; those in ``ended`` end before the start."""
    vq = lab.vq(0)
    lib.vu_vq_reset(vq)
    for e in ended:
        assert lib.vu_vq_push(vq, e, 0) == 0
    assert lib.vu_vq_set_inflight(vq, area.queue_region(0)) == 0
    assert lib.vu_vq_set_num(vq, lab.size) == 0
    r = lab.rings[0]
    assert lib.vu_vq_set_addr(vq, 0, lab.to_uva(r["desc"]), lab.to_uva(r["used"]),
                              lab.to_uva(r["avail"]), 0) == 0
    assert lib.vu_vq_set_base(vq, base) == 0
    assert lib.vu_vq_start(vq) == 0


def start_tracked(lab: Lab, area: InflightArea) -> None:
    """Queue 0 started again, its requests tracked in ``area``."""
    vq = lab.vq(0)
    lib.vu_vq_stop(vq)
    assert lib.vu_vq_set_inflight(vq, area.queue_region(0)) == 0
    lab.start(0)


def split_requests_in_flight(lab: Lab, area: InflightArea, n: int) -> tuple[list, list]:
    """Queue 0 tracked in ``area``; n requests popped. Returns heads, elements."""
    start_tracked(lab, area)
    heads = [lab.add_split_chain(0, [(lab.alloc(8), 8, True)]) for _ in range(n)]
    lab.publish_split(0, heads)
    popped = [lab.pop(0)[1] for _ in range(n)]
    assert [e.id for e in popped] == heads
    return heads, popped


def test_inflight_requests_are_resubmitted_in_order_after_reconnect():
    lab = Lab(nqueues=1, size=16)
    area = InflightArea.create(1, 16)
    try:
        vq = lab.vq(0)
        heads, popped = split_requests_in_flight(lab, area, 4)
        # complete the second one; the back-end then "dies" with 3 in flight
        lib.vu_vq_push(vq, popped[1], 8)
        lib.vu_vq_flush(vq)

        # A new back-end (fresh queue state) gets the same area back, once
        # the old one's requests are over (orphans: their end only releases
        # them; see the next test for those still running).
        reconnect(lab, area, 1, ended=[popped[i] for i in (0, 2, 3)])   # at its used index
        assert vq.resubmit_num == 3
        again = [lab.pop(0)[1].id for _ in range(3)]
        assert again == [heads[0], heads[2], heads[3]]       # oldest first, none twice
        assert lab.pop(0)[0] == 0                             # nothing popped a second time
    finally:
        lab.close()


def test_a_resubmitted_request_waits_until_its_orphan_ends():
    """The front-end reconnects and gives the inflight area back while the
    requests of the session before still run in the back-end (orphans: a
    write stuck on hung storage, an async back-end's coroutine). Run again
    alongside, the old write could land after a newer one the guest made
    once it saw the new copy complete; both copies of a request must never
    run at once. Each resubmitted request is held back until its orphan
    ends, the others go, and new requests from the ring are not held up.
    They all used to be resubmitted at once."""
    lab = Lab(nqueues=1, size=16)
    area = InflightArea.create(1, 16)
    try:
        vq = lab.vq(0)
        heads, popped = split_requests_in_flight(lab, area, 3)
        reconnect(lab, area, 0)
        assert vq.resubmit_num == 3
        assert not lib.vu_vq_has_avail(vq)        # nothing for the worker to spin on
        assert lab.pop(0)[0] == 0
        fresh = lab.add_split_chain(0, [(lab.alloc(8), 8, True)])
        lab.publish_split(0, [fresh])
        rc, e = lab.pop(0)
        assert rc == 1 and e.id == fresh          # the ring goes on meanwhile
        assert lab.pop(0)[0] == 0

        assert lib.vu_vq_push(vq, popped[1], 8) == 0    # its old copy ends
        assert lib.vu_vq_has_avail(vq)
        rc, again = lab.pop(0)
        assert rc == 1 and again.id == heads[1]
        assert lab.pop(0)[0] == 0 and not lib.vu_vq_has_avail(vq)
        for i in (2, 0):
            assert lib.vu_vq_push(vq, popped[i], 8) == 0
        assert [lab.pop(0)[1].id for _ in range(2)] == [heads[0], heads[2]]   # oldest first
        assert lab.pop(0)[0] == 0                   # none twice
    finally:
        lab.close()


@pytest.mark.parametrize("packed", [False, True])
def test_a_resubmitted_request_still_waiting_at_a_stop_is_resubmitted_after_the_restart(packed):
    """A VM stop and cont while a resubmitted request waits for its orphan
    and another one runs (GET_VRING_BASE gave up on it): the restart must
    not forget the waiting one, which was never popped; it used to clear
    the resubmit list whenever requests of the session were still out."""
    lab = Lab(nqueues=1, packed=packed, size=16)
    area = InflightArea.create(1, 16)
    try:
        vq = lab.vq(0)
        start_tracked(lab, area)
        ids = []
        for i in range(2):
            buf = (lab.alloc(8), 8, True)
            if packed:
                lab.add_packed_chain(0, [buf], buf_id=100 + i)
                ids.append(100 + i)
            else:
                ids.append(lab.add_split_chain(0, [buf]))
                lab.publish_split(0, ids[-1:])
        popped = [lab.pop(0)[1] for _ in range(2)]
        reconnect(lab, area, 0x8000 if packed else 0, ended=[popped[1]])
        rc, running = lab.pop(0)
        assert rc == 1 and running.id == ids[1]          # its orphan had ended
        assert lab.pop(0)[0] == 0                         # ids[0] waits
        lib.vu_vq_stop(vq)
        assert lib.vu_vq_set_base(vq, lib.vu_vq_get_base(vq)) == 0
        assert lib.vu_vq_start(vq) == 0                   # same base, same ring
        assert lab.pop(0)[0] == 0                         # still waiting
        assert lib.vu_vq_push(vq, popped[0], 8) == 0      # its orphan ends
        rc, again = lab.pop(0)
        assert rc == 1 and again.id == ids[0]
        assert lib.vu_vq_push(vq, running, 8) == 0
        assert lib.vu_vq_push(vq, again, 8) == 0
        assert lab.pop(0)[0] == 0
    finally:
        lab.close()


def test_the_worker_sleeps_while_a_resubmitted_request_waits_and_wakes_when_it_may_go():
    """The orphan ends on another thread (an async back-end's loop): the
    worker, asleep since nothing on the ring could go, is woken for the
    request resubmitted behind it; no kick would come, as the driver made
    that request available long before. Until then it does not spin."""
    lab = Lab(nqueues=1, size=16)
    area = InflightArea.create(1, 16)
    worker = lib.vu_worker_new(0)
    got = []

    @ffi.callback("int(void *, struct vu_vq *)")
    def handler(ctx, vq):
        before = len(got)
        while (popped := lab.pop(0))[0] == 1:
            got.append(popped[1].id)
        return lib.VU_HANDLED_SOME if len(got) > before else lib.VU_HANDLED_NONE

    try:
        vq = lab.vq(0)
        heads, popped = split_requests_in_flight(lab, area, 1)
        reconnect(lab, area, 0)
        vq.enabled = True
        lib.vu_worker_set_adaptive_poll(worker, 0)
        assert lib.vu_worker_add_queue(worker, vq, handler, ffi.NULL) == 0
        assert lib.vu_worker_start(worker) == 0
        lib.vu_worker_kick(worker, vq)
        time.sleep(0.2)
        asleep = worker.wakeups
        time.sleep(0.2)
        assert worker.wakeups == asleep and got == []
        assert lib.vu_vq_push(vq, popped[0], 8) == 0       # its old copy ends
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == heads
    finally:
        lib.vu_worker_free(worker)
        lab.close()


def thread_cpu_seconds(tid: int) -> float:
    """User and system time thread ``tid`` of this process has used."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("packed", [False, True])
def test_the_worker_sleeps_while_orphans_hold_every_element_and_wakes_when_one_ends(packed):
    """The front-end connects again and makes requests available while the
    requests of the session before still run in the back-end (orphans: a
    write stuck on hung storage) and hold every element of the queue's pool.
    Nothing can be popped until one ends, so the worker must sleep, and the
    orphan's end must wake it, as no kick comes for requests the driver made
    available long before. The ring used to be reported available with no
    element to pop it into, and the worker spun at 100% CPU meanwhile."""
    lab = Lab(nqueues=1, packed=packed, size=16, prepare=lib.vu_blk_prepare_queue)
    blk = lib.vu_blk_new(lib.VU_BLK_BACKEND_RAM)
    assert lib.vu_blk_set_ram(blk, 1 << 20) == 0
    blk.lim.capacity = (1 << 20) // 512
    worker = lib.vu_worker_new(0)
    vq = lab.vq(0)
    try:
        def chain(i, bufs):
            if packed:
                lab.add_packed_chain(0, bufs, buf_id=i)
            else:
                lab.publish_split(0, [lab.add_split_chain(0, bufs)])

        for i in range(lab.size):
            chain(i, [(lab.alloc(8), 8, True)])
        orphans = [lab.pop(0)[1] for _ in range(lab.size)]
        assert all(orphans) and lab.pop(0)[0] == 0
        lib.vu_vq_reset(vq)                       # the session ends, they run on
        base = lab.rings[0]["desc"]
        lab.write(base, bytes(0x2000))            # the new driver's ring, fresh
        lab.rings[0] = lab._ring_layout(0)
        lab.start(0)
        statuses = []
        for i in range(4):
            h = lab.alloc(16)
            lab.write(h, OUTHDR.pack(BlkType.IN, 0, i))
            s = lab.alloc(1)
            lab.write(s, b"\xff")
            statuses.append(s)
            chain(i, [(h, 16, False), (lab.alloc(512), 512, True), (s, 1, True)])

        vq.enabled = True
        lib.vu_worker_set_adaptive_poll(worker, 0)
        assert lib.vu_worker_add_queue(worker, vq, lib.vu_blk_handler, blk) == 0
        before = set(os.listdir("/proc/self/task"))
        assert lib.vu_worker_start(worker) == 0
        tid, = set(os.listdir("/proc/self/task")) - before
        lib.vu_worker_kick(worker, vq)
        time.sleep(0.2)
        cpu, wakeups = thread_cpu_seconds(int(tid)), worker.wakeups
        time.sleep(1)
        spent = thread_cpu_seconds(int(tid)) - cpu
        assert spent < 0.2 and worker.wakeups - wakeups < 10, (spent, worker.wakeups - wakeups)
        assert [lab.read(s, 1) for s in statuses] == [b"\xff"] * 4

        for e in orphans:                         # they end, on another thread
            assert lib.vu_vq_complete_unlocked(vq, e, 0, True) == 0
        deadline = time.monotonic() + 5
        while (any(lab.read(s, 1) == b"\xff" for s in statuses) and
               time.monotonic() < deadline):
            time.sleep(0.01)
        assert [lab.read(s, 1)[0] for s in statuses] == [BlkStatus.OK] * 4
    finally:
        lib.vu_worker_free(worker)
        lab.close()
        lib.vu_blk_free(blk)


def test_a_resubmitted_packed_request_waits_until_its_orphan_ends():
    """As for split rings: a packed request rebuilt from the inflight area
    waits while its previous copy still runs."""
    lab = Lab(nqueues=1, packed=True, size=16)
    area = InflightArea.create(1, 16)
    try:
        vq = lab.vq(0)
        start_tracked(lab, area)
        for i in range(2):
            lab.add_packed_chain(0, [(lab.alloc(8), 8, True)], buf_id=100 + i)
        popped = [lab.pop(0)[1] for _ in range(2)]
        assert [e.id for e in popped] == [100, 101]
        reconnect(lab, area, 0x8000)
        assert vq.resubmit_num == 2
        assert lab.pop(0)[0] == 0 and not lib.vu_vq_has_avail(vq)
        assert lib.vu_vq_push(vq, popped[1], 8) == 0
        rc, again = lab.pop(0)
        assert rc == 1 and again.id == 101
        assert lab.pop(0)[0] == 0
        assert lib.vu_vq_push(vq, popped[0], 8) == 0
        rc, again = lab.pop(0)
        assert rc == 1 and again.id == 100
        assert lab.pop(0)[0] == 0
    finally:
        lab.close()


def test_inflight_region_size_covers_spec_layout():
    # QueueRegionSplit: 16-byte header + 16 bytes per descriptor
    # one size for both layouts: the area is sized before features are known
    assert queue_region_size(256) >= 16 + 16 * 256
    # QueueRegionPacked: 32-byte header + 32 bytes per descriptor
    assert queue_region_size(256) >= 32 + 32 * 256
    hdr = struct.calcsize("<QHHHH")
    assert hdr == 16


def test_packed_base_outside_the_ring_is_refused():
    # Found by the ring_blk fuzz target: an index past the ring was used as is.
    lab = Lab(nqueues=1, packed=True, size=16)
    try:
        vq = lab.vq(0)
        lib.vu_vq_stop(vq)
        assert lib.vu_vq_set_base(vq, 0x3500) == 0       # taken, checked at start
        assert lib.vu_vq_start(vq) == -lib.VU_ERR_BAD_BASE
        assert lib.vu_vq_set_base(vq, 0x8000 | 15) == 0  # last slot, wrap set: fine
        assert lib.vu_vq_start(vq) == 0
    finally:
        lab.close()


def test_packed_inflight_requests_are_resubmitted_in_order_after_reconnect():
    """vhost-user.rst "Inflight I/O tracking", packed layout: the region keeps
    copies of each in-flight chain's descriptors; a new back-end rebuilds the
    chains from them, oldest first, and resumes the ring past them."""
    lab = Lab(nqueues=1, packed=True, size=16)
    area = InflightArea.create(1, 16)
    try:
        vq = lab.vq(0)
        start_tracked(lab, area)
        payloads = [bytes([i + 1]) * (8 + i) for i in range(4)]
        chains = []
        for i, data in enumerate(payloads):
            head = lab.alloc(len(data))
            lab.write(head, data)
            tail = lab.alloc(4)
            # chains of 2 descriptors, and one of 1
            bufs = [(head, len(data), False)] + ([(tail, 4, True)] if i != 1 else [])
            lab.add_packed_chain(0, bufs, buf_id=100 + i)
            chains.append(bufs)
        popped = [lab.pop(0)[1] for _ in range(4)]
        assert [e.id for e in popped] == [100, 101, 102, 103]
        lib.vu_vq_push(vq, popped[1], 0)        # the one-descriptor chain completes
        lib.vu_vq_flush(vq)

        # The back-end dies; a new one gets the region back once the old
        # one's requests are over.
        reconnect(lab, area, 0x8000 | 1, ended=[popped[i] for i in (0, 2, 3)])
        assert vq.resubmit_num == 3
        again = [lab.pop(0)[1] for _ in range(3)]
        assert [e.id for e in again] == [100, 102, 103]           # oldest first
        for e, i in zip(again, (0, 2, 3)):
            assert lab.elem_bytes(e, False) == [payloads[i]]      # rebuilt from the copies
            assert e.in_num == 1 and e.ndescs == 2
        assert lab.pop(0)[0] == 0                                 # none popped twice
        # ... and the ring goes on past them
        for e in again:
            assert lib.vu_vq_push(vq, e, 4) == 0
        lib.vu_vq_flush(vq)
        fresh = lab.alloc(8)
        lab.write(fresh, b"new one!")
        lab.add_packed_chain(0, [(fresh, 8, False)], buf_id=7)
        rc, e = lab.pop(0)
        assert rc == 1 and e.id == 7 and lab.elem_bytes(e, False) == [b"new one!"]
    finally:
        lab.close()


def inflight_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("vhostuser-inflight" in line for line in f)


def test_closing_an_inflight_area_unmaps_it_even_if_its_pointer_is_still_referenced():
    before = inflight_mappings()
    area = InflightArea.create(2, 128)
    assert inflight_mappings() == before + 1
    kept = area._base                  # e.g. a caller that kept the C pointer object
    area.close_mapping()
    assert inflight_mappings() == before
    del kept


def test_an_inflight_mapping_someone_else_exports_is_reported_not_leaked_silently():
    area = InflightArea.create(1, 64)
    view = memoryview(area._map)
    with pytest.raises(BufferError):
        area.close_mapping()
    view.release()
    area.close_mapping()               # once the export is gone, it unmaps
    assert area._map.closed


@pytest.mark.parametrize("packed", [False, True])
def test_a_stop_publishes_completions_pushed_and_not_yet_flushed(packed):
    """A worker may drop the device lock for I/O between pushing a round's
    completions and flushing them; a GET_VRING_BASE meanwhile counts them as
    used, so the stop publishes them (and signals) instead of leaving them
    for a restart to write over."""
    lab = Lab(nqueues=1, packed=packed, size=16)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vq = lab.vq(0)
        vq.call_fd = call
        buf = lab.alloc(8)
        if packed:
            lab.add_packed_chain(0, [(buf, 8, True)], buf_id=3)
        else:
            lab.publish_split(0, [lab.add_split_chain(0, [(buf, 8, True)])])
        rc, e = lab.pop(0)
        assert rc == 1
        assert lib.vu_vq_push(vq, e, 8) == 0
        lib.vu_vq_stop(vq)
        if packed:
            flags = struct.unpack("<H", lab.read(lab.desc_gpa(0, 0) + 14, 2))[0]
            assert flags & 0x8080 == 0x8080          # AVAIL == USED == wrap: used
        else:
            assert [h for h, _ in lab.used_split(0)] == [e.id]
        assert os.eventfd_read(call) == 1
    finally:
        vq.call_fd = -1
        os.close(call)
        lab.close()
