"""What split and packed driver rings share, and the queue that pairs a ring
with its kick/call eventfds.

Ordering: the rings write guest memory with plain mmap stores, one Python
call per field, in the order the virtio spec requires. That is enough on
x86 (stores are not reordered with stores); other CPUs would need fences.
"""
from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from ..protocol import PACKED_DESC, SPLIT_DESC
from .connection import DEFAULT_TIMEOUT, FrontendError, FrontendTimeout
from .memory import GuestMemory

# Split and packed descriptors differ in field order, not in size.
assert SPLIT_DESC.size == PACKED_DESC.size
INDIRECT_DESC_SIZE = SPLIT_DESC.size


class RingFull(FrontendError):
    """Not enough free descriptors (or buffer ids) for the chain."""


class RingProtocolError(FrontendError):
    """The back-end wrote something into the ring that a device must not."""


class Buffer(NamedTuple):
    """One guest buffer of a chain; ``writable`` means device-writable."""
    gpa: int
    length: int
    writable: bool = False


@dataclass(frozen=True)
class Used:
    """A completed chain: its id (split head / packed buffer id), the length
    the device says it wrote, and the token given to ``add``."""
    id: int
    length: int
    token: object = None


def as_buffers(chain: Iterable) -> list[Buffer]:
    """Accepts Buffers or plain (gpa, length[, writable]) tuples."""
    out = [b if isinstance(b, Buffer) else Buffer(*b) for b in chain]
    if not out:
        raise ValueError("a chain needs at least one buffer")
    seen_writable = False
    for b in out:
        if b.length < 0 or b.length > 0xFFFFFFFF:
            raise ValueError(f"buffer length {b.length} does not fit a descriptor")
        # virtio: device-readable buffers come before device-writable ones.
        if seen_writable and not b.writable:
            raise ValueError("a readable buffer follows a writable one")
        seen_writable |= b.writable
    return out


class DriverRing:
    """Bookkeeping common to both layouts: memory, indirect tables.

    ``indirect_entries``: each chain id owns a table of that many
    descriptors, allocated with the ring (so it outlives any scratch scope
    of the caller's). A longer table is allocated when needed, and lives as
    long as the caller's other buffers.
    """

    def __init__(self, mem: GuestMemory, size: int, *, event_idx: bool,
                 indirect_entries: int = 0):
        if not 1 <= size <= 32768:
            raise ValueError(f"queue size {size} out of range")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect_entries = indirect_entries
        self._indirect_gpa = (mem.alloc(size * indirect_entries * INDIRECT_DESC_SIZE, 16)
                              if indirect_entries else 0)

    packed: bool
    # SET_VRING_ADDR takes these three (as user addresses).
    desc_gpa: int
    driver_gpa: int     # split: avail ring; packed: driver event suppression
    device_gpa: int     # split: used ring; packed: device event suppression

    def _zero(self, gpa: int, length: int) -> None:
        self.mem.fill(gpa, length, 0)

    def _indirect_table(self, ident: int, entries: int) -> int:
        """Where chain ``ident``'s indirect table of ``entries`` goes."""
        if entries <= self.indirect_entries:
            return self._indirect_gpa + ident * self.indirect_entries * INDIRECT_DESC_SIZE
        return self.mem.alloc(entries * INDIRECT_DESC_SIZE, 16)

    # Implemented per layout.
    @property
    def base(self) -> int:
        """SET_VRING_BASE's num for the ring's current position."""
        raise NotImplementedError

    @property
    def num_free(self) -> int:
        raise NotImplementedError

    def add(self, buffers, token=None, *, indirect: bool = False) -> int:
        raise NotImplementedError

    def publish(self) -> int:
        raise NotImplementedError

    def needs_kick(self) -> bool:
        raise NotImplementedError

    def collect(self, limit: int | None = None) -> list[Used]:
        raise NotImplementedError

    def enable_notifications(self) -> None:
        raise NotImplementedError

    def disable_notifications(self) -> None:
        raise NotImplementedError

    @property
    def in_flight(self) -> int:
        raise NotImplementedError


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class Virtqueue:
    """A driver ring plus the eventfds the back-end was given for it.

    ``submit`` = ``add`` + ``publish`` + kick if the device wants one;
    ``wait`` collects completions, sleeping on the call eventfd.
    """

    def __init__(self, index: int, ring: DriverRing, *, err: bool = False):
        self.index = index
        self.ring = ring
        self.kick_fd = _eventfd()
        self.call_fd = _eventfd()
        self.err_fd = _eventfd() if err else None
        self._backlog: list[Used] = []

    @property
    def packed(self) -> bool:
        return self.ring.packed

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = -1
        self.err_fd = None

    # -- driver -> device ----------------------------------------------------------
    def add(self, buffers, token=None, *, indirect: bool = False) -> int:
        return self.ring.add(buffers, token, indirect=indirect)

    def kick(self) -> None:
        """Signals the kick eventfd, whatever the device asked for."""
        os.eventfd_write(self.kick_fd, 1)

    def notify(self) -> bool:
        """Publishes added chains and kicks if the device wants it; True if kicked."""
        self.ring.publish()
        if self.ring.needs_kick():
            self.kick()
            return True
        return False

    def submit(self, buffers, token=None, *, indirect: bool = False) -> int:
        ident = self.add(buffers, token, indirect=indirect)
        self.notify()
        return ident

    # -- device -> driver ----------------------------------------------------------
    def take_calls(self) -> int:
        """Drains the call eventfd: how many notifications arrived (0 if none)."""
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0

    def take_errors(self) -> int:
        """Drains the error eventfd (SET_VRING_ERR), if one was set up."""
        if self.err_fd is None:
            return 0
        try:
            return os.eventfd_read(self.err_fd)
        except BlockingIOError:
            return 0

    def poll(self) -> list[Used]:
        """Completed chains so far, without waiting."""
        done, self._backlog = self._backlog + self.ring.collect(), []
        return done

    def wait(self, count: int = 1, timeout: float = DEFAULT_TIMEOUT) -> list[Used]:
        """Waits until at least ``count`` chains completed and returns them all.

        Sleeps on the call eventfd, so a back-end that never notifies makes
        this time out even if it did fill the used ring; that is on purpose.
        On timeout what did complete stays queued for the next poll/wait.
        """
        deadline = time.monotonic() + timeout
        done = self.poll()
        while len(done) < count:
            self.ring.enable_notifications()
            # Re-check after enabling: a completion that raced the enable
            # may not be notified. Sleep only when that finds nothing: what
            # it takes moves the event on (used_event), and a completion
            # the device made meanwhile was checked against the old one.
            fresh = self.ring.collect()
            if fresh:
                done += fresh
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.call_fd], [], [], remaining)[0]:
                self._backlog = done
                raise FrontendTimeout(f"queue {self.index}: {len(done)} of {count} completions "
                                      f"after {timeout}s ({self.ring.in_flight} in flight)")
            self.take_calls()
            done += self.ring.collect()
        return done
