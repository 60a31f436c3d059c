"""Fixtures for tests that boot a real Linux guest under QEMU (TCG).

The guest kit (kernel + initramfs, see ``vhostuser_devkit.guest``) is built
once per session and cached in ``$VHOSTUSER_GUEST_CACHE`` (default
``~/.cache/vhostuser/guest``).  Tests skip only when ``qemu-system-x86_64``
is missing; a failing kit build is an error, not a skip.

A test that takes the ``qemu`` argument runs once per QEMU (``qemus.py``):
Debian's own (``[qemu-7.2]``) and QEMU 10 from bookworm-backports
(``[qemu-10.0]``), and passes it to ``GuestProcess``/``run_guest``.  Without
the backport unpacked (``./dev.sh setup``) its runs skip, or fail when
``$VHOSTUSER_REQUIRE_QEMUS`` is set (``./dev.sh test`` sets it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

try:
    from vhostuser_devkit import guest as guest_mod
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vhostuser_devkit import guest as guest_mod

import qemus  # noqa: E402  (tests/guest/qemus.py)

QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"
SOCKET_WAIT = 15.0


def pytest_collection_modifyitems(config, items):
    """Skip every test in this directory when QEMU is not installed."""
    if shutil.which(QEMU):
        return
    skip = pytest.mark.skip(reason=f"{QEMU} not installed (./dev.sh setup installs it)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


_QEMU_PARAMS: list | None = None


def _qemu_params() -> list:
    """One pytest.param per QEMU, with its version as the id."""
    global _QEMU_PARAMS
    if _QEMU_PARAMS is None:
        params = []
        system = qemus.system_qemu()
        if system is not None:
            params.append(pytest.param(system, id=system.label))
        backport = qemus.backport_qemu()
        if backport is not None:
            params.append(pytest.param(backport, id=backport.label))
        elif os.environ.get("VHOSTUSER_REQUIRE_QEMUS"):
            params.append(pytest.param(None, id="qemu-10"))   # the fixture fails
        else:
            params.append(pytest.param(None, id="qemu-10", marks=pytest.mark.skip(
                reason="QEMU 10 not unpacked (./dev.sh setup, or python3 tests/guest/qemus.py fetch)")))
        _QEMU_PARAMS = params
    return _QEMU_PARAMS


def pytest_generate_tests(metafunc):
    if "qemu" in metafunc.fixturenames:
        metafunc.parametrize("qemu", _qemu_params(), indirect=True)


@pytest.fixture
def qemu(request) -> guest_mod.Qemu:
    """The QEMU this run of the test boots its guests with."""
    if request.param is None:
        pytest.fail("QEMU 10 is not unpacked: run ./dev.sh setup (python3 tests/guest/qemus.py fetch)")
    return request.param


@pytest.fixture(scope="session")
def guest_kit() -> guest_mod.GuestKit:
    """The guest kernel + base initramfs, built once and cached."""
    return guest_mod.build_guest()


@pytest.fixture
def sock_dir():
    """A short temporary directory for unix sockets (paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vhu-sock-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class StorageDaemon:
    """A qemu-storage-daemon exporting one raw image as vhost-user-blk."""

    def __init__(self, image: Path, sock: Path, num_queues: int = 2, log: Path | None = None) -> None:
        self.image = image
        self.sock = sock
        self.log = log or sock.with_suffix(".log")
        self.command = [
            QSD,
            "--blockdev", f"driver=file,node-name=file0,filename={image},discard=unmap",
            "--blockdev", "driver=raw,node-name=raw0,file=file0,discard=unmap",
            "--export", "type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues={num_queues}",
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> "StorageDaemon":
        """Start the daemon and wait until its socket accepts connections."""
        if shutil.which(QSD) is None:
            pytest.fail(f"{QSD} not installed (package qemu-system-common)")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + SOCKET_WAIT
        while not self._listening():
            if self.process.poll() is not None:
                pytest.fail(f"{QSD} exited with {self.process.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{QSD} did not listen on {self.sock} within {SOCKET_WAIT}s")
            time.sleep(0.05)
        return self

    def _listening(self) -> bool:
        # Probing with a connect is harmless: qsd drops a client that sends nothing.
        if not self.sock.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.sock))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """Terminate the daemon (SIGTERM, then SIGKILL) so the image is quiescent."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def qsd(sock_dir):
    """Factory: ``qsd(image, num_queues=2, sock=None)`` starts a daemon, stopped at teardown."""
    daemons: list[StorageDaemon] = []

    def start(image: Path, num_queues: int = 2, sock: Path | None = None) -> StorageDaemon:
        sock = Path(sock) if sock else sock_dir / f"qsd{len(daemons)}.sock"
        daemon = StorageDaemon(Path(image), sock, num_queues=num_queues)
        daemons.append(daemon)
        return daemon.start()

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def netns():
    """A network namespace of the test's own, deleted afterwards: the only
    place guest network tests send traffic to."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 not installed")
    name = f"vhu-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def raw_image(tmp_path) -> Path:
    """A sparse 64 MiB raw image."""
    path = tmp_path / "disk.raw"
    with open(path, "wb") as handle:
        handle.truncate(64 * guest_mod.MIB)
    return path


def pytest_report_header(config):
    cache = os.environ.get("VHOSTUSER_GUEST_CACHE") or str(guest_mod.default_cache_dir())
    found = [q for q in (qemus.system_qemu(), qemus.backport_qemu()) if q is not None]
    return [f"guest kit cache: {cache}",
            "guest QEMUs: " + (", ".join(f"{q.label} {q.binary}" for q in found) or "none")]
