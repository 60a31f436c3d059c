"""One vhost-user socket: message framing, fd passing, replies (asyncio).

A message is a 12-byte header and ``size`` payload bytes; fds ride as
SCM_RIGHTS on the header. We read the header and the payload in separate
recvmsg calls (as QEMU does) so a message's fds are never confused with the
next message's, and we never read more than one message ahead.
"""
from __future__ import annotations

import array
import asyncio
import logging
import os
import socket

from . import protocol
from .message import Message
from .errors import ConnectionClosed, FramingError

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
_CMSG_SPACE = socket.CMSG_SPACE(protocol.MAX_FDS * _FD_SIZE)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _fds_from_ancillary(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
            fds.extend(arr)
    return fds


class BackendConnection:
    """A connected vhost-user socket driven by the running event loop."""

    def __init__(self, sock: socket.socket, *, name: str = "vhost-user"):
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self._waiter: asyncio.Future | None = None

    async def _wait(self, writable: bool = False) -> None:
        fut = self._loop.create_future()
        fd = self.sock.fileno()
        add = self._loop.add_writer if writable else self._loop.add_reader
        remove = self._loop.remove_writer if writable else self._loop.remove_reader
        add(fd, lambda: fut.done() or fut.set_result(None))
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None
            if not self.closed:
                remove(fd)

    async def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self.closed:
                raise ConnectionClosed(self.name)
            try:
                data, anc, flags, _ = self.sock.recvmsg(n - len(buf), _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                await self._wait()
                continue
            except OSError as exc:
                raise ConnectionClosed(f"{self.name}: {exc}") from exc
            fds.extend(_fds_from_ancillary(anc))
            if flags & socket.MSG_CTRUNC or len(fds) > protocol.MAX_FDS:
                # More fds than any message may carry (in one recvmsg or
                # over all of those of one message): the peer is broken.
                raise FramingError(None, f"more than {protocol.MAX_FDS} fds on one message")
            if not data:
                raise ConnectionClosed(self.name if not buf else f"{self.name}: truncated message")
            buf += data
        return bytes(buf)

    async def recv(self) -> Message:
        """Reads the next whole message; on any error its fds are closed."""
        fds: list[int] = []
        try:
            header = await self._recv_exact(protocol.HEADER_SIZE, fds)
            request, flags, size = protocol.HEADER.unpack(header)
            if size > protocol.MAX_PAYLOAD:
                # We cannot skip what we don't trust the length of.
                raise FramingError(request, f"payload size {size} > {protocol.MAX_PAYLOAD}")
            payload = await self._recv_exact(size, fds) if size else b""
        except BaseException:
            _close_all(fds)
            raise
        return Message(request, flags, payload, fds)

    async def send(self, request: int, payload: bytes = b"", *, flags: int | None = None,
                   fds: list[int] = ()) -> None:
        """Sends one message (a reply unless flags say otherwise)."""
        if flags is None:
            flags = protocol.VERSION | protocol.FLAG_REPLY
        data = protocol.pack_header(request, flags, len(payload)) + payload
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = 0
        while sent < len(data):
            if self.closed:
                raise ConnectionClosed(self.name)
            try:
                n = self.sock.sendmsg([data[sent:]], anc if sent == 0 else [])
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            except OSError as exc:
                raise ConnectionClosed(f"{self.name}: {exc}") from exc
            sent += n

    async def reply(self, msg: Message, payload: bytes = b"", fds: list[int] = ()) -> None:
        await self.send(msg.request, payload, fds=fds)

    async def reply_u64(self, msg: Message, value: int) -> None:
        await self.reply(msg, protocol.U64.pack(value))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            waiter = self._waiter
            if waiter is not None:
                fd = self.sock.fileno()
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
                if not waiter.done():
                    waiter.set_exception(ConnectionClosed(self.name))
            try:
                self.sock.close()
            except OSError:
                pass
