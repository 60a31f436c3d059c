#!/usr/bin/env python3
"""Runs every blk comparison: vhostuser's back-ends against qemu-storage-daemon,
on three storage setups.

    python bench/run.py             # full run; writes bench/RESULTS.md, results.json, chart
    python bench/run.py --all       # the same, then the net comparison (bench/net.py)
    python bench/run.py --quick     # a short smoke (seconds), results in a temp dir
    python bench/run.py --setups fs --only randread-4k-qd32 --backends vhu-file,qsd-io_uring

Setups (each in the published tables):

* tmpfs: the image in /dev/shm (both sides' data in memory);
* fs: the image on the file system the checkout lives on, page cache warm;
* direct: the image on that file system, O_DIRECT (vhostuser `--direct`,
  qemu-storage-daemon `cache.direct=on` with aio=native / io_uring).

Every back-end of a setup is started once, pinned to --backend-cpu, on a
socket of its own and the same raw image. Each measurement is one
`vhostuser-blkload --json --verify` run pinned to --client-cpu; the
back-ends of one workload run one after another, and the rounds rotate their
order, so each ratio compares runs taken next to each other. Reported: the
median of the rounds, min and max, and ratios of medians against the best
qemu-storage-daemon setting for that workload and setup, with the range of
same-round ratios.

Honest runs: every published run verifies data (--verify); a measurement
with an I/O error, a verify mismatch or a stall aborts the whole run and
nothing is tabled; the tree must be clean (the commit measured is in
RESULTS.md; --allow-dirty is for development and marks the output, which
then goes to a temp dir unless --out says otherwise); bench/RESULTS.md is
written only if the machine was quiet (1-minute load below --max-load
before the run, waiting up to --quiet-wait seconds).

    python bench/run.py --net [--quick] [net options]   # the net comparison only
                                     # (bench/net.py: DPDK testpmd, "## Network" section)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from vhostuser.blkload import Session, parse_size, stamp_file, warm_page_cache  # noqa: E402
from vhostuser.blkload.procstat import cpu_seconds, find_backend_pid, memory_kb  # noqa: E402

PY = sys.executable


class BenchFailure(RuntimeError):
    """A measurement that must not be tabled (I/O error, verify mismatch, stall)."""


# -- storage setups ---------------------------------------------------------------------

@dataclass
class Setup:
    name: str
    title: str
    direct: bool
    description: str
    scratch: str = ""          # directory of the image (set at run time)


SETUPS = {
    "tmpfs": Setup("tmpfs", "image on tmpfs", False,
                   "raw image in /dev/shm (tmpfs): the data is in memory for both sides"),
    "fs": Setup("fs", "image on the checkout's file system, page cache", False,
                "raw image on the file system the checkout lives on, opened without "
                "O_DIRECT; written 4 KiB at a time and synced before the run, so the page "
                "cache holds all of it (clean, in 4 KiB pages; see the notes); before every "
                "measurement the pages the kernel dropped since are read back in"),
    "direct": Setup("direct", "image on the checkout's file system, O_DIRECT", True,
                    "raw image on the file system the checkout lives on, opened with O_DIRECT "
                    "by both sides (vhostuser --direct, qemu-storage-daemon cache.direct=on); "
                    "its pages dropped from the page cache before the run"),
}


# -- back-ends --------------------------------------------------------------------------

@dataclass
class Spec:
    argv: object                   # (img, sock, size, setup) -> argv
    description: str
    setups: tuple = ("tmpfs", "fs", "direct")
    env: dict = field(default_factory=dict)


def vhu(extra, env=None):
    def argv(img, sock, size, setup=None):
        direct = ["--direct"] if setup is not None and setup.direct and "--blk-file" in \
            extra(img, size) else []
        return [PY, "-m", "vhostuser.cli.blk", "--socket-path", sock, *extra(img, size),
                *direct]
    return argv


def qsd(aio, iothread=False, writethrough=False):
    def argv(img, sock, size, setup=None):
        # An iothread polls adaptively (poll-max-ns 32768 by default), the
        # main loop qsd otherwise uses does not.
        obj = ["--object", "iothread,id=iot0"] if iothread else []
        direct = "on" if setup is not None and setup.direct else "off"
        return ["qemu-storage-daemon", *obj,
                "--blockdev", f"driver=file,node-name=file0,filename={img},aio={aio},"
                              f"cache.direct={direct}",
                "--blockdev", "driver=raw,node-name=raw0,file=file0",
                "--export", "type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                            f"addr.path={sock},writable=on,num-queues=1"
                            + (",iothread=iot0" if iothread else "")
                            + (",writethrough=on" if writethrough else "")]
    return argv


def _file(*more):
    return vhu(lambda img, size: ["--blk-file", img, *more])


# Where the image is on tmpfs there is no O_DIRECT (so aio=native, which
# needs it, is out); with O_DIRECT, aio=threads is left out (native and
# io_uring are what O_DIRECT is used with).
BACKENDS: dict[str, Spec] = {
    "vhu-file": Spec(_file(), "vhostuser C file back-end, default settings (the I/O path it "
                     "picks for where the image is; eventfd notifications with adaptive "
                     "polling up to 32 us)"),
    "vhu-file-sync": Spec(_file("--aio", "sync"), "the same, --aio sync: every read, write "
                          "and flush done in the queue worker"),
    "vhu-file-uring": Spec(_file(), "the same, every read and write through io_uring "
                           "(VHOSTUSER_BLK_IO_PATH=read=uring,write=uring)",
                           env={"VHOSTUSER_BLK_IO_PATH": "read=uring,write=uring"}),
    "vhu-file-winline": Spec(_file(), "the same, writes done in the queue worker "
                             "(VHOSTUSER_BLK_IO_PATH=write=inline); reads as by default",
                             setups=("fs", "direct"),
                             env={"VHOSTUSER_BLK_IO_PATH": "write=inline"}),
    "vhu-file-eventfd": Spec(_file("--adaptive-poll", "0"), "vhostuser C file back-end, "
                             "--adaptive-poll 0: a worker sleeps as soon as its rings are "
                             "empty"),
    "vhu-file-poll": Spec(_file("--poll", "1000"), "vhostuser C file back-end, --poll 1000 "
                          "(busy-polls)"),
    "vhu-ram": Spec(vhu(lambda img, size: ["--ramdisk", str(size)]),
                    "vhostuser C RAM disk (prefilled)", setups=("tmpfs",)),
    "vhu-ram-poll": Spec(vhu(lambda img, size: ["--ramdisk", str(size), "--poll", "1000"]),
                         "vhostuser C RAM disk (prefilled), --poll 1000", setups=("tmpfs",)),
    "vhu-py": Spec(vhu(lambda img, size: ["--backend", "bench.backends:PreadDisk",
                                          "--backend-opt", f"path={img}"]),
                   "vhostuser + pure-Python back-end (bench/backends.py: os.preadv/pwritev)",
                   setups=("tmpfs", "fs")),
}
for _aio, _setups in (("threads", ("tmpfs", "fs")), ("io_uring", ("tmpfs", "fs", "direct")),
                      ("native", ("direct",))):
    for _iot in (False, True):
        for _wt in (False, True):
            _name = "qsd-" + ("iot-" if _iot else "") + _aio + ("-wt" if _wt else "")
            BACKENDS[_name] = Spec(
                qsd(_aio, _iot, _wt),
                f"qemu-storage-daemon, aio={_aio}, cache.direct=off (on with O_DIRECT)"
                + (", export in an iothread (adaptive polling, poll-max-ns 32768)" if _iot
                   else "")
                + (", export writethrough=on (every write stable on completion)" if _wt
                   else ""),
                setups=_setups)
QSD = [n for n in BACKENDS if n.startswith("qsd") and not n.endswith("-wt")]
QSD_WT = [n for n in BACKENDS if n.startswith("qsd") and n.endswith("-wt")]
# The default and each other choice of I/O path, side by side.
PATHS = ["vhu-file", "vhu-file-sync", "vhu-file-uring", "vhu-file-winline"]


@dataclass
class Workload:
    name: str
    kw: dict                 # blkload arguments
    metric: str              # iops | mbps | p50
    backends: list
    setups: tuple = ("tmpfs", "fs", "direct")
    title: str = ""


WORKLOADS = [
    Workload("randread-4k-qd1", dict(rw="randread", bs="4k", qd=1), "p50",
             ["vhu-file", "vhu-file-sync", "vhu-file-uring", "vhu-file-eventfd", "vhu-file-poll",
              "vhu-py", *QSD],
             title="4 KiB random read, QD1"),
    Workload("randread-4k-qd32", dict(rw="randread", bs="4k", qd=32), "iops",
             [*PATHS, "vhu-file-poll", "vhu-ram", "vhu-py", *QSD],
             title="4 KiB random read, QD32"),
    Workload("randread-4k-qd32-spin", dict(rw="randread", bs="4k", qd=32, spin=True), "iops",
             ["vhu-file-poll", "vhu-ram-poll", "qsd-iot-io_uring"], setups=("tmpfs",),
             title="4 KiB random read, QD32, both sides polling (client --spin)"),
    Workload("randwrite-4k-qd32", dict(rw="randwrite", bs="4k", qd=32), "iops",
             [*PATHS, "vhu-ram", "vhu-py", *QSD],
             title="4 KiB random write, QD32, write-back (FLUSH negotiated, none sent)"),
    Workload("randwrite-4k-qd32-wt", dict(rw="randwrite", bs="4k", qd=32, write_through=True),
             "iops", [*PATHS, *QSD_WT],
             title="4 KiB random write, QD32, write-through (writeback=0 through CONFIG_WCE; "
                   "qemu-storage-daemon's export writethrough=on)"),
    Workload("read-128k-qd8", dict(rw="read", bs="128k", qd=8), "mbps",
             [*PATHS, "vhu-ram", "vhu-py", *QSD], title="128 KiB sequential read, QD8"),
    Workload("write-128k-qd8", dict(rw="write", bs="128k", qd=8), "mbps",
             [*PATHS, "vhu-ram", "vhu-py", *QSD],
             title="128 KiB sequential write, QD8, write-back"),
    Workload("randrw-4k-qd32-flush64",
             dict(rw="randrw", bs="4k", qd=32, rwmixread=70, flush_every=64), "iops",
             [*PATHS, "vhu-ram", "vhu-py", *QSD],
             title="4 KiB random 70% read / 30% write, QD32, a FLUSH after every 64 writes"),
]
SWEEP_QD = [1, 2, 4, 8, 16, 32, 64, 128]
SWEEP_BACKENDS = ["vhu-file", "vhu-py", *QSD]
HIGHER_IS_BETTER = {"iops": True, "mbps": True, "p50": False}
UNITS = {"iops": "IOPS", "mbps": "MB/s", "p50": "p50 latency (us)"}

# (setup, workload, back-end, op, threshold, description). Ratios against the
# best qemu-storage-daemon setting of the same workload and setup; "abs" is
# the metric itself.
TARGETS = [
    ("fs", "randread-4k-qd32", "vhu-file", ">=", 3.0, "real fs: 4k randread QD32 >= 3x"),
    ("fs", "randwrite-4k-qd32", "vhu-file", ">=", 2.5,
     "real fs: 4k randwrite QD32 write-back >= 2.5x"),
    ("fs", "randwrite-4k-qd32-wt", "vhu-file", ">=", 1.5,
     "real fs: 4k randwrite QD32 write-through >= 1.5x (issue 15)"),
    ("fs", "randrw-4k-qd32-flush64", "vhu-file", ">=", 2.0,
     "real fs: 70/30 mixed 4k QD32, FLUSH every 64 writes >= 2x"),
    ("fs", "read-128k-qd8", "vhu-file", ">=", 1.3, "real fs: 128k sequential read >= 1.3x"),
    ("fs", "write-128k-qd8", "vhu-file", ">=", 1.3, "real fs: 128k sequential write >= 1.3x"),
    ("fs", "randread-4k-qd32", "vhu-py", ">=", 1.5,
     "real fs: pure-Python back-end, 4k randread QD32 >= 1.5x"),
    *[("direct", w.name, "vhu-file", "<=" if w.metric == "p50" else ">=",
       1 / 1.2 if w.metric == "p50" else 1.2,
       f"O_DIRECT: {w.name} " + ("p50 <= 0.83x (1.2x faster)" if w.metric == "p50"
                                 else ">= 1.2x"))
      for w in WORKLOADS if "direct" in w.setups],
    ("tmpfs", "randread-4k-qd32-spin", "vhu-file-poll", "abs>=", 1.2e6,
     "tmpfs: 4k randread QD32, --poll, one queue >= 1.2 M IOPS"),
    # Earlier issues' targets, on tmpfs.
    ("tmpfs", "randread-4k-qd32", "vhu-file", ">=", 3.0, "tmpfs: 4k randread QD32 >= 3x"),
    ("tmpfs", "randread-4k-qd32", "vhu-py", ">=", 1.0,
     "tmpfs: pure-Python back-end, 4k randread QD32 >= 1x"),
    ("tmpfs", "randread-4k-qd1", "vhu-file", "<=", 0.75,
     "tmpfs: 4k QD1 p50 latency <= 0.75x (default: eventfd, adaptive polling)"),
    ("tmpfs", "randread-4k-qd1", "vhu-file-poll", "<=", 0.5,
     "tmpfs: 4k QD1 p50 latency <= 0.5x (--poll)"),
    ("tmpfs", "read-128k-qd8", "vhu-file", ">=", 1.5, "tmpfs: 128k sequential read >= 1.5x"),
]


def metric_of(result: dict, metric: str) -> float:
    return result["lat_us"]["p50"] if metric == "p50" else result[metric]


def pinned(cpu: str | None, nice: int, argv: list[str]) -> list[str]:
    pre = ["nice", "-n", str(nice)] if nice else []
    if cpu not in (None, "", "none"):
        pre += ["taskset", "-c", cpu]
    return pre + argv


class Backend:
    def __init__(self, name: str, workdir: Path, img: str, size: int, cpu, nice: int,
                 root: Path = ROOT, setup: Setup | None = None):
        self.name = name
        self.sock = str(workdir / f"{name}.sock")
        spec = BACKENDS[name]
        if isinstance(spec, tuple):      # (builder(img, sock, size), description)
            spec = Spec(lambda i, s, z, setup=None, b=spec[0]: b(i, s, z), spec[1])
        self.description = spec.description
        self.env = dict(spec.env)
        self.argv = spec.argv(img, self.sock, size, setup)
        self.cmd = pinned(cpu, nice, self.argv)
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=root, env={**os.environ, "PYTHONPATH": str(root),
                                                    **self.env})
        self.pid = None

    @property
    def command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + " ".join(shlex.quote(a) for a in self.cmd)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{Path(self.log.name).read_text()[-2000:]}")
            if os.path.exists(self.sock):
                self.pid = find_backend_pid(self.sock)
                if self.pid:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no socket after {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def blkload(args, backend: Backend, seconds: float, **kw) -> dict:
    """One measurement. Raises BenchFailure if the run had an I/O error, a
    verify mismatch or a stall: such a run is never tabled."""
    argv = [PY, "-m", "vhostuser.blkload", "--socket", backend.sock, "--json",
            "--seconds", str(seconds), "--pid", str(backend.pid)]
    if args.warmup is not None:
        argv += ["--warmup", str(args.warmup)]
    if args.verify:
        argv.append("--verify")
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v not in (False, None):
            argv += [flag, str(v)]
    cmd = pinned(args.client_cpu, args.nice, argv)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    shown = " ".join(shlex.quote(a) for a in argv)
    if not p.stdout.strip():
        raise BenchFailure(f"{backend.name}: blkload failed ({p.returncode}): "
                           f"{p.stderr.strip()[-2000:]}\n  command: {shown}")
    r = json.loads(p.stdout)
    r["cmd"] = shown
    bad = {k: r.get(k) for k in ("errors", "verify_errors", "error", "stalled") if r.get(k)}
    if bad or p.returncode != 0:
        raise BenchFailure(f"{backend.name}: {bad or 'exit status ' + str(p.returncode)}"
                           f"\n  command: {shown}")
    return r


def prefill(backend: Backend) -> None:
    """Stamps every sector of a RAM disk: it starts as zeroes, and every
    measured run verifies."""
    pre = subprocess.run([PY, "-m", "vhostuser.blkload", "--socket", backend.sock, "--prefill",
                          "--json"], cwd=ROOT, capture_output=True, text=True)
    if pre.returncode != 0:
        raise BenchFailure(f"{backend.name}: prefill failed: {pre.stdout} {pre.stderr}")


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def loadavg() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(limit: float, max_wait: float) -> float:
    """Waits (up to max_wait s) for the 1-minute load to drop below limit."""
    deadline = time.monotonic() + max_wait
    while loadavg() > limit and time.monotonic() < deadline:
        time.sleep(5)
    return loadavg()


def quiet_or_refuse(program: str, limit: float, max_wait: float) -> float | None:
    """Before a published run: the 1-minute load, once below limit (waiting
    up to max_wait s), or None after telling why nothing will be published."""
    load0 = loadavg()
    if load0 < limit:
        return load0
    print(f"load {load0:.2f}: waiting up to {max_wait:.0f} s for it to drop below {limit}",
          flush=True)
    load0 = wait_for_quiet(limit, max_wait)
    if load0 < limit:
        return load0
    print(f"{program}: the machine is not quiet (1-minute load {load0:.2f} >= {limit}): "
          "bench/RESULTS.md is published only from a quiet run. Use --out DIR for a run on a "
          "busy machine.", file=sys.stderr)
    return None


def git(*argv) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


#: What a published run writes (relative to the checkout).
OUTPUTS = frozenset({"bench/RESULTS.md", "bench/results.json", "bench/blk_iops_vs_qd.png",
                     "bench/net_results.json", "bench/net_pps_by_frame.png"})


def tree_state(ignore: frozenset = frozenset()) -> tuple[str, bool]:
    """(HEAD's full commit, whether the tree has uncommitted changes,
    untracked files included, other than the paths in `ignore`)."""
    # "XY PATH" per line; git() strips the output, and with it the first
    # line's leading blank, so split rather than cut at a column.
    changed = [line.split(None, 1)[1] for line in git("status", "--porcelain").splitlines()
               if line.strip()]
    return git("rev-parse", "HEAD"), any(path not in ignore for path in changed)


def machine_info() -> dict:
    info = {"kernel": platform.release(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["qsd"] = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                                     text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        info["qsd"] = "?"
    info["virt"] = subprocess.run(["systemd-detect-virt"], capture_output=True,
                                  text=True).stdout.strip() if shutil.which(
        "systemd-detect-virt") else "?"
    try:
        fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "--target",
                             str(ROOT)], capture_output=True, text=True).stdout.strip()
        info["checkout fs"] = fs or "?"
    except OSError:
        info["checkout fs"] = "?"
    return info


# -- images -------------------------------------------------------------------------------

def scratch_dir(setup: Setup) -> Path:
    """tmpfs: /dev/shm; fs/direct: ROOT/_work (git-ignored), on the checkout's
    file system (checked)."""
    if setup.name == "tmpfs":
        return Path(tempfile.mkdtemp(prefix="vhu-bench-", dir="/dev/shm"))
    base = ROOT / "_work"
    base.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f"bench-{setup.name}-", dir=base))
    if os.stat(d).st_dev != os.stat(ROOT).st_dev:
        raise RuntimeError(f"{d} is not on the checkout's file system")
    return d


def make_image(setup: Setup, img: str, size: int) -> None:
    """A stamped image (for --verify), in the state the setup says."""
    if setup.name != "fs":
        stamp_file(img, size)
        if setup.direct:
            fd = os.open(img, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return
    # Written 4 KiB at a time: the page cache then holds the image in 4 KiB
    # pages, as after a guest's small writes. Written in large chunks, a
    # file lands in large folios, and on this kernel (6.x ext4) every 4 KiB
    # buffered write into one costs ~100 us of the kernel's time, which
    # bounds every back-end alike (notes).
    stamp_file(img, size, write_size=4096)
    fd = os.open(img, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the run ---------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--net" in argv:
        from bench import net
        return net.main([a for a in argv if a != "--net"])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke: tiny image, 1 round, "
                   "0.3 s runs, results in a temp dir")
    p.add_argument("--all", action="store_true", help="then the net comparison (bench/net.py "
                   "with its defaults), into the same RESULTS.md")
    p.add_argument("--setups", default="tmpfs,fs,direct",
                   help="comma-separated: tmpfs, fs, direct (default: all three)")
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--reps", type=int, default=3, help="rounds (medians over these)")
    p.add_argument("--image-size", default="1G")
    p.add_argument("--backend-cpu", default="0", help="taskset list for back-ends ('none')")
    p.add_argument("--client-cpu", default="1", help="taskset list for the client ('none')")
    p.add_argument("--nice", type=int, default=-5,
                   help="nice value for back-ends and client alike (0: leave)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="development only: don't check data (the output says so)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="development only: run on a tree with uncommitted changes (the output "
                        "says so, and goes to a temp dir unless --out is given)")
    p.add_argument("--no-sweep", action="store_true", help="skip the IOPS-vs-QD sweep")
    p.add_argument("--sweep-setup", default="fs", help="setup of the IOPS-vs-QD sweep")
    p.add_argument("--only", help="comma-separated workload names")
    p.add_argument("--backends", help="comma-separated back-end names (default: all)")
    p.add_argument("--out", help="directory for RESULTS.md, results.json and the chart "
                   "(default bench/, or a temp dir with --quick or --allow-dirty)")
    p.add_argument("--idle-seconds", type=float, default=3.0)
    p.add_argument("--net", action="store_true", help="run the net comparison instead "
                   "(bench/net.py; its own options follow)")
    p.add_argument("--max-load", type=float, default=0.3,
                   help="bench/RESULTS.md is written only if the 1-minute load was below this "
                        "before the run (default 0.3)")
    p.add_argument("--quiet-wait", type=float, default=600.0,
                   help="seconds to wait for that before starting (default 600)")
    p.add_argument("--round-load", type=float, default=0.0,
                   help="also wait up to 5 min before each round for the load to drop below "
                        "this (0: don't)")
    args = p.parse_args(argv)
    sweep_qd = SWEEP_QD
    if args.quick:
        args.seconds, args.reps, args.image_size = 0.3, 1, "64M"
        args.warmup = 0.05 if args.warmup is None else args.warmup
        args.idle_seconds = 0.5
        sweep_qd = [1, 32]
    commit, dirty = tree_state()
    if dirty and not args.allow_dirty:
        print("bench/run.py: the tree has uncommitted changes: commit them (RESULTS.md names "
              "the commit it measured), or pass --allow-dirty for a development run",
              file=sys.stderr)
        return 2
    development = []
    if dirty:
        development.append("uncommitted changes (--allow-dirty)")
    if not args.verify:
        development.append("data not verified (--no-verify)")
    publish = not args.out and not args.quick and not development
    out = Path(args.out) if args.out else (HERE if publish else
                                           Path(tempfile.mkdtemp(prefix="vhu-bench-")))
    out.mkdir(parents=True, exist_ok=True)
    load0 = quiet_or_refuse("bench/run.py", args.max_load, args.quiet_wait) if publish \
        else loadavg()
    if load0 is None:
        return 3
    size = parse_size(args.image_size)
    setups = [SETUPS[s] for s in args.setups.split(",")]
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    wanted = set(args.backends.split(",")) if args.backends else set(BACKENDS)
    results: dict = {"commit": commit, "dirty": dirty, "development": development,
                     "argv": argv, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "load_before": load0, "machine": machine_info(),
                     "args": {k: v for k, v in vars(args).items()}, "setups": {}}
    print(f"commit {commit[:12]}{' + uncommitted changes' if dirty else ''}; back-ends on "
          f"CPU {args.backend_cpu}, client on CPU {args.client_cpu}, nice {args.nice}; "
          f"load {load0:.2f}; output {out}", flush=True)
    try:
        for setup in setups:
            results["setups"][setup.name] = run_setup(
                args, setup, size, [w for w in workloads if setup.name in w.setups], wanted,
                sweep_qd if setup.name == args.sweep_setup and not args.no_sweep else [])
    except BenchFailure as exc:
        (out / "results-failed.json").write_text(json.dumps(results, indent=1, default=str))
        print(f"\nbench/run.py: FAILED, nothing tabled: {exc}\n(partial results: "
              f"{out / 'results-failed.json'})", file=sys.stderr)
        return 1
    results["load_after"] = loadavg()
    report = analyse(results)
    text = render(args, results, report)
    print(text)
    md = out / "RESULTS.md"
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md.write_text(text + network_section(md))
    chart(results, out / "blk_iops_vs_qd.png")
    print(f"wrote {md}", flush=True)
    if args.all:
        from bench import net
        # The blk tables just written are the only change net.py may find.
        net_argv = (["--out", str(out), "--after-blk"] + (["--quick"] if args.quick else [])
                    + (["--allow-dirty"] if args.allow_dirty else []))
        return net.main(net_argv)
    return 0


def network_section(md: Path) -> str:
    """The "## Network" section of an existing RESULTS.md (bench/net.py's),
    kept as it is."""
    if not md.exists():
        return ""
    text = md.read_text()
    m = re.search(r"^## Network\s*$", text, re.M)
    if not m:
        return ""
    rest = re.search(r"^## ", text[m.end():], re.M)
    return "\n" + text[m.start(): m.end() + rest.start() if rest else len(text)].rstrip("\n") \
        + "\n"


def run_setup(args, setup: Setup, size: int, workloads: list[Workload], wanted: set,
              sweep_qd: list[int]) -> dict:
    workdir = scratch_dir(setup)
    setup.scratch = str(workdir)
    img = str(workdir / "disk.img")
    needed = {n for w in workloads for n in w.backends} | (set(SWEEP_BACKENDS) if sweep_qd
                                                           else set())
    names = [n for n in BACKENDS if n in wanted and n in needed
             and setup.name in BACKENDS[n].setups]
    res: dict = {"workloads": {}, "sweep": {}, "idle": {}, "rss": {}, "commands": {},
                 "descriptions": {}, "image": img, "description": setup.description}
    print(f"== {setup.name}: {setup.title}; image {img} ({size} bytes, stamped)", flush=True)
    t0 = time.monotonic()
    make_image(setup, img, size)
    res["image_seconds"] = round(time.monotonic() - t0, 1)
    backends: dict[str, Backend] = {}
    try:
        for n in names:
            backends[n] = Backend(n, workdir, img, size, args.backend_cpu, args.nice,
                                  setup=setup)
        for b in backends.values():
            b.wait_ready()
            res["commands"][b.name] = b.command
            res["descriptions"][b.name] = b.description
        for n in [n for n in backends if n.startswith("vhu-ram")]:
            prefill(backends[n])
        measure_idle(args, backends, res)
        for rep in range(args.reps):
            if args.round_load:
                print(f"round {rep + 1}: load {wait_for_quiet(args.round_load, 300):.2f}",
                      flush=True)
            for w in workloads:
                bnames = [n for n in w.backends if n in backends]
                shift = rep % len(bnames) if bnames else 0
                for n in bnames[shift:] + bnames[:shift]:
                    # This machine's page cache loses pages over minutes with
                    # no memory pressure: each run starts from all of it.
                    warm = warm_page_cache(img) if setup.name == "fs" else None
                    with MemorySampler(res, n, backends[n].pid, img):
                        r = blkload(args, backends[n], args.seconds, **w.kw)
                    r["warm"] = warm
                    r["round"] = rep
                    r["load"] = loadavg()
                    res["workloads"].setdefault(w.name, {}).setdefault(n, []).append(r)
                    print(f"[{setup.name} {rep + 1}/{args.reps}] {w.name:22} {n:20} IOPS "
                          f"{r['iops']:>9.0f} MB/s {r['mbps']:>8.1f} p50 "
                          f"{r['lat_us']['p50']:>7.1f}us p99 {r['lat_us']['p99']:>8.1f}us  "
                          f"back-end CPU {r.get('backend', {}).get('cpu_pct', '?')}%  "
                          f"load {r['load']:.2f}", flush=True)
            if sweep_qd:
                sweep_names = [n for n in SWEEP_BACKENDS if n in backends]
                for qd in sweep_qd:
                    for n in sweep_names[rep % len(sweep_names):] + \
                            sweep_names[:rep % len(sweep_names)]:
                        r = blkload(args, backends[n], max(args.seconds / 2, 0.3),
                                    rw="randread", bs="4k", qd=qd)
                        res["sweep"].setdefault(n, {}).setdefault(qd, []).append(r["iops"])
                print(f"[{setup.name} {rep + 1}/{args.reps}] sweep done", flush=True)
        for n, b in backends.items():
            sample_memory(res, n, b.pid, img)
            if n.startswith("vhu-file"):
                res.setdefault("logs", {})[n] = Path(b.log.name).read_text()[-1000:]
    finally:
        for b in backends.values():
            b.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    # keep the workloads in table order
    res["workloads"] = {w.name: res["workloads"][w.name] for w in workloads
                        if w.name in res["workloads"]}
    return res


def measure_idle(args, backends: dict, res: dict) -> None:
    """Idle CPU: every back-end with a session set up (rings, memory), after
    some I/O (a device that was just busy must not poll on), no I/O since."""
    sessions = [Session(b.sock, qd=1, bs=4096) for b in backends.values()]
    try:
        for s in sessions:
            s.run(random=True, read_pct=100, seconds=0.2)
        time.sleep(0.2)
        c0 = {n: cpu_seconds(b.pid) for n, b in backends.items()}
        time.sleep(args.idle_seconds)
        for n, b in backends.items():
            res["idle"][n] = round((cpu_seconds(b.pid) - c0[n]) / args.idle_seconds * 100, 2)
    finally:
        for s in sessions:
            s.close()
    print("idle CPU %: " + ", ".join(f"{n} {v}" for n, v in res["idle"].items()), flush=True)


def sample_memory(results: dict, name: str, pid: int, image: str) -> None:
    """Updates results["rss"][name]: the latest VmHWM/VmRSS and the largest
    own-memory sample (VmRSS less the mapped image)."""
    m = memory_kb(pid, image)
    entry = results["rss"].setdefault(name, {})
    own = m["VmRSS"] - m.get("image_kb", 0)
    entry.update(VmHWM=m["VmHWM"], VmRSS=m["VmRSS"], image_kb=m.get("image_kb", 0),
                 own_peak_kb=max(own, entry.get("own_peak_kb", 0)))


class MemorySampler:
    """sample_memory() every 0.1 s while the block runs (the front-end is
    connected then, its memory mapped: the peak is in there)."""

    def __init__(self, results: dict, name: str, pid: int, image: str):
        self.args = (results, name, pid, image)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                sample_memory(*self.args)
            except OSError:
                return      # the process is gone
            if self.done.wait(0.1):
                return

    def __enter__(self) -> "MemorySampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def rss_target(res: dict) -> str:
    """'vhu-file X MiB vs qsd Y MiB + 15: met' from the own-memory peaks."""
    ours = res["rss"].get("vhu-file", {}).get("own_peak_kb")
    qsd = [m["own_peak_kb"] for n, m in res["rss"].items() if n.startswith("qsd")]
    if not ours or not qsd:
        return ""
    limit = min(qsd) + 15e6 / 1024      # 15 MB
    return (f"vhu-file {ours / 1024:.1f} MiB, qemu-storage-daemon {min(qsd) / 1024:.1f} MiB "
            f"(+15 MB allowed: {limit / 1024:.1f} MiB): {'met' if ours <= limit else 'NOT met'}")


# -- analysis --------------------------------------------------------------------------

def analyse(results) -> dict:
    """setup -> workload -> {metric, best_qsd, rows: back-end -> stats}"""
    report: dict = {}
    for sname, res in results["setups"].items():
        for w in WORKLOADS:
            per = res["workloads"].get(w.name, {})
            if not per:
                continue
            higher = HIGHER_IS_BETTER[w.metric]
            stats = {n: summarize([metric_of(r, w.metric) for r in rs]) for n, rs in per.items()}
            qsds = [n for n in stats if n.startswith("qsd")]
            best = (max if higher else min)(qsds, key=lambda n: stats[n]["median"]) \
                if qsds else None
            rows = {}
            for n, s in stats.items():
                row = dict(s)
                rs = per[n]
                row["cpu_us_per_io"] = statistics.median(
                    [r["backend"]["cpu_us_per_io"] or 0 for r in rs if "backend" in r] or [0])
                for k in ("p99", "p99.9"):
                    row[k] = statistics.median([r["lat_us"][k] for r in rs])
                row["iops"] = statistics.median([r["iops"] for r in rs])
                row["mbps"] = statistics.median([r["mbps"] for r in rs])
                row["p50"] = statistics.median([r["lat_us"]["p50"] for r in rs])
                row["flush_us"] = statistics.median([r["flush_lat_us_mean"] for r in rs]) \
                    if all(r.get("flush_lat_us_mean") for r in rs) else None
                row["cache_mode"] = rs[0].get("cache_mode")
                row["ratio"] = row["ratio_min"] = row["ratio_max"] = None
                if best and stats[best]["median"]:
                    row["ratio"] = s["median"] / stats[best]["median"]
                    # Ratios of runs taken in the same round (alternating), min..max.
                    pair = [metric_of(r, w.metric) / metric_of(q, w.metric)
                            for r in rs for q in per[best] if q["round"] == r["round"]
                            and metric_of(q, w.metric)]
                    row["ratio_min"] = min(pair) if pair else None
                    row["ratio_max"] = max(pair) if pair else None
                # against our own default, same rounds (the I/O path choices)
                if "vhu-file" in per and n != "vhu-file":
                    pair = [metric_of(r, w.metric) / metric_of(q, w.metric)
                            for r in rs for q in per["vhu-file"] if q["round"] == r["round"]
                            and metric_of(q, w.metric)]
                    row["vs_default"] = statistics.median(pair) if pair else None
                    row["vs_default_min"] = min(pair) if pair else None
                    row["vs_default_max"] = max(pair) if pair else None
                rows[n] = row
            report.setdefault(sname, {})[w.name] = {"metric": w.metric, "best_qsd": best,
                                                    "rows": rows, "workload": w}
    return report


def target_rows(report: dict) -> list[dict]:
    out = []
    for sname, wname, n, op, thr, desc in TARGETS:
        row = report.get(sname, {}).get(wname, {}).get("rows", {}).get(n)
        t = {"setup": sname, "workload": wname, "backend": n, "op": op, "threshold": thr,
             "description": desc, "measured": None}
        if row:
            if op == "abs>=":
                t.update(measured=row["median"], low=row["min"], high=row["max"],
                         met=row["median"] >= thr, met_low=row["min"] >= thr)
            elif row.get("ratio") is not None:
                ok = (lambda v: v >= thr) if op == ">=" else (lambda v: v <= thr)
                low = row["ratio_min"] if op == ">=" else row["ratio_max"]
                t.update(measured=row["ratio"], low=row["ratio_min"], high=row["ratio_max"],
                         met=ok(row["ratio"]), met_low=ok(low))
        out.append(t)
    return out


def _fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def render(args, results, report) -> str:
    info = results["machine"]
    dev = results["development"]
    lines = ["# vhostuser benchmark results", ""]
    if dev:
        lines += [f"**DEVELOPMENT RUN, NOT FOR PUBLICATION: {'; '.join(dev)}.**", ""]
    lines += [f"Generated by `python bench/run.py {' '.join(results['argv'])}` on "
              f"{results['date']}, at commit `{results['commit']}`"
              + (" plus uncommitted changes" if results["dirty"] else " (clean tree)") + ".",
              ""]
    lines += ["## Machine", ""]
    for k in ("cpu", "cpus", "mem", "virt", "kernel", "checkout fs", "python", "qsd"):
        lines.append(f"- {k}: {info.get(k, '?')}")
    loads = [r["load"] for res in results["setups"].values()
             for per in res["workloads"].values() for rs in per.values() for r in rs]
    lines.append(f"- 1-minute load average before the run: {results['load_before']:.2f}"
                 + (f"; during the runs: median {statistics.median(loads):.2f}, min "
                    f"{min(loads):.2f}, max {max(loads):.2f}" if loads else ""))
    lines += ["", "Method: back-ends pinned with "
              f"`taskset -c {args.backend_cpu}`, the client with `taskset -c {args.client_cpu}`, "
              f"all at `nice -n {args.nice}`; {args.seconds} s per measurement after a warm-up "
              f"(min(1 s, seconds/5)), {args.reps} rounds, back-end order rotated each round. "
              "Client: `vhostuser-blkload` (C hot loop, eventfd waits, EVENT_IDX, direct "
              "3-descriptor chains, split ring), "
              + ("`--verify` on every run (every written sector stamped, every read sector "
                 "checked; a run with an I/O error or a mismatch aborts the whole run)"
                 if args.verify else "**data not verified**")
              + "; FLUSH negotiated (as Linux does) unless the row says otherwise. Median over "
              "rounds; [min..max] across rounds; ratio = median / median of the best "
              "qemu-storage-daemon setting for that workload and setup, with the range of "
              "same-round ratios. Image: "
              f"{args.image_size}, every sector written (stamped), so no read hits a hole.", ""]
    lines += ["Setups:", ""]
    for sname in results["setups"]:
        lines.append(f"- **{sname}**: {SETUPS[sname].description}.")
    lines.append("")
    trows = target_rows(report)
    lines += ["## Targets", "",
              "Ratios against the best qemu-storage-daemon setting of the same run and setup "
              "(median of rounds, [range of same-round ratios]); met = the median meets it; "
              "lower end = the worst same-round ratio meets it too.", "",
              "| target | back-end | measured [range] | met | lower end |", "|---|---|---|---|---|"]
    for t in trows:
        if t["measured"] is None:
            lines.append(f"| {t['description']} | {t['backend']} | not measured | - | - |")
            continue
        if t["op"] == "abs>=":
            m = f"{t['measured']:,.0f} IOPS [{t['low']:,.0f}..{t['high']:,.0f}]"
        else:
            m = f"{t['measured']:.2f}x [{t['low']:.2f}..{t['high']:.2f}]"
        lines.append(f"| {t['description']} | {t['backend']} | {m} | "
                     f"{'yes' if t['met'] else 'NO'} | {'yes' if t['met_low'] else 'no'} |")
    lines.append("")
    for sname, per_w in report.items():
        lines += [f"## {sname}: {SETUPS[sname].title}", ""]
        for wname, rep in per_w.items():
            metric = rep["metric"]
            w = rep["workload"]
            lines += [f"### {sname} / {wname} — {UNITS[metric]}"
                      + (f" (best qsd: {rep['best_qsd']})" if rep["best_qsd"] else ""), "",
                      f"{w.title}.", ""]
            flush = any(r.get("flush_us") for r in rep["rows"].values())
            lines += ["| back-end | median | min | max | ratio vs best qsd [range] | IOPS | "
                      "MB/s | p50 us | p99 us | p99.9 us | back-end CPU us/IO |"
                      + (" FLUSH mean us |" if flush else ""),
                      "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if flush else "")]
            for n, r in rep["rows"].items():
                ratio = (f"{r['ratio']:.2f}x [{r['ratio_min']:.2f}..{r['ratio_max']:.2f}]"
                         if r.get("ratio") is not None else "-")
                lines.append(f"| {n} | {_fmt(r['median'])} | {_fmt(r['min'])} | "
                             f"{_fmt(r['max'])} | {ratio} | {_fmt(r['iops'], 0)} | "
                             f"{_fmt(r['mbps'])} | {_fmt(r['p50'])} | {_fmt(r['p99'])} | "
                             f"{_fmt(r['p99.9'])} | {_fmt(r['cpu_us_per_io'], 2)} |"
                             + (f" {_fmt(r['flush_us'])} |" if flush else ""))
            lines.append("")
    lines += render_paths(report)
    lines += render_idle(args, results)
    sweeps = {s: res["sweep"] for s, res in results["setups"].items() if res["sweep"]}
    for sname, sweep in sweeps.items():
        lines += ["", f"## 4k random read IOPS against queue depth, {sname} "
                  "(chart: blk_iops_vs_qd.png)", "",
                  "| back-end | " + " | ".join(f"QD{q}" for q in SWEEP_QD) + " |",
                  "|---|" + "---|" * len(SWEEP_QD)]
        for n, per in sweep.items():
            lines.append(f"| {n} | " + " | ".join(
                _fmt(statistics.median(per[q]), 0) if q in per else "-" for q in SWEEP_QD) + " |")
    lines += ["", "## Commands", ""]
    for sname, res in results["setups"].items():
        lines += [f"Back-ends, {sname} (IMG = {res['image']}, SOCK in its directory):", ""]
        for n, c in res["commands"].items():
            lines.append(f"- {n} ({res['descriptions'][n]}): "
                         f"`{c.replace(res['image'], 'IMG')}`")
        lines.append("")
    lines += ["Client (one per measurement), e.g.:", ""]
    pre = " ".join(pinned(args.client_cpu, args.nice, []))
    seen = set()
    for res in results["setups"].values():
        for wname, per in res["workloads"].items():
            if wname in seen:
                continue
            seen.add(wname)
            rs = next(iter(per.values()))
            lines.append(f"- {wname}: `{pre} {rs[0]['cmd']}`")
    notes = HERE / "blk_notes.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip("\n")]
    lines.append("")
    return "\n".join(lines)


def render_paths(report) -> list[str]:
    """The I/O path choices side by side: each against the default."""
    names = [n for n in PATHS if n != "vhu-file"]
    rows = []
    for sname, per_w in report.items():
        for wname, rep in per_w.items():
            r = rep["rows"]
            if "vhu-file" not in r or not any(n in r for n in names):
                continue
            cells = []
            for n in names:
                x = r.get(n)
                if not x or x.get("vs_default") is None:
                    cells.append("-")
                    continue
                v, lo, hi = x["vs_default"], x["vs_default_min"], x["vs_default_max"]
                if HIGHER_IS_BETTER[rep["metric"]]:
                    cells.append(f"{v:.2f} [{lo:.2f}..{hi:.2f}]")
                else:       # latency: speed = default / other
                    cells.append(f"{1 / v:.2f} [{1 / hi:.2f}..{1 / lo:.2f}]")
            rows.append(f"| {sname} | {wname} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["## I/O path choices against the default", "",
            "Speed of each other choice relative to the default (`vhu-file`), median of "
            "same-round ratios [range]: below 1 means the default is faster. "
            "`-sync`: everything in the queue worker; `-uring`: every read and write through "
            "io_uring; `-winline`: writes in the worker, reads as by default.", "",
            "| setup | workload | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names), *rows, ""]


def render_idle(args, results) -> list[str]:
    lines = ["## Idle CPU and memory", "",
             "Idle: a front-end connected with one ring set up, after 0.2 s of 4k QD1 reads, "
             f"no I/O since, for {args.idle_seconds} s. Peak RSS: VmHWM at the end of the "
             "setup's runs. Own memory: VmRSS less the resident pages of the process's "
             "mappings of the image, sampled every 0.1 s during the measurements, the largest "
             "sample. (vhostuser maps an image on tmpfs to read it; those pages are the file's "
             "page cache, there whoever reads it, and count in VmRSS/VmHWM only because they "
             "are mapped. The RAM disk's memory is its own.)", "",
             "| setup | back-end | idle CPU % | peak RSS (VmHWM) MiB | own memory, peak sample "
             "MiB | RSS at end MiB |", "|---|---|---|---|---|---|"]
    for sname, res in results["setups"].items():
        for n in res["idle"]:
            m = res["rss"].get(n, {})
            lines.append(f"| {sname} | {n} | {res['idle'][n]:.2f} | "
                         f"{m.get('VmHWM', 0) / 1024:.1f} | {m.get('own_peak_kb', 0) / 1024:.1f}"
                         f" | {m.get('VmRSS', 0) / 1024:.1f} |")
    for sname, res in results["setups"].items():
        rss = rss_target(res)
        if rss:
            lines += ["", f"RSS target (C file back-end, own memory, {sname}): {rss}"]
    return lines


def chart(results, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)", flush=True)
        return
    sweeps = {s: res["sweep"] for s, res in results["setups"].items() if res["sweep"]}
    if not sweeps:
        return
    sname, sweep = next(iter(sweeps.items()))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, per in sweep.items():
        qds = sorted(int(q) for q in per)
        ax.plot(qds, [statistics.median(per[q]) for q in qds], marker="o", label=n)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("queue depth")
    ax.set_ylabel("IOPS (4 KiB random read, median)")
    ax.set_title(f"vhost-user-blk: vhostuser vs qemu-storage-daemon ({sname})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
