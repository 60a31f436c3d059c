"""vhostuser-net: serve a virtio-net interface to QEMU over vhost-user."""
from __future__ import annotations

import argparse
import sys

from ..net import NetBackend, NetBackendError, NetDevice, TapBackend
from ..net.spec import parse_mac
from . import common
from .blk import load_class


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-net", description=__doc__)
    common.add_socket_options(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tap", metavar="IFNAME", help="TAP interface (created if missing)")
    src.add_argument("--backend", metavar="MODULE:CLASS", help="a Python NetBackend class")
    p.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the --backend class (repeatable)")
    p.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs")
    p.add_argument("--mac", default="52:54:00:12:34:56")
    p.add_argument("--mtu", type=int, default=1500)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.print_capabilities:
        common.print_capabilities("net", [])
        return 0
    common.setup_logging(args.verbose)

    def start() -> int:
        if not 1 <= args.queues <= 16:
            raise common.UsageError(f"--queues must be 1..16, not {args.queues}")
        try:
            mac = parse_mac(args.mac)
        except ValueError as exc:
            raise common.UsageError(str(exc)) from None
        if args.tap:
            backend = TapBackend(args.tap, queue_pairs=args.queues)
        elif args.backend:
            backend = common.instantiate(load_class(args.backend, NetBackend), args.backend,
                                         args.backend_opt)
        else:
            raise common.UsageError("one of --tap or --backend is required")
        try:
            device = NetDevice(backend, queue_pairs=args.queues, mac=mac, mtu=args.mtu,
                               poll_us=args.poll)
        except (NetBackendError, ValueError, OSError) as exc:
            raise common.UsageError(str(exc)) from None
        server = common.make_server(args, device)
        try:
            return common.run([server])
        finally:
            device.close()

    return common.main_wrapper(start, "vhostuser-net")


if __name__ == "__main__":
    sys.exit(main())
