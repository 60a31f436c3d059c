"""vhostuser-blk: serve a virtio-blk disk to QEMU over vhost-user."""
from __future__ import annotations

import argparse
import sys

from . import common
from ..sandbox import cli as sandbox_cli

# The device modules are imported in the functions that use them, after
# common.lean_start() (they import asyncio).


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-blk", description=__doc__)
    common.add_version_option(p)
    common.add_socket_options(p)
    add_source_options(p)
    p.add_argument("--read-only", action="store_true", help="refuse every write")
    p.add_argument("--direct", action="store_true", help="open --blk-file with O_DIRECT")
    p.add_argument("--aio", choices=["io_uring", "sync"], default=None,
                   help="--blk-file I/O: io_uring (default; many requests in flight) or sync "
                        "(in the queue worker)")
    p.add_argument("--queues", type=int, default=1, metavar="N", help="virtqueues (default 1)")
    common.alias(p, "--num-queues", dest="queues", type=int)
    p.add_argument("--serial", default="vhostuser", metavar="S", help="GET_ID serial (20 bytes)")
    common.add_qos_options(p.add_argument_group("QoS limits (token buckets; 0 = unlimited)"),
                           int, common.size_arg)
    sandbox_cli.add_options(p)
    p.epilog = ("SIGHUP re-reads the size of --blk-file and tells the guest (resize the "
                "image first, e.g. with truncate); SIGTERM finishes requests in flight and exits.")
    return p


def add_source_options(p, *, required: bool = False, defaults: bool = True) -> None:
    """Where the disk's data is: the options vhostuser-blk and
    vhostuser-ctl add-blk share (the daemon's spec keys of the same names)."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--blk-file", metavar="PATH", help="raw image file or block device")
    common.alias(src, "--file", dest="blk_file", metavar="PATH")
    src.add_argument("--ramdisk", metavar="SIZE", help="a RAM disk of SIZE (e.g. 64M)")
    common.add_backend_options(p, src, "vhostuser.blk.BlockBackend")
    src.add_argument("--rbd", metavar="POOL/IMAGE", help="a Ceph RBD image (through librbd)")
    src.add_argument("--nbd", metavar="URI", help="an NBD export (through libnbd), e.g. "
                     "nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    rbd = p.add_argument_group("Ceph RBD (--rbd)")
    rbd.add_argument("--rbd-conf", metavar="PATH",
                     help="ceph.conf (default: $CEPH_CONF, /etc/ceph/ceph.conf, ...)")
    rbd.add_argument("--rbd-id", default="admin" if defaults else None, metavar="NAME",
                     help="cephx user, without 'client.' (default: admin)")
    nbd = p.add_argument_group("NBD (--nbd)")
    nbd.add_argument("--nbd-connections", type=int, default=1 if defaults else None,
                     metavar="N", help="connections to the NBD server, requests spread over "
                                       "them (default 1)")
    p.add_argument("--remote-timeout", type=float, default=30.0 if defaults else None,
                   metavar="SECONDS",
                   help="a request to a remote store (--rbd, --nbd) not answered within SECONDS "
                        "fails with an I/O error for the guest (default 30; 0: wait forever)")


def make_backend(args):
    from ..blk import BlockBackend, FileBackend, RamBackend
    if args.aio is not None and not args.blk_file:
        raise common.UsageError("--aio is for --blk-file only (the other sources have their "
                                "own I/O)")
    if args.blk_file:
        return FileBackend(args.blk_file, read_only=args.read_only, direct=args.direct)
    if args.ramdisk:
        return RamBackend(common.parse_size(args.ramdisk), read_only=args.read_only)
    if args.backend:
        return common.python_backend(args.backend, BlockBackend, args.backend_opt)
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
                          timeout=args.remote_timeout or None,
                          connections=args.nbd_connections)
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
        if not 1 <= args.queues <= 64:
            raise common.UsageError(f"--queues must be 1..64, not {args.queues}")
        if not 1 <= args.nbd_connections <= 16:
            raise common.UsageError(f"--nbd-connections must be 1..16, not "
                                    f"{args.nbd_connections}")
        backend = make_backend(args)
        try:
            device = BlkDevice(backend, num_queues=args.queues, serial=args.serial,
                               read_only=args.read_only or None, poll_us=args.poll_us,
                               aio=args.aio or "io_uring")
        except (BackendError, OSError, ValueError) as exc:
            raise common.UsageError(str(exc)) from None
        try:
            device.set_qos(QosLimits(iops=args.iops, bps=args.bps,
                                     iops_burst=args.iops_burst, bps_burst=args.bps_burst))
        except QosError as exc:
            raise common.UsageError(str(exc)) from None
        server = common.make_server(args, device)

        def resize() -> None:
            # The image was grown or shrunk outside: tell the guest.
            try:
                told = device.resize()
            except (BackendError, OSError, ValueError) as exc:
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
