"""Export specs: checking a spec (a JSON object) and building its device.

A spec is checked whole before anything is opened, so a bad one changes
nothing. Where a device's back-end comes from is chosen by one key of the
spec (``"file"``, ``"ramdisk"``, ``"tap"``, ``"backend"``); each such key is
a *source* in a registry, and other back-end kinds plug in the same way::

    from vhostuser.manage.specs import BlkSource, register_blk_source
    register_blk_source(BlkSource("nbd", check=check_nbd_url, open=open_nbd,
                                  options={"nbd_tls": ...}))

after which ``{"type": "blk", "name": ..., "socket": ..., "nbd": "nbd://..."}``
is a valid spec.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..blk import BackendError, BlkDevice, BlockBackend, FileBackend, RamBackend
from ..device import Device
from ..net import NetBackend, NetBackendError, NetDevice, TapBackend
from ..net.spec import format_mac, parse_mac
from ..plugin import PluginError, instantiate, load_class
from ..qos import QosError, QosLimits
from ..server import parse_socket_mode, resolve_group
from ..unixsock import MAX_SOCKET_PATH
from ..sandbox import access as sandbox_access
from . import checks
from .errors import BackendFailed, BadArgument

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
MAX_RAMDISK = 1 << 40
SECTOR = 512

#: An option check: (value, the whole spec) -> the checked value. Raises
#: BadArgument; must not open or change anything.
Check = Callable[[Any, dict], Any]


@dataclass(frozen=True)
class Source:
    """One kind of back-end, chosen by the spec key ``key``.

    ``check(value, spec)`` validates that key's value, ``open(value,
    settings)`` returns the back-end object (raising BackendError,
    NetBackendError or OSError when it can't). ``options`` are further spec
    keys only this source takes, each with its check and default.
    ``blocking``: open() waits on the network (connecting, negotiating),
    as long as its timeout lets it; the daemon runs it in a thread, so its
    event loop goes on serving the other exports meanwhile.
    """
    key: str
    check: Check
    open: Callable[[Any, dict], object]
    options: dict[str, tuple[Check, Any]] = field(default_factory=dict)
    blocking: bool = False


#: Block back-end kinds by spec key. Add more with register_blk_source.
BLK_SOURCES: dict[str, Source] = {}
#: Network back-end kinds by spec key.
NET_SOURCES: dict[str, Source] = {}


def register_blk_source(source: Source) -> None:
    _register(BLK_SOURCES, BLK_OPTIONS, source)


def register_net_source(source: Source) -> None:
    _register(NET_SOURCES, NET_OPTIONS, source)


def _register(registry: dict, common: dict, source: Source) -> None:
    if source.key in registry or source.key in common or source.key in BASE_KEYS:
        raise ValueError(f"spec key {source.key!r} is already taken")
    registry[source.key] = source


@dataclass(frozen=True)
class ExportSpec:
    """A checked spec: every key known and typed, defaults filled in."""
    type: str               # "blk" or "net"
    name: str
    socket_path: str
    source: str             # the key that chose the back-end
    settings: dict          # every setting, the source's value under its key

    @property
    def socket(self) -> str:
        return self.socket_path

    @property
    def socket_mode(self) -> int | None:
        mode = self.settings["socket_mode"]
        return None if mode is None else parse_socket_mode(mode)

    @property
    def socket_gid(self) -> int | None:
        group = self.settings["socket_group"]
        return None if group is None else resolve_group(group)

    def as_dict(self) -> dict:
        return {"type": self.type, "name": self.name, "socket_path": self.socket_path,
                **self.settings}


# -- option checks -------------------------------------------------------------

def _ranged(key: str, lo: int, hi: int) -> Check:
    return lambda v, spec: checks.as_int(v, key, lo, hi)


def _boolean(key: str) -> Check:
    return lambda v, spec: checks.as_bool(v, key)


def _serial(v: Any, spec: dict) -> str:
    serial = checks.as_str(v, "serial", max_len=20)
    if len(serial.encode()) > 20:
        raise BadArgument("'serial' must fit in 20 bytes")
    return serial


def _mac(v: Any, spec: dict) -> str:
    try:
        return format_mac(parse_mac(checks.as_str(v, "mac", max_len=17)))
    except ValueError as exc:
        raise BadArgument(f"'mac': {exc}") from None


def _aio(v: Any, spec: dict) -> str:
    if v not in ("io_uring", "sync"):
        raise BadArgument(f"'aio' must be \"io_uring\" or \"sync\", not {v!r}")
    return v


def _socket_group(v: Any, spec: dict) -> str | int:
    if isinstance(v, int) and not isinstance(v, bool):
        group = v
    else:
        group = checks.as_str(v, "socket_group", max_len=256)
    try:
        resolve_group(group)
    except ValueError as exc:
        raise BadArgument(f"'socket_group': {exc}") from None
    return group


def _socket_mode(v: Any, spec: dict) -> str:
    text = checks.as_str(v, "socket_mode", max_len=8)   # a string: JSON has no octal
    try:
        return f"{parse_socket_mode(text):04o}"
    except ValueError as exc:
        raise BadArgument(f"'socket_mode': {exc}") from None


def qos_limits(v: Any) -> QosLimits:
    """QosLimits from {"iops": N, "bps": N, "iops_burst": N, "bps_burst": N}."""
    args = checks.as_dict(v, "qos")
    checks.no_unknown_keys(args, set(QosLimits.__dataclass_fields__), "qos")
    try:
        return QosLimits(**args)
    except QosError as exc:
        raise BadArgument(f"qos: {exc}") from None


def _qos(v: Any, spec: dict) -> dict | None:
    return None if v is None else qos_limits(v).as_dict()


#: keys every spec has
BASE_KEYS = {"type", "name", "socket_path"}
#: old spellings of keys, still accepted: alias -> key
ALIASES = {
    "blk": {"socket": "socket_path", "file": "blk_file", "num_queues": "queues"},
    "net": {"socket": "socket_path", "queue_pairs": "queues"},
}
#: who may connect to the export's socket (vhostuser-blk --socket-group, --socket-mode)
ACCESS_OPTIONS: dict[str, tuple[Check, Any]] = {
    "socket_group": (_socket_group, None),
    "socket_mode": (_socket_mode, None),
}
#: blk keys whatever the source: (check, default)
BLK_OPTIONS: dict[str, tuple[Check, Any]] = {
    **ACCESS_OPTIONS,
    "read_only": (_boolean("read_only"), False),
    "queues": (_ranged("queues", 1, 64), 1),
    "serial": (_serial, None),          # default: the export's name
    "poll_us": (_ranged("poll_us", 0, 1_000_000), 0),
    "adaptive_poll_us": (_ranged("adaptive_poll_us", 0, 1000), 32),
    "queues_per_thread": (_ranged("queues_per_thread", 1, 64), 1),
    "qos": (_qos, None),
}
NET_OPTIONS: dict[str, tuple[Check, Any]] = {
    **ACCESS_OPTIONS,
    "queues": (_ranged("queues", 1, 16), 1),
    "mac": (_mac, "52:54:00:12:34:56"),
    "mtu": (_ranged("mtu", 68, 65535), 1500),
    "in_order": (_boolean("in_order"), True),
    "poll_us": (_ranged("poll_us", 0, 1_000_000), 0),
    "adaptive_poll_us": (_ranged("adaptive_poll_us", 0, 1000), 32),
    "queues_per_thread": (_ranged("queues_per_thread", 1, 64), 1),
}


# -- the built-in sources ---------------------------------------------------------

def _check_file(v: Any, spec: dict) -> str:
    path = checks.as_abs_path(v, "blk_file")
    try:
        st = sandbox_access.stat(path)     # sandboxed: asks the helper
    except OSError as exc:
        raise BadArgument(f"'blk_file': {path}: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BadArgument(f"'blk_file': {path} is not a regular file or block device")
    if stat.S_ISREG(st.st_mode) and st.st_size < SECTOR:
        raise BadArgument(f"'blk_file': {path} is smaller than one {SECTOR}-byte sector")
    return path


def _open_file(path: str, settings: dict) -> FileBackend:
    backend = FileBackend(path, read_only=settings["read_only"], direct=settings["direct"])
    backend.open()
    return backend


def _check_ramdisk(v: Any, spec: dict) -> int:
    size = checks.as_size(v, "ramdisk", multiple=SECTOR)
    if size > MAX_RAMDISK:
        raise BadArgument(f"'ramdisk' must be at most {MAX_RAMDISK} bytes")
    return size


def _open_ramdisk(size: int, settings: dict) -> RamBackend:
    # Never read-only at the back-end: set-read-only may lift the device's flag.
    return RamBackend(size)


def _check_tap(v: Any, spec: dict) -> str:
    name = checks.as_str(v, "tap", max_len=15)     # IFNAMSIZ - 1
    if "/" in name or name in (".", "..") or any(c.isspace() for c in name):
        raise BadArgument(f"'tap': {name!r} is not an interface name")
    return name


def _open_tap(ifname: str, settings: dict) -> TapBackend:
    return TapBackend(ifname, queue_pairs=settings["queues"])


class NullNetBackend(NetBackend):
    """Drops every frame the guest sends and sends it nothing: a link to
    nowhere, for tests and for guests that only need an interface."""

    def transmit(self, queue_pair, frames) -> None:
        pass


#: Python network back-ends by the name a spec's "backend" key gives.
NET_BACKEND_CLASSES: dict[str, type[NetBackend]] = {"null": NullNetBackend}


def _python_class(base: type, builtin: dict[str, type] | None = None) -> Check:
    """"backend": "MODULE:CLASS" (as vhostuser-blk --backend), a subclass
    of base, imported at check time so a wrong name changes nothing."""
    def check(v: Any, spec: dict) -> str:
        name = checks.as_str(v, "backend", max_len=512)
        if builtin and name in builtin:
            return name
        if ":" not in name:
            known = f"{', '.join(sorted(builtin))} or " if builtin else ""
            raise BadArgument(f"'backend' must be {known}MODULE:CLASS, not {name!r}")
        try:
            load_class(name, base)
        except PluginError as exc:
            raise BadArgument(f"'backend': {exc}") from None
        except OSError as exc:
            # A sandboxed daemon sees no files: new code can't be imported.
            raise BadArgument(f"'backend': {name}: can't import it here ({exc.strerror}); "
                              "a daemon confined with --sandbox on imports nothing new") from None
        return name
    return check


def _open_python(base: type, builtin: dict[str, type] | None = None):
    def open_(name: str, settings: dict):
        try:
            if builtin and name in builtin:
                return instantiate(builtin[name], name, settings["backend_opt"])
            return instantiate(load_class(name, base), name, settings["backend_opt"])
        except PluginError as exc:
            raise BackendError(str(exc)) from None
    return open_


def _backend_opt(v: Any, spec: dict) -> dict:
    """Keyword arguments for the back-end class (vhostuser-blk --backend-opt
    KEY=VALUE gives strings; JSON may give any value)."""
    opts = checks.as_dict(v, "backend_opt")
    for key in opts:
        if not key.replace("-", "_").isidentifier():
            raise BadArgument(f"'backend_opt': {key!r} is not a keyword argument name")
    return dict(opts)


register_blk_source(Source("blk_file", _check_file, _open_file, options={
    "direct": (_boolean("direct"), False),
    "aio": (_aio, "io_uring"),
}))
register_blk_source(Source("ramdisk", _check_ramdisk, _open_ramdisk))
register_blk_source(Source("backend", _python_class(BlockBackend), _open_python(BlockBackend),
                           options={"backend_opt": (_backend_opt, {})}))
register_net_source(Source("tap", _check_tap, _open_tap))
register_net_source(Source("backend", _python_class(NetBackend, NET_BACKEND_CLASSES),
                           _open_python(NetBackend, NET_BACKEND_CLASSES),
                           options={"backend_opt": (_backend_opt, {})}))

_TYPES = {"blk": (BLK_SOURCES, BLK_OPTIONS), "net": (NET_SOURCES, NET_OPTIONS)}


# -- checking ----------------------------------------------------------------------

def check_name(v: Any) -> str:
    name = checks.as_str(v, "name", max_len=64)
    if not NAME_RE.fullmatch(name):
        raise BadArgument(f"'name' {name!r}: letters, digits and _ . : - only, "
                          "starting with a letter or digit, at most 64")
    return name


def parse_spec(spec: Any) -> ExportSpec:
    """Checks a spec completely; opens nothing."""
    spec = checks.as_dict(spec, "spec")
    kind = checks.require(spec, "type", "spec")
    if kind not in _TYPES:
        raise BadArgument(f"'type' must be \"blk\" or \"net\", not {kind!r}")
    spec = _canonical_keys(spec, ALIASES[kind])
    sources, options = _TYPES[kind]
    name = check_name(checks.require(spec, "name", "spec"))
    socket_path = checks.as_abs_path(checks.require(spec, "socket_path", "spec"), "socket_path")
    length = len(os.fsencode(socket_path))
    if length > MAX_SOCKET_PATH:
        raise BadArgument(f"'socket_path': {length} bytes long, a unix socket path is at "
                          f"most {MAX_SOCKET_PATH}")
    chosen = [key for key in sources if key in spec]
    if len(chosen) != 1:
        raise BadArgument(f"a {kind} export needs exactly one of "
                          f"{', '.join(map(repr, sources))}"
                          + (f", not {len(chosen)}" if chosen else ""))
    source = sources[chosen[0]]
    allowed = {**options, **source.options}
    checks.no_unknown_keys(spec, BASE_KEYS | set(allowed) | {source.key}, f"{kind} export")
    settings = {key: (check(spec[key], spec) if key in spec else default)
                for key, (check, default) in allowed.items()}
    settings[source.key] = source.check(spec[source.key], spec)
    if kind == "blk" and settings["serial"] is None:
        settings["serial"] = name.encode()[:20].decode(errors="ignore")
    parent = os.path.dirname(socket_path)
    try:
        parent_is_dir = sandbox_access.isdir(parent)     # sandboxed: asks the helper
    except OSError as exc:
        raise BadArgument(f"'socket_path': {parent}: {exc.strerror}") from None
    if not parent_is_dir:
        raise BadArgument(f"'socket_path': directory {parent} does not exist")
    return ExportSpec(kind, name, socket_path, source.key, settings)


def _canonical_keys(spec: dict, aliases: dict[str, str]) -> dict:
    """The spec with old key spellings ("socket", "file", "num_queues",
    "queue_pairs") under their names; both spellings at once is an error."""
    out = dict(spec)
    for old, new in aliases.items():
        if old in out:
            if new in out:
                raise BadArgument(f"{old!r} is the old name of {new!r}: give one of them")
            out[new] = out.pop(old)
    return out


# -- building ----------------------------------------------------------------------

def build_device(spec: ExportSpec) -> Device:
    """Opens the back-end and makes the device; BackendFailed if it can't,
    with whatever was opened closed again."""
    return _make_device(spec, _open_backend(spec))


async def abuild_device(spec: ExportSpec) -> Device:
    """build_device() on an event loop: a blocking source's open() (a
    network connection) runs in a thread, the loop meanwhile serving on.
    The thread is one of its own that ends with the open (an idle pool
    thread started before the sandbox is entered would keep what the
    sandbox takes from the process's threads). Cancelled meanwhile, the
    back-end the thread still opens is closed."""
    if not _source(spec).blocking:
        return build_device(spec)
    loop = asyncio.get_running_loop()
    opening = loop.create_future()

    def settle(backend, exc) -> None:
        if opening.cancelled():
            if backend is not None:
                _close_opened(backend)
        elif exc is not None:
            opening.set_exception(exc)
        else:
            opening.set_result(backend)

    def run() -> None:
        backend = exc = None
        try:
            backend = _open_backend(spec)
        except BaseException as e:      # noqa: BLE001 (handed to the awaiting task)
            exc = e
        try:
            loop.call_soon_threadsafe(settle, backend, exc)
        except RuntimeError:            # the loop is closed: nobody waits any more
            if backend is not None:
                _close_opened(backend)

    thread = threading.Thread(target=run, name=f"open {spec.name}", daemon=True)
    thread.start()
    try:
        backend = await opening
    finally:
        if not opening.done():
            opening.cancel()            # settle() closes what the thread opens
    thread.join()                       # ending already: it has handed over its result
    return _make_device(spec, backend)


def _source(spec: ExportSpec) -> Source:
    return (BLK_SOURCES if spec.type == "blk" else NET_SOURCES)[spec.source]


def _open_backend(spec: ExportSpec):
    source = _source(spec)
    try:
        return source.open(spec.settings[source.key], spec.settings)
    except (BackendError, NetBackendError, OSError, ValueError, MemoryError) as exc:
        raise BackendFailed(f"{spec.name}: {exc}") from None


def _close_backend(backend) -> None:
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def _close_opened(backend) -> None:
    """A back-end opened for an add that was cancelled meanwhile."""
    try:
        _close_backend(backend)
    except Exception as exc:
        log.error("closing a back-end opened for a cancelled add: %s", exc)


def _make_device(spec: ExportSpec, backend) -> Device:
    s = spec.settings
    try:
        if spec.type == "blk":
            device = BlkDevice(backend, num_queues=s["queues"], serial=s["serial"],
                               read_only=s["read_only"], poll_us=s["poll_us"],
                               aio=s.get("aio", "io_uring"))
            if s["qos"] is not None:
                device.set_qos(QosLimits(**s["qos"]))
        else:
            device = NetDevice(backend, queue_pairs=s["queues"], mac=parse_mac(s["mac"]),
                               mtu=s["mtu"], poll_us=s["poll_us"], in_order=s["in_order"])
    except (BackendError, NetBackendError, OSError, ValueError, MemoryError) as exc:
        _close_backend(backend)
        raise BackendFailed(f"{spec.name}: {exc}") from None
    device.queues_per_worker = s["queues_per_thread"]
    device.adaptive_poll_us = s["adaptive_poll_us"]
    return device
