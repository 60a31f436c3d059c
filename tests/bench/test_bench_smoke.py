"""Smoke test of the benchmarks: they run and print numbers (no thresholds).

`python bench/run.py --quick` starts vhostuser's back-ends and (if
installed) qemu-storage-daemon, runs every blk workload for a fraction of a
second each, and writes RESULTS.md into a temp dir.
"""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_blkload_against_ramdisk(tmp_path):
    sock = tmp_path / "ram.sock"
    be = subprocess.Popen([sys.executable, "-m", "vhostuser.cli.blk", "--socket-path",
                           str(sock), "--ramdisk", "16M"], cwd=ROOT)
    try:
        out = subprocess.run([sys.executable, "-m", "vhostuser.blkload", "--socket", str(sock),
                              "--rw", "randrw", "--bs", "4k", "--qd", "8", "--seconds", "0.3",
                              "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        assert r["ios"] > 0 and r["errors"] == 0
        assert r["reads"] > 0 and r["writes"] > 0
        assert r["lat_us"]["p50"] > 0 and r["iops"] > 0
        assert r["backend"]["pid"] == be.pid and r["backend"]["peak_rss_kb"] > 0
    finally:
        be.terminate()
        be.wait(10)


@pytest.mark.skipif(not shutil.which("qemu-storage-daemon"), reason="needs qemu-storage-daemon")
def test_run_quick(tmp_path):
    """Every workload on each setup, against a few back-ends (the full set
    takes minutes even with --quick). --allow-dirty: the test runs on
    whatever is checked out."""
    out = subprocess.run([sys.executable, "bench/run.py", "--quick", "--allow-dirty", "--out",
                          str(tmp_path), "--backends",
                          "vhu-file,vhu-file-uring,vhu-file-poll,vhu-py,qsd-io_uring,"
                          "qsd-io_uring-wt,qsd-iot-io_uring,qsd-native"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "RESULTS.md").read_text()
    for name in ("randread-4k-qd32", "randread-4k-qd1", "read-128k-qd8", "write-128k-qd8",
                 "randwrite-4k-qd32-wt", "randrw-4k-qd32-flush64", "vhu-file", "qsd-io_uring",
                 "## tmpfs", "## fs", "## direct", "## Targets"):
        assert name in text, name
    assert re.search(r"\| vhu-file \| [\d,]+\.\d", text)
    results = json.loads((tmp_path / "results.json").read_text())
    for setup in ("tmpfs", "fs", "direct"):
        runs = results["setups"][setup]["workloads"]["randread-4k-qd32"]["vhu-file"]
        assert runs[0]["iops"] > 0 and runs[0]["verify"]
    wt = results["setups"]["fs"]["workloads"]["randwrite-4k-qd32-wt"]
    assert wt["vhu-file"][0]["cache_mode"] == "write-through"
    assert results["setups"]["direct"]["workloads"]["randrw-4k-qd32-flush64"]["vhu-file"][0][
        "flushes"] > 0


@pytest.mark.skipif(not shutil.which("dpdk-testpmd"), reason="needs dpdk-testpmd")
def test_net_quick(tmp_path):
    """`bench/run.py --net --quick`: testpmd (virtio-user) against the Python
    sink and echo back-ends and DPDK's vhost PMD, 64 B only, 0.3 s windows;
    RESULTS.md's other sections stay, an old Network section is replaced."""
    (tmp_path / "RESULTS.md").write_text("# results\n\n## blk\n\nkept\n\n## Network\n\n"
                                         "old\n\n### old sub\n\n## Notes\n\nkept too\n")
    out = subprocess.run([sys.executable, "bench/run.py", "--net", "--quick", "--allow-dirty",
                          "--out", str(tmp_path), "--only", "tx-64,both-64", "--backends",
                          "vhu-sink,vhu-echo,dpdk-vhost"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# results\n\n## blk\n\nkept\n")
    assert len(re.findall(r"^## Network$", text, re.M)) == 1
    assert "old" not in text and text.endswith("\n## Notes\n\nkept too\n")
    for name in ("tx-64", "both-64", "vhu-sink", "vhu-echo", "dpdk-vhost"):
        assert name in text
    assert re.search(r"\| vhu-echo \| [\d,]+ \|", text)
    results = json.loads((tmp_path / "net_results.json").read_text())
    for w, n in (("tx-64", "vhu-sink"), ("tx-64", "dpdk-vhost"), ("both-64", "vhu-echo"),
                 ("both-64", "dpdk-vhost")):
        assert results["workloads"][w][n][0]["pps"] > 0, (w, n)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "net_pps_by_frame.png").stat().st_size > 0
