"""libseccomp through ctypes: build a filter from rules and load it.

libseccomp is called with ctypes, loaded at run time (``libseccomp.so.2``,
Debian's libseccomp2, which systemd already depends on), rather than
through the cffi build or Debian's python3-seccomp: the C data plane then
builds without its headers, and a virtualenv that doesn't see the system's
site-packages (python3-seccomp lives there) still gets the filter.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
from dataclasses import dataclass
from ..errors import VhostUserError

# Actions (seccomp.h)
ACT_KILL_PROCESS = 0x80000000
ACT_KILL_THREAD = 0x00000000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000


def ACT_ERRNO(code: int) -> int:  # noqa: N802 (the C macro's name)
    return 0x00050000 | (code & 0xFFFF)


# Filter attributes
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4
_ATTR_CTL_LOG = 6
_ATTR_CTL_OPTIMIZE = 8

# Comparisons
CMP_NE, CMP_LT, CMP_LE, CMP_EQ, CMP_GE, CMP_GT, CMP_MASKED_EQ = range(1, 8)


class SeccompError(VhostUserError, OSError):
    """libseccomp is missing, or refused the filter."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


@dataclass(frozen=True)
class Arg:
    """A condition on argument ``index``: ``op`` one of the CMP_* values.
    With CMP_MASKED_EQ, ``value`` is the mask and ``value2`` what the
    masked argument must equal."""
    index: int
    op: int
    value: int
    value2: int = 0

    def as_c(self) -> _ArgCmp:
        return _ArgCmp(self.index, self.op, self.value & (2**64 - 1), self.value2 & (2**64 - 1))


def eq(index: int, value: int) -> Arg:
    return Arg(index, CMP_EQ, value)


def masked(index: int, mask: int, value: int) -> Arg:
    return Arg(index, CMP_MASKED_EQ, mask, value)


_lib = None


def library() -> ctypes.CDLL:
    """libseccomp, loaded once. SeccompError if it isn't installed."""
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise SeccompError(_errno.ENOENT, f"libseccomp is not installed ({exc}); on "
                               "Debian: apt install libseccomp2") from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.restype = None
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _lib = lib
    return _lib


def name_of(nr: int) -> str | None:
    """The name of system call ``nr`` on this architecture."""
    lib = library()
    fn = lib.seccomp_syscall_resolve_num_arch
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_uint32, ctypes.c_int]
    ptr = fn(0, nr)            # 0: the native architecture
    if not ptr:
        return None
    name = ctypes.string_at(ptr).decode()
    ctypes.CDLL(None).free(ctypes.c_void_p(ptr))
    return name


def resolve(name: str) -> int | None:
    """The syscall number of ``name`` on this architecture; None where it
    doesn't exist here (``open`` on arm64, say)."""
    nr = library().seccomp_syscall_resolve_name(name.encode())
    return nr if nr >= 0 else None


class Filter:
    """Rules added one by one, then :meth:`load` (every thread of the
    process, TSYNC). A syscall without a rule gets ``default``."""

    def __init__(self, default: int, *, log: bool = False):
        """``log``: the kernel logs every action but allow (the refusals
        with an errno too), as far as kernel.seccomp.actions_logged says."""
        self._lib = library()
        self._ctx = self._lib.seccomp_init(default)
        if not self._ctx:
            raise SeccompError(_errno.EINVAL, "seccomp_init failed")
        self._check(self._lib.seccomp_attr_set(self._ctx, _ATTR_CTL_TSYNC, 1), "TSYNC")
        self._check(self._lib.seccomp_attr_set(self._ctx, _ATTR_CTL_NNP, 1), "NNP")
        if log:
            self._check(self._lib.seccomp_attr_set(self._ctx, _ATTR_CTL_LOG, 1), "LOG")
        # A binary tree over the syscall numbers instead of a list (libseccomp
        # 2.5+; older ones keep the list). Calls allowed whatever their
        # arguments cost nothing either way on Linux 5.11+ (the kernel caches
        # them in a bitmap); this is for the ones with argument checks.
        self._lib.seccomp_attr_set(self._ctx, _ATTR_CTL_OPTIMIZE, 2)

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc < 0:
            raise SeccompError(-rc, f"seccomp: {what}: {os.strerror(-rc)}")

    def add(self, action: int, name: str, *args: Arg) -> bool:
        """One rule (all ``args`` must hold); False if the syscall doesn't
        exist on this architecture."""
        nr = resolve(name)
        if nr is None:
            return False
        array = (_ArgCmp * max(1, len(args)))(*[a.as_c() for a in args])
        self._check(self._lib.seccomp_rule_add_array(self._ctx, action, nr, len(args), array),
                    f"rule for {name}{list(args) if args else ''}")
        return True

    def export_bpf(self, fd: int) -> None:
        """The compiled program (for inspection: seccomp-tools, tests)."""
        self._check(self._lib.seccomp_export_bpf(self._ctx, fd), "export")

    def load(self) -> None:
        """Loads the filter into the kernel for every thread of the process.
        From then on it can only be made tighter."""
        rc = self._lib.seccomp_load(self._ctx)
        if rc < 0:
            raise SeccompError(-rc, f"seccomp_load: {os.strerror(-rc)}"
                               + (" (a thread has its own filter already)" if rc == -_errno.ESRCH
                                  else ""))

    def release(self) -> None:
        if self._ctx:
            self._lib.seccomp_release(self._ctx)
            self._ctx = None

    def __del__(self):
        self.release()
