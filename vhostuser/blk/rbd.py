"""Ceph RBD images as virtio-blk disks, through librbd's C API.

librbd and librados are loaded with cffi in ABI mode (no compiler, no
headers needed at run time: Debian's librbd1 is enough). Requests go out
with librbd's AIO calls; librbd signals completions on an eventfd that the
device's event loop watches, and the loop collects them with
``rbd_poll_io_events``, so no Python runs on librbd's threads.

The write cache: librbd's own cache is off (``rbd_cache=false``), so a
write completes once the OSDs have it; a write-through write needs nothing
more, and the guest's flushes become ``rbd_aio_flush``. Pool or image
settings override the client's: when they turn the cache on (see
``image_config()``), each write-through write is followed by a flush.

When the cluster stops answering, each request fails with an I/O error
after ``timeout`` seconds (librados gives up on its own by then too), and
the daemon's other devices and requests carry on.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from dataclasses import dataclass

import cffi

from .backends import BackendError, BlockBackend
from ..errors import VhostUserError

log = logging.getLogger(__name__)

# Declarations copied by hand from librbd.h and librados.h of Ceph 16
# (pacific); only what this module calls.
_CDEF = """
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);
struct iovec { void *iov_base; size_t iov_len; };

int rados_create(rados_t *cluster, const char * const id);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);

int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
                       const char *snap_name);
int rbd_close(rbd_image_t image);
int rbd_get_size(rbd_image_t image, uint64_t *size);
int rbd_set_image_notification(rbd_image_t image, int fd, int type);
int rbd_poll_io_events(rbd_image_t image, rbd_completion_t *comps, int numcomp);

int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c);
int rbd_aio_wait_for_complete(rbd_completion_t c);
ssize_t rbd_aio_get_return_value(rbd_completion_t c);
void rbd_aio_release(rbd_completion_t c);
int rbd_aio_read(rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c);
int rbd_aio_writev(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                   rbd_completion_t c);
int rbd_aio_flush(rbd_image_t image, rbd_completion_t c);
int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c);
int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                         int zero_flags, int op_flags);

typedef struct { char *name; char *value; int source; } rbd_config_option_t;
int rbd_config_image_list(rbd_image_t image, rbd_config_option_t *options, int *max_options);
void rbd_config_image_list_cleanup(rbd_config_option_t *options, int max_options);
"""
_EVENT_TYPE_EVENTFD = 2
#: rbd_config_source_t: where an image's setting comes from.
CONFIG_SOURCES = {0: "config", 1: "pool", 2: "image"}
_WRITE_ZEROES_FLAG_THICK_PROVISION = 1
_POLL_BATCH = 32

ffi = cffi.FFI()
ffi.cdef(_CDEF)
_alloc = ffi.new_allocator(should_clear_after_alloc=False)   # read buffers: filled by librbd
_lib = None
_lib_lock = threading.Lock()

#: Seconds a request may take before the guest gets an I/O error.
DEFAULT_TIMEOUT = 30.0


class RbdError(BackendError):
    """The image can't be opened: no cluster, no pool, no image, bad config."""


class RbdIOError(VhostUserError, OSError):
    """librbd failed a request (errno from librbd)."""


class RbdTimeout(RbdIOError):
    """A request took longer than the back-end's timeout."""


