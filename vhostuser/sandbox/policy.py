"""Which system calls each program and back-end kind may make once
sandboxed: the seccomp filter's allow-list, as data.

A program's filter is the union of ``BASE`` (CPython, its event loop, the C
data plane's worker threads, a vhost-user session), the program's own
group, the groups of the back-end kinds it serves, and whatever the user
adds (``--seccomp-allow NAME``, or ``sandbox_syscalls`` on a Python
back-end class). Every system call not listed kills the process
(``--seccomp log``: is logged by the kernel and allowed, to find what is
missing). A few are refused with an error instead of a kill, where a
library asks and copes with no (opening files: a lazy import that was
missed fails as an ImportError rather than killing every guest's disk).

``python -m vhostuser.sandbox PROGRAM [KIND...]`` prints a filter.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
from dataclasses import dataclass, field

from .seccomp import CMP_EQ, CMP_LT, Arg, eq, masked
from ..errors import VhostUserError

PROT_EXEC = 0x4
CLONE_THREAD = 0x00010000
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 \
    | 0x40000000
#: madvise advice from MADV_HWPOISON (100) on needs privileges: refused
MADV_PRIVILEGED = 100
# open(2) flags that write or create (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC,
# O_APPEND, O_TMPFILE's directory bit): a read-only open has none of them.
_OPEN_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | 0o20000000

_WRITE_BITS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)

# ioctl requests (x86_64 and the other Linux ABIs with the generic _IOC)
FIONREAD, FIONBIO, FIOCLEX, FIONCLEX, TCGETS = 0x541B, 0x5421, 0x5451, 0x5450, 0x5401
BLKSECDISCARD, BLKGETSIZE64 = 0x127D, 0x80081272
TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454D0, 0x400454D8
PR_SET_NAME, PR_GET_NAME = 15, 16


@dataclass(frozen=True)
class Rule:
    """Allow ``name`` (when ``args`` all hold), or refuse it with ``errno``."""
    name: str
    args: tuple[Arg, ...] = ()
    errno: int | None = None

    def describe(self) -> str:
        text = self.name
        if self.args:
            text += "(" + ", ".join(_describe_arg(self.name, a) for a in self.args) + ")"
        if self.errno is not None:
            text += f" -> {errno.errorcode.get(self.errno, self.errno)}"
        return text


def _describe_arg(name: str, a: Arg) -> str:
    names = {("ioctl", 1): _IOCTL_NAMES, ("socket", 0): _FAMILY_NAMES,
             ("socketpair", 0): _FAMILY_NAMES, ("prctl", 0): {15: "PR_SET_NAME",
                                                              16: "PR_GET_NAME"}}
    if a.op == CMP_LT:
        return f"arg{a.index} < {a.value}"
    if a.op == CMP_EQ:
        if (name, a.index) in names:
            return names[(name, a.index)].get(a.value, hex(a.value))
        return f"arg{a.index} == {'own pid' if a.value == _PID_MARK else a.value}"
    return f"arg{a.index} & {a.value:#x} == {a.value2:#x}"


_IOCTL_NAMES = {FIONREAD: "FIONREAD", FIONBIO: "FIONBIO", FIOCLEX: "FIOCLEX",
                FIONCLEX: "FIONCLEX", TCGETS: "TCGETS", BLKSECDISCARD: "BLKSECDISCARD",
                BLKGETSIZE64: "BLKGETSIZE64", TUNSETOFFLOAD: "TUNSETOFFLOAD",
                TUNSETVNETHDRSZ: "TUNSETVNETHDRSZ"}
_FAMILY_NAMES = {socket.AF_UNIX: "AF_UNIX", socket.AF_INET: "AF_INET",
                 socket.AF_INET6: "AF_INET6"}
#: stands for the process's own pid until the filter is built
_PID_MARK = -0x5A5A


def allow(*names: str) -> list[Rule]:
    return [Rule(n) for n in names]


def refuse(code: int, *names: str) -> list[Rule]:
    return [Rule(n, errno=code) for n in names]


def ioctls(*requests: int) -> list[Rule]:
    return [Rule("ioctl", (eq(1, r),)) for r in requests]


def families(name: str, *fams: int) -> list[Rule]:
    return [Rule(name, (eq(0, f),)) for f in fams]


#: Every sandboxed program: CPython and its event loop (asyncio or uvloop),
#: logging to stderr, the vhost-user session (messages with fds, guest
#: memory mapped from them, the inflight area in a memfd), the C worker
#: threads (epoll, eventfds, timerfds), the broker's socketpair.
BASE: list[Rule] = [
    *allow(
        # I/O on descriptors already open
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
        "preadv2", "pwritev2", "close", "dup", "dup2", "dup3", "fcntl", "lseek",
        "fstat", "newfstatat", "statx", "ftruncate",
        # memory (mmap and mprotect below, without PROT_EXEC)
        "brk", "munmap", "mremap",
        # threads and their synchronisation
        "futex", "set_robust_list", "rseq", "sched_yield", "sched_getaffinity",
        "exit", "exit_group",
        # reaping the helper at exit (a clone without CLONE_THREAD kills, so
        # it is the only child there can be)
        "wait4",
        # signals (SIGTERM, SIGHUP; kill and tgkill below, own process only)
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
        # who and when
        "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
        "getresgid", "clock_gettime", "clock_getres", "gettimeofday", "clock_nanosleep",
        "nanosleep",
        # libuv (uvloop) reads the kernel version when it makes a loop
        "uname",
        # waiting: the event loop and the workers
        "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll",
        "ppoll", "select", "pselect6", "eventfd2", "timerfd_create", "timerfd_settime",
        "timerfd_gettime", "pipe2",
        # the inflight area (GET_INFLIGHT_FD), random numbers
        "memfd_create", "getrandom",
        # sockets already there: vhost-user (with fds), control, broker
        "recvmsg", "sendmsg", "recvfrom", "sendto", "accept4", "shutdown", "getsockopt",
        "setsockopt", "getsockname", "getpeername",
        # io_uring rings made before the filter (vu_uring_pool), restricted
        # to reads, writes and syncs: no new ring, no registration
        "io_uring_enter",
    ),
    Rule("mmap", (masked(2, PROT_EXEC, 0),)),
    Rule("mprotect", (masked(2, PROT_EXEC, 0),)),
    Rule("madvise", (Arg(2, CMP_LT, MADV_PRIVILEGED),)),
    # threads only: a clone without CLONE_THREAD (fork), or with a new
    # namespace, kills
    Rule("clone", (masked(0, CLONE_THREAD | CLONE_NEW_ANY, CLONE_THREAD),)),
    Rule("kill", (Arg(0, CMP_EQ, _PID_MARK),)),
    Rule("tgkill", (Arg(0, CMP_EQ, _PID_MARK),)),
    # asyncio's self-pipe is a socketpair
    *families("socketpair", socket.AF_UNIX),
    # non-blocking sockets (Python and libuv), close-on-exec
    *ioctls(FIONBIO, FIOCLEX, FIONCLEX, FIONREAD),
    # the size of a block device a front-end maps guest memory, the dirty
    # log or the inflight area from (fstat has none for it)
    *ioctls(BLKGETSIZE64),
    # getrlimit(2) is prlimit64 with no new limit
    Rule("prlimit64", (eq(2, 0),)),
    Rule("prctl", (eq(0, PR_SET_NAME),)),
    Rule("prctl", (eq(0, PR_GET_NAME),)),
    # glibc tries clone3 first and falls back to clone on ENOSYS; clone3's
    # flags are in memory, where the filter can't check CLONE_THREAD
    *refuse(errno.ENOSYS, "clone3"),
    # nothing is opened by path any more: EACCES instead of a kill, so a
    # lazy import or a library's optional config file fails softly
    *refuse(errno.EACCES, "open", "openat", "openat2", "creat", "access", "faccessat",
            "faccessat2", "readlink", "readlinkat", "getcwd"),
    # a new ring or registration would be a way around this filter
    *refuse(errno.EPERM, "io_uring_setup", "io_uring_register"),
    # isatty()
    Rule("ioctl", (eq(1, TCGETS),), errno=errno.ENOTTY),
]

#: Program groups (beyond BASE).
PROGRAMS: dict[str, list[Rule]] = {
    "blk": [],
    "net": [],
    # the control socket and the Prometheus endpoint are listening sockets
    # made before the filter: accepting needs nothing new; the helper
    # (broker) opens files, sockets and TAPs for add
    "daemon": allow("listen"),      # asyncio's start_unix_server listens again
}

#: Back-end kind groups.
KINDS: dict[str, list[Rule]] = {
    # raw file or block device: discard/write-zeroes as fallocate, flushes,
    # tmpfs images read through a mapping (mincore), secure erase, resize
    "file": [*allow("fallocate", "fdatasync", "fsync", "fstatfs", "mincore"),
             *ioctls(BLKSECDISCARD, BLKGETSIZE64)],
    "ramdisk": [],
    # offloads follow what the guest negotiated
    "tap": ioctls(TUNSETOFFLOAD, TUNSETVNETHDRSZ),
    "sink": [],
    "loopback": [],
    # the switch's uplink thread, TAP or VXLAN (a UDP socket bound before)
    "switch": [*allow("recvmmsg", "sendmmsg"), *ioctls(TUNSETOFFLOAD, TUNSETVNETHDRSZ)],
    "vxlan": allow("recvmmsg", "sendmmsg"),
    # libnbd (re)connects by itself: new sockets, and a name lookup reads
    # /etc/hosts, resolv.conf, ... (those bound read-only into the view)
    "nbd": [*families("socket", socket.AF_UNIX, socket.AF_INET, socket.AF_INET6),
            *allow("connect"),
            Rule("openat", (masked(2, _OPEN_WRITES, 0),))],
    # librados: its messenger threads reconnect to monitors and OSDs; an
    # image added to the daemon later reads ceph.conf and its keyring (in
    # the view, read-only); at exit it removes its admin socket (refused:
    # nothing is writable)
    "rbd": [*families("socket", socket.AF_INET, socket.AF_INET6),
            *allow("connect", "epoll_create"),
            Rule("openat", (masked(2, _OPEN_WRITES, 0),)),
            # its log file and admin socket: refused, librados goes on
            *[Rule("openat", (masked(2, bit, bit),), errno=errno.EACCES)
              for bit in _WRITE_BITS],
            Rule("socket", (eq(0, socket.AF_UNIX),), errno=errno.EACCES),
            *refuse(errno.EACCES, "bind", "unlink", "unlinkat")],
    # a Python back-end: CPython and the event loop only (BASE); what else
    # it needs it names itself (NetBackend/BlockBackend.sandbox_syscalls,
    # --seccomp-allow)
    "python": [],
    # the daemon's built-in Python network back-end "null"
    "null": [],
}

#: Kinds whose filter and view are tested with the sandbox on; a user's
#: Python back-end is not among them (sandbox off unless asked for).
BUILT_IN = frozenset(KINDS) - {"python"}


@dataclass
class Policy:
    program: str
    kinds: tuple[str, ...]
    extra: tuple[str, ...] = ()
    rules: list[Rule] = field(default_factory=list)

    def allowed_names(self) -> list[str]:
        return sorted({r.name for r in self.rules if r.errno is None})

    def describe(self) -> list[str]:
        seen, out = set(), []
        for r in sorted(self.rules, key=lambda r: (r.errno is not None, r.name)):
            d = r.describe()
            if d not in seen:
                seen.add(d)
                out.append(d)
        return out


class PolicyError(VhostUserError, ValueError):
    """An unknown program, kind or system call name."""


def build(program: str, kinds, extra=()) -> Policy:
    """The policy of ``program`` serving back-ends of ``kinds``, plus the
    system calls named in ``extra``."""
    if program not in PROGRAMS:
        raise PolicyError(f"no sandbox policy for program {program!r}")
    kinds = tuple(sorted(set(kinds)))
    for k in kinds:
        if k not in KINDS:
            raise PolicyError(f"no sandbox policy for back-end kind {k!r}")
    rules = [*BASE, *PROGRAMS[program]]
    for k in kinds:
        rules += KINDS[k]
    from .seccomp import resolve
    for name in extra:
        if resolve(name) is None:
            raise PolicyError(f"--seccomp-allow: {name!r} is not a system call on this machine")
        rules.append(Rule(name))
    # An unconditional allow wins over conditions and refusals of the
    # same name (libseccomp wants one or the other per system call).
    free = {r.name for r in rules if r.errno is None and not r.args}
    rules = [r for r in rules if r.name not in free or (r.errno is None and not r.args)]
    # A conditional allow of a name refused whatever its arguments (openat
    # for nbd): the refusal goes, the other cases kill. The same condition
    # both allowed and refused (AF_UNIX sockets with nbd and rbd): allowed.
    allowed = {r.name for r in rules if r.errno is None}
    allowed_exact = {(r.name, r.args) for r in rules if r.errno is None}
    rules = [r for r in rules if r.errno is None
             or (r.args and (r.name, r.args) not in allowed_exact)
             or (not r.args and r.name not in allowed)]
    return Policy(program, kinds, tuple(extra), _dedup(rules))


def _dedup(rules: list[Rule]) -> list[Rule]:
    seen, out = set(), []
    for r in rules:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def with_pid(rules: list[Rule], pid: int) -> list[Rule]:
    """The rules with the own-pid placeholder replaced."""
    out = []
    for r in rules:
        args = tuple(Arg(a.index, a.op, pid) if a.value == _PID_MARK else a for a in r.args)
        out.append(Rule(r.name, args, r.errno))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m vhostuser.sandbox {{{','.join(PROGRAMS)}}} "
              f"[KIND...]  (kinds: {', '.join(KINDS)})\n"
              "       python -m vhostuser.sandbox syscall NUMBER  (its name, e.g. from the "
              "kernel log's syscall=N)")
        return 0 if argv else 2
    if argv[0] == "syscall":
        from .seccomp import name_of
        name = name_of(int(argv[1])) if len(argv) == 2 and argv[1].isdigit() else None
        if name is None:
            print(f"not a system call number here: {' '.join(argv[1:])}", file=sys.stderr)
            return 2
        print(name)
        return 0
    try:
        policy = build(argv[0], argv[1:])
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    for line in policy.describe():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
