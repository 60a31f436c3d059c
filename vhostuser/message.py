"""One vhost-user message as it travels on the wire, either way: the
request number, header flags, payload and the fds passed with it. The
back-end's and the front-end's connections both speak in these."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import protocol
from .errors import ProtocolError, request_name


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & protocol.FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & protocol.FLAG_REPLY)

    def name(self) -> str:
        return request_name(self.request)

    def u64(self) -> int:
        """The payload as the u64 most requests and replies carry
        (ProtocolError if it is something else)."""
        if len(self.payload) != protocol.U64.size:
            raise ProtocolError(self.request, f"expected a u64 payload, got "
                                              f"{len(self.payload)} bytes")
        return protocol.U64.unpack(self.payload)[0]

    def close_fds(self) -> None:
        """Closes every fd the message still holds (the ones nobody kept)."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    def take_fd(self) -> int | None:
        """Hands over ownership of the first fd (None if there is none)."""
        return self.fds.pop(0) if self.fds else None
