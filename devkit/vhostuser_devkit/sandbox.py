"""Looking at a sandboxed back-end from outside, as an operator would:
/proc/PID/status (Seccomp, NoNewPrivs, Uid, Gid, capabilities) and
/proc/PID/root (what its filesystem view holds)."""
from __future__ import annotations

import os
import time

#: /proc/PID/status "Seccomp:" value of a process under a filter
SECCOMP_FILTER = 2


def proc_status(pid: int, task: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status"
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def wait_sandboxed(pid: int, timeout: float = 20.0, filters: int = 1) -> dict[str, str]:
    """The status once the process is under its filter (it enters the
    sandbox just after its socket appears). ``filters``: how many filters
    make it sandboxed (a process started under someone else's filter is in
    filter mode before it loads its own)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = proc_status(pid)
        except FileNotFoundError:
            raise AssertionError(f"process {pid} is gone") from None
        if status["State"].startswith(("Z", "X")):
            raise AssertionError(f"process {pid} exited (Seccomp: {status['Seccomp']})")
        if (int(status.get("Seccomp", "0")) == SECCOMP_FILTER
                and int(status.get("Seccomp_filters", "1")) >= filters):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} not under a seccomp filter after {timeout}s: "
                                 f"{status}")
        time.sleep(0.05)


def ids(status: dict[str, str], key: str) -> set[int]:
    """The distinct real/effective/saved/filesystem ids of Uid or Gid."""
    return {int(x) for x in status[key].split()}


def caps(status: dict[str, str]) -> dict[str, int]:
    return {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def view(pid: int) -> list[str]:
    """Walks the process's root (through /proc/PID/root): every path in
    its filesystem view, relative, sorted."""
    root = f"/proc/{pid}/root"
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            out.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(out)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the sandbox's helper)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def fd_targets(pid: int) -> list[str]:
    """What each of the process's open fds points at (/proc/PID/fd links).
    An fd closed between the listing and its readlink is left out: the
    program may still be closing a client's fds when this looks."""
    fd_dir = f"/proc/{pid}/fd"
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(f"{fd_dir}/{fd}"))
        except FileNotFoundError:
            continue
    return targets
