"""The filesystem the sandboxed process sees: an empty, read-only root.

Two steps, because a mount namespace is per thread: :func:`prepare` runs
at start-up while the process has one thread and gives it a mount
namespace of its own (threads started later share it); :func:`enter`
runs when everything is open and replaces the root of that namespace by
an empty read-only tmpfs, holding only read-only bind mounts of the paths
the program must still reach (the directory of a ``--connect`` socket,
say), with pivot_root(2), the old root detached. pivot_root moves every
thread of the namespace, including threads that already run (librados's).

Where the kernel won't give a mount namespace (a container without
CAP_SYS_ADMIN and without user namespaces), :func:`enter` chroots into an
empty directory that is deleted first, so nothing can ever be created in
it (needs CAP_SYS_CHROOT; the view then can't hold bind mounts). Without
either, the view stays the host's, and :func:`enter` says so.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import tempfile
from dataclasses import dataclass, field
from ..errors import VhostUserError

log = logging.getLogger("vhostuser.sandbox")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2
_LOCKDOWN = MS_NOSUID | MS_NODEV | MS_NOEXEC


class ViewError(VhostUserError, OSError):
    """The view could not be set up as asked."""


@dataclass
class View:
    """How the filesystem view was (or will be) restricted."""
    #: "namespace" after prepare() succeeded; at enter: "pivot_root",
    #: "chroot" or "none"
    method: str = "none"
    #: why the stronger methods weren't available
    reasons: list[str] = field(default_factory=list)
    #: paths visible (read-only) inside the view
    binds: tuple[str, ...] = ()
    user_namespace: bool = False


def _err(what: str) -> ViewError:
    e = ctypes.get_errno()
    return ViewError(e, f"{what}: {os.strerror(e)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)   # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) < 0:
        raise _err(f"mount {source or ''} on {target}")


def threads() -> int:
    """Threads of this process now."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0     # no /proc: unknown


def prepare() -> View:
    """A mount namespace of our own, propagation slave (mounts the host
    makes still arrive, ours never leave). Must run while the process has
    one thread. Never raises: a View with method "none" says why not."""
    view = View()
    if threads() != 1:
        view.reasons.append(f"{threads()} threads run already (a mount namespace is per "
                            "thread; the sandbox must be prepared before any starts)")
        return view
    flags = CLONE_NEWNS
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER
    if _libc.unshare(flags) < 0:
        e = ctypes.get_errno()
        view.reasons.append(f"unshare({'CLONE_NEWUSER|' if flags & CLONE_NEWUSER else ''}"
                            f"CLONE_NEWNS): {os.strerror(e)}")
        return view
    if flags & CLONE_NEWUSER:
        # The same uid and gid inside as outside: files keep their owners.
        uid, gid = os.geteuid(), os.getegid()
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError as exc:
            view.reasons.append(f"user namespace id maps: {exc.strerror}")
            return view
        view.user_namespace = True
    try:
        _mount(None, "/", None, MS_REC | MS_SLAVE)
    except ViewError as exc:
        view.reasons.append(str(exc))
        return view
    view.method = "namespace"
    return view


def _stage_dir() -> str:
    for d in ("/tmp", "/var/tmp", "/run", "/mnt"):
        if os.path.isdir(d) and not os.path.islink(d):
            return d
    return "/"


def _pivot(view: View, binds: list[str]) -> None:
    # Sources opened before anything is mounted over them; bound through
    # /proc/self/fd, which follows the open file, not the path.
    sources = []
    try:
        for path in binds:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            sources.append((path, fd, stat.S_ISDIR(os.fstat(fd).st_mode)))
        stage = _stage_dir()
        _mount("tmpfs", stage, "tmpfs", _LOCKDOWN, "mode=0755,size=64k,nr_inodes=256")
        for path, fd, is_dir in sources:
            target = os.path.join(stage, path.lstrip("/"))
            os.makedirs(target if is_dir else os.path.dirname(target), mode=0o755, exist_ok=True)
            if not is_dir:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
            _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _LOCKDOWN)
    finally:
        for _, fd, _ in sources:
            os.close(fd)
    _mount(None, stage, None, MS_REMOUNT | MS_RDONLY | _LOCKDOWN)
    os.chdir(stage)
    # pivot_root(".", "."): the tmpfs becomes the root, the old root is
    # stacked on it and then detached with everything under it.
    if _libc.syscall(ctypes.c_long(_nr("pivot_root")), b".", b".") < 0:
        raise _err("pivot_root")
    if _libc.umount2(b".", MNT_DETACH) < 0:
        raise _err("detaching the old root")
    os.chdir("/")
    view.method = "pivot_root"


def _nr(name: str) -> int:
    from .seccomp import resolve
    nr = resolve(name)
    if nr is None:
        raise ViewError(errno.ENOSYS, f"{name} doesn't exist on this architecture")
    return nr


def _chroot_empty(view: View) -> None:
    """chroot into a directory that no longer exists: empty, and nothing
    can be created in it."""
    d = tempfile.mkdtemp(prefix="vhostuser-empty-")
    os.chdir(d)
    os.rmdir(d)
    os.chroot(".")
    os.chdir("/")
    view.method = "chroot"


def _check_no_directory_fds() -> None:
    """A directory still open would lead back out of any view (fchdir, or
    openat relative to it): refuse rather than pretend."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            st = os.fstat(fd)
        except OSError:
            continue      # the listing's own fd, closed by now
        if stat.S_ISDIR(st.st_mode):
            try:
                where = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                where = "?"
            raise ViewError(errno.EBADF, f"fd {fd} is an open directory ({where}): it would "
                                         "lead out of the filesystem view; close it first")


def enter(view: View, binds: list[str]) -> View:
    """Restricts the root as well as the kernel allows (see the module's
    doc). ``binds`` are absolute paths (directories or files) to keep,
    read-only. Raises ViewError only for a real failure mid-way; a missing
    ability leaves ``view.method == "none"`` with the reasons."""
    binds = sorted(set(os.path.normpath(b) for b in binds))
    view.binds = tuple(binds)
    if os.path.exists("/proc/self/fd"):
        _check_no_directory_fds()
    if view.method == "namespace":
        _pivot(view, binds)
        return view
    if binds:
        view.reasons.append(f"a chroot can't keep {', '.join(binds)} reachable")
        view.method = "none"
        return view
    try:
        _chroot_empty(view)
    except OSError as exc:
        view.reasons.append(f"chroot: {exc.strerror}")
        view.method = "none"
    return view
