"""The driver side of a split virtqueue (virtio 1.4, 2.7), in guest memory.

Layout, each part allocated separately with its own alignment:
descriptor table (16 bytes per entry), available ring (flags, idx,
ring[size], used_event), used ring (flags, idx, ring[size] of (id, len),
avail_event).
"""
from __future__ import annotations

from ..protocol import (AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
                        RING_U16, SPLIT_AVAIL_ALIGN, SPLIT_DESC, SPLIT_DESC_ALIGN,
                        SPLIT_USED_ALIGN, USED_ELEM, USED_F_NO_NOTIFY, need_event,
                        split_avail_size, split_used_size)
from .memory import GuestMemory, memory_barrier, store16
from .virtqueue import DriverRing, RingFull, RingProtocolError, Used, as_buffers

# Byte offsets inside the avail and used rings.
FLAGS_OFF, IDX_OFF, RING_OFF = 0, 2, 4


def avail_entry_off(slot: int) -> int:
    return RING_OFF + 2 * slot


def used_elem_off(slot: int) -> int:
    return RING_OFF + USED_ELEM.size * slot


def used_event_off(size: int) -> int:
    """used_event sits after the avail ring's entries."""
    return avail_entry_off(size)


def avail_event_off(size: int) -> int:
    """avail_event sits after the used ring's elements."""
    return used_elem_off(size)


