"""The QEMUs the guest tests run on: Debian 12's own (7.2, the system's
``qemu-system-x86_64``) and QEMU 10 from bookworm-backports, unpacked into a
private prefix so that 7.2 stays the system's QEMU.

    python3 tests/guest/qemus.py fetch    # ./dev.sh setup runs it
    python3 tests/guest/qemus.py list     # what the tests will use

``fetch`` uses apt with its own configuration (a sources file naming only
bookworm-backports, its own package lists and cache, all under the prefix
cache), so the host's apt sources and state are not touched. It downloads
``qemu-system-x86`` (the binary), ``qemu-system-data`` (PVH loader, option
ROMs, keymaps) and the backport's ``seabios`` with ``apt-get download``,
unpacks them with ``dpkg-deb -x`` into
``$VHOSTUSER_QEMU_CACHE/qemu-<version>/`` (default
``~/.cache/vhostuser/qemu``) and checks that the binary finds every shared
library on this system and runs. Runs of the tests give it its firmware
directories with ``-L`` and its modules with ``QEMU_MODULE_DIR``.

Only the standard library is used (dev.sh runs it before anything else).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from vhostuser_devkit.guest import Qemu
except ImportError:  # run as a script from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vhostuser_devkit.guest import Qemu

SUITE = "bookworm-backports"
MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGES = ("qemu-system-x86", "qemu-system-data", "seabios")
BINARY = "usr/bin/qemu-system-x86_64"
DATA_DIRS = ("usr/share/qemu", "usr/share/seabios")
MODULE_DIR = "usr/lib/x86_64-linux-gnu/qemu"
KEEP = ("usr/bin/qemu-system-x86_64", "usr/share/qemu", "usr/share/seabios", MODULE_DIR)


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    env = os.environ.get("VHOSTUSER_QEMU_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vhostuser" / "qemu"


def system_qemu() -> Qemu | None:
    """Debian's QEMU (7.2 on bookworm), or None if not installed."""
    path = shutil.which("qemu-system-x86_64")
    return Qemu(path) if path else None


def backport_qemu(cache: Path | None = None) -> Qemu | None:
    """The newest QEMU unpacked by :func:`fetch`, or None."""
    cache = cache or cache_dir()
    found = []
    for meta in cache.glob("qemu-*/qemu.json"):
        info = json.loads(meta.read_text())
        found.append((tuple(info["release"]), meta.parent))
    if not found:
        return None
    release, prefix = max(found)
    return prefix_qemu(prefix, release)


def prefix_qemu(prefix: Path, release=None) -> Qemu:
    return Qemu(
        binary=str(prefix / BINARY),
        data_dirs=tuple(str(prefix / d) for d in DATA_DIRS),
        env=(("QEMU_MODULE_DIR", str(prefix / MODULE_DIR)),),
        version=tuple(release) if release else None,
    )


def _apt_options(cache: Path) -> list[str]:
    apt = cache / "apt"
    return [
        "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "Dir::State::Status=/dev/null",
    ] + (
        # As root, apt downloads as _apt, which cannot write to root's cache.
        ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
    )


def _run(cmd: list[str], **kwargs) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs).stdout
    except FileNotFoundError as exc:
        raise FetchError(f"{cmd[0]} not found (this needs Debian's apt and dpkg)") from exc
    except subprocess.CalledProcessError as exc:
        raise FetchError(f"{' '.join(cmd)} failed ({exc.returncode}):\n{exc.stderr}") from exc


def _candidates(cache: Path) -> dict[str, str]:
    """Update the private package lists; package -> version in the suite."""
    apt = cache / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} {SUITE} main\n")
    opts = _apt_options(cache)
    _run(["apt-get", "-q", *opts, "update"])
    versions = {}
    for package in PACKAGES:
        policy = _run(["apt-cache", *opts, "policy", package])
        match = re.search(r"Candidate:\s*(\S+)", policy)
        if not match or match.group(1) == "(none)":
            raise FetchError(f"{package} is not in {SUITE}")
        versions[package] = match.group(1)
    return versions


def fetch(cache: Path | None = None) -> Qemu:
    """Make sure the backport's newest QEMU is unpacked; return it.

    Offline (the lists cannot be updated), an already unpacked QEMU is used.
    """
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        versions = _candidates(cache)
    except FetchError:
        have = backport_qemu(cache)
        if have is not None:
            print(f"qemus: {SUITE} unreachable; using {have.binary}", file=sys.stderr)
            return have
        raise
    version = versions["qemu-system-x86"]
    prefix = cache / ("qemu-" + re.sub(r"[^A-Za-z0-9.+~-]", "_", version))
    if (prefix / "qemu.json").exists():
        return prefix_qemu(prefix, json.loads((prefix / "qemu.json").read_text())["release"])
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
    try:
        debs = work / "debs"
        debs.mkdir()
        _run(["apt-get", "-q", *_apt_options(cache), "download",
              *(f"{p}={v}" for p, v in versions.items())], cwd=debs)
        root = work / "root"
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        out = work / "prefix"
        for keep in KEEP:
            if (root / keep).exists():
                (out / keep).parent.mkdir(parents=True, exist_ok=True)
                os.replace(root / keep, out / keep)
        missing = re.findall(r"^\s*(\S+) => not found", _run(["ldd", str(out / BINARY)]), re.M)
        if missing:
            raise FetchError(f"QEMU {version} needs libraries this system lacks: "
                             f"{', '.join(missing)} (apt-get install them)")
        qemu = prefix_qemu(out)
        release = qemu.release()   # runs --version: the binary starts here
        meta = {"version": version, "release": list(release), "packages": versions,
                "suite": SUITE}
        (out / "qemu.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(prefix, ignore_errors=True)
        os.replace(out, prefix)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in cache.glob("qemu-*/qemu.json"):
        if old.parent != prefix:
            shutil.rmtree(old.parent, ignore_errors=True)
    return prefix_qemu(prefix, release)


def main(argv: list[str]) -> int:
    if argv[1:] == ["fetch"]:
        try:
            qemu = fetch()
        except FetchError as exc:
            print(f"qemus: {exc}", file=sys.stderr)
            return 1
        print(f"{qemu.label}: {qemu.binary}")
        return 0
    if argv[1:] == ["list"]:
        for qemu in (system_qemu(), backport_qemu()):
            if qemu is not None:
                print(f"{qemu.label}: {qemu.binary}")
        return 0
    print(f"usage: {argv[0]} fetch|list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
