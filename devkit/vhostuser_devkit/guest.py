"""Boot a tiny Linux guest under QEMU (TCG) against vhost-user back-ends.

The guest is built from Debian packages, without installing anything into the
host's boot setup:

* the kernel is the ``vmlinuz`` of the newest plain ``linux-image-6.1.0-N-amd64``
  package, fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``;
* the initramfs holds the static ``/bin/busybox`` of ``busybox-static``, the few
  kernel modules needed for virtio-pci/blk/net and ext4 (plus their
  ``modules.dep`` dependencies), and a handful of host tools that busybox lacks
  (``mke2fs``/``e2fsck`` from e2fsprogs, ``blkdiscard`` from util-linux) copied
  together with their shared libraries.

Each run appends a second, tiny cpio archive holding ``/workload.sh`` to the
cached base archive (the kernel unpacks concatenated archives in order).  The
guest's ``/init`` runs the workload, prints ``VHOSTUSER-GUEST-EXIT=<rc>`` on the
serial console and powers off.

Only the standard library is used, so this module can be imported anywhere.
Typical use::

    kit = build_guest()
    result = run_guest(kit, BLK_WORKLOAD_BASIC, blk_sockets=["/tmp/blk.sock"])
    result.check()
    print(result.results())

Run ``python -m vhostuser_devkit.guest --help`` for a small command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterable, Sequence
from vhostuser.errors import VhostUserError

__all__ = [
    "BLK_WORKLOAD_BASIC",
    "BLK_WORKLOAD_VERIFY",
    "BOOT_MARKER",
    "QemuBlk",
    "EXIT_MARKER",
    "GuestBootFailed",
    "GuestBuildError",
    "GuestCrashed",
    "GuestError",
    "GuestKit",
    "GuestProcess",
    "GuestResult",
    "GuestTimeout",
    "GuestWorkloadFailed",
    "QemuNet",
    "Qemu",
    "blk_workload_basic",
    "blk_workload_verify",
    "build_guest",
    "default_cache_dir",
    "main",
    "qemu_command",
    "run_guest",
    "sector_pattern",
]

#: Line printed by ``/init`` once the modules are loaded, followed by the
#: guest's uptime in seconds.
BOOT_MARKER = "VHOSTUSER-GUEST-BOOTED"
#: Prefix of the line carrying the workload's exit status.
EXIT_MARKER = "VHOSTUSER-GUEST-EXIT="

#: Modules loaded at boot (dependencies are added from ``modules.dep``).
#: crc32c_generic is preloaded because ext4/jbd2 look the "crc32c" algorithm
#: up through the crypto API at mount time rather than via a symbol dependency.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4")

#: Host binaries copied into the guest (with their shared libraries), with the
#: extra names they are reachable under.  Busybox's mke2fs only makes ext2 and
#: its blkdiscard has no ``-z`` (write zeroes), hence the real tools.
GUEST_TOOLS = {
    "/sbin/mke2fs": ("mkfs.ext4", "mkfs.ext2", "mke2fs"),
    "/sbin/e2fsck": ("fsck.ext4", "fsck.ext2", "e2fsck"),
    "/usr/sbin/blkdiscard": ("blkdiscard",),
}
GUEST_CONFIG_FILES = ("/etc/mke2fs.conf",)

KERNEL_PACKAGE_RE = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$")
# cryptomgr.notests: the crypto self-tests cost ~0.3 s of emulated boot.
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1 oops=panic rdinit=/init cryptomgr.notests"
DEFAULT_TIMEOUT = 120.0
# After the exit marker the guest powers off at once; this only bounds a hang.
POWEROFF_GRACE = 15.0
POLL_INTERVAL = 0.05


# --------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------


class GuestError(VhostUserError, RuntimeError):
    """Base class of the errors raised by this module.

    ``serial_tail`` holds the end of the guest's serial console (empty when
    no guest ran), so a failing test shows what the guest printed.
    """

    def __init__(self, message: str, serial_tail: str = "") -> None:
        self.serial_tail = serial_tail
        if serial_tail:
            message = f"{message}\n--- guest serial (tail) ---\n{serial_tail}"
        super().__init__(message)


class GuestBuildError(GuestError):
    """The guest kernel/initramfs could not be built."""


class GuestBootFailed(GuestError):
    """QEMU ended (or the kernel panicked) before the guest's init ran."""


class GuestCrashed(GuestError):
    """The guest booted but QEMU ended without the workload's exit marker."""


class GuestTimeout(GuestError):
    """The guest did not finish in time; QEMU was killed."""


class GuestWorkloadFailed(GuestError):
    """The workload script exited with a non-zero status."""


# --------------------------------------------------------------------------
# cpio (newc) writer: the kernel's initramfs format
# --------------------------------------------------------------------------


