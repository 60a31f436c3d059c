"""The management API in Python: named exports (virtio-blk and virtio-net
devices, each on its own vhost-user socket) in one asyncio event loop,
added, changed and removed while the others keep serving.

Every method runs on the daemon's event loop; lifecycle changes (add,
remove, stop, start, close), resize and set_read_only are coroutines, the
rest are plain calls. Each checks all of its arguments before it changes anything, and
refuses with a
:class:`~vhostuser.manage.errors.ManageError` subclass::

    daemon = Daemon()
    await daemon.add({"type": "blk", "name": "disk0", "socket_path": "/run/vm1/disk0.sock",
                      "blk_file": "/var/lib/images/vm1.img", "queues": 2})
    await daemon.resize("disk0", 20 << 30)
    await daemon.remove("disk0")
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from .. import __version__
from ..blk import BlkDevice
from ..errors import RequestsInFlight
from ..qos import QosLimits
from . import checks, describe
from . import remote_sources  # noqa: F401 (registers the "nbd" and "rbd" disk kinds)
from .errors import (BackendFailed, BadState, ExportExists, NoSuchExport, NotSupported,
                     SocketInUse, StillInFlight)
from .export import FAILED, RUNNING, STOPPED, Export, deferred_closes
from .specs import abuild_device, check_name, parse_spec, qos_limits
from ..sandbox import access as sandbox_access

log = logging.getLogger(__name__)

#: Version of the control protocol (bumped on incompatible changes).
PROTOCOL_VERSION = 2


def _path_key(path: str) -> str:
    """Two spellings of one socket path compare equal (symlinked dirs)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _image_key(spec) -> tuple | None:
    """What a disk's storage is, where two exports could share it: an image
    file (by its real path), an NBD or RBD image; None otherwise (a RAM
    disk, a Python back-end's own storage, a network interface)."""
    if spec.type != "blk" or spec.source not in ("blk_file", "nbd", "rbd"):
        return None
    value = spec.settings[spec.source]
    if spec.source == "blk_file":
        value = os.path.realpath(value)
    return spec.source, value


