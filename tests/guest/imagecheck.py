"""Looking at a raw image from the host, without mounting it."""
from __future__ import annotations

import hashlib
import subprocess

from vhostuser_devkit.guest import MIB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image(path, offset_mb: int, size_mb: int) -> bytes:
    with open(path, "rb") as image:
        image.seek(offset_mb * MIB)
        return image.read(size_mb * MIB)


def debugfs_cat(image, name: str) -> bytes:
    """A file out of the ext4 image (debugfs, from e2fsprogs)."""
    done = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True,
                          check=True)
    return done.stdout