class _CpioWriter:
    """Write a ``newc`` cpio archive, creating parent directories first."""

    def __init__(self, out) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = {""}

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0), nlink=1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % value for value in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._out.write(data + _pad4(len(data)))

    def _parents(self, name: str) -> None:
        parent = os.path.dirname(name)
        if parent not in self._dirs:
            self.directory(parent)

    def directory(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if name in self._dirs:
            return
        self._parents(name)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _write_cpio_atomically(path: Path, fill) -> None:
    """Create ``path`` by calling ``fill(writer)``; readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        writer = _CpioWriter(out)
        fill(writer)
        writer.finish()
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# The guest's /init
# --------------------------------------------------------------------------

_INIT_SCRIPT = f"""#!/bin/busybox sh
# Minimal init: mount the API filesystems, load modules, run /workload.sh.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
# insmod binds the drivers to the devices, so /dev/vd* exist afterwards.
while read -r ko; do
    insmod "$ko" || echo "init: insmod $ko failed"
done < /etc/vhostuser-guest/modules
ip link set lo up 2>/dev/null
echo "{BOOT_MARKER} uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /root
# Debian's busybox sh prefers its applets over $PATH (FEATURE_SH_STANDALONE);
# tools.sh defines functions so the copied e2fsprogs/util-linux tools win.
sh -c '. /etc/vhostuser-guest/tools.sh; . /workload.sh'
rc=$?
cd /
sync
echo "{EXIT_MARKER}$rc"
poweroff -f
echo o > /proc/sysrq-trigger
sleep 10
"""


# --------------------------------------------------------------------------
# The kit
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestKit:
    """A built guest: kernel, base initramfs and what went into them.

    ``kernel`` is the package's ``vmlinuz``.  ``vmlinux`` is the ELF image
    decompressed from that same file (``None`` if that failed); QEMU can boot
    it through its PVH entry point, skipping the firmware's real-mode setup and
    the in-guest decompression, which saves ~2 s per boot under TCG.
    """

    directory: Path
    kernel: Path
    vmlinux: Path | None
    initramfs: Path
    kernel_version: str
    package: str
    package_version: str
    modules: tuple[str, ...]
    builtin_modules: tuple[str, ...]

    def initramfs_with(self, workload: str, dest: Path | str | None = None) -> Path:
        """Return an initramfs that runs ``workload`` (a busybox sh script).

        The result is the base archive followed by a small archive holding
        ``/workload.sh``.  Without ``dest`` it is stored in the kit's cache,
        named after the workload's hash, so repeated runs reuse it.
        """
        data = workload.encode()
        if dest is None:
            digest = hashlib.sha256(data).hexdigest()[:16]
            runs = self.directory / "runs"
            runs.mkdir(exist_ok=True)
            dest = runs / f"initramfs-{digest}.cpio"
            if dest.exists():
                return dest
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with open(self.initramfs, "rb") as base, open(tmp, "wb") as out:
            shutil.copyfileobj(base, out)
            writer = _CpioWriter(out)
            writer.file("workload.sh", data, 0o755)
            writer.finish()
        os.replace(tmp, dest)
        return dest

    @classmethod
    def load(cls, directory: Path) -> "GuestKit":
        """Load a kit previously written by :func:`build_guest`."""
        meta = json.loads((directory / "kit.json").read_text())
        return cls(
            directory=directory,
            kernel=directory / "vmlinuz",
            vmlinux=directory / "vmlinux" if meta["vmlinux"] else None,
            initramfs=directory / "initramfs.cpio",
            kernel_version=meta["kernel_version"],
            package=meta["package"],
            package_version=meta["package_version"],
            modules=tuple(meta["modules"]),
            builtin_modules=tuple(meta["builtin_modules"]),
        )


def default_cache_dir() -> Path:
    """``$VHOSTUSER_GUEST_CACHE`` or ``~/.cache/vhostuser/guest``."""
    env = os.environ.get("VHOSTUSER_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vhostuser" / "guest"


def build_guest(cache_dir: Path | str | None = None) -> GuestKit:
    """Build the guest kit once and return it (cached in ``cache_dir``).

    The newest plain ``linux-image-6.1.0-N-amd64`` known to apt is used; if
    apt knows none (no package lists), the newest kit already in the cache is
    returned.  Raises :class:`GuestBuildError` when neither is possible.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        package = _newest_kernel_package()
        if package is None:
            return _newest_cached_kit(cache)
        name, version = package
        kit_dir = cache / _kit_name(name, version)
        if not (kit_dir / "kit.json").exists():
            _build_kit(kit_dir, name, version)
            _prune_other_kits(cache, kit_dir)
        os.utime(kit_dir / "kit.json")      # in use: not stale for a while
        return GuestKit.load(kit_dir)


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise builds across processes (e.g. parallel test workers)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _kit_name(package: str, version: str) -> str:
    """Cache key: the kernel package plus this module's source, so any change
    to the recipe (modules, tools, /init, build code) rebuilds the kit."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return f"{package}_{version}_{digest}"


#: A kit nobody built or used for this long is removed (~80 MB each). Not
#: sooner: another checkout (another version of this module) may be
#: booting guests from it right now.
KIT_UNUSED_FOR = 24 * 3600


def _prune_other_kits(cache: Path, keep: Path) -> None:
    """Remove kits left unused, once a new one is in place."""
    now = time.time()
    for meta in cache.glob("*/kit.json"):
        if meta.parent != keep and now - meta.stat().st_mtime > KIT_UNUSED_FOR:
            shutil.rmtree(meta.parent, ignore_errors=True)


def _newest_cached_kit(cache: Path) -> GuestKit:
    kits = sorted(cache.glob("*/kit.json"), key=lambda p: p.stat().st_mtime)
    if not kits:
        raise GuestBuildError(
            "no linux-image-6.1.0-*-amd64 package known to apt and no cached guest "
            f"in {cache}; run 'apt-get update' (./dev.sh setup installs it)"
        )
    return GuestKit.load(kits[-1].parent)


def _run(cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a build command, turning failures into :class:`GuestBuildError`."""
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"command not found: {cmd[0]}") from exc
    except subprocess.CalledProcessError as exc:
        raise GuestBuildError(f"{shlex.join(cmd)} failed ({exc.returncode}):\n{exc.stderr}") from exc


