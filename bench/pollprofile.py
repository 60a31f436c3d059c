#!/usr/bin/env python3
"""What bounds the polled row (tmpfs, 4 KiB randread QD32, both sides
polling): the C file back-end with --poll, the client with --spin, on a
stamped tmpfs image as in bench/run.py, in alternating rounds over

- span: the whole image, or its first --small-span bytes (which fit in the
  last-level cache, so a read's copy comes from cache, not memory);
- verify: on (as every tabled run: the client checks every sector it
  reads, so it touches the data too) or off;

with `perf record` of the back-end in the first round of each (read them with
`perf report -i FILE`), the share of its CPU in memcpy, and
bench/copy_cost.c's cost of one random 4 KiB copy from the image's mapping,
with nothing else around it, for both spans.

    python bench/pollprofile.py [--rounds 3] [--seconds 3] [--image-size 1G]

The cases run on the back-end with --sandbox off, whose symbols perf can
resolve (a sandboxed process sees an empty root); the tabled back-end
(sandboxed, vhu-file-poll) runs the tabled case beside them for reference.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import run  # noqa: E402
from vhostuser.blkload import parse_size  # noqa: E402

NAME = "vhu-file-poll-unsandboxed"
run.BACKENDS[NAME] = run.Spec(run._file("--poll", "1000", "--sandbox", "off"),
                              "vhostuser C file back-end, --poll 1000, --sandbox off")


def memcpy_share(perf_data: Path) -> float | None:
    """Percent of the back-end's samples in libc's memcpy/memmove."""
    rep = subprocess.run(["perf", "report", "-i", str(perf_data), "--no-children", "--stdio",
                          "--sort", "symbol"], capture_output=True, text=True)
    total = 0.0
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%.*\b__mem(?:cpy|move)_\w+", line)
        if m:
            total += float(m.group(1))
    return total if rep.returncode == 0 else None


def copy_cost(binary: Path, img: str, span: int) -> float:
    out = subprocess.run(["taskset", "-c", "0", str(binary), img, str(span)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["ns_per_copy"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--image-size", default="1G")
    p.add_argument("--small-span", default="16M")
    p.add_argument("--out", default=str(ROOT / "_work" / "pollprofile"))
    a = p.parse_args()
    size, small = parse_size(a.image_size), parse_size(a.small_span)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    perf = shutil.which("perf")
    binary = out / "copy_cost"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(ROOT / "bench" / "copy_cost.c")],
                   check=True)
    setup = run.SETUPS["tmpfs"]
    work = run.scratch_dir(setup)
    img = str(work / "disk.img")
    run.make_image(setup, img, size)
    args = argparse.Namespace(warmup=None, verify=False, client_cpu="1", nice=-5)
    # The tabled back-end (sandboxed) on the tabled load, for reference, and
    # the unsandboxed one, which perf can read, on every case.
    backends = {b: run.Backend(b, work, img, size, "0", -5, setup=setup)
                for b in ("vhu-file-poll", NAME)}
    cases = [("vhu-file-poll", size, True)] + [(NAME, span, verify) for span in (size, small)
                                              for verify in (True, False)]
    rows: dict = {c: [] for c in cases}
    shares: dict = {}
    try:
        for b in backends.values():
            b.wait_ready()
        for rnd in range(a.rounds):
            order = cases[rnd % len(cases):] + cases[:rnd % len(cases)]
            for name, span, verify in order:
                backend = backends[name]
                args.verify = verify
                rec = None
                if perf and rnd == 0 and name == NAME:
                    data = out / f"perf-span{span}-verify{int(verify)}.data"
                    # Attached after the client connected: -p follows only the
                    # threads there are, and the queue's worker starts then.
                    rec = subprocess.Popen(["sh", "-c", 'sleep 0.4; exec "$@"', "sh", perf,
                                            "record", "-F", "999", "-g", "-p",
                                            str(backend.pid), "-o", str(data), "--", "sleep",
                                            str(max(a.seconds - 1.0, 0.5))],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                r = run.blkload(args, backend, a.seconds, rw="randread", bs="4k", qd=32,
                                spin=True, span=span)
                if rec is not None:
                    rec.wait()
                    shares[(name, span, verify)] = memcpy_share(data)
                rows[(name, span, verify)].append(r["iops"])
                print(f"round {rnd + 1} {name:26} span {span:>11} verify {verify!s:5} "
                      f"IOPS {r['iops']:>10.0f} load {run.loadavg():.2f}", flush=True)
        costs = {span: copy_cost(binary, img, span) for span in (size, small)}
    finally:
        for b in backends.values():
            b.stop()
        shutil.rmtree(work, ignore_errors=True)
    commit, dirty = run.tree_state()
    lines = [f"commit {commit[:7]}{' with uncommitted changes' if dirty else ''}; "
             f"image {size} bytes on tmpfs; "
             f"{a.rounds} rounds of {a.seconds:g} s; back-end on CPU 0, client on CPU 1", "",
             "| back-end | span | client --verify | IOPS median [range] "
             "| memcpy share of back-end CPU | one 4 KiB copy alone (copy_cost) |",
             "|---|---|---|---|---|---|"]
    for name, span, verify in cases:
        v = sorted(rows[(name, span, verify)])
        share = shares.get((name, span, verify))
        lines.append(f"| {name} | {span} | {'on' if verify else 'off'} | {v[len(v) // 2]:,.0f} "
                     f"[{v[0]:,.0f}..{v[-1]:,.0f}] | "
                     f"{'-' if share is None else f'{share:.0f}%'} | {costs[span]:.0f} ns |")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
