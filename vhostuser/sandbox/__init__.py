"""Confinement of a back-end process: once everything it serves is open,
it gives up what a guest that took it over could use against the host.

Three layers, each in its own module, entered in this order by
:meth:`Sandbox.enter`:

* :mod:`~vhostuser.sandbox.fsview`: an empty, read-only root (a mount
  namespace and pivot_root; chroot where that's refused);
* :mod:`~vhostuser.sandbox.privileges`: another user and group if asked
  (``--user``/``--group``), no capabilities, no_new_privs;
* :mod:`~vhostuser.sandbox.seccomp` with :mod:`~vhostuser.sandbox.policy`:
  a system call filter per program and back-end kind that kills the
  process on anything else.

What must still happen by path afterwards (a ``--connect`` reconnection,
removing the socket at exit, the daemon's ``add``) goes through a small
helper process started before, :mod:`~vhostuser.sandbox.broker`, which
does only what its policy (fixed before the sandbox) allows; the calls
are in :mod:`~vhostuser.sandbox.access`.

In Python::

    sandbox = Sandbox("blk", Settings(user="vhost"))   # first, one thread only
    ... open the back-end, the device, the server ...
    sandbox.enter(kinds=["file"], sockets=[path])        # then serve
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from . import access, fsview, policy, privileges, seccomp
from ..errors import VhostUserError

log = logging.getLogger("vhostuser.sandbox")

__all__ = ["Sandbox", "SandboxError", "Settings", "Report", "PRELOAD"]


class SandboxError(VhostUserError):
    """The sandbox can't be set up as asked (one line for the user)."""


@dataclass
class Settings:
    #: "kill": a system call outside the filter kills the process; "log":
    #: the kernel logs it and it goes through (to find what is missing)
    seccomp: str = "kill"
    user: str | None = None
    group: str | None = None
    #: system calls allowed on top of the program's and kinds' lists
    extra_syscalls: tuple[str, ...] = ()
    #: the daemon: directories whose images and sockets ``add`` may use
    allow_dirs: tuple[str, ...] = ()
    #: the daemon: TAP names (shell patterns) ``add`` may open
    allow_taps: tuple[str, ...] = ()


@dataclass
class Report:
    """What :meth:`Sandbox.enter` did, for logs and tests."""
    view: fsview.View
    uid: int
    gid: int
    seccomp: str
    syscalls: list[str]
    helper_pid: int | None
    kinds: tuple[str, ...]
    uring_rings: int = 0
    threads_before: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        view = self.view.method + (f" (read-only: {', '.join(self.view.binds)})"
                                   if self.view.binds and self.view.method == "pivot_root" else "")
        return (f"sandbox: uid {self.uid} gid {self.gid}, no capabilities, view {view}, "
                f"seccomp {self.seccomp} ({len(self.syscalls)} system calls; kinds "
                f"{', '.join(self.kinds) or '-'})"
                + (f", helper pid {self.helper_pid}" if self.helper_pid else ""))


#: Modules imported lazily somewhere on a serving path: imported before
#: the view hides their files.
PRELOAD = ("concurrent.futures.thread", "asyncio.base_events", "asyncio.selector_events",
           "asyncio.unix_events", "traceback", "linecache", "json", "encodings.idna",
           "vhostuser.handler", "vhostuser.inflight")
#: ... where installed (the event loop is made after the sandbox; without
#: this it would quietly fall back to asyncio's own)
PRELOAD_OPTIONAL = ("uvloop",)
#: ... and per back-end kind
PRELOAD_KINDS = {"nbd": ("vhostuser.blk.nbd", "vhostuser.blk.libnbd"),
                 "rbd": ("vhostuser.blk.rbd",)}