def _newest_kernel_package() -> tuple[str, str] | None:
    """Return (name, candidate version) of the newest plain 6.1 kernel image."""
    try:
        found = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"])
    except GuestBuildError:
        return None
    abis = {}
    for line in found.stdout.splitlines():
        match = KERNEL_PACKAGE_RE.match(line.split(" - ", 1)[0].strip())
        if match:
            abis[int(match.group(1))] = match.group(0)
    for abi in sorted(abis, reverse=True):
        version = _candidate_version(abis[abi])
        if version:
            return abis[abi], version
    return None


def _candidate_version(package: str) -> str | None:
    policy = _run(["apt-cache", "policy", package]).stdout
    match = re.search(r"Candidate:\s*(\S+)", policy)
    if not match or match.group(1) == "(none)":
        return None
    return match.group(1)


def _build_kit(kit_dir: Path, package: str, version: str) -> None:
    """Download and unpack the kernel, then write kernel, initramfs and kit.json."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=kit_dir.parent))
    try:
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"], cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise GuestBuildError(f"apt-get download {package} produced {debs}")
        root = work / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        kernel_version = _kernel_version(root)
        _depmod(root, kernel_version)
        moddir = root / "lib" / "modules" / kernel_version
        builtin = _builtin_modules(moddir)
        load_order = _module_load_order(moddir, GUEST_MODULES, builtin)

        out = work / "kit"
        out.mkdir()
        shutil.copyfile(root / "boot" / f"vmlinuz-{kernel_version}", out / "vmlinuz")
        shutil.copyfile(root / "boot" / f"config-{kernel_version}", out / "config")
        has_vmlinux = _extract_vmlinux(out / "vmlinuz", out / "vmlinux")
        _write_cpio_atomically(
            out / "initramfs.cpio",
            lambda cpio: _fill_base_initramfs(cpio, moddir, kernel_version, load_order),
        )
        meta = {
            "package": package,
            "package_version": version,
            "kernel_version": kernel_version,
            "vmlinux": has_vmlinux,
            "modules": [_module_name(path) for path in load_order],
            "builtin_modules": sorted(m for m in GUEST_MODULES if m in builtin),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (out / "kit.json").write_text(json.dumps(meta, indent=2) + "\n")
        if kit_dir.exists():
            shutil.rmtree(kit_dir)
        os.replace(out, kit_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kernel_version(root: Path) -> str:
    versions = [p.name for p in (root / "lib" / "modules").iterdir() if p.is_dir()]
    if len(versions) != 1:
        raise GuestBuildError(f"expected one kernel in the package, found {versions}")
    return versions[0]


def _extract_vmlinux(vmlinuz: Path, dest: Path) -> bool:
    """Decompress the ELF kernel embedded in a bzImage; False if not possible.

    The bzImage is a boot stub followed by the compressed vmlinux (xz on
    Debian); decompression stops at the end of that stream.
    """
    data = vmlinuz.read_bytes()
    for magic, make in ((b"\xfd7zXZ\x00", lzma.LZMADecompressor), (b"\x1f\x8b\x08\x00", _gzip_decompressor)):
        start = data.find(magic)
        if start < 0:
            continue
        try:
            image = make().decompress(data[start:])
        except (lzma.LZMAError, zlib.error):
            continue
        if image[:4] == b"\x7fELF":
            dest.write_bytes(image)
            return True
    return False


def _gzip_decompressor():
    return zlib.decompressobj(16 + zlib.MAX_WBITS)


def _depmod(root: Path, kernel_version: str) -> None:
    """Generate modules.dep; the .deb leaves that to its postinst."""
    if shutil.which("depmod"):
        _run(["depmod", "-b", str(root), kernel_version])
    else:  # busybox's applet understands -b too
        _run([_busybox_path(), "depmod", "-b", str(root), kernel_version])
    if not (root / "lib" / "modules" / kernel_version / "modules.dep").exists():
        raise GuestBuildError("depmod did not write modules.dep")


def _module_name(path: str) -> str:
    """``kernel/arch/x86/crypto/crc32c-intel.ko.xz`` -> ``crc32c_intel``."""
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def _builtin_modules(moddir: Path) -> set[str]:
    text = (moddir / "modules.builtin").read_text()
    return {_module_name(line) for line in text.split()}


def _parse_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (relative path, relative paths of its dependencies)."""
    deps = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_module_name(path)] = (path, rest.split())
    return deps


def _module_load_order(moddir: Path, wanted: Iterable[str], builtin: set[str]) -> list[str]:
    """Relative .ko paths to insmod, dependencies first; built-ins are skipped."""
    deps = _parse_modules_dep(moddir)
    order: list[str] = []

    def visit(name: str) -> None:
        path, requires = deps[name]
        if path in order:
            return
        for dep in requires:
            visit(_module_name(dep))
        order.append(path)

    for name in wanted:
        if name in builtin:
            continue
        if name not in deps:
            raise GuestBuildError(f"kernel module {name} is neither built in nor in modules.dep")
        visit(name)
    return order


def _read_module(path: Path) -> bytes:
    """Return an uncompressed .ko, so insmod never has to decompress."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def _busybox_path() -> str:
    """The host's static busybox (package busybox-static)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(candidate) and _is_static_elf(candidate):
            return candidate
    raise GuestBuildError("no statically linked /bin/busybox; install busybox-static")


def _is_static_elf(path: str) -> bool:
    """True for a 64-bit ELF without a PT_INTERP (dynamic loader) header."""
    with open(path, "rb") as handle:
        header = handle.read(64)
        if header[:5] != b"\x7fELF\x02":
            return False
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp for i in range(phnum))


def _shared_libraries(binary: str) -> list[str]:
    """Absolute paths of the libraries (and loader) ``binary`` needs, via ldd."""
    output = _run(["ldd", binary]).stdout
    libs = []
    for line in output.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(match.group(1))
    return libs


