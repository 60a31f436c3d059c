"""NBD exports as virtio-blk disks: a Python back-end on libnbd's AIO API.

Every libnbd handle is non-blocking and driven by the device's event loop
(its fd is watched with add_reader/add_writer), so a dead or hung server
never blocks the loop, a worker thread, or the daemon's other devices.
Guest buffers go to libnbd as they are (zero-copy): a command's buffer is
referenced until its reply arrived or its handle was closed, and a request
is answered only then.

When a connection breaks, the handle is closed, a new one connects in the
background, and the commands that had no reply yet are sent again (reads,
writes, trims and zeroes are idempotent). A request that isn't done
``timeout`` seconds after it arrived fails with an I/O error; if it was on
the wire then, that server is taken as hung and its connection is replaced.
A write is answered OK only after the server replied OK to it.

As QEMU's NBD client does with reconnect-delay: once no connection has been
up for ``timeout`` seconds, the requests still waiting and every new one
fail at once, so a guest doesn't wait ``timeout`` per request through a
long outage; connecting goes on in the background (at most a second apart)
and the first connection back ends that.

The write cache: the guest's flushes become NBD flushes. In write-through
mode (``write_fua``) a write carries NBD_CMD_FLAG_FUA when the server offers
FUA, and is otherwise followed by an NBD flush, the guest answered only
after that; a server that offers neither is taken to write through (the
protocol gives no way to ask it for more).

A flush covers only the writes its own connection completed, unless the
server offers NBD_FLAG_CAN_MULTI_CONN (a cache shared by its connections).
Without that, writes the guest was told of on a connection that was lost
before a flush covered them may or may not be durable, and no later flush
can tell: the next flush (sent all the same, for what it does cover) fails
with an I/O error, as do those already waiting, and an error is logged.
Only once: the flushes after that succeed, as a file system's fsync()
reports a lost writeback once. Writes with FUA, and writes a flush had
covered before the loss, don't count.

Limits: a command given up on (hung server, dropped connection) may still
be carried out by the server later, as with any NBD client. Without TLS
libnbd touches guest buffers only with send()/recv(), so memory unmapped
under a request (front-end gone) gives EFAULT, not a crash; with nbds://
GnuTLS copies.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import logging
import select
import threading
import time
from dataclasses import dataclass

from . import libnbd
from .backends import BackendError, BlockBackend
from .libnbd import NbdError, NbdUnavailable, ffi

log = logging.getLogger(__name__)

__all__ = ["NbdBackend", "NbdError", "NbdTimeout", "NbdUnavailable", "Capabilities"]

DEFAULT_TIMEOUT = 30.0
#: Largest read or write per command: libnbd refuses more than 64M and
#: servers commonly stop at 32M (a smaller advertised maximum wins).
MAX_DATA = 32 << 20
#: Largest trim or zero per command, well within the protocol's 32-bit count.
MAX_RANGE = 1 << 30
#: Longest pause between reconnection attempts.
MAX_BACKOFF = 1.0
#: A connection lost sooner than this after it came up is replaced only
#: after a back-off, so a server that takes connections and drops them (or
#: answers ESHUTDOWN) isn't hammered.
STABLE_AFTER = 1.0
#: How long close() from another thread waits for the event loop to close
#: the connections.
CLOSE_WAIT = 10.0

_READ, _WRITE, _FLUSH, _TRIM, _ZERO = range(5)
_OP_NAMES = ("read", "write", "flush", "trim", "zero")
# What write_zeroes writes to a server without NBD_CMD_WRITE_ZEROES.
_ZEROS = bytes(1 << 20)
_ZEROS_C = ffi.from_buffer(_ZEROS)


class NbdTimeout(NbdError):
    """A request wasn't done within the back-end's timeout."""


@dataclass(frozen=True)
class Capabilities:
    """What the server said at the first handshake."""
    size: int
    read_only: bool
    flush: bool
    fua: bool
    trim: bool
    zero: bool
    multi_conn: bool
    max_data: int

    @classmethod
    def of(cls, h) -> "Capabilities":
        lb = libnbd.lib()
        size = lb.nbd_get_size(h)
        if size < 0:
            raise libnbd.last_error("size")
        advertised = lb.nbd_get_block_size(h, libnbd.SIZE_MAXIMUM)
        return cls(size=size, read_only=lb.nbd_is_read_only(h) == 1,
                   flush=lb.nbd_can_flush(h) == 1, fua=lb.nbd_can_fua(h) == 1,
                   trim=lb.nbd_can_trim(h) == 1, zero=lb.nbd_can_zero(h) == 1,
                   multi_conn=lb.nbd_can_multi_conn(h) == 1,
                   max_data=min(MAX_DATA, advertised) if advertised > 0 else MAX_DATA)


class _Request:
    """One call of the back-end: its commands, who waits, and until when."""
    __slots__ = ("commands", "buffers", "remaining", "error", "future", "timer")

    def __init__(self):
        self.commands: list[_Command] = []
        self.buffers: list = []     # ffi.from_buffer() of the guest's memoryviews
        self.remaining = 0
        self.error: BaseException | None = None
        self.future: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None


class _Command:
    """One NBD command; ``buf`` keeps the guest buffer's cdata referenced."""
    __slots__ = ("request", "op", "offset", "length", "buf", "at", "flags", "conn", "cookie",
                 "done", "expired", "covers")

    def __init__(self, request, op, offset, length, buf=None, at=0, flags=0):
        self.request, self.op, self.offset, self.length = request, op, offset, length
        self.buf, self.at, self.flags = buf, at, flags
        self.conn: _Connection | None = None    # the handle it is in flight on
        self.cookie = 0
        self.done = False
        # Why it must not be sent again (its timeout, a cancellation, the
        # back-end's close): what it fails with if its connection is lost.
        self.expired: BaseException | None = None
        self.covers = 0     # a flush: its connection's `written` when it was sent


