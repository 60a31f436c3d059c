#!/usr/bin/env python3
"""What the sandbox costs: vhostuser-blk with the sandbox on (the default:
seccomp filter, empty view, no privileges) against --sandbox off, driven
alternately by the same client.

    python bench/sandbox.py [--reps 5] [--seconds 5] [--backends ram,shm,disk]
    python bench/sandbox.py --syscall-cost [--reps 14]

Back-ends: ram (--ramdisk), shm (an image on /dev/shm: read through its
page-cache mapping in the worker), disk (an image on /var/tmp: page-cache
hits tried inline, the rest through io_uring). Each round runs both sides
next to each other, in alternating order (the machine's speed drifts).
Prints the median on/off ratio of IOPS and of the back-end's CPU time per
I/O, with min and max; no thresholds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import bench.run as run  # noqa: E402
from vhostuser.blkload import stamp_file  # noqa: E402
from bench.run import PY, Backend, blkload, parse_size  # noqa: E402

SOURCES = {"ram": lambda img, size: ["--ramdisk", str(size)],
           "shm": lambda img, size: ["--blk-file", img],
           "disk": lambda img, size: ["--blk-file", img]}
SIDES = {"on": [], "off": ["--sandbox", "off"]}


def syscall_cost(reps: int, n: int = 300_000) -> None:
    """CPU time of an eventfd write + read, in a fresh child with no
    filter, a one-rule filter, and vhostuser-blk's filter (file), in
    alternating order: what the filter adds to each system call."""
    import os
    import time

    def child(mode: str) -> float:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            from vhostuser.sandbox import _load_filter, policy, seccomp
            if mode == "one rule":
                f = seccomp.Filter(seccomp.ACT_ALLOW)
                f.add(seccomp.ACT_KILL_PROCESS, "ptrace")
                f.load()
            elif mode == "blk file":
                _load_filter(policy.build("blk", ["file"]), "kill")
            efd = os.eventfd(0, os.EFD_NONBLOCK)
            one = (1).to_bytes(8, "little")
            t = time.thread_time_ns()
            for _ in range(n):
                os.write(efd, one)
                os.read(efd, 8)
            os.write(w, str(time.thread_time_ns() - t).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 64)
        os.waitpid(pid, 0)
        os.close(r)
        return int(data) / (2 * n)

    modes = ["no filter", "one rule", "blk file"]
    got: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(reps):
        for m in modes if rep % 2 == 0 else modes[::-1]:
            got[m].append(child(m))
    base = statistics.median(got["no filter"])
    print(f"ns of CPU per system call (eventfd write/read), median of {reps}:")
    for m in modes:
        med = statistics.median(got[m])
        print(f"  {m:10} {med:6.0f}  (+{med - base:.0f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--syscall-cost", action="store_true",
                   help="only measure what the filter adds to one system call")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--image-size", default="256M")
    p.add_argument("--backends", default="ram,shm,disk")
    p.add_argument("--qd", type=int, default=32)
    p.add_argument("--backend-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--nice", type=int, default=0)
    args = p.parse_args(argv)
    args.warmup, args.verify = None, False
    if args.syscall_cost:
        syscall_cost(args.reps)
        return 0
    size = parse_size(args.image_size)
    dirs = {"shm": Path(tempfile.mkdtemp(prefix="vhu-sbx-", dir="/dev/shm")),
            "disk": Path(tempfile.mkdtemp(prefix="vhu-sbx-", dir="/var/tmp"))}
    dirs["ram"] = dirs["shm"]
    images = {}
    for kind in ("shm", "disk"):
        images[kind] = str(dirs[kind] / "disk.img")
        stamp_file(images[kind], size)
    images["ram"] = images["shm"]
    backends = {}
    kinds = args.backends.split(",")
    try:
        for kind in kinds:
            for side, extra in SIDES.items():
                label = f"{kind}-sandbox-{side}"
                run.BACKENDS[label] = (
                    lambda i, s, z, kind=kind, extra=extra: [
                        PY, "-m", "vhostuser.cli.blk", "--socket-path", s,
                        *SOURCES[kind](i, z), *extra],
                    f"vhostuser-blk ({kind}), sandbox {side}")
                backends[(kind, side)] = Backend(label, dirs[kind], images[kind], size,
                                                 args.backend_cpu, args.nice)
        for b in backends.values():
            b.wait_ready()
        ratios: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.reps):
            for kind in kinds:
                sides = ("on", "off") if rep % 2 == 0 else ("off", "on")
                got = {s: blkload(args, backends[(kind, s)], args.seconds, rw="randread",
                                  bs="4k", qd=args.qd) for s in sides}
                iops = got["on"]["iops"] / got["off"]["iops"]
                per_io = {s: (got[s].get("backend") or {}).get("cpu_us_per_io") for s in sides}
                cpu = per_io["on"] / per_io["off"] if per_io["on"] and per_io["off"] \
                    else float("nan")
                ratios.setdefault((kind, "iops"), []).append(iops)
                ratios.setdefault((kind, "cpu"), []).append(cpu)
                print(f"[{rep + 1}/{args.reps}] {kind:5} IOPS on {got['on']['iops']:>9.0f} "
                      f"off {got['off']['iops']:>9.0f}  on/off {iops:.3f}; back-end CPU per "
                      f"I/O on/off {cpu:.3f}", flush=True)
    finally:
        for b in backends.values():
            b.stop()
    print(f"\nsandbox on / off at 4k randread QD{args.qd}: median of {args.reps} alternating "
          "rounds [min, max]")
    for (kind, what), values in ratios.items():
        label = "IOPS" if what == "iops" else "back-end CPU per I/O"
        print(f"  {kind:5} {label:22} {statistics.median(values):.3f} "
              f"[{min(values):.3f}, {max(values):.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