def _fill_base_initramfs(cpio: _CpioWriter, moddir: Path, kernel_version: str, load_order: list[str]) -> None:
    for name in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev",
                 "run", "mnt", "root", "tmp", "lib64", "lib/x86_64-linux-gnu"):
        cpio.directory(name)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("init", _INIT_SCRIPT.encode(), 0o755)
    tool_names = {name for names in GUEST_TOOLS.values() for name in names}
    _add_busybox(cpio, skip=tool_names)
    _add_tools(cpio)
    _add_modules(cpio, moddir, kernel_version, load_order)


def _add_busybox(cpio: _CpioWriter, skip: set[str]) -> None:
    busybox = _busybox_path()
    cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    applets = _run([busybox, "--list-full"]).stdout.split()
    for applet in applets:
        if os.path.basename(applet) not in skip and applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")


def _add_tools(cpio: _CpioWriter) -> None:
    libs: set[str] = set()
    for binary, names in GUEST_TOOLS.items():
        if not os.path.exists(binary):
            raise GuestBuildError(f"{binary} not found; install e2fsprogs and util-linux")
        target = f"sbin/{os.path.basename(binary)}"
        cpio.file(target, Path(binary).read_bytes(), 0o755)
        for name in names:
            if f"sbin/{name}" != target:
                cpio.symlink(f"sbin/{name}", os.path.basename(binary))
        libs.update(_shared_libraries(binary))
    for lib in sorted(libs):
        # Store at the path ldd printed (ld.so searches it), content from the real file.
        cpio.file(lib, Path(os.path.realpath(lib)).read_bytes(), 0o755)
    # Names like mkfs.ext4 are no applets (and no valid function names).
    functions = "".join(
        f'{name}() {{ /sbin/{os.path.basename(binary)} "$@"; }}\n'
        for binary, names in GUEST_TOOLS.items() for name in names if name.isidentifier()
    )
    cpio.file("etc/vhostuser-guest/tools.sh", functions.encode())
    for config in GUEST_CONFIG_FILES:
        if os.path.exists(config):
            cpio.file(config, Path(config).read_bytes())


def _add_modules(cpio: _CpioWriter, moddir: Path, kernel_version: str, load_order: list[str]) -> None:
    base = f"lib/modules/{kernel_version}"
    installed = []
    for rel in load_order:
        plain = rel.split(".ko")[0] + ".ko"
        cpio.file(f"{base}/{plain}", _read_module(moddir / rel))
        installed.append(plain)
    # A matching modules.dep lets busybox modprobe work for these modules.
    deps = _parse_modules_dep(moddir)
    dep_lines = []
    for rel, plain in zip(load_order, installed):
        requires = deps[_module_name(rel)][1]
        dep_lines.append(f"{plain}: " + " ".join(r.split(".ko")[0] + ".ko" for r in requires))
    cpio.file(f"{base}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    cpio.file(f"{base}/modules.builtin", (moddir / "modules.builtin").read_bytes())
    order = "".join(f"/{base}/{plain}\n" for plain in installed)
    cpio.file("etc/vhostuser-guest/modules", order.encode())


# --------------------------------------------------------------------------
# Devices and the QEMU command line
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QemuBlk:
    """A vhost-user-blk-pci device.

    ``reconnect`` (seconds) makes QEMU's client socket reconnect after the
    back-end goes away; ``server=True`` makes QEMU listen on ``socket`` and
    wait for the back-end to connect before starting the guest.
    ``properties`` are added to ``-device`` (e.g. ``{"queue-size": 256}``).
    """

    socket: str
    num_queues: int = 1
    reconnect: int | None = None
    server: bool = False
    properties: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class QemuNet:
    """A virtio-net-pci device on a vhost-user netdev.

    ``msix=None`` lets the QEMU decide (:attr:`Qemu.net_msix`): QEMU 7.2
    crashes under TCG with vhost-user-net and MSI-X, so the device gets
    ``vectors=0`` there, and MSI-X from QEMU 10 on. A ``vectors`` key in
    ``properties`` wins. ``romfile=`` skips the iPXE option ROM, which the
    guest never uses and which slows the firmware down.
    """

    socket: str
    queues: int = 1
    mac: str | None = None
    reconnect: int | None = None
    server: bool = False
    properties: dict = dataclasses.field(default_factory=lambda: {"romfile": ""})
    msix: bool | None = None


@dataclasses.dataclass(frozen=True)
class Qemu:
    """A ``qemu-system-x86_64`` and how to run it.

    ``data_dirs`` become ``-L`` options, searched before the binary's built-in
    firmware directories (a QEMU unpacked into a private prefix brings its
    own BIOS, PVH loader and option ROMs); ``env`` is added to its
    environment (``QEMU_MODULE_DIR`` for such a prefix). ``version`` is read
    from ``--version`` when not given.
    """

    binary: str = "qemu-system-x86_64"
    data_dirs: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    version: tuple[int, int] | None = None

    def release(self) -> tuple[int, int]:
        """(major, minor) of this QEMU."""
        return self.version or _qemu_version(self.binary)

    @property
    def label(self) -> str:
        """``qemu-7.2``: how tests name it."""
        return "qemu-%d.%d" % self.release()

    @property
    def net_msix(self) -> bool:
        """Whether virtio-net-pci on vhost-user gets MSI-X: not on QEMU 7.x,
        which crashes under TCG with it; yes on QEMU 10, where tested."""
        return self.release() >= (10, 0)

    def environment(self) -> dict | None:
        """The environment to run it in (None: this process's)."""
        return {**os.environ, **dict(self.env)} if self.env else None


_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)")
_versions: dict[str, tuple[int, int]] = {}


