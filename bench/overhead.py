#!/usr/bin/env python3
"""What a change to the data path costs: the same vhostuser back-end built
from two revisions, driven alternately by the same client.

    python bench/overhead.py --base REV [--reps 5] [--seconds 3] [--setup tmpfs|fs|direct]

The base revision is exported with `git archive` and its C data plane built
in a temp dir; head is this checkout. Each round runs every workload on both,
in alternating order, so each ratio compares runs taken next to each other
(the machine's speed drifts by several times over minutes). Prints the median
head/base ratio per workload with min and max; no thresholds.

Used for issue 8's "metrics without slowing the data path measurably":
`python bench/overhead.py --base <commit before the metrics>`.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.run import (HIGHER_IS_BETTER, PY, SETUPS, WORKLOADS, Backend, blkload,  # noqa: E402
                       make_image, metric_of, parse_size, prefill, scratch_dir)

# Run by default (--only picks any of bench/run.py's workloads); their
# blkload arguments and metric are run.py's, so both measure the same thing.
DEFAULT_WORKLOADS = ("randread-4k-qd32", "randread-4k-qd1", "randwrite-4k-qd32",
                     "randrw-4k-qd32-flush64", "randwrite-4k-qd32-wt", "write-128k-qd8")
BACKENDS = {
    "ram": lambda img, size: ["--ramdisk", str(size)],
    "file": lambda img, size: ["--blk-file", img],
    "file-poll": lambda img, size: ["--blk-file", img, "--poll", "1000"],
    "direct": lambda img, size: ["--blk-file", img, "--direct"],
    "py": lambda img, size: ["--backend", "bench.backends:PreadDisk", "--backend-opt",
                             f"path={img}"],
}


def build_tree(rev: str, dest: Path) -> Path:
    """rev's sources with their C data plane built in place."""
    archive = subprocess.run(["git", "archive", rev, "csrc", "vhostuser", "bench/__init__.py",
                              "bench/backends.py"], cwd=ROOT,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    subprocess.run([PY, "csrc/build_native.py"], cwd=dest, check=True, capture_output=True)
    return dest


def tree_backend(label, tree: Path, extra, workdir, img, size, cpu, nice) -> Backend:
    """A vhostuser-blk back-end run from the source tree ``tree``."""
    import bench.run as run
    run.BACKENDS[label] = (lambda i, s, z: [PY, "-m", "vhostuser.cli.blk", "--socket-path", s,
                                            *extra(i, z)], f"vhostuser from {tree}")
    return Backend(label, workdir, img, size, cpu, nice, root=tree)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--image-size", default="256M")
    p.add_argument("--backends", default="ram,file")
    p.add_argument("--backend-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--setup", choices=list(SETUPS), default="tmpfs",
                   help="where the image is (bench/run.py's setups; default tmpfs)")
    p.add_argument("--only", help="comma-separated workload names")
    args = p.parse_args(argv)
    args.warmup, args.verify = None, True
    size = parse_size(args.image_size)
    scratch = scratch_dir(SETUPS[args.setup])
    img = str(scratch / "disk.img")
    make_image(SETUPS[args.setup], img, size)
    names = args.only.split(",") if args.only else DEFAULT_WORKLOADS
    by_name = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        p.error(f"unknown workloads {unknown}; bench/run.py has {sorted(by_name)}")
    workloads = [by_name[n] for n in names]
    base_tree = build_tree(args.base, Path(tempfile.mkdtemp(prefix="vhu-base-")))
    backends = {}
    try:
        for kind in args.backends.split(","):
            for side, tree in (("head", ROOT), ("base", base_tree)):
                b = tree_backend(f"{kind}@{side}", tree, BACKENDS[kind], scratch, img, size,
                                args.backend_cpu, args.nice)
                backends[(kind, side)] = b
        for b in backends.values():
            b.wait_ready()
        for (kind, _), b in backends.items():
            if kind == "ram":
                prefill(b)
        ratios: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.reps):
            for w in workloads:
                wname, kw, metric = w.name, w.kw, w.metric
                higher = HIGHER_IS_BETTER[metric]
                for kind in args.backends.split(","):
                    sides = ("head", "base") if rep % 2 == 0 else ("base", "head")
                    got = {s: metric_of(blkload(args, backends[(kind, s)], args.seconds, **kw),
                                        metric) for s in sides}
                    ratio = got["head"] / got["base"] if higher else got["base"] / got["head"]
                    ratios.setdefault((wname, kind), []).append(ratio)
                    print(f"[{rep + 1}/{args.reps}] {wname:18} {kind:5} head {got['head']:>9.1f} "
                          f"base {got['base']:>9.1f} {metric}  head/base speed {ratio:.3f}",
                          flush=True)
    finally:
        for b in backends.values():
            b.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nhead ({ROOT}) against base {args.base}: speed ratio (>1: head faster), "
          f"median of {args.reps} alternating rounds [min, max]")
    for (wname, kind), values in ratios.items():
        print(f"  {wname:18} {kind:5} {statistics.median(values):.3f} "
              f"[{min(values):.3f}, {max(values):.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
