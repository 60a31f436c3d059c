"""Run a device's server in a background thread, for tests and tools that
drive it from ordinary (blocking) code in the same process."""
from __future__ import annotations

import asyncio
import contextlib
import threading

from ..device import Device
from ..server import Server, new_event_loop


class BackgroundServer:
    """``with BackgroundServer(device, path) as srv: ...`` serves until the block ends."""

    def __init__(self, device: Device, path: str):
        self.device = device
        self.server = Server(device, path=path)
        self.path = path
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"vhostuser:{path}", daemon=True)
        self._task: asyncio.Task | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server.open()
        except BaseException as exc:   # start() raises it in the caller's thread
            self.error = exc
            self.loop.close()
            self._ready.set()
            return
        self._task = self.loop.create_task(self.server.serve())
        self._ready.set()
        try:
            self.loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # surfaced to the test via .error
            self.error = exc
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for t in pending:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def start(self) -> "BackgroundServer":
        """Starts serving; raises what stopped the server from listening
        (SocketInUse, OSError, ...)."""
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError(f"{self.path}: the server did not start within 10 s")
        if self.error is not None:
            self._thread.join()
            raise self.error
        return self

    def call(self, fn, *args):
        """Runs fn(*args) on the server's loop and returns its result."""
        fut = asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop)
        return fut.result(10)

    def stop(self) -> None:
        if self._thread.is_alive():
            def shutdown():
                self.server.close()
                if self._task is not None:
                    self._task.cancel()
            self.loop.call_soon_threadsafe(shutdown)
            self._thread.join(10)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _call(fn, *args):
    return fn(*args)


@contextlib.contextmanager
def served_disk(device, path: str, **setup):
    """(BackgroundServer, BlkClient) for a disk served at ``path`` and set up
    by the library's front-end (``setup`` as for BlkClient.setup); the
    device is closed afterwards, whatever happened."""
    from ..frontend import BlkClient, Frontend
    try:
        with BackgroundServer(device, path) as srv:
            with Frontend.connect(path) as fe:
                yield srv, BlkClient.setup(fe, **setup)
    finally:
        device.close()
