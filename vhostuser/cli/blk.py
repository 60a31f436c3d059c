"""vhostuser-blk: serve a virtio-blk disk to QEMU over vhost-user."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import common
from ..sandbox import cli as sandbox_cli

# The device modules are imported in the functions that use them, after
# common.lean_start() (they import asyncio).


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-blk", description=__doc__)
    common.add_socket_options(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--blk-file", metavar="PATH", help="raw image file or block device")
    src.add_argument("--ramdisk", metavar="SIZE", help="a RAM disk of SIZE (e.g. 64M)")
    src.add_argument("--backend", metavar="MODULE:CLASS", help="a Python BlockBackend class")
    src.add_argument("--rbd", metavar="POOL/IMAGE", help="a Ceph RBD image (through librbd)")
    src.add_argument("--nbd", metavar="URI", help="an NBD export (through libnbd), e.g. "
                     "nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    p.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the --backend class (repeatable)")
    rbd = p.add_argument_group("Ceph RBD (--rbd)")
    rbd.add_argument("--rbd-conf", metavar="PATH",
                     help="ceph.conf (default: $CEPH_CONF, /etc/ceph/ceph.conf, ...)")
    rbd.add_argument("--rbd-id", default="admin", metavar="NAME",
                     help="cephx user, without 'client.' (default: admin)")
    p.add_argument("--remote-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request to a remote store (--rbd, --nbd) not answered within SECONDS "
                        "fails with an I/O error for the guest (default 30; 0: wait forever)")
    p.add_argument("--read-only", action="store_true", help="refuse every write")
    p.add_argument("--direct", action="store_true", help="open --blk-file with O_DIRECT")
    p.add_argument("--aio", choices=["io_uring", "sync"], default="io_uring",
                   help="--blk-file I/O: io_uring (many requests in flight) or sync "
                        "(in the queue worker)")
    p.add_argument("--num-queues", type=int, default=1, metavar="N")
    p.add_argument("--serial", default="vhostuser", metavar="S", help="GET_ID serial (20 bytes)")
    qos = p.add_argument_group("QoS limits (token buckets; 0 = unlimited)")
    qos.add_argument("--iops-limit", type=int, default=0, metavar="N", help="requests per second")
    qos.add_argument("--bps-limit", type=common.size_arg, default=0, metavar="SIZE",
                     help="bytes per second, e.g. 50M")
    qos.add_argument("--iops-burst", type=int, default=0, metavar="N",
                     help="requests allowed at once after idling (default: one second's worth)")
    qos.add_argument("--bps-burst", type=common.size_arg, default=0, metavar="SIZE")
    sandbox_cli.add_options(p)
    p.epilog = ("SIGHUP re-reads the size of --blk-file and tells the guest (resize the "
                "image first, e.g. with truncate); SIGTERM finishes requests in flight and exits.")
    return p


def load_class(spec: str, base: type) -> type:
    """MODULE:CLASS -> the class, which must subclass base."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise common.UsageError(f"--backend wants MODULE:CLASS, not {spec!r}")
    # Like `python -m`: the user's own modules in the current directory import.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise common.UsageError(f"--backend {spec}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise common.UsageError(f"--backend {spec}: not a {base.__module__}.{base.__name__} "
                                "subclass")
    return cls


def make_backend(args):
    from ..blk import BlockBackend, FileBackend, RamBackend
    if args.blk_file:
        return FileBackend(args.blk_file, read_only=args.read_only, direct=args.direct)
    if args.ramdisk:
        return RamBackend(common.parse_size(args.ramdisk), read_only=args.read_only)
    if args.backend:
        return common.instantiate(load_class(args.backend, BlockBackend), args.backend,
                                  args.backend_opt)
    if args.rbd:
        return make_rbd_backend(args)
    if args.nbd:
        return make_nbd_backend(args)
    raise common.UsageError("one of --blk-file, --ramdisk, --backend, --rbd or --nbd is required")


def make_rbd_backend(args):
    # Imported here: the other sources don't need cffi's librbd bindings.
    from ..blk import BackendError
    from ..blk.rbd import RbdBackend
    try:
        return RbdBackend.from_spec(args.rbd, conf=args.rbd_conf, client_id=args.rbd_id,
                                    read_only=args.read_only,
                                    timeout=args.remote_timeout or None)
    except (BackendError, ValueError) as exc:
        raise common.UsageError(f"--rbd {args.rbd}: {exc}") from None


def make_nbd_backend(args):
    from ..blk import BackendError
    from ..blk.nbd import NbdBackend
    try:
        return NbdBackend(args.nbd, read_only=args.read_only,
                          timeout=args.remote_timeout or None)
    except (BackendError, ValueError) as exc:
        raise common.UsageError(f"--nbd {args.nbd}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.print_capabilities:
        common.print_capabilities("block", ["read-only", "blk-file"])
        return 0
    common.setup_logging(args.verbose)
    common.lean_start(python_backend=bool(args.backend))

    def start() -> int:
        sandbox = sandbox_cli.prepare(args, "blk", python_backend=bool(args.backend),
                                      helper=args.fd is None)
        from ..blk import BackendError, BlkDevice
        from ..qos import QosError, QosLimits
        if not 1 <= args.num_queues <= 64:
            raise common.UsageError(f"--num-queues must be 1..64, not {args.num_queues}")
        backend = make_backend(args)
        try:
            device = BlkDevice(backend, num_queues=args.num_queues, serial=args.serial,
                               read_only=args.read_only or None, poll_us=args.poll,
                               aio=args.aio)
        except (BackendError, OSError) as exc:
            raise common.UsageError(str(exc)) from None
        try:
            device.set_qos(QosLimits(iops=args.iops_limit, bps=args.bps_limit,
                                     iops_burst=args.iops_burst, bps_burst=args.bps_burst))
        except QosError as exc:
            raise common.UsageError(str(exc)) from None
        server = common.make_server(args, device)

        def resize() -> None:
            # The image was grown or shrunk outside: tell the guest.
            try:
                told = device.resize()
            except (OSError, ValueError) as exc:
                common.log.error("resize failed: %s", exc)
                return
            common.log.warning("capacity now %d sectors%s", device.capacity,
                               "" if told else " (no front-end channel to tell the guest)")

        try:
            sandbox_cli.enter_blk(sandbox, args, device)
            return common.run([server], on_sighup=resize)
        finally:
            common.log.info("stats: %s", device.stats())
            device.close()

    return common.main_wrapper(start, "vhostuser-blk")


if __name__ == "__main__":
    sys.exit(main())
