"""The sandbox's command-line options and the calls the programs make:
``add_options`` when building the parser, ``prepare`` first thing in
``main`` (one thread still), ``enter_*`` once everything is open."""
from __future__ import annotations

import argparse
import os
import urllib.parse

from ..cli.common import UsageError
from . import Sandbox, SandboxError, Settings, policy

#: What the daemon may serve with the sandbox on and no --backends.
DAEMON_DEFAULT_KINDS = ("file", "ramdisk", "tap", "null")
#: io_uring rings the daemon makes before its filter, shared by the disks
#: added later (a queue without one does synchronous I/O).
DAEMON_URING_RINGS = 16
#: Files a name lookup reads (bound read-only into the view of a process
#: that resolves names after the sandbox: libnbd reconnecting).
#: librados's default place for ceph.conf and keyrings
CEPH_DIR = "/etc/ceph"
RESOLVER_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf",
                  "/etc/host.conf")


def add_options(parser: argparse.ArgumentParser, *, daemon: bool = False) -> None:
    g = parser.add_argument_group(
        "sandbox", "after start-up the process gives up what a guest that took it over "
                   "could use: see docs/operations.md")
    g.add_argument("--sandbox", choices=["on", "off"], default=None,
                   help="confine the process once everything is open (default: on, except "
                        "for a Python --backend)")
    g.add_argument("--seccomp", choices=["kill", "log"], default="kill",
                   help="a system call outside the filter kills the process (default), or is "
                        "logged by the kernel and allowed (to find what a back-end needs)")
    g.add_argument("--seccomp-allow", action="append", default=[], metavar="SYSCALL",
                   help="allow this system call too (repeatable; e.g. for a Python back-end)")
    g.add_argument("--user", metavar="USER", help="become this user (name or uid) when "
                   "sandboxed; needs root")
    g.add_argument("--group", metavar="GROUP", help="... and this group (default: the user's)")
    if daemon:
        g.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                       help="images and sockets that add may use at run time are under DIR "
                            "(repeatable; with the sandbox on, nothing else)")
        g.add_argument("--allow-tap", action="append", default=[], metavar="PATTERN",
                       help="TAP interfaces add may open at run time: names matching this "
                            "shell pattern (repeatable)")
        g.add_argument("--backends", metavar="KIND[,KIND...]",
                       help="back-end kinds add may create, fixed at start in the filter "
                            f"(default: {','.join(DAEMON_DEFAULT_KINDS)} and those in "
                            "--config; more: nbd, rbd)")
        g.add_argument("--uring-rings", type=int, default=DAEMON_URING_RINGS, metavar="N",
                       help="io_uring rings made before the sandbox for the disks' queues "
                            f"(default {DAEMON_URING_RINGS}; a queue without one does "
                            "synchronous I/O)")


def prepare(args, program: str, *, python_backend: bool = False,
            helper: bool = True) -> Sandbox | None:
    """The sandbox to enter later, or None when it is off. Call it before
    any thread starts."""
    mode = args.sandbox or ("off" if python_backend else "on")
    if mode == "off":
        for opt in ("user", "group"):
            if getattr(args, opt):
                raise UsageError(f"--{opt} is for the sandbox, which is off")
        return None
    settings = Settings(seccomp=args.seccomp, user=args.user, group=args.group,
                        extra_syscalls=tuple(args.seccomp_allow),
                        allow_dirs=tuple(_abs_dirs(getattr(args, "allow_dir", []))),
                        allow_taps=tuple(getattr(args, "allow_tap", [])))
    for name in settings.extra_syscalls:
        try:
            policy.build(program, [], [name])
        except policy.PolicyError as exc:
            raise UsageError(str(exc)) from None
    try:
        return Sandbox(program, settings, helper=helper)
    except SandboxError as exc:
        raise UsageError(f"sandbox: {exc}") from None


def _abs_dirs(dirs: list[str]) -> list[str]:
    out = []
    for d in dirs:
        if not os.path.isabs(d):
            raise UsageError(f"--allow-dir {d}: must be an absolute path")
        if not os.path.isdir(d):
            raise UsageError(f"--allow-dir {d}: not a directory")
        out.append(os.path.realpath(d))
    return out


def _enter(sandbox: Sandbox, kinds, **kw) -> None:
    try:
        sandbox.enter(kinds, **kw)
    except SandboxError as exc:
        raise UsageError(f"sandbox: {exc}") from None


