"""qemu-storage-daemon as a third-party vhost-user-blk back-end.

Each test gets its own daemon and image: starting one takes milliseconds,
and a test that makes it panic cannot spoil the next.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest

QSD = shutil.which("qemu-storage-daemon")
IMAGE_SIZE = 64 << 20


@dataclass
class QsdExport:
    """A running qemu-storage-daemon exporting ``image`` at ``socket``."""
    socket: str
    image: str
    size: int
    num_queues: int
    proc: subprocess.Popen
    log_path: str
    sockdir: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def image_bytes(self, offset: int, length: int) -> bytes:
        """What the host sees in the image file (qsd uses the page cache)."""
        with open(self.image, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(tmp_path, *, num_queues: int = 2, size: int = IMAGE_SIZE,
           writable: bool = True) -> QsdExport:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(size)
    # Unix socket paths must stay under 108 bytes; tmp_path can be longer.
    sockdir = tempfile.mkdtemp(prefix="qsd-", dir="/tmp")
    sock = os.path.join(sockdir, "vhost.sock")
    log_path = str(tmp_path / "qsd.log")
    cmd = [QSD,
           "--blockdev", f"driver=file,node-name=file0,filename={image},discard=unmap",
           "--blockdev", "driver=raw,node-name=raw0,file=file0,discard=unmap",
           "--export", f"type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                       f"addr.path={sock},writable={'on' if writable else 'off'},"
                       f"num-queues={num_queues}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    export = QsdExport(sock, str(image), size, num_queues, proc, log_path, sockdir)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if not export.alive() or time.monotonic() > deadline:
            export.stop()
            pytest.fail(f"qemu-storage-daemon did not start:\n{export.log()}")
        time.sleep(0.01)
    return export


@pytest.fixture
def qsd_factory(tmp_path):
    """start(**options) -> QsdExport; every daemon is stopped after the test
    and its log printed (pytest shows it when the test failed)."""
    started: list[QsdExport] = []

    def start(**options) -> QsdExport:
        if QSD is None:
            pytest.skip("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
        path = tmp_path / f"qsd{len(started)}"
        path.mkdir()
        export = _start(path, **options)
        started.append(export)
        return export

    yield start
    for export in started:
        export.stop()
        shutil.rmtree(export.sockdir, ignore_errors=True)
        log = export.log()
        if log:
            print(f"--- qemu-storage-daemon log ({export.socket}) ---\n{log}")


@pytest.fixture
def qsd(qsd_factory) -> QsdExport:
    """One writable export of a 64 MiB raw image with two queues."""
    return qsd_factory()
