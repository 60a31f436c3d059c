#!/usr/bin/env python3
"""Runs every blk comparison: vhostuser's back-ends against qemu-storage-daemon.

    python bench/run.py             # full run; writes bench/RESULTS.md and the chart
    python bench/run.py --quick     # a short smoke (seconds), results in a temp dir

Every back-end is started once, pinned to --backend-cpu, on a socket of its
own and the same raw image on tmpfs (or a RAM disk of the same size,
prefilled). Each measurement is one `python -m vhostuser.blkload --json` run
pinned to --client-cpu; the back-ends of one workload run one after another,
and the rounds rotate their order, so each ratio compares runs taken next to
each other. Reported: the median of the rounds, min and max, and ratios of
medians against the best qemu-storage-daemon setting for that workload.

    python bench/run.py --net [--quick] [net options]   # the net comparison instead
                                     # (bench/net.py: DPDK testpmd, "## Network" section)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from vhostuser.blkload import Session, parse_size, stamp_file  # noqa: E402
from vhostuser.blkload.procstat import cpu_seconds, find_backend_pid, memory_kb  # noqa: E402

PY = sys.executable


def vhu(extra):
    def argv(img, sock, size):
        return [PY, "-m", "vhostuser.cli.blk", "--socket-path", sock, *extra(img, size)]
    return argv


def qsd(aio, iothread=False):
    def argv(img, sock, size):
        # An iothread polls adaptively (poll-max-ns 32768 by default), the
        # main loop qsd otherwise uses does not.
        obj = ["--object", "iothread,id=iot0"] if iothread else []
        return ["qemu-storage-daemon", *obj,
                "--blockdev", f"driver=file,node-name=file0,filename={img},aio={aio},"
                              "cache.direct=off",
                "--blockdev", "driver=raw,node-name=raw0,file=file0",
                "--export", "type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                            f"addr.path={sock},writable=on,num-queues=1"
                            + (",iothread=iot0" if iothread else "")]
    return argv


# name -> (argv builder, description). qsd: cache.direct=off because tmpfs
# has no O_DIRECT (so aio=native, which needs it, is out).
BACKENDS = {
    "vhu-file": (vhu(lambda img, size: ["--blk-file", img]),
                 "vhostuser C file back-end, default settings: eventfd notifications with "
                 "adaptive polling (up to 32 us after serving requests); an image on tmpfs "
                 "is read by the workers through a mapping of its page cache"),
    "vhu-file-eventfd": (vhu(lambda img, size: ["--blk-file", img, "--adaptive-poll", "0"]),
                         "vhostuser C file back-end, --adaptive-poll 0: a worker sleeps as "
                         "soon as its rings are empty"),
    "vhu-file-sync": (vhu(lambda img, size: ["--blk-file", img, "--aio", "sync"]),
                      "vhostuser C file back-end, preadv in the worker"),
    "vhu-file-poll": (vhu(lambda img, size: ["--blk-file", img, "--poll", "1000"]),
                      "vhostuser C file back-end, --poll 1000"),
    "vhu-ram": (vhu(lambda img, size: ["--ramdisk", str(size)]),
                "vhostuser C RAM disk (prefilled)"),
    "vhu-py": (vhu(lambda img, size: ["--backend", "bench.backends:PreadDisk",
                                      "--backend-opt", f"path={img}"]),
               "vhostuser + pure-Python back-end (bench/backends.py, preadv)"),
    "qsd-threads": (qsd("threads"), "qemu-storage-daemon, aio=threads, cache.direct=off"),
    "qsd-io_uring": (qsd("io_uring"), "qemu-storage-daemon, aio=io_uring, cache.direct=off"),
    "qsd-iot-threads": (qsd("threads", iothread=True),
                        "qemu-storage-daemon, aio=threads, cache.direct=off, export in an "
                        "iothread (adaptive polling, poll-max-ns 32768)"),
    "qsd-iot-io_uring": (qsd("io_uring", iothread=True),
                         "qemu-storage-daemon, aio=io_uring, cache.direct=off, export in an "
                         "iothread (adaptive polling, poll-max-ns 32768)"),
}
QSD = [n for n in BACKENDS if n.startswith("qsd")]

# name -> blkload arguments, back-ends, the metric compared
WORKLOADS = [
    ("randread-4k-qd32", dict(rw="randread", bs="4k", qd=32),
     ["vhu-file", "vhu-file-eventfd", "vhu-file-sync", "vhu-file-poll", "vhu-ram", "vhu-py",
      *QSD], "iops"),
    ("randread-4k-qd1", dict(rw="randread", bs="4k", qd=1),
     ["vhu-file", "vhu-file-eventfd", "vhu-file-sync", "vhu-file-poll", "vhu-ram", "vhu-py",
      *QSD], "p50"),
    ("read-128k-qd32", dict(rw="read", bs="128k", qd=32),
     ["vhu-file", "vhu-file-sync", "vhu-ram", "vhu-py", *QSD], "mbps"),
    ("randwrite-4k-qd32", dict(rw="randwrite", bs="4k", qd=32),
     ["vhu-file", "vhu-file-sync", "vhu-ram", "vhu-py", *QSD], "iops"),
]
SWEEP_QD = [1, 2, 4, 8, 16, 32, 64, 128]
SWEEP_BACKENDS = ["vhu-file", "vhu-py", *QSD]
HIGHER_IS_BETTER = {"iops": True, "mbps": True, "p50": False}


def metric_of(result: dict, metric: str) -> float:
    return result["lat_us"]["p50"] if metric == "p50" else result[metric]


def pinned(cpu: str | None, nice: int, argv: list[str]) -> list[str]:
    pre = ["nice", "-n", str(nice)] if nice else []
    if cpu not in (None, "", "none"):
        pre += ["taskset", "-c", cpu]
    return pre + argv


class Backend:
    def __init__(self, name: str, workdir: Path, img: str, size: int, cpu, nice: int,
                 root: Path = ROOT):
        self.name = name
        self.sock = str(workdir / f"{name}.sock")
        builder, self.description = BACKENDS[name]
        self.argv = builder(img, self.sock, size)
        self.cmd = pinned(cpu, nice, self.argv)
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
        self.pid = None

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
    argv = [PY, "-m", "vhostuser.blkload", "--socket", backend.sock, "--json",
            "--seconds", str(seconds), "--pid", str(backend.pid)]
    if args.warmup is not None:
        argv += ["--warmup", str(args.warmup)]
    if args.verify:
        argv.append("--verify")
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    cmd = pinned(args.client_cpu, args.nice, argv)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode not in (0, 1) or not p.stdout.strip():
        raise RuntimeError(f"blkload on {backend.name} failed ({p.returncode}): {p.stderr}")
    r = json.loads(p.stdout)
    r["cmd"] = " ".join(shlex.quote(a) for a in argv)
    if r.get("errors") or r.get("verify_errors") or r.get("error"):
        print(f"  !! {backend.name}: errors {r.get('errors')} verify {r.get('verify_errors')} "
              f"{r.get('error', '')}", flush=True)
    return r


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
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        info["git"] += " (+ uncommitted changes)" if dirty else ""
    except OSError:
        pass
    info["virt"] = subprocess.run(["systemd-detect-virt"], capture_output=True,
                                  text=True).stdout.strip() if shutil.which(
        "systemd-detect-virt") else "?"
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--net" in argv:
        from bench import net
        return net.main([a for a in argv if a != "--net"])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke: tiny image, 1 round, "
                   "0.5 s runs, results in a temp dir")
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--reps", type=int, default=3, help="rounds (medians over these)")
    p.add_argument("--image-size", default="1G")
    p.add_argument("--backend-cpu", default="0", help="taskset list for back-ends ('none')")
    p.add_argument("--client-cpu", default="1", help="taskset list for the client ('none')")
    p.add_argument("--nice", type=int, default=-5,
                   help="nice value for back-ends and client alike (0: leave)")
    p.add_argument("--verify", action="store_true", help="check data stamps on every read")
    p.add_argument("--no-sweep", action="store_true", help="skip the IOPS-vs-QD sweep")
    p.add_argument("--only", help="comma-separated workload names")
    p.add_argument("--backends", help="comma-separated back-end names (default: all)")
    p.add_argument("--out", help="directory for RESULTS.md, results.json and the chart "
                   "(default bench/, or a temp dir with --quick)")
    p.add_argument("--idle-seconds", type=float, default=3.0)
    p.add_argument("--net", action="store_true", help="run the net comparison instead "
                   "(bench/net.py; its own options follow)")
    p.add_argument("--max-load", type=float, default=0.0,
                   help="wait up to 5 min before each round for loadavg below this (0: don't)")
    args = p.parse_args(argv)
    sweep_qd = SWEEP_QD
    if args.quick:
        args.seconds, args.reps, args.image_size = 0.3, 1, "64M"
        args.warmup = 0.05 if args.warmup is None else args.warmup
        args.idle_seconds = 0.5
        sweep_qd = [1, 32]
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="vhu-bench-"))
                                           if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.image_size)
    workdir = Path(tempfile.mkdtemp(prefix="vhu-bench-", dir="/dev/shm"))
    img = str(workdir / "disk.img")
    wanted = set(args.backends.split(",")) if args.backends else set(BACKENDS)
    workloads = [w for w in WORKLOADS if not args.only or w[0] in args.only.split(",")]
    names = [n for n in BACKENDS if n in wanted]
    print(f"image {img} ({size} bytes, stamped); back-ends on CPU {args.backend_cpu}, "
          f"client on CPU {args.client_cpu}, nice {args.nice}", flush=True)
    stamp_file(img, size)
    backends: dict[str, Backend] = {}
    results: dict = {"workloads": {}, "sweep": {}, "idle": {}, "rss": {}, "commands": {}}
    try:
        for n in names:
            backends[n] = Backend(n, workdir, img, size, args.backend_cpu, args.nice)
        for b in backends.values():
            b.wait_ready()
            results["commands"][b.name] = " ".join(shlex.quote(a) for a in b.cmd)
        if "vhu-ram" in backends:
            pre = subprocess.run([PY, "-m", "vhostuser.blkload", "--socket",
                                  backends["vhu-ram"].sock, "--prefill", "--json"],
                                 cwd=ROOT, capture_output=True, text=True)
            print(f"RAM disk prefill: {pre.stdout.strip() or pre.stderr}", flush=True)

        # Idle CPU: every back-end with a session set up (rings, memory) and no I/O.
        sessions = [Session(b.sock, qd=1, bs=4096) for b in backends.values()]
        # Some I/O first: an idle device that was just busy must not poll on.
        for s in sessions:
            s.run(random=True, read_pct=100, seconds=0.2)
        time.sleep(0.2)
        c0 = {n: cpu_seconds(b.pid) for n, b in backends.items()}
        time.sleep(args.idle_seconds)
        for n, b in backends.items():
            results["idle"][n] = round((cpu_seconds(b.pid) - c0[n]) / args.idle_seconds * 100, 2)
        for s in sessions:
            s.close()
        print("idle CPU %: " + ", ".join(f"{n} {v}" for n, v in results["idle"].items()),
              flush=True)

        for rep in range(args.reps):
            if args.max_load:
                print(f"round {rep + 1}: load {wait_for_quiet(args.max_load, 300):.2f}",
                      flush=True)
            for wname, kw, bnames, metric in workloads:
                bnames = [n for n in bnames if n in backends]
                shift = rep % len(bnames) if bnames else 0
                order = bnames[shift:] + bnames[:shift]
                for n in order:
                    with MemorySampler(results, n, backends[n].pid, img):
                        r = blkload(args, backends[n], args.seconds, **kw)
                    r["round"] = rep
                    r["load"] = loadavg()
                    results["workloads"].setdefault(wname, {}).setdefault(n, []).append(r)
                    print(f"[{rep + 1}/{args.reps}] {wname:18} {n:14} IOPS {r['iops']:>9.0f} "
                          f"MB/s {r['mbps']:>8.1f} p50 {r['lat_us']['p50']:>7.1f}us "
                          f"p99 {r['lat_us']['p99']:>8.1f}us  back-end CPU "
                          f"{r.get('backend', {}).get('cpu_pct', '?')}%", flush=True)
            if not args.no_sweep:
                sweep_names = [n for n in SWEEP_BACKENDS if n in backends]
                for qd in sweep_qd:
                    for n in sweep_names[rep % len(sweep_names):] + \
                            sweep_names[:rep % len(sweep_names)]:
                        r = blkload(args, backends[n], max(args.seconds / 2, 0.3),
                                    rw="randread", bs="4k", qd=qd)
                        results["sweep"].setdefault(n, {}).setdefault(qd, []).append(r["iops"])
                print(f"[{rep + 1}/{args.reps}] sweep done", flush=True)
        for n, b in backends.items():
            sample_memory(results, n, b.pid, img)
    finally:
        for b in backends.values():
            b.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    report = analyse(results, workloads)
    text = render(args, results, report, machine_info())
    print(text)
    (out / "RESULTS.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    chart(results, out / "blk_iops_vs_qd.png")
    print(f"wrote {out / 'RESULTS.md'}", flush=True)
    return 0


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


def rss_target(results: dict) -> str:
    """'vhu-file X MiB vs qsd Y MiB + 15: met' from the own-memory peaks."""
    ours = results["rss"].get("vhu-file", {}).get("own_peak_kb")
    qsd = [m["own_peak_kb"] for n, m in results["rss"].items() if n.startswith("qsd")]
    if not ours or not qsd:
        return ""
    limit = min(qsd) + 15e6 / 1024      # 15 MB
    return (f"vhu-file {ours / 1024:.1f} MiB, qemu-storage-daemon {min(qsd) / 1024:.1f} MiB "
            f"(+15 MB allowed: {limit / 1024:.1f} MiB): {'met' if ours <= limit else 'NOT met'}")


def analyse(results, workloads) -> dict:
    report = {}
    for wname, _, _, metric in workloads:
        per = results["workloads"].get(wname, {})
        if not per:
            continue
        higher = HIGHER_IS_BETTER[metric]
        stats = {n: summarize([metric_of(r, metric) for r in rs]) for n, rs in per.items()}
        qsds = [n for n in stats if n.startswith("qsd")]
        best = (max if higher else min)(qsds, key=lambda n: stats[n]["median"]) if qsds else None
        rows = {}
        for n, s in stats.items():
            row = dict(s)
            rs = per[n]
            row["cpu_us_per_io"] = statistics.median(
                [r["backend"]["cpu_us_per_io"] or 0 for r in rs if "backend" in r] or [0])
            row["p99"] = statistics.median([r["lat_us"]["p99"] for r in rs])
            row["p99.9"] = statistics.median([r["lat_us"]["p99.9"] for r in rs])
            row["iops"] = statistics.median([r["iops"] for r in rs])
            row["mbps"] = statistics.median([r["mbps"] for r in rs])
            row["p50"] = statistics.median([r["lat_us"]["p50"] for r in rs])
            row["errors"] = sum(r["errors"] + r["verify_errors"] for r in rs)
            if best:
                b = stats[best]["median"]
                row["ratio"] = s["median"] / b if b else None
                # Ratios of runs taken in the same round (alternating), min..max.
                pair = [metric_of(r, metric) / metric_of(q, metric)
                        for r in rs for q in per[best] if q["round"] == r["round"]
                        and metric_of(q, metric)]
                row["ratio_min"] = min(pair) if pair else None
                row["ratio_max"] = max(pair) if pair else None
            rows[n] = row
        report[wname] = {"metric": metric, "best_qsd": best, "rows": rows}
    return report


def _fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


TARGETS = [
    # (workload, back-end, comparison, threshold, description)
    ("randread-4k-qd32", "vhu-file", ">=", 3.0, "4k randread QD32: C file back-end IOPS >= 3x qsd"),
    ("randread-4k-qd32", "vhu-py", ">=", 1.0, "4k randread QD32: pure-Python back-end >= 1x qsd"),
    ("randread-4k-qd1", "vhu-file", "<=", 0.75,
     "4k QD1 p50 latency <= 0.75x qsd (default mode: eventfd, adaptive polling)"),
    ("randread-4k-qd1", "vhu-file-poll", "<=", 0.5, "4k QD1 p50 latency <= 0.5x qsd (--poll)"),
    ("read-128k-qd32", "vhu-file", ">=", 1.5, "128k sequential read MB/s >= 1.5x qsd"),
]


def render(args, results, report, info) -> str:
    lines = ["# vhostuser benchmark results", ""]
    lines += [f"Generated by `python bench/run.py {' '.join(sys.argv[1:])}` on "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    lines += ["## Machine", ""]
    for k in ("cpu", "cpus", "mem", "virt", "kernel", "python", "qsd", "git"):
        lines.append(f"- {k}: {info.get(k, '?')}")
    loads = [r["load"] for per in results["workloads"].values() for rs in per.values()
             for r in rs]
    if loads:
        lines.append(f"- 1-min load average during the runs: median {statistics.median(loads):.2f}"
                     f", min {min(loads):.2f}, max {max(loads):.2f} (other jobs share the VM)")
    lines += ["", f"Setup: image of {args.image_size} on tmpfs (/dev/shm), every sector "
              "written (stamped) so no read hits a hole; back-ends pinned with "
              f"`taskset -c {args.backend_cpu}`, the client with `taskset -c {args.client_cpu}`, "
              f"all at `nice -n {args.nice}`; {args.seconds} s per measurement after a warm-up "
              f"(min(1 s, seconds/5)), {args.reps} rounds, back-end order rotated each round. "
              "Client: `vhostuser-blkload` (C hot loop, eventfd waits, EVENT_IDX, direct "
              "3-descriptor chains, split ring). Median over rounds; [min..max] across rounds; "
              "ratio = median / median of the best qemu-storage-daemon setting for that "
              "workload, with the range of same-round ratios.", ""]
    for wname, rep in report.items():
        metric = rep["metric"]
        unit = {"iops": "IOPS", "mbps": "MB/s", "p50": "p50 latency (us)"}[metric]
        lines += [f"## {wname} — {unit}" + (f" (best qsd: {rep['best_qsd']})"
                                            if rep["best_qsd"] else ""), ""]
        lines += ["| back-end | median | min | max | ratio vs best qsd [range] | IOPS | MB/s | "
                  "p50 us | p99 us | p99.9 us | back-end CPU us/IO |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, r in rep["rows"].items():
            ratio = (f"{r['ratio']:.2f}x [{r['ratio_min']:.2f}..{r['ratio_max']:.2f}]"
                     if r.get("ratio") else "-")
            lines.append(f"| {n} | {_fmt(r['median'])} | {_fmt(r['min'])} | {_fmt(r['max'])} | "
                         f"{ratio} | {_fmt(r['iops'], 0)} | {_fmt(r['mbps'])} | {_fmt(r['p50'])} | "
                         f"{_fmt(r['p99'])} | {_fmt(r['p99.9'])} | {_fmt(r['cpu_us_per_io'], 2)} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for wname, n, op, thr, desc in TARGETS:
        row = report.get(wname, {}).get("rows", {}).get(n)
        if not row or row.get("ratio") is None:
            lines.append(f"| {desc} | not measured | - |")
            continue
        ok = row["ratio"] >= thr if op == ">=" else row["ratio"] <= thr
        lines.append(f"| {desc} | {row['ratio']:.2f}x [{row['ratio_min']:.2f}..."
                     f"{row['ratio_max']:.2f}] | {'yes' if ok else 'NO'} |")
    lines += ["", "## Idle CPU and memory", "",
              f"Idle: a front-end connected with one ring set up, after 0.2 s of 4k QD1 "
              f"reads, no I/O since, for "
              f"{args.idle_seconds} s. Peak RSS: VmHWM at the end of the whole run. Own "
              "memory: VmRSS less the resident pages of the process's mappings of the image, "
              "sampled every 0.1 s during the measurements, the largest sample. (vhostuser "
              "maps an image on tmpfs to read it; those pages are the file's page cache, "
              "there whoever reads it, and count in VmRSS/VmHWM only because they are "
              "mapped. The RAM disk's memory is its own.)", "",
              "| back-end | idle CPU % | peak RSS (VmHWM) MiB | own memory, peak sample MiB "
              "| RSS at end MiB |", "|---|---|---|---|---|"]
    for n in results["idle"]:
        m = results["rss"].get(n, {})
        lines.append(f"| {n} | {results['idle'][n]:.2f} | {m.get('VmHWM', 0) / 1024:.1f} | "
                     f"{m.get('own_peak_kb', 0) / 1024:.1f} | {m.get('VmRSS', 0) / 1024:.1f} |")
    rss = rss_target(results)
    if rss:
        lines += ["", f"RSS target (C file back-end, own memory): {rss}"]
    if results["sweep"]:
        lines += ["", "## 4k random read IOPS against queue depth (chart: blk_iops_vs_qd.png)", "",
                  "| back-end | " + " | ".join(f"QD{q}" for q in SWEEP_QD) + " |",
                  "|---|" + "---|" * len(SWEEP_QD)]
        for n, per in results["sweep"].items():
            lines.append(f"| {n} | " + " | ".join(
                _fmt(statistics.median(per[q]), 0) if q in per else "-" for q in SWEEP_QD) + " |")
    lines += ["", "## Commands", "", "Back-ends:", ""]
    for n, c in results["commands"].items():
        lines.append(f"- {n} ({BACKENDS[n][1]}): `{c}`")
    lines += ["", "Client (one per measurement, e.g.):", ""]
    pre = " ".join(pinned(args.client_cpu, args.nice, []))
    for wname, per in results["workloads"].items():
        rs = next(iter(per.values()))
        lines.append(f"- {wname}: `{pre} {rs[0]['cmd']}`")
    lines.append("")
    return "\n".join(lines)


def chart(results, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)", flush=True)
        return
    if not results["sweep"]:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, per in results["sweep"].items():
        qds = sorted(int(q) for q in per)
        ax.plot(qds, [statistics.median(per[q]) for q in qds], marker="o", label=n)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("queue depth")
    ax.set_ylabel("IOPS (4 KiB random read, median)")
    ax.set_title("vhost-user-blk: vhostuser vs qemu-storage-daemon")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
