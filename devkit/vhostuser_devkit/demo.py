"""The README's first command: serve a fresh image with vhostuser-blk and
boot a small Linux guest on it, printing what the guest did.

    python -m vhostuser.demo [--keep DIR]

The guest (a Debian kernel and a busybox initramfs, built once and cached)
makes an ext4 file system, writes and re-reads files, does O_DIRECT I/O,
discards, and flushes in write-back mode; afterwards the image is checked
from the host.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import guest

MIB = 1 << 20
TAG = "demo"


def say(text: str) -> None:
    print(text, flush=True)


def start_backend(image: Path, sock: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", str(sock),
               "--blk-file", str(image), "--queues", "2", "--serial", "vhostuser-demo", "-v"]
    say("$ " + " ".join(["vhostuser-blk", *command[3:]]))
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=out)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vhostuser-blk did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vhostuser.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", metavar="DIR", help="keep the image and logs in DIR")
    args = parser.parse_args(argv)

    say("== building (or reusing) the guest: Debian's kernel + a busybox initramfs")
    kit = guest.build_guest()
    say(f"   kernel {kit.kernel_version}")
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vhostuser-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    say(f"== a fresh 64 MiB image: {image}")
    sock = workdir / "blk.sock"
    log = workdir / "vhostuser-blk.log"
    backend = start_backend(image, sock, log)
    try:
        say("== booting the guest under QEMU (TCG) with -device vhost-user-blk-pci,num-queues=2")
        result = guest.run_guest(kit, guest.blk_workload_basic(TAG), blk_sockets=[str(sock)],
                                 num_queues=2, smp=2, timeout=180)
    finally:
        backend.send_signal(signal.SIGTERM)
        status = backend.wait(15)
    say("== what the guest printed:")
    for line in result.serial.splitlines():
        if line.startswith(("RESULT", "STEP", "VHOSTUSER")):
            say("   " + line)
    say(f"== vhostuser-blk exited with status {status} after SIGTERM")

    results = result.results()
    expected = hashlib.sha256(guest.sector_pattern(f"{TAG}-direct", 2048)).hexdigest()
    with open(image, "rb") as f:
        f.seek(40 * MIB)
        on_disk = hashlib.sha256(f.read(MIB)).hexdigest()
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    checks = {
        "guest workload finished": result.exit_code == 0 and results.get("done") == "1",
        "O_DIRECT data is in the image at 40 MiB": on_disk == expected,
        "ext4 is clean (e2fsck -fn on the host)": fsck.returncode == 0,
        "discarded range reads back as zeroes": results.get("discard_zero") == "1",
        "back-end exited cleanly": status == 0,
    }
    say("== checks on the host:")
    for name, ok in checks.items():
        say(f"   [{'ok' if ok else 'FAILED'}] {name}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
