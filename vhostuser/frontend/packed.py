"""The driver side of a packed virtqueue (virtio 1.4, 2.8), in guest memory.

Layout: the descriptor ring (16 bytes per entry) plus two 4-byte event
suppression structures, the driver's (we write it: when to call us) and the
device's (we read it: when to kick). Descriptors are marked available by
AVAIL == our wrap counter and USED != it; the device marks them used by
setting both to its wrap counter.
"""
from __future__ import annotations

from ..protocol import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, EVENT_SUPPRESS,
                        PACKED_DESC, PACKED_DESC_ALIGN, PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED,
                        PACKED_EVENT_ALIGN, PACKED_EVENT_WRAP, RING_EVENT_FLAGS_DESC,
                        RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE, RING_U16, need_event,
                        pack_packed_vring_base, unpack_packed_vring_base)
from .memory import GuestMemory, memory_barrier, store16, store32
from .virtqueue import DriverRing, RingFull, RingProtocolError, Used, as_buffers

FLAGS_OFF = 14          # flags is the last field of a packed descriptor


def avail_flags(wrap: bool) -> int:
    """AVAIL/USED bits that mark a descriptor available under ``wrap``."""
    return PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED


def used_flags(wrap: bool) -> int:
    """AVAIL/USED bits of a descriptor the device marked used under ``wrap``."""
    return PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED if wrap else 0


def is_used(flags: int, wrap: bool) -> bool:
    """Whether the device marked a descriptor used under ``wrap``."""
    avail = bool(flags & PACKED_DESC_F_AVAIL)
    used = bool(flags & PACKED_DESC_F_USED)
    return avail == used == wrap


