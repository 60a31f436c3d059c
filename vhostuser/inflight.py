"""The shared inflight-tracking area (GET/SET_INFLIGHT_FD).

The back-end allocates it (a memfd), the front-end keeps the fd and hands it
back after a reconnect, so requests that were in flight when the back-end
died can be resubmitted. Layout per queue: ``QueueRegionSplit`` or
``QueueRegionPacked`` from vhost-user.rst; the C rings read and write it.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct

from .native import ffi

SPLIT_HEADER = 16       # features u64, version, desc_num, last_batch_head, used_idx
SPLIT_DESC = 16         # DescStateSplit
PACKED_HEADER = 32      # QueueRegionPacked up to desc[], 8-byte aligned
PACKED_DESC = 32        # DescStatePacked
ALIGN = 64
_MAX_FILE_OFFSET = (1 << 63) - 1   # off_t: a range past it cannot be mapped
BLKGETSIZE64 = 0x80081272          # linux/fs.h


def _mappable_size(fd: int) -> int | None:
    """How far ``fd`` may be mapped: a regular file's size, a block
    device's (fstat says 0 for one; 0 if the device can't tell), None for
    what has no size to tell (vu_fd_mappable_size in csrc/vu_memory.c)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        try:
            return struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
        except OSError:
            return 0
    return None


def queue_region_size(queue_size: int) -> int:
    """Bytes per queue. Room for either layout: QEMU asks for the area
    before it sets the features that decide between them, and a restarted
    back-end must find each queue's region at the same offset."""
    raw = max(PACKED_HEADER + PACKED_DESC * queue_size, SPLIT_HEADER + SPLIT_DESC * queue_size)
    return (raw + ALIGN - 1) // ALIGN * ALIGN


class InflightArea:
    """The mapped area; ``fd`` is set only for a freshly created one."""

    def __init__(self, mapping: mmap.mmap, fd: int | None, num_queues: int, queue_size: int):
        self._map = mapping
        self.fd = fd
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.size = len(mapping)
        self._base = ffi.from_buffer(mapping)

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> "InflightArea":
        if not 1 <= num_queues <= 256 or not 1 <= queue_size <= 32768:
            raise ValueError(f"inflight area for {num_queues} queues of {queue_size}")
        size = num_queues * queue_region_size(queue_size)
        fd = os.memfd_create("vhostuser-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The front-end gets this fd: shrunk under our mapping, the
            # rings' next write there would be SIGBUS in a queue worker.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_SEAL)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
        except OSError:
            os.close(fd)
            raise
        # zero-filled: version 0 tells the rings "fresh region"
        return cls(mapping, fd, num_queues, queue_size)

    @classmethod
    def map(cls, fd: int, size: int, offset: int, num_queues: int,
            queue_size: int) -> "InflightArea":
        """Maps an area the front-end handed back (takes fd and closes it)."""
        try:
            need = num_queues * queue_region_size(queue_size)
            if size < need:
                raise ValueError(f"inflight area of {size} bytes, {num_queues} queues "
                                 f"of {queue_size} need {need}")
            if offset % mmap.PAGESIZE:
                raise ValueError(f"inflight offset {offset} not page aligned")
            if size + offset > _MAX_FILE_OFFSET:
                # mmap would raise OverflowError: no file has such a range.
                raise ValueError(f"inflight area of {size} bytes at offset {offset} "
                                 "lies past any file's end")
            end = _mappable_size(fd)
            if end is not None and offset + size > end:
                # Mapped anyway, its pages past the end would be SIGBUS in a
                # queue worker at the rings' first write there.
                raise ValueError(f"inflight area of {size} bytes at offset {offset} "
                                 f"beyond its file's {end} bytes")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=offset)
        finally:
            os.close(fd)
        return cls(mapping, None, num_queues, queue_size)

    def queue_region(self, index: int):
        """C pointer to queue ``index``'s region (None past the last queue)."""
        if index >= self.num_queues:
            return None
        return self._base + index * queue_region_size(self.queue_size)

    def close(self) -> None:
        """Drops our fd (after sending it); the mapping stays for the rings."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close_mapping(self) -> None:
        """Drops our fd and unmaps the area (no ring may point into it any
        more). Raises BufferError if something else still exports the
        mapping: that is a bug, and hiding it would leak the mapping."""
        self.close()
        base, self._base = self._base, None
        if base is not None:
            # Our export ends now, not whenever the last reference to the
            # cdata goes away.
            ffi.release(base)
        self._map.close()
