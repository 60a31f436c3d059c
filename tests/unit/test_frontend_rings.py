"""The front-end's driver-side rings, checked byte for byte against the
virtio 1.4 layouts without any back-end.

The fake devices below read and write guest memory with offsets typed in
from the spec, not taken from vhostuser.frontend, so the two cross-check.
"""
from __future__ import annotations

import os
import struct

import pytest

from vhostuser.frontend import (Buffer, GuestMemory, PackedRing, RingFull, RingProtocolError,
                                SplitRing, Virtqueue)
from vhostuser.protocol import need_event, pack_packed_vring_base, unpack_packed_vring_base

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
DESC = struct.Struct("<QIHH")


@pytest.fixture
def mem():
    with GuestMemory([(0, 1 << 20), (1 << 20, 1 << 20)]) as m:
        yield m


def u16(mem, gpa):
    return struct.unpack("<H", mem.read(gpa, 2))[0]


def put16(mem, gpa, value):
    mem.write(gpa, struct.pack("<H", value & 0xFFFF))


# ---- a spec-typed fake split device ------------------------------------------

class SplitDevice:
    def __init__(self, mem, ring):
        self.mem, self.ring, self.n = mem, ring, ring.size
        self.last_avail = self.used_idx = u16(mem, ring.used_gpa + 2)

    def table(self, addr, count):
        return [DESC.unpack(self.mem.read(addr + 16 * i, 16)) for i in range(count)]

    def pop(self):
        """(head, [(addr, len, writable)]) or None; follows NEXT and INDIRECT."""
        if u16(self.mem, self.ring.avail_gpa + 2) == self.last_avail:
            return None
        head = u16(self.mem, self.ring.avail_gpa + 4 + 2 * (self.last_avail % self.n))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        table, i, out = self.table(self.ring.desc_gpa, self.n), head, []
        addr, length, flags, nxt = table[i]
        if flags & INDIRECT:
            table, i = self.table(addr, length // 16), 0
        while True:
            addr, length, flags, nxt = table[i]
            out.append((addr, length, bool(flags & WRITE)))
            if not flags & NEXT:
                return head, out
            i = nxt

    def push(self, head, written):
        self.mem.write(self.ring.used_gpa + 4 + 8 * (self.used_idx % self.n),
                       struct.pack("<II", head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        put16(self.mem, self.ring.used_gpa + 2, self.used_idx)


# ---- a spec-typed fake packed device -------------------------------------------

class PackedDevice:
    def __init__(self, mem, ring):
        self.mem, self.ring, self.n = mem, ring, ring.size
        self.avail_slot, self.avail_wrap = 0, True
        self.used_slot, self.used_wrap = 0, True

    def desc(self, slot):
        """(addr, len, id, flags)"""
        return DESC.unpack(self.mem.read(self.ring.desc_gpa + 16 * slot, 16))

    def pop(self):
        """(id, [(addr, len, writable)], descriptors used) or None."""
        addr, length, ident, flags = self.desc(self.avail_slot)
        if bool(flags & AVAIL) != self.avail_wrap or bool(flags & USED) == self.avail_wrap:
            return None
        out, count = [], 0
        while True:
            addr, length, ident, flags = self.desc(self.avail_slot)
            count += 1
            self.avail_slot += 1
            if self.avail_slot == self.n:
                self.avail_slot, self.avail_wrap = 0, not self.avail_wrap
            if flags & INDIRECT:
                for i in range(length // 16):
                    a, ln, _, f = DESC.unpack(self.mem.read(addr + 16 * i, 16))
                    out.append((a, ln, bool(f & WRITE)))
            else:
                out.append((addr, length, bool(flags & WRITE)))
            if not flags & NEXT:
                return ident, out, count

    def push(self, ident, written, count):
        flags = (AVAIL | USED if self.used_wrap else 0) | (WRITE if written else 0)
        self.mem.write(self.ring.desc_gpa + 16 * self.used_slot,
                       DESC.pack(0, written, ident, flags))
        self.used_slot += count
        if self.used_slot >= self.n:
            self.used_slot, self.used_wrap = self.used_slot - self.n, not self.used_wrap


# ---- split ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 3, 16, 256])
def test_split_parts_are_aligned_sized_and_disjoint(mem, size):
    ring = SplitRing(mem, size, event_idx=True)
    assert ring.desc_gpa % 16 == 0 and ring.avail_gpa % 2 == 0 and ring.used_gpa % 4 == 0
    parts = sorted([(ring.desc_gpa, 16 * size), (ring.avail_gpa, 6 + 2 * size),
                    (ring.used_gpa, 6 + 8 * size)])
    for (a, alen), (b, _) in zip(parts, parts[1:]):
        assert a + alen <= b
    assert (ring.driver_gpa, ring.device_gpa) == (ring.avail_gpa, ring.used_gpa)
    # used_event follows avail->ring[size]; avail_event follows used->ring[size].
    ring.set_used_event(0x1234)
    assert u16(mem, ring.avail_gpa + 4 + 2 * size) == 0x1234
    put16(mem, ring.used_gpa + 4 + 8 * size, 0x4321)
    assert ring.read_avail_event() == 0x4321


def test_split_chain_is_invisible_until_published(mem):
    ring = SplitRing(mem, 8)
    head = ring.add([(0x1000, 16), (0x2000, 512, True), Buffer(0x3000, 1, True)], "tok")
    assert head == 0
    assert [ring.read_desc(i) for i in range(3)] == [
        (0x1000, 16, NEXT, 1), (0x2000, 512, NEXT | WRITE, 2), (0x3000, 1, WRITE, 0)]
    assert u16(mem, ring.avail_gpa + 4) == head
    assert u16(mem, ring.avail_gpa + 2) == 0          # avail->idx not yet moved
    assert ring.publish() == 1
    assert u16(mem, ring.avail_gpa + 2) == 1
    assert ring.num_free == 5 and ring.in_flight == 1


def test_split_indirect_chain_uses_one_descriptor(mem):
    ring = SplitRing(mem, 8, indirect_entries=4)
    head = ring.add([(0x1000, 16), (0x2000, 512, True), (0x3000, 1, True)], indirect=True)
    addr, length, flags, _ = ring.read_desc(head)
    assert flags == INDIRECT and length == 3 * 16
    table = [DESC.unpack(mem.read(addr + 16 * i, 16)) for i in range(3)]
    assert table == [(0x1000, 16, NEXT, 1), (0x2000, 512, NEXT | WRITE, 2), (0x3000, 1, WRITE, 0)]
    assert ring.num_free == 7


def test_split_indirect_table_longer_than_reserved_is_allocated(mem):
    ring = SplitRing(mem, 4, indirect_entries=2)
    head = ring.add([(0x1000 * i, 8) for i in range(1, 6)], indirect=True)
    ring.publish()
    dev = SplitDevice(mem, ring)
    assert dev.pop() == (head, [(0x1000 * i, 8, False) for i in range(1, 6)])


def test_split_completions_out_of_order_free_descriptors(mem):
    ring = SplitRing(mem, 4)
    dev = SplitDevice(mem, ring)
    a = ring.add([(0x1000, 8), (0x2000, 8, True)], "a")
    b = ring.add([(0x3000, 8, True)], "b")
    ring.publish()
    assert ring.num_free == 1
    with pytest.raises(RingFull):
        ring.add([(0x4000, 8), (0x5000, 8)])
    popped = [dev.pop(), dev.pop()]
    assert [p[0] for p in popped] == [a, b] and dev.pop() is None
    dev.push(b, 8)
    dev.push(a, 5)
    done = ring.collect()
    assert [(u.id, u.length, u.token) for u in done] == [(b, 8, "b"), (a, 5, "a")]
    assert ring.num_free == 4 and ring.in_flight == 0
    assert ring.collect() == []


def test_split_indices_wrap_at_u16(mem):
    ring = SplitRing(mem, 4, base=0xFFFE)
    dev = SplitDevice(mem, ring)
    assert ring.base == 0xFFFE
    for i in range(6):
        ring.add([(0x1000 + i, 1, True)], i)
        ring.publish()
        head, bufs = dev.pop()
        assert bufs == [(0x1000 + i, 1, True)]
        dev.push(head, 1)
        assert [u.token for u in ring.collect()] == [i]
    assert ring.base == ring.last_used_idx == 4
    assert u16(mem, ring.avail_gpa + 2) == 4


def test_split_kicks_follow_avail_event(mem):
    ring = SplitRing(mem, 8, event_idx=True)
    avail_event = ring.used_gpa + 4 + 8 * 8
    for i in range(3):
        ring.add([(0x1000, 1)])
    ring.publish()
    put16(mem, avail_event, 1)            # the device wants a kick once idx passes 1
    assert ring.needs_kick()
    assert not ring.needs_kick()          # nothing new since
    ring.add([(0x1000, 1)])
    ring.publish()
    assert not ring.needs_kick()          # 3 -> 4 does not cross 1
    put16(mem, avail_event, 4)
    ring.add([(0x1000, 1)])
    ring.publish()
    assert ring.needs_kick()              # 4 -> 5 crosses 4


def test_split_kicks_follow_no_notify_without_event_idx(mem):
    ring = SplitRing(mem, 8)
    ring.add([(0x1000, 1)])
    ring.publish()
    put16(mem, ring.used_gpa, 1)          # USED_F_NO_NOTIFY
    assert not ring.needs_kick()
    put16(mem, ring.used_gpa, 0)
    ring.add([(0x1000, 1)])
    ring.publish()
    assert ring.needs_kick()


def test_split_notification_controls(mem):
    plain, evt = SplitRing(mem, 8), SplitRing(mem, 8, event_idx=True)
    plain.disable_notifications()
    assert u16(mem, plain.avail_gpa) == 1              # VRING_AVAIL_F_NO_INTERRUPT
    plain.enable_notifications()
    assert u16(mem, plain.avail_gpa) == 0
    dev = SplitDevice(mem, evt)
    evt.add([(0x1000, 1)])
    evt.publish()
    dev.push(dev.pop()[0], 0)
    evt.collect()
    used_event = evt.avail_gpa + 4 + 2 * 8
    assert u16(mem, used_event) == 1                    # call me for used idx 1 on
    evt.disable_notifications()
    # Parked one behind: no crossing until the index has gone all the way round.
    assert u16(mem, used_event) == 0
    assert not any(need_event(0, 1 + k, 1) for k in range(1, 1000))


def test_split_rejects_a_used_id_not_in_flight(mem):
    ring = SplitRing(mem, 4)
    dev = SplitDevice(mem, ring)
    ring.add([(0x1000, 1)])
    ring.publish()
    dev.push(3, 0)
    with pytest.raises(RingProtocolError):
        ring.collect()


def test_split_rejects_a_used_idx_beyond_the_ring(mem):
    ring = SplitRing(mem, 4)
    put16(mem, ring.used_gpa + 2, 9)
    with pytest.raises(RingProtocolError):
        ring.collect()


def test_chains_must_put_readable_buffers_first(mem):
    ring = SplitRing(mem, 4)
    with pytest.raises(ValueError):
        ring.add([(0x1000, 1, True), (0x2000, 1, False)])
    with pytest.raises(ValueError):
        ring.add([])


# ---- packed -----------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 5, 256])
def test_packed_parts_are_aligned_and_sized(mem, size):
    ring = PackedRing(mem, size)
    assert ring.desc_gpa % 16 == 0 and ring.driver_gpa % 4 == 0 and ring.device_gpa % 4 == 0
    parts = sorted([(ring.desc_gpa, 16 * size), (ring.driver_gpa, 4), (ring.device_gpa, 4)])
    for (a, alen), (b, _) in zip(parts, parts[1:]):
        assert a + alen <= b
    assert ring.base == 0x8000                     # slot 0, wrap counter 1


def test_packed_head_flags_are_written_last(mem):
    ring = PackedRing(mem, 8)
    ident = ring.add([(0x1000, 16), (0x2000, 512, True), (0x3000, 1, True)], "tok")
    slots = [ring.read_desc(i) for i in range(3)]
    assert slots[0][3] == 0                        # head not yet available
    assert slots[1] == (0x2000, 512, ident, AVAIL | NEXT | WRITE)
    assert slots[2] == (0x3000, 1, ident, AVAIL | WRITE)
    ring.publish()
    assert ring.read_desc(0) == (0x1000, 16, ident, AVAIL | NEXT)


def test_packed_wrap_flips_avail_and_used_bits(mem):
    ring = PackedRing(mem, 4)
    dev = PackedDevice(mem, ring)
    first = ring.add([(0x1000, 8), (0x2000, 8, True), (0x3000, 1, True)], "first")
    ring.publish()
    got = dev.pop()
    dev.push(got[0], 9, got[2])
    assert [u.token for u in ring.collect()] == ["first"]
    second = ring.add([(0x4000, 8), (0x5000, 8, True), (0x6000, 1, True)], "second")
    ring.publish()
    # Slot 3 is still on the first lap; slots 0 and 1 are on the second.
    assert ring.read_desc(3)[3] == AVAIL | NEXT
    assert ring.read_desc(0)[3] == USED | NEXT | WRITE
    assert ring.read_desc(1)[3] == USED | WRITE
    assert ring.base == pack_packed_vring_base(2, False)
    ident, bufs, count = dev.pop()
    assert (ident, count) == (second, 3)
    assert bufs == [(0x4000, 8, False), (0x5000, 8, True), (0x6000, 1, True)]
    dev.push(ident, 9, count)
    done = ring.collect()
    assert [(u.id, u.length, u.token) for u in done] == [(second, 9, "second")]
    assert (ring.next_used, ring.used_wrap) == (2, False)
    assert first in (0, 1) and ring.num_free == 4


def test_packed_out_of_order_completions_skip_by_chain_length(mem):
    ring = PackedRing(mem, 8)
    dev = PackedDevice(mem, ring)
    a = ring.add([(0x1000, 8), (0x2000, 8, True)], "a")        # 2 descriptors
    b = ring.add([(0x3000, 8, True)], "b")                      # 1 descriptor
    ring.publish()
    pa, pb = dev.pop(), dev.pop()
    assert (pa[0], pb[0]) == (a, b)
    # The device completes b first: its used descriptor lands in a's first
    # slot, and the driver skips by b's length (1) to find a's.
    dev.push(b, 8, pb[2])
    dev.push(a, 8, pa[2])
    assert [u.token for u in ring.collect()] == ["b", "a"]
    assert (ring.next_used, ring.num_free) == (3, 8)


def test_packed_indirect_is_one_descriptor_with_a_table(mem):
    ring = PackedRing(mem, 4, indirect_entries=4)
    ident = ring.add([(0x1000, 16), (0x2000, 64, True)], indirect=True)
    ring.publish()
    addr, length, got_id, flags = ring.read_desc(0)
    assert (length, got_id, flags) == (32, ident, AVAIL | INDIRECT)
    table = [DESC.unpack(mem.read(addr + 16 * i, 16)) for i in range(2)]
    assert table == [(0x1000, 16, 0, 0), (0x2000, 64, 0, WRITE)]
    assert ring.num_free == 3


def test_packed_batch_head_of_first_chain_published_last(mem):
    ring = PackedRing(mem, 8)
    writes = []
    original = ring.write_desc_flags
    ring.write_desc_flags = lambda slot, flags: (writes.append(slot), original(slot, flags))
    ring.add([(0x1000, 1)])
    ring.add([(0x2000, 1), (0x3000, 1)])
    ring.publish()
    assert writes == [1, 0]


def test_packed_notification_controls(mem):
    plain, evt = PackedRing(mem, 8), PackedRing(mem, 8, event_idx=True)
    plain.disable_notifications()
    assert struct.unpack("<HH", mem.read(plain.driver_gpa, 4)) == (0, 1)     # DISABLE
    plain.enable_notifications()
    assert struct.unpack("<HH", mem.read(plain.driver_gpa, 4)) == (0, 0)     # ENABLE
    evt.enable_notifications()
    assert struct.unpack("<HH", mem.read(evt.driver_gpa, 4)) == (0x8000, 2)  # DESC, slot 0, wrap 1


def test_packed_kicks_follow_device_event_suppression(mem):
    ring = PackedRing(mem, 4, event_idx=True)
    def device_event(off_wrap, flags):
        mem.write(ring.device_gpa, struct.pack("<HH", off_wrap, flags))
    device_event(0, 1)                                     # DISABLE
    ring.add([(0x1000, 1)])
    ring.publish()
    assert not ring.needs_kick()
    device_event(0, 0)                                     # ENABLE
    ring.add([(0x1000, 1)])
    ring.publish()
    assert ring.needs_kick()
    assert not ring.needs_kick()
    # DESC: kick once slot 3 on the wrap-1 lap is made available.
    device_event(pack_packed_vring_base(3, True), 2)
    ring.add([(0x1000, 1)])                                # slot 2
    ring.publish()
    assert not ring.needs_kick()
    ring.add([(0x1000, 1)])                                # slot 3
    ring.publish()
    assert ring.needs_kick()


def test_packed_rejects_a_used_id_not_in_flight(mem):
    ring = PackedRing(mem, 4)
    ring.add([(0x1000, 1)])
    ring.publish()
    mem.write(ring.desc_gpa, DESC.pack(0, 0, 3, AVAIL | USED))
    with pytest.raises(RingProtocolError):
        ring.collect()


def test_packed_resumes_from_a_base(mem):
    ring = PackedRing(mem, 4, base=pack_packed_vring_base(3, False))
    ring.add([(0x1000, 1), (0x2000, 1)])
    ring.publish()
    assert ring.read_desc(3)[3] == USED | NEXT            # lap with wrap 0
    assert ring.read_desc(0)[3] == AVAIL                  # wrapped: wrap 1 again
    assert unpack_packed_vring_base(ring.base) == (1, True)
    with pytest.raises(ValueError):
        PackedRing(mem, 4, base=pack_packed_vring_base(4, True))


def test_wait_sleeps_only_after_a_recheck_that_found_nothing(mem):
    """A device (libvhost-user's) that completes a chain just after the
    driver read used->idx checks it against the used_event of before: no
    call. The driver's collect then moves used_event past what it took, so
    it must look at the ring once more before it sleeps (qemu-storage-daemon
    left 2 of 8 completions uncalled that way, a CI run at a609947)."""
    ring = SplitRing(mem, 8, event_idx=True)
    vq = Virtqueue(0, ring)
    dev = SplitDevice(mem, ring)
    for _ in range(3):
        ring.add([(0x1000, 1)])
    ring.publish()
    heads = [dev.pop()[0] for _ in range(3)]
    used_event = ring.avail_gpa + 4 + 2 * 8
    signalled = [0]

    def complete(head):
        dev.push(head, 0)
        old, signalled[0] = signalled[0], dev.used_idx
        if need_event(u16(mem, used_event), dev.used_idx, old):
            os.eventfd_write(vq.call_fd, 1)

    complete(heads[0])
    assert vq.take_calls() == 1         # that call is taken; none is pending
    later, seen, read_used_idx = heads[1:], set(), ring.read_used_idx

    def read_then_device_completes():
        value = read_used_idx()
        if later and value not in seen:
            seen.add(value)
            complete(later.pop(0))
        return value
    ring.read_used_idx = read_then_device_completes
    try:
        assert [u.id for u in vq.wait(3, timeout=2)] == heads
    finally:
        vq.close()


# ---- memory ordering -----------------------------------------------------------
# Each side stores its index and then loads the other side's event; x86 lets
# that load pass the store, and then both sides can read the other's old
# value and sleep (the device waiting for a kick, the driver for a call).
# A stress run cannot make that lose deterministically, so these check that
# a full barrier sits between each such store and load.

def _record_accesses(monkeypatch, ring, module, accessors):
    """Logs the ring's ``accessors`` calls and the module's barriers, in order."""
    log = []
    monkeypatch.setattr(module, "memory_barrier", lambda: log.append("fence"))
    for name in accessors:
        method = getattr(ring, name)

        def logged(*args, _name=name, _method=method):
            log.append(_name)
            return _method(*args)
        monkeypatch.setattr(ring, name, logged)
    return log


def _fence_between(log, store, load):
    first_load = log.index(load)
    last_store = max(i for i, name in enumerate(log[:first_load]) if name == store)
    return "fence" in log[last_store + 1:first_load]


@pytest.mark.parametrize("event_idx", [False, True])
def test_split_fences_between_index_stores_and_event_loads(mem, monkeypatch, event_idx):
    from vhostuser.frontend import split
    ring = SplitRing(mem, 8, event_idx=event_idx)
    kick_check = "read_avail_event" if event_idx else "read_used_flags"
    call_ask = "set_used_event" if event_idx else "set_avail_flags"
    log = _record_accesses(monkeypatch, ring, split,
                           ["set_avail_idx", kick_check, call_ask, "read_used_idx",
                            "read_used_elem"])
    dev = SplitDevice(mem, ring)
    ring.add([(0x1000, 1)])
    ring.publish()
    ring.needs_kick()
    assert _fence_between(log, "set_avail_idx", kick_check)
    log.clear()
    ring.enable_notifications()
    dev.push(dev.pop()[0], 0)
    assert len(ring.collect()) == 1
    assert _fence_between(log, call_ask, "read_used_idx")
    assert _fence_between(log, "read_used_idx", "read_used_elem")


@pytest.mark.parametrize("event_idx", [False, True])
def test_packed_fences_between_flag_stores_and_event_loads(mem, monkeypatch, event_idx):
    from vhostuser.frontend import packed
    ring = PackedRing(mem, 8, event_idx=event_idx)
    log = _record_accesses(monkeypatch, ring, packed,
                           ["write_desc", "write_desc_flags", "read_device_event",
                            "write_driver_event", "read_desc"])
    ring.add([(0x1000, 1)])
    ring.publish()
    ring.needs_kick()
    assert _fence_between(log, "write_desc", "write_desc_flags")
    assert _fence_between(log, "write_desc_flags", "read_device_event")
    log.clear()
    ring.enable_notifications()
    ring.collect()
    assert _fence_between(log, "write_driver_event", "read_desc")
