"""The sandbox's helper: a small process that keeps the privileges and the
filesystem the sandboxed program gave up, and does for it the few things
that need them, each checked against a policy fixed before the program
was sandboxed.

It runs as ``python -I -S broker.py FD`` (standard library only, nothing
of vhostuser imported), started before the program's mount namespace
exists, and serves one SOCK_SEQPACKET socket: each request is one JSON
object, each reply one JSON object, with descriptors attached as
SCM_RIGHTS. The first request is the policy (``{"op": "policy", ...}``,
sent while the program is still trusted: before it serves anyone); after
it, the operations are:

``bind`` {path, mode, gid} -> a listening unix socket made race-free with
    that group and mode (vhostuser/unixsock.py; a stale socket file is
    replaced, a live one refused), if ``path`` is registered or its
    directory is under an allowed directory.
``unlink`` {path} -> removes a socket file registered or bound here, and
    only while it is still that socket (same device and inode).
``connect`` {path} -> a unix socket connected to ``path``, if registered.
``open`` {path, read_only, direct} -> a regular file or block device under
    an allowed directory (the path as opened is checked, so a symlink
    can't lead out).
``stat`` {path} -> {"mode", "size"} of a path under an allowed directory.
``group`` {name} -> {"gid"} of a group name.
``tun`` {ifname, flags} -> /dev/net/tun attached (TUNSETIFF) to a TAP whose
    name matches an allowed pattern.

Errors come back as ``{"ok": false, "errno": N, "error": "..."}``. The
helper exits when the program's end of the socket closes (the program
ended, however it ended); it ignores SIGINT, SIGTERM and SIGHUP, which
are the program's to handle.
"""
import array
import errno
import fcntl
import fnmatch
import json
import os
import signal
import socket
import stat
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000
#: the only TUNSETIFF flags a TAP back-end asks for
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR
MAX_MSG = 1 << 16


