"""The virtio-blk device: features, config space, and who does the I/O."""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import operator
import os
import reprlib
import struct
import threading
import time


from ..dataplane import NativeHandler
from ..memory import GuestViews
from ..memory import release_views as _release
from ..device import Device
from ..errors import ProtocolError, RequestsInFlight
from ..handler import drain_timeout
from ..loglimit import LogLimiter
from ..native import check, ffi, lib
from ..protocol import Request, bits
from ..queue import Queue
from ..qos import QosLimits
from .backends import (BackendError, BlockBackend, FileBackend, RamBackend, Unsupported,
                       _unbound, awaitable_result, stabilising_flush,
                       stabilising_flush_on_loop)
from .spec import (CONFIG_WRITEBACK_OFFSET, ID_BYTES, LIFETIME, SECTOR, BlkConfig, BlkFeature,
                   BlkStatus, BlkType)

log = logging.getLogger(__name__)

F = BlkFeature

#: Upper bounds (microseconds) of the latency histogram's buckets; the last
#: bucket counts everything slower.
LATENCY_BOUNDS_US = tuple(1 << i for i in range(lib.VU_BLK_LAT_BUCKETS - 1)) + (float("inf"),)
_IN, _OUT, _OK = int(BlkType.IN), int(BlkType.OUT), int(BlkStatus.OK)
_ZEROES = int(BlkType.WRITE_ZEROES)
_UNSUPP, _IOERR = int(BlkStatus.UNSUPP), int(BlkStatus.IOERR)
#: The back-end method behind each request type (write-through writes: write_fua).
_METHODS = {BlkType.IN: "read", BlkType.OUT: "write", BlkType.FLUSH: "flush",
            BlkType.DISCARD: "discard", BlkType.WRITE_ZEROES: "write_zeroes",
            BlkType.GET_LIFETIME: "lifetime", BlkType.GET_ID: "get_id"}
_PENDING = int(lib.VU_BLK_S_PENDING)

# (device, task) while a Python back-end's request runs: a plain method in
# its queue worker's batch (task None), an async one in the task that awaits
# it (_complete_later). A wait for the requests in flight started there
# would wait for itself (_refuse_in_own_request).
_IN_REQUEST: contextvars.ContextVar = contextvars.ContextVar("vhostuser_blk_in_request",
                                                             default=None)
assert _OK == 0
_PYDESC = struct.Struct("=IIQQQQ")       # struct vu_blk_pydesc
assert _PYDESC.size == ffi.sizeof("struct vu_blk_pydesc")
_IO_MODES = {"inline": lib.VU_BLK_IO_INLINE, "nowait": lib.VU_BLK_IO_NOWAIT,
             "uring": lib.VU_BLK_IO_URING}
_IO_NAMES = {v: k for k, v in _IO_MODES.items()}
_COUNTERS = ("reads", "writes", "flushes", "discards", "write_zeroes", "others", "errors",
             "unsupported", "bytes_read", "bytes_written", "completed", "latency_ns_sum",
             "stable_writes", "stable_syncs")