class Sandbox:
    """One process's sandbox: prepared first, entered once everything is
    open. Construct it while the process still has a single thread."""

    def __init__(self, program: str, settings: Settings | None = None, *,
                 helper: bool = True):
        if program not in policy.PROGRAMS:
            raise SandboxError(f"no sandbox policy for {program!r}")
        self.program = program
        self.settings = settings or Settings()
        if self.settings.seccomp not in ("kill", "log"):
            raise SandboxError(f"--seccomp must be kill or log, not {self.settings.seccomp!r}")
        self.entered: Report | None = None
        try:
            self.identity = privileges.resolve(self.settings.user, self.settings.group)
        except privileges.PrivilegeError as exc:
            raise SandboxError(exc.strerror) from None
        try:
            seccomp.library()          # loaded while /usr/lib is still there
        except seccomp.SeccompError as exc:
            raise SandboxError(f"{exc.strerror} (or --sandbox off)") from None
        # glibc reads the time zone once; log lines keep local time after.
        time.localtime()
        # The helper first: it keeps the host's mount namespace.
        self.helper = access.BrokerClient.spawn() if helper else None
        self.view = fsview.prepare()

    def enter(self, kinds, *, sockets=(), connect=(), binds=(), uring_rings: int = 0,
              extra_syscalls=()) -> Report:
        """Everything is open: confine the process. ``kinds``: the back-end
        kinds served (policy.KINDS); ``sockets``: socket paths the helper
        may remove (or bind again); ``connect``: socket paths it may
        connect to; ``binds``: paths kept readable in the view;
        ``uring_rings``: io_uring rings to make now for later use."""
        if self.entered is not None:
            raise SandboxError("the sandbox is entered once")
        s = self.settings
        try:
            pol = policy.build(self.program, kinds, tuple(s.extra_syscalls) + tuple(extra_syscalls))
        except policy.PolicyError as exc:
            raise SandboxError(str(exc)) from None
        threads_before = fsview.threads()
        if self.helper is not None:
            registered = {}
            for path in sockets:
                try:
                    st = os.lstat(path)
                    registered[path] = [st.st_dev, st.st_ino]
                except FileNotFoundError:
                    registered[path] = None
            try:
                self.helper.set_policy(sockets=registered, connect=list(connect),
                                       dirs=list(s.allow_dirs), taps=list(s.allow_taps))
            except OSError as exc:
                raise SandboxError(f"the sandbox's helper: {exc.strerror}") from None
        for name in PRELOAD + tuple(m for k in pol.kinds for m in PRELOAD_KINDS.get(k, ())):
            importlib.import_module(name)
        for name in PRELOAD_OPTIONAL:
            try:
                importlib.import_module(name)
            except ImportError:
                # missing for good: a later import fails the same way, not
                # with the PermissionError of a refused open
                sys.modules[name] = None
        _load_libraries(pol.kinds)
        rings = _make_rings(uring_rings)
        thread_status = _open_thread_status()
        try:
            view = fsview.enter(self.view, list(binds))
        except OSError as exc:
            raise SandboxError(f"filesystem view: {exc.strerror}") from None
        if view.method == "none":
            log.warning("sandbox: the filesystem view is not restricted: %s",
                        "; ".join(view.reasons) or "no way to")
        try:
            privileges.drop(self.identity)
        except privileges.PrivilegeError as exc:
            raise SandboxError(f"dropping privileges: {exc.strerror}") from None
        notes = _threads_with_capabilities(thread_status)
        _load_filter(pol, s.seccomp)
        access.activate(self.helper, pol.kinds, self.program)
        self.entered = Report(view=view, uid=os.getuid(), gid=os.getgid(), seccomp=s.seccomp,
                              syscalls=pol.allowed_names(),
                              helper_pid=self.helper.pid if self.helper else None,
                              kinds=pol.kinds, uring_rings=rings, threads_before=threads_before,
                              notes=notes)
        log.info("%s", self.entered.summary())
        for note in notes:
            log.warning("sandbox: %s", note)
        return self.entered


def _load_libraries(kinds) -> None:
    """Shared libraries a kind loads on first use, loaded now."""
    # glibc loads libgcc_s when a thread first unwinds: pthread_exit, which
    # CPython calls on a thread that wants the GIL once the interpreter is
    # exiting (a queue worker returning from a Python back-end). In the
    # view it is not there, and glibc aborts the process instead.
    try:
        ctypes.CDLL("libgcc_s.so.1")
    except OSError as exc:
        log.info("sandbox: libgcc_s not loaded: %s", exc)
    if "nbd" in kinds:
        from ..blk import libnbd
        try:
            libnbd.lib()
        except Exception as exc:         # noqa: BLE001: reported when an export needs it
            log.info("sandbox: libnbd not loaded: %s", exc)
    if "rbd" in kinds:
        from ..blk import rbd
        try:
            rbd.load()
        except Exception as exc:         # noqa: BLE001
            log.info("sandbox: librbd not loaded: %s", exc)


def _make_rings(n: int) -> int:
    """io_uring rings for later, then no more: the filter refuses
    io_uring_setup (a ring's operations don't pass through seccomp)."""
    from ..native import lib
    made = 0
    if n > 0:
        made = lib.vu_uring_pool_fill(n, 1024)
        if made < 0:
            log.warning("sandbox: no io_uring rings (%s); disks use synchronous I/O",
                        os.strerror(-made))
            made = 0
    lib.vu_uring_pool_seal()
    return made


def _open_thread_status() -> dict[str, int]:
    """The status files of the threads running now, opened while /proc is
    in view (files, not directories: nothing to walk out of the view by)."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out[tid] = os.open(f"/proc/self/task/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
    return out


def _threads_with_capabilities(status: dict[str, int]) -> list[str]:
    """Threads that kept capabilities (started before the sandbox by a
    library, when the uid didn't change); closes the files."""
    kept = []
    for tid, fd in status.items():
        try:
            text = os.pread(fd, 8192, 0).decode(errors="replace")
        except OSError:
            continue
        finally:
            os.close(fd)
        for line in text.splitlines():
            if line.startswith("CapEff:") and int(line.split()[1], 16):
                kept.append(tid)
    if not kept:
        return []
    return [f"{len(kept)} thread(s) started before the sandbox by a library keep their "
            f"capabilities (tids {', '.join(sorted(kept, key=int)[:8])}"
            f"{', ...' if len(kept) > 8 else ''}); --user takes them away too. The filter "
            "refuses every call that would use them."]


def _load_filter(pol: policy.Policy, mode: str) -> None:
    default = seccomp.ACT_KILL_PROCESS if mode == "kill" else seccomp.ACT_LOG
    # Only the default action is logged in log mode: logging the errno
    # refusals too (a handful per start) would use up the kernel's rate
    # limit for audit messages and hide the calls that matter.
    flt = seccomp.Filter(default)
    try:
        for rule in policy.with_pid(pol.rules, os.getpid()):
            action = seccomp.ACT_ALLOW if rule.errno is None else seccomp.ACT_ERRNO(rule.errno)
            flt.add(action, rule.name, *rule.args)
        flt.load()
    except seccomp.SeccompError as exc:
        raise SandboxError(str(exc.strerror)) from None
    finally:
        flt.release()
