"""Whom the process becomes: user and group, capabilities, no_new_privs.

The order matters and is the usual one: supplementary groups, then the
group, then the user (after setuid the others can't be changed any more);
capabilities the process keeps are named explicitly; no_new_privs last, so
nothing exec'd later (nothing is: the filter kills execve) could regain
what was dropped. glibc applies setgroups/setresgid/setresuid to every
thread of the process; capabilities are per thread and set in the thread
that enters the sandbox (threads started later inherit them), which is why
the sandbox is entered before the worker threads exist (the ones that do
exist, librados's, lose every capability with the uid change).
"""
from __future__ import annotations

import ctypes
import grp
import os
import pwd
from dataclasses import dataclass
from ..errors import VhostUserError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

PR_SET_KEEPCAPS = 8
PR_SET_SECUREBITS = 28
PR_GET_SECUREBITS = 27
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# securebits: no root magic for uid 0, no capability fix-ups on uid
# changes, and both locked, so the empty capability sets stay empty.
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

_NR_CAPGET = 125     # x86_64; other architectures: see _capget_nr()
_NR_CAPSET = 126
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: Capabilities by name (linux/capability.h), for --keep-caps style lists.
CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
        "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_NET_BIND_SERVICE": 10,
        "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_SYS_CHROOT": 18,
        "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24}


class PrivilegeError(VhostUserError, OSError):
    """The user or group can't be used, or the kernel refused a step."""


@dataclass(frozen=True)
class Identity:
    """Whom to become: resolved before the view hides /etc/passwd."""
    uid: int
    gid: int
    user: str
    group: str


def resolve(user: str | None, group: str | None) -> Identity | None:
    """The identity for ``--user``/``--group`` (names or numbers); None when
    neither is given (the process keeps its uid and gid). The group
    defaults to the user's primary group."""
    if user is None and group is None:
        return None
    if os.geteuid() != 0:
        raise PrivilegeError(1, f"--user/--group need root to switch to (this process is uid "
                                f"{os.geteuid()})")
    if user is None:
        uid, name = os.getuid(), pwd.getpwuid(os.getuid()).pw_name
        default_gid = None
    else:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            if user.isdigit():
                pw = None
            else:
                raise PrivilegeError(2, f"--user {user}: no such user") from None
        uid = pw.pw_uid if pw else int(user)
        name = pw.pw_name if pw else user
        default_gid = pw.pw_gid if pw else None
    if group is None:
        if default_gid is None:
            raise PrivilegeError(2, f"--user {user}: no passwd entry; give --group too")
        gid = default_gid
    else:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            if not group.isdigit():
                raise PrivilegeError(2, f"--group {group}: no such group") from None
            gid = int(group)
    try:
        group_name = grp.getgrgid(gid).gr_name
    except KeyError:
        group_name = str(gid)
    return Identity(uid, gid, name, group_name)


def _prctl(option: int, arg2: int = 0, what: str = "prctl") -> int:
    rc = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                     ctypes.c_ulong(0), ctypes.c_ulong(0))
    if rc < 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"{what}: {os.strerror(err)}")
    return rc


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _caps_syscall(nr: int, data) -> int:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    rc = _libc.syscall(ctypes.c_long(nr), ctypes.byref(hdr), data)
    if rc < 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"cap{'get' if nr == _NR_CAPGET else 'set'}: "
                                  f"{os.strerror(err)}")
    return rc


def capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, as masks."""
    data = (_CapData * 2)()
    _caps_syscall(_NR_CAPGET, data)
    def mask(field):
        return getattr(data[0], field) | (getattr(data[1], field) << 32)
    return mask("effective"), mask("permitted"), mask("inheritable")


def set_capabilities(keep: int) -> None:
    """Effective and permitted become ``keep`` (a mask), inheritable empty."""
    data = (_CapData * 2)()
    for i in range(2):
        part = (keep >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
        data[i].inheritable = 0
    _caps_syscall(_NR_CAPSET, data)


def _drop_bounding_set(keep: int) -> None:
    for cap in range(64):
        if keep & (1 << cap):
            continue
        rc = _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0)
        if rc < 0 and ctypes.get_errno() == 22:   # EINVAL: past the last capability
            break


def caps_mask(names) -> int:
    mask = 0
    for name in names:
        try:
            mask |= 1 << CAPS[name]
        except KeyError:
            raise PrivilegeError(22, f"unknown capability {name!r}") from None
    return mask


def drop(identity: Identity | None, keep_caps: int = 0) -> None:
    """Becomes ``identity`` (or stays who we are) with only ``keep_caps``.

    Without an identity a root process stays uid 0 but without any
    capability, with SECBIT_NOROOT locked so uid 0 gives none back.
    """
    have_caps = os.geteuid() == 0 or capabilities()[1] != 0
    if have_caps:
        # Ambient capabilities would survive into anything exec'd; the
        # bounding set limits what could ever be gained again.
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        try:
            _drop_bounding_set(keep_caps)
        except PrivilegeError:
            pass
    if identity is not None:
        if keep_caps:
            _prctl(PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
        try:
            os.setgroups([])
            os.setresgid(identity.gid, identity.gid, identity.gid)
            os.setresuid(identity.uid, identity.uid, identity.uid)
        except OSError as exc:
            raise PrivilegeError(exc.errno, f"switching to {identity.user}:{identity.group}: "
                                            f"{exc.strerror}") from None
        if keep_caps:
            _prctl(PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")
    if have_caps:
        bits = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP
                | SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED
                | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)
        try:
            _prctl(PR_SET_SECUREBITS, bits, "PR_SET_SECUREBITS")
        except PrivilegeError:
            # Needs CAP_SETPCAP; without it (a container's root) the empty
            # sets below still hold.
            pass
        set_capabilities(keep_caps)
        left = capabilities()
        if left[0] & ~keep_caps or left[1] & ~keep_caps:
            raise PrivilegeError(1, f"capabilities left after dropping: {left[0]:#x}")
    set_no_new_privs()


def set_no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def no_new_privs() -> bool:
    return _prctl(PR_GET_NO_NEW_PRIVS, 0, "PR_GET_NO_NEW_PRIVS") == 1