class BlkDevice(Device):
    """A virtio-blk disk served from a file, RAM, or a Python back-end."""

    device_id = 2

    def __init__(self, backend: FileBackend | RamBackend | BlockBackend, *, num_queues: int = 1,
                 serial: str = "", read_only: bool | None = None, poll_us: int = 0,
                 aio: str = "io_uring"):
        if num_queues > lib.VU_BLK_MAX_QUEUES:
            raise ValueError(f"a blk device has at most {lib.VU_BLK_MAX_QUEUES} queues, "
                             f"not {num_queues}")
        super().__init__(num_queues, poll_us=poll_us)
        self.backend = backend
        self.read_only = backend.read_only if read_only is None else read_only
        sync_fds: list[int] = []
        if isinstance(backend, FileBackend):
            kind = lib.VU_BLK_BACKEND_FILE
            if backend.fd < 0:
                backend.open()
            if not backend.read_only:
                # Each queue's syncs, and the control plane's, through an
                # open file of their own: each is told of a failed writeback.
                sync_fds = backend.open_sync_files(num_queues + 1)
        elif isinstance(backend, RamBackend):
            kind = lib.VU_BLK_BACKEND_RAM
        elif isinstance(backend, BlockBackend):
            kind = lib.VU_BLK_BACKEND_PYTHON
        else:
            raise TypeError(f"not a block back-end: {backend!r}")
        self._blk = lib.vu_blk_new(kind)
        if self._blk == ffi.NULL:
            raise MemoryError("vu_blk_new")
        self._handle = ffi.new_handle(self)
        if aio not in ("io_uring", "sync"):
            raise ValueError(f"aio must be io_uring or sync, not {aio!r}")
        self.aio = "sync"
        #: what was asked for, and why aio differs from it (None: it doesn't)
        self.aio_requested = aio if kind == lib.VU_BLK_BACKEND_FILE else None
        self.aio_note: str | None = None
        self.mapped_reads = False
        if kind == lib.VU_BLK_BACKEND_FILE:
            mapped = lib.vu_blk_set_file(self._blk, backend.fd, backend.direct)
            if mapped < 0:
                log.warning("%s: can't map it for reading (%s); reads use preadv",
                            backend.path, os.strerror(-mapped))
            # memcpy from a mapping of its page cache (tmpfs, local disk file systems)
            self.mapped_reads = mapped == 1
            for slot, fd in enumerate(sync_fds):
                lib.vu_blk_set_sync_fd(self._blk, slot if slot < num_queues
                                       else lib.VU_BLK_MAX_QUEUES, fd)
            if aio == "io_uring":
                # Many requests in flight per queue; without io_uring (old
                # kernel, seccomp) the workers do the I/O themselves.
                rc = lib.vu_blk_set_uring(self._blk, True)
                if rc < 0:
                    self.aio_note = f"io_uring unavailable ({os.strerror(-rc)})"
                elif rc == 1:
                    self.aio_note = "the image is in memory (tmpfs): faster in the queue workers"
                else:
                    self.aio = "io_uring"
                if self.aio_note is not None:
                    # Not what was asked for: said at the default log level.
                    log.warning("%s: aio io_uring asked for, synchronous I/O used: %s",
                                backend.path, self.aio_note)
        elif kind == lib.VU_BLK_BACKEND_RAM:
            check(lib.vu_blk_set_ram(self._blk, backend.size()), "RAM disk")
        else:
            self._blk.py_ctx = self._handle
            # Requests per call into Python (default 32); for measurements.
            self._blk.py_batch = int(os.environ.get("VHOSTUSER_BLK_PY_BATCH", "0"))
        self._kind = kind
        self._loop: asyncio.AbstractEventLoop | None = None
        # Views over guest buffers: the connected data plane's (on_connect);
        # this one serves a device driven without a session (the ring lab).
        self._views = GuestViews()
        # Per queue: the last batch's writes done in write-back mode (indices).
        self._written_back: dict[int, list[int]] = {}
        # Requests of a Python back-end still running on the event loop; they
        # may outlive their session, and their completion needs self._blk.
        self._late = 0
        self._late_lock = threading.Lock()   # counted in workers, uncounted on the loop
        self._closing = False
        self._resizing = asyncio.Lock()      # aresize(): one ftruncate at a time
        self._barrier_lock = threading.Lock()   # one barrier begins at a time
        # Failed requests come at request rate when a store is down: logged
        # rate-limited, with per-queue counts of the lines held back.
        self._log = LogLimiter(log)
        self.config = BlkConfig(capacity=0, num_queues=num_queues)
        block_sectors = self._blk.lim.block_sectors
        if block_sectors > 1:
            # O_DIRECT on storage with larger logical blocks: the guest is
            # told, so it reads and writes in whole ones (others fail).
            self.config.blk_size = block_sectors * SECTOR
            # physical block (blk_size << exp): 4096 bytes at least, as always
            self.config.physical_block_exp = max(0, (4096 // self.config.blk_size).bit_length()
                                                 - 1)
        try:
            self._refresh_capacity()
        except BaseException:
            lib.vu_blk_free(self._blk)
            self._blk = ffi.NULL
            raise
        lim = self._blk.lim
        serial_bytes = serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
        ffi.memmove(lim.serial, serial_bytes, ID_BYTES)
        for name in ("max_discard_sectors", "max_discard_seg", "max_write_zeroes_sectors",
                     "max_write_zeroes_seg", "max_secure_erase_sectors", "max_secure_erase_seg"):
            setattr(lim, name, getattr(self.config, name))
        lim.read_only = self.read_only
        lim.write_zeroes_unmap = kind != lib.VU_BLK_BACKEND_RAM
        self.config.write_zeroes_may_unmap = int(lim.write_zeroes_unmap)
        lim.writeback = True
        # FLUSH and CONFIG_WCE as last negotiated (None: not since a reset).
        self._cache_features: int | None = None
        self._qos = QosLimits()
        self._close_flushed = False
        self._close_pending: list = []      # close() on a running loop: what it left running
        path = os.environ.get("VHOSTUSER_BLK_IO_PATH")
        if path and kind == lib.VU_BLK_BACKEND_FILE:
            # For measuring one choice against another (bench/README.md).
            self.set_io_path(**dict(kv.split("=", 1) for kv in path.split(",")))
            log.warning("I/O path set by VHOSTUSER_BLK_IO_PATH: %s", self.io_path)

    # -- what is offered ---------------------------------------------------------
    def _offers(self, feature: BlkFeature) -> bool:
        if feature in (F.DISCARD, F.WRITE_ZEROES, F.SECURE_ERASE, F.CONFIG_WCE):
            if self.read_only:
                return False
        if feature == F.SECURE_ERASE:
            # Only where it erases for real (RAM; a block device that takes
            # BLKSECDISCARD): zeroes over a file on an SSD or a copy-on-write
            # file system leave the old data on the medium.
            return self._kind != lib.VU_BLK_BACKEND_PYTHON and lib.vu_blk_can_secure_erase(self._blk)
        if self._kind == lib.VU_BLK_BACKEND_PYTHON:
            if feature == F.DISCARD:
                return self.backend.supports("discard")
            if feature == F.LIFETIME:
                return self._offers_lifetime()
        return feature != F.LIFETIME

    def _offers_lifetime(self) -> bool:
        """Whether a Python back-end has lifetime metrics. Its lifetime()
        failing now is its storage failing, not a protocol error: the
        negotiation goes on, the feature is offered if lifetime() is the
        back-end's own, and GET_LIFETIME requests fail while it raises."""
        try:
            return self.backend.lifetime() is not None
        except Exception as exc:
            self._log.log(("offer", "lifetime"), logging.WARNING,
                          "block back-end: %s.lifetime() failed: %s: %s; LIFETIME offered, "
                          "its requests fail while it does", type(self.backend).__name__,
                          type(exc).__name__, exc)
            return self.backend.supports("lifetime")

    def device_features(self) -> int:
        wanted = [F.SIZE_MAX, F.SEG_MAX, F.BLK_SIZE, F.TOPOLOGY, F.FLUSH, F.CONFIG_WCE, F.MQ,
                  F.DISCARD, F.WRITE_ZEROES, F.SECURE_ERASE, F.LIFETIME]
        if self.read_only:
            wanted.append(F.RO)
        return bits(*(f for f in wanted if f == F.RO or self._offers(f)))

    def config_space(self) -> bytes:
        self.config.writeback = int(self._blk.lim.writeback)
        return self.config.pack()

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        # Only `writeback` is writable, and only with CONFIG_WCE.
        if offset != CONFIG_WRITEBACK_OFFSET or len(data) != 1:
            raise ProtocolError(Request.SET_CONFIG, f"offset {offset} size {len(data)} is read-only")
        if not self.session or not self.session.features & (1 << F.CONFIG_WCE):
            raise ProtocolError(Request.SET_CONFIG, "CONFIG_WCE not negotiated")
        if data[0] > 1:
            raise ProtocolError(Request.SET_CONFIG, f"writeback value {data[0]}")
        # Under the device lock: no worker is between reading the mode for
        # a request and pushing its completion (a write that ran with the
        # lock dropped, a Python batch or file I/O that may block, reads the
        # mode after it took the lock again), so each request was either
        # completed under the old mode before the switch or reads the new
        # one. A completion pushed but not yet published is made stable by
        # set_config, which runs this.
        with self.session.dataplane.locked():
            self._blk.lim.writeback = bool(data[0])
        log.info("write cache %s", "write-back" if data[0] else "write-through")

    async def set_config(self, offset: int, data: bytes, flags: int) -> None:
        was_writeback = self._blk.lim.writeback
        self.write_config(offset, data, flags)
        if was_writeback and not self._blk.lim.writeback:
            # In a thread: storage that stopped answering holds up this
            # session's reply, not the daemon's event loop.
            await asyncio.to_thread(self._sync_before_write_through)

    def _sync_before_write_through(self) -> None:
        """A write the C file back-end did just before the switch, under
        write-back, can reach the driver after the switch is acknowledged:
        its used entry is published at the end of the worker's round, which
        may come after this reply (the round may drop the lock for I/O
        before it ends). Its data is already written, so one sync started
        after the switch, before the reply, makes it stable before the
        driver can see it."""
        if self._kind == lib.VU_BLK_BACKEND_FILE and self._blk.fd >= 0:
            rc = lib.vu_blk_sync(self._blk, lib.VU_BLK_MAX_QUEUES)
            if rc < 0:
                raise ProtocolError(Request.SET_CONFIG,
                                    f"sync before write-through failed: {os.strerror(-rc)}")

    def on_features(self, features: int) -> None:
        lim = self._blk.lim
        lim.discard = bool(features & (1 << F.DISCARD))
        lim.write_zeroes = bool(features & (1 << F.WRITE_ZEROES))
        lim.secure_erase = bool(features & (1 << F.SECURE_ERASE))
        # QEMU sends SET_FEATURES again at each vhost_dev_start (stop/cont,
        # migration): the mode the driver chose through CONFIG_WCE stays
        # until a reset or a change of the cache features.
        cache_bits = features & bits(F.FLUSH, F.CONFIG_WCE)
        if cache_bits != self._cache_features:
            self._cache_features = cache_bits
            # Initially write-back iff FLUSH; without it writes must be
            # stable when completed (virtio 1.4, 5.2.5 and 5.2.6.5).
            lim.writeback = bool(features & (1 << F.FLUSH))

    def on_reset(self) -> None:
        self.on_features(0)
        self._cache_features = None       # the next SET_FEATURES sets the mode afresh

    def quiesce(self) -> None:
        lib.vu_blk_quiesce(self._blk)

    def on_connect(self, session) -> None:
        super().on_connect(session)
        # A new front-end brings a new driver: the cache mode the last one
        # chose through CONFIG_WCE is not its, and its first SET_FEATURES
        # sets the initial mode (a daemon's device outlives its sessions).
        self._cache_features = None
        self._loop = asyncio.get_running_loop()
        self._views = session.dataplane.views

    # -- serving -----------------------------------------------------------------
    def queue_handler(self, queue: Queue):
        return NativeHandler(lib.vu_blk_handler, self._blk, keepalive=self,
                             prepare=lib.vu_blk_prepare_queue)

    def _refresh_capacity(self, size: int | None = None) -> None:
        """The disk's size from the back-end's (or `size` bytes)."""
        if size is None:
            size = self.backend.size()
        if self._kind == lib.VU_BLK_BACKEND_PYTHON:
            size = _checked_size(self.backend, size)
        elif size % SECTOR:
            # An image file of any length is common: served, but not silently.
            log.warning("%s: the last %d bytes are not a whole %d-byte sector; the guest sees "
                        "the disk without them", getattr(self.backend, "path", "disk"),
                        size % SECTOR, SECTOR)
        self._blk.lim.capacity = size // SECTOR
        self.config.capacity = size // SECTOR

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors."""
        return self._blk.lim.capacity

    @property
    def sync_error(self) -> int:
        """errno of the image's first failed sync, 0 if none failed. After
        one, every FLUSH and write-through write fails: the kernel reports
        a lost write once, and nothing written before it is known stable."""
        if self._kind != lib.VU_BLK_BACKEND_FILE or self._blk == ffi.NULL:
            return 0
        return lib.vu_blk_sync_error(self._blk)

    def resize(self, size_bytes: int | None = None) -> bool:
        """Grows or shrinks the disk (None: re-read the back-end's size) and
        tells the guest. Returns whether the guest was told. An image
        file's ftruncate runs in the caller: on an event loop, use
        :meth:`aresize`."""
        if size_bytes is not None:
            self._check_new_size(size_bytes)

        if (isinstance(self.backend, FileBackend) and size_bytes is not None
                and size_bytes < self.capacity * SECTOR):
            self._refuse_in_own_request(f"resize to {size_bytes}")
            # In force for new requests first; the file shrinks once those
            # taken before ended (a write past the new end would grow it
            # again). It blocks meanwhile, as the ftruncate does.
            with self._no_worker_checking():
                self._refresh_capacity(size_bytes)
            try:
                self._wait_barrier(f"resize to {size_bytes}", None)
            except RequestsInFlight:
                with self._no_worker_checking():
                    self._refresh_capacity()        # the file's size: unchanged
                raise

        def apply() -> None:
            if isinstance(self.backend, FileBackend) and size_bytes is not None:
                os.ftruncate(self.backend.fd, size_bytes)
            elif isinstance(self.backend, RamBackend) and size_bytes is not None:
                # mremap may move the disk: no worker may be inside it meanwhile
                check(lib.vu_blk_set_ram(self._blk, size_bytes), "RAM disk resize")
                self.backend.size_bytes = size_bytes
            self._refresh_capacity()

        with self._no_worker_checking():
            apply()
        return self.notify_config_change()

    async def aresize(self, size_bytes: int, timeout: float | None = None) -> bool:
        """resize(size_bytes) for the event loop. An image file's ftruncate,
        which a file system that stopped answering (frozen, a dying disk)
        holds for as long as it likes, runs in a thread without the device
        lock: only this call waits for it, not the loop nor the guest's
        other requests. A shrink is in force for new requests before the
        file shrinks, a growth once the file grew.

        A shrink truncates once the requests taken before it have ended: a
        write past the new end still in flight (in io_uring) would land
        after the truncate and grow the file again, its data back. After
        `timeout` seconds (None: the drain timeout) with some in flight it
        raises RequestsInFlight, the file and the disk's size unchanged."""
        self._check_new_size(size_bytes)
        if not isinstance(self.backend, FileBackend):
            return self.resize(size_bytes)
        async with self._resizing:
            shrink = size_bytes < self.capacity * SECTOR
            if shrink:
                self._refuse_in_own_request(f"resize to {size_bytes}")
                with self._no_worker_checking():
                    self._refresh_capacity(size_bytes)
            # Its own fd: close() may close the back-end's meanwhile, and
            # the number be reused for another file.
            fd = os.dup(self.backend.fd)
            try:
                if shrink:
                    await self._await_barrier(f"resize to {size_bytes}", timeout)
                await asyncio.to_thread(os.ftruncate, fd, size_bytes)
            finally:
                os.close(fd)
                if not self._closing:
                    # Whatever ftruncate did (it may have failed), the size
                    # the file has now is the disk's.
                    with self._no_worker_checking():
                        self._refresh_capacity()
            return self.notify_config_change()

    def _check_new_size(self, size_bytes: int) -> None:
        if size_bytes <= 0 or size_bytes % SECTOR:
            raise ValueError(f"size {size_bytes} is not a positive multiple of {SECTOR}")
        if not isinstance(self.backend, (FileBackend, RamBackend)):
            raise ValueError("a Python back-end resizes itself, then calls resize()")

    def _no_worker_checking(self):
        """The device lock while a front-end is there: no worker is taking
        requests from a ring or checking them against the size."""
        session = self.session
        return session.dataplane.locked() if session is not None else contextlib.nullcontext()

    def stats(self) -> dict[str, int]:
        """The counters of :meth:`metrics` summed over the queues."""
        total: dict[str, int] = {}
        for m in self.metrics():
            for name, value in m.items():
                if isinstance(value, int) and name != "queue":
                    total[name] = total.get(name, 0) + value
        return total

    # -- barriers ----------------------------------------------------------------
    def _barrier(self, what: str, timeout: float | None):
        """Waits until every request taken off a ring before now has ended,
        its I/O done: those in io_uring, a Python back-end's (running in a
        batch or on the event loop), orphans of a session gone, write-
        through writes waiting for their sync. Call it after a change to
        the limits the workers check requests against (read-only, a smaller
        capacity): the requests taken after it obey the change and are not
        waited for. A generator of the pauses (seconds) to sleep between
        looks, so that blocking and async callers share it (_wait_barrier,
        _await_barrier). RequestsInFlight after `timeout` seconds (None:
        the drain timeout) with some still in flight."""
        if timeout is None:
            timeout = drain_timeout(self)
        deadline = time.monotonic() + timeout
        pause = 0.0005
        epoch = 0
        while True:
            if not epoch:
                # Under the device lock: no worker is between checking a
                # request against the limits and counting it.
                with self._barrier_lock, self._no_worker_checking(), self._late_lock:
                    if self._blk == ffi.NULL:
                        return          # freed: nothing of it runs any more
                    epoch = lib.vu_blk_barrier_begin(self._blk)
            with self._late_lock:       # the device is freed under it, not while we look
                if self._blk == ffi.NULL:
                    return
                # epoch 0: the barrier before this one still waits (its
                # requests are counted where ours are to go).
                pending = lib.vu_blk_barrier_pending(
                    self._blk, epoch or self._blk.barrier_epoch)
            if not pending:
                if epoch:
                    return
                continue
            if time.monotonic() >= deadline:
                raise RequestsInFlight(what, pending, timeout)
            yield pause
            pause = min(pause * 2, 0.02)

    def _refuse_in_own_request(self, what: str) -> None:
        """RuntimeError when called from inside one of this disk's own
        requests (a Python back-end's method, or the task running an async
        one): the wait for the requests in flight would wait for that one
        too, for the whole timeout. Nothing is changed then."""
        inside = _IN_REQUEST.get()
        if inside is None or inside[0] is not self:
            return
        task = inside[1]
        if task is not None and task.done():
            return              # a task it started, outliving it: no wait for itself
        raise RuntimeError(f"{what} waits for the requests in flight, and was called from "
                           f"inside one of this disk's requests: it would wait for itself. "
                           f"Change the disk from outside the request: another thread, or a "
                           f"task not started from the request while it runs")

    def _wait_barrier(self, what: str, timeout: float | None) -> None:
        """_barrier for a blocking caller."""
        for pause in self._barrier(what, timeout):
            time.sleep(pause)

    async def _await_barrier(self, what: str, timeout: float | None) -> None:
        """_barrier on the event loop, which serves meanwhile (a Python
        back-end's requests complete there)."""
        for pause in self._barrier(what, timeout):
            await asyncio.sleep(pause)

    # -- management (any thread) ---------------------------------------------
    def set_read_only(self, read_only: bool, timeout: float | None = None) -> None:
        """Refuses (or allows again) writes from now on. A connected guest
        keeps the features it negotiated, so its writes fail with IOERR; the
        next connection is offered VIRTIO_BLK_F_RO.

        Made read-only, it returns once every request taken before has
        ended (io_uring's, a Python back-end's, orphans of a session gone):
        no write reaches the storage afterwards, so the image can be copied.
        It blocks meanwhile: on an event loop await :meth:`aset_read_only`
        (a Python back-end's requests end on the device's loop). After
        `timeout` seconds (None: the drain timeout) with some still in
        flight it raises RequestsInFlight; the disk stays read-only."""
        if read_only:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                raise RuntimeError("set_read_only(True) waits for the writes in flight: on an "
                                   "event loop, await aset_read_only(True)")
            self._refuse_in_own_request("set_read_only(True)")
        self._set_read_only_flag(read_only)
        if read_only:
            self._wait_barrier("read-only", timeout)

    async def aset_read_only(self, read_only: bool, timeout: float | None = None) -> None:
        """set_read_only() for the event loop: awaits the requests taken
        before it, the loop serving meanwhile."""
        if read_only:
            self._refuse_in_own_request("aset_read_only(True)")
        self._set_read_only_flag(read_only)
        if read_only:
            await self._await_barrier("read-only", timeout)

    def _set_read_only_flag(self, read_only: bool) -> None:
        if not read_only and self.backend.read_only:
            raise ValueError("the back-end was opened read-only")
        self.read_only = bool(read_only)
        self._blk.lim.read_only = self.read_only

    @property
    def qos(self) -> QosLimits:
        return self._qos

    def set_qos(self, limits: QosLimits) -> None:
        """Applies new limits at once, also to a running guest."""
        if not isinstance(limits, QosLimits):
            raise TypeError("set_qos wants a QosLimits")
        lib.vu_blk_set_qos(self._blk, limits.iops, limits.bps, limits.iops_burst,
                           limits.bps_burst)
        self._qos = limits

    def metrics(self) -> list[dict]:
        """Per-queue counters: requests completed by type, bytes moved by
        those that succeeded, errors, requests in flight, times the queue
        waited for QoS tokens, log lines about its requests held back by
        the rate limit (``log_suppressed``), and a latency histogram (from
        the request being taken off the ring to its completion; counts per
        LATENCY_BOUNDS_US bucket)."""
        out = []
        for q in range(self.num_queues):
            m = {"queue": q}
            for s in (self._blk.stats[q], self._blk.async_stats[q]):
                for name in _COUNTERS:
                    m[name] = m.get(name, 0) + getattr(s, name)
                hist = m.setdefault("latency_us", [0] * len(LATENCY_BOUNDS_US))
                for i in range(len(hist)):
                    hist[i] += s.latency_us[i]
            m["requests"] = m.pop("completed")
            # Read after the completions, so a request finishing meanwhile
            # can't make the difference negative.
            m["inflight"] = max(0, self._blk.started[q] - m["requests"])
            m["throttled"] = self._blk.throttled[q]
            m["log_suppressed"] = self._log.suppressed.get(q, 0)
            out.append(m)
        return out

    @property
    def io_path(self) -> dict[str, str]:
        """How the C file back-end does reads and writes now: ``inline`` (in
        the queue worker), ``nowait`` (tried in the worker without blocking,
        the rest through io_uring) or ``uring``."""
        if self._kind != lib.VU_BLK_BACKEND_FILE:
            return {}
        return {"read": _IO_NAMES[self._blk.read_io], "write": _IO_NAMES[self._blk.write_io]}

    def set_io_path(self, read: str | None = None, write: str | None = None) -> None:
        """Overrides the I/O path the device picked for where the file lives
        (for measurements): each of ``inline``, ``nowait``, ``uring``. The
        last two start io_uring if the device was not using it; ``nowait``
        is refused with O_DIRECT."""
        if self._kind != lib.VU_BLK_BACKEND_FILE:
            raise ValueError("only the C file back-end has an I/O path")
        cur = self.io_path
        modes = []
        for name in (read or cur["read"], write or cur["write"]):
            if name not in _IO_MODES:
                raise ValueError(f"I/O path {name!r}: one of {', '.join(_IO_MODES)}")
            modes.append(_IO_MODES[name])
        if lib.vu_blk_set_io_path(self._blk, *modes) < 0:
            raise ValueError(f"I/O path read={read} write={write} is not possible here "
                             f"(direct={self.backend.direct}, io_uring available?)")

    def map_stats(self) -> dict:
        """How file reads were served: through the mapping of an in-memory
        image, or by preadv (holes, chunks not yet seen resident, faults);
        how many writes went through the mapping (the rest: pwritev); and
        how many copies either way a SIGBUS cut short (then redone by
        preadv/pwritev)."""
        fm = self._blk.map
        return {"mapped": self.mapped_reads,
                "mapped_reads": fm.mapped_reads, "fallback_reads": fm.fallback_reads,
                "mapped_writes": fm.mapped_writes, "faults": fm.faults}

    def close(self) -> None:
        """Closes the back-end; the C device goes once no request of a
        Python back-end is still running (their completion counts in it).

        A Python back-end's flush() runs before its close(), so nothing
        acknowledged stays in its cache: an async flush() is awaited on the
        device's event loop while that runs, else on the caller's, else on
        a loop of its own. Called on a running event loop, close() can't
        wait; it leaves the flush and the back-end's close() to a task, and
        a loop that ends meanwhile still lets them finish (await aclose()
        to wait at once). An async flush() that doesn't finish within the
        drain timeout (a hung store) is given up, as requests in flight
        are. Closing again does nothing."""
        if self._closing:
            return
        flush = self._take_close_flush()
        self._closing = True
        if flush is None:
            self._close_backend()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and self._loop.is_running():
            self._flush_then_close_on_device_loop(flush, running)
        elif running is not None:
            # Kept: a loop holds its tasks only weakly.
            self._close_pending = [running.create_task(self._flush_then_close(flush))]
        else:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._flush_then_close(flush))
            finally:
                loop.close()

    def _flush_then_close_on_device_loop(self, flush, running) -> None:
        """There, where the back-end's async state lives, whoever calls;
        waited for unless the caller runs a loop (`running`)."""
        done = asyncio.run_coroutine_threadsafe(self._flush_then_close(flush), self._loop)
        if running is None:
            done.result()
            return
        self._close_pending = [done]
        if running is not self._loop:
            # The caller's loop, should it end first, waits for it as it ends.
            waiting = asyncio.wrap_future(done, loop=running)
            self._close_pending.append(running.create_task(_despite_cancel(waiting)))

    async def aclose(self) -> None:
        """close() from a coroutine on the event loop: awaits the back-end's
        flush() there, then closes as close() does."""
        if self._closing:
            return
        flush = self._take_close_flush()
        if flush is not None:
            await _settle(flush, "flush before close", drain_timeout(self))
        self.close()

    def _take_close_flush(self):
        """The back-end's flush() for close (a coroutine, or None once done
        or when there is nothing to flush); runs a plain flush() at once."""
        if (self._kind != lib.VU_BLK_BACKEND_PYTHON or self._close_flushed
                or self.backend.read_only):
            return None
        self._close_flushed = True
        try:
            outcome = self.backend.flush()
        except Exception as exc:
            log.error("block back-end: flush before close failed: %s", exc)
            return None
        return awaitable_result(outcome)

    async def _flush_then_close(self, flush) -> None:
        try:
            try:
                await _settle(flush, "flush before close", drain_timeout(self))
            except asyncio.CancelledError:
                # The loop is ending and cancels what is left (asyncio.run
                # does, once): acknowledged writes must not stay cached, so
                # the flush runs again, to its end, before the loop closes.
                await _settle(stabilising_flush_on_loop(self.backend), "flush before close",
                              drain_timeout(self))
                raise
        finally:
            self._close_backend()

    def _close_backend(self) -> None:
        try:
            outcome = self.backend.close()
            if inspect.isawaitable(outcome):
                _discard(outcome)
                log.error("block back-end: %s.close() is async and was not run; close() must "
                          "be a plain method", type(self.backend).__name__)
        finally:
            self._log.flush()
            self._free_if_idle()

    def _free_if_idle(self) -> None:
        # Both close() (any thread) and the last async completion (the loop)
        # come here: one of them takes the device, under the lock, and frees
        # it (cffi lets go of the GIL during the call: a check then free
        # without the lock let both free it).
        with self._late_lock:
            if not self._closing or self._late or self._blk == ffi.NULL:
                return
            blk, self._blk = self._blk, ffi.NULL
        lib.vu_blk_free(blk)

    # -- Python back-ends ------------------------------------------------------
    def _run_request(self, r, writeback: bool) -> object:
        """Executes one parsed request other than a read or a write, in the
        cache mode `writeback`; returns what the back-end returned (an
        awaitable when it is async)."""
        t = r.type
        be: BlockBackend = self.backend
        if t == BlkType.FLUSH:
            return be.flush()
        if t == BlkType.GET_ID:
            serial = bytes(ffi.buffer(self._blk.lim.serial, ID_BYTES))
            _fill(r, serial)
            return None
        if t == BlkType.GET_LIFETIME:
            _fill(r, LIFETIME.pack(*_checked_lifetime(be)))
            return None
        if t in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
            return self._segments(r, writeback)
        raise Unsupported(f"request type {t}")

    def _segments(self, r, writeback: bool):
        be: BlockBackend = self.backend
        # Zeroes are a write: in write-through mode stable before completion.
        # (Discarded ranges have no defined content to keep.)
        zeroes = r.type == BlkType.WRITE_ZEROES
        stable = zeroes and not writeback
        name = _METHODS[r.type]
        calls = []
        try:
            for i in range(r.nsegs):
                seg = r.segs[i]
                off, length = seg.sector * SECTOR, seg.num_sectors * SECTOR
                if r.type == BlkType.DISCARD:
                    calls.append(be.discard(off, length))
                else:
                    calls.append(be.write_zeroes(off, length, bool(seg.flags & 1)))
        except BaseException as exc:
            # What earlier segments started ends before the guest sees
            # the failure.
            started = [w for w in map(awaitable_result, calls) if w is not None]
            return _failing_after(started, exc)
        waiting = []
        for c in calls:
            w = awaitable_result(c)
            if w is not None:
                waiting.append(w)
            elif c is not None:
                self._ignored(name, c)
        if waiting:
            async def wait_all():
                for i, w in enumerate(waiting):
                    try:
                        value = await w
                    except BaseException:
                        await _settled(waiting[i + 1:])
                        raise
                    self._ignored(name, value)
                # The mode now decides: a switch to write-through while the
                # zeroes were written makes them stable before completion.
                if zeroes and not self._blk.lim.writeback:
                    await self._flush_to_end()
            return wait_all()
        if not stable:
            return None
        flushed = stabilising_flush(be)
        waiting = awaitable_result(flushed)
        if waiting is not None:
            return waiting
        self._ignored("flush", flushed)
        return None

    async def _flush_to_end(self) -> None:
        """The back-end's flush(), plain (in a thread) or async, run to its
        end: for an async request that must be stable before it completes."""
        self._ignored("flush", await stabilising_flush_on_loop(self.backend))

    def _ignored(self, method: str, value) -> None:
        """A back-end method returned a value: the request succeeds all the
        same (a failure is an exception). Warned about once per method, as
        it is likely an old-style status that would be lost silently."""
        if value is not None:
            self._log.once(("return", method), logging.WARNING,
                           "block back-end: %s.%s() returned %s; return values are ignored and "
                           "the request succeeded (raise vhostuser.blk.Unsupported or another "
                           "exception to fail it)", type(self.backend).__name__, method,
                           reprlib.repr(value))

    def _python_batch(self, vq, reqs, n: int) -> int:
        """Runs a round's requests; returns how many writes (and write-zeroes)
        ran in write-back mode and are done: if the driver switched to
        write-through meanwhile, the C side has them made stable
        (_settle_write_back) before it publishes them."""
        status = bytearray([_IOERR]) * n     # a request not reached fails
        written_back: list[int] = []
        inside = _IN_REQUEST.set((self, None))
        try:
            self._run_batch(vq, reqs, n, status, written_back)
        except BaseException:
            # Cut short: no settle follows, so they are not known stable.
            for i in written_back:
                status[i] = _IOERR
            raise
        finally:
            _IN_REQUEST.reset(inside)
            # Those handed to the event loop stay PENDING: it completes them.
            lib.vu_blk_py_set_results(reqs, n, ffi.from_buffer(status))
        self._written_back[vq.index] = written_back
        return len(written_back)

    def _run_batch(self, vq, reqs, n: int, status: bytearray, written_back: list) -> None:
        """_python_batch's requests, each answered in `status` (_PENDING:
        handed to the event loop), the write-back writes done listed in
        `written_back`."""
        # Per request in the guest's hot path: the batch is described in one
        # C call (type, offset, where the data is), statuses go back in one;
        # a read or write in one buffer of a mapping already seen is a slice
        # of its view, and goes straight to the back-end's method.
        be = self.backend
        read = be.read
        cached_write, stable_write = be.write, be.write_fua
        lim = self._blk.lim
        views = self._views
        by_map = views._by_map
        desc = ffi.new("struct vu_blk_pydesc[]", n)
        lib.vu_blk_py_describe(reqs, n, desc)
        for i, (t, niov, offset, map_id, map_off, length) in enumerate(
                _PYDESC.iter_unpack(ffi.buffer(desc))):
            # The cache mode when the request runs decides; CONFIG_WCE may
            # change it between two requests of one batch.
            writeback = lim.writeback
            write = cached_write if writeback else stable_write
            # All of it in the try: whatever fails, this request alone fails,
            # and none handed to the loop is answered here too.
            # The views handed to the back-end, released when the request
            # ends (the guest owns its buffers again after that): one kept
            # longer raises ValueError rather than reading or writing memory
            # the guest reused. (Copied: the back-end may change its list.)
            held = ()
            try:
                if t == _IN or t == _OUT:
                    whole = by_map.get(map_id) if map_id else None
                    if whole is not None:
                        bufs = [whole[map_off:map_off + length]]
                    else:
                        r = reqs[i]
                        bufs = views.iov(r.elem.mem, r.iov, 0, r.niov)
                    held = bufs.copy()
                    outcome = (read if t == _IN else write)(offset, bufs)
                else:
                    outcome = self._run_request(reqs[i], writeback)
                if outcome is not None:
                    method = "write_fua" if t == _OUT and write is stable_write else _op(t)
                    waiting = awaitable_result(outcome)
                    if waiting is not None:
                        self._complete_later(vq, reqs[i], waiting, method, held)
                        held = ()
                        status[i] = _PENDING      # the loop's from here on
                        continue
                    self._ignored(method, outcome)
            except Unsupported as exc:
                log.debug("block back-end: %s at sector %d unsupported: %s", _op(t),
                          reqs[i].sector, exc)
                status[i] = _UNSUPP
                continue
            except BaseException as exc:
                # Even SystemExit: a queue worker has no one to pass it to.
                self._failed(exc, vq, reqs[i])
                continue                          # status[i] is IOERR
            finally:
                if held:
                    _release(held)
            # Done now, whatever it returned.
            status[i] = _OK
            if writeback and (t == _OUT or t == _ZEROES):
                written_back.append(i)

    def _settle_write_back(self, vq, reqs) -> None:
        """The driver switched to write-through while this queue's batch ran
        (the batch runs without the device lock): the writes it did in
        write-back mode are done but not yet published, and must be stable
        before the driver sees them complete. One flush() covers them; an
        async one completes them when it finishes."""
        which = [reqs[i] for i in self._written_back.pop(vq.index, ())]
        if not which:
            return
        try:
            flushed = stabilising_flush(self.backend)
        except BaseException as exc:
            for r in which:
                self._failed(exc, vq, r)
                r.result = BlkStatus.IOERR
            return
        waiting = awaitable_result(flushed)
        if waiting is None:
            self._ignored("flush", flushed)
            return
        # Awaited once on the loop, by each request's completion.
        shared = asyncio.run_coroutine_threadsafe(_awaited(waiting), self._loop)
        for r in which:
            r.result = _PENDING
            self._complete_later(vq, r, asyncio.wrap_future(shared, loop=self._loop), "flush")

    def _failed(self, exc: BaseException, vq, r) -> None:
        """An I/O error (a remote store gone, a disk failing, a back-end that
        says so with BackendError) is one line; anything else is a bug in
        the back-end: its traceback. Rate-limited: during an outage every
        request fails."""
        if isinstance(exc, (OSError, BackendError)):
            self._log.log((type(exc), getattr(exc, "errno", None)), logging.WARNING,
                          "block back-end: %s at sector %d failed: %s", _op(r.type), r.sector,
                          exc, source=vq.index)
        else:
            self._log.log((type(exc), None), logging.ERROR,
                          "block back-end failed on %s at sector %d: %s: %s", _op(r.type),
                          r.sector, type(exc).__name__, exc, exc_info=exc, source=vq.index)

    def _complete_later(self, vq, r, awaitable, method: str, held=()) -> None:
        session = self.session

        async def run():
            reraise = None
            _IN_REQUEST.set((self, asyncio.current_task()))     # this task's context only
            try:
                self._ignored(method, await awaitable)
                if method == "write" and not self._blk.lim.writeback:
                    # Begun under write-back, ending after the switch to
                    # write-through (write_config runs on this loop too):
                    # stable before the driver sees it complete.
                    await self._flush_to_end()
                status = BlkStatus.OK
            except asyncio.CancelledError as exc:
                # The loop is going away (exit): answer, so the request is
                # released rather than left in flight forever. Not while an
                # executor still runs its work, which writes into (or reads)
                # the buffers the answer gives back to the guest: a _Waiting
                # (backends.py), and so any coroutine awaiting one, raises
                # this only once that work has ended.
                status, reraise = BlkStatus.IOERR, exc
            except Unsupported as exc:
                log.debug("block back-end: %s at sector %d unsupported: %s", _op(r.type),
                          r.sector, exc)
                status = BlkStatus.UNSUPP
            except GeneratorExit:
                # The coroutine is closed (its loop was destroyed with it
                # pending, at exit): nothing may run on, as before.
                raise
            except BaseException as exc:
                self._failed(exc, vq, r)
                status = BlkStatus.IOERR
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    reraise = exc       # the loop stops for them, once this is answered
            if session is None or session.closed:
                # Its session gave up waiting: the request is an orphan, and
                # completing it only releases it (nothing reaches the guest;
                # the front-end resubmits it if it tracks inflight requests).
                self._log.log("orphan", logging.WARNING,
                              "block back-end: %s at sector %d finished after its session "
                              "ended; answer dropped", _op(r.type), r.sector, source=vq.index)
            # Its buffers are the guest's again from here on.
            _release(held)
            # vq and r stay valid until this call: the element holds them.
            lib.vu_blk_finish(vq, r, status, True)
            with self._late_lock:
                self._late -= 1
            self._free_if_idle()
            if reraise is not None:
                raise reraise
        if self._loop is None:
            raise RuntimeError("async back-end needs the device's event loop")
        with self._late_lock:
            self._late += 1
        asyncio.run_coroutine_threadsafe(run(), self._loop)


async def _settle(awaitable, what: str, timeout: float) -> None:
    """Awaits a back-end call for at most ``timeout`` seconds; its failure
    is logged, not raised."""
    try:
        # A flush touches no request buffers: the timeout holds even for
        # executor work that never ends.
        await asyncio.wait_for(_unbound(awaitable), timeout)
    except asyncio.TimeoutError:
        log.error("block back-end: %s not done after %gs; going on without it (writes the "
                  "store still caches may be lost)", what, timeout)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise                   # we are cancelled, not the back-end's call
        # The back-end's own call was cancelled (an executor shut down with
        # cancel_futures): a failure of that call like any other.
        log.error("block back-end: %s failed: it was cancelled", what)
    except Exception as exc:
        log.error("block back-end: %s failed: %s", what, exc)


async def _despite_cancel(future: asyncio.Future) -> None:
    """Awaits `future` to its end even when cancelled meanwhile (a loop
    that ends cancels what is left: the flush of acknowledged writes must
    not be lost), then raises the CancelledError."""
    cancelled = None
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError as exc:
            if future.cancelled():
                raise
            cancelled = exc
    if cancelled is not None:
        raise cancelled


def _op(t: int) -> str:
    return _METHODS.get(t, f"request type {t}")


def _discard(awaitable) -> None:
    """Closes a coroutine that won't be awaited (no 'never awaited' warning)."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


def _unstarted(awaitable) -> bool:
    """A coroutine that never ran: closing it leaves nothing half done."""
    return (inspect.iscoroutine(awaitable)
            and inspect.getcoroutinestate(awaitable) == inspect.CORO_CREATED)


async def _settled(awaitables) -> None:
    """The rest of a request that failed: coroutines not started are
    closed, not run; what runs already is awaited to its end (its own
    failure adds nothing to the request's, and is logged at DEBUG)."""
    for a in awaitables:
        if _unstarted(a):
            a.close()
            continue
        try:
            await a
        except Exception as exc:
            log.debug("block back-end: after the request failed, another part of it "
                      "failed too: %s: %s", type(exc).__name__, exc)


def _failing_after(awaitables: list, exc: BaseException):
    """`exc` for a request that has `awaitables` started: raised at once
    when none of them runs (those not started are closed), else raised by
    the coroutine returned once they are settled, so that nothing of the
    request runs on after the guest sees its status."""
    running = [a for a in awaitables if not _unstarted(a)]
    for a in awaitables:
        if _unstarted(a):
            a.close()
    if not running:
        raise exc

    async def fail():
        await _settled(running)
        raise exc
    return fail()


def _checked_size(backend: BlockBackend, size) -> int:
    """A Python back-end's size(): bytes, a positive multiple of 512 (the
    guest sees whole sectors; a rounded-down tail would vanish silently)."""
    name = f"{type(backend).__name__}.size()"
    if inspect.isawaitable(size):
        _discard(size)
        raise BackendError(f"{name} is async; it must return the size in bytes at once")
    try:
        value = operator.index(size)
    except TypeError:
        raise BackendError(f"{name} returned {reprlib.repr(size)}; it must return the size in "
                           f"bytes as an int") from None
    if value <= 0 or value % SECTOR:
        raise BackendError(f"{name} returned {value}; the size must be a positive multiple of "
                           f"{SECTOR} bytes")
    return value


def _checked_lifetime(backend: BlockBackend) -> tuple[int, int, int]:
    """lifetime() for GET_LIFETIME: three 16-bit values, or Unsupported."""
    life = backend.lifetime()
    if life is None:
        raise Unsupported("the back-end has no lifetime metrics")
    try:
        values = tuple(operator.index(v) for v in life)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 0xFFFF for v in values):
        _discard(life)
        raise BackendError(f"{type(backend).__name__}.lifetime() returned {reprlib.repr(life)}; "
                           f"it must return None or (pre_eol_info, est_typ_a, est_typ_b), "
                           f"each 0..65535")
    return values


def _fill(r, data: bytes) -> None:
    # Written at once, in the batch: plain views are enough.
    pos = 0
    views = [memoryview(ffi.buffer(r.iov[i].iov_base, r.iov[i].iov_len)) for i in range(r.niov)]
    for view in views:
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos:pos + n]
        pos += n