def _qemu_version(binary: str) -> tuple[int, int]:
    if binary not in _versions:
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        except FileNotFoundError as exc:
            raise GuestBootFailed(f"{binary} not found; install qemu-system-x86") from exc
        match = _VERSION_RE.search(out)
        if match is None:
            raise GuestBootFailed(f"{binary} --version said {out!r}")
        _versions[binary] = (int(match.group(1)), int(match.group(2)))
    return _versions[binary]


SYSTEM_QEMU = Qemu()


def _as_qemu(qemu: "Qemu | str | None") -> Qemu:
    if qemu is None:
        return SYSTEM_QEMU
    return qemu if isinstance(qemu, Qemu) else Qemu(str(qemu))


def _chardev(chardev_id: str, socket: str, reconnect: int | None, server: bool) -> str:
    opts = [f"socket,id={chardev_id},path={socket}"]
    if server:
        opts.append("server=on,wait=on")
    elif reconnect is not None:
        opts.append(f"reconnect={reconnect}")
    return ",".join(opts)


def _properties(props: dict) -> str:
    def fmt(value) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    return "".join(f",{key}={fmt(value)}" for key, value in props.items())


def _blk_args(index: int, dev: QemuBlk) -> list[str]:
    chardev = f"vublkc{index}"
    device = f"vhost-user-blk-pci,id=vublk{index},chardev={chardev},num-queues={dev.num_queues}"
    return [
        "-chardev", _chardev(chardev, dev.socket, dev.reconnect, dev.server),
        "-device", device + _properties(dev.properties),
    ]


def _net_args(index: int, dev: QemuNet, qemu: Qemu) -> list[str]:
    chardev, netdev = f"vunetc{index}", f"vunet{index}"
    mac = dev.mac or f"52:54:00:12:34:{0x56 + index:02x}"
    device = f"virtio-net-pci,id=vunetdev{index},netdev={netdev},mac={mac}"
    if dev.queues > 1:
        device += ",mq=on"
    msix = qemu.net_msix if dev.msix is None else dev.msix
    properties = {**({} if msix else {"vectors": 0}), **dev.properties}
    return [
        "-chardev", _chardev(chardev, dev.socket, dev.reconnect, dev.server),
        "-netdev", f"vhost-user,id={netdev},chardev={chardev},queues={dev.queues}",
        "-device", device + _properties(properties),
    ]


def qemu_command(
    kit: GuestKit,
    initrd: Path | str,
    *,
    serial_path: Path | str,
    qmp_path: Path | str | None = None,
    blk: Sequence[QemuBlk] = (),
    net: Sequence[QemuNet] = (),
    memory_mb: int = 512,
    smp: int = 1,
    machine: str = "q35",
    cmdline_extra: str = "",
    extra_args: Sequence[str] = (),
    pvh: bool = False,
    qemu: Qemu | str | None = None,
) -> list[str]:
    """Build the QEMU argv.

    Guest RAM is a shared memfd so a vhost-user back-end can map it.
    ``-nodefaults`` keeps out the default NIC (no user-mode networking).
    ``pvh=True`` boots ``kit.vmlinux`` instead of ``kit.kernel``. ``qemu``
    (default: ``qemu-system-x86_64`` on $PATH) is a :class:`Qemu` or a path.
    """
    qemu = _as_qemu(qemu)
    kernel = kit.kernel
    if pvh:
        if kit.vmlinux is None:
            raise ValueError("this kit has no vmlinux; PVH boot is unavailable")
        kernel = kit.vmlinux
    cmd = [qemu.binary]
    for directory in qemu.data_dirs:
        cmd += ["-L", directory]
    cmd += [
        "-accel", "tcg", "-M", machine, "-cpu", "max",
        "-m", str(memory_mb), "-smp", str(smp),
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-numa", "node,memdev=mem",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"{DEFAULT_CMDLINE} {cmdline_extra}".strip(),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{serial_path}",
    ]
    if qmp_path is not None:
        cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    for index, dev in enumerate(blk):
        cmd += _blk_args(index, dev)
    for index, dev in enumerate(net):
        cmd += _net_args(index, dev, qemu)
    return cmd + list(extra_args)


# --------------------------------------------------------------------------
# Running a guest
# --------------------------------------------------------------------------


@dataclasses.dataclass
class GuestResult:
    """What a finished guest run produced."""

    serial: str
    exit_code: int
    qemu_returncode: int | None
    elapsed: float
    boot_uptime: float | None
    command: list[str]

    def lines(self, prefix: str) -> list[str]:
        """Rest of every serial line that starts with ``prefix`` + space."""
        return _marked_lines(self.serial, prefix)

    def results(self, prefix: str = "RESULT") -> dict[str, str]:
        """``key=value`` pairs of all ``RESULT ...`` lines (later ones win)."""
        pairs: dict[str, str] = {}
        for line in self.lines(prefix):
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    pairs[key] = value
        return pairs

    def tail(self, count: int = 40) -> str:
        return _tail(self.serial, count)

    def check(self) -> "GuestResult":
        """Raise :class:`GuestWorkloadFailed` unless the workload exited 0."""
        if self.exit_code != 0:
            raise GuestWorkloadFailed(f"guest workload exited with {self.exit_code}", self.tail())
        return self


def _marked_lines(text: str, prefix: str) -> list[str]:
    found = []
    for line in text.splitlines():
        if line == prefix or line.startswith(prefix + " "):
            found.append(line[len(prefix):].strip())
    return found


def _tail(text: str, count: int) -> str:
    return "\n".join(text.splitlines()[-count:])


def _as_blk(item, num_queues: int, extra: dict) -> QemuBlk:
    if isinstance(item, QemuBlk):
        return item
    return QemuBlk(str(item), num_queues=num_queues, properties=dict(extra))


