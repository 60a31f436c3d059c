"""Exception types. Each carries the value that was wrong."""
from __future__ import annotations


class VhostUserError(Exception):
    """Base of every error this library raises."""


class ConnectionClosed(VhostUserError):
    """The peer closed the socket (possibly in the middle of a message)."""


class ProtocolError(VhostUserError):
    """A front-end message that breaks the protocol: the request is refused
    (non-zero REPLY_ACK where negotiated, otherwise the connection is closed)."""

    def __init__(self, request: int | str, reason: str):
        self.request = request
        self.reason = reason
        super().__init__(f"{request}: {reason}")


class FramingError(ProtocolError):
    """The byte stream can't be parsed any further: always closes the connection."""


class NativeError(VhostUserError):
    """A data-plane call failed; ``code`` is the C ``vu_err`` value."""

    def __init__(self, code: int, message: str, context: str = ""):
        self.code = code
        self.message = message
        self.context = context
        super().__init__(f"{context}: {message}" if context else message)


class MemoryMapError(NativeError):
    """A memory region could not be added, mapped or removed."""


class AddressError(NativeError):
    """A guest or user address does not lie inside the mapped memory."""


class QueueError(NativeError):
    """A virtqueue could not be configured, or its ring is malformed."""
