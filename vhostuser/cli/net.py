"""vhostuser-net: serve a virtio-net interface to QEMU over vhost-user."""
from __future__ import annotations

import argparse
import sys
import types

from typing import TYPE_CHECKING

from . import common
from ..sandbox import cli as sandbox_cli
from .blk import load_class

if TYPE_CHECKING:
    from ..net.switch import Switch

# The device modules are imported in the functions that use them, after
# common.lean_start() (they import asyncio).


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-net", description=__doc__)
    common.add_socket_options(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tap", metavar="IFNAME",
                     help="TAP interface (created if missing); with --switch, its uplink")
    src.add_argument("--backend", metavar="MODULE:CLASS", help="a Python NetBackend class")
    src.add_argument("--vxlan", metavar="REMOTE:PORT[,vni=N][,local=ADDR:PORT]",
                     help="VXLAN tunnel (RFC 7348, VNI 1 unless given) to another host; "
                          "with --switch, its uplink")
    src.add_argument("--sink", action="store_true",
                     help="count and drop every transmitted frame (in C; for benchmarks)")
    src.add_argument("--loopback", action="store_true",
                     help="send every transmitted frame back to the guest (in C)")
    p.add_argument("--switch", action="store_true",
                   help="a built-in learning switch: one port per --socket-path (repeat it), "
                        "MACs counting up from --mac")
    p.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the --backend class (repeatable)")
    p.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs")
    p.add_argument("--mac", default="52:54:00:12:34:56")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--no-in-order", dest="in_order", action="store_false",
                   help="don't offer VIRTIO_F_IN_ORDER (offered by default)")
    sandbox_cli.add_options(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """With --switch, --socket-path may be repeated (one port each)."""
    pre = argparse.ArgumentParser(prog="vhostuser-net", add_help=False, allow_abbrev=False)
    pre.add_argument("--switch", action="store_true")
    pre.add_argument("--socket-path", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    if not known.switch:
        return parser().parse_args(argv)
    args = parser().parse_args(rest + ["--switch"])
    args.socket_path = known.socket_path + ([args.socket_path] if args.socket_path else [])
    return args


def port_mac(base: bytes, i: int) -> bytes:
    """base + i in the low three bytes (the vendor prefix stays)."""
    low = (int.from_bytes(base[3:], "big") + i) % (1 << 24)
    return base[:3] + low.to_bytes(3, "big")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_capabilities:
        common.print_capabilities("net", [])
        return 0
    common.setup_logging(args.verbose)
    common.lean_start(python_backend=bool(args.backend))

    def start() -> int:
        sandbox = sandbox_cli.prepare(args, "net", python_backend=bool(args.backend),
                                      helper=args.fd is None)
        from ..net import (LoopbackBackend, NetBackend, NetBackendError, NetDevice,
                           SinkBackend, TapBackend)
        from ..net.spec import parse_mac
        if not 1 <= args.queues <= 16:
            raise common.UsageError(f"--queues must be 1..16, not {args.queues}")
        try:
            mac = parse_mac(args.mac)
        except ValueError as exc:
            raise common.UsageError(str(exc)) from None
        if args.switch:
            return serve_switch(args, mac, sandbox)
        switch = None
        if args.vxlan:
            # one device with a tunnel: a switch with one port
            switch = open_switch(None, args.vxlan)
            backend = switch.port()
        elif args.tap:
            backend = TapBackend(args.tap, queue_pairs=args.queues)
        elif args.backend:
            backend = common.instantiate(load_class(args.backend, NetBackend), args.backend,
                                         args.backend_opt)
        elif args.sink:
            backend = SinkBackend()
        elif args.loopback:
            backend = LoopbackBackend()
        else:
            raise common.UsageError("one of --tap, --vxlan, --backend, --sink or --loopback "
                                    "is required")
        try:
            device = NetDevice(backend, queue_pairs=args.queues, mac=mac, mtu=args.mtu,
                               poll_us=args.poll, in_order=args.in_order)
        except (NetBackendError, ValueError, OSError) as exc:
            if switch is not None:
                switch.close()
            raise common.UsageError(str(exc)) from None
        try:
            server = common.make_server(args, device)
            sandbox_cli.enter_net(sandbox, args, backend)
            return common.run([server])
        finally:
            common.log.info("stats: %s", device.stats())
            device.close()
            if switch is not None:
                switch.close()

    return common.main_wrapper(start, "vhostuser-net")


def open_switch(tap: str | None, vxlan: str | None) -> Switch:
    from ..net import NetBackendError
    from ..net.switch import Switch, TapUplink, VxlanUplink
    try:
        uplink = TapUplink(tap) if tap else VxlanUplink.parse(vxlan) if vxlan else None
        return Switch(uplink)
    except (NetBackendError, ValueError, OSError) as exc:
        raise common.UsageError(str(exc)) from None


def serve_switch(args, mac: bytes, sandbox=None) -> int:
    """--switch: one NetDevice per --socket-path, all ports of one switch."""
    from ..net import NetBackendError, NetDevice
    from ..net.switch import MAX_PORTS
    if args.fd is not None or args.connect is not None:
        raise common.UsageError("--switch serves --socket-path sockets only")
    if args.backend:
        raise common.UsageError("--switch and --backend don't go together")
    if not 1 <= len(args.socket_path) <= MAX_PORTS:
        raise common.UsageError(f"--switch needs 1..{MAX_PORTS} --socket-path options")
    switch = open_switch(args.tap, args.vxlan)
    devices = []
    try:
        for i in range(len(args.socket_path)):
            try:
                devices.append(NetDevice(switch.port(), queue_pairs=args.queues,
                                         mac=port_mac(mac, i), mtu=args.mtu, poll_us=args.poll,
                                         in_order=args.in_order))
            except (NetBackendError, ValueError, OSError) as exc:
                raise common.UsageError(str(exc)) from None
        servers = []
        for path, device in zip(args.socket_path, devices):
            where = types.SimpleNamespace(socket_path=path, fd=None, connect=None,
                                          queues_per_thread=args.queues_per_thread,
                                          adaptive_poll=args.adaptive_poll)
            servers.append(common.make_server(where, device))
        sandbox_cli.enter_net(sandbox, args, None, socket_paths=args.socket_path)
        return common.run(servers)
    finally:
        for device in devices:
            device.close()
        switch.close()


if __name__ == "__main__":
    sys.exit(main())
