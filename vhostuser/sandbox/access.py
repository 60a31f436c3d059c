"""Paths, sockets and TAPs after the sandbox: the calls the rest of the
library makes instead of ``os.open``, ``bind``, ``unlink`` and friends,
where it may run sandboxed.

Unsandboxed (no helper active) every function does the plain thing. In a
sandboxed process that has the helper (:mod:`vhostuser.sandbox.broker`),
they ask the helper, which does it with the privileges and the
filesystem the process gave up, if its policy allows; refusals are
OSError(EACCES) with a message that says which option would allow it.
"""
from __future__ import annotations

import array
import errno
import grp
import json
import os
import socket
import stat as stat_mod
import subprocess
import sys
import threading
import types

_BROKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "broker.py")
_MAX_MSG = 1 << 16


class BrokerClient:
    """The program's end of the helper's socket."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen | None):
        self.sock = sock
        self.proc = proc
        self._lock = threading.Lock()

    @classmethod
    def spawn(cls) -> "BrokerClient":
        """Starts the helper (a fresh ``python -I -S``: standard library only)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _BROKER_SCRIPT, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(ours, proc)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def call(self, op: str, **args) -> tuple[dict, list[int]]:
        body = json.dumps({"op": op, **args}).encode()
        with self._lock:
            self.sock.send(body)
            fds = array.array("i")
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                _MAX_MSG, socket.CMSG_SPACE(4 * fds.itemsize))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not data:
            raise OSError(errno.EPIPE, "the sandbox's helper is gone")
        reply = json.loads(data)
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise OSError(reply.get("errno") or errno.EIO, reply.get("error", "refused"))
        return reply, list(fds)

    def set_policy(self, **policy) -> None:
        self.call("policy", **policy)

    def _one_fd(self, op: str, **args) -> int:
        _, fds = self.call(op, **args)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EPROTO, f"the sandbox's helper sent {len(fds)} fds for {op}")
        return fds[0]

    def close(self) -> None:
        self.sock.close()


_client: BrokerClient | None = None
#: back-end kinds the process's seccomp filter allows (None: not sandboxed)
_kinds: frozenset[str] | None = None
_program: str | None = None


def activate(client: BrokerClient | None, kinds, program: str) -> None:
    """Called by the sandbox once it is entered."""
    global _client, _kinds, _program
    _client = client
    _kinds = frozenset(kinds)
    _program = program


def sandboxed() -> bool:
    return _kinds is not None


def brokered() -> bool:
    return _client is not None


# -- the hooks -----------------------------------------------------------------------------

def bind_unix(path: str, *, mode: int | None = None,
              gid: int | None = None) -> socket.socket | None:
    """A listening socket made by the helper (with that group and mode), or
    None: bind it yourself."""
    if _client is None:
        return None
    return socket.socket(fileno=_client._one_fd("bind", path=path, mode=mode, gid=gid))


def group_id(name: str) -> int:
    """A group's id by name (KeyError if there is none); sandboxed, the
    helper looks it up, as the confined process has no /etc/group."""
    if _client is None:
        return grp.getgrnam(name).gr_gid
    try:
        reply, _ = _client.call("group", name=name)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise KeyError(name) from None
        raise
    return reply["gid"]


def unlink_socket(path: str) -> None:
    """Removes a socket file this process made (OSError if it can't)."""
    if _client is None:
        if _kinds is None:
            os.unlink(path)
        return                  # sandboxed, no helper: the file isn't reachable
    _client.call("unlink", path=path)


def connect_unix(path: str) -> socket.socket | None:
    """A socket connected to ``path`` by the helper, or None: connect it yourself."""
    if _client is None:
        return None
    return socket.socket(fileno=_client._one_fd("connect", path=path))


def open_image(path: str, flags: int) -> int:
    """``os.open(path, flags)`` of a disk image."""
    if _client is None:
        return os.open(path, flags)
    return _client._one_fd("open", path=path, read_only=(flags & os.O_ACCMODE) == os.O_RDONLY,
                           direct=bool(flags & os.O_DIRECT))


def stat(path: str):
    """``os.stat(path)``; through the helper only st_mode and st_size."""
    if _client is None:
        return os.stat(path)
    reply, _ = _client.call("stat", path=path)
    return types.SimpleNamespace(st_mode=reply["mode"], st_size=reply["size"])


def isdir(path: str) -> bool:
    """``os.path.isdir``, but a refusal by the helper is an OSError."""
    if _client is None:
        return os.path.isdir(path)
    try:
        return stat_mod.S_ISDIR(stat(path).st_mode)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise


def open_tun(ifname: str, ifr_flags: int) -> int:
    """/dev/net/tun attached to TAP ``ifname`` (TUNSETIFF with ``ifr_flags``)."""
    if _client is None:
        import fcntl
        import struct
        from ..net.backends import TUNSETIFF
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), ifr_flags))
        except BaseException:
            os.close(fd)
            raise
        return fd
    return _client._one_fd("tun", ifname=ifname, flags=ifr_flags)


def export_kind(spec_type: str, source: str, value) -> str:
    """The sandbox's name for the back-end kind of a daemon export."""
    from .policy import KINDS
    source = {"blk_file": "file"}.get(source, source)     # the spec key names the option
    if spec_type == "net" and source == "backend":
        return "null" if value == "null" else "python"
    # a source registered by someone else (specs.register_blk_source) runs
    # Python of theirs: the sandbox knows nothing more about it
    return source if source in KINDS else "python"


def refuses_kind(kind: str) -> str | None:
    """Why this process can't serve a back-end of ``kind`` (its filter was
    fixed at start without it), or None."""
    if _kinds is None or kind in _kinds:
        return None
    return (f"back-end kind {kind!r} isn't in this sandboxed {_program}'s seccomp filter "
            f"(fixed at start: {', '.join(sorted(_kinds))}); start it with --backends "
            f"including {kind}, or --sandbox off")
