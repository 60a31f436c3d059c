"""Why a management request was refused. Each error carries the code the
control socket puts in its reply, so scripts can tell causes apart without
parsing messages. A refused request has changed nothing."""
from __future__ import annotations

from ..errors import SocketInUse, VhostUserError

__all__ = ["SocketInUse"]     # the library's own: one class, caught anywhere


class ManageError(VhostUserError):
    """Base of every refusal; ``code`` is a short stable string."""

    code = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BadRequest(ManageError):
    """The request itself is malformed: not a JSON object, no ``cmd``..."""
    code = "bad-request"


class BadJson(BadRequest):
    code = "bad-json"


class LineTooLong(BadRequest):
    code = "line-too-long"


class UnknownCommand(ManageError):
    code = "unknown-command"


class BadArgument(ManageError):
    """An argument is missing, unknown, of the wrong type or out of range."""
    code = "bad-args"


class NoSuchExport(ManageError):
    code = "no-such-export"


class ExportExists(ManageError):
    code = "export-exists"


class NotSupported(ManageError):
    """The operation does not apply to this export (resize of a net device)."""
    code = "not-supported"


class BadState(ManageError):
    """The export is not in a state the operation needs (start a running one)."""
    code = "bad-state"


class BackendFailed(ManageError):
    """The back-end could not be opened or refused the change."""
    code = "backend-error"


class StillInFlight(ManageError):
    """A change that waits for the requests taken before it (set-read-only
    on, a shrinking resize) gave up after the drain timeout with some still
    in flight. Unlike other refusals it may have changed something: the
    message says what stands (a read-only disk stays read-only)."""
    code = "in-flight"


class InternalError(ManageError):
    """A bug of ours; logged in full by the daemon."""
    code = "internal-error"
