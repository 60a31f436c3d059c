"""A connection's data plane: the C device state, its queues and workers.

Owns every fd it was handed (kick, call, err, log eventfds) and closes them;
changes to memory or ring configuration happen under the device write lock,
so a worker never sees half a change. Guest memory outlives every request
that uses it: a new table takes effect for new requests at once, and what
requests still in flight hold stays mapped (detached if the front-end took
it back) until they end (csrc/vu_memory.h).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

from .memory import GuestViews, MemoryTable
from . import native
from .native import check, ffi, lib
from .queue import Element, Queue

log = logging.getLogger(__name__)

#: A Python batch handler: gets the queue and the chains popped in one batch.
BatchHandler = Callable[[Queue, list[Element]], None]


@dataclass
class NativeHandler:
    """A queue handler written in C: ``fn(ctx, vq)`` runs in the worker.
    ``keepalive`` holds whatever owns ctx for as long as the queue runs;
    ``prepare(vq)``, if given, runs once before the ring first starts (to
    give the queue's elements their per-request state)."""
    fn: object
    ctx: object
    keepalive: object = None
    prepare: Callable | None = None


class _PyBinding:
    """What the C batch callback finds behind its ctx handle."""

    def __init__(self, queue: Queue, handler: BatchHandler):
        self.queue = queue
        self.handler = handler


def _complete_leftovers(elements: list[Element]) -> None:
    for element in elements:
        if not element.done:
            element.complete(0)


@ffi.def_extern()
def vu_py_batch(ctx, vq, elems, n):
    binding: _PyBinding = ffi.from_handle(ctx)
    queue = binding.queue
    batch = [Element(queue, elems[i]) for i in range(n)]
    queue._in_batch = True
    try:
        binding.handler(queue, batch)
    except Exception:
        # A back-end bug must not leave chains in flight forever: hand them
        # back empty and keep serving.
        log.exception("queue %d: Python handler failed; completing %d chains empty",
                      queue.index, sum(not e.done for e in batch))
        _complete_leftovers(batch)
    finally:
        queue._in_batch = False
    return 0


def _nonblocking(fd: int | None) -> None:
    """The front-end's eventfds are read and written on the event loop and
    in workers holding the device lock: a full counter (write) or a kick the
    front-end read back itself (read) must not block there."""
    if fd is not None:
        os.set_blocking(fd, False)


class DataPlane:
    """C device (``struct vu_dev``), its queues and the worker threads."""

    def __init__(self, num_queues: int, *, queues_per_worker: int = 1, poll_us: int = 0,
                 adaptive_poll_us: int | None = None, name: str = "device"):
        if num_queues < 1:
            raise ValueError("a device needs at least one queue")
        self._dev = lib.vu_dev_new(num_queues)
        # Held by locked() for its whole block and by close() while it frees
        # the device: a thread in locked() (set_read_only, resize: any
        # thread) never locks a freed device, nor has it freed under it.
        self._life = threading.Lock()
        if self._dev == ffi.NULL:
            raise MemoryError("vu_dev_new")
        self._key = int(ffi.cast("uintptr_t", self._dev))
        native.device_names[self._key] = name
        #: memoryviews over guest buffers for Python code (keep their mapping)
        self.views = GuestViews(installed=self._installed_memory)
        self.queues = [Queue(self._dev.vqs[i], self.views) for i in range(num_queues)]
        self._kick = [None] * num_queues
        self._call = [None] * num_queues
        self._err = [None] * num_queues
        self._log_fd: int | None = None
        self._inflight_queue_size = 0    # entries each ring's inflight region has room for
        self._handles: list[object] = []   # keeps cffi handles alive
        self._workers = []
        self._stopping = threading.Lock()
        self._queues_per_worker = queues_per_worker
        self._started = False
        self._closed = False        # before the workers: a failed one closes what was made
        groups = (num_queues + queues_per_worker - 1) // queues_per_worker
        for _ in range(groups):
            w = lib.vu_worker_new(poll_us)
            if w == ffi.NULL:
                self.close()
                raise OSError("could not create a worker (epoll/eventfd)")
            if adaptive_poll_us is not None:
                lib.vu_worker_set_adaptive_poll(w, adaptive_poll_us)
            self._workers.append(w)

    @property
    def memory(self) -> MemoryTable:
        """The installed region table (never changed in place)."""
        return MemoryTable(self._dev.mem)

    def _installed_memory(self):
        """The table new requests use (NULL once closed)."""
        dev = self._dev
        return dev.mem if dev != ffi.NULL else ffi.NULL

    def replace_memory(self, table: MemoryTable) -> list[int]:
        """Installs ``table`` (built with MemoryTable.create or copy) for new
        requests at once and re-translates running rings; the old table
        stays for the requests still using it. Returns rings that broke."""
        with self.locked():
            lib.vu_dev_install_mem(self._dev, table._mem)
            table._mem = ffi.NULL        # the device owns it now
            self.views.forget()
            return self.remap_started()

    def add_region(self, region, fd: int) -> None:
        """ADD_MEM_REG: a copy of the table with the region (fd closed)."""
        table = self.memory.copy()
        try:
            table.add(region, fd)
        except BaseException:
            table.release()
            raise
        self.replace_memory(table)

    def remove_region(self, region) -> list[int]:
        """REM_MEM_REG: a copy of the table without the region. Returns the
        rings that lived in it (now broken)."""
        table = self.memory.copy()
        try:
            table.remove(region)
        except BaseException:
            table.release()
            raise
        return self.replace_memory(table)

    # -- locking ---------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        """Holds the device write lock: no worker is inside a batch. Once
        closed there is no worker and no device: a no-op. close() frees the
        device only once such a block has ended (nothing inside one may wait
        for the event loop, where close() may run)."""
        with self._life:
            if self._dev == ffi.NULL:
                yield
                return
            lib.vu_dev_wrlock(self._dev)
            try:
                yield
            finally:
                lib.vu_dev_unlock(self._dev)

    @property
    def features(self) -> int:
        return self._dev.features

    def set_features(self, features: int) -> None:
        with self.locked():
            lib.vu_dev_set_features(self._dev, features)

    # -- handlers and workers -------------------------------------------
    def _worker_of(self, index: int):
        return self._workers[index // self._queues_per_worker]

    def attach(self, index: int, handler: BatchHandler | NativeHandler) -> None:
        """Sets what serves queue ``index`` (before the rings start)."""
        vq = self._dev.vqs[index]
        if isinstance(handler, NativeHandler):
            fn, ctx = handler.fn, handler.ctx
            self._handles.append(handler)
            if handler.prepare is not None:
                check(handler.prepare(vq), f"queue {index}: prepare")
        else:
            h = ffi.new_handle(_PyBinding(self.queues[index], handler))
            self._handles.append(h)
            fn, ctx = lib.vu_py_handler, h
        check(lib.vu_worker_add_queue(self._worker_of(index), vq, fn, ctx), f"queue {index}")

    def worker_stats(self) -> list[dict]:
        """Per worker thread: times it woke from epoll, requests its
        adaptive polling caught without sleeping, and its current window
        (racy reads of counters the thread owns: for tests and describe)."""
        return [{"wakeups": w.wakeups, "spin_catches": w.spin_catches,
                 "adaptive_poll_us": w.spin_us} for w in self._workers]

    def start_workers(self) -> None:
        if not self._started:
            for w in self._workers:
                check(lib.vu_worker_start(w), "worker start")
            self._started = True

    # -- per-queue fds ----------------------------------------------------
    @staticmethod
    def _close(fd: int | None) -> None:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def set_kick(self, index: int, fd: int | None) -> None:
        """fd None: the front-end asked us to poll the ring (no kick fd)."""
        _nonblocking(fd)
        vq = self._dev.vqs[index]
        with self.locked():
            rc = lib.vu_worker_set_kick(self._worker_of(index), vq,
                                        -1 if fd is None else fd, fd is None)
        old, self._kick[index] = self._kick[index], fd
        if old != fd:
            self._close(old)
        check(rc, f"queue {index}: kick fd")

    def set_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL. The new fd is signalled once: a completion the
        driver was never told about (a back-end that died between publishing
        it and signalling) would otherwise hang it forever."""
        _nonblocking(fd)
        vq = self._dev.vqs[index]
        with self.locked():
            vq.call_fd = -1 if fd is None else fd
        old, self._call[index] = self._call[index], fd
        if old != fd:
            self._close(old)
        if fd is not None:
            lib.vu_vq_signal(vq)

    def set_err(self, index: int, fd: int | None) -> None:
        _nonblocking(fd)
        with self.locked():
            self._dev.vqs[index].err_fd = -1 if fd is None else fd
        old, self._err[index] = self._err[index], fd
        if old != fd:
            self._close(old)

    def kick(self, index: int) -> None:
        """An in-band kick (VRING_KICK) or a nudge after enabling."""
        lib.vu_worker_kick(self._worker_of(index), self._dev.vqs[index])

    # -- ring state -------------------------------------------------------
    def vq(self, index: int):
        return self._dev.vqs[index]

    def set_num(self, index: int, num: int) -> None:
        check(lib.vu_vq_set_num(self._dev.vqs[index], num), f"ring {index}: size {num}")

    def set_addr(self, index: int, addr) -> None:
        """SET_VRING_ADDR; on a running ring (migration toggling the log
        flag) the ring is re-translated under the lock."""
        with self.locked():
            rc = lib.vu_vq_set_addr(self._dev.vqs[index], addr.flags, addr.desc, addr.used,
                                    addr.avail, addr.log)
        check(rc, f"ring {index}: addresses")

    def set_base(self, index: int, num: int) -> None:
        check(lib.vu_vq_set_base(self._dev.vqs[index], num), f"ring {index}: base")

    def set_inflight(self, area) -> None:
        """Points each ring at its region of the inflight area (stopped rings
        only: a started one keeps what it has)."""
        with self.locked():
            running = [q.index for q in self.queues if q.started]
            if running:
                raise ValueError(f"inflight area while rings {running} run")
            for i in range(len(self.queues)):
                ptr = area.queue_region(i)
                check(lib.vu_vq_set_inflight(self._dev.vqs[i], ffi.NULL if ptr is None else ptr),
                      f"ring {i}: inflight")
            self._inflight_queue_size = area.queue_size

    def start_queue(self, index: int, *, enable: bool | None = None) -> None:
        """Starts the ring (SET_VRING_KICK). A ring whose addresses don't
        translate breaks (error eventfd, one log line) and stays stopped; the
        other rings serve on, and new addresses with another kick, or a
        reset, bring it back. Raises only for a ring that was never set up."""
        vq = self._dev.vqs[index]
        with self.locked():
            if not vq.started:
                if vq.inflight_area != ffi.NULL and vq.size > self._inflight_queue_size:
                    log.warning("ring %d: %d entries, its inflight region has room for %d; "
                                "not tracked", index, vq.size, self._inflight_queue_size)
                    lib.vu_vq_set_inflight(vq, ffi.NULL)
                self._forget_if_restarted(index)
                rc = lib.vu_vq_start(vq)
                if rc in (-lib.VU_ERR_RING_UNMAPPED, -lib.VU_ERR_BAD_BASE):
                    lib.vu_vq_break(vq, -rc, vq.desc_addr)
                    return
                if rc == -lib.VU_ERR_KICK_FD:
                    # its kick fd ended already (the worker saw it): no
                    # kick would come, and a new kick fd starts it
                    lib.vu_vq_break(vq, -rc, vq.kick_errno)
                    return
                check(rc, f"queue {index}: start")
            elif vq.broken and vq.error == lib.VU_ERR_KICK_FD and not vq.kick_eof:
                # broken only because its old kick fd ended (the worker saw
                # it, the ring as it was): the new one is watched (set_kick)
                vq.broken = False
                vq.error = 0
            if enable is not None:
                vq.enabled = enable
        # Whatever was published before we (re)started may never have been
        # signalled (a back-end that died in between): one interrupt, harmless
        # if spurious (libvhost-user does the same).
        lib.vu_vq_signal(vq)
        self.kick(index)

    def _forget_if_restarted(self, index: int) -> None:
        """A ring set up again elsewhere than it stopped is a new driver's
        (the guest reset the device): what the old one is owed must reach
        neither its ring nor its memory (vu_vq_forget_if_restarted).
        Device locked for writing."""
        given_up = lib.vu_vq_forget_if_restarted(self._dev.vqs[index])
        if not given_up:
            return
        log.warning("ring %d set up again at another base or address (the guest reset the "
                    "device): %d requests of its old driver still running are given up",
                    index, given_up)
        rc = lib.vu_dev_detach_orphans(self._dev)
        if rc == -lib.VU_ERR_INFLIGHT_BUSY:
            log.warning("ring %d: other rings still have requests in the same memory: the "
                        "given-up requests write to the guest's buffers until they end", index)
            return
        check(rc, "detaching given-up requests")
        self.views.forget()
        self.remap_started()

    def set_enabled(self, index: int, enabled: bool) -> None:
        with self.locked():
            self._dev.vqs[index].enabled = enabled
        if enabled:
            self.kick(index)

    def stop_queue(self, index: int) -> int:
        """Stops the ring and returns its base (GET_VRING_BASE). The ring's
        fds are closed: a restart brings new ones."""
        vq = self._dev.vqs[index]
        with self.locked():
            lib.vu_vq_stop(vq)
            base = lib.vu_vq_get_base(vq)
            lib.vu_worker_set_kick(self._worker_of(index), vq, -1, False)
            vq.call_fd = -1
            vq.err_fd = -1
        for fds in (self._kick, self._call, self._err):
            self._close(fds[index])
            fds[index] = None
        return base

    def reset_queue(self, index: int) -> None:
        """Back to the unconfigured state; chains still in flight become
        orphans (their completion publishes nothing)."""
        self.stop_queue(index)
        with self.locked():
            lib.vu_vq_reset(self._dev.vqs[index])

    def orphan_requests(self) -> int:
        """Every request still in flight becomes an orphan, and guest memory
        is remapped for new requests so that what the orphans hold is
        detached: a late completion can neither reach the guest's memory nor
        its rings. Returns how many there were."""
        with self.locked():
            n = lib.vu_dev_orphan_requests(self._dev)
            self.views.forget()
            self.remap_started()
        return check(n, "orphaning requests")

    def remap_started(self) -> list[int]:
        """After a memory change: re-translates running rings; returns the
        indices of rings that broke because their memory went away."""
        broken = []
        for q in self.queues:
            if q.started and lib.vu_vq_remap(q._vq) < 0:
                broken.append(q.index)
        return broken

    def inflight(self, index: int | None = None) -> int:
        """Requests in flight on ring ``index`` (every ring if None), not
        counting those answered and held or given up on (orphans)."""
        if index is None:
            return lib.vu_dev_inflight(self._dev)
        return lib.vu_vq_inflight(self._dev.vqs[index])

    # -- dirty log ----------------------------------------------------------
    def set_log(self, fd: int, size: int, offset: int) -> None:
        try:
            with self.locked():
                check(lib.vu_dev_set_log(self._dev, fd, size, offset), "dirty log")
        finally:
            os.close(fd)

    def set_log_call(self, fd: int | None) -> None:
        _nonblocking(fd)
        with self.locked():
            self._dev.log_call_fd = -1 if fd is None else fd
        old, self._log_fd = self._log_fd, fd
        if old != fd:
            self._close(old)

    # -- teardown -------------------------------------------------------------
    def stop_workers(self) -> None:
        """Joins the worker threads; no handler runs after this, whichever
        thread calls it (a second caller waits for the first's join)."""
        with self._stopping:
            for w in self._workers:
                lib.vu_worker_free(w)
            self._workers = []

    def close(self) -> int:
        """Joins the workers and lets the C device go. Requests still in
        flight (a back-end that never answered) keep it, detached from guest
        memory, until they end. Returns how many there were."""
        if self._closed:
            return 0
        self._closed = True
        self.stop_workers()
        for fds in (self._kick, self._call, self._err):
            for i, fd in enumerate(fds):
                self._close(fd)
                fds[i] = None
        self._close(self._log_fd)
        self.views.forget()
        with self._life:        # not while a thread holds its lock (locked())
            orphans = lib.vu_dev_close(self._dev)
            self._dev = ffi.NULL
        native.device_names.pop(self._key, None)
        self._handles.clear()
        return orphans
