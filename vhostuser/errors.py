"""Exception types: every error the library raises is a VhostUserError.

Each carries the value that was wrong, and a short stable ``code`` that
machine readers (the daemon's control socket) pass on without parsing the
message. Where an error is also a standard kind (a bad value, an OS error,
a timeout), it derives from that too, so ``except ValueError`` still works.
"""
from __future__ import annotations


class VhostUserError(Exception):
    """Base of every error this library raises."""

    code = "error"

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


class ConnectionClosed(VhostUserError):
    """The peer closed the socket (possibly in the middle of a message)."""


def request_name(request: int | None) -> str:
    """A request number's name in the spec ("request N" if it has none;
    "message" when the header wasn't read yet)."""
    from .protocol import Request
    if request is None:
        return "message"
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


class ProtocolError(VhostUserError):
    """A front-end message that breaks the protocol: the request is refused
    (non-zero REPLY_ACK where negotiated, otherwise the connection is closed).
    ``request`` is the request's number (None: not known yet)."""

    code = "protocol-error"

    def __init__(self, request: int | None, reason: str):
        self.request = None if request is None else int(request)
        self.reason = reason
        super().__init__(f"{request_name(self.request)}: {reason}")


class FramingError(ProtocolError):
    """The byte stream can't be parsed any further: always closes the connection."""


class SocketInUse(VhostUserError):
    """A live process (or another export, or the daemon's control socket)
    already has the socket path."""

    code = "socket-in-use"


class SocketPlaceError(VhostUserError):
    """The socket can't be made there, or not with the group asked for."""

    code = "socket-place"


class RequestsInFlight(VhostUserError, TimeoutError):
    """A change that must wait for the requests taken before it (a disk
    made read-only, shrunk) gave up: ``pending`` of them were still in
    flight after ``timeout`` seconds, and may still reach the storage.
    ``what`` names the change; whether it stands says the caller's
    documentation (read-only does: later writes are refused)."""

    code = "in-flight"

    def __init__(self, what: str, pending: int, timeout: float):
        self.what = what
        self.pending = pending
        self.timeout = timeout
        super().__init__(f"{what}: {pending} request{'s' if pending != 1 else ''} taken before "
                         f"still in flight after {timeout:g}s; {'they' if pending != 1 else 'it'} "
                         f"may still reach the storage")


class NativeError(VhostUserError):
    """A data-plane call failed; ``code_value`` is the C ``vu_err`` value."""

    def __init__(self, code: int, message: str, context: str = ""):
        self.code_value = code
        self.message = message
        self.context = context
        super().__init__(f"{context}: {message}" if context else message)


class MemoryMapError(NativeError):
    """A memory region could not be added, mapped or removed."""


class AddressError(NativeError):
    """A guest or user address does not lie inside the mapped memory."""


class QueueError(NativeError):
    """A virtqueue could not be configured, or its ring is malformed."""
