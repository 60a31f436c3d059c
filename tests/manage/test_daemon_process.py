"""The daemon program: exports from a config file, a clean exit on SIGTERM
with a front-end connected, a refused start-up changing nothing."""
import json
import os
import subprocess
import sys

from vhostuser.frontend import BackendClosed
from vhostuser_devkit.daemon import DaemonProcess

from .conftest import blk_frontend


def test_config_file_exports_and_sigterm_exit(workdir, image):
    config = os.path.join(workdir, "exports.jsonl")
    with open(config, "w") as f:
        f.write("# two disks and an interface\n")
        f.write(json.dumps({"cmd": "add", "args": {"type": "blk", "name": "d0",
                                                   "socket_path": f"{workdir}/d0.sock",
                                                   "ramdisk": "2M"}}) + "\n\n")
        f.write(json.dumps({"type": "blk", "name": "d1", "socket_path": f"{workdir}/d1.sock",
                            "blk_file": image, "aio": "sync", "serial": "disk-one"}) + "\n")
        f.write(json.dumps({"type": "net", "name": "n0", "socket_path": f"{workdir}/n0.sock",
                            "backend": "null"}) + "\n")
    d = DaemonProcess(workdir, "--config", config)
    try:
        assert [e["name"] for e in d.call("list")] == ["d0", "d1", "n0"]
        with blk_frontend(d.path("d1.sock")) as blk:
            assert blk.get_id() == b"disk-one"
            blk.write(0, b"t" * 4096)
            assert d.terminate() == 0
            # drained and disconnected, not killed
            try:
                blk.fe.get_features()
                raise AssertionError("still connected after SIGTERM")
            except BackendClosed:
                pass
    finally:
        d.terminate()
    out = d.output()
    assert "export d1 stopped (exit)" in out and "Traceback" not in out
    for name in ("ctl.sock", "d0.sock", "d1.sock", "n0.sock"):
        assert not os.path.exists(os.path.join(workdir, name))
    with open(image, "rb") as f:
        assert f.read(4096) == b"t" * 4096


def test_json_list_config(workdir):
    config = os.path.join(workdir, "exports.json")
    with open(config, "w") as f:
        json.dump([{"type": "blk", "name": f"d{i}", "socket_path": f"{workdir}/d{i}.sock",
                    "ramdisk": "1M"} for i in range(3)], f)
    d = DaemonProcess(workdir, "--config", config)
    try:
        assert [e["state"] for e in d.call("list")] == ["running"] * 3
    finally:
        assert d.terminate() == 0


def test_bad_config_exits_1_and_leaves_no_socket(workdir):
    config = os.path.join(workdir, "exports.jsonl")
    with open(config, "w") as f:
        f.write(json.dumps({"type": "blk", "name": "d0", "socket_path": f"{workdir}/d0.sock",
                            "ramdisk": "1M"}) + "\n")
        f.write(json.dumps({"type": "blk", "name": "d0", "socket_path": f"{workdir}/d9.sock",
                            "ramdisk": "1M"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.daemon", "--control",
                        f"{workdir}/ctl.sock", "--config", config],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert f"{config}:2: export-exists" in r.stderr
    assert sorted(os.listdir(workdir)) == ["exports.jsonl"]


def test_second_daemon_on_the_same_control_socket_is_refused(daemon):
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.daemon", "--control",
                        daemon.control], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "another process" in r.stderr
    assert daemon.call("list") == []          # the first one is unharmed
