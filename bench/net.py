#!/usr/bin/env python3
"""Net comparison: vhostuser's back-ends against DPDK's vhost PMD, driven by
DPDK testpmd through its virtio-user front-end.

    python bench/net.py              # full run; writes the "## Network" section of
                                     # bench/RESULTS.md and bench/net_results.json
    python bench/net.py --quick      # a short smoke (seconds), results in a temp dir
    python bench/run.py --net ...    # the same

Front-end: one `dpdk-testpmd` per back-end (virtio-user port, split ring, no
mergeable buffers), both its lcores pinned to --client-cpu, driven over stdin.
Back-ends pinned to --backend-cpu:

* vhu-sink[-poll]: `python -m vhostuser.cli.net --backend bench.netbackends:Sink`
  (drops every frame; Python back-end), with and without `--poll 1000`;
* vhu-echo[-poll]: the same with `bench.netbackends:Echo` (each frame sent back
  with inject);
* vhu-switch-sink-poll: `--switch` with one port and no uplink: frames to an
  unknown MAC are flooded to no other port, so dropped in C (vhostuser's C
  data path, no Python per frame);
* vhu-csink[-poll]: `--sink`, the C sink back-end (counts and drops);
* vhu-loop[-poll]: `--loopback`, the C loopback back-end (each frame copied
  back into the same queue pair's receive ring, in the transmit worker);
* dpdk-vhost: a second testpmd with `--vdev net_vhost0,iface=SOCK` (DPDK's
  vhost PMD, a vhost-user server), `rxonly` for the one-way workloads and
  `io` (sends every frame back, like Echo) for the two-way ones. It busy-polls
  (DPDK always does).

Workloads (frames per second, counted by the front-end testpmd's port
counters over a window after a warm-up):

* tx-64, tx-1500: `set fwd txonly` with 64 B / 1500 B frames into the
  back-end; metric: TX packets/s the back-end took off the ring;
* both-64, both-1500: `set fwd flowgen` (transmits like txonly and receives
  and frees whatever comes back) against an echoing back-end; metric: RX
  packets/s at the front-end, i.e. frames that went to the back-end and came
  back (each counts once per direction).

Back-end -> front-end alone (rxonly) needs a generating back-end; a sink
can't, so there is no such row.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vhostuser_devkit.testpmd import TESTPMD, TestPmd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from vhostuser.blkload.procstat import cpu_seconds, find_backend_pid, memory_kb  # noqa: E402

PY = sys.executable
PMD_MAC = "02:00:00:00:00:aa"
DEVARGS = "queues=1,packed_vq=0,mrg_rxbuf=0"
REFERENCE = "dpdk-vhost"


def vhu(*extra):
    def argv(sock):
        return [PY, "-m", "vhostuser.cli.net", "--socket-path", sock, *extra]
    return argv


# name -> (argv builder or None for testpmd, description)
BACKENDS = {
    "vhu-sink": (vhu("--backend", "bench.netbackends:Sink"),
                 "vhostuser + Python Sink (bench/netbackends.py), default mode (eventfd "
                 "waits, adaptive polling)"),
    "vhu-sink-poll": (vhu("--backend", "bench.netbackends:Sink", "--poll", "1000"),
                      "vhostuser + Python Sink, --poll 1000 (busy-poll)"),
    "vhu-switch-sink-poll": (vhu("--switch", "--poll", "1000"),
                             "vhostuser C switch, one port, no uplink (drops in C), "
                             "--poll 1000"),
    "vhu-echo": (vhu("--backend", "bench.netbackends:Echo"),
                 "vhostuser + Python Echo (each transmit batch handed back with one "
                 "inject_many), default mode (eventfd waits, adaptive polling)"),
    "vhu-echo-poll": (vhu("--backend", "bench.netbackends:Echo", "--poll", "1000",
                          "--queues-per-thread", "2"),
                      "vhostuser + Python Echo (inject_many), --poll 1000 (busy-poll), one "
                      "worker for both rings"),
    "vhu-echo-copy": (vhu("--backend", "bench.netbackends:EchoCopy"),
                      "vhostuser + Python EchoCopy (each frame copied to bytes in Python, the "
                      "batch back with one inject_many), default mode"),
    "vhu-echo-each": (vhu("--backend", "bench.netbackends:EchoEach"),
                      "vhostuser + Python EchoEach (one inject per frame, from bytes: the way "
                      "before inject_many), default mode"),
    "vhu-csink": (vhu("--sink"), "vhostuser C sink back-end, default mode (eventfd waits, "
                  "adaptive polling)"),
    "vhu-csink-poll": (vhu("--sink", "--poll", "1000"),
                       "vhostuser C sink back-end, --poll 1000 (busy-poll)"),
    "vhu-loop": (vhu("--loopback"), "vhostuser C loopback back-end, default mode (eventfd "
                 "waits, adaptive polling)"),
    # One worker for both rings: a second busy-polling thread on the same
    # CPU would only take turns with the first.
    "vhu-loop-poll": (vhu("--loopback", "--poll", "1000", "--queues-per-thread", "2"),
                      "vhostuser C loopback back-end, --poll 1000 (busy-poll), "
                      "one worker for both rings"),
    REFERENCE: (None, "DPDK 22.11 testpmd, vhost PMD (net_vhost0), busy-poll; "
                      "rxonly one-way, io two-way"),
}

SINKS = ["vhu-sink", "vhu-sink-poll", "vhu-switch-sink-poll", "vhu-csink", "vhu-csink-poll"]
PY_ECHOES = ["vhu-echo", "vhu-echo-poll", "vhu-echo-copy", "vhu-echo-each"]
C_ECHOES = ["vhu-loop", "vhu-loop-poll"]
ECHOES = [*PY_ECHOES, *C_ECHOES]
# name -> (front-end engine, frame size, back-ends, reference's engine)
WORKLOADS = [
    ("tx-64", "txonly", 64, [*SINKS, REFERENCE], "rxonly"),
    ("tx-1500", "txonly", 1500, [*SINKS, REFERENCE], "rxonly"),
    ("both-64", "flowgen", 64, [*ECHOES, REFERENCE], "io"),
    ("both-1500", "flowgen", 1500, [*ECHOES, REFERENCE], "io"),
]

TARGETS = [
    # (workload, back-ends (best counts), kind, threshold, description). kind
    # "ratio": median ratio vs the reference; "low": the lower end of the
    # same-round ratios; "pps": frames per second (median).
    ("both-64", C_ECHOES, "ratio", 1.0,
     "net 64 B both directions: C loopback pps >= 1x DPDK vhost PMD (busy-poll allowed)"),
    ("both-64", C_ECHOES, "low", 1.2,
     "net 64 B both directions: C loopback >= 1.2x DPDK vhost PMD at the lower end of "
     "same-round ratios"),
    ("tx-64", SINKS, "ratio", 1.0,
     "net 64 B one way (front-end to back-end): pps >= 1x DPDK vhost PMD (busy-poll allowed: "
     "best of the sinks)"),
    ("both-64", ["vhu-echo", "vhu-echo-poll"], "pps", 1e6,
     "net 64 B both directions, Python back-end (Echo, inject_many), one queue pair: "
     ">= 1 Mpps"),
]


def pinned(cpu: str | None, nice: int, argv: list[str]) -> list[str]:
    pre = ["nice", "-n", str(nice)] if nice else []
    if cpu not in (None, "", "none"):
        pre += ["taskset", "-c", cpu]
    return pre + argv


def lcores(cpu: str | None) -> str:
    """testpmd's two lcores on one CPU (the first of the list)."""
    c = (cpu or "0").split(",")[0].split("-")[0]
    c = "0" if c == "none" else c
    return f"0@{c},1@{c}"


