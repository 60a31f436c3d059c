#!/usr/bin/env python3
"""Profiles of both sides of the net comparison at once: 64 B both ways
(testpmd flowgen front-end), one of our back-ends and DPDK's vhost PMD in
alternating rounds; prints pps, each process's and thread's CPU % and
testpmd's burst statistics, and leaves `perf record -e cpu-clock -g` data
of the back-end and of the front-end per round in --out (read them with
`perf report -i FILE`).

Burst statistics say which side waits for which. The front-end (the same
testpmd for both back-ends) polls its receive ring and then sends a burst:
a receive poll that finds nothing, and a send the ring refuses whole (no
free descriptors: the back-end has not given its transmit buffers back),
are turns it spent waiting for the back-end. DPDK's back-end (`io`) polls
the front-end's transmit ring: a poll that finds nothing is a turn it
waited for the front-end.

    python bench/netprofile.py [--rounds 3] [--seconds 4] [--ours vhu-loop-poll]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import net  # noqa: E402
from vhostuser.blkload.procstat import cpu_seconds  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--seconds", type=float, default=4)
p.add_argument("--ours", default="vhu-loop-poll")
p.add_argument("--out", default=str(ROOT / "_work" / "netprofile"))
a = p.parse_args()
args = argparse.Namespace(backend_cpu="0", client_cpu="1", nice=-5)
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
work = Path(tempfile.mkdtemp(prefix="vhu-np-", dir="/tmp"))
names = [a.ours, "dpdk-vhost"]
bs = {n: net.Backend(n, work, args) for n in names}
for b in bs.values():
    b.wait_ready()
for b in bs.values():
    b.front.wait_ready()
    b.front.cmd("set record-burst-stats on")
    if b.pmd is not None:
        b.pmd.cmd("set record-burst-stats on")


def bursts(text: str) -> str:
    """testpmd's burst lines (from `stop`): the share of polls that moved
    nothing, per direction."""
    out = []
    for kind, total, spread in re.findall(r"([RT]X)-bursts : (\d+) \[([^\]]*)\]", text):
        empty = re.search(r"(\d+)% of 0 pkts", spread)
        out.append(f"{kind} {int(total):,} bursts, {empty.group(1) if empty else 0}% empty")
    return "; ".join(out) or "no burst statistics"

def threads_cpu(pid):
    """per-thread utime+stime (ticks) by tid"""
    res = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            res[t] = (comm, int(f[11]) + int(f[12]))
        except OSError:
            pass
    return res

for rnd in range(a.rounds):
    for n in (names if rnd % 2 == 0 else names[::-1]):
        b = bs[n]
        front = b.front
        b.set_engine("io")
        front.cmd("set fwd flowgen")
        front.cmd("set txpkts 64")
        front.cmd("start")
        time.sleep(0.5)
        s0 = front.stats(); t0 = time.monotonic()
        c0 = {"back": cpu_seconds(b.pid), "front": cpu_seconds(front.pid)}
        th0 = {"back": threads_cpu(b.pid), "front": threads_cpu(front.pid)}
        tag = f"{n}-r{rnd}"
        perfs = [subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-g",
                                   "-p", str(pid), "-o", str(out / f"{tag}-{side}.data"), "--",
                                   "sleep", str(a.seconds)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
                 for side, pid in (("back", b.pid), ("front", front.pid))]
        for pp in perfs:
            pp.wait()
        s1 = front.stats(); t1 = time.monotonic()
        c1 = {"back": cpu_seconds(b.pid), "front": cpu_seconds(front.pid)}
        th1 = {"back": threads_cpu(b.pid), "front": threads_cpu(front.pid)}
        front_bursts = bursts(front.cmd("stop"))
        back_bursts = None
        if b.pmd is not None and b.engine:
            back_bursts = bursts(b.pmd.cmd("stop"))
            b.engine = None
        b.idle()
        dt = t1 - t0
        pps = (s1["RX-packets"] - s0["RX-packets"]) / dt
        back = 100 * (c1["back"] - c0["back"]) / dt
        fr = 100 * (c1["front"] - c0["front"]) / dt
        line = (f"{tag}: {pps / 1e6:.2f} Mpps; CPU back {back:.0f}% front {fr:.0f}%; "
                f"load {os.getloadavg()[0]:.2f}")
        for side in ("back", "front"):
            busy = [(th1[side][t][0], (th1[side][t][1] - th0[side].get(t, ("", 0))[1]) /
                     os.sysconf("SC_CLK_TCK") / dt * 100) for t in th1[side]]
            line += f"\n   {side} threads: " + ", ".join(f"{c} {v:.0f}%" for c, v in busy if v >= 1)
        line += f"\n   front-end bursts: {front_bursts}"
        if back_bursts is not None:
            line += f"\n   back-end bursts: {back_bursts}"
        print(line, flush=True)
for b in bs.values():
    b.stop()