class Daemon:
    """Named exports served from one event loop."""

    def __init__(self, *, reserved_paths: tuple[str, ...] = ()):
        self.exports: dict[str, Export] = {}
        # Socket paths no export may take (the control socket).
        self.reserved_paths = {_path_key(p) for p in reserved_paths}
        self.prometheus_address: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # Lifecycle changes one at a time: a remove that is draining must
        # not race an add of the same name or socket.
        self._lifecycle = asyncio.Lock()
        # Removed, their device still waiting for a session in the back-end.
        self._ending: list[Export] = []
        # Being added, their back-end opening: name -> socket path key.
        self._opening: dict[str, str] = {}
        self._closed = False        # close() ran: nothing is added any more

    def reserve_path(self, path: str) -> None:
        self.reserved_paths.add(_path_key(path))

    # -- lookup ------------------------------------------------------------------------
    def get(self, name: Any) -> Export:
        name = checks.as_str(name, "name", max_len=64)
        export = self.exports.get(name)
        if export is None:
            raise NoSuchExport(f"no export named {name!r}")
        return export

    def _blk(self, name: Any, what: str) -> tuple[Export, BlkDevice]:
        export = self.get(name)
        if not isinstance(export.device, BlkDevice):
            raise NotSupported(f"{what}: {export.name} is a {export.spec.type} export, "
                               "not a disk")
        return export, export.device

    # -- lifecycle -------------------------------------------------------------------------
    async def add(self, spec: Any) -> dict:
        """Adds an export and starts serving it; returns its description."""
        self.loop = asyncio.get_running_loop()
        parsed = parse_spec(spec)
        refused = sandbox_access.refuses_kind(sandbox_access.export_kind(
            parsed.type, parsed.source, parsed.settings[parsed.source]))
        if refused:
            raise NotSupported(f"{parsed.name}: {refused}")
        async with self._lifecycle:
            self._refuse_taken(parsed)
            # Name and socket taken while the back-end opens, without the
            # lock: an NBD or RBD disk waits for its server (in a thread,
            # specs.Source.blocking) up to its remote_timeout, and no other
            # export's remove, stop or add waits for that.
            key = _path_key(parsed.socket_path)
            self._opening[parsed.name] = key
        try:
            device = await abuild_device(parsed)
            try:
                async with self._lifecycle:
                    if self._closed:
                        raise BadState(f"{parsed.name}: the daemon closed while the disk "
                                       "was opened")
                    export = Export(parsed, device)
                    export.start()
                    self.exports[parsed.name] = export
            except BaseException:
                device.close()
                raise
        finally:
            del self._opening[parsed.name]
        log.info("export %s added (%s on %s)", parsed.name, parsed.type, parsed.socket_path)
        return self.describe(parsed.name)

    def _refuse_taken(self, parsed) -> None:
        """ManageError if the name or socket is an export's (or one being
        added), or the daemon is closed."""
        if self._closed:
            raise BadState(f"{parsed.name}: the daemon is closed")
        if parsed.name in self.exports or parsed.name in self._opening:
            raise ExportExists(f"an export named {parsed.name!r} exists")
        key = _path_key(parsed.socket_path)
        if key in self.reserved_paths:
            raise SocketInUse(f"{parsed.socket_path} is the daemon's control socket")
        for other in self.exports.values():
            if _path_key(other.spec.socket_path) == key:
                raise SocketInUse(f"{parsed.socket_path} is the socket of export {other.name}")
        for name, other_key in self._opening.items():
            if other_key == key:
                raise SocketInUse(f"{parsed.socket_path} is the socket of export {name} "
                                  "(being added)")
        self._refuse_while_ending(parsed, key)

    def _refuse_while_ending(self, parsed, key: str) -> None:
        """BadState if a removed export whose device is still in use (a
        back-end call that has not returned) had this name, socket or image:
        served again now, the old session's call (a write) could still land
        in the image under the new front-end."""
        self._ending = [e for e in self._ending if e.ending]
        image = _image_key(parsed)
        for old in self._ending:
            if (old.name == parsed.name or _path_key(old.spec.socket_path) == key
                    or (image is not None and _image_key(old.spec) == image)):
                raise BadState(f"{parsed.name}: export {old.name}, removed, is still ending (a "
                               "back-end call has not returned); its name, socket and image "
                               "are free once its device closed")

    async def add_blk(self, name: str, socket_path: str, **settings) -> dict:
        """add() of a disk: ``blk_file=PATH``, ``ramdisk=SIZE``,
        ``backend="MODULE:CLASS"``, ``nbd=URI`` or ``rbd=POOL/IMAGE``, and the
        other spec keys as keyword arguments."""
        return await self.add({"type": "blk", "name": name, "socket_path": socket_path,
                               **settings})

    async def add_net(self, name: str, socket_path: str, **settings) -> dict:
        """add() of an interface: ``tap=IFNAME`` or ``backend="null"`` (or
        "MODULE:CLASS"), ..."""
        return await self.add({"type": "net", "name": name, "socket_path": socket_path,
                               **settings})

    async def remove(self, name: Any) -> dict:
        """Finishes the export's requests in flight, disconnects its
        front-end, removes its socket and closes its device."""
        async with self._lifecycle:
            export = self.get(name)
            await export.stop("removed")
            del self.exports[export.name]
            # No longer listed: close() would not close it if this were cut
            # short now, so the close goes on without us (deferred_closes()).
            try:
                await asyncio.shield(export.close_in_background())
            finally:
                if export.ending:
                    self._ending.append(export)
        log.info("export %s removed", export.name)
        return {"name": export.name, "removed": True}

    async def stop(self, name: Any) -> dict:
        """Stops serving (as remove, but the device and its settings stay)."""
        async with self._lifecycle:
            export = self.get(name)
            if export.state == STOPPED:
                raise BadState(f"{export.name} is already stopped")
            await export.stop("stopped")
        return self.describe(export.name)

    async def start(self, name: Any) -> dict:
        """Serves a stopped (or failed) export again on its socket."""
        async with self._lifecycle:
            export = self.get(name)
            if export.state == RUNNING:
                raise BadState(f"{export.name} is already running")
            if export.state == FAILED:
                await export.stop("restart")
            export.start()
        return self.describe(export.name)

    async def close(self) -> None:
        """Stops every export (each finishing its requests in flight) and
        closes their devices."""
        async with self._lifecycle:
            self._closed = True
            exports = list(self.exports.values())
            # Concurrently: a slow drain of one must not delay the others.
            results = await asyncio.gather(*(e.stop("exit") for e in exports),
                                           return_exceptions=True)
            for export, result in zip(exports, results):
                if isinstance(result, BaseException):
                    log.error("export %s: stop failed: %s", export.name, result)
                # One back-end's close() failing must not leave the others
                # unflushed and open.
                try:
                    await export.aclose()
                except Exception as exc:
                    log.error("export %s: close failed: %s: %s", export.name,
                              type(exc).__name__, exc)
            self.exports.clear()
            await deferred_closes()

    # -- changes to a running export ------------------------------------------------------
    async def resize(self, name: Any, size: Any) -> dict:
        """New disk size in bytes (or "20G"); the connected guest is told
        over the back-end channel. An image file's ftruncate runs in a
        thread (a file system that stopped answering holds up this resize
        only)."""
        export, device = self._blk(name, "resize")
        size_bytes = checks.as_size(size, "size", multiple=512)
        # Not under the lifecycle lock (a hung ftruncate must not hold up a
        # remove): the export may go while this waits, its device closed.
        try:
            told = await device.aresize(size_bytes)
        except Exception as exc:
            self._check_still_there(export, "resize")
            if isinstance(exc, RequestsInFlight):      # a TimeoutError, an OSError too
                raise StillInFlight(f"resize {export.name}: the size is unchanged, as {exc}") \
                    from None
            if isinstance(exc, ValueError):
                raise NotSupported(f"resize {export.name}: {exc}") from None
            if isinstance(exc, OSError):
                raise BackendFailed(f"resize {export.name}: {exc.strerror or exc}") from None
            raise
        self._check_still_there(export, "resize")
        return {"name": export.name, "size": device.capacity * 512,
                "capacity_sectors": device.capacity, "guest_notified": told}

    def _check_still_there(self, export: Export, what: str) -> None:
        if self.exports.get(export.name) is not export:
            raise NoSuchExport(f"{what} {export.name}: the export was removed meanwhile")

    async def set_read_only(self, name: Any, read_only: Any) -> dict:
        """Refuses (or allows again) the guest's writes, at once. Made
        read-only, it answers once every write taken before has ended (the
        image can be copied then); StillInFlight if some are still running
        after the drain timeout (the disk stays read-only)."""
        export, device = self._blk(name, "set-read-only")
        read_only = checks.as_bool(read_only, "read_only")
        # Not under the lifecycle lock (writes that never end must not hold
        # up a remove): the export may go while this waits, its device closed.
        try:
            await device.aset_read_only(read_only)
        except Exception as exc:
            self._check_still_there(export, "set-read-only")
            if isinstance(exc, ValueError):
                raise BackendFailed(f"set-read-only {export.name}: {exc}") from None
            if isinstance(exc, RequestsInFlight):
                raise StillInFlight(f"set-read-only {export.name}: read-only now, but "
                                    f"{exc}") from None
            raise
        self._check_still_there(export, "set-read-only")
        return {"name": export.name, "read_only": device.read_only}

    def set_qos(self, name: Any, limits: QosLimits | dict) -> dict:
        """New QoS limits, in force at once (0 = unlimited)."""
        export, device = self._blk(name, "set-qos")
        if not isinstance(limits, QosLimits):
            limits = qos_limits(limits)
        device.set_qos(limits)
        return {"name": export.name, "qos": device.qos.as_dict()}

    # -- views ----------------------------------------------------------------------------
    def summary(self, export: Export) -> dict:
        return {"name": export.name, "type": export.spec.type,
                "socket_path": export.spec.socket_path,
                "state": export.state, "connected": export.connected}

    def list(self) -> list[dict]:
        return [self.summary(e) for e in sorted(self.exports.values(), key=lambda e: e.name)]

    def describe(self, name: Any) -> dict:
        export = self.get(name)
        return {**self.summary(export),
                "failure": export.failure,
                "connections": export.total_connections,
                "spec": export.spec.as_dict(),
                "device": describe.device_settings(export.device),
                **describe.features(export.device),
                "queues": describe.queue_states(export.device)}

    def stats(self, name: Any = None) -> dict:
        """Counters of one export, or of all (by name) when name is None."""
        if name is None:
            return {n: self.stats(n) for n in sorted(self.exports)}
        export = self.get(name)
        return {"name": export.name, "type": export.spec.type, "state": export.state,
                "connected": export.connected, **describe.counters(export.device)}

    def metrics(self) -> dict:
        """Everything the counters say, for every export."""
        return {"latency_bounds_us": describe.latency_bounds_us(), "exports": self.stats()}

    def version(self) -> dict:
        return {"version": __version__, "protocol": PROTOCOL_VERSION,
                "prometheus": self.prometheus_address}

    # -- from other threads ----------------------------------------------------------------
    def call_threadsafe(self, fn, *args, timeout: float = 5.0):
        """Runs ``fn(*args)`` on the daemon's loop from another thread (the
        Prometheus server's) and returns its result: on the loop, no export
        is torn down while ``fn`` looks at it."""
        if self.loop is None:
            raise RuntimeError("the daemon has no running loop yet")

        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)


__all__ = ["Daemon", "PROTOCOL_VERSION", "check_name"]
