"""vhostuser-daemon: serve many disks and network interfaces from one
process, each on its own vhost-user socket, managed while it runs over a
control socket (JSON lines; see docs/control-socket.md and vhostuser-ctl)."""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from ..blk import BlkDevice, FileBackend
from ..errors import VhostUserError
from ..manage.control import ControlServer
from ..manage.daemon import Daemon
from ..manage.errors import ManageError
from ..server import new_event_loop, parse_socket_mode, resolve_group
from . import common
from ..sandbox import cli as sandbox_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-daemon", description=__doc__)
    common.add_version_option(p)
    p.add_argument("--control", required=True, metavar="PATH",
                   help="control socket to create (mode 0600 unless --control-mode)")
    p.add_argument("--control-group", metavar="GROUP",
                   help="group of the control socket (name or number); makes the default "
                        "mode 0660. Its members can then add exports of any file the "
                        "daemon can open: give it only to those trusted as much")
    p.add_argument("--control-mode", metavar="MODE",
                   help="permissions of the control socket, octal (default 0600, 0660 with "
                        "--control-group)")
    p.add_argument("--config", metavar="FILE",
                   help="exports to add at start: a JSON list of specs, or JSON lines, each a "
                        "spec or an add request ({\"cmd\": \"add\", \"args\": SPEC})")
    p.add_argument("--prometheus", metavar="ADDR:PORT",
                   help="serve Prometheus metrics over HTTP there (e.g. 127.0.0.1:9100; "
                        "port 0 picks one, see the version command)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sandbox_cli.add_options(p, daemon=True)
    p.epilog = ("SIGHUP re-reads the size of every file-backed disk and tells its guest of a "
                "change; SIGTERM finishes every export's requests in flight and exits 0.")
    return p


def load_config(path: str) -> list[tuple[str, dict]]:
    """(where, spec) for each export of the config file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise common.UsageError(f"--config {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            specs = json.loads(text)
        except json.JSONDecodeError as exc:
            raise common.UsageError(f"{path}: not JSON: {exc}") from None
        entries = [(f"{path}: entry {i + 1}", s) for i, s in enumerate(specs)]
    else:
        entries = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise common.UsageError(f"{where}: not JSON: {exc}") from None
            if isinstance(obj, dict) and "cmd" in obj:
                if obj["cmd"] != "add":
                    raise common.UsageError(f"{where}: only add requests belong in a config, "
                                            f"not {obj['cmd']!r}")
                obj = obj.get("args")
            entries.append((where, obj))
    for where, spec in entries:
        if not isinstance(spec, dict):
            raise common.UsageError(f"{where}: an export spec must be a JSON object")
    return entries


def reread_sizes(daemon: Daemon) -> None:
    """SIGHUP: images grown or shrunk outside (truncate, lvextend) reach
    their guests."""
    for export in daemon.exports.values():
        device = export.device
        if isinstance(device, BlkDevice) and isinstance(device.backend, FileBackend):
            resizing = getattr(device, "_resizing", None)
            if resizing is not None and resizing.locked():
                # A resize's ftruncate runs: the file has not its new size
                # yet (a shrink's old size back would let the guest write
                # where the truncate then cuts). That resize re-reads the
                # size when it ends, and tells the guest.
                common.log.info("%s: a resize is running; it re-reads the size", export.name)
                continue
            try:
                if device.backend.size() != device.capacity * 512:
                    told = device.resize()
                    common.log.warning("%s: capacity now %d sectors%s", export.name,
                                       device.capacity, "" if told else " (guest not told)")
            except (OSError, ValueError) as exc:
                common.log.error("%s: resize failed: %s", export.name, exc)


async def serve(args, entries: list[tuple[str, dict]], sandbox=None) -> None:
    loop = asyncio.get_running_loop()
    daemon = Daemon()
    daemon.loop = loop
    try:
        mode = None if args.control_mode is None else parse_socket_mode(args.control_mode)
    except ValueError as exc:
        raise common.UsageError(f"--control-mode: {exc}") from None
    try:
        gid = None if args.control_group is None else resolve_group(args.control_group)
    except ValueError as exc:
        raise common.UsageError(f"--control-group: {exc}") from None
    control = ControlServer(daemon, args.control, mode=mode, gid=gid)
    try:
        # Bound first: a second daemon on the same path fails before it
        # opens anything; requests wait until the configured exports exist.
        control.open()
    except (OSError, VhostUserError) as exc:
        raise common.UsageError(f"--control: {exc}") from None
    endpoint = None
    try:
        if args.prometheus:
            # bound now; sandboxed, its thread starts once confined
            endpoint = start_prometheus(daemon, args.prometheus, serve=sandbox is None)
        for where, spec in entries:
            try:
                await daemon.add(spec)
            except ManageError as exc:
                raise common.UsageError(f"{where}: {exc.code}: {exc}") from None
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reread_sizes, daemon)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, common.HANDLED_SIGNALS)
        sandbox_cli.enter_daemon(sandbox, args, daemon, sandbox_cli.daemon_kinds(args, entries))
        if endpoint is not None and endpoint.thread is None:
            endpoint.serve()
        await control.start()
        common.log.info("serving %d exports; control socket %s", len(daemon.exports),
                        args.control)
        await stop.wait()
        common.log.info("stopping: finishing requests in flight")
    finally:
        await control.close()
        if endpoint is not None:
            # shutdown() waits for the HTTP thread's poll: not on the loop
            await loop.run_in_executor(None, endpoint.close)
        await daemon.close()


def start_prometheus(daemon: Daemon, spec: str, *, serve: bool = True):
    try:
        from ..manage.prometheus import PrometheusEndpoint, parse_address
    except ImportError as exc:
        raise common.UsageError(f"--prometheus needs prometheus-client: {exc}") from None
    try:
        addr, port = parse_address(spec)
        return PrometheusEndpoint(daemon, addr, port, serve=serve)
    except (ValueError, OSError) as exc:
        raise common.UsageError(f"--prometheus {spec}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    common.setup_logging(args.verbose)

    def start() -> int:
        entries = load_config(args.config) if args.config else []
        kinds = sandbox_cli.daemon_kinds(args, entries)      # a bad --backends fails here
        # Python back-ends added at run time import code the sandbox's empty
        # view can't reach: as for vhostuser-blk --backend, off unless asked.
        sandbox = sandbox_cli.prepare(args, "daemon", python_backend="python" in kinds)
        loop = new_event_loop()
        try:
            loop.run_until_complete(serve(args, entries, sandbox))
        finally:
            loop.close()
        return 0

    return common.main_wrapper(start, "vhostuser-daemon")


if __name__ == "__main__":
    sys.exit(main())
