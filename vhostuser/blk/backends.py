"""Storage back-ends for the virtio-blk device.

:class:`FileBackend` and :class:`RamBackend` run entirely in C in the queue
workers. :class:`BlockBackend` is the class to subclass for a back-end in
Python: its methods get byte offsets and memoryviews straight over guest
memory, and may be plain or ``async`` functions.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ..errors import VhostUserError
from ..sandbox import access as sandbox_access


class BackendError(VhostUserError):
    """The back-end can't be used as given (missing file, bad size, ...)."""


@dataclass
class FileBackend:
    """A raw image file or block device, I/O done in C with preadv/pwritev."""
    path: str
    read_only: bool = False
    direct: bool = False
    fd: int = field(default=-1, init=False)

    def open(self) -> None:
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        if self.direct:
            flags |= os.O_DIRECT
        try:
            self.fd = sandbox_access.open_image(self.path, flags)   # sandboxed: the helper
        except OSError as exc:
            raise BackendError(f"{self.path}: {exc.strerror}") from None
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            self.close()
            raise BackendError(f"{self.path}: not a regular file or block device")
        if self.size() < 512:
            self.close()
            raise BackendError(f"{self.path}: smaller than one 512-byte sector")

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class RamBackend:
    """A disk in anonymous memory; only written sectors use RAM."""
    size_bytes: int
    read_only: bool = False

    def size(self) -> int:
        return self.size_bytes

    def close(self) -> None:
        """The memory belongs to the device's C side; nothing to release here."""


class BlockBackend:
    """Base class of storage back-ends written in Python.

    Override :meth:`size`, :meth:`read` and :meth:`write`; optionally
    :meth:`flush`, :meth:`discard`, :meth:`write_zeroes`, :meth:`lifetime`.
    A method may be ``async def``: it then runs on the device's event loop and
    the guest's request stays in flight until it returns. Raising any
    exception answers the request with VIRTIO_BLK_S_IOERR.

    ``bufs`` are memoryviews of guest memory: ``read`` fills them with the
    bytes at ``offset`` onwards, ``write`` stores them there. They are valid
    only until the method returns (or its coroutine finishes).
    """

    #: refuse writes and don't offer write features
    read_only = False

    def size(self) -> int:
        raise NotImplementedError

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        raise NotImplementedError

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make every completed write durable."""

    def discard(self, offset: int, length: int) -> None:
        """Forget the range (a hint). Offered to the guest only if overridden."""
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero the range. The default writes zero buffers with :meth:`write`."""
        chunk = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            n = min(len(chunk), length - done)
            self.write(offset + done, [memoryview(chunk)[:n]])
            done += n

    def lifetime(self) -> tuple[int, int, int] | None:
        """(pre_eol_info, est_typ_a, est_typ_b) if the storage has such metrics."""
        return None

    def close(self) -> None:
        """Called once the device is done with the back-end."""

    # -- what the device offers --------------------------------------------
    def supports(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(BlockBackend, method)
