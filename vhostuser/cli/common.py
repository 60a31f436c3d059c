"""What every back-end program shares: the socket options of QEMU's
back-end program conventions (vhost-user.rst), logging, SIGTERM handling."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import TYPE_CHECKING

from ..errors import VhostUserError

if TYPE_CHECKING:
    from ..device import Device
    from ..server import Server

# asyncio, the server and the devices are imported where they are used, not
# here: lean_start() must run before asyncio is first imported.

log = logging.getLogger("vhostuser")


def lean_start(*, python_backend: bool) -> None:
    """Keeps ssl out of a program that serves only C back-ends.

    asyncio imports ssl eagerly, and uvloop requires it; that maps libssl
    and libcrypto, 4 MB of RSS, which nothing in vhostuser uses (sockets
    are unix sockets, I/O is in C). A Python back-end may want TLS (or
    uvloop's speed), so it gets both. Only a fresh process is changed:
    once asyncio is imported (a test run, an embedding program) this does
    nothing. Without ssl, uvloop doesn't import and asyncio's own loop
    serves the control plane, which handles only vhost-user messages here.
    """
    if not python_backend and "asyncio" not in sys.modules and "ssl" not in sys.modules:
        sys.modules["ssl"] = None   # `import ssl` now raises ImportError


class UsageError(VhostUserError):
    """A bad option or an unusable resource: one line on stderr, exit 1."""


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """``--version``: the program's name and the installed vhostuser version."""
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def alias(parser, *flags: str, dest: str, **kwargs) -> None:
    """An old spelling of an option: accepted, and hidden from --help."""
    parser.add_argument(*flags, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                        **kwargs)


def add_socket_options(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """QEMU's back-end program conventions (--socket-path, --fd,
    --print-capabilities), --connect, and who may connect to the socket."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", action="append" if several else "store",
                       help="listen on this unix socket (QEMU connects to it)"
                            + ("; repeat it with --switch" if several else ""))
    where.add_argument("--fd", type=int, metavar="N",
                       help="serve the listening unix socket inherited as fd N")
    where.add_argument("--connect", metavar="PATH",
                       help="connect to QEMU's socket (chardev server=on) and reconnect")
    add_socket_access_options(parser)
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the back-end capabilities as JSON and exit")
    add_polling_options(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0)


def add_socket_access_options(parser) -> None:
    parser.add_argument("--socket-group", metavar="GROUP",
                        help="group of the --socket-path socket (name or number), e.g. kvm "
                             "for QEMU run by libvirt; makes the default mode 0660")
    parser.add_argument("--socket-mode", metavar="MODE",
                        help="permissions of the --socket-path socket, octal (default 0600, "
                             "0660 with --socket-group)")


def add_polling_options(parser, *, defaults: bool = True) -> None:
    """--poll-us, --adaptive-poll-us, --queues-per-thread (the daemon's
    spec keys poll_us, adaptive_poll_us, queues_per_thread)."""
    parser.add_argument("--poll-us", type=int, default=0 if defaults else None, metavar="US",
                        help="busy-poll the rings for US microseconds before sleeping "
                             "(default 0: sleep at once)")
    alias(parser, "--poll", dest="poll_us", nargs="?", type=int, const=1000)
    parser.add_argument("--adaptive-poll-us", type=int, default=None, metavar="US",
                        help="after serving requests, look at the rings for up to US "
                             "microseconds before sleeping, less while nothing comes "
                             "(default 32, like QEMU's iothread poll-max-ns; 0: sleep at once)")
    alias(parser, "--adaptive-poll", dest="adaptive_poll_us", type=int)
    parser.add_argument("--queues-per-thread", type=int, default=1 if defaults else None,
                        metavar="N",
                        help="queues served by one worker thread (default 1: a thread each)")


def add_qos_options(parser, type_count, type_size, *, defaults: bool = True) -> None:
    """--iops, --bps, --iops-burst, --bps-burst (the spec's qos keys)."""
    default = 0 if defaults else None
    parser.add_argument("--iops", type=type_count, default=default, metavar="N",
                        help="requests per second (0: no limit)")
    alias(parser, "--iops-limit", dest="iops", type=type_count)
    parser.add_argument("--bps", type=type_size, default=default, metavar="SIZE",
                        help="bytes per second, e.g. 50M (0: no limit)")
    alias(parser, "--bps-limit", dest="bps", type=type_size)
    parser.add_argument("--iops-burst", type=type_count, default=default, metavar="N",
                        help="requests allowed at once after idling (default: one second's "
                             "worth)")
    parser.add_argument("--bps-burst", type=type_size, default=default, metavar="SIZE")


def add_backend_options(parser, source_group, base: str) -> None:
    """--backend MODULE:CLASS and its --backend-opt KEY=VALUE."""
    source_group.add_argument("--backend", metavar="MODULE:CLASS",
                              help=f"a Python {base} class")
    parser.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the --backend class (repeatable)")


def socket_access(args) -> tuple[int | None, int | None]:
    """(mode, gid) from --socket-mode and --socket-group; UsageError when
    bad, or given for a socket this program does not create."""
    from ..server import parse_socket_mode, resolve_group
    group, mode = getattr(args, "socket_group", None), getattr(args, "socket_mode", None)
    if group is None and mode is None:
        return None, None
    given = "--socket-group" if group is not None else "--socket-mode"
    if getattr(args, "fd", None) is not None:
        raise UsageError(f"{given} is for a socket made at --socket-path; an inherited --fd "
                         "socket's maker sets it (systemd: SocketGroup=, SocketMode=)")
    if getattr(args, "connect", None) is not None:
        raise UsageError(f"{given} is for a socket made at --socket-path; with --connect "
                         "QEMU makes the socket")
    try:
        gid = None if group is None else resolve_group(group)
        return (None if mode is None else parse_socket_mode(mode)), gid
    except ValueError as exc:
        raise UsageError(f"{given}: {exc}") from None


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def print_capabilities(kind: str, features: list[str]) -> None:
    print(json.dumps({"type": kind, "features": features}))


def make_server(args, device: Device) -> Server:
    from ..errors import VhostUserError
    from ..server import Server
    if args.socket_path is None and args.fd is None and args.connect is None:
        raise UsageError("one of --socket-path, --fd or --connect is required")
    mode, gid = socket_access(args)
    if not 1 <= args.queues_per_thread <= 64:
        raise UsageError(f"--queues-per-thread must be 1..64, not {args.queues_per_thread}")
    device.queues_per_worker = args.queues_per_thread
    adaptive = getattr(args, "adaptive_poll_us", None)
    if adaptive is not None:
        if not 0 <= adaptive <= 1000:
            raise UsageError(f"--adaptive-poll-us must be 0..1000, not {adaptive}")
        device.adaptive_poll_us = adaptive
    server = Server(device, path=args.socket_path, fd=args.fd, connect=args.connect,
                    socket_mode=mode, socket_gid=gid)
    try:
        server.open()
    except (OSError, VhostUserError) as exc:
        raise UsageError(str(exc)) from None
    return server


async def _serve_until_sigterm(servers: list[Server], on_sighup=None) -> None:
    import asyncio
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP is unblocked below: without something to do it must still not
    # kill the process (its default action), e.g. on a systemd reload.
    loop.add_signal_handler(signal.SIGHUP, on_sighup or (
        lambda: log.warning("SIGHUP: nothing to reload here; ignored")))
    # Handlers are in place: signals held since start-up may arrive now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stopper and task.exception():
            raise task.exception()
    log.info("stopping: finishing requests in flight")
    for s in servers:
        if s.session is not None:
            await s.session.stop("exit")
        s.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Closing sessions join their workers off the loop: the device may be
    # closed (by our caller) only once no worker runs in it.
    for s in servers:
        await s.wait_closed()


def run(servers: list[Server], *, on_sighup=None) -> int:
    """Serves until SIGTERM/SIGINT; ``on_sighup`` runs on the loop for SIGHUP."""
    from ..server import new_event_loop
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve_until_sigterm(servers, on_sighup))
    finally:
        loop.close()
    return 0


HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def main_wrapper(fn, prog: str) -> int:
    """Turns UsageError into one line on stderr and exit status 1. Holds
    SIGTERM/SIGINT/SIGHUP until the event loop handles them, so a SIGTERM
    right after the socket appears still means a clean exit."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        return fn()
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1


def parse_size(text: str) -> int:
    """'64M', '1G', '4096' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise UsageError(f"bad size {text!r}") from None
    if value <= 0:
        raise UsageError(f"size must be positive: {text!r}")
    return value


def size_arg(text: str) -> int:
    """argparse type for a size that may be 0 ('0', '64M')."""
    if text.strip() == "0":
        return 0
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def python_backend(spec: str, base: type, options: list[str]):
    """The --backend MODULE:CLASS object, built with the --backend-opt options."""
    from ..plugin import PluginError, instantiate, load_class, parse_options
    try:
        kwargs = parse_options(options)
    except PluginError as exc:
        raise UsageError(f"--backend-opt: {exc}") from None
    try:
        return instantiate(load_class(spec, base), spec, kwargs)
    except PluginError as exc:
        raise UsageError(f"--backend {exc}") from None