def start_testpmd(vdev: str, cpu, nice: int, log_path: Path) -> TestPmd:
    """testpmd on ``cpu`` (both lcores there), at ``nice``; wait_ready() before use."""
    return TestPmd(vdev, lcores(cpu), log_path, tag="vhu-bench",
                   wrap=lambda argv: pinned(None, nice, argv))


class Backend:
    """One back-end (ours, or testpmd's vhost PMD) and the testpmd
    front-end connected to it."""

    def __init__(self, name: str, workdir: Path, args):
        self.name = name
        self.sock = str(workdir / f"{name}.sock")
        builder, self.description = BACKENDS[name]
        self.workdir = workdir
        self.args = args
        self.front: TestPmd | None = None
        self.pmd: TestPmd | None = None
        self.proc = None
        self.engine = None
        if builder is None:
            self.pmd = start_testpmd(f"net_vhost0,iface={self.sock},queues=1", args.backend_cpu,
                                     args.nice, workdir / f"{name}.log")
            self.cmd = self.pmd.command
            self.pid = self.pmd.pid
        else:
            self.cmd = pinned(args.backend_cpu, args.nice, builder(self.sock))
            self.log = open(workdir / f"{name}.log", "wb")
            self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            self.pid = None

    def wait_ready(self, timeout: float = 30.0) -> None:
        if self.pmd is not None:
            self.pmd.wait_ready()
        else:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                       f"{Path(self.log.name).read_text()[-2000:]}")
                if os.path.exists(self.sock):
                    self.pid = find_backend_pid(self.sock)
                    if self.pid:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no socket after {timeout}s")
                time.sleep(0.05)
        if self.pmd is not None:
            deadline = time.monotonic() + timeout
            while not os.path.exists(self.sock):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no socket after {timeout}s")
                time.sleep(0.05)
        self.front = start_testpmd(f"net_virtio_user0,path={self.sock},mac={PMD_MAC},{DEVARGS}",
                                   self.args.client_cpu, self.args.nice,
                             self.workdir / f"{self.name}.front.log")

    def set_engine(self, engine: str) -> None:
        """The reference's forwarding engine (started, polling)."""
        if self.pmd is None or self.engine == engine:
            return
        if self.engine:
            self.pmd.cmd("stop")
        self.pmd.cmd(f"set fwd {engine}")
        self.pmd.cmd("start")
        self.engine = engine

    def idle(self) -> None:
        if self.pmd is not None and self.engine:
            self.pmd.cmd("stop")
            self.engine = None

    def stop(self) -> None:
        if self.front is not None:
            self.front.close()
        if self.pmd is not None:
            self.pmd.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.log.close()


