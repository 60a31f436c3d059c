"""The package as a user installs it: ``python -m build`` makes an sdist and
a wheel (the wheel built from the sdist, so the sdist must be complete), the
wheel goes into a fresh virtual environment with no source tree anywhere in
sight, and every console script runs from there: ``--version`` and
``--help``, then vhostuser-blk serving a RAM disk that vhostuser-blkload
drives, so both C extensions are in the wheel and load.

Needs the ``build`` package (the ``test`` extra) and PyPI, or a local index,
for the build's and the wheel's dependencies, as ``pip install`` does.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _clean_env() -> dict:
    """This environment minus whatever would lead Python to the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not p.startswith(str(REPO)))
    return env


def _run(cmd, *, cwd, timeout=600, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), capture_output=True,
                         text=True, timeout=timeout, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n" \
                                f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _source_copy(dest: Path) -> Path:
    """The checkout's files (tracked and new, not ignored) copied to dest, so
    the build's egg-info and build/ land there and not in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True)
    if listed.returncode != 0:       # not a git checkout (e.g. an unpacked sdist)
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", "_native*.c",
            "_blkload*.c"))
        return dest
    for name in listed.stdout.decode().split("\0"):
        src = REPO / name
        if name and src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin directory, sdist path, wheel path, installed version)."""
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("python -m build needs the 'build' package: pip install -e '.[test]'")
    work = tmp_path_factory.mktemp("wheel")
    src = _source_copy(work / "src")
    dist = work / "dist"
    _run([sys.executable, "-m", "build", "--outdir", dist, src], cwd=work)
    sdists, wheels = list(dist.glob("vhostuser-*.tar.gz")), list(dist.glob("vhostuser-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(dist.iterdir())
    shutil.rmtree(src)               # from here on no source tree exists
    venv = work / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", venv], cwd=work)
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheels[0]], cwd=work)
    version = _run([venv / "bin" / "python", "-c",
                    "import importlib.metadata as m; print(m.version('vhostuser'))"],
                   cwd=work).stdout.strip()
    return venv / "bin", sdists[0], wheels[0], version, work


def test_wheel_holds_the_package_and_both_extensions_and_nothing_else(installed):
    _, sdist, wheel, version, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"vhostuser", f"vhostuser-{version}.dist-info"}, tops
    for ext in ("_native", "_blkload"):
        assert any(n.startswith(f"vhostuser/{ext}.") and n.endswith(".so") for n in names), ext
    assert "vhostuser/blkload/cli.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"vhostuser-{version}.dist-info/entry_points.txt")
    for script in SCRIPTS:
        assert f"{script} = ".encode() in entry_points, script


def test_installed_package_is_imported_from_the_venv(installed):
    bindir, _, _, _, work = installed
    out = _run([bindir / "python", "-c",
                "import vhostuser, vhostuser._native, vhostuser._blkload; "
                "print(vhostuser.__file__); print(vhostuser._blkload.__file__)"], cwd=work)
    for line in out.stdout.split():
        assert line.startswith(str(bindir.parent)), out.stdout
        assert not line.startswith(str(REPO)), out.stdout


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_prints_its_version_and_help(installed, script):
    bindir, _, _, version, work = installed
    out = _run([bindir / script, "--version"], cwd=work, timeout=60)
    assert out.stdout.strip() == f"{script} {version}", out.stdout
    out = _run([bindir / script, "--help"], cwd=work, timeout=60)
    assert out.stdout.startswith(f"usage: {script}"), out.stdout[:200]


def test_installed_blk_backend_serves_the_installed_load_generator(installed):
    """Both C extensions doing real work: vhostuser-blk's data plane answers
    vhostuser-blkload's C loop, each run from the wheel's venv."""
    bindir, _, _, _, work = installed
    sock = work / "ram.sock"
    log = open(work / "blk.log", "wb")
    server = subprocess.Popen([bindir / "vhostuser-blk", "--socket-path", sock, "--ramdisk", "16M"],
                              cwd=work, env=_clean_env(), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert server.poll() is None, (work / "blk.log").read_text()
            assert time.monotonic() < deadline, "vhostuser-blk did not listen"
            time.sleep(0.05)
        # every sector stamped once, so that --verify checks what reads return
        _run([bindir / "vhostuser-blkload", "--socket", sock, "--prefill"], cwd=work, timeout=60)
        out = _run([bindir / "vhostuser-blkload", "--socket", sock, "--rw", "randrw", "--bs", "4k",
                    "--qd", "8", "--seconds", "0.3", "--verify", "--json"], cwd=work, timeout=60)
        result = json.loads(out.stdout)
        assert result["ios"] > 0 and result["reads"] > 0 and result["writes"] > 0, result
        assert result["errors"] == 0 and result["verify_errors"] == 0, result
        assert result["backend"]["pid"] == server.pid, result
    finally:
        server.terminate()
        rc = server.wait(20)
        log.close()
    assert rc == 0, (work / "blk.log").read_text()