class PackedRing(DriverRing):
    """A packed ring the front-end drives.

    Buffer ids are handed out from a free list (not tied to ring slots), so
    the device may complete chains in any order. Raw writers
    (``write_desc``, ``write_driver_event``, ...) bypass all bookkeeping.
    """
    packed = True

    def __init__(self, mem: GuestMemory, size: int, *, event_idx: bool = False,
                 base: int | None = None, indirect_entries: int = 0):
        """``base`` (SET_VRING_BASE's encoding) starts at that slot and wrap
        counter instead of slot 0, wrap 1."""
        super().__init__(mem, size, event_idx=event_idx, indirect_entries=indirect_entries)
        self.desc_gpa = mem.alloc(PACKED_DESC.size * size, PACKED_DESC_ALIGN)
        self.driver_gpa = mem.alloc(EVENT_SUPPRESS.size, PACKED_EVENT_ALIGN)
        self.device_gpa = mem.alloc(EVENT_SUPPRESS.size, PACKED_EVENT_ALIGN)
        self._desc = mem.locate(self.desc_gpa, PACKED_DESC.size * size)
        self._driver = mem.locate(self.driver_gpa, EVENT_SUPPRESS.size)
        self._device = mem.locate(self.device_gpa, EVENT_SUPPRESS.size)
        self._zero(self.desc_gpa, PACKED_DESC.size * size)
        self._zero(self.driver_gpa, EVENT_SUPPRESS.size)
        self._zero(self.device_gpa, EVENT_SUPPRESS.size)

        start = unpack_packed_vring_base(pack_packed_vring_base(0, True) if base is None else base)
        if start[0] >= size:
            raise ValueError(f"base slot {start[0]} outside a ring of {size}")
        self.next_avail, self.avail_wrap = start     # where the next chain goes
        self._as_left_at(*start)
        self.next_used, self.used_wrap = start       # where the next used descriptor appears
        self._free_ids = list(range(size - 1, -1, -1))
        self._free_descs = size
        self._chains: dict[int, tuple[int, object]] = {}   # id -> (descriptors, token)
        self._pending: list[tuple[int, int]] = []          # unpublished heads: (slot, flags)
        self._published = start     # ring position up to which the device may look
        self._kick_from = start     # _published at the last kick decision
        self._notifications = True

    def _as_left_at(self, slot: int, wrap: bool) -> None:
        """Marks every slot as a driver that reached (slot, wrap) leaves
        them: used in this lap before ``slot``, used in the previous lap
        from it on. A zeroed ring only looks like that at (0, wrap 1):
        elsewhere, once the driver wraps, an untouched zero slot would read
        as used under the new wrap counter."""
        for s in range(self.size):
            self.write_desc_flags(s, used_flags(wrap if s < slot else not wrap))

    @property
    def base(self) -> int:
        return pack_packed_vring_base(self.next_avail, self.avail_wrap)

    @property
    def num_free(self) -> int:
        return self._free_descs

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    # -- raw access ----------------------------------------------------------------
    def write_desc(self, slot: int, addr: int, length: int, ident: int, flags: int) -> None:
        mm, base = self._desc
        PACKED_DESC.pack_into(mm, base + PACKED_DESC.size * slot, addr, length, ident, flags)

    def write_desc_flags(self, slot: int, flags: int) -> None:
        mm, base = self._desc
        store16(mm, base + PACKED_DESC.size * slot + FLAGS_OFF, flags)

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags); flags read first, as a driver must, and
        the rest after a barrier: what the flags say is written, is."""
        mm, base = self._desc
        flags = RING_U16.unpack_from(mm, base + PACKED_DESC.size * slot + FLAGS_OFF)[0]
        memory_barrier()
        addr, length, ident, _ = PACKED_DESC.unpack_from(mm, base + PACKED_DESC.size * slot)
        return addr, length, ident, flags

    def write_driver_event(self, off_wrap: int, flags: int) -> None:
        mm, base = self._driver
        # One store: the device may read it at any time (see store16).
        store32(mm, base, (off_wrap & 0xFFFF) | (flags & 0xFFFF) << 16)

    def read_device_event(self) -> tuple[int, int]:
        """The device's (off_wrap, flags): when it wants kicks."""
        mm, base = self._device
        return EVENT_SUPPRESS.unpack_from(mm, base)

    def _advance(self, slot: int, wrap: bool, n: int = 1) -> tuple[int, bool]:
        slot += n
        while slot >= self.size:
            slot -= self.size
            wrap = not wrap
        return slot, wrap

    # -- the driver ------------------------------------------------------------------
    def add(self, buffers, token=None, *, indirect: bool = False) -> int:
        """Writes a chain at the ring's next slots; the head's flags (which
        make it available) wait for ``publish``. Returns the buffer id."""
        bufs = as_buffers(buffers)
        need = 1 if indirect else len(bufs)
        if need > self._free_descs or not self._free_ids:
            raise RingFull(f"chain of {need} descriptors, {self._free_descs} free")
        ident = self._free_ids.pop()
        head_slot, wrap = self.next_avail, self.avail_wrap
        if indirect:
            table = self._indirect_table(ident, len(bufs))
            # Inside a table only WRITE means anything; ids are ignored.
            self.mem.write(table, b"".join(
                PACKED_DESC.pack(b.gpa, b.length, 0, DESC_F_WRITE if b.writable else 0)
                for b in bufs))
            descs = [(table, PACKED_DESC.size * len(bufs), DESC_F_INDIRECT)]
        else:
            descs = [(b.gpa, b.length, (DESC_F_WRITE if b.writable else 0)
                      | (DESC_F_NEXT if i + 1 < len(bufs) else 0))
                     for i, b in enumerate(bufs)]
        slot = head_slot
        for i, (addr, length, flags) in enumerate(descs):
            flags |= avail_flags(wrap)
            # The id belongs in the last descriptor; writing it in all of
            # them, as Linux does, is allowed and helps sloppy devices.
            if i == 0:
                self.write_desc(slot, addr, length, ident, 0)
                self._pending.append((slot, flags))
            else:
                self.write_desc(slot, addr, length, ident, flags)
            slot, wrap = self._advance(slot, wrap)
        self.next_avail, self.avail_wrap = slot, wrap
        self._free_descs -= len(descs)
        self._chains[ident] = (len(descs), token)
        return ident

    def publish(self) -> int:
        """Makes added chains available by writing their heads' flags, the
        first chain last so the device sees the batch whole."""
        if self._pending:
            memory_barrier()    # the descriptors before the flags that offer them
        for slot, flags in reversed(self._pending):
            self.write_desc_flags(slot, flags)
        self._pending.clear()
        self._published = (self.next_avail, self.avail_wrap)
        return self.base

    def needs_kick(self) -> bool:
        """Whether the device event suppression asks for a kick for what was
        published since the last call."""
        (old, old_wrap), (new, new_wrap) = self._kick_from, self._published
        self._kick_from = self._published
        added = new - old + (0 if old_wrap == new_wrap else self.size)
        if not added:
            return False
        # Read the device's event after our flag stores (see memory_barrier).
        memory_barrier()
        off_wrap, flags = self.read_device_event()
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return flags != RING_EVENT_FLAGS_DISABLE
        # As Linux does: compare in "positions since the event's lap" space.
        event = off_wrap & ~PACKED_EVENT_WRAP
        if bool(off_wrap & PACKED_EVENT_WRAP) != new_wrap:
            event -= self.size
        return need_event(event & 0xFFFF, new & 0xFFFF, (new - added) & 0xFFFF)

    def collect(self, limit: int | None = None) -> list[Used]:
        """Takes used descriptors at the driver's used position, in ring order."""
        done: list[Used] = []
        while limit is None or len(done) < limit:
            _, length, ident, flags = self.read_desc(self.next_used)
            if not is_used(flags, self.used_wrap):
                break
            chain = self._chains.pop(ident, None)
            if chain is None:
                raise RingProtocolError(f"used descriptor at slot {self.next_used} names id "
                                        f"{ident}, which is not in flight")
            ndesc, token = chain
            self._free_ids.append(ident)
            self._free_descs += ndesc
            self.next_used, self.used_wrap = self._advance(self.next_used, self.used_wrap, ndesc)
            done.append(Used(ident, length, token))
        if done and self._notifications and self.event_idx:
            self.enable_notifications()
        return done

    def enable_notifications(self) -> None:
        self._notifications = True
        if self.event_idx:
            self.write_driver_event(self.next_used | (PACKED_EVENT_WRAP if self.used_wrap else 0),
                                    RING_EVENT_FLAGS_DESC)
        else:
            self.write_driver_event(0, RING_EVENT_FLAGS_ENABLE)
        memory_barrier()    # the caller's re-check of the ring comes after this store

    def disable_notifications(self) -> None:
        self._notifications = False
        self.write_driver_event(0, RING_EVENT_FLAGS_DISABLE)