def load():
    """librbd (with librados) through cffi; RbdError if not installed."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                ffi.dlopen("librados.so.2")
                _lib = ffi.dlopen("librbd.so.1")
            except OSError as exc:
                raise RbdError(f"librbd not available ({exc}); Debian package: librbd1") from None
    return _lib


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """``POOL/IMAGE`` or ``POOL/NAMESPACE/IMAGE`` -> (pool, namespace, image)."""
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"an RBD image is POOL/IMAGE or POOL/NAMESPACE/IMAGE, not {spec!r}")
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


@dataclass(slots=True)
class _Pending:
    """A request librbd holds: its completion and every buffer it may touch.
    Kept until librbd reports it done, even after the guest was answered."""
    future: asyncio.Future
    completion: object
    keep: object


class RbdBackend(BlockBackend):
    """An RBD image; opened (and the cluster connected) by the constructor.

    ``conf``: a ceph.conf (default: librados' usual search, which may find
    nothing if ``mon_host`` is given). ``client_id``: the cephx user without
    ``client.``; ``keyring``: its keyring file. ``timeout``: seconds before a
    request (and connecting) fails; None waits for the cluster forever.
    ``options``: further librados/librbd settings.
    """

    _closing = False        # close() was called

    def __init__(self, image: str, pool: str = "rbd", *, namespace: str | None = None,
                 conf: str | None = None, mon_host: str | None = None,
                 client_id: str = "admin", keyring: str | None = None,
                 read_only: bool | str = False, timeout: float | str | None = DEFAULT_TIMEOUT,
                 options: dict[str, str] | None = None):
        self.lib = load()
        self.pool, self.namespace, self.image_name = pool, namespace, image
        self.read_only = _flag(read_only)
        self.timeout = float(timeout) if timeout not in (None, "", "none", "0", 0) else None
        self._cluster = self._ioctx = self._image = None
        self._pending: dict[int, _Pending] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._efd = -1
        self._events = ffi.new("rbd_completion_t[]", _POLL_BATCH)
        self.cache_enabled = False      # librbd's write-back cache (see _open)
        self.timeouts = 0      # requests answered IOERR because of the deadline
        try:
            self._connect(conf, mon_host, client_id, keyring, options or {})
            self._open()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_spec(cls, spec: str, **kw) -> "RbdBackend":
        pool, namespace, image = parse_spec(spec)
        return cls(image, pool, namespace=namespace, **kw)

    @property
    def name(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.pool}/{ns}{self.image_name}"

    # -- setup ---------------------------------------------------------------------
    def _connect(self, conf, mon_host, client_id, keyring, options) -> None:
        lib = self.lib
        cluster = ffi.new("rados_t *")
        _check(lib.rados_create(cluster, client_id.encode()), RbdError, "rados_create")
        self._cluster = cluster[0]
        rc = lib.rados_conf_read_file(self._cluster, conf.encode() if conf else ffi.NULL)
        if rc < 0 and (conf or not mon_host):
            raise RbdError(f"reading {conf or 'the default ceph.conf'}: {os.strerror(-rc)}")
        settings = {
            # librbd copies write data when the call is made, so guest memory
            # is never read after the guest was answered (a timed-out write
            # may still be in librbd's hands).
            "rbd_disable_zero_copy_writes": "true",
            # No write-back cache: a write the guest sees completed is on the
            # OSDs, so losing this process or the connection loses nothing
            # acknowledged.
            "rbd_cache": "false",
            # Requests are queued to librbd's own threads, so an I/O call on
            # the event loop never blocks on a full Objecter throttle (the
            # default, stated because the loop depends on it).
            "rbd_non_blocking_aio": "true",
        }
        if self.timeout is not None:
            t = str(max(1, round(self.timeout)))
            settings.update(client_mount_timeout=t, rados_mon_op_timeout=t,
                            rados_osd_op_timeout=t)
        if mon_host:
            settings["mon_host"] = mon_host
        if keyring:
            settings["keyring"] = keyring
        settings.update(options)
        for key, value in settings.items():
            rc = lib.rados_conf_set(self._cluster, key.encode(), str(value).encode())
            if rc < 0:
                raise RbdError(f"setting {key}={value}: {os.strerror(-rc)}")
        rc = lib.rados_connect(self._cluster)
        if rc < 0:
            raise RbdError(f"connecting to the Ceph cluster as client.{client_id}: "
                           f"{os.strerror(-rc)}")

    def _open(self) -> None:
        lib = self.lib
        ioctx = ffi.new("rados_ioctx_t *")
        rc = lib.rados_ioctx_create(self._cluster, self.pool.encode(), ioctx)
        if rc < 0:
            raise RbdError(f"pool {self.pool}: {os.strerror(-rc)}")
        self._ioctx = ioctx[0]
        if self.namespace:
            lib.rados_ioctx_set_namespace(self._ioctx, self.namespace.encode())
        image = ffi.new("rbd_image_t *")
        opener = lib.rbd_open_read_only if self.read_only else lib.rbd_open
        rc = opener(self._ioctx, self.image_name.encode(), image, ffi.NULL)
        if rc < 0:
            raise RbdError(f"image {self.name}: {os.strerror(-rc)}")
        self._image = image[0]
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        _check(lib.rbd_set_image_notification(self._image, self._efd, _EVENT_TYPE_EVENTFD),
               RbdError, "rbd_set_image_notification")
        # A pool or image setting (rbd config image set ... rbd_cache true)
        # overrides ours: then a write-through write needs its own flush.
        value, source = self.image_config().get("rbd_cache", ("false", "config"))
        self.cache_enabled = value == "true"
        if self.cache_enabled:
            log.warning("RBD image %s: the %s's settings turn rbd_cache on; write-through "
                        "writes are flushed one by one", self.name, source)
        tail = self._byte_size() % 512
        if tail:
            log.warning("RBD image %s: its last %d bytes are not a whole 512-byte sector; the "
                        "guest sees the disk without them", self.name, tail)
        log.info("RBD image %s: %d bytes%s", self.name, self.size(),
                 " (read-only)" if self.read_only else "")

    def image_config(self) -> dict[str, tuple[str, str]]:
        """The open image's effective librbd settings: name -> (value,
        source), source one of config, pool, image."""
        lib = self.lib
        count = ffi.new("int *", 256)
        while True:
            options = ffi.new("rbd_config_option_t[]", count[0])
            rc = lib.rbd_config_image_list(self._image, options, count)
            if rc != -errno.ERANGE:
                break
        _check(rc, RbdIOError, "rbd_config_image_list")
        try:
            return {ffi.string(o.name).decode(): (ffi.string(o.value).decode(),
                                                  CONFIG_SOURCES.get(o.source, str(o.source)))
                    for o in options[0:count[0]]}
        finally:
            lib.rbd_config_image_list_cleanup(options, count[0])

    # -- BlockBackend ----------------------------------------------------------------
    def size(self) -> int:
        # Whole sectors: what a virtio-blk disk can be (warned at open).
        size = self._byte_size()
        return size - size % 512

    def _byte_size(self) -> int:
        size = ffi.new("uint64_t *")
        _check(self.lib.rbd_get_size(self._image, size), RbdIOError, "rbd_get_size")
        return size[0]

    async def read(self, offset: int, bufs: list[memoryview]) -> None:
        # librbd reads into a buffer of ours, copied into the guest only on
        # success: a request that timed out may still complete later, and
        # must not write into memory the guest has reused (or that is gone).
        total = sum(len(b) for b in bufs)
        buf = _alloc("char[]", total)
        await self._io("read", lambda c: self.lib.rbd_aio_read(self._image, offset, total,
                                                               buf, c), buf)
        src = memoryview(ffi.buffer(buf, total))
        pos = 0
        for b in bufs:
            b[:] = src[pos:pos + len(b)]
            pos += len(b)

    async def write(self, offset: int, bufs: list[memoryview]) -> None:
        iov = ffi.new("struct iovec[]", len(bufs))
        refs = [ffi.from_buffer(b) for b in bufs]
        for i, (b, r) in enumerate(zip(bufs, refs)):
            iov[i].iov_base = r
            iov[i].iov_len = len(b)
        await self._io("write", lambda c: self.lib.rbd_aio_writev(self._image, iov, len(bufs),
                                                                  offset, c), (iov, refs))

    async def write_fua(self, offset: int, bufs: list[memoryview]) -> None:
        # Without librbd's cache a write completes once the OSDs have it.
        await self.write(offset, bufs)
        if self.cache_enabled:
            await self.flush()

    async def flush(self) -> None:
        await self._io("flush", lambda c: self.lib.rbd_aio_flush(self._image, c))

    async def discard(self, offset: int, length: int) -> None:
        await self._io("discard", lambda c: self.lib.rbd_aio_discard(self._image, offset,
                                                                     length, c))

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        # Without unmap the guest wants the range allocated: ask for that.
        flags = 0 if unmap else _WRITE_ZEROES_FLAG_THICK_PROVISION
        await self._io("write_zeroes", lambda c: self.lib.rbd_aio_write_zeroes(
            self._image, offset, length, c, flags, 0))

    # -- requests and completions ---------------------------------------------------------
    async def _io(self, what: str, start, keep=None) -> int:
        if self._image is None:
            raise RbdIOError(errno.ESHUTDOWN, f"{what}: image {self.name} is closed")
        self._watch_completions()
        comp = ffi.new("rbd_completion_t *")
        _check(self.lib.rbd_aio_create_completion(ffi.NULL, ffi.NULL, comp), RbdIOError,
               "rbd_aio_create_completion")
        c = comp[0]
        key = int(ffi.cast("uintptr_t", c))
        future = self._loop.create_future()
        self._pending[key] = _Pending(future, c, keep)
        rc = start(c)
        if rc < 0:
            del self._pending[key]
            self.lib.rbd_aio_release(c)
            raise RbdIOError(-rc, f"{what} on {self.name}: {os.strerror(-rc)}")
        try:
            # shield: on timeout the future stays, for the completion to land in.
            rv = await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except asyncio.TimeoutError:
            self.timeouts += 1
            raise RbdTimeout(errno.ETIMEDOUT, f"{what} on {self.name}: no answer from the "
                             f"cluster within {self.timeout:g}s") from None
        if rv < 0:
            raise RbdIOError(-rv, f"{what} on {self.name}: {os.strerror(-rv)}")
        return rv

    def _watch_completions(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError(f"RBD image {self.name} is already served from another "
                               "event loop")
        self._loop = loop
        loop.add_reader(self._efd, self._on_events)

    def _on_events(self) -> None:
        try:
            os.read(self._efd, 8)
        except BlockingIOError:
            pass
        self._reap(self._image, _answer)

    def _reap(self, image, answer) -> int:
        """Collects the completions librbd finished for ``image`` and releases
        them; ``answer(future, rv)`` wakes each request still waiting."""
        lib, events, found = self.lib, self._events, 0
        while True:
            n = lib.rbd_poll_io_events(image, events, _POLL_BATCH)
            for i in range(max(n, 0)):
                c = events[i]
                rv = lib.rbd_aio_get_return_value(c)
                entry = self._pending.pop(int(ffi.cast("uintptr_t", c)), None)
                lib.rbd_aio_release(c)
                if entry is not None:
                    answer(entry.future, rv)
            found += max(n, 0)
            if n < _POLL_BATCH:
                return found

    def pending(self) -> int:
        """Requests librbd still holds (timed-out ones included)."""
        return len(self._pending)

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        """Waits for librbd to finish what it holds (bounded by librados'
        timeouts), answers the requests still waiting for it, then closes
        the image and disconnects. Called on the event loop requests librbd
        still holds run on, it returns at once and waits in a thread: that
        loop must go on (for their answers, among the rest). Closing again
        does nothing."""
        if self._closing:
            return
        self._closing = True
        their_loop = self._loop
        image, self._image = self._image, None      # no new request starts
        if image is not None:
            self._unwatch_completions()
        try:
            answers_need_this_loop = (their_loop is not None and bool(self._pending)
                                      and asyncio.get_running_loop() is their_loop)
        except RuntimeError:
            answers_need_this_loop = False
        if not answers_need_this_loop:
            self._close_now(image)
            return
        threading.Thread(target=self._close_now, args=(image,),
                         name=f"rbd-close:{self.name}").start()

    def _close_now(self, image) -> None:
        lib = self.lib
        if image is not None:
            for entry in list(self._pending.values()):
                lib.rbd_aio_wait_for_complete(entry.completion)
            self._reap(image, _answer_from_any_thread)
            if self._pending:
                # Not seen in practice; never release what librbd may still use.
                log.warning("RBD image %s: %d completions never reported", self.name,
                            len(self._pending))
            rc = lib.rbd_close(image)
            if rc < 0:
                log.warning("closing RBD image %s: %s", self.name, os.strerror(-rc))
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        if self._ioctx is not None:
            lib.rados_ioctx_destroy(self._ioctx)
            self._ioctx = None
        if self._cluster is not None:
            lib.rados_shutdown(self._cluster)
            self._cluster = None

    def _unwatch_completions(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop or not loop.is_running():
            loop.remove_reader(self._efd)
        else:
            done = threading.Event()

            def remove() -> None:
                loop.remove_reader(self._efd)
                done.set()
            loop.call_soon_threadsafe(remove)
            done.wait(5)


def _answer(future: asyncio.Future, rv: int) -> None:
    """On the future's loop: the request's result, unless it has one."""
    if not future.done():
        future.set_result(rv)


def _answer_from_any_thread(future: asyncio.Future, rv: int) -> None:
    loop = future.get_loop()
    try:
        here = asyncio.get_running_loop() is loop
    except RuntimeError:
        here = False
    if here:
        _answer(future, rv)
        return
    try:
        loop.call_soon_threadsafe(_answer, future, rv)
    except RuntimeError:
        pass        # its loop is closed: nobody waits for it any more


def _check(rc: int, exc_type: type, what: str) -> int:
    if rc < 0:
        if issubclass(exc_type, OSError):
            raise exc_type(-rc, f"{what}: {os.strerror(-rc)}")
        raise exc_type(f"{what}: {os.strerror(-rc)}")
    return rc


def _flag(value: bool | str) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a yes/no value: {value!r}")
    return bool(value)
