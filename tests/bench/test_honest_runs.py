"""What makes a benchmark run honest (issue 17): the load generator
negotiates FLUSH unless told not to and can put a device in write-through
mode, sends the FLUSHes it is asked for; the harness aborts on an I/O error
or a verify mismatch and tables nothing, and refuses a dirty tree."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bench import run as harness
from vhostuser.blkload import run as blkload_run
from vhostuser.blkload import stamp_file, warm_page_cache
from vhostuser.blk import BlkDevice, FileBackend
from vhostuser.testing.server import BackgroundServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_path):
    """(socket, device): a C file back-end on a stamped 8 MiB image."""
    image = str(tmp_path / "disk.img")
    stamp_file(image, 8 << 20)
    device = BlkDevice(FileBackend(image))
    sock = str(tmp_path / "blk.sock")
    with BackgroundServer(device, sock):
        yield sock, device
    device.close()


def load(sock, **kw):
    r = blkload_run(sock, bs="4k", qd=8, seconds=0.3, warmup=0, verify=True, **kw)
    assert r["errors"] == 0 and r["verify_errors"] == 0 and "error" not in r, r
    return r


def test_flush_is_negotiated_by_default_so_writes_may_be_cached(served):
    sock, device = served
    r = load(sock, rw="randwrite")
    assert r["flush_negotiated"] and r["cache_mode"] == "write-back"
    stats = device.stats()
    assert stats["writes"] >= r["writes"] > 0
    assert stats["stable_writes"] == 0          # write-back: none synced on completion


def test_without_flush_every_write_is_stable_on_completion(served):
    sock, device = served
    r = load(sock, rw="randwrite", flush=False)
    assert not r["flush_negotiated"] and r["cache_mode"] == "write-through"
    assert device.stats()["stable_writes"] >= r["writes"] > 0


def test_write_through_through_config_wce(served):
    sock, device = served
    r = load(sock, rw="randwrite", write_through=True)
    assert r["flush_negotiated"] and r["cache_mode"] == "write-through"
    assert device.stats()["stable_writes"] >= r["writes"] > 0


def test_flush_every_n_writes(served):
    sock, device = served
    r = load(sock, rw="randrw", rwmixread=70, flush_every=16)
    assert r["reads"] > 0 and r["writes"] > 0
    # one FLUSH per 16 writes submitted; up to qd writes were still in flight
    assert r["writes"] // 16 - 1 <= r["flushes"] <= (r["writes"] + 8) // 16
    assert device.stats()["flushes"] == r["flushes"]
    assert r["ios"] == r["reads"] + r["writes"]      # FLUSHes are not I/Os


def test_flush_every_needs_flush(served):
    with pytest.raises(ValueError):
        blkload_run(served[0], rw="randwrite", seconds=0.1, flush=False, flush_every=4)


def test_warm_page_cache_reads_what_is_missing(tmp_path):
    image = str(tmp_path / "disk.img")
    stamp_file(image, 4 << 20, write_size=4096)
    fd = os.open(image, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    first = warm_page_cache(image)
    assert first["pages"] == 1024 and first["read"] > 0
    assert first["read"] + first["resident_before"] == 1024
    again = warm_page_cache(image)
    assert again["resident_before"] >= 1000       # now in memory (less what the kernel dropped)


def test_a_verify_mismatch_fails_the_measurement(tmp_path):
    """A RAM disk never written reads zeroes, not the stamps: --verify
    catches it, and the harness refuses the result."""
    sock = str(tmp_path / "ram.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", sock,
                             "--ramdisk", "8M"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        backend = types.SimpleNamespace(name="unwritten-ram", sock=sock, pid=proc.pid)
        args = types.SimpleNamespace(warmup=0, verify=True, client_cpu=None, nice=0)
        for _ in range(100):
            if os.path.exists(sock):
                break
            import time
            time.sleep(0.05)
        with pytest.raises(harness.BenchFailure, match="verify_errors"):
            harness.blkload(args, backend, 0.2, rw="randread", bs="4k", qd=4)
    finally:
        proc.terminate()
        proc.wait(10)


def test_harness_refuses_a_dirty_tree(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(harness, "tree_state", lambda: ("0" * 40, True))
    assert harness.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "uncommitted changes" in capsys.readouterr().err
    assert not (tmp_path / "RESULTS.md").exists()


def test_a_failed_measurement_tables_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(harness, "tree_state", lambda: ("0" * 40, False))

    def failing(*a, **kw):
        raise harness.BenchFailure("vhu-file: {'verify_errors': 3}")
    monkeypatch.setattr(harness, "run_setup", failing)
    assert harness.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "nothing tabled" in capsys.readouterr().err
    assert not (tmp_path / "RESULTS.md").exists()
    assert (tmp_path / "results-failed.json").exists()


def test_development_runs_are_marked(monkeypatch, tmp_path):
    """--allow-dirty and --no-verify runs say so at the top, and RESULTS.md
    keeps another run's Network section."""
    monkeypatch.setattr(harness, "tree_state", lambda: ("f" * 40, True))
    monkeypatch.setattr(harness, "run_setup", lambda *a, **kw: {
        "workloads": {}, "sweep": {}, "idle": {}, "rss": {}, "commands": {},
        "descriptions": {}, "image": "IMG", "description": "d"})
    (tmp_path / "RESULTS.md").write_text("# old\n\n## Network\n\nnet table\n")
    assert harness.main(["--quick", "--allow-dirty", "--no-verify", "--setups", "tmpfs",
                         "--out", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "DEVELOPMENT RUN, NOT FOR PUBLICATION" in text
    assert "uncommitted changes" in text and "--no-verify" in text
    assert "f" * 40 in text
    assert text.rstrip().endswith("## Network\n\nnet table")


def test_the_net_run_after_a_published_blk_run_ignores_only_the_tables(monkeypatch):
    """`run.py --all`: the blk tables it just wrote are the one change the
    net run may find; any other change still makes the tree dirty."""
    status = {"out": ""}
    # as harness.git returns it: stripped, so the first line lost its leading blank
    monkeypatch.setattr(harness, "git",
                        lambda *a: status["out"].strip() if a[0] == "status" else "c" * 40)
    status["out"] = " M bench/RESULTS.md\n M bench/results.json"
    assert harness.tree_state(harness.OUTPUTS) == ("c" * 40, False)
    assert harness.tree_state() == ("c" * 40, True)
    status["out"] = " M bench/RESULTS.md\n M csrc/vu_blk.c"
    assert harness.tree_state(harness.OUTPUTS) == ("c" * 40, True)
    status["out"] = "?? bench/stray.txt"
    assert harness.tree_state(harness.OUTPUTS) == ("c" * 40, True)