def _as_net(item, queues: int) -> QemuNet:
    if isinstance(item, QemuNet):
        return item
    return QemuNet(str(item), queues=queues)


class GuestProcess:
    """A running guest; use as a context manager so QEMU is always reaped.

    ``start()`` launches QEMU and returns at once, so a test can act while the
    guest runs (``wait_for()`` a line the workload prints, restart the
    back-end, talk QMP on ``qmp_path``), then ``wait()`` for the result.
    """

    def __init__(
        self,
        kit: GuestKit,
        workload: str,
        *,
        blk: Sequence[QemuBlk] = (),
        net: Sequence[QemuNet] = (),
        memory_mb: int = 512,
        smp: int = 1,
        machine: str = "q35",
        cmdline_extra: str = "",
        extra_args: Sequence[str] = (),
        pvh: bool = False,
        keep_files: bool = False,
        qemu: Qemu | str | None = None,
    ) -> None:
        self.kit = kit
        self.workload = workload
        self.qemu = _as_qemu(qemu)
        # Short path: unix socket paths are limited to 107 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="vhu-guest-"))
        self.serial_path = self.run_dir / "serial.log"
        self.qemu_log_path = self.run_dir / "qemu.log"
        self.qmp_path = self.run_dir / "qmp.sock"
        self.keep_files = keep_files
        try:
            initrd = kit.initramfs_with(workload, self.run_dir / "initramfs.cpio")
            self.command = qemu_command(
                kit, initrd, serial_path=self.serial_path, qmp_path=self.qmp_path,
                blk=blk, net=net, memory_mb=memory_mb, smp=smp, machine=machine,
                cmdline_extra=cmdline_extra, extra_args=extra_args, pvh=pvh, qemu=self.qemu,
            )
        except BaseException:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.process: subprocess.Popen | None = None
        self._started_at = 0.0

    def start(self) -> "GuestProcess":
        """Launch QEMU (raises :class:`GuestBootFailed` if it is missing)."""
        self.serial_path.touch()
        try:
            with open(self.qemu_log_path, "wb") as log:
                self.process = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self.qemu.environment(),
                )
        except FileNotFoundError as exc:
            raise GuestBootFailed(f"{self.command[0]} not found; install qemu-system-x86") from exc
        self._started_at = time.monotonic()
        return self

    @property
    def serial(self) -> str:
        """Serial console output so far (CRs dropped)."""
        try:
            raw = self.serial_path.read_bytes()
        except FileNotFoundError:
            return ""
        return raw.decode(errors="replace").replace("\r", "")

    @property
    def qemu_log(self) -> str:
        """QEMU's own stdout/stderr so far."""
        try:
            return self.qemu_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait until a serial line matches regex ``pattern``; return the match.

        Raises :class:`GuestTimeout` (QEMU keeps running) or, if QEMU ends
        first, :class:`GuestCrashed`.
        """
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.serial)
            if match:
                return match
            if not self.running():
                raise GuestCrashed(f"QEMU ended before {pattern!r} appeared", self._diagnostics())
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{pattern!r} did not appear within {timeout:.0f}s", self._diagnostics())
            time.sleep(POLL_INTERVAL)

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> GuestResult:
        """Wait for the guest to power off and return its :class:`GuestResult`.

        ``timeout`` counts from ``start()``.  On timeout QEMU is killed and
        :class:`GuestTimeout` raised; if QEMU ends without the exit marker,
        :class:`GuestBootFailed` or :class:`GuestCrashed` is raised.
        """
        if self.process is None:
            raise RuntimeError("GuestProcess.wait() before start()")
        deadline = self._started_at + timeout
        exit_seen_at = None
        while self.process.poll() is None:
            now = time.monotonic()
            if exit_seen_at is None and EXIT_MARKER in self.serial:
                exit_seen_at = now
            if exit_seen_at is not None and now - exit_seen_at > POWEROFF_GRACE:
                self.kill()  # the workload finished; only the power-off hung
                break
            if now > deadline:
                self.kill()
                raise GuestTimeout(f"guest did not finish within {timeout:.0f}s; QEMU killed", self._diagnostics())
            time.sleep(POLL_INTERVAL)
        return self._result()

    def _result(self) -> GuestResult:
        serial = self.serial
        boot = re.search(rf"^{BOOT_MARKER} uptime=([0-9.]+)", serial, re.MULTILINE)
        status = re.search(rf"^{re.escape(EXIT_MARKER)}(-?\d+)\s*$", serial, re.MULTILINE)
        if status is None:
            error = GuestCrashed if boot else GuestBootFailed
            what = "without the workload's exit marker" if boot else "before the guest's init ran"
            raise error(f"QEMU exited ({self.process.returncode}) {what}", self._diagnostics())
        return GuestResult(
            serial=serial,
            exit_code=int(status.group(1)),
            qemu_returncode=self.process.returncode,
            elapsed=time.monotonic() - self._started_at,
            boot_uptime=float(boot.group(1)) if boot else None,
            command=list(self.command),
        )

    def _diagnostics(self) -> str:
        text = _tail(self.serial, 40)
        qemu_log = self.qemu_log.strip()
        if qemu_log:
            text += "\n--- qemu output ---\n" + _tail(qemu_log, 20)
        return text

    def kill(self) -> None:
        """Kill QEMU (SIGKILL) and reap it; harmless if it already ended."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        """Kill QEMU and remove the run directory (unless ``keep_files``)."""
        self.kill()
        if not self.keep_files:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "GuestProcess":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def run_guest(
    kit: GuestKit,
    workload: str,
    *,
    blk_sockets: Sequence[str | QemuBlk] = (),
    net_sockets: Sequence[str | QemuNet] = (),
    memory_mb: int = 512,
    smp: int = 1,
    num_queues: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    blk_extra: dict | None = None,
    machine: str = "q35",
    cmdline_extra: str = "",
    extra_args: Sequence[str] = (),
    pvh: bool = False,
    qemu: Qemu | str | None = None,
) -> GuestResult:
    """Boot the guest, run ``workload`` and return the result.

    Plain socket paths become devices with ``num_queues`` queues (and
    ``blk_extra`` device properties for blk); pass :class:`QemuBlk` /
    :class:`QemuNet` objects for per-device settings.  The workload's exit
    status is in the result; call ``result.check()`` to require success.
    """
    blk = [_as_blk(item, num_queues, blk_extra or {}) for item in blk_sockets]
    net = [_as_net(item, num_queues) for item in net_sockets]
    with GuestProcess(
        kit, workload, blk=blk, net=net, memory_mb=memory_mb, smp=smp,
        machine=machine, cmdline_extra=cmdline_extra, extra_args=extra_args, pvh=pvh, qemu=qemu,
    ) as guest:
        return guest.wait(timeout)


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------

_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
SECTOR = 512
MIB = 1 << 20


def sector_pattern(tag: str, sectors: int) -> bytes:
    """Host-side twin of the guest's ``pattern`` shell function.

    Every 512-byte sector holds ``<tag>:<index>|`` repeated, so data that lands
    at the wrong offset or comes from another run is detectable.
    """
    if not _TAG_RE.match(tag):
        raise ValueError(f"pattern tag must match {_TAG_RE.pattern}: {tag!r}")
    out = bytearray()
    for index in range(sectors):
        unit = f"{tag}:{index:08d}|"
        out += ((unit * (SECTOR // len(unit) + 1))[: SECTOR - 1] + "\n").encode()
    return bytes(out)


# Shell helpers shared by the workloads.  Output goes to the serial console;
# results are "RESULT key=value" lines, failures "RESULT-FAIL ..." + exit 1.
_SH_PRELUDE = r"""
fail() { echo "RESULT-FAIL $*"; exit 1; }
step() { echo "STEP $*"; }
# pattern TAG SECTORS: the bytes sector_pattern() computes on the host.
pattern() {
    awk -v tag="$1" -v n="$2" 'BEGIN {
        for (i = 0; i < n; i++) {
            u = sprintf("%s:%08d|", tag, i); s = u
            while (length(s) < 511) s = s s
            printf "%s\n", substr(s, 1, 511)
        }
    }'
}
sha() { sha256sum | cut -d' ' -f1; }
# dread OFFSET_MIB SIZE_MIB: O_DIRECT read of a device range to stdout.
dread() { dd if="$DEV" bs=64k skip=$(($1 * 16)) count=$(($2 * 16)) iflag=direct 2>/dev/null; }
# dwrite OFFSET_MIB FILE: O_DIRECT write of FILE at an offset.
dwrite() { dd if="$2" of="$DEV" bs=64k seek=$(($1 * 16)) oflag=direct conv=notrunc,fsync 2>/dev/null; }
zeros_sha() { dd if=/dev/zero bs=64k count=$(($1 * 16)) 2>/dev/null | sha; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
"""


def blk_workload_basic(
    tag: str = "basic",
    *,
    device: str = "/dev/vda",
    fs_mb: int = 32,
    direct_offset_mb: int = 40,
    discard_offset_mb: int = 48,
    zero_offset_mb: int = 56,
    region_mb: int = 4,
    file_sectors: int = 4096,
) -> str:
    """Workload exercising a virtio-blk disk of at least 64 MiB.

    Steps (each reports ``RESULT`` lines):

    1. ``mkfs.ext4`` on the first ``fs_mb`` MiB (mke2fs discards that range),
       mount, write ``/data.bin`` (pattern ``<tag>-file``) and ``/hello.txt``,
       sync, umount, remount and re-read: ``fs_sha``.
    2. O_DIRECT write of pattern ``<tag>-direct`` (1 MiB) at
       ``direct_offset_mb`` and O_DIRECT read-back: ``direct_sha``.
    3. Fill ``region_mb`` at ``discard_offset_mb``, ``blkdiscard`` it, read
       zeros back: ``discard_zero``.
    4. Fill ``region_mb`` at ``zero_offset_mb``, ``blkdiscard -z`` (write
       zeroes), read zeros back: ``write_zeroes_zero``.
    5. Switch the cache to write through, then write back (via the virtio
       ``cache_type`` attribute), writing a file and syncing in each mode:
       ``wt_sha``, ``wb_sha``.
    """
    if not _TAG_RE.match(tag):
        raise ValueError(f"bad tag {tag!r}")
    disk = os.path.basename(device)
    return _SH_PRELUDE + f"""
DEV={device}
TAG={tag}
[ -b "$DEV" ] || fail "no block device $DEV"
echo "RESULT size=$(blockdev --getsize64 $DEV) queues=$(ls /sys/block/{disk}/mq | wc -l)"
echo "RESULT cache_initial=$(cat /sys/block/{disk}/queue/write_cache | tr ' ' _)"
echo "RESULT discard_max=$(cat /sys/block/{disk}/queue/discard_max_bytes)"

step mkfs
mkfs.ext4 -F -q "$DEV" {fs_mb}M || fail mkfs.ext4
mount -t ext4 "$DEV" /mnt || fail mount
pattern $TAG-file {file_sectors} > /mnt/data.bin || fail write data.bin
echo "hello from $TAG" > /mnt/hello.txt
sync
umount /mnt || fail umount
drop_caches
mount -t ext4 "$DEV" /mnt || fail remount
echo "RESULT fs_sha=$(sha < /mnt/data.bin) hello=$(cat /mnt/hello.txt | tr ' ' _)"
umount /mnt || fail umount

step direct
pattern $TAG-direct 2048 > /tmp/direct.bin
dwrite {direct_offset_mb} /tmp/direct.bin || fail "O_DIRECT write"
echo "RESULT direct_sha=$(dread {direct_offset_mb} 1 | sha) direct_expected=$(sha < /tmp/direct.bin)"

step discard
pattern $TAG-fill {region_mb * 2048} > /tmp/fill.bin
dwrite {discard_offset_mb} /tmp/fill.bin || fail "fill before discard"
dwrite {zero_offset_mb} /tmp/fill.bin || fail "fill before write zeroes"
[ "$(dread {discard_offset_mb} {region_mb} | sha)" = "$(sha < /tmp/fill.bin)" ] || fail "fill read-back"
rm -f /tmp/fill.bin
blkdiscard -f -o $(({discard_offset_mb} << 20)) -l $(({region_mb} << 20)) "$DEV" || fail blkdiscard
zero=0; [ "$(dread {discard_offset_mb} {region_mb} | sha)" = "$(zeros_sha {region_mb})" ] && zero=1
echo "RESULT discard_zero=$zero"
blkdiscard -f -z -o $(({zero_offset_mb} << 20)) -l $(({region_mb} << 20)) "$DEV" || fail "blkdiscard -z"
zero=0; [ "$(dread {zero_offset_mb} {region_mb} | sha)" = "$(zeros_sha {region_mb})" ] && zero=1
echo "RESULT write_zeroes_zero=$zero"

step cache
cache=/sys/block/{disk}/cache_type
[ -w $cache ] || cache=/sys/block/{disk}/queue/write_cache
mount -t ext4 "$DEV" /mnt || fail "mount for cache test"
for mode in "write through" "write back"; do
    echo "$mode" > $cache || fail "set cache $mode"
    name=$(echo $mode | tr ' ' _)
    pattern $TAG-$name 256 > /mnt/$name.bin
    sync
    echo "RESULT cache_$name=$(cat $cache | tr ' ' _) sha_$name=$(sha < /mnt/$name.bin)"
done
umount /mnt || fail "umount after cache test"
echo "RESULT done=1"
"""


def blk_workload_verify(tag: str = "basic", *, device: str = "/dev/vda", direct_offset_mb: int = 40) -> str:
    """Second-boot workload: re-read what :func:`blk_workload_basic` wrote.

    Mounts read-only and reports ``fs_sha``, ``hello``, ``sha_write_back``,
    ``sha_write_through`` and ``direct_sha``; runs ``fsck.ext4 -n`` first
    (``fsck_rc``).
    """
    if not _TAG_RE.match(tag):
        raise ValueError(f"bad tag {tag!r}")
    return _SH_PRELUDE + f"""
DEV={device}
[ -b "$DEV" ] || fail "no block device $DEV"
fsck.ext4 -n -f "$DEV" > /tmp/fsck.log 2>&1
echo "RESULT fsck_rc=$?"
mount -t ext4 -o ro "$DEV" /mnt || fail mount
echo "RESULT fs_sha=$(sha < /mnt/data.bin) hello=$(cat /mnt/hello.txt | tr ' ' _)"
for name in write_through write_back; do
    echo "RESULT sha_$name=$(sha < /mnt/$name.bin)"
done
umount /mnt
echo "RESULT direct_sha=$(dread {direct_offset_mb} 1 | sha)"
echo "RESULT done=1"
"""


BLK_WORKLOAD_BASIC = blk_workload_basic()
BLK_WORKLOAD_VERIFY = blk_workload_verify()


# --------------------------------------------------------------------------
# Command line (used by the README demo)
# --------------------------------------------------------------------------

_NAMED_WORKLOADS = {"basic": BLK_WORKLOAD_BASIC, "verify": BLK_WORKLOAD_VERIFY, "true": "true\n"}


def main(argv: Sequence[str] | None = None) -> int:
    """``build`` prints the kit; ``run`` boots it and exits with the workload's status."""
    parser = argparse.ArgumentParser(prog="python -m vhostuser_devkit.guest", description=main.__doc__)
    parser.add_argument("--cache-dir", help="kit cache (default: %(default)s)", default=str(default_cache_dir()))
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("build", help="build (or find) the guest kit and print its paths")
    run = sub.add_parser("run", help="boot the guest and run a workload")
    run.add_argument("--blk", action="append", default=[], help="vhost-user-blk socket (repeatable)")
    run.add_argument("--net", action="append", default=[], help="vhost-user-net socket (repeatable)")
    run.add_argument("--queues", type=int, default=1)
    run.add_argument("--workload", default="basic",
                     help=f"one of {sorted(_NAMED_WORKLOADS)} or a path to a shell script")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    run.add_argument("--pvh", action="store_true", help="boot the decompressed kernel via PVH (faster)")
    args = parser.parse_args(argv)

    kit = build_guest(args.cache_dir)
    if args.action == "build":
        print(json.dumps(dataclasses.asdict(kit), indent=2, default=str))
        return 0
    workload = _NAMED_WORKLOADS.get(args.workload)
    if workload is None:
        workload = Path(args.workload).read_text()
    result = run_guest(kit, workload, blk_sockets=args.blk, net_sockets=args.net,
                       num_queues=args.queues, timeout=args.timeout, pvh=args.pvh)
    sys.stdout.write(result.serial)
    print(f"# boot {result.boot_uptime}s (guest uptime), total {result.elapsed:.1f}s, exit {result.exit_code}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
