"""vhostuser-net: serve a virtio-net interface to QEMU over vhost-user."""
from __future__ import annotations

import argparse
import sys
import types

from typing import TYPE_CHECKING

from . import common
from ..sandbox import cli as sandbox_cli

if TYPE_CHECKING:
    from ..net.switch import Switch

# The device modules are imported in the functions that use them, after
# common.lean_start() (they import asyncio).


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-net", description=__doc__)
    common.add_version_option(p)
    common.add_socket_options(p, several=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tap", metavar="IFNAME",
                     help="TAP interface (created if missing); with --switch, its uplink")
    common.add_backend_options(p, src, "vhostuser.net.NetBackend")
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
    add_device_options(p)
    sandbox_cli.add_options(p)
    return p


def add_device_options(p, *, defaults: bool = True) -> None:
    """The interface's settings, shared with vhostuser-ctl add-net."""
    p.add_argument("--queues", type=int, default=1 if defaults else None, metavar="N",
                   help="queue pairs (default 1)")
    common.alias(p, "--queue-pairs", dest="queues", type=int)
    p.add_argument("--mac", default="52:54:00:12:34:56" if defaults else None,
                   help="the guest's MAC address (default 52:54:00:12:34:56)")
    p.add_argument("--mtu", type=int, default=1500 if defaults else None,
                   help="MTU (default 1500)")
    p.add_argument("--no-in-order", dest="in_order", action="store_false",
                   default=True if defaults else None,
                   help="don't offer VIRTIO_F_IN_ORDER (offered by default)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """--socket-path may be repeated with --switch (a list of them then;
    otherwise the one path, or None). Several without --switch are left a
    list for check_args to refuse, with the other checks that need every
    option."""
    args = parser().parse_args(argv)
    paths = args.socket_path or []
    if args.switch:
        args.socket_path = paths
    elif len(paths) <= 1:
        args.socket_path = paths[0] if paths else None
    return args


def check_args(args: argparse.Namespace) -> None:
    """UsageError for options that don't go together."""
    if args.switch:
        if args.sink or args.loopback:
            raise common.UsageError("--switch forwards between its ports (and --tap or --vxlan); "
                                    f"{'--sink' if args.sink else '--loopback'} serves one "
                                    "guest alone: give one or the other")
    elif isinstance(args.socket_path, list):
        raise common.UsageError(f"{len(args.socket_path)} --socket-path options without "
                                "--switch: one socket serves one guest (--switch connects "
                                "several)")


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
        check_args(args)
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
            backend = common.python_backend(args.backend, NetBackend, args.backend_opt)
        elif args.sink:
            backend = SinkBackend()
        elif args.loopback:
            backend = LoopbackBackend()
        else:
            raise common.UsageError("one of --tap, --vxlan, --backend, --sink or --loopback "
                                    "is required")
        try:
            device = NetDevice(backend, queue_pairs=args.queues, mac=mac, mtu=args.mtu,
                               poll_us=args.poll_us, in_order=args.in_order)
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
                                         mac=port_mac(mac, i), mtu=args.mtu, poll_us=args.poll_us,
                                         in_order=args.in_order))
            except (NetBackendError, ValueError, OSError) as exc:
                raise common.UsageError(str(exc)) from None
        servers = []
        for path, device in zip(args.socket_path, devices):
            where = types.SimpleNamespace(socket_path=path, fd=None, connect=None,
                                          socket_group=args.socket_group,
                                          socket_mode=args.socket_mode,
                                          queues_per_thread=args.queues_per_thread,
                                          adaptive_poll_us=args.adaptive_poll_us)
            servers.append(common.make_server(where, device))
        sandbox_cli.enter_net(sandbox, args, None, socket_paths=args.socket_path)
        return common.run(servers)
    finally:
        for device in devices:
            device.close()
        switch.close()


if __name__ == "__main__":
    sys.exit(main())
