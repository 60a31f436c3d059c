"""Network back-ends for the virtio-net device.

:class:`TapBackend` runs in C in the queue workers (writev to the TAP,
receive through a staging buffer). :class:`NetBackend` is the class to
subclass for a back-end in Python: it gets transmitted frames as
memoryviews and can inject frames toward the guest from any thread, one at
a time or a batch at once (:meth:`NetBackend.inject_many`).
"""
from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence
from ctypes import string_at
from dataclasses import dataclass, field

from ..errors import VhostUserError
from ..memory import release_views
from ..sandbox import access as sandbox_access

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100


class NetBackendError(VhostUserError):
    """The network back-end can't be set up (no TAP, no permission, ...)."""


@dataclass
class TapBackend:
    """A TAP interface (created if missing, else attached), one queue per
    queue pair (IFF_MULTI_QUEUE), with virtio-net headers (IFF_VNET_HDR) so
    checksum and segmentation offloads pass through."""
    ifname: str
    queue_pairs: int = 1
    fds: list[int] = field(default_factory=list)

    def open(self) -> None:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        if self.queue_pairs > 1:
            flags |= IFF_MULTI_QUEUE
        for _ in range(self.queue_pairs):
            try:
                # /dev/net/tun + TUNSETIFF (sandboxed: by the helper)
                fd = sandbox_access.open_tun(self.ifname, flags)
            except OSError as exc:
                self.close()
                raise NetBackendError(f"TAP {self.ifname}: {exc.strerror}") from None
            self.fds.append(fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class SinkBackend:
    """Frames the guest transmits are counted and dropped, in C: a
    benchmark's or a test's far end that costs nothing."""

    def close(self) -> None:
        """Nothing to release."""


class LoopbackBackend:
    """Every frame the guest transmits comes back to it on the same queue
    pair's receive queue, copied in C (dropped when it has no buffers)."""

    def close(self) -> None:
        """Nothing to release."""


class NetBackend:
    """Base class of network back-ends written in Python.

    Override :meth:`transmit`. Call :meth:`inject` (any thread) to hand a
    frame to the guest, or :meth:`inject_many` for many at once. Frames are
    Ethernet frames without the virtio-net header; ``header`` carries the
    guest's offload request (a 12-byte virtio_net_hdr as bytes) for
    back-ends that care.

    Calls of :meth:`transmit` for one queue pair never overlap; they come
    from its worker thread, or (a RARP announcement after a migration) from
    a thread of their own. Calls for different queue pairs do overlap.
    :meth:`transmit` is a plain method; what it returns is ignored, and an
    exception it raises is logged (rate-limited; an OSError as one line)
    and counted as ``transmit_errors``, its frames consumed.
    """

    #: largest payload (MTU) the back-end takes
    mtu = 1500

    def __init__(self):
        self.device = None

    def transmit(self, queue_pair: int, frames: "FrameBatch") -> None:
        """The frames the guest sent on ``queue_pair``: a sequence of
        :class:`Frame`, valid until this returns."""
        raise NotImplementedError

    def inject(self, frame: bytes, queue_pair: int = 0) -> bool:
        """Sends a frame toward the guest; False when it was dropped (no
        buffers, ring disabled, not connected)."""
        if self.device is None:
            return False
        return self.device.inject(frame, queue_pair)

    def inject_many(self, frames, queue_pair: int = 0) -> int:
        """Sends many frames toward the guest with one lock, one flush and
        one notification: each a bytes-like object or a :class:`Frame` this
        or another device handed to :meth:`transmit` (copied once, straight
        from the sending guest's memory; only during that call). Returns how
        many were delivered; the rest were dropped (no buffers, not
        connected) and counted in the device's ``rx_dropped`` stats."""
        if self.device is None:
            return 0
        return self.device.inject_many(frames, queue_pair)

    def close(self) -> None:
        """Called once the device is done with the back-end."""


class StaleFrameError(RuntimeError):
    """A frame handed to transmit() was used after transmit() returned: the
    guest may have reused its buffer since."""


class Frame:
    """A frame the guest transmitted: ``views`` (memoryviews over guest
    memory), ``header`` (its 12-byte virtio-net header) and ``length``.
    Valid only during :meth:`NetBackend.transmit`: keep ``tobytes()``, not
    the frame. Frames from a transmit batch are read from guest memory only
    when asked; using one after transmit() returned raises StaleFrameError."""

    __slots__ = ("_views", "_header", "_length", "_c", "_batch", "_i")

    def __init__(self, views: list[memoryview], header: bytes, length: int):
        self._views = views
        self._header = header
        self._length = length
        self._c = None
        self._batch = None
        self._i = 0

    def _check(self):
        """The frame's C side, while its batch lasts (the caller holds the
        batch's lock: transmit() returning waits for it to let go)."""
        if not self._batch._live:
            raise StaleFrameError("a frame's data is valid only during transmit()")
        return self._c

    @property
    def views(self) -> list[memoryview]:
        batch = self._batch
        if batch is not None:
            # Looked at during transmit or not: the views end with it.
            with batch._lock:
                c = self._check()
                if self._views is None:
                    self._views = batch._device._views.iov(c.elem.mem, c.iov, 0, c.niov)
        return self._views

    @property
    def header(self) -> bytes:
        if self._header is None:
            with self._batch._lock:
                self._header = self._batch._header(self._check())
        return self._header

    @property
    def length(self) -> int:
        if self._length is None:
            with self._batch._lock:
                self._check()
                self._length = self._batch._describe()[self._i][0]
        return self._length

    def tobytes(self) -> bytes:
        batch = self._batch
        if batch is None:
            return b"".join(bytes(v) for v in self.views)
        with batch._lock:
            c = self._check()
            if self._views is None:
                _length, niov, base0, len0 = (batch._desc or batch._describe())[self._i]
                if niov == 1:
                    return string_at(base0, len0)     # one copy, straight from guest memory
                return batch._bytes(c)
            return b"".join(bytes(v) for v in self._views)


class FrameBatch(Sequence):
    """The frames of one :meth:`NetBackend.transmit` call, in ring order: a
    sequence of :class:`Frame`, made as they are looked at. Pass it whole
    (or a list of its frames) to ``inject_many`` to send them on without
    copying them into Python."""

    __slots__ = ("_device", "_c", "_n", "_live", "_frames", "_desc", "_lock")

    def __init__(self, device, frames, n: int):
        self._device = device
        self._c = frames            # struct vu_net_frame *[n], the worker's
        self._n = n
        self._live = True
        # Held while the frames' C side or guest memory is read (from any
        # thread: a back-end may hand the batch to one of its own): the end
        # of transmit() waits for it, so nothing reads them once they are
        # the guest's again (or their elements reused), but StaleFrameError.
        self._lock = threading.RLock()
        self._frames = None
        self._desc = None

    def __len__(self) -> int:
        return self._n

    def _frame(self, i: int) -> Frame:
        frames = self._frames
        if frames is None:
            frames = self._frames = [None] * self._n
        f = frames[i]
        if f is None:
            f = Frame.__new__(Frame)
            f._views = f._header = f._length = None
            f._c = self._c[i]
            f._batch = self
            f._i = i
            frames[i] = f
        return f

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._frame(j) for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("frame index out of range")
        return self._frame(i)

    def __iter__(self):
        for i in range(self._n):
            yield self._frame(i)

    def _end(self) -> None:
        """transmit() returned: the frames go back to the guest. The views
        made of them are released (ValueError on use, rather than touching
        a buffer the guest may have reused); one the back-end still exports
        (a buffer taken from it and kept) stays, its mapping pinned."""
        with self._lock:
            self._live = False
        for f in self._frames or ():
            if f is not None and f._views:
                release_views(f._views)

    # helpers for Frame, with the C types at hand
    def _describe(self) -> list:
        """(length, niov, address and length of iov[0]) per frame, read in
        one C call the first time a frame's data is asked for."""
        if self._desc is None:
            from ..native import ffi, lib
            desc = ffi.new("struct vu_net_pydesc[]", self._n)
            lib.vu_net_py_describe(self._c, self._n, desc)
            self._desc = list(_NETDESC.iter_unpack(ffi.buffer(desc)))
        return self._desc

    def _header(self, c) -> bytes:
        from ..native import ffi
        return bytes(ffi.buffer(ffi.addressof(c.hdr), 12))

    def _bytes(self, c) -> bytes:
        from ..native import ffi
        return b"".join(ffi.buffer(c.iov[j].iov_base, c.iov[j].iov_len)[:]
                        for j in range(c.niov))


_NETDESC = struct.Struct("=IIQQ")       # struct vu_net_pydesc