def measure(b: Backend, engine: str, size: int, ref_engine: str, seconds: float,
            warmup: float) -> dict:
    front = b.front
    b.set_engine(ref_engine)
    front.cmd(f"set fwd {engine}")
    front.cmd(f"set txpkts {size}")
    front.cmd("start")
    try:
        time.sleep(warmup)
        s0, c0, t0 = front.stats(), cpu_seconds(b.pid), time.monotonic()
        counter = "TX-packets" if engine == "txonly" else "RX-packets"
        # A window with no frame at all says nothing (a short window on a
        # loaded machine can miss the back-end's whole time slice): widen
        # it, up to 10 s, until something is counted.
        while True:
            time.sleep(seconds)
            s1, c1, t1 = front.stats(), cpu_seconds(b.pid), time.monotonic()
            if s1.get(counter, 0) > s0.get(counter, 0) or t1 - t0 > 10:
                break
    finally:
        front.cmd("stop")
        b.idle()
    dt = t1 - t0
    d = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1}
    r = {"tx_pps": d["TX-packets"] / dt, "rx_pps": d["RX-packets"] / dt,
         "tx_bytes": d.get("TX-bytes", 0), "rx_bytes": d.get("RX-bytes", 0),
         "seconds": dt, "backend_cpu_pct": (c1 - c0) / dt * 100,
         "rx_missed": d.get("RX-missed", 0), "rx_nombuf": d.get("RX-nombuf", 0)}
    r["pps"] = r["tx_pps"] if engine == "txonly" else r["rx_pps"]
    r["gbps"] = r["pps"] * size * 8 / 1e9
    frames = d["TX-packets"] if engine == "txonly" else d["RX-packets"]
    bytes_ = r["tx_bytes"] if engine == "txonly" else r["rx_bytes"]
    r["frame_bytes"] = bytes_ / frames if frames else 0
    return r


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def analyse(results: dict) -> dict:
    report = {}
    for wname, per in results["workloads"].items():
        ref = per.get(REFERENCE)
        rows = {}
        for n, rs in per.items():
            row = summarize([r["pps"] for r in rs])
            row["cpu_pct"] = statistics.median([r["backend_cpu_pct"] for r in rs])
            row["tx_pps"] = statistics.median([r["tx_pps"] for r in rs])
            row["rx_pps"] = statistics.median([r["rx_pps"] for r in rs])
            row["gbps"] = statistics.median([r["gbps"] for r in rs])
            if ref:
                rm = statistics.median([r["pps"] for r in ref])
                row["ratio"] = row["median"] / rm if rm else None
                pair = [r["pps"] / q["pps"] for r in rs for q in ref
                        if q["round"] == r["round"] and q["pps"]]
                row["ratio_min"] = min(pair) if pair else None
                row["ratio_max"] = max(pair) if pair else None
            rows[n] = row
        report[wname] = rows
    return report


