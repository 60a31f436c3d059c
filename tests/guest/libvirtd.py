"""A private libvirtd (and its virtlogd) for a test, started the way an
administrator without systemd starts them (``virtlogd -d; libvirtd -d``),
with the distribution's binaries and configuration.

So that it neither sees nor disturbs a libvirtd the machine may already
run, it lives in a mount namespace of its own (``unshare -m``) in which
``/etc/libvirt`` (a copy), ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/log/libvirt`` and ``/var/cache/libvirt`` are directories of the
test's. Everything else (QEMU, users, groups, the guest's files and the
back-ends' sockets) is the host's, and libvirtd is the privileged
``qemu:///system`` one: it runs QEMU as ``libvirt-qemu`` as in production.
``virsh`` talks to it through its socket (``?socket=``).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

#: what the namespace replaces: host directory -> name under the state dir
PRIVATE_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}
TOOLS = ("libvirtd", "virtlogd", "virsh", "unshare")

# Without systemd (machined) and cgroup delegation there is nothing for
# libvirt's cgroup placement to use, and a container may refuse it.
QEMU_CONF_EXTRA = """
# added by the test harness: no cgroups (no systemd here)
cgroup_controllers = [ ]
"""


def missing() -> list[str]:
    """Tools or accounts this needs that the machine lacks."""
    gone = [t for t in TOOLS if shutil.which(t) is None]
    try:
        import pwd
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        gone.append("user libvirt-qemu (package libvirt-daemon-system)")
    return gone


class VirshError(AssertionError):
    pass


class Libvirtd:
    """``with Libvirtd(state_dir) as lv: lv.virsh("list")``."""

    def __init__(self, state: Path):
        self.state = Path(state)
        self.uri = f"qemu:///system?socket={self.state / 'run' / 'libvirt-sock'}"
        self.holder: subprocess.Popen | None = None

    # -- start and stop -------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "Libvirtd":
        for sub in PRIVATE_DIRS.values():
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/libvirt", self.state / "etc", dirs_exist_ok=True, symlinks=True)
        # No network autostarts: this namespace shares the host's network.
        autostart = self.state / "etc" / "qemu" / "networks" / "autostart"
        shutil.rmtree(autostart, ignore_errors=True)
        autostart.mkdir(parents=True)
        with open(self.state / "etc" / "qemu.conf", "a") as f:
            f.write(QEMU_CONF_EXTRA)
        with open(self.state / "etc" / "libvirtd.conf", "a") as f:
            f.write('\nlog_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        mounts = []
        for host, sub in PRIVATE_DIRS.items():
            os.makedirs(host, exist_ok=True)          # the mount point
            mounts.append(f"mount --bind {shlex.quote(str(self.state / sub))} {host}")
        # The shell stays as the namespace's holder: the daemons fork away
        # from it, and it waits until the test tells it to end (its stdin
        # closes).
        script = " && ".join([
            "mount --make-rprivate /", *mounts,
            f"virtlogd -d --pid-file {shlex.quote(str(self._pidfile('virtlogd')))}",
            f"libvirtd -d --pid-file {shlex.quote(str(self._pidfile('libvirtd')))}",
            "echo started", "cat > /dev/null"])
        self.log = open(self.state / "harness.log", "w+b")
        self.holder = subprocess.Popen(["unshare", "-m", "sh", "-c", script],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=self.log)
        line = self.holder.stdout.readline()
        if line.strip() != b"started":
            self.stop()
            raise RuntimeError(f"libvirtd did not start: {self.harness_log()}")
        deadline = time.monotonic() + timeout
        while True:
            r = self.virsh("version", check=False)
            if r.returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirtd not answering: {r.stderr}\n{self.daemon_logs()}")
            time.sleep(0.2)

    def _pidfile(self, name: str) -> Path:
        return self.state / f"{name}.pid"

    def _pid(self, name: str) -> int | None:
        try:
            return int(self._pidfile(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        """Destroys every running domain, then stops libvirtd and virtlogd
        (the processes whose pid files are in our run directory)."""
        if self.holder is None:
            return
        r = self.virsh("list", "--name", check=False)
        for name in r.stdout.split() if r.returncode == 0 else []:
            self.virsh("destroy", name, check=False)
        for daemon in ("libvirtd", "virtlogd"):
            pid = self._pid(daemon)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        try:
            self.holder.stdin.close()
            self.holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait()
        self.holder = None

    def __enter__(self) -> "Libvirtd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- use ---------------------------------------------------------------------
    def virsh(self, *args: str, check: bool = True, timeout: float = 120.0
              ) -> subprocess.CompletedProcess:
        r = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise VirshError(f"virsh {' '.join(args)}: {r.returncode}: {r.stderr.strip()}")
        return r

    def qemu_log(self, domain: str) -> str:
        try:
            return (self.state / "log" / "qemu" / f"{domain}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def harness_log(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def daemon_logs(self) -> str:
        try:
            text = (self.state / "log" / "libvirtd.log").read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        return self.harness_log() + "\n".join(text.splitlines()[-30:])
