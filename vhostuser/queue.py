"""Python faces of virtqueues and popped descriptor chains.

Python back-ends get :class:`Element` batches whose buffers are memoryviews
straight over guest memory: no copy between the guest and the handler.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

from .memory import GuestViews, release_views
from .native import check, error_name, ffi, lib, strerror


@dataclass(frozen=True)
class QueueStats:
    popped: int
    pushed: int
    notifies: int
    kicks: int
    inflight: int


class Element:
    """One descriptor chain. ``readable``: buffers the driver filled;
    ``writable``: buffers the device fills. Fill them before completing:
    the guest owns them again after that, and the views handed out are
    released then (ValueError on use: not a read or write of memory the
    guest reused; one still exported, a buffer taken from it and kept,
    stays, and never faults: its mapping stays until the view is gone)."""

    __slots__ = ("queue", "_elem", "_done", "_views")

    def __init__(self, queue: "Queue", elem_ptr):
        self.queue = queue
        self._elem = elem_ptr
        self._done = False
        self._views: list[memoryview] | None = None

    def _check_live(self) -> None:
        if self._done:
            raise ValueError(f"element {self.id} on queue {self.queue.index} completed: "
                             f"its buffers are the guest's again")

    def _handed_out(self, views: list[memoryview]) -> list[memoryview]:
        if self._views is None:
            self._views = list(views)
        else:
            self._views.extend(views)
        if self._done:
            # complete() ran in another thread while these were made: it
            # released the list before they were in it.
            release_views(views)
            self._check_live()
        return views

    @property
    def id(self) -> int:
        return self._elem.id

    @property
    def readable(self) -> list[memoryview]:
        # Checked before translating: once completed the C element's
        # memory table is gone (NULL) and translating would fault.
        self._check_live()
        e = self._elem
        return self._handed_out(self.queue._views.iov(e.mem, e.iov, 0, e.out_num))

    @property
    def writable(self) -> list[memoryview]:
        self._check_live()
        e = self._elem
        return self._handed_out(self.queue._views.iov(e.mem, e.iov, e.out_num, e.in_num))

    @property
    def readable_len(self) -> int:
        return self._elem.out_len

    @property
    def writable_len(self) -> int:
        return self._elem.in_len

    def read_all(self) -> bytes:
        """Copy of the readable part (convenience; the views avoid the copy)."""
        return b"".join(bytes(v) for v in self.readable)

    def write(self, data: bytes, offset: int = 0) -> int:
        """Copies data into the writable buffers from offset; returns bytes written."""
        written = 0
        pos = 0
        for view in self.writable:
            end = pos + len(view)
            if end > offset and written < len(data):
                start = max(offset - pos, 0)
                n = min(len(view) - start, len(data) - written)
                view[start:start + n] = data[written:written + n]
                written += n
            pos = end
        return written

    def complete(self, written: int = 0, *, notify: bool | None = None) -> None:
        """Returns the chain to the driver, ``written`` bytes filled in.

        Inside a batch handler it is published at once and the guest
        notified once for the whole batch; from anywhere else (async
        back-ends) it is published and the guest notified at once.
        """
        if self._done:
            raise ValueError(f"element {self.id} on queue {self.queue.index} completed twice")
        # Checked before the element is marked done: refused, it can still
        # be completed (a wrong value must not keep it from the guest).
        try:
            written = operator.index(written)
        except TypeError:
            raise TypeError(f"element {self.id} on queue {self.queue.index}: written must be "
                            f"an int, not {type(written).__name__}") from None
        if not 0 <= written <= 0xFFFFFFFF:
            raise ValueError(f"element {self.id} on queue {self.queue.index}: written "
                             f"{written} out of range")
        self._done = True
        views, self._views = self._views, None
        release_views(views or ())
        notify = not self.queue._in_batch if notify is None else bool(notify)
        vq = self.queue._vq
        # Under the device read lock, published at once: a batch runs
        # without the lock, and the control plane remaps the ring, swaps the
        # dirty log or stops the ring under the write lock. A push left
        # unpublished when GET_VRING_BASE stops the ring would be counted
        # in the base it answers and then never reach the used ring.
        # (Inside a batch the batch's end notifies.)
        rc = lib.vu_vq_complete_unlocked(vq, self._elem, written, notify)
        check(rc, f"queue {self.queue.index}: complete element {self.id}")

    @property
    def done(self) -> bool:
        return self._done


class Queue:
    """A virtqueue of a device (``struct vu_vq``)."""

    def __init__(self, vq_ptr, views: GuestViews | None = None):
        self._vq = vq_ptr
        self._views = views if views is not None else GuestViews()
        self._in_batch = False

    @property
    def index(self) -> int:
        return self._vq.index

    @property
    def size(self) -> int:
        return self._vq.size

    @property
    def started(self) -> bool:
        return bool(self._vq.started)

    @property
    def enabled(self) -> bool:
        return bool(self._vq.enabled)

    @property
    def packed(self) -> bool:
        return bool(self._vq.packed)

    @property
    def broken(self) -> bool:
        return bool(self._vq.broken)

    @property
    def last_avail_idx(self) -> int:
        """Next avail entry the device will take (packed: without the wrap bit)."""
        return self._vq.last_avail_idx

    @property
    def used_idx(self) -> int:
        """Next used entry the device will write."""
        return self._vq.used_idx

    @property
    def error(self) -> str | None:
        """Why the ring broke (C error name and message), or None."""
        if not self._vq.broken:
            return None
        code = self._vq.error
        return f"{error_name(code)} ({strerror(code)}; value {self._vq.error_detail:#x})"

    @property
    def inflight(self) -> int:
        return lib.vu_vq_inflight(self._vq)

    def stats(self) -> QueueStats:
        vq = self._vq
        return QueueStats(vq.stat_popped, vq.stat_pushed, vq.stat_notifies, vq.stat_kicks,
                          lib.vu_vq_inflight(vq))

    def pop(self) -> Element | None:
        """Pops one chain (for handlers that pull themselves). Raises
        QueueError when the ring is malformed; the queue is then broken."""
        out = ffi.new("struct vu_elem **")
        # Translating the chain reads the memory table, which the control
        # plane replaces under the write lock; batches run without the lock.
        dev = self._vq.dev
        lib.vu_dev_rdlock(dev)
        try:
            rc = lib.vu_vq_pop(self._vq, out)
        finally:
            lib.vu_dev_unlock(dev)
        check(rc, f"queue {self.index}")
        return Element(self, out[0]) if rc == 1 else None