class SplitRing(DriverRing):
    """A split ring the front-end drives: chains in, used elements out.

    Besides the well-behaved ``add``/``publish``/``collect`` there are raw
    writers (``write_desc``, ``write_avail``, ``set_avail_idx``, ...) that
    touch guest memory only, for tests that want rings no driver would write.
    """
    packed = False

    def __init__(self, mem: GuestMemory, size: int, *, event_idx: bool = False,
                 base: int | None = None, indirect_entries: int = 0):
        """``base`` starts the indices there instead of 0 (as after a
        SET_VRING_BASE that resumes a ring)."""
        super().__init__(mem, size, event_idx=event_idx, indirect_entries=indirect_entries)
        self.desc_gpa = mem.alloc(SPLIT_DESC.size * size, SPLIT_DESC_ALIGN)
        self.driver_gpa = self.avail_gpa = mem.alloc(split_avail_size(size), SPLIT_AVAIL_ALIGN)
        self.device_gpa = self.used_gpa = mem.alloc(split_used_size(size), SPLIT_USED_ALIGN)
        self._desc = mem.locate(self.desc_gpa, SPLIT_DESC.size * size)
        self._avail = mem.locate(self.avail_gpa, split_avail_size(size))
        self._used = mem.locate(self.used_gpa, split_used_size(size))
        self._zero(self.desc_gpa, SPLIT_DESC.size * size)
        self._zero(self.avail_gpa, split_avail_size(size))
        self._zero(self.used_gpa, split_used_size(size))

        self._free = list(range(size - 1, -1, -1))    # a stack: pop() gives 0 first
        self._chains: dict[int, tuple[list[int], object]] = {}  # head -> (descs, token)
        start = (base or 0) & 0xFFFF
        self.avail_idx = start      # next avail idx (free-running u16), maybe unpublished
        self.published_idx = start  # what the device can see
        self.kicked_idx = start     # published_idx at the last kick decision
        self.last_used_idx = start  # next used element to collect
        if start:
            # What memory would hold had the device consumed and used
            # everything up to ``start``: otherwise avail_event 0 would ask
            # for no kick until the indices wrap.
            self.set_avail_idx(start)
            self._put16(self._used, IDX_OFF, start)
            self._put16(self._used, avail_event_off(size), start)
        self._notifications = True

    @property
    def base(self) -> int:
        return self.avail_idx

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    # -- raw access ----------------------------------------------------------------
    def _put16(self, area, off: int, value: int) -> None:
        mm, base = area
        store16(mm, base + off, value)

    def _get16(self, area, off: int) -> int:
        mm, base = area
        return RING_U16.unpack_from(mm, base + off)[0]

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        mm, base = self._desc
        SPLIT_DESC.pack_into(mm, base + SPLIT_DESC.size * index, addr, length, flags, next)

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        mm, base = self._desc
        return SPLIT_DESC.unpack_from(mm, base + SPLIT_DESC.size * index)

    def write_avail(self, slot: int, head: int) -> None:
        """avail->ring[slot] = head (slot is taken modulo the size)."""
        self._put16(self._avail, avail_entry_off(slot % self.size), head)

    def set_avail_idx(self, value: int) -> None:
        self._put16(self._avail, IDX_OFF, value)

    def set_avail_flags(self, value: int) -> None:
        self._put16(self._avail, FLAGS_OFF, value)

    def set_used_event(self, value: int) -> None:
        self._put16(self._avail, used_event_off(self.size), value)

    def read_used_idx(self) -> int:
        return self._get16(self._used, IDX_OFF)

    def read_used_flags(self) -> int:
        return self._get16(self._used, FLAGS_OFF)

    def read_used_elem(self, slot: int) -> tuple[int, int]:
        mm, base = self._used
        return USED_ELEM.unpack_from(mm, base + used_elem_off(slot % self.size))

    def read_avail_event(self) -> int:
        return self._get16(self._used, avail_event_off(self.size))

    # -- the driver ------------------------------------------------------------------
    def add(self, buffers, token=None, *, indirect: bool = False) -> int:
        """Writes a chain (direct, or as one indirect descriptor) and queues
        its head in the avail ring; invisible to the device until ``publish``."""
        bufs = as_buffers(buffers)
        need = 1 if indirect else len(bufs)
        if need > len(self._free):
            raise RingFull(f"chain of {need} descriptors, {len(self._free)} free")
        descs = [self._free.pop() for _ in range(need)]
        if indirect:
            table = self._indirect_table(descs[0], len(bufs))
            entries = b"".join(
                SPLIT_DESC.pack(b.gpa, b.length,
                                (DESC_F_WRITE if b.writable else 0)
                                | (DESC_F_NEXT if i + 1 < len(bufs) else 0),
                                i + 1 if i + 1 < len(bufs) else 0)
                for i, b in enumerate(bufs))
            self.mem.write(table, entries)
            self.write_desc(descs[0], table, len(entries), DESC_F_INDIRECT, 0)
        else:
            for i, b in enumerate(bufs):
                last = i + 1 == len(bufs)
                flags = (DESC_F_WRITE if b.writable else 0) | (0 if last else DESC_F_NEXT)
                self.write_desc(descs[i], b.gpa, b.length, flags, 0 if last else descs[i + 1])
        head = descs[0]
        self._chains[head] = (descs, token)
        self.write_avail(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> int:
        """Makes every added chain visible (one avail->idx store); returns idx."""
        memory_barrier()    # the chains and ring entries before the index
        self.set_avail_idx(self.avail_idx)
        self.published_idx = self.avail_idx
        return self.published_idx

    def needs_kick(self) -> bool:
        """Whether the device asked to be kicked for what was published since
        the last call (avail_event with EVENT_IDX, else USED_F_NO_NOTIFY)."""
        old, new = self.kicked_idx, self.published_idx
        self.kicked_idx = new
        if old == new:
            return False
        # The device may have just gone to sleep with an avail_event (or
        # flags) that asks for this kick: read it after our idx store.
        memory_barrier()
        if self.event_idx:
            return need_event(self.read_avail_event(), new, old)
        return not self.read_used_flags() & USED_F_NO_NOTIFY

    def collect(self, limit: int | None = None) -> list[Used]:
        """Takes new used elements, frees their descriptors, returns them."""
        done: list[Used] = []
        used_idx = self.read_used_idx()
        if ((used_idx - self.last_used_idx) & 0xFFFF) > self.size:
            raise RingProtocolError(f"used idx jumped from {self.last_used_idx} to {used_idx}")
        if used_idx != self.last_used_idx:
            memory_barrier()    # the elements after the index that covers them
        while self.last_used_idx != used_idx and (limit is None or len(done) < limit):
            head, length = self.read_used_elem(self.last_used_idx)
            chain = self._chains.pop(head, None)
            if chain is None:
                raise RingProtocolError(f"used element {self.last_used_idx} names head {head}, "
                                        f"which is not in flight")
            descs, token = chain
            self._free.extend(reversed(descs))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            done.append(Used(head, length, token))
        if self._notifications and self.event_idx:
            self.set_used_event(self.last_used_idx)
        return done

    def enable_notifications(self) -> None:
        """Asks for a call on the next used element."""
        self._notifications = True
        if self.event_idx:
            self.set_used_event(self.last_used_idx)
        else:
            self.set_avail_flags(0)
        # A caller re-checks the used ring next: that load must not pass
        # the store, or a completion the device did not call for is missed.
        memory_barrier()

    def disable_notifications(self) -> None:
        self._notifications = False
        if self.event_idx:
            # As far behind as u16 allows: no call until 65535 more elements.
            self.set_used_event(self.last_used_idx - 1)
        else:
            self.set_avail_flags(AVAIL_F_NO_INTERRUPT)
