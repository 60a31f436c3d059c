"""One export: a device served on its own socket, started and stopped
independently of every other export in the daemon."""
from __future__ import annotations

import asyncio
import contextlib
import logging

from ..device import Device
from ..errors import VhostUserError
from ..handler import drain_timeout
from ..server import Server, SocketPlaceError
from .errors import BackendFailed, BadState, SocketInUse
from .specs import ExportSpec

log = logging.getLogger(__name__)

RUNNING, STOPPED, STOPPING, FAILED = "running", "stopped", "stopping", "failed"

#: closes deferred until a lingering session ends (kept so they are not collected)
_closing: set[asyncio.Task] = set()


async def deferred_closes() -> None:
    """Waits for the device closes deferred by stop() (at exit: a back-end's
    flush() and close() must still run once its blocked call returns)."""
    while _closing:
        names = ", ".join(sorted(t.get_name() for t in _closing))
        log.warning("waiting for a back-end call to return before the device closes (%s)",
                    names)
        await asyncio.wait(set(_closing))


class Export:
    """A named device and the server that serves it (None while stopped).

    The device outlives stop/start: a restarted export keeps its size,
    read-only flag, limits and counters.
    """

    def __init__(self, spec: ExportSpec, device: Device):
        self.spec = spec
        self.device = device
        self.server: Server | None = None
        self.state = STOPPED
        self.failure: str | None = None     # why the server stopped on its own
        self.connections = 0                # front-ends served, over restarts
        self._task: asyncio.Task | None = None
        self._lingering: Server | None = None   # stopped, a session still ending
        self._deferred_close: asyncio.Task | None = None    # see _close_later()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ending(self) -> bool:
        """Closed, but the device waits for a session still in the back-end."""
        return self._deferred_close is not None and not self._deferred_close.done()

    @property
    def connected(self) -> bool:
        session = self.device.session
        return session is not None and not session.closed

    def start(self) -> None:
        """Listens on the socket and serves in a task of the running loop."""
        if self._lingering is not None and self._lingering.serving:
            # Its worker still runs in the device: a second session would too.
            raise BadState(f"{self.name}: the last front-end's session is still ending (a "
                           f"back-end call has not returned)")
        try:
            server = Server(self.device, path=self.spec.socket_path,
                            socket_mode=self.spec.socket_mode, socket_gid=self.spec.socket_gid)
            server.open()
        except (SocketPlaceError, ValueError) as exc:   # ValueError: the group is gone
            raise BackendFailed(f"{self.name}: {exc}") from None
        except (OSError, VhostUserError) as exc:
            raise SocketInUse(f"{self.name}: {exc}") from None
        self.server = server
        self.state = RUNNING
        self.failure = None
        self._task = asyncio.get_running_loop().create_task(server.serve(),
                                                             name=f"export {self.name}")
        self._task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task) -> None:
        # Serving ended without stop(): only this export is affected.
        if task.cancelled() or self.state != RUNNING:
            return
        exc = task.exception()
        self.failure = str(exc) if exc else "server ended"
        self.state = FAILED
        log.error("export %s stopped serving: %s", self.name, self.failure)
        if self.server is not None:
            self.server.close()

    async def stop(self, why: str = "stop") -> None:
        """Finishes requests in flight, disconnects the front-end and
        removes the socket. The device stays open."""
        server = self.server
        if server is None:
            self.state = STOPPED
            return
        self.state = STOPPING
        session = server.session
        if session is not None and not session.closed:
            # Takes no new requests and waits for those in flight, so the
            # front-end reconnecting elsewhere resubmits nothing twice.
            await session.stop(why)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        server.close()
        if not await self._sessions_end(server):
            # A queue worker is still inside a plain back-end method: its
            # session (and the device under it) go when that returns.
            log.warning("export %s: a queue worker is still inside the back-end; the export "
                        "is stopped, its device is closed once that call returns", self.name)
            self._lingering = server
        self.connections += server.connections
        self.server = None
        self._task = None
        self.state = STOPPED
        log.info("export %s stopped (%s)", self.name, why)

    @property
    def total_connections(self) -> int:
        return self.connections + (self.server.connections if self.server else 0)

    async def _sessions_end(self, server: Server) -> bool:
        """Waits for the server's sessions to end; False if one is still
        waiting for a worker after the time its requests in flight get."""
        # stop() drained once; the session's own end drains once more.
        # (A timeout cancels only the waiting, not the sessions.)
        try:
            await asyncio.wait_for(server.wait_closed(), 2 * drain_timeout(self.device) + 1)
        except asyncio.TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Frees the device and its back-end (a disk's is flushed first,
        awaited here); only after stop(). With a session still ending (see
        stop()), once it has."""
        if self._close_later():
            return
        aclose = getattr(self.device, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            self.device.close()

    def close_in_background(self) -> asyncio.Task:
        """aclose() in a task of its own, which deferred_closes() waits
        for: a caller cancelled meanwhile (a remove whose control client the
        daemon's exit cancels) leaves it running, so the device is still
        flushed and closed."""
        task = asyncio.get_running_loop().create_task(self.aclose(), name=f"close {self.name}")
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        return task

    def _close_later(self) -> bool:
        """Defers aclose() until the lingering session ended; True if it did.
        The device's workers may still run until then."""
        server, self._lingering = self._lingering, None
        if server is None or not server.serving:
            return False

        async def after_sessions():
            await server.wait_closed()
            await self.aclose()
            log.info("export %s: device closed after its last session ended", self.name)
        task = asyncio.get_running_loop().create_task(after_sessions(),
                                                      name=f"close {self.name}")
        self._deferred_close = task
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        return True