class _Connection:
    """One libnbd handle and the commands in flight on it."""

    def __init__(self, slot: int):
        lb = libnbd.lib()
        self.slot = slot
        self.h = lb.nbd_create()
        if self.h == ffi.NULL:
            raise libnbd.last_error("nbd_create")
        # Simple replies put read data straight into the guest buffer with
        # recv(); libnbd writes no guest memory itself (structured replies
        # would have it memset holes) and needn't pre-zero the buffer.
        lb.nbd_set_request_structured_replies(self.h, False)
        lb.nbd_set_pread_initialize(self.h, False)
        self.inflight: dict[int, _Command] = {}
        self.ready = False
        self.up_at: float | None = None     # time.monotonic() when it became ready
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fd = -1
        self.reading = self.writing = False
        self.connect_timer: asyncio.TimerHandle | None = None
        # Writes (trims, zeroes) answered OK without FUA, and how many of
        # those the flushes answered so far cover: more written than
        # flushed, and they may sit in a cache of this connection alone.
        self.written = self.flushed = 0

    def note_done(self, cmd: "_Command") -> None:
        """Counts an OK reply towards what a flush does or must cover."""
        if cmd.op == _FLUSH:
            self.flushed = max(self.flushed, cmd.covers)
        elif cmd.op != _READ and not cmd.flags & libnbd.CMD_FLAG_FUA:
            self.written += 1

    def unflushed(self) -> bool:
        return self.written > self.flushed

    def start_connect(self, uri: str) -> None:
        if libnbd.lib().nbd_aio_connect_uri(self.h, uri.encode()) < 0:
            raise libnbd.last_error(f"connect {uri}")

    def connect_blocking(self, uri: str, timeout: float) -> None:
        """Connects and negotiates, polling the handle's fd ourselves: used
        before there is an event loop (the disk's size is needed first)."""
        lb = libnbd.lib()
        self.start_connect(uri)
        deadline = time.monotonic() + timeout
        while not lb.nbd_aio_is_ready(self.h):
            if self.dead():
                raise libnbd.last_error(f"connect {uri}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise NbdTimeout(f"connect {uri}: no answer within {timeout:g}s")
            fd = lb.nbd_aio_get_fd(self.h)
            d = lb.nbd_aio_get_direction(self.h)
            r, w, _ = select.select([fd] if d & libnbd.DIRECTION_READ else [],
                                    [fd] if d & libnbd.DIRECTION_WRITE else [], [], left)
            if r:
                lb.nbd_aio_notify_read(self.h)
            elif w:
                lb.nbd_aio_notify_write(self.h)
        self.ready = True
        self.up_at = time.monotonic()

    def dead(self) -> bool:
        lb = libnbd.lib()
        return bool(self.h == ffi.NULL or lb.nbd_aio_is_dead(self.h)
                    or lb.nbd_aio_is_closed(self.h))

    def watch(self, loop, on_event) -> None:
        """Follows the direction libnbd wants to go in next."""
        lb = libnbd.lib()
        if self.loop is not loop:
            self.unwatch()
            self.loop = loop
        fd = lb.nbd_aio_get_fd(self.h)
        if fd != self.fd:
            self.unwatch()
            self.fd = fd
        if fd < 0:
            return
        d = lb.nbd_aio_get_direction(self.h)
        want_r, want_w = bool(d & libnbd.DIRECTION_READ), bool(d & libnbd.DIRECTION_WRITE)
        if want_r != self.reading:
            if want_r:
                loop.add_reader(fd, on_event, self, True)
            else:
                loop.remove_reader(fd)
            self.reading = want_r
        if want_w != self.writing:
            if want_w:
                loop.add_writer(fd, on_event, self, False)
            else:
                loop.remove_writer(fd)
            self.writing = want_w

    def unwatch(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed() and self.fd >= 0:
            if self.reading:
                loop.remove_reader(self.fd)
            if self.writing:
                loop.remove_writer(self.fd)
        self.reading = self.writing = False
        self.fd = -1

    def close(self) -> None:
        """Frees the handle: libnbd references none of our buffers after."""
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        self.unwatch()
        if self.h != ffi.NULL:
            libnbd.lib().nbd_close(self.h)
            self.h = ffi.NULL
        self.ready = False


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


class NbdBackend(BlockBackend):
    """A disk on an NBD server: ``nbd://HOST[:PORT]/EXPORT`` or
    ``nbd+unix:///EXPORT?socket=PATH`` (any URI libnbd takes).

    ``timeout``: seconds a request may take, reconnections and resends
    included, before the guest gets an I/O error (None or 0: no limit, a
    request waits for the server as long as it takes). ``connections``: libnbd
    handles used in parallel; more than one only if the server allows
    multi-conn (a flush on one must cover writes on the others).
    """

    def __init__(self, uri: str, *, read_only=False, timeout=DEFAULT_TIMEOUT, connections=1):
        self.uri = uri
        self.timeout = float(timeout) if timeout not in (None, "", "none") else 0.0
        if self.timeout < 0:
            raise ValueError(f"timeout must not be negative, not {timeout!r}")
        self.timeout = self.timeout or None
        connections = int(connections)
        if not 1 <= connections <= 16:
            raise ValueError(f"connections must be 1..16, not {connections}")
        # One attempt's limit: a server that accepts but never greets (hung)
        # must not hold up the attempts after it.
        self.connect_timeout = max(0.5, min(self.timeout or 10.0, 10.0))
        libnbd.lib()
        first = _Connection(0)
        try:
            first.connect_blocking(uri, self.connect_timeout)
            self.caps = Capabilities.of(first.h)
        except BaseException:
            first.close()
            raise
        if self.caps.size < 512:
            first.close()
            raise BackendError(f"{uri}: export smaller than one 512-byte sector")
        if self.caps.size % 512:
            log.warning("%s: the export's last %d bytes are not a whole 512-byte sector; the "
                        "guest sees the disk without them", uri, self.caps.size % 512)
        if connections > 1 and not self.caps.multi_conn:
            log.warning("%s: the server doesn't allow multi-conn; using one connection", uri)
            connections = 1
        self.read_only = _as_bool(read_only) or self.caps.read_only
        self._conns: list[_Connection | None] = [first] + [None] * (connections - 1)
        self._waiting: collections.deque[_Command] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._teardown = threading.Lock()
        self._backoff = 0.0
        self._retry_timer: asyncio.TimerHandle | None = None
        self._pump_soon = False
        self._failures = 0          # connection attempts failed in a row
        self._down_since: float | None = None     # since when no connection is up
        self._offline_timer: asyncio.TimerHandle | None = None
        self._offline = False       # down for `timeout`: requests fail at once
        # Connections lost with writes no flush covered (without multi-conn),
        # and how many of those a failed flush has reported.
        self._unflushed_losses = self._losses_reported = 0
        try:
            for slot in range(1, connections):
                conn = _Connection(slot)
                self._conns[slot] = conn
                conn.connect_blocking(uri, self.connect_timeout)
        except BaseException:
            self._close_all()
            raise
        log.info("%s: %d bytes, %d connection(s), %s", uri, self.caps.size, connections,
                 ", ".join(n for n in ("read_only", "flush", "fua", "trim", "zero", "multi_conn")
                           if getattr(self.caps, n)))

    # -- BlockBackend -------------------------------------------------------------------
    def size(self) -> int:
        # Whole sectors: what a virtio-blk disk can be (warned at open).
        return self.caps.size - self.caps.size % 512

    def supports(self, method: str) -> bool:
        if method == "discard":
            return self.caps.trim and not self.read_only
        return super().supports(method)

    async def read(self, offset: int, bufs: list[memoryview]) -> None:
        await self._run(self._data_request(_READ, offset, bufs))

    async def write(self, offset: int, bufs: list[memoryview]) -> None:
        self._check_writable()
        await self._run(self._data_request(_WRITE, offset, bufs))

    async def write_fua(self, offset: int, bufs: list[memoryview]) -> None:
        if not self.caps.fua:
            await self.write(offset, bufs)      # then an NBD flush, if the server has it
            await self.flush()
            return
        self._check_writable()
        # Each command of the request is stable when its reply comes (a resent
        # command keeps the flag).
        await self._run(self._data_request(_WRITE, offset, bufs, libnbd.CMD_FLAG_FUA))

    async def flush(self) -> None:
        # A server that offers no flush has nothing to make durable.
        if self.caps.flush and not self.read_only:
            seen, before = self._losses_reported, self._unflushed_losses
            req = _Request()
            req.commands.append(_Command(req, _FLUSH, 0, 0))
            await self._run(req)
            self._check_losses(seen, before)

    def _check_losses(self, seen: int, before: int) -> None:
        """Fails a flush if writes were lost with their connection since the
        last flush that reported such a loss (`seen`, when this one was
        asked for). It reports only the losses from `before` it was asked
        for: a write acknowledged after that, lost meanwhile, was never its
        to cover, and the guest's next flush, which must cover it, fails
        too."""
        if self._unflushed_losses <= seen:
            return
        self._losses_reported = max(self._losses_reported, before)
        raise NbdError(f"{self.uri}: flush failed: writes completed on a lost connection "
                       "may not be durable (the server doesn't offer multi-conn)", errno.EIO)

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        if not self.caps.trim:
            raise NbdError(f"{self.uri}: the server doesn't support trim")
        await self._run(self._range_request(_TRIM, offset, length, 0))

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check_writable()
        if self.caps.zero:
            # Without the guest's unmap flag the server must keep the range allocated.
            await self._run(self._range_request(_ZERO, offset, length,
                                                0 if unmap else libnbd.CMD_FLAG_NO_HOLE))
            return
        req = _Request()
        for at in range(0, length, len(_ZEROS)):
            n = min(len(_ZEROS), length - at)
            req.commands.append(_Command(req, _WRITE, offset + at, n, _ZEROS_C, 0))
        await self._run(req)

    def close(self) -> None:
        """Fails what is still pending and frees every handle. Safe from any
        thread; the device calls it once it is done with the back-end.

        The handles, and the futures of the requests waiting on them,
        belong to the event loop that drives them: from another thread
        while that loop runs, they are closed there. If the loop is held up
        for CLOSE_WAIT seconds, close() returns without them (it may be in
        the middle of a libnbd call with one) and the loop closes them when
        it runs again; a loop closed meanwhile leaves them to us."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None and loop.is_running() and not _on_loop(loop):
            self._close_on(loop)
        else:
            self._close_all()

    def _close_on(self, loop: asyncio.AbstractEventLoop) -> None:
        done = threading.Event()

        def shutdown():
            try:
                self._close_all()
            finally:
                done.set()
        try:
            loop.call_soon_threadsafe(shutdown)
        except RuntimeError:        # closed meanwhile: nothing drives the handles
            self._close_all()
            return
        deadline = time.monotonic() + CLOSE_WAIT
        while not done.wait(0.05):
            if loop.is_closed():
                # Only closed: a loop merely stopped may run again (asyncio.run
                # does, to cancel its tasks) and use the handles then.
                self._close_all()
                return
            if time.monotonic() >= deadline:
                log.error("%s: the event loop didn't run for %gs; it closes the connections "
                          "when it runs again", self.uri, CLOSE_WAIT)
                return

    # -- building requests ---------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise NbdError(f"{self.uri}: read-only export")

    def _data_request(self, op: int, offset: int, bufs, flags: int = 0) -> _Request:
        req = _Request()
        step = self.caps.max_data
        pos = offset
        for view in bufs:
            n = len(view)
            if not n:
                continue
            cbuf = ffi.from_buffer(view)
            req.buffers.append(cbuf)
            for at in range(0, n, step):
                req.commands.append(_Command(req, op, pos + at, min(step, n - at), cbuf, at,
                                             flags))
            pos += n
        return req

    def _range_request(self, op: int, offset: int, length: int, flags: int) -> _Request:
        req = _Request()
        for at in range(0, length, MAX_RANGE):
            req.commands.append(_Command(req, op, offset + at, min(MAX_RANGE, length - at),
                                         flags=flags))
        return req

    # -- running requests (all on the device's event loop) ---------------------------------
    async def _run(self, req: _Request) -> None:
        try:
            if not req.commands:
                return
            if self._closed:
                raise NbdError(f"{self.uri}: back-end closed")
            loop = self._attach()
            if self._offline:
                raise self._offline_error()
            req.remaining = len(req.commands)
            req.future = loop.create_future()
            try:
                if self.timeout is not None:
                    req.timer = loop.call_later(self.timeout, self._expire, req)
                self._waiting.extend(req.commands)
                self._pump()
                await req.future
            except BaseException:
                # Cancelled, or failed with commands still out: nobody looks
                # at the buffers any more and they may soon be unmapped, so
                # libnbd must let go of them before we return.
                if req.remaining:
                    self._abandon(req)
                raise
        finally:
            # Released now, not by the garbage collector: a from_buffer()
            # object collected in a cycle with its memoryview crashes cffi.
            for cbuf in req.buffers:
                ffi.release(cbuf)
            req.buffers.clear()
            req.commands.clear()

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            for conn in self._conns:
                if conn is not None and conn.ready:
                    conn.watch(loop, self._on_event)
        return loop

    def _pump(self) -> None:
        """Sends waiting commands on ready connections."""
        self._pump_soon = False
        while self._waiting:
            conn = self._pick()
            if conn is None:
                self._ensure_connections()
                return
            cmd = self._waiting.popleft()
            broken = self._send(conn, cmd)
            if broken is not None:
                self._waiting.appendleft(cmd)
                self._lost(conn, broken)
            elif conn.dead():
                # Its server had gone, unseen yet: libnbd took the command
                # and found out sending it, and wants its fd watched no more.
                self._lost(conn, NbdError("connection closed while sending"))
            else:
                conn.watch(self._loop, self._on_event)

    def _schedule_pump(self) -> None:
        if not self._pump_soon and self._loop is not None and not self._loop.is_closed():
            self._pump_soon = True
            self._loop.call_soon(self._pump)

    def _pick(self) -> _Connection | None:
        best = None
        for conn in self._conns:
            if conn is not None and conn.ready and (
                    best is None or len(conn.inflight) < len(best.inflight)):
                best = conn
        return best

    def _send(self, conn: _Connection, cmd: _Command) -> NbdError | None:
        """Puts cmd on conn; the error if the connection turned out broken."""
        lb, h, op = libnbd.lib(), conn.h, cmd.op
        cb = libnbd.NO_CALLBACK
        if op == _READ:
            cookie = lb.nbd_aio_pread(h, cmd.buf + cmd.at, cmd.length, cmd.offset, cb, 0)
        elif op == _WRITE:
            cookie = lb.nbd_aio_pwrite(h, cmd.buf + cmd.at, cmd.length, cmd.offset, cb,
                                       cmd.flags)
        elif op == _FLUSH:
            cmd.covers = conn.written
            cookie = lb.nbd_aio_flush(h, cb, 0)
        elif op == _TRIM:
            cookie = lb.nbd_aio_trim(h, cmd.length, cmd.offset, cb, cmd.flags)
        else:
            cookie = lb.nbd_aio_zero(h, cmd.length, cmd.offset, cb, cmd.flags)
        if cookie < 0:
            exc = libnbd.last_error(f"{_OP_NAMES[op]} at {cmd.offset}")
            if conn.dead() or exc.errno in libnbd.TRANSPORT_ERRNOS:
                return exc
            self._finish(cmd, exc)        # refused as such (range, flags): no use resending
            return None
        cmd.conn, cmd.cookie = conn, cookie
        conn.inflight[cookie] = cmd
        return None

    def _on_event(self, conn: _Connection, readable: bool) -> None:
        if conn.h == ffi.NULL:
            return
        lb = libnbd.lib()
        rc = lb.nbd_aio_notify_read(conn.h) if readable else lb.nbd_aio_notify_write(conn.h)
        reason = libnbd.last_error("connection") if rc < 0 else None
        if not conn.ready:
            self._connect_progress(conn, reason)
            return
        going = self._harvest(conn)
        if conn.dead() or going is not None:
            self._lost(conn, reason or going or NbdError("connection closed"))
        else:
            conn.watch(self._loop, self._on_event)

    def _harvest(self, conn: _Connection) -> NbdError | None:
        """Retires the commands that have their reply. Returns the error if
        the server says it is going away (ESHUTDOWN): that connection is
        done for, though libnbd still has it open."""
        lb = libnbd.lib()
        dead = conn.dead()
        going = None
        while True:
            cookie = lb.nbd_aio_peek_command_completed(conn.h)
            if cookie <= 0:
                return going
            ok = lb.nbd_aio_command_completed(conn.h, cookie)
            cmd = conn.inflight.pop(cookie, None)
            if cmd is None:
                continue
            cmd.conn = None
            if ok == 1:
                conn.note_done(cmd)
                self._finish(cmd, None)
                continue
            exc = libnbd.last_error(f"{_OP_NAMES[cmd.op]} at {cmd.offset}")
            if dead or exc.errno in libnbd.TRANSPORT_ERRNOS:
                self._requeue(cmd)         # aborted by the connection's end, not refused
                going = going or exc
            else:
                self._finish(cmd, exc)

    def _finish(self, cmd: _Command, exc: BaseException | None) -> None:
        if cmd.done:
            return
        cmd.done, cmd.conn, cmd.buf = True, None, None
        req = cmd.request
        if exc is not None and req.error is None:
            req.error = exc
        req.remaining -= 1
        if req.remaining:
            return
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        fut = req.future
        if fut is not None and not fut.done() and not fut.get_loop().is_closed():
            if req.error is not None:
                fut.set_exception(req.error)
            else:
                fut.set_result(None)

    def _requeue(self, cmd: _Command) -> None:
        cmd.conn = None
        if cmd.expired is not None:
            self._finish(cmd, cmd.expired)
        elif not cmd.done:
            self._waiting.appendleft(cmd)

    def _timeout_error(self) -> NbdTimeout:
        return NbdTimeout(f"{self.uri}: no reply within {self.timeout:g}s")

    def _expire(self, req: _Request) -> None:
        req.timer = None
        pending = [c for c in req.commands if not c.done]
        for cmd in pending:
            cmd.expired = self._timeout_error()
        for cmd in pending:
            if cmd.done:
                continue
            if cmd.conn is not None:
                # On the wire all this time: the server is hung (or far too
                # slow). Only closing the handle frees our buffer from it.
                self._lost(cmd.conn, self._timeout_error())
            else:
                try:
                    self._waiting.remove(cmd)
                except ValueError:
                    pass
                self._finish(cmd, self._timeout_error())

    def _abandon(self, req: _Request) -> None:
        cancelled = NbdError("request cancelled")
        for cmd in req.commands:
            cmd.expired = cancelled
        for cmd in req.commands:
            if cmd.done:
                continue
            if cmd.conn is not None:
                self._lost(cmd.conn, cancelled)
            else:
                try:
                    self._waiting.remove(cmd)
                except ValueError:
                    pass
                self._finish(cmd, cancelled)

    def _lost(self, conn: _Connection, reason: BaseException) -> None:
        """Drops a broken connection; its unanswered commands go again."""
        if self._conns[conn.slot] is conn:
            self._conns[conn.slot] = None
        orphans = list(conn.inflight.values())
        conn.inflight.clear()
        conn.close()
        self._note_unflushed(conn)
        for cmd in reversed(orphans):
            self._requeue(cmd)
        log.warning("%s: connection %d lost (%s); %d command(s) waiting to be sent again",
                    self.uri, conn.slot, reason, len(self._waiting))
        self._note_down()
        if self._waiting:
            self._schedule_pump()
        if conn.up_at is not None and time.monotonic() - conn.up_at >= STABLE_AFTER:
            self._backoff = 0.0
            self._ensure_connections()
        else:
            self._schedule_retry()

    def _note_unflushed(self, conn: _Connection) -> None:
        """Another connection's flush can't make a lost one's writes durable
        unless the server shares its cache among connections (multi-conn).
        A server without flush is taken to write through."""
        if conn.unflushed() and self.caps.flush and not self.caps.multi_conn:
            self._unflushed_losses += 1
            log.error("%s: connection %d lost with %d write(s) no flush covered; they may not "
                      "be durable and the next flush fails", self.uri, conn.slot,
                      conn.written - conn.flushed)

    # -- (re)connecting -------------------------------------------------------------------
    def _ensure_connections(self) -> None:
        """Starts connecting the empty slots, unless waiting out a back-off."""
        if (self._closed or self._retry_timer is not None or self._loop is None
                or self._loop.is_closed()):
            return
        for slot, conn in enumerate(self._conns):
            if conn is None:
                self._start_connect(slot)

    def _start_connect(self, slot: int) -> None:
        conn = _Connection(slot)
        self._conns[slot] = conn
        try:
            conn.start_connect(self.uri)
        except NbdError as exc:
            self._connect_failed(conn, exc)
            return
        conn.connect_timer = self._loop.call_later(
            self.connect_timeout, self._connect_failed, conn,
            NbdTimeout(f"no handshake within {self.connect_timeout:g}s"))
        self._connect_progress(conn, None)

    def _connect_progress(self, conn: _Connection, reason) -> None:
        lb = libnbd.lib()
        if lb.nbd_aio_is_ready(conn.h):
            if conn.connect_timer is not None:
                conn.connect_timer.cancel()
                conn.connect_timer = None
            size = lb.nbd_get_size(conn.h)
            if size != self.caps.size:
                log.error("%s: export is %d bytes now, was %d", self.uri, size, self.caps.size)
            conn.ready, conn.up_at = True, time.monotonic()
            conn.watch(self._loop, self._on_event)
            log.log(logging.WARNING if self._failures else logging.INFO,
                    "%s: connection %d up after %d failed attempt(s)", self.uri, conn.slot,
                    self._failures)
            self._failures = 0
            self._down_since, self._offline = None, False
            if self._offline_timer is not None:
                self._offline_timer.cancel()
                self._offline_timer = None
            self._pump()
        elif conn.dead():
            self._connect_failed(conn, reason or libnbd.last_error("connect"))
        else:
            conn.watch(self._loop, self._on_event)

    def _connect_failed(self, conn: _Connection, reason: BaseException) -> None:
        conn.connect_timer = None
        conn.close()
        if self._conns[conn.slot] is conn:
            self._conns[conn.slot] = None
        self._failures += 1
        (log.warning if self._failures == 1 else log.debug)(
            "%s: connecting failed (%s); trying again", self.uri, reason)
        self._note_down()
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._retry_timer is None and not self._closed and not self._loop.is_closed():
            self._backoff = min(MAX_BACKOFF, max(0.05, self._backoff * 2))
            self._retry_timer = self._loop.call_later(self._backoff, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        self._ensure_connections()

    def _note_down(self) -> None:
        """Starts the outage clock when the last connection is gone."""
        if (self._down_since is not None or self._closed or self._loop is None
                or self._loop.is_closed()):
            return
        if any(c is not None and c.ready for c in self._conns):
            return
        self._down_since = self._loop.time()
        if self.timeout is not None:
            self._offline_timer = self._loop.call_later(self.timeout, self._go_offline)

    def _go_offline(self) -> None:
        self._offline_timer = None
        self._offline = True
        log.error("%s: unreachable for %gs; failing requests until a connection is back",
                  self.uri, self.timeout)
        waiting = list(self._waiting)
        self._waiting.clear()
        for cmd in waiting:
            self._finish(cmd, self._offline_error())

    def _offline_error(self) -> NbdError:
        return NbdError(f"{self.uri}: unreachable for more than {self.timeout:g}s")

    # -- teardown ---------------------------------------------------------------------
    def _close_all(self) -> None:
        # A loop that stopped while close() waited (close() closes then)
        # may run its queued shutdown later, from another thread: a handle
        # must be closed once.
        with self._teardown:
            self._close_all_locked()

    def _close_all_locked(self) -> None:
        self._closed = True
        for timer in (self._retry_timer, self._offline_timer):
            if timer is not None:
                timer.cancel()
        self._retry_timer = self._offline_timer = None
        lb = libnbd.lib()
        orphans: list[_Command] = []
        for slot, conn in enumerate(self._conns):
            if conn is None:
                continue
            if conn.ready and not conn.inflight and not conn.dead():
                lb.nbd_aio_disconnect(conn.h, 0)    # a polite goodbye, if it fits in the socket
            orphans.extend(conn.inflight.values())
            conn.inflight.clear()
            conn.close()
            self._conns[slot] = None
        orphans.extend(self._waiting)
        self._waiting.clear()
        closed = NbdError(f"{self.uri}: back-end closed")
        for cmd in orphans:
            cmd.expired = closed
            self._finish(cmd, closed)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
