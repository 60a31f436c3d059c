#!/usr/bin/env python3
"""A network back-end from two source trees, side by side with DPDK's vhost
PMD: 64 B both ways (testpmd flowgen), alternating rounds; prints the
same-round ratios. --base TREE is a tree with its C data plane built, e.g.
`git archive REV csrc vhostuser | tar -x -C /tmp/base && (cd /tmp/base &&
python3 csrc/build_native.py)`; the other is this checkout.

    python bench/netab.py --base /tmp/base [--reps 6] [--extra=--loopback,--poll,1000]
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import net  # noqa: E402
p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--reps", type=int, default=6)
p.add_argument("--seconds", type=float, default=2)
p.add_argument("--extra", default="--loopback,--poll,1000,--queues-per-thread,2",
               help="vhostuser-net options, comma-separated")
a = p.parse_args()
extra = a.extra.split(",") if a.extra else []


def tree(path):
    def argv(sock):
        return ["env", f"PYTHONPATH={path}:{ROOT}", net.PY, "-m", "vhostuser.cli.net",
                "--socket-path", sock, *extra]
    return argv


net.BACKENDS["base"] = (tree(a.base), "base")
net.BACKENDS["new"] = (tree(str(ROOT)), "this checkout")
args = argparse.Namespace(backend_cpu="0", client_cpu="1", nice=-5)
work = Path(tempfile.mkdtemp(prefix="vhu-nab-", dir="/tmp"))
names = ["base", "new", "dpdk-vhost"]
bs = {n: net.Backend(n, work, args) for n in names}
for b in bs.values():
    b.wait_ready()
for b in bs.values():
    b.front.wait_ready()
res = {n: [] for n in names}
for r in range(a.reps):
    order = names[r % 3:] + names[:r % 3]
    for n in order:
        m = net.measure(bs[n], "flowgen", 64, "io", a.seconds, 0.5)
        res[n].append(m["pps"])
    print(f"round {r}: " + "  ".join(f"{n} {res[n][-1] / 1e6:.2f}" for n in names)
          + f"  load {os.getloadavg()[0]:.2f}", flush=True)
for b in bs.values():
    b.stop()
for n in ("base", "new"):
    rat = [x / y for x, y in zip(res[n], res["dpdk-vhost"])]
    print(f"{n}: median {statistics.median(res[n]) / 1e6:.2f} Mpps; vs dpdk median "
          f"{statistics.median(rat):.3f} [{min(rat):.3f}..{max(rat):.3f}]")
rat = [x / y for x, y in zip(res["new"], res["base"])]
print(f"new/base same-round: median {statistics.median(rat):.3f} [{min(rat):.3f}..{max(rat):.3f}]")
