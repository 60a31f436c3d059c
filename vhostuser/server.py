"""Socket modes for serving a device: listen on a path, connect to a path
(QEMU ``server=on``), or an inherited listening fd (systemd, libvirt).

One front-end at a time per device, as vhost-user defines it; a second
connection while one is active is closed at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket

from .connection import BackendConnection
from .device import Device
from .errors import SocketInUse, SocketPlaceError, VhostUserError
from .handler import Session
from .loglimit import LogLimiter
from . import unixsock
from .sandbox import access as sandbox_access

log = logging.getLogger(__name__)


#: How long a new front-end waits for the previous connection to end.
RECONNECT_GRACE = 2.0
# accept() errors that pass: out of fds or memory for now, or a connection
# that went away before we took it. Serving goes on after a pause.
_TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                                      errno.ECONNABORTED, errno.EPROTO})
ACCEPT_BACKOFF = (0.1, 1.0)     # first and longest pause after one of them


def parse_socket_mode(text: str) -> int:
    """'0660', '660' or '0o660' -> 0o660: permission bits only (no setuid,
    setgid or sticky bit, which mean nothing on a socket). ValueError with
    the reason otherwise."""
    digits = text.strip().lower().removeprefix("0o")
    if not digits or len(digits) > 4 or any(c not in "01234567" for c in digits):
        raise ValueError(f"socket mode must be octal, like 0660, not {text!r}")
    mode = int(digits, 8)
    if mode > 0o777:
        raise ValueError(f"socket mode must be 0..0777 (permission bits only), not {text!r}")
    return mode


def resolve_group(group: str | int) -> int:
    """A group name or number -> its gid; ValueError naming an unknown one."""
    if isinstance(group, int):
        if group < 0:
            raise ValueError(f"no group {group}")
        return group
    text = group.strip()
    if text.isdigit():
        return int(text)
    try:
        return sandbox_access.group_id(text)
    except KeyError:
        raise ValueError(f"no group named {text!r}") from None


def bind_unix(path: str, *, mode: int | None = None, gid: int | None = None) -> socket.socket:
    """A listening socket at ``path``, with group ``gid`` (default: the
    process's) and permissions ``mode`` (default 0600, or 0660 with a gid),
    made race-free (vhostuser/unixsock.py) - by the sandbox's helper when
    this process is confined. SocketInUse when a live process serves it,
    SocketPlaceError when it can't be made there."""
    try:
        brokered = sandbox_access.bind_unix(path, mode=mode, gid=gid)
        if brokered is not None:
            return brokered
        return unixsock.bind_unix(path, mode=mode, gid=gid)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EEXIST):
            raise SocketInUse(exc.strerror or str(exc)) from None
        raise SocketPlaceError(exc.strerror or str(exc)) from None


class Server:
    """Serves one device on one socket until :meth:`close`."""

    def __init__(self, device: Device, *, path: str | None = None, fd: int | None = None,
                 connect: str | None = None, reconnect_delay: float = 0.5,
                 socket_mode: int | None = None, socket_gid: int | None = None):
        if sum(x is not None for x in (path, fd, connect)) != 1:
            raise ValueError("give exactly one of path, fd, connect")
        if path is None and (socket_mode is not None or socket_gid is not None):
            raise ValueError("socket_mode and socket_gid are for a socket made at path")
        self.device = device
        self.path = path
        self.socket_mode = socket_mode
        self.socket_gid = socket_gid
        self.fd = fd
        self.connect_path = connect
        self.reconnect_delay = reconnect_delay
        self.session: Session | None = None
        self._listener: socket.socket | None = None
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self._slot = asyncio.Lock()     # held by the one session being served
        self.connections = 0
        self._accept_log = LogLimiter(log)

    @property
    def name(self) -> str:
        return self.path or self.connect_path or f"fd {self.fd}"

    def open(self) -> None:
        """Creates the listening socket now, so errors surface before serving."""
        if self.path is not None:
            self._listener = bind_unix(self.path, mode=self.socket_mode, gid=self.socket_gid)
        elif self.fd is not None:
            self._listener = socket.socket(fileno=self.fd)
            if self._listener.family != socket.AF_UNIX:
                raise VhostUserError(f"fd {self.fd} is not a unix socket")

    async def serve(self) -> None:
        """Runs until closed."""
        if self.connect_path is not None:
            await self._serve_connect()
            return
        if self._listener is None:
            self.open()
        self._listener.setblocking(False)
        loop = asyncio.get_running_loop()
        backoff = ACCEPT_BACKOFF[0]
        while not self._closing:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except (OSError, asyncio.CancelledError) as exc:
                if self._closing:
                    return
                if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                    # e.g. a burst of connections using up our fds: those
                    # end, and the listener must still be there then.
                    self._accept_log.log("accept", logging.WARNING,
                                         "%s: accept failed (%s); retrying in %.1f s",
                                         self.name, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, ACCEPT_BACKOFF[1])
                    continue
                raise
            backoff = ACCEPT_BACKOFF[0]
            # Keep accepting meanwhile; each connection waits its turn.
            task = asyncio.create_task(self._serve_in_turn(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_in_turn(self, sock: socket.socket) -> None:
        """One front-end at a time. A front-end that reconnects (QEMU after a
        hiccup) can be faster than our noticing its old connection ended, so
        a newcomer waits briefly for the slot before it is refused."""
        try:
            await asyncio.wait_for(self._slot.acquire(), RECONNECT_GRACE)
        except asyncio.TimeoutError:
            log.warning("%s: refusing a second front-end while one is connected", self.name)
            sock.close()
            return
        try:
            if self._closing:       # closed while this one waited its turn
                sock.close()
                return
            await self._serve_connection(sock)
        finally:
            self._slot.release()

    async def _serve_connect(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                # sandboxed: the helper connects (the path is out of view)
                sock = sandbox_access.connect_unix(self.connect_path)
                if sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, self.connect_path)
                    except OSError:
                        sock.close()
                        raise
                sock.setblocking(False)
            except OSError as exc:
                log.debug("%s: connect failed (%s); retrying", self.name, exc)
                await asyncio.sleep(self.reconnect_delay)
                continue
            await self._serve_connection(sock)
            if not self._closing:
                await asyncio.sleep(self.reconnect_delay)

    async def _serve_connection(self, sock: socket.socket) -> None:
        self.connections += 1
        conn = BackendConnection(sock, name=f"{self.name}#{self.connections}")
        log.info("%s: front-end connected", conn.name)
        try:
            self.session = Session(self.device, conn)
        except Exception:
            log.exception("%s: could not set up a session", conn.name)
            conn.close()
            return
        try:
            await self.session.run()
        finally:
            self.session = None

    def close(self) -> None:
        self._closing = True
        if self.session is not None:
            self.session.conn.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            if self.path is not None:
                with contextlib.suppress(OSError):
                    sandbox_access.unlink_socket(self.path)
            self._listener = None

    @property
    def serving(self) -> bool:
        """Whether a connection's session is still being served (or torn down)."""
        return bool(self._tasks)

    async def wait_closed(self) -> None:
        """After :meth:`close`: waits until every connection's session has
        torn down (workers joined, rings freed), so the device may be closed."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
