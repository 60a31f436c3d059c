"""Storage back-ends for the virtio-blk device.

:class:`FileBackend` and :class:`RamBackend` run entirely in C in the queue
workers. :class:`BlockBackend` is the class to subclass for a back-end in
Python: its methods get byte offsets and memoryviews straight over guest
memory, and may be plain or ``async`` functions.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import stat
from dataclasses import dataclass, field

from ..errors import VhostUserError
from ..sandbox import access as sandbox_access


class BackendError(VhostUserError):
    """The back-end can't be used as given (missing file, bad size, ...);
    raised by a request method, the guest gets VIRTIO_BLK_S_IOERR and the
    log one line (no traceback), as for an OSError."""


class Unsupported(VhostUserError):
    """Raised by a request method: the guest gets VIRTIO_BLK_S_UNSUPP (Linux:
    EOPNOTSUPP) instead of an I/O error. Not logged above DEBUG; counted as
    ``unsupported``."""


@dataclass
class FileBackend:
    """A raw image file or block device, I/O done in C with preadv/pwritev."""
    path: str
    read_only: bool = False
    direct: bool = False
    fd: int = field(default=-1, init=False)
    #: more open files of the image, for syncs (see open_sync_files)
    sync_fds: list[int] = field(default_factory=list, init=False)

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

    def open_sync_files(self, count: int) -> list[int]:
        """``count`` more open files of the image, for syncs only: the
        kernel reports a failed writeback once per open file, so each
        syncing thread needs its own to be told (csrc/vu_blk_stable.c).
        Opened by path, and checked to be the same file as ``fd``."""
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        want = os.fstat(self.fd)
        try:
            while len(self.sync_fds) < count:
                fd = sandbox_access.open_image(self.path, flags)
                self.sync_fds.append(fd)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                    raise BackendError(f"{self.path}: replaced by another file while opened")
        except OSError as exc:
            raise BackendError(f"{self.path}: opening it again to sync: {exc.strerror}") from None
        return self.sync_fds[:count]

    def close(self) -> None:
        for fd in self.sync_fds:
            os.close(fd)
        self.sync_fds.clear()
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


#: Largest zero buffer the default write_zeroes hands to write().
ZERO_CHUNK = 1 << 20


class BlockBackend:
    """Base class of storage back-ends written in Python.

    Override :meth:`size`, :meth:`read` and :meth:`write`; optionally
    :meth:`flush`, :meth:`write_fua`, :meth:`discard`, :meth:`write_zeroes`,
    :meth:`lifetime`. The request methods (all but :meth:`size`,
    :meth:`lifetime` and :meth:`close`) may be ``async def``: they then run
    on the device's event loop and the guest's request stays in flight
    until they return.

    A request succeeds when its method returns; the value returned is
    ignored (the first non-None one per method is warned about). To fail
    it, raise: :class:`Unsupported` answers VIRTIO_BLK_S_UNSUPP, anything
    else VIRTIO_BLK_S_IOERR (OSError and :class:`BackendError` are logged
    as one line, other exceptions, bugs, with their traceback).
    :meth:`size` returns a positive multiple of 512 (bytes), checked when
    the device is made and on resize.

    ``bufs`` are memoryviews of guest memory: ``read`` fills them with the
    bytes at ``offset`` onwards, ``write`` stores them there. They are valid
    only until the method returns (or its coroutine finishes).

    A plain request method may also return a :class:`concurrent.futures.Future`
    (work handed to an executor): the request completes when it does, as
    for a coroutine.

    The write cache contract (virtio 1.4, 5.2.6): in write-back mode the
    device calls :meth:`write`, whose data may sit in a cache until
    :meth:`flush`; in write-through mode it calls :meth:`write_fua`, which
    returns only once that write is stable. :meth:`flush` returns only once
    every write that completed before it was called is stable.
    """

    #: refuse writes and don't offer write features
    read_only = False

    def size(self) -> int:
        """The disk's size in bytes: a positive multiple of 512."""
        raise NotImplementedError

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        raise NotImplementedError

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make every completed write durable."""

    def write_fua(self, offset: int, bufs: list[memoryview]):
        """Write, and make this write stable before returning.

        The default is :meth:`write` then :meth:`flush`, so a back-end with
        only those two is durable in write-through mode as it is; override
        it when the storage can make one write stable for less (O_DSYNC,
        NBD's FUA flag). Returns a coroutine when either call does.
        """
        written = awaitable_result(self.write(offset, bufs))
        if written is not None:
            return _then_flush(self, written)
        return stabilising_flush(self)

    def discard(self, offset: int, length: int) -> None:
        """Forget the range (a hint). Offered to the guest only if overridden."""
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, unmap: bool):
        """Zero the range. The default writes zero buffers with :meth:`write`
        (one after the other, awaited when write is async)."""
        if length <= 0:
            return None
        chunk = memoryview(bytes(min(length, ZERO_CHUNK)))
        for done in range(0, length, len(chunk)):
            n = min(len(chunk), length - done)
            written = awaitable_result(self.write(offset + done, [chunk[:n]]))
            if written is not None:
                return self._zeroes_async(written, offset, length, done + n, chunk)
        return None

    async def _zeroes_async(self, first, offset: int, length: int, start: int,
                            chunk: memoryview) -> None:
        await first
        for done in range(start, length, len(chunk)):
            n = min(len(chunk), length - done)
            written = awaitable_result(self.write(offset + done, [chunk[:n]]))
            if written is not None:
                await written

    def lifetime(self) -> tuple[int, int, int] | None:
        """(pre_eol_info, est_typ_a, est_typ_b), each 0..65535, if the storage
        has such metrics (virtio 1.4, 5.2.6)."""
        return None

    def close(self) -> None:
        """Called once the device is done with the back-end."""

    # -- what the device offers --------------------------------------------
    def supports(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(BlockBackend, method)


def awaitable_result(outcome):
    """What a back-end method returned, as something to await while its
    work still runs: an awaitable as it is, a concurrent.futures.Future (a
    plain method that handed the work to an executor) as an awaitable of
    its own; None when the method is done (`outcome` is a plain value)."""
    if inspect.isawaitable(outcome):
        return outcome
    if isinstance(outcome, concurrent.futures.Future):
        return _Waiting(outcome)
    return None


class _Waiting:
    """A concurrent.futures.Future awaited on whichever event loop awaits
    this (not a coroutine: it is never closed unawaited, as its work runs
    already).

    Cancelled while awaited (the loop ending cancels what is left), it
    cancels the work if it has not started, else waits for it to its end
    (cancelled again or not) before raising the CancelledError: the work
    reads or writes a request's buffers, which the guest gets back once the
    request is answered. So does any coroutine awaiting it (the default
    write_fua, write_zeroes). A wait that must not outlast a timeout, and
    touches no buffers (a flush), awaits :func:`_unbound` of it instead."""

    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future):
        self.future = future

    def __await__(self):
        return _to_its_end(self.future).__await__()


async def _to_its_end(future: concurrent.futures.Future):
    ended = asyncio.wrap_future(future)
    cancelled = None
    while not ended.done():
        try:
            await asyncio.shield(ended)
        except asyncio.CancelledError as exc:
            if ended.done() or future.cancel():
                raise           # the work was cancelled, or has ended, or never starts
            cancelled = exc     # still running: waited for, cancelled again or not
    if cancelled is not None:
        raise cancelled
    return ended.result()


def _unbound(awaitable):
    """A _Waiting as a plain wait on its Future (cancelled, it returns at
    once; wait_for's timeout holds); anything else as it is. For work that
    touches no request buffers (a flush)."""
    if isinstance(awaitable, _Waiting):
        return asyncio.wrap_future(awaitable.future)
    return awaitable


async def _then_flush(backend: BlockBackend, written) -> None:
    await written
    await stabilising_flush_on_loop(backend)


def stabilising_flush(backend: BlockBackend):
    """backend.flush() run to make a write stable before it completes (a
    coroutine when flush() is async). Its Unsupported is an I/O error: the
    write is a supported request, its data just can't be made stable."""
    try:
        flushed = backend.flush()
    except Unsupported as exc:
        raise _not_stable(exc) from None
    waiting = awaitable_result(flushed)
    if waiting is not None:
        return _awaited_stabilising(waiting)
    return flushed


async def stabilising_flush_on_loop(backend: BlockBackend):
    """stabilising_flush() for a request finishing on the event loop; returns
    what flush() returned. A plain flush() runs in a thread: it may block
    (storage that stopped answering), and the loop serves everything else."""
    if inspect.iscoroutinefunction(backend.flush):
        return await stabilising_flush(backend)
    flushed = await asyncio.to_thread(stabilising_flush, backend)
    if inspect.isawaitable(flushed):
        flushed = await flushed
    return flushed


async def _awaited_stabilising(flushed):
    try:
        return await _unbound(flushed)
    except Unsupported as exc:
        raise _not_stable(exc) from None


def _not_stable(exc: Unsupported) -> BackendError:
    return BackendError(f"flush() to make a write stable is unsupported: {exc}")