async def _awaited(awaitable):
    return await awaitable


@ffi.def_extern()
def vu_blk_py_batch(ctx, vq, reqs, n):
    device: BlkDevice = ffi.from_handle(ctx)
    try:
        return device._python_batch(vq, reqs, n)
    except BaseException as exc:    # a C thread's callback: nothing to raise it to
        # Every request is answered already (_python_batch's finally), those
        # handed to the event loop by it.
        device._log.log(("batch", type(exc)), logging.ERROR, "Python block batch failed: %s: %s",
                        type(exc).__name__, exc, exc_info=exc, source=vq.index)
        return 0


@ffi.def_extern()
def vu_blk_py_settle(ctx, vq, reqs, n):
    device: BlkDevice = ffi.from_handle(ctx)
    try:
        device._settle_write_back(vq, reqs)
    except BaseException as exc:
        # Not known stable: none of the batch's write-back writes may
        # complete as if they were.
        device._log.log(("settle", type(exc)), logging.ERROR,
                        "Python block batch: flush after the switch to write-through failed: "
                        "%s: %s", type(exc).__name__, exc, exc_info=exc, source=vq.index)
        for i in range(n):
            if reqs[i].type in (_OUT, _ZEROES) and reqs[i].result != _PENDING:
                reqs[i].result = BlkStatus.IOERR
    return 0


