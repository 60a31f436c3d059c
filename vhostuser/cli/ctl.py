"""vhostuser-ctl: manage a running vhostuser-daemon over its control socket.

Prints each result as JSON (list: a table, unless --json); on a refused
request prints the error code and message and exits 1."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import VhostUserError
from ..manage.checks import as_size
from ..manage.client import ControlClient, ControlError
from ..manage.errors import BadArgument
from ..plugin import PluginError, parse_options
from . import blk as blk_cli
from . import common
from . import net as net_cli
from ..errors import VhostUserError


def _size(text: str) -> str:
    return text          # the daemon parses sizes ("64M"), so its errors are the ones shown


def _limit(text: str) -> int:
    """A QoS number: 0, 1000 or a size such as 50M."""
    if text.strip() == "0":
        return 0
    try:
        return as_size(text, "limit")
    except BadArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _on_off(text: str) -> bool:
    value = text.lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"want on or off, not {text!r}")


def _add_qos_options(p: argparse.ArgumentParser) -> None:
    common.add_qos_options(p, _limit, _limit, defaults=False)


def _qos(args) -> dict:
    return {k: getattr(args, k) for k in ("iops", "bps", "iops_burst", "bps_burst")
            if getattr(args, k) is not None}


def _add_export_options(p: argparse.ArgumentParser) -> None:
    """What every export has: its name, socket, polling and workers."""
    p.add_argument("name")
    p.add_argument("--socket-path", metavar="PATH",
                   help="the export's vhost-user socket (QEMU connects to it; required)")
    common.alias(p, "--socket", dest="socket_path", metavar="PATH")
    common.add_socket_access_options(p)
    common.add_polling_options(p, defaults=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-ctl", description=__doc__)
    common.add_version_option(p)
    p.add_argument("--control", default=os.environ.get("VHOSTUSER_CONTROL"), metavar="PATH",
                   help="the daemon's control socket (default: $VHOSTUSER_CONTROL)")
    p.add_argument("--json", action="store_true", help="print list as JSON too")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="exports and their state")
    sub.add_parser("version", help="daemon and protocol version")
    sub.add_parser("metrics", help="every export's counters")
    for name, text in (("describe", "features, queues, settings of an export"),
                       ("remove", "drain, disconnect and remove an export"),
                       ("stop", "drain and disconnect an export, keeping it"),
                       ("start", "serve a stopped export again")):
        sub.add_parser(name, help=text).add_argument("name")
    s = sub.add_parser("stats", help="counters of one export, or of all")
    s.add_argument("name", nargs="?")

    b = sub.add_parser("add-blk", help="add a disk (the options are vhostuser-blk's)")
    _add_export_options(b)
    blk_cli.add_source_options(b, required=True, defaults=False)
    b.add_argument("--read-only", action="store_true")
    b.add_argument("--queues", type=int, metavar="N", help="virtqueues (default 1)")
    common.alias(b, "--num-queues", dest="queues", type=int)
    b.add_argument("--serial")
    b.add_argument("--aio", choices=["io_uring", "sync"])
    b.add_argument("--direct", action="store_true", help="O_DIRECT (with --blk-file)")
    _add_qos_options(b)

    n = sub.add_parser("add-net", help="add a network interface (the options are "
                                       "vhostuser-net's)")
    _add_export_options(n)
    src = n.add_mutually_exclusive_group(required=True)
    src.add_argument("--tap", metavar="IFNAME")
    common.add_backend_options(n, src, "vhostuser.net.NetBackend (or null: drop every frame)")
    net_cli.add_device_options(n, defaults=False)

    a = sub.add_parser("add", help="add an export from a JSON spec")
    a.add_argument("spec", metavar="JSON")

    r = sub.add_parser("resize", help="resize a disk (the guest is told)")
    r.add_argument("name")
    r.add_argument("size", type=_size, metavar="SIZE", help="bytes, or e.g. 20G")

    ro = sub.add_parser("set-read-only", help="refuse or allow the guest's writes")
    ro.add_argument("name")
    ro.add_argument("read_only", type=_on_off, metavar="on|off")

    q = sub.add_parser("set-qos", help="QoS limits of a disk (unset ones become 0: unlimited)")
    q.add_argument("name")
    _add_qos_options(q)

    c = sub.add_parser("call", help="any command, with its args as a JSON object")
    c.add_argument("cmd")
    c.add_argument("args", nargs="?", default=None, metavar="JSON")
    return p


def _set(spec: dict, key: str, value) -> None:
    if value is not None and value is not False:
        spec[key] = value


def request_of(args) -> tuple[str, dict | None]:
    """The (cmd, args) a command line stands for."""
    cmd = args.command
    if cmd in ("list", "version", "metrics"):
        return cmd, None
    if cmd in ("describe", "remove", "stop", "start"):
        return cmd, {"name": args.name}
    if cmd == "stats":
        return cmd, {"name": args.name} if args.name else None
    if cmd in ("add-blk", "add-net"):
        return "add", export_spec(args)
    if cmd == "add":
        return "add", _json_arg(args.spec)
    if cmd == "resize":
        size = int(args.size) if args.size.isdigit() else args.size
        return cmd, {"name": args.name, "size": size}
    if cmd == "set-read-only":
        return cmd, {"name": args.name, "read_only": args.read_only}
    if cmd == "set-qos":
        return cmd, {"name": args.name, **_qos(args)}
    if cmd == "call":
        return args.cmd, None if args.args is None else _json_arg(args.args)
    raise AssertionError(cmd)


class _Usage(VhostUserError):
    pass


#: ctl option (its dest) -> spec key, where they differ; every other option
#: given is the spec key of its own name (--poll-us: "poll_us")
_BLK_KEYS = ("blk_file", "ramdisk", "backend", "rbd", "nbd", "rbd_conf", "rbd_id",
             "nbd_connections", "remote_timeout", "read_only", "queues", "serial", "aio",
             "direct")
_NET_KEYS = ("tap", "backend", "queues", "mac", "mtu")
_EXPORT_KEYS = ("socket_group", "socket_mode", "poll_us", "adaptive_poll_us",
                "queues_per_thread")
#: paths the daemon wants absolute: resolved where the user is
_PATHS = ("socket_path", "blk_file", "rbd_conf")


def export_spec(args) -> dict:
    """The add request's spec for add-blk or add-net: each option given
    becomes the spec key of the same name."""
    kind = "blk" if args.command == "add-blk" else "net"
    if args.socket_path is None:
        raise _Usage(f"{args.command}: --socket-path is required")
    spec = {"type": kind, "name": args.name}
    for key in ("socket_path", *_EXPORT_KEYS, *(_BLK_KEYS if kind == "blk" else _NET_KEYS)):
        value = getattr(args, key, None)
        if value is None or value is False:
            continue
        spec[key] = os.path.abspath(value) if key in _PATHS else value
    if kind == "net" and args.in_order is False:     # a flag whose meaning is the False
        spec["in_order"] = False
    if args.backend_opt:
        try:
            spec["backend_opt"] = parse_options(args.backend_opt)
        except PluginError as exc:
            raise _Usage(f"--backend-opt: {exc}") from None
    if kind == "blk" and _qos(args):
        spec["qos"] = _qos(args)
    return spec


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Usage(f"not JSON: {exc}") from None


def print_table(exports: list[dict]) -> None:
    rows = [("NAME", "TYPE", "STATE", "CONNECTED", "SOCKET")]
    rows += [(e["name"], e["type"], e["state"], "yes" if e["connected"] else "no",
              e["socket_path"])
             for e in exports]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.control:
        print("vhostuser-ctl: --control PATH is required (or set VHOSTUSER_CONTROL)",
              file=sys.stderr)
        return 1
    try:
        cmd, cmd_args = request_of(args)
    except _Usage as exc:
        print(f"vhostuser-ctl: {exc}", file=sys.stderr)
        return 1
    try:
        with ControlClient(args.control) as client:
            reply = client.request(cmd, cmd_args)
    except (OSError, ValueError) as exc:
        print(f"vhostuser-ctl: {args.control}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        err = ControlError(**{k: reply.get("error", {}).get(k, "") for k in ("code", "message")})
        print(f"vhostuser-ctl: {err}", file=sys.stderr)
        return 1
    result = reply.get("result")
    if cmd == "list" and not args.json:
        print_table(result)
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
