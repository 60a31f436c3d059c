"""A file whose writeback fails in the kernel, as on a disk that lost
sectors: ext4 on a loop device whose backing file lives on a small tmpfs.
arm() punches the image's blocks out of that backing file and fills the
tmpfs, so the loop device can't store them again: the kernel's writeback
of the image's pages fails (ENOSPC from the loop device, EIO for ext4),
and fdatasync reports it, once per open file, as it does for a real disk.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

MIB = 1 << 20


class Unavailable(Exception):
    """This machine can't make one (not root, no loop devices, no tools)."""


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


class LostWritesFs:
    """``image``: a file of ``image_size`` bytes of ``fill``, synced, on
    ext4 at ``mnt``; writes to it are lost from arm() on."""

    def __init__(self, workdir: str, image_size: int = MIB, fill: bytes = b"o"):
        self.store = os.path.join(workdir, "store")     # the tmpfs
        self.mnt = os.path.join(workdir, "mnt")
        self.backing = os.path.join(self.store, "backing.img")
        self.image = os.path.join(self.mnt, "disk.img")
        self.image_size = image_size
        self.fill = fill
        self.loop: str | None = None
        self.extents: list[tuple[int, int, int]] = []  # (file block, disk block, blocks)
        self._mounted: list[str] = []

    def setup(self) -> "LostWritesFs":
        if os.geteuid() != 0:
            raise Unavailable("needs root (mount, losetup)")
        for tool in ("losetup", "mkfs.ext4", "mount", "umount", "filefrag"):
            if not shutil.which(tool):
                raise Unavailable(f"no {tool}")
        os.makedirs(self.store)
        os.makedirs(self.mnt)
        _run("mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", self.store)
        self._mounted.append(self.store)
        with open(self.backing, "wb") as f:           # every block allocated
            f.write(bytes(48 * MIB))
        self.loop = _run("losetup", "-f", "--show", self.backing).strip()
        _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.loop)
        _run("mount", self.loop, self.mnt)
        self._mounted.append(self.mnt)
        fd = os.open(self.image, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.write(fd, self.fill * self.image_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.extents = self._extents()
        return self

    def _extents(self) -> list[tuple[int, int, int]]:
        out = _run("filefrag", "-v", "-b4096", self.image)
        # " 0:        0..     255:      34816..     35071:    256:  last,eof"
        found = [(int(a), int(c), int(b) - int(a) + 1) for a, b, c, _ in re.findall(
            r"^\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*(\d+)\.\.\s*(\d+):", out, re.M)]
        if sum(n for _, _, n in found) * 4096 < self.image_size:
            raise Unavailable(f"filefrag: no extents of {self.image} in {out!r}")
        return found

    def arm(self) -> None:
        """From now on the image's blocks can't be written back."""
        for _, disk, count in self.extents:
            _run("fallocate", "--punch-hole", "--offset", str(disk * 4096),
                 "--length", str(count * 4096), self.backing)
        fd = os.open(os.path.join(self.store, "filler"), os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            while True:
                os.write(fd, bytes(MIB))
        except OSError:         # full: nothing left for the punched blocks
            pass
        finally:
            os.close(fd)

    def on_disk(self, offset: int, length: int) -> bytes:
        """What the storage under the file system holds for the image's
        bytes [offset, offset + length) (within one extent)."""
        for file_block, disk, count in self.extents:
            if file_block * 4096 <= offset < (file_block + count) * 4096:
                with open(self.backing, "rb") as f:
                    f.seek(disk * 4096 + offset - file_block * 4096)
                    return f.read(length)
        raise ValueError(f"offset {offset} is not in the image")

    def remove(self) -> None:
        for where in reversed(self._mounted):
            subprocess.run(["umount", "-l", where], capture_output=True)
            if where == self.mnt and self.loop:
                subprocess.run(["losetup", "-d", self.loop], capture_output=True)
        self._mounted.clear()

