"""The control socket: JSON lines over a unix socket.

Transport
---------
A unix stream socket, mode 0600 (only its owner may manage the daemon;
``vhostuser-daemon --control-group``, ``--control-mode`` widen that). A
stale socket file left by a dead daemon is replaced; a live one is an error.
Any number of clients may be connected at once. Each request is one JSON
object on one line (UTF-8, ending in ``\\n``, at most 1 MiB); each gets
exactly one reply line, in the order the requests came on that connection.
Blank lines are ignored. A bad request gets an error reply and leaves the
connection usable.

Request::

    {"id": 1, "cmd": "resize", "args": {"name": "disk0", "size": "20G"}}

``id`` is optional and echoed back as given (any JSON value; null when
missing); ``args`` is optional when a command takes none.

Replies::

    {"id": 1, "ok": true, "result": ...}
    {"id": 1, "ok": false, "error": {"code": "no-such-export", "message": "..."}}

Commands
--------
``version`` {} -> ``{"version", "protocol": 1, "prometheus": "ADDR:PORT" | null}``

``list`` {} -> ``[{"name", "type", "socket", "state", "connected"}, ...]`` sorted
by name. ``state`` is running, stopped, stopping or failed.

``describe`` {name} -> the list entry plus ``failure`` (why a failed export
stopped), ``connections`` (front-ends served so far), ``spec`` (as added,
defaults filled in), ``device`` (blk: capacity_sectors, size, read_only,
num_queues, qos, aio, backend; net: mac, mtu, queue_pairs), ``features`` and
``protocol_features`` (each ``{"offered": F, "negotiated": F | null}`` with
``F = {"bits": "0x...", "names": [...]}``; negotiated is null until the
front-end set them), ``status`` (``{"value", "names"}`` or null), and
``queues``: per virtqueue of the connected front-end ``{index, started,
enabled, size, packed, last_avail_idx, used_idx, inflight, broken, error,
popped, pushed, notifies, kicks}`` (empty when nobody is connected).

``add`` SPEC -> the new export's ``describe``. SPEC is an object:

* blk: ``{"type": "blk", "name", "socket", one of "file": PATH |
  "ramdisk": SIZE, "read_only": false, "num_queues": 1 (1..64), "serial":
  name, "poll_us": 0, "adaptive_poll_us": 32, "queues_per_thread": 1, "qos": {...} |
  null}``; with
  "file" also ``"direct": false, "aio": "io_uring" | "sync"``.
* net: ``{"type": "net", "name", "socket", one of "tap": IFNAME |
  "backend": "null", "queue_pairs": 1 (1..16), "mac": "52:54:00:12:34:56",
  "mtu": 1500, "in_order": true, "poll_us": 0, "adaptive_poll_us": 32, "queues_per_thread": 1}``.

Names are 1..64 of ``A-Z a-z 0-9 _ . : -``, starting with a letter or digit.
Paths must be absolute. A SIZE is a byte count or a string like "64M" or
"1G" (a multiple of 512). QoS is ``{"iops", "bps", "iops_burst",
"bps_burst"}``, non-negative integers, 0 meaning unlimited.

``remove`` {name} -> ``{"name", "removed": true}``: requests in flight finish,
the front-end is disconnected, the socket removed and the device closed.

``stop`` {name} -> ``describe``: as remove, but the export stays (stopped) with
its device and settings. ``start`` {name} -> ``describe``: serves it again.

``resize`` {name, size} -> ``{"name", "size", "capacity_sectors",
"guest_notified"}``. A file is truncated or extended to the size; the
connected guest gets a config-change notification over the back-end channel
(``guest_notified`` false: no front-end, or it set up no such channel).

``set-read-only`` {name, read_only: bool} -> ``{"name", "read_only"}``. A
connected guest's writes fail with an I/O error from then on (it keeps the
features it negotiated); the next front-end is offered VIRTIO_BLK_F_RO.
Turned on, it answers once every write taken before has ended.

``set-qos`` {name, iops, bps, iops_burst, bps_burst} (each optional, default 0)
-> ``{"name", "qos"}``.

``stats`` {name} -> ``{"name", "type", "state", "connected", "totals",
"queues"}``; ``totals`` sums the queues. blk queues: ``{queue, reads, writes,
flushes, discards, write_zeroes, errors, unsupported, bytes_read,
bytes_written, requests, inflight, throttled, latency_us}`` with
``latency_us`` the latency histogram's counts per bucket (bounds as in
``metrics``). net queue pairs: ``{queue_pair, tx_packets, tx_bytes,
rx_packets, rx_bytes, tx_gso, tx_csum_partial, rx_gso, rx_csum_partial,
tx_dropped: {reason: n}, rx_dropped: {reason: n}}`` (tx: guest to back-end).
``stats`` {} -> ``{name: stats, ...}`` for every export.

``metrics`` {} -> ``{"latency_bounds_us": [1, 2, 4, ..., null], "exports":
{name: stats, ...}}``: a bucket counts requests that took less than its
bound in microseconds and at least the previous one (null: no bound).

Error codes
-----------
``bad-json`` (not JSON, or not UTF-8), ``line-too-long`` (over 1 MiB; the
line is skipped), ``bad-request`` (not an object, no string ``cmd``, ``args``
not an object), ``unknown-command``, ``bad-args`` (missing, unknown, wrongly
typed or out-of-range argument; missing file), ``no-such-export``,
``export-exists``, ``socket-in-use`` (another export's socket, the control
socket, or a live process listens there), ``not-supported`` (e.g. resize of
a net export), ``bad-state`` (stop a stopped export), ``backend-error`` (the
back-end could not be opened, or refused: set-read-only off on a file opened
read-only), ``in-flight`` (set-read-only on: read-only now, but writes taken
before still ran after the drain timeout; a shrinking resize: the same, the
size unchanged), ``internal-error`` (a bug; the daemon logs it and goes on).
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
from typing import Any, Callable

from ..sandbox import access as sandbox_access
from ..server import bind_unix
from . import checks
from .daemon import Daemon
from ..errors import VhostUserError
from .errors import (BadJson, BadRequest, InternalError, LineTooLong, ManageError, SocketInUse,
                     UnknownCommand)

log = logging.getLogger(__name__)

#: Longest request line accepted (without its newline).
MAX_LINE = 1 << 20
_CHUNK = 1 << 16


class Command:
    """One command: its arguments (required and optional) and what runs it."""

    def __init__(self, run: Callable[[Daemon, dict], Any], required: tuple[str, ...] = (),
                 optional: tuple[str, ...] = (), *, any_args: bool = False):
        self.run = run
        self.required = required
        self.optional = optional
        self.any_args = any_args     # add: the args are the spec, checked there

    def check(self, name: str, args: dict) -> None:
        if self.any_args:
            return
        checks.no_unknown_keys(args, set(self.required) | set(self.optional), name)
        for key in self.required:
            checks.require(args, key, name)


_QOS_KEYS = ("iops", "bps", "iops_burst", "bps_burst")

COMMANDS: dict[str, Command] = {
    "version": Command(lambda d, a: d.version()),
    "list": Command(lambda d, a: d.list()),
    "describe": Command(lambda d, a: d.describe(a["name"]), ("name",)),
    "add": Command(lambda d, a: d.add(a), any_args=True),
    "remove": Command(lambda d, a: d.remove(a["name"]), ("name",)),
    "stop": Command(lambda d, a: d.stop(a["name"]), ("name",)),
    "start": Command(lambda d, a: d.start(a["name"]), ("name",)),
    "resize": Command(lambda d, a: d.resize(a["name"], a["size"]), ("name", "size")),
    "set-read-only": Command(lambda d, a: d.set_read_only(a["name"], a["read_only"]),
                             ("name", "read_only")),
    "set-qos": Command(lambda d, a: d.set_qos(a["name"], {k: a[k] for k in _QOS_KEYS
                                                          if k in a}),
                       ("name",), _QOS_KEYS),
    "stats": Command(lambda d, a: d.stats(a.get("name")), (), ("name",)),
    "metrics": Command(lambda d, a: d.metrics()),
}


def parse_request(line: bytes) -> tuple[Any, str, dict]:
    """(id, cmd, args) from one request line; BadRequest if malformed. The
    id is recovered whenever the line is a JSON object, so even a refused
    request's reply carries it."""
    try:
        request = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadJson("request is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadJson(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"request must be a JSON object, not {checks.type_name(request)}")
    rid = request.get("id")
    try:
        unknown = set(request) - {"id", "cmd", "args"}
        if unknown:
            raise BadRequest(f"unknown request field{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, sorted(unknown)))}")
        cmd = request.get("cmd")
        if not isinstance(cmd, str):
            raise BadRequest("request needs a string \"cmd\"")
        args = request.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise BadRequest(f"\"args\" must be an object, not {checks.type_name(args)}")
    except BadRequest as exc:
        exc.request_id = rid
        raise
    return rid, cmd, args


async def execute(daemon: Daemon, cmd: str, args: dict) -> Any:
    """Runs one command; ManageError for every refusal."""
    command = COMMANDS.get(cmd)
    if command is None:
        raise UnknownCommand(f"unknown command {cmd!r} (known: {', '.join(sorted(COMMANDS))})")
    command.check(cmd, args)
    result = command.run(daemon, args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _reply(rid: Any, *, result: Any = None, error: VhostUserError | None = None) -> bytes:
    if error is not None:
        body = {"id": rid, "ok": False, "error": error.as_dict()}
    else:
        body = {"id": rid, "ok": True, "result": result}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode() + b"\n"


async def _read_lines(reader: asyncio.StreamReader):
    """Yields request lines; an over-long line is yielded as None once, its
    bytes skipped up to the next newline, so the connection stays in step."""
    buf = bytearray()
    skipping = False
    while True:
        chunk = await reader.read(_CHUNK)
        if not chunk:
            return            # an unterminated last line is dropped with the connection
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:
                    if not skipping:
                        skipping = True
                        yield None
                    buf.clear()
                break
            line = bytes(buf[:nl])
            del buf[:nl + 1]
            if skipping:
                skipping = False          # the tail of the long line
                continue
            if len(line) > MAX_LINE:
                yield None
                continue
            yield line


class ControlServer:
    """Serves the control protocol for ``daemon`` on a unix socket."""

    def __init__(self, daemon: Daemon, path: str, *, mode: int | None = None,
                 gid: int | None = None):
        self.daemon = daemon
        self.path = path
        self.mode = mode        # default 0600 (0660 with a gid)
        self.gid = gid
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()

    def open(self) -> None:
        """Binds the socket now (vhostuser.server.SocketInUse if a live
        daemon has it). Clients may connect at once; their requests wait
        until :meth:`start`, e.g. until the configured exports are there."""
        self._sock = bind_unix(self.path, mode=self.mode, gid=self.gid)
        self.daemon.reserve_path(self.path)

    async def start(self) -> None:
        """Starts answering requests."""
        if self._sock is None:
            self.open()
        self._server = await asyncio.start_unix_server(self._client, sock=self._sock)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients.add(task)
        try:
            async for line in _read_lines(reader):
                if line is not None and not line.strip():
                    continue
                writer.write(await self.handle(line))
                await writer.drain()
        except (ConnectionError, OSError):
            pass                   # the client went away; nothing to tell it
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def handle(self, line: bytes | None) -> bytes:
        """The reply line for one request line (None: it was too long)."""
        rid = None
        try:
            if line is None:
                raise LineTooLong(f"request longer than {MAX_LINE} bytes; skipped")
            rid, cmd, args = parse_request(line)
            result = await execute(self.daemon, cmd, args)
            return _reply(rid, result=result)
        except (ManageError, SocketInUse) as exc:
            rid = getattr(exc, "request_id", rid)
            log.info("control: refused: %s", exc)
            return _reply(rid, error=exc)
        except Exception as exc:
            log.exception("control: internal error")
            return _reply(rid, error=InternalError(f"{type(exc).__name__}: {exc}"))

    async def close(self) -> None:
        if self._server is None and self._sock is not None:
            self._sock.close()
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            self._server = None
        with contextlib.suppress(OSError):
            sandbox_access.unlink_socket(self.path)
