"""The front-end's end of the vhost-user socket: framing, fd passing, replies.

Blocking on purpose: tests and the fuzzer want one request, then its answer,
in program order. Nothing here knows what a request means beyond whether
the protocol promises an answer to it.
"""
from __future__ import annotations

import array
import errno
import os
import socket
import struct
import time

from .. import protocol
from ..errors import VhostUserError, request_name
from ..message import Message
from ..protocol import FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_MASK, HEADER, VERSION, Request

DEFAULT_TIMEOUT = 5.0


class FrontendError(VhostUserError):
    """Anything that went wrong on the front-end side of a vhost-user session."""


class BackendClosed(FrontendError):
    """The back-end closed (or reset) the connection."""


class FrontendTimeout(FrontendError, TimeoutError):
    """The back-end did not answer, or did not complete buffers, in time."""


class ReplyError(FrontendError):
    """A reply was malformed, answered the wrong request, or reported failure."""

    def __init__(self, request: int, problem: str, status: int | None = None):
        self.request = request
        self.status = status        # the u64 of a REPLY_ACK, when that is what failed
        super().__init__(f"{request_name(request)}: {problem}")


def reply_u64(msg: Message) -> int:
    """The u64 a reply carries (ReplyError if it carries something else)."""
    if len(msg.payload) != protocol.U64.size:
        raise ReplyError(msg.request, f"expected a u64 payload, got {len(msg.payload)} bytes")
    return protocol.U64.unpack(msg.payload)[0]


class FrontendConnection:
    """A connected vhost-user socket, front-end side."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT):
        self.sock = sock
        self.timeout = timeout

    @classmethod
    def connect(cls, path: str, *, timeout: float = DEFAULT_TIMEOUT,
                wait: float = 0.0) -> "FrontendConnection":
        """Connects to the back-end listening on ``path``.

        ``wait`` keeps retrying for that many seconds while the socket does not
        exist yet or refuses, which covers a back-end that is still starting.
        """
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(timeout)
                sock.connect(os.fspath(path))
                return cls(sock, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def peer_pid(self) -> int:
        """The back-end's process (SO_PEERCRED: who listened on the socket)."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                     struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def close(self) -> None:
        self.sock.close()

    # -- sending ---------------------------------------------------------------
    def send(self, request: int, payload: bytes = b"", fds=(), *, flags: int = VERSION,
             size: int | None = None) -> None:
        """Sends one message; header, payload and fds go out in a single sendmsg.

        ``flags`` is sent exactly as given. ``size`` overrides the header's
        size field (which otherwise is ``len(payload)``), for lying on purpose.
        """
        header = HEADER.pack(request, flags, len(payload) if size is None else size)
        self.send_bytes(header + bytes(payload), fds)

    def send_bytes(self, data: bytes, fds=()) -> None:
        """Puts raw bytes (and fds, with the first chunk) on the socket."""
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        view = memoryview(data)
        try:
            self.sock.settimeout(self.timeout)
            sent = self.sock.sendmsg([view], ancillary)
            while sent < len(view):        # a short write only happens on huge lies
                sent += self.sock.send(view[sent:])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise BackendClosed(f"back-end closed the connection ({e.strerror})") from None
        except TimeoutError:
            raise FrontendTimeout(f"sending {len(data)} bytes took over {self.timeout}s") from None

    # -- receiving -------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Message:
        """Receives one whole message (any fds that came with it are in ``fds``).

        After a FrontendTimeout in the middle of a message the stream is out
        of step; close the connection.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        fds: list[int] = []
        try:
            header = self._recv_exact(HEADER.size, fds, deadline, at_start=True)
            request, flags, size = HEADER.unpack(header)
            if size > protocol.MAX_PAYLOAD:
                raise ReplyError(request, f"header claims a {size}-byte payload")
            payload = self._recv_exact(size, fds, deadline) if size else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Message(request, flags, payload, fds)

    def _recv_exact(self, n: int, fds: list[int], deadline: float, at_start: bool = False) -> bytes:
        buf = bytearray()
        cmsg_space = socket.CMSG_SPACE(protocol.MAX_FDS * array.array("i").itemsize)
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrontendTimeout(f"no complete message within the timeout "
                                      f"({len(buf)} of {n} bytes)")
            self.sock.settimeout(remaining)
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(n - len(buf), cmsg_space)
            except TimeoutError:
                continue
            except ConnectionResetError:
                raise BackendClosed("back-end reset the connection") from None
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % array.array("i").itemsize
                    fds.extend(array.array("i", cdata[:usable]))
            if msg_flags & socket.MSG_CTRUNC:
                raise FrontendError("back-end sent more fds than a message may carry")
            if not data:
                where = "" if at_start and not buf else f" after {len(buf)} of {n} bytes"
                raise BackendClosed(f"back-end closed the connection{where}")
            buf += data
        return bytes(buf)

    def recv_reply(self, request: int, timeout: float | None = None) -> Message:
        """Receives the reply to ``request`` and checks its header."""
        msg = self.recv(timeout)
        if msg.request != request:
            msg.close_fds()
            raise ReplyError(request, f"reply is for {request_name(msg.request)}")
        if not msg.is_reply:
            msg.close_fds()
            raise ReplyError(request, f"reply lacks the REPLY flag (flags {msg.flags:#x})")
        if msg.flags & FLAG_VERSION_MASK != VERSION:
            msg.close_fds()
            raise ReplyError(request, f"reply has version {msg.flags & FLAG_VERSION_MASK}")
        return msg

    def call(self, request: int, payload: bytes = b"", fds=(), *, reply: bool = False,
             ack: bool = False, timeout: float | None = None) -> Message | None:
        """Sends a request and waits for what the protocol says comes back.

        ``reply``: the request has a reply of its own (GET_*); it is returned.
        ``ack``: set NEED_REPLY and check the REPLY_ACK status (ReplyError when
        non-zero). Neither: nothing is read and None is returned.
        """
        flags = VERSION | (FLAG_NEED_REPLY if ack and not reply else 0)
        self.send(request, payload, fds, flags=flags)
        if reply:
            return self.recv_reply(request, timeout)
        if ack:
            msg = self.recv_reply(request, timeout)
            msg.close_fds()
            status = reply_u64(msg)
            if status:
                raise ReplyError(request, f"back-end reports failure (status {status:#x})", status)
            return msg
        return None
