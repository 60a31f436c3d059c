"""``vhostuser-replay``: the disk states a power cut may leave, rebuilt
from a recorder log (also ``python -m vhostuser.blk.replay``).

    vhostuser-replay LOG --base BASE --info
    vhostuser-replay LOG --base BASE --point N [--variant V] --out STATE.img
    vhostuser-replay LOG --base BASE --check 'e2fsck -fn {}' [--points 50]
        [--variants 3] [--seed S] [--keep-failed DIR]

``BASE`` is the disk as it was when recording began. ``--info`` prints the
log's size, its ops and the crash points; ``--out`` writes one state;
``--check`` builds states at ``--points`` crash points spread over the log,
``--variants`` per point (nothing optional, everything, then random
subsets with writes torn at ``--atomic`` blocks), runs the command on each (``{}`` is the image's
path) and exits 1 if any state fails it. ``--no-fua`` and ``--no-flush``
replay as if the back-end had ignored write-through or flushes (negative
controls). See ``vhostuser.blk.crash`` for the model.
"""
from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

from ..cli.common import add_version_option
from .crash import ATOMIC, CrashModel, CrashState
from .recordlog import RecordLog, RecordLogError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-replay",
                                description="Disk states after a power cut, from a recorder log.")
    add_version_option(p)
    p.add_argument("log", help="the recorder's log")
    p.add_argument("--base", required=True, help="the disk as it was when recording began")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--info", action="store_true", help="summarise the log")
    what.add_argument("--out", help="write the state at --point to this file")
    what.add_argument("--check", metavar="COMMAND",
                      help="run COMMAND on states ({} is the image); exit 1 if any fails")
    p.add_argument("--point", type=int, help="crash point for --out (default: the end)")
    p.add_argument("--variant", default="required", choices=("required", "all", "random"))
    p.add_argument("--points", type=int, default=50, help="crash points for --check")
    p.add_argument("--variants", type=int, default=3, help="states per point for --check")
    p.add_argument("--seed", type=int, default=0, help="for random subsets (reproducible)")
    p.add_argument("--atomic", type=int, default=ATOMIC, metavar="BYTES",
                   help="unit a torn write keeps whole (aligned; default %(default)s, the "
                        "physical block; 512 for sectors)")
    p.add_argument("--keep-failed", metavar="DIR", help="keep the images that fail --check here")
    p.add_argument("--no-fua", action="store_true", help="treat write-through writes as cached")
    p.add_argument("--no-flush", action="store_true", help="treat flushes as doing nothing")
    return p


def check_states(model: CrashModel, base: str, command: str, *, points: int, variants: int,
                 seed: int, keep_failed: str | None = None, out=sys.stdout) -> list[CrashState]:
    """Runs ``command`` on every state; returns those it failed on."""
    rng = random.Random(seed)
    failed: list[CrashState] = []
    checked = 0
    with tempfile.TemporaryDirectory(prefix="vhu-replay-") as tmp:
        image = os.path.join(tmp, "state.img")
        for point in model.choose_points(points):
            for state in model.states(point, variants, rng):
                model.apply(state, base, image)
                argv = [arg.replace("{}", image) for arg in shlex.split(command)]
                done = subprocess.run(argv, capture_output=True, text=True)
                checked += 1
                if done.returncode != 0:
                    failed.append(state)
                    print(f"FAIL {state.describe()}: exit {done.returncode}", file=out)
                    tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
                    for line in tail:
                        print(f"    {line}", file=out)
                    if keep_failed:
                        os.makedirs(keep_failed, exist_ok=True)
                        shutil.copyfile(image, os.path.join(
                            keep_failed, f"point{state.point}-{state.variant}-{checked}.img"))
    print(f"{checked} states at {len(model.choose_points(points))} crash points checked, "
          f"{len(failed)} failed", file=out)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        log = RecordLog(args.log)
    except (OSError, RecordLogError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 1
    with log:
        if os.path.getsize(args.base) < log.disk_size:
            print(f"replay: {args.base} is smaller than the recorded disk ({log.disk_size} "
                  "bytes)", file=sys.stderr)
            return 1
        try:
            model = CrashModel(log, atomic=args.atomic, trust_fua=not args.no_fua,
                               trust_flush=not args.no_flush)
        except ValueError as exc:
            print(f"replay: {exc}", file=sys.stderr)
            return 1
        if args.info:
            kinds = Counter(op.kind.name for op in model.ops)
            failed = sum(1 for op in model.ops if op.done is not None and not op.ok)
            unfinished = sum(1 for op in model.ops if op.done is None)
            print(f"disk {log.disk_size} bytes, {len(log.entries)} records"
                  + (" (cut short at the end)" if log.truncated else ""))
            print("ops: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                  + f"; {failed} failed, {unfinished} never finished")
            print(f"crash points 0..{model.points}, {len(model.interesting_points())} "
                  "where the contract changes")
            return 0
        if args.out:
            point = model.points if args.point is None else args.point
            try:
                state = model.state(point, args.variant, random.Random(args.seed))
            except ValueError as exc:
                print(f"replay: {exc}", file=sys.stderr)
                return 1
            model.apply(state, args.base, args.out)
            print(state.describe())
            return 0
        failed = check_states(model, args.base, args.check, points=args.points,
                              variants=args.variants, seed=args.seed,
                              keep_failed=args.keep_failed)
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
