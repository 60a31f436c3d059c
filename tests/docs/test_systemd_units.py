"""examples/systemd/vhostuser-blk@.{socket,service}, as systemd would run
them: ``systemd-socket-activate`` binds the socket unit's ListenStream and
execs the service's ExecStart (parsed from the file, %i and $OPTIONS
expanded, paths moved into a temporary directory) with the listening socket
as fd 3; our front-end then does I/O over it, and SIGTERM ends it with
status 0. ``systemd-analyze verify`` checks the unit files themselves."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from docblocks import EXAMPLES, PROGRAMS, python_argv
from vhostuser.frontend import BlkClient, Frontend

UNITS = EXAMPLES / "systemd"
SOCKET_UNIT = UNITS / "vhostuser-blk@.socket"
SERVICE_UNIT = UNITS / "vhostuser-blk@.service"
INSTANCE = "vm1"


def find_tool(name: str) -> str | None:
    for candidate in (shutil.which(name), f"/lib/systemd/{name}", f"/usr/lib/systemd/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values]}} of a unit file (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}: keep directives on one line for the test"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: bad line {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{key} given {len(values)} times"
    return values[0]


def exec_argv(line: str, instance: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart rules for what the example uses: %i, and an
    unbraced $NAME word split into words (missing: no word)."""
    argv = []
    for word in shlex.split(line.replace("%i", instance)):
        if word.startswith("$") and word[1:].isidentifier():
            argv += env.get(word[1:], "").split()
        else:
            argv.append(word)
    return argv


@pytest.fixture(scope="module")
def units():
    return parse_unit(SOCKET_UNIT), parse_unit(SERVICE_UNIT)


def test_socket_unit_hands_over_a_private_listening_socket(units):
    sock, service = units
    # --fd takes a listening socket; Accept=yes would pass connected ones.
    assert sock["Socket"].get("Accept", ["no"]) == ["no"]
    assert one(sock, "Socket", "ListenStream").startswith("/")      # a unix socket path
    assert "%i" in one(sock, "Socket", "ListenStream")              # one socket per instance
    mode = int(one(sock, "Socket", "SocketMode"), 8)
    assert mode & 0o007 == 0, "systemd's default 0666 lets every local user in"
    # the service the socket activates is the example's, same instance
    assert "vhostuser-blk@%i.socket" in one(service, "Unit", "Requires")


def test_socket_activation_runs_the_documented_service(units, tmp_path):
    activate = find_tool("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate not installed (Debian package systemd)")
    sock_unit, service = units
    listen = one(sock_unit, "Socket", "ListenStream").replace("%i", INSTANCE)
    argv = exec_argv(one(service, "Service", "ExecStart"), INSTANCE,
                     {"OPTIONS": "--queues 2 --serial vm1-disk"})
    assert argv[:3] == ["/usr/local/bin/vhostuser-blk", "--fd", "3"], argv
    assert os.path.basename(argv[0]) in PROGRAMS
    argv[0] = os.path.basename(argv[0])

    # The unit's paths, moved into tmp_path.
    run = Path(tmp_path)
    moved = {str(Path(listen).parent): str(run), "/var/lib/vhostuser": str(run)}

    def move(arg: str) -> str:
        for old, new in moved.items():
            arg = arg.replace(old + "/", new + "/")
        return arg

    sock_path = move(listen)
    argv = [move(a) for a in argv]
    image = run / f"{INSTANCE}.img"
    assert str(image) in argv
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    log = run / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([activate, "-l", sock_path, *python_argv(argv)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock_path):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        # The first connection execs the service, which serves the socket on fd 3.
        with Frontend.connect(sock_path, timeout=30) as fe:
            disk = BlkClient.setup(fe, queues=2)
            assert disk.capacity == (32 << 20) // 512
            assert disk.get_id().rstrip(b"\0") == b"vm1-disk"           # $OPTIONS applied
            data = os.urandom(8192)
            disk.write(64, data, queue=1)
            disk.flush()
            assert disk.read(64, 8192) == data
        # The same process keeps serving: a second front-end after the first.
        with Frontend.connect(sock_path, timeout=30, wait=5) as fe:
            assert BlkClient.setup(fe).read(64, 512) == data[:512]
        with open(image, "rb") as f:
            f.seek(64 * 512)
            assert f.read(8192) == data
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    text = log.read_text()
    assert code == 0, text
    assert "fd 3#1: front-end connected" in text               # it served the inherited fd
    assert "fd 3#2: front-end connected" in text


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    analyze = find_tool("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    # verify insists that ExecStart's program exists: point it at ours.
    program = shutil.which("vhostuser-blk")
    if program is None:
        pytest.skip("vhostuser-blk is not on $PATH (pip install the package)")
    for unit in (SOCKET_UNIT, SERVICE_UNIT):
        text = unit.read_text().replace("/usr/local/bin/vhostuser-blk", program)
        (tmp_path / unit.name).write_text(text)
    names = [str(tmp_path / f"vhostuser-blk@{INSTANCE}.{kind}") for kind in ("socket", "service")]
    result = subprocess.run([analyze, "verify", *names], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    # Warnings (unknown keys, bad values) exit 0 too: any complaint about our
    # files fails the test.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "vhostuser-blk@" in line]
    if result.returncode != 0 and not complaints and "bus" in result.stderr.lower():
        pytest.skip(f"systemd-analyze verify cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