def _load_unixsock():
    """vhostuser/unixsock.py, by path: sockets made here exactly as an
    unconfined program makes them (race-free, with their group and mode)
    without importing the package, which this process never does."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "unixsock.py")
    spec = importlib.util.spec_from_file_location("vhostuser_unixsock", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unixsock = _load_unixsock()


class Refused(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def _under(path, dirs):
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


class Broker:
    def __init__(self):
        self.policy = None
        self.sockets = {}     # path -> (dev, ino) of sockets we may unlink or bind again
        self.connect = set()
        self.dirs = []
        self.taps = []

    # -- policy ------------------------------------------------------------------------
    def set_policy(self, req):
        if self.policy is not None:
            raise Refused(errno.EPERM, "the policy is set once, before the sandbox")
        self.policy = req
        self.dirs = [os.path.realpath(d) for d in req.get("dirs", [])]
        self.taps = list(req.get("taps", []))
        self.connect = set(req.get("connect", []))
        for path, ident in req.get("sockets", {}).items():
            self.sockets[path] = tuple(ident) if ident else None
        return {}

    def _allowed_dir(self, path, what):
        if not os.path.isabs(path):
            raise Refused(errno.EINVAL, f"{path}: not an absolute path")
        real = os.path.realpath(path)
        if not _under(real, self.dirs):
            where = ", ".join(self.dirs) if self.dirs else "none given"
            raise Refused(errno.EACCES, f"outside the directories the sandboxed daemon may "
                                        f"use (--allow-dir: {where})")
        return real

    # -- operations --------------------------------------------------------------------
    def op_bind(self, req):
        path = req["path"]
        if path not in self.sockets:
            self._allowed_dir(os.path.dirname(path) or "/", "bind sockets in")
        try:
            sock = unixsock.bind_unix(path, mode=req.get("mode"), gid=req.get("gid"))
        except OSError as exc:
            raise Refused(exc.errno or errno.EIO, exc.strerror or str(exc)) from None
        st = os.lstat(path)
        self.sockets[path] = (st.st_dev, st.st_ino)
        return {}, [sock]

    def op_unlink(self, req):
        path = req["path"]
        if path not in self.sockets:
            raise Refused(errno.EACCES, f"{path}: not a socket this program made")
        ident = self.sockets[path]
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return {"removed": False}
        if not stat.S_ISSOCK(st.st_mode) or (ident and (st.st_dev, st.st_ino) != ident):
            return {"removed": False}        # someone else's now: leave it
        os.unlink(path)
        return {"removed": True}

    def op_connect(self, req):
        path = req["path"]
        if path not in self.connect:
            raise Refused(errno.EACCES, f"{path}: not a socket this program may connect to")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return {}, [sock]

    def op_open(self, req):
        path = req["path"]
        real = self._allowed_dir(path, "open images in")
        flags = (os.O_RDONLY if req.get("read_only") else os.O_RDWR) | os.O_CLOEXEC
        flags |= os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
        if req.get("direct"):
            flags |= os.O_DIRECT
        fd = os.open(real, flags)
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if not _under(opened, self.dirs):
                raise Refused(errno.EACCES, "leads out of the allowed directories")
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise Refused(errno.EINVAL, "not a regular file or block device")
            # Blocking from here on, like an image opened by the program.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return {}, [fd]

    def op_stat(self, req):
        path = req["path"]
        self._allowed_dir(path, "open images in")
        st = os.stat(path)
        return {"mode": st.st_mode, "size": st.st_size}

    def op_group(self, req):
        """A group name to its id (the confined program has no /etc/group)."""
        import grp
        name = req["name"]
        try:
            return {"gid": grp.getgrnam(name).gr_gid}
        except KeyError:
            raise Refused(errno.ENOENT, f"no group named {name!r}") from None

    def op_tun(self, req):
        name = req["ifname"]
        if not any(fnmatch.fnmatchcase(name, p) for p in self.taps):
            pats = ", ".join(self.taps) if self.taps else "none given"
            raise Refused(errno.EACCES, f"TAP {name}: not a name the sandboxed daemon may "
                                        f"open (--allow-tap: {pats})")
        flags = int(req["flags"])
        if flags & ~TAP_FLAGS or not flags & IFF_TAP:
            raise Refused(errno.EINVAL, f"TAP flags {flags:#x}: only IFF_TAP, IFF_NO_PI, "
                                        "IFF_VNET_HDR and IFF_MULTI_QUEUE")
        if not 0 < len(name.encode()) < 16 or "/" in name:
            raise Refused(errno.EINVAL, f"{name!r} is not an interface name")
        ifr = struct.pack("16sH22x", name.encode(), flags)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except BaseException:
            os.close(fd)
            raise
        return {}, [fd]

    def handle(self, req):
        op = req.get("op")
        if op == "policy":
            return self.set_policy(req), []
        if self.policy is None:
            raise Refused(errno.EPERM, "no policy yet")
        fn = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if fn is None:
            raise Refused(errno.EINVAL, f"unknown operation {op!r}")
        result = fn(req)
        return result if isinstance(result, tuple) else (result, [])


def _fileno(x):
    return x if isinstance(x, int) else x.fileno()


def serve(sock):
    broker = Broker()
    while True:
        try:
            data = sock.recv(MAX_MSG)
        except InterruptedError:
            continue
        if not data:
            return
        fds = []
        try:
            req = json.loads(data)
            if not isinstance(req, dict):
                raise Refused(errno.EINVAL, "a request is a JSON object")
            reply, fds = broker.handle(req)
            reply = {"ok": True, **reply}
        except Refused as exc:
            reply = {"ok": False, "errno": exc.code, "error": str(exc)}
        except OSError as exc:
            reply = {"ok": False, "errno": exc.errno or errno.EIO,
                     "error": f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror}"}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"ok": False, "errno": errno.EINVAL, "error": f"bad request: {exc}"}
        body = json.dumps(reply).encode()
        try:
            if fds:
                sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [_fileno(f) for f in fds]))])
            else:
                sock.send(body)
        except OSError:
            return
        finally:
            for f in fds:
                if isinstance(f, int):
                    os.close(f)
                else:
                    f.close()


def main():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    try:
        serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    main()
