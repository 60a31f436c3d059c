"""One export: a device served on its own socket, started and stopped
independently of every other export in the daemon."""
from __future__ import annotations

import asyncio
import contextlib
import logging

from ..device import Device
from ..errors import VhostUserError
from ..server import Server, SocketPlaceError
from .errors import BackendFailed, SocketInUse
from .specs import ExportSpec

log = logging.getLogger(__name__)

RUNNING, STOPPED, STOPPING, FAILED = "running", "stopped", "stopping", "failed"


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

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def connected(self) -> bool:
        session = self.device.session
        return session is not None and not session.closed

    def start(self) -> None:
        """Listens on the socket and serves in a task of the running loop."""
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
        await server.wait_closed()
        self.connections += server.connections
        self.server = None
        self._task = None
        self.state = STOPPED
        log.info("export %s stopped (%s)", self.name, why)

    @property
    def total_connections(self) -> int:
        return self.connections + (self.server.connections if self.server else 0)

    def close(self) -> None:
        """Frees the device and its back-end; only after stop()."""
        self.device.close()

    async def aclose(self) -> None:
        """close() on the event loop: a disk's back-end is flushed (awaited
        here) before it is closed."""
        aclose = getattr(self.device, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            self.device.close()