def backend_syscalls(backend) -> tuple[str, ...]:
    """What a Python back-end class says it needs (``sandbox_syscalls``)."""
    names = getattr(type(backend), "sandbox_syscalls", ())
    if isinstance(names, str):
        names = (names,)
    return tuple(names)


def nbd_binds(uri: str) -> list[str]:
    """Paths libnbd needs to reconnect to ``uri`` from inside the view."""
    u = urllib.parse.urlsplit(uri)
    if u.scheme.endswith("+unix"):
        sock = urllib.parse.parse_qs(u.query).get("socket", [""])[0]
        return [os.path.dirname(os.path.abspath(sock))] if sock else []
    return [f for f in RESOLVER_FILES if os.path.exists(f)]


def enter_blk(sandbox: Sandbox | None, args, device) -> None:
    """vhostuser-blk: everything is open (image or connection, device,
    listening socket)."""
    if sandbox is None:
        return
    binds: list[str] = []
    extra: tuple[str, ...] = ()
    if args.blk_file:
        kinds = ["file"]
    elif args.ramdisk:
        kinds = ["ramdisk"]
    elif args.nbd:
        kinds = ["nbd"]
        binds = nbd_binds(args.nbd)
    elif args.rbd:
        kinds = ["rbd"]
    else:
        kinds = ["python"]
        extra = backend_syscalls(device.backend)
    rings = args.queues if getattr(device, "aio", None) == "io_uring" else 0
    _enter(sandbox, kinds, sockets=[args.socket_path] if args.socket_path else [],
           connect=[args.connect] if args.connect else [], binds=binds,
           uring_rings=rings, extra_syscalls=extra)


def enter_net(sandbox: Sandbox | None, args, backend, *, socket_paths=()) -> None:
    """vhostuser-net: TAP, tunnel or switch open, devices made, sockets bound."""
    if sandbox is None:
        return
    extra: tuple[str, ...] = ()
    if args.switch:
        kinds = ["switch"] + (["vxlan"] if args.vxlan else [])
    elif args.vxlan:
        kinds = ["switch", "vxlan"]
    elif args.tap:
        kinds = ["tap"]
    elif args.sink:
        kinds = ["sink"]
    elif args.loopback:
        kinds = ["loopback"]
    else:
        kinds = ["python"]
        extra = backend_syscalls(backend)
    given = args.socket_path
    paths = list(socket_paths) or ([given] if isinstance(given, str) else list(given or []))
    _enter(sandbox, kinds, sockets=paths, connect=[args.connect] if args.connect else [],
           extra_syscalls=extra)


def daemon_kinds(args, entries) -> list[str]:
    """--backends, or the default kinds and those of the --config exports."""
    from .access import export_kind
    if args.backends:
        kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
        for k in kinds:
            if k not in policy.KINDS:
                raise UsageError(f"--backends: unknown kind {k!r} (kinds: "
                                 f"{', '.join(sorted(policy.BUILT_IN))})")
    else:
        kinds = list(DAEMON_DEFAULT_KINDS)
    for _where, spec in entries:
        for source in ("blk_file", "file", "ramdisk", "tap", "backend", "nbd", "rbd"):
            if source in spec:
                kinds.append(export_kind(spec.get("type"), source, spec[source]))
    return sorted(set(kinds))


def enter_daemon(sandbox: Sandbox | None, args, daemon, kinds) -> None:
    """vhostuser-daemon: control socket bound, --config exports added."""
    if sandbox is None:
        return
    sockets = [args.control] + [e.spec.socket for e in daemon.exports.values()]
    # Remote disks are opened by their libraries, in this process: libnbd
    # connects to a server socket, librados reads ceph.conf and a keyring.
    # Those must be under --allow-dir, which the view then holds read-only.
    binds = list(sandbox.settings.allow_dirs) if {"nbd", "rbd"} & set(kinds) else []
    if "nbd" in kinds or "rbd" in kinds:
        binds += [f for f in RESOLVER_FILES if os.path.exists(f)]
    if "rbd" in kinds and os.path.isdir(CEPH_DIR):
        binds.append(CEPH_DIR)
    rings = args.uring_rings if "file" in kinds else 0
    if rings < 0:
        raise UsageError(f"--uring-rings must be 0 or more, not {rings}")
    _enter(sandbox, kinds, sockets=sockets, binds=binds, uring_rings=rings)
