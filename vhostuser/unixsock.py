"""Listening unix sockets made race-free, with a group and a mode.

Standard library only, and no package imports: the sandbox's helper
process (vhostuser/sandbox/broker.py, run isolated) loads this file by path
to make sockets for a confined program exactly as an unconfined one makes
them. Errors are OSErrors with an errno; vhostuser.server turns them into
its own exceptions.
"""
import contextlib
import errno
import os
import socket
import stat
import tempfile

#: Longest unix socket path (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
#: Mode of a socket made without a mode: only its owner may connect.
PRIVATE_MODE = 0o600
#: Mode of a socket given to a group without a mode: the group may connect.
GROUP_MODE = 0o660


def check_existing(path: str) -> bool:
    """True if a stale socket file (nobody accepts on it) is at path; False
    if nothing is. OSError(EADDRINUSE) for a live socket, OSError(EEXIST)
    for something that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        return True     # stale: its process is gone
    else:
        raise OSError(errno.EADDRINUSE, f"{path}: another process is serving this socket")
    finally:
        probe.close()


def bind_unix(path: str, *, mode=None, gid=None) -> socket.socket:
    """A listening socket at ``path``, with group ``gid`` (default: the
    process's) and permissions ``mode`` (default 0600, or 0660 with a gid).

    Race-free: the socket is bound in a new private directory (0700) next
    to ``path``, given its group and mode, set listening, and only then
    linked at ``path`` (or renamed over a stale socket file there, in one
    step). So whoever finds a socket at ``path`` finds it listening, with
    its final owner and mode: never a window where it refuses, or is wider
    or narrower than asked, or belongs to the wrong group. A live socket at
    ``path`` is OSError(EADDRINUSE); a stale one is replaced."""
    if mode is None:
        mode = PRIVATE_MODE if gid is None else GROUP_MODE
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH:
        raise OSError(errno.ENAMETOOLONG, f"{path}: socket path too long ({length} bytes, "
                                          f"at most {MAX_SOCKET_PATH})")
    stale = check_existing(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        private = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    except FileNotFoundError:
        raise OSError(errno.ENOENT, f"{path}: directory {parent} does not exist") from None
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: can't make a socket in {parent}: "
                                 f"{exc.strerror}") from None
    dir_fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        name = os.path.join(private, "s")
        if len(os.fsencode(name)) > MAX_SOCKET_PATH:
            name = f"/proc/self/fd/{dir_fd}/s"    # the same file, by a short path
        sock.bind(name)
        bound = True
        if gid is not None:
            try:
                os.chown("s", -1, gid, dir_fd=dir_fd, follow_symlinks=False)
            except PermissionError:
                raise OSError(errno.EPERM, f"{path}: can't give the socket to group {gid}: "
                                           "only root or a member of that group may") from None
        os.chmod("s", mode, dir_fd=dir_fd)
        sock.listen(4)
        if stale:
            os.rename("s", path, src_dir_fd=dir_fd)     # replaces the stale file atomically
        else:
            try:
                # link, unlike rename, never replaces what another process
                # bound there meanwhile
                os.link("s", path, src_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                check_existing(path)        # EADDRINUSE if it is live
                os.rename("s", path, src_dir_fd=dir_fd)
            os.unlink("s", dir_fd=dir_fd)
    except BaseException:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink("s", dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return sock
