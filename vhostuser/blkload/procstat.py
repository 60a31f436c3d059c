"""The back-end process's CPU time and memory, from /proc."""
from __future__ import annotations

import os
import time


def find_backend_pid(socket_path: str, exclude: int | None = None) -> int | None:
    """The process holding the listening unix socket bound to ``socket_path``
    (its inode from /proc/net/unix, then /proc/*/fd)."""
    target = os.path.abspath(socket_path)
    inodes = set()
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] in (socket_path, target):
                    inodes.add(parts[6])
    except OSError:
        return None
    if not inodes:
        # Bound elsewhere and then moved into place (vhostuser's sockets are,
        # so that no client sees them half set up): ask the socket itself.
        return _listener_pid(socket_path)
    links = {f"socket:[{i}]" for i in inodes}
    me = os.getpid() if exclude is None else exclude
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(f"{fd_dir}/{fd}") in links:
                        return int(entry)
                except OSError:
                    pass
        except OSError:
            pass
    return None


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread, living or exited (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def memory_kb(pid: int, image: str | None = None) -> dict:
    """VmHWM and VmRSS; with ``image``, also ``image_kb``: the resident pages
    of the process's mappings of that file. A back-end reading a tmpfs image
    through a mapping has the image's page cache in its RSS, though those
    pages belong to the file (they are there, and counted once, whoever
    reads it): ``VmRSS - image_kb`` is the memory the process itself uses."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    if image is not None:
        out["image_kb"] = _mapping_rss_kb(pid, os.path.realpath(image))
    return out


def _mapping_rss_kb(pid: int, path: str) -> int:
    total = 0
    current = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                current = len(head) == 6 and head[5].strip() == path
            elif current and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


class BackendProbe:
    def __init__(self, pid: int):
        self.pid = pid

    def sample(self) -> tuple[float, float]:
        return time.monotonic(), cpu_seconds(self.pid)

    def report(self, before, after, ios: int) -> dict:
        wall = after[0] - before[0]
        cpu = after[1] - before[1]
        mem = memory_kb(self.pid)
        return {"pid": self.pid, "cpu_s": round(cpu, 3),
                "cpu_pct": round(100 * cpu / wall, 1) if wall > 0 else 0.0,
                "cpu_us_per_io": round(cpu * 1e6 / ios, 2) if ios else None,
                "peak_rss_kb": mem.get("VmHWM"), "rss_kb": mem.get("VmRSS")}


def idle_cpu(pid: int, seconds: float) -> float:
    """CPU seconds the process used over ``seconds`` of doing nothing."""
    c0 = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - c0


def _listener_pid(socket_path: str) -> int | None:
    """The process listening on ``socket_path``, from a connection's peer
    credentials (the back-end sees one short connection)."""
    import socket
    import struct
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(socket_path)
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0] or None
    except OSError:
        return None
