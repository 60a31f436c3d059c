"""Python faces of guest memory: region tables (``struct vu_mem``) and
memoryviews over guest buffers that keep their mapping alive.

A view handed to Python code (a back-end's ``bufs``, an element's
``readable``/``writable``) is a slice of one view per mapping, and that view
holds a reference on the mapping (``vu_map_get``) until the last slice of it
is gone. So a back-end that keeps a view past its request's end, or a
request that outlives its session, never finds the memory unmapped under
it: a mapping the front-end took back is *detached* instead (private pages
replace the guest's, see csrc/vu_memory.h) and unmapped with its last view.
"""
from __future__ import annotations

import os
import threading

from .native import check, ffi, lib
from .protocol import MemRegion


def release_views(views) -> None:
    """Releases views over guest memory handed to a back-end once the
    request (element, transmit batch) they belong to ended: using one
    afterwards raises ValueError. One still exported (a buffer taken from
    it and kept) can't be released and stays; its mapping, in any case,
    stays until the last view of it is gone (GuestViews)."""
    for v in views:
        try:
            v.release()
        except BufferError:
            pass


class MemoryTable:
    """A table of the regions the front-end shared, mapped into this process.

    Tables are built aside and installed whole by a
    :class:`~vhostuser.dataplane.DataPlane`; an installed table never
    changes. The fds are closed once mapped: the mapping keeps the memory.
    """

    def __init__(self, mem_ptr):
        self._mem = mem_ptr

    @classmethod
    def create(cls) -> "MemoryTable":
        """An empty table of our own."""
        ptr = lib.vu_mem_new()
        if ptr == ffi.NULL:
            raise MemoryError("vu_mem_new")
        return cls(ptr)

    def copy(self) -> "MemoryTable":
        """A new table sharing this one's mappings (to change, then install)."""
        ptr = lib.vu_mem_copy(self._mem)
        if ptr == ffi.NULL:
            raise MemoryError("vu_mem_copy")
        return MemoryTable(ptr)

    def release(self) -> None:
        """Drops our pin on a table made with :meth:`create` or :meth:`copy`
        and never installed: it is freed with its last user."""
        if self._mem != ffi.NULL:
            lib.vu_mem_unpin(self._mem)
            self._mem = ffi.NULL

    @property
    def regions(self) -> list[MemRegion]:
        return [MemRegion(r.gpa, r.size, r.uva, r.mmap_offset)
                for r in (self._mem.regions[i] for i in range(self._mem.nregions))]

    def __len__(self) -> int:
        return self._mem.nregions

    def add(self, region: MemRegion, fd: int, reuse: "MemoryTable | None" = None) -> None:
        """Maps ``region`` from ``fd`` (closes fd in every case); a region of
        ``reuse`` naming the same pages lends its mapping instead."""
        try:
            check(lib.vu_mem_add_region(self._mem, region.gpa, region.size, region.uva,
                                        region.mmap_offset, fd,
                                        reuse._mem if reuse is not None else ffi.NULL),
                  f"region gpa={region.gpa:#x} size={region.size:#x}")
        finally:
            os.close(fd)

    def remove(self, region: MemRegion) -> None:
        check(lib.vu_mem_remove_region(self._mem, region.gpa, region.size, region.uva),
              f"region gpa={region.gpa:#x} size={region.size:#x} uva={region.uva:#x}")

    def view(self, gpa: int, length: int, views: "GuestViews | None" = None) -> memoryview:
        """View of [gpa, gpa+length); raises AddressError if not mapped.
        With ``views`` the view keeps its mapping alive; without, it is valid
        only while this table is installed (tests, tools)."""
        ptr = lib.vu_gpa_to_hva(self._mem, gpa, length)
        if ptr == ffi.NULL:
            check(-lib.VU_ERR_ADDR_UNMAPPED, f"gpa={gpa:#x} len={length}")
        if views is not None:
            return views.view(self._mem, ptr, length)
        return memoryview(ffi.buffer(ptr, length))


class GuestViews:
    """memoryviews over guest buffers, each keeping its mapping alive.

    One per data plane. The view of a whole mapping is cached (per mapping
    id) only while its table is the installed one: ``installed`` returns the
    table new requests use (None: every table counts as installed).
    :meth:`forget` runs when the table changes, after the new one is
    installed, so the cache never keeps a mapping the installed table no
    longer has pinned, although a Python batch (which runs without the
    device lock) may still be making views of an older request's table.
    """

    def __init__(self, installed=None):
        self._by_map: dict[int, memoryview] = {}
        self._installed = installed
        self._off = ffi.new("uint64_t *")
        # The out-parameter above is shared: worker threads of one device
        # may build views at the same time; forget() takes it too.
        self._lock = threading.Lock()

    def _whole(self, m, cache: bool) -> memoryview:
        """The view of mapping ``m`` that pins it (made once per table)."""
        mid = m.id
        whole = self._by_map.get(mid)
        if whole is None:
            lib.vu_map_get(m)
            base = ffi.gc(ffi.cast("uint8_t *", m.base), _unpinner(m))
            whole = memoryview(ffi.buffer(base, m.len))
            if cache:
                self._by_map[mid] = whole
        return whole

    def _cacheable(self, mem) -> bool:
        return self._installed is None or mem == self._installed()

    def view(self, mem, ptr, length: int) -> memoryview:
        with self._lock:
            m = lib.vu_mem_map_of(mem, ptr, length, self._off)
            if m == ffi.NULL:
                raise ValueError("buffer outside every mapping of its table")
            off = self._off[0]
            return self._whole(m, self._cacheable(mem))[off:off + length]

    def iov(self, mem, iov, first: int, count: int) -> list[memoryview]:
        """Views of iov[first:first+count] (translated through ``mem``)."""
        out = []
        with self._lock:
            offp = self._off
            cache = self._cacheable(mem)
            for i in range(first, first + count):
                v = iov[i]
                n = v.iov_len
                m = lib.vu_mem_map_of(mem, v.iov_base, n, offp)
                if m == ffi.NULL:
                    raise ValueError("buffer outside every mapping of its table")
                off = offp[0]
                out.append(self._whole(m, cache)[off:off + n])
        return out

    def forget(self) -> None:
        """The table changed: views made from now on pin the new mappings;
        those already handed out keep theirs until they are gone."""
        with self._lock:
            self._by_map.clear()


def _unpinner(m):
    def unpin(_ptr, m=m):
        lib.vu_map_put(m)
    return unpin


def detached_mappings() -> int:
    """Mappings the front-end took back that something still holds
    (process-wide; for tests and diagnostics)."""
    return lib.vu_maps_detached()