def _fmt(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"


def render(args, results: dict, report: dict) -> str:
    loads = [r["load"] for per in results["workloads"].values() for rs in per.values()
             for r in rs]
    argv = " ".join(shlex.quote(a) for a in results.get("argv", []))
    lines = ["## Network", "",
             f"Generated by `python bench/net.py{' ' + argv if argv else ''}` on {results['date']} "
             f"(git {results.get('git', '?')}; {results.get('testpmd', '?')}). "
             "Chart: net_pps_by_frame.png (pps per frame size and direction).", ""]
    if loads:
        lines += [f"1-min load average during the runs: median {statistics.median(loads):.2f}, "
                  f"min {min(loads):.2f}, max {max(loads):.2f} (other jobs share the 2 vCPUs).",
                  ""]
    lines += [
        "Front-end: `dpdk-testpmd` with a virtio-user port (split ring, no mergeable "
        f"buffers, 256 descriptors), both lcores on CPU {args.client_cpu}; back-ends on CPU "
        f"{args.backend_cpu}; all at `nice -n {args.nice}`. pps from the front-end's port "
        f"counters over {args.seconds} s after {args.warmup} s of warm-up; {args.reps} rounds, "
        "back-end order rotated each round. Median [min..max] over rounds; ratio = median / "
        f"median of {REFERENCE} (DPDK's vhost PMD in a second testpmd), with the range of "
        "same-round ratios. `tx-*`: testpmd `txonly` into the back-end (TX pps; the reference "
        "runs `rxonly`). `both-*`: testpmd `flowgen` (transmits and counts what comes back) "
        "against an echoing back-end (the reference runs `io`); pps = frames back at testpmd, "
        "each crossed both directions. `-poll` = `--poll 1000` (busy-poll); DPDK always "
        "busy-polls. CPU % = the back-end process's CPU time over the window.", ""]
    for wname, engine, size, _names, ref_engine in WORKLOADS:
        rows = report.get(wname)
        if not rows:
            continue
        lines += [f"### {wname} — {size} B frames, testpmd `{engine}`, reference `{ref_engine}`",
                  "", "| back-end | pps median | min | max | ratio vs dpdk-vhost [range] | "
                      "lower end | Gbit/s | TX pps | RX pps | back-end CPU % |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n, r in rows.items():
            ratio = (f"{r['ratio']:.3f}x [{r['ratio_min']:.3f}..{r['ratio_max']:.3f}]"
                     if r.get("ratio") is not None and r.get("ratio_min") is not None else "-")
            low = f"{r['ratio_min']:.3f}x" if r.get("ratio_min") is not None else "-"
            lines.append(f"| {n} | {_fmt(r['median'])} | {_fmt(r['min'])} | {_fmt(r['max'])} | "
                         f"{ratio} | {low} | {_fmt(r['gbps'], 2)} | {_fmt(r['tx_pps'])} | "
                         f"{_fmt(r['rx_pps'])} | {_fmt(r['cpu_pct'])} |")
        lines.append("")
    lines += ["### Network targets", "",
              "The best of the listed back-ends; ratio = median / median of dpdk-vhost, "
              "[lower end..upper end] of the ratios of runs taken in the same round.", "",
              "| target | measured (back-end) | median ratio [same-round range] | met |",
              "|---|---|---|---|"]
    for wname, names, kind, thr, desc in TARGETS:
        rows = report.get(wname, {})
        key = {"ratio": "ratio", "low": "ratio_min", "pps": "median"}[kind]
        cands = [(rows[n][key], n) for n in names if rows.get(n, {}).get(key) is not None]
        if not cands:
            lines.append(f"| {desc} | not measured | - | - |")
            continue
        value, n = max(cands)
        r = rows[n]
        shown = f"{value / 1e6:.2f} Mpps" if kind == "pps" else f"{value:.3f}x"
        ratio = (f"{r['ratio']:.3f}x [{r['ratio_min']:.3f}..{r['ratio_max']:.3f}]"
                 if r.get("ratio") is not None and r.get("ratio_min") is not None else "-")
        lines.append(f"| {desc} | {shown} ({n}) | {ratio} | {'yes' if value >= thr else 'NO'} |")
    lines += ["", "### Network commands", "", "Back-ends (SOCK = a socket in a temp dir):", ""]
    for n, c in results["commands"].items():
        lines.append(f"- {n} ({BACKENDS[n][1]}): `{c}`")
    front = results.get("front")
    if front:
        lines += ["", f"Front-end (one per back-end): `{front}`, then on its stdin: "
                      "`set fwd txonly|flowgen`, `set txpkts 64|1500`, `start`, "
                      "`show port stats 0` (twice, the window), `stop`. The reference: "
                      "`set fwd rxonly|io`, `start` before, `stop` after.", ""]
    if results.get("notes"):
        lines += ["### Network notes", "", *results["notes"], ""]
    return "\n".join(lines)


def write_section(md_path: Path, section: str) -> None:
    """Replaces the "## Network" section of md_path (up to the next "## "
    heading), or appends it; the rest of the file is left as it is."""
    text = md_path.read_text() if md_path.exists() else "# vhostuser benchmark results\n"
    section = section.rstrip("\n") + "\n"
    m = re.search(r"^## Network\s*$", text, re.M)
    if m is None:
        md_path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    rest = re.search(r"^## ", text[m.end():], re.M)
    tail = text[m.end() + rest.start():] if rest else ""
    md_path.write_text(text[:m.start()] + section + ("\n" + tail if tail else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke: 1 round, 0.3 s windows, results in a temp dir")
    p.add_argument("--seconds", type=float, default=3.0, help="measurement window")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backend-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--nice", type=int, default=-5)
    p.add_argument("--only", help="comma-separated workload names")
    p.add_argument("--backends", help="comma-separated back-end names (default: all)")
    p.add_argument("--out", help="directory for RESULTS.md and net_results.json "
                   "(default bench/, or a temp dir with --quick)")
    p.add_argument("--notes", default=str(HERE / "net_notes.md"),
                   help="a file of Markdown lines for a Network notes subsection (default "
                        "bench/net_notes.md, if there)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="development only: run on a tree with uncommitted changes (marked; the "
                        "output goes to a temp dir unless --out is given)")
    p.add_argument("--max-load", type=float, default=0.3,
                   help="bench/RESULTS.md is written only if the 1-minute load was below this "
                        "before the run (default 0.3)")
    p.add_argument("--quiet-wait", type=float, default=600.0)
    p.add_argument("--after-blk", action="store_true", help=argparse.SUPPRESS)  # run.py --all
    p.add_argument("--from-json", metavar="PATH", help="no runs: render the section again "
                   "from a net_results.json (e.g. with --notes)")
    args = p.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        vars(args).update({k: v for k, v in results["args"].items()
                           if k in ("seconds", "warmup", "reps", "backend_cpu", "client_cpu",
                                    "nice")})
        return finish(args, results, Path(args.out) if args.out else HERE)
    if TESTPMD is None:
        print("dpdk-testpmd is not installed (apt-get install dpdk-dev librte-net-virtio23 "
              "librte-net-vhost23)", file=sys.stderr)
        return 2
    if args.quick:
        args.seconds, args.warmup, args.reps = 0.3, 0.2, 1
    from bench.run import OUTPUTS, quiet_or_refuse, tree_state
    commit, dirty = tree_state(OUTPUTS if args.after_blk else frozenset())
    if dirty and not args.allow_dirty:
        print("bench/net.py: the tree has uncommitted changes: commit them (RESULTS.md names the "
              "commit it measured), or pass --allow-dirty for a development run", file=sys.stderr)
        return 2
    # After run.py's published blk run (--all), into the same place: as published.
    publish = (not args.out or args.after_blk) and not args.quick and not dirty
    out = Path(args.out) if args.out else (HERE if publish else
                                           Path(tempfile.mkdtemp(prefix="vhu-bench-net-")))
    out.mkdir(parents=True, exist_ok=True)
    load0 = quiet_or_refuse("bench/net.py", args.max_load, args.quiet_wait) if publish \
        else os.getloadavg()[0]
    if load0 is None:
        return 3
    workloads = [w for w in WORKLOADS if not args.only or w[0] in args.only.split(",")]
    wanted = set(args.backends.split(",")) if args.backends else set(BACKENDS)
    names = [n for n in BACKENDS if n in wanted and any(n in w[3] for w in workloads)]
    workdir = Path(tempfile.mkdtemp(prefix="vhu-bench-net-", dir="/tmp"))
    results: dict = {"workloads": {}, "commands": {}, "argv": sys.argv[1:] if argv is None
                     else list(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "args": vars(args).copy(), "load_before": load0,
                     "git": commit + (" plus uncommitted changes (DEVELOPMENT RUN, NOT FOR "
                                      "PUBLICATION)" if dirty else "")}
    try:
        ver = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "dpdk-dev"],
                             capture_output=True, text=True).stdout.strip()
        results["testpmd"] = f"DPDK {ver}" if ver else "DPDK ?"
    except OSError:
        pass
    print(f"back-ends on CPU {args.backend_cpu}, testpmd front-ends on CPU {args.client_cpu}, "
          f"nice {args.nice}; load {os.getloadavg()[0]:.2f}", flush=True)
    backends: dict[str, Backend] = {}
    try:
        for n in names:
            backends[n] = Backend(n, workdir, args)
        for b in backends.values():
            b.wait_ready()
        for b in backends.values():
            b.front.wait_ready()
            results["commands"][b.name] = " ".join(shlex.quote(a) for a in b.cmd).replace(
                b.sock, "SOCK")
        if backends:
            b = next(iter(backends.values()))
            results["front"] = " ".join(shlex.quote(a) for a in b.front.command).replace(
                b.sock, "SOCK")
        for rep in range(args.reps):
            for wname, engine, size, bnames, ref_engine in workloads:
                bnames = [n for n in bnames if n in backends]
                shift = rep % len(bnames) if bnames else 0
                for n in bnames[shift:] + bnames[:shift]:
                    r = measure(backends[n], engine, size, ref_engine, args.seconds, args.warmup)
                    r["round"], r["load"] = rep, os.getloadavg()[0]
                    results["workloads"].setdefault(wname, {}).setdefault(n, []).append(r)
                    print(f"[{rep + 1}/{args.reps}] {wname:9} {n:21} pps {r['pps']:>11,.0f} "
                          f"(TX {r['tx_pps']:>11,.0f} RX {r['rx_pps']:>11,.0f}) "
                          f"{r['gbps']:6.2f} Gbit/s  back-end CPU {r['backend_cpu_pct']:5.1f}%  "
                          f"load {r['load']:.2f}", flush=True)
        for n, b in backends.items():
            results.setdefault("rss", {})[n] = memory_kb(b.pid)
    finally:
        for b in backends.values():
            b.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    # keep the workloads in table order
    results["workloads"] = {w[0]: {n: results["workloads"][w[0]][n] for n in w[3]
                                   if n in results["workloads"].get(w[0], {})}
                            for w in WORKLOADS if w[0] in results["workloads"]}
    return finish(args, results, out)


def finish(args, results: dict, out: Path) -> int:
    if args.notes and Path(args.notes).exists():
        results["notes"] = Path(args.notes).read_text().rstrip("\n").splitlines()
    report = analyse(results)
    section = render(args, results, report)
    print(section)
    write_section(out / "RESULTS.md", section)
    (out / "net_results.json").write_text(json.dumps(results, indent=1, default=str))
    chart(report, out / "net_pps_by_frame.png")
    print(f"wrote the Network section of {out / 'RESULTS.md'}", flush=True)
    return 0


def chart(report: dict, path: Path) -> None:
    """pps per frame size: one panel per direction, a bar per back-end and
    frame size (median, with the min..max of the rounds as error bars)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)", flush=True)
        return
    panels = [("tx", "one way (testpmd txonly; DPDK rxonly)"),
              ("both", "both directions (testpmd flowgen; DPDK io)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (prefix, title) in zip(axes, panels):
        names = [n for n in BACKENDS
                 if any(n in report.get(f"{prefix}-{size}", {}) for size in (64, 1500))]
        width = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for j, size in enumerate((64, 1500)):
                row = report.get(f"{prefix}-{size}", {}).get(n)
                if row:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(row["median"] / 1e6)
                    lo.append((row["median"] - row["min"]) / 1e6)
                    hi.append((row["max"] - row["median"]) / 1e6)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=n)
        ax.set_xticks([0, 1], ["64 B", "1500 B"])
        ax.set_ylabel("Mpps (median of rounds)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("vhost-user-net: vhostuser vs DPDK vhost PMD (testpmd virtio-user front-end)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
