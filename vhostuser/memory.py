"""Python face of the C guest-memory table (``struct vu_mem``)."""
from __future__ import annotations

import os

from .native import check, ffi, lib
from .protocol import MemRegion


class GuestMemory:
    """The regions the front-end shared, mapped into this process.

    Owned by a :class:`~vhostuser.dataplane.DataPlane`, which holds the device
    lock while the table changes. The fds are closed once mapped: the mapping
    keeps the memory alive and we never need the fd again.
    """

    def __init__(self, mem_ptr):
        self._mem = mem_ptr

    @classmethod
    def create(cls) -> "GuestMemory":
        """An empty table of our own (built aside, then installed whole)."""
        ptr = lib.vu_mem_new()
        if ptr == ffi.NULL:
            raise MemoryError("vu_mem_new")
        return cls(ptr)

    def free(self) -> None:
        """Unmaps everything and frees a table made with :meth:`create`."""
        if self._mem != ffi.NULL:
            lib.vu_mem_free(self._mem)
            self._mem = ffi.NULL

    @property
    def regions(self) -> list[MemRegion]:
        return [MemRegion(r.gpa, r.size, r.uva, r.mmap_offset)
                for r in (self._mem.regions[i] for i in range(self._mem.nregions))]

    def __len__(self) -> int:
        return self._mem.nregions

    def add(self, region: MemRegion, fd: int) -> None:
        """Maps ``region`` from ``fd`` (closes fd in every case)."""
        try:
            check(lib.vu_mem_add_region(self._mem, region.gpa, region.size, region.uva,
                                        region.mmap_offset, fd),
                  f"region gpa={region.gpa:#x} size={region.size:#x}")
        finally:
            os.close(fd)

    def remove(self, region: MemRegion) -> None:
        check(lib.vu_mem_remove_region(self._mem, region.gpa, region.size),
              f"region gpa={region.gpa:#x} size={region.size:#x}")

    def clear(self) -> None:
        lib.vu_mem_clear(self._mem)

    def view(self, gpa: int, length: int) -> memoryview:
        """Zero-copy view of guest memory; raises AddressError if not mapped."""
        ptr = lib.vu_gpa_to_hva(self._mem, gpa, length)
        if ptr == ffi.NULL:
            check(-lib.VU_ERR_ADDR_UNMAPPED, f"gpa={gpa:#x} len={length}")
        return memoryview(ffi.buffer(ptr, length))
