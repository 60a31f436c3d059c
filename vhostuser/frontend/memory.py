"""Guest memory for a VM-less front-end: memfd regions shared with the back-end.

Each region is a memfd mapped here once; the back-end maps the same fd, so
what we write at a guest-physical address (gpa) the back-end reads there.
The user address (uva) sent in the memory table is our own mapping's address,
as QEMU does; back-ends only use it to translate ring addresses.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from dataclasses import dataclass, field

from .. import protocol
from .connection import FrontendError


class GuestMemoryError(FrontendError):
    """A guest address is not backed by any region, or memory ran out."""


def _full_fence():
    """A callable that runs a sequentially consistent fence."""
    try:
        libatomic = ctypes.CDLL("libatomic.so.1")
    except OSError:
        libatomic = None
    if libatomic is not None:
        fence = libatomic.atomic_thread_fence
        fence.argtypes, fence.restype = [ctypes.c_int], None
        seq_cst = 5     # memory_order_seq_cst
        return lambda: fence(seq_cst)
    # Without libatomic (gcc's runtime, so almost never): an uncontended lock
    # taken and dropped runs locked read-modify-writes, full barriers on x86.
    lock = threading.Lock()

    def fence_by_lock() -> None:
        lock.acquire()
        lock.release()
    return fence_by_lock


_fence = _full_fence()


def memory_barrier() -> None:
    """A full memory barrier between this thread's shared-memory accesses
    before and after it.

    Python orders nothing between two stores or loads into an mmap, and x86
    lets a load pass an earlier store. A driver that stores avail->idx and then
    loads avail_event (or stores used_event and then loads used->idx) without
    one can read the old value while the device, which did fence, read ours
    old too: the device then waits for a kick and the driver for a call."""
    _fence()


def store16(mm: mmap.mmap, offset: int, value: int) -> None:
    """One 16-bit store into shared memory (offset 2-byte aligned).

    struct.pack_into first zeroes the bytes it then fills: a device polling
    the ring in between reads 0 (an avail index that jumped back, a
    used_event that asks for no notification). A driver must publish ring
    indices with one store."""
    ctypes.c_uint16.from_buffer(mm, offset).value = value & 0xFFFF


def store32(mm: mmap.mmap, offset: int, value: int) -> None:
    """One 32-bit store into shared memory (offset 4-byte aligned)."""
    ctypes.c_uint32.from_buffer(mm, offset).value = value & 0xFFFFFFFF


def _address_of(mm: mmap.mmap) -> int:
    # The ctypes view pins the buffer only while it lives; drop it at once so
    # the mmap can still be closed.
    view = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


@dataclass(eq=False)
class Region:
    """One memfd region: ``size`` bytes at ``gpa``, starting ``mmap_offset``
    bytes into the file (the back-end must honour the offset)."""
    gpa: int
    size: int
    mmap_offset: int
    fd: int
    mm: mmap.mmap = field(repr=False)
    uva: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end

    def to_wire(self) -> protocol.MemRegion:
        return protocol.MemRegion(self.gpa, self.size, self.uva, self.mmap_offset)


class GuestMemory:
    """Guest memory made of memfd regions, with a bump allocator for buffers.

    ``regions`` lists ``(gpa, size)`` or ``(gpa, size, mmap_offset)``; regions
    may be adjacent in gpa space (a buffer can then straddle two of them)
    but must not overlap.
    """

    def __init__(self, regions=((0, 1 << 22),), *, name: str = "guest"):
        self.regions: list[Region] = []
        try:
            for spec in regions:
                gpa, size, offset = (tuple(spec) + (0,))[:3]
                self._add(gpa, size, offset, name)
        except BaseException:
            self.close()
            raise
        self._cursor = {id(r): r.gpa for r in self.regions}

    def _add(self, gpa: int, size: int, offset: int, name: str) -> None:
        if size <= 0 or size % mmap.PAGESIZE or offset % mmap.PAGESIZE:
            raise ValueError(f"region at {gpa:#x}: size and offset must be whole pages")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError(f"region at {gpa:#x} overlaps the one at {r.gpa:#x}")
        fd = os.memfd_create(f"{name}@{gpa:#x}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, offset + size)
            mm = mmap.mmap(fd, offset + size)
        except BaseException:
            os.close(fd)
            raise
        region = Region(gpa, size, offset, fd, mm)
        region.uva = _address_of(mm) + offset
        self.regions.append(region)

    # -- lifetime ----------------------------------------------------------------
    def close(self) -> None:
        """Unmaps and closes every region (the back-end keeps its own mapping)."""
        for r in self.regions:
            r.mm.close()
            os.close(r.fd)
        self.regions = []

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the back-end is told -------------------------------------------------
    def table(self) -> list[protocol.MemRegion]:
        """The regions as SET_MEM_TABLE describes them."""
        return [r.to_wire() for r in self.regions]

    @property
    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    # -- addressing ----------------------------------------------------------------
    def region_of(self, gpa: int, length: int = 1) -> Region:
        """The region holding all of [gpa, gpa + length)."""
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise GuestMemoryError(f"[{gpa:#x}, +{length:#x}) is not inside one region")

    def uva(self, gpa: int) -> int:
        """Front-end user address of ``gpa`` (what SET_VRING_ADDR carries)."""
        r = self.region_of(gpa)
        return r.uva + (gpa - r.gpa)

    def locate(self, gpa: int, length: int = 1) -> tuple[mmap.mmap, int]:
        """(mapping, offset in it) for a range inside one region, for struct.*_into."""
        r = self.region_of(gpa, length)
        return r.mm, r.mmap_offset + gpa - r.gpa

    def _pieces(self, gpa: int, length: int):
        """Splits a range over adjacent regions into (region, gpa, length)."""
        while length > 0:
            r = self.region_of(gpa)
            n = min(length, r.end - gpa)
            yield r, gpa, n
            gpa += n
            length -= n

    def read(self, gpa: int, length: int) -> bytes:
        """Bytes at ``gpa``; the range may cross into gpa-adjacent regions."""
        out = bytearray()
        for r, g, n in self._pieces(gpa, length):
            off = r.mmap_offset + g - r.gpa
            out += r.mm[off:off + n]
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        """Writes ``data`` at ``gpa``; may cross into gpa-adjacent regions."""
        data = memoryview(bytes(data))
        pos = 0
        for r, g, n in self._pieces(gpa, len(data)):
            off = r.mmap_offset + g - r.gpa
            r.mm[off:off + n] = data[pos:pos + n]
            pos += n

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * length)

    # -- allocation ----------------------------------------------------------------
    def alloc(self, size: int, align: int = 16, *, region: int | None = None) -> int:
        """Reserves ``size`` bytes inside one region and returns their gpa.

        ``region`` picks a region by index; otherwise the first with room.
        Memory is not zeroed (rings zero their own); nothing is freed except
        by ``rewind``.
        """
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation of {size} bytes aligned to {align}")
        candidates = self.regions if region is None else [self.regions[region]]
        for r in candidates:
            start = (self._cursor[id(r)] + align - 1) & ~(align - 1)
            if start + size <= r.end:
                self._cursor[id(r)] = start + size
                return start
        where = "any region" if region is None else f"region {region}"
        raise GuestMemoryError(f"no room for {size} bytes in {where}")

    def alloc_at(self, gpa: int, size: int) -> int:
        """Reserves exactly [gpa, gpa + size), which may straddle adjacent regions.

        Fails if any of it was already handed out. Regions touched are used
        up to the end of the range, so later ``alloc`` calls never overlap it.
        """
        pieces = list(self._pieces(gpa, size))
        for r, g, _ in pieces:
            if g < self._cursor[id(r)]:
                raise GuestMemoryError(f"{g:#x} is already allocated")
        for r, g, n in pieces:
            self._cursor[id(r)] = g + n
        return gpa

    def mark(self) -> tuple[int, ...]:
        """The allocator's state, for ``rewind``."""
        return tuple(self._cursor[id(r)] for r in self.regions)

    def rewind(self, mark: tuple[int, ...]) -> None:
        """Frees everything allocated since ``mark``."""
        for r, cursor in zip(self.regions, mark):
            self._cursor[id(r)] = cursor

    @contextlib.contextmanager
    def scratch(self):
        """Allocations inside the block are freed when it exits normally.

        On an exception they are kept: the back-end may still write there.
        """
        saved = self.mark()
        yield self
        self.rewind(saved)
