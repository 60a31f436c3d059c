"""vhostuser-fuzz: fuzz a running vhost-user back-end over its socket.

Each case runs on a fresh connection; a liveness oracle then checks that a
well-formed request still completes and gives PASS, REJECT, WEDGED or
CRASHED (see vhostuser.fuzz.oracle). Cases are reproducible from the seed;
failing ones are shrunk and written as reproducer files, which --replay
runs again. Exit status: 0 when no case was WEDGED or CRASHED, 1 otherwise,
2 on usage errors.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..frontend import FrontendError
from ..fuzz import profiles
from ..fuzz.case import KINDS, Verdict
from ..fuzz.oracle import Target, Unsupported, run_case
from ..fuzz.replay import Reproducer, ReproducerError
from ..fuzz.runner import RunConfig, Spawner, pid_alive, probe_backend, run
from . import common


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_version_option(p)
    p.add_argument("--socket-path", dest="socket", metavar="PATH",
                   help="the back-end's socket (required)")
    common.alias(p, "--socket", dest="socket", metavar="PATH")
    p.add_argument("--profile", choices=sorted(profiles.PROFILES), default="blk")
    p.add_argument("--cases", type=int, default=1000, metavar="N")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--start", type=int, default=0, metavar="I", help="first case index")
    p.add_argument("--kinds", metavar="K,...", help=f"only these case kinds ({', '.join(KINDS)})")
    p.add_argument("--queues", type=int, metavar="N", help="queues to set up (default: profile's)")
    p.add_argument("--timeout", type=float, default=2.0, metavar="SEC",
                   help="how long a well-formed request may take")
    p.add_argument("--settle", type=float, default=0.05, metavar="SEC",
                   help="how long a malformed input may take to be answered")
    p.add_argument("--out", default="fuzz-out", metavar="DIR", help="where reproducers go")
    p.add_argument("--keep", default="WEDGED,CRASHED", metavar="V,...",
                   help="verdicts to write reproducers for")
    p.add_argument("--max-reproducers", type=int, default=20, metavar="N", help="per verdict")
    p.add_argument("--shrink-budget", type=int, default=100, metavar="N",
                   help="re-runs spent shrinking each failing case (0: no shrinking)")
    p.add_argument("--spawn", metavar="CMD", help="start the back-end with CMD ({socket} is "
                   "replaced) and restart it after crashes")
    p.add_argument("--pid", type=int, help="the back-end's process, to tell crashes apart")
    p.add_argument("--sibling", metavar="PATH", help="another device of the same process, "
                   "probed after every case")
    p.add_argument("--no-packed", action="store_true", help="never negotiate packed rings")
    p.add_argument("--progress", type=int, default=0, metavar="N", help="report every N cases")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--replay", metavar="FILE", help="run a reproducer file instead of fuzzing")
    return p


def _replay(args, target: Target) -> int:
    try:
        rep = Reproducer.read(args.replay)
    except (OSError, ReproducerError) as exc:
        print(f"vhostuser-fuzz: {exc}", file=sys.stderr)
        return 2
    target.profile = profiles.get(rep.case.profile, args.queues)
    try:
        outcome = run_case(target, rep.case)
    except Unsupported as exc:
        print(f"vhostuser-fuzz: back-end cannot run this case: {exc}", file=sys.stderr)
        return 2
    same = outcome.verdict == rep.outcome.verdict
    print(f"{outcome.verdict.value} (recorded {rep.outcome.verdict.value}"
          f"{'' if same else ', DIFFERENT'}): {outcome.detail}")
    if args.json:
        print(json.dumps({"verdict": outcome.to_json(), "recorded": rep.outcome.to_json(),
                          "same": same}))
    return 1 if outcome.verdict.failing else 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "socket", None) is None:
        print("vhostuser-fuzz: --socket-path is required", file=sys.stderr)
        return 2
    try:
        keep = frozenset(Verdict(v.strip().upper()) for v in args.keep.split(",") if v.strip())
        kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None
        if kinds and not set(kinds) <= set(KINDS):
            raise ValueError(f"unknown kinds {sorted(set(kinds) - set(KINDS))}")
        profile = profiles.get(args.profile, args.queues)
    except ValueError as exc:
        print(f"vhostuser-fuzz: {exc}", file=sys.stderr)
        return 2

    spawner = Spawner(args.spawn, args.socket) if args.spawn else None
    alive = spawner.alive if spawner else pid_alive(args.pid) if args.pid else (lambda: True)
    target = Target(args.socket, profile, timeout=args.timeout, settle=args.settle, alive=alive,
                    sibling=args.sibling)
    try:
        if spawner:
            spawner.start()
        if args.replay:
            return _replay(args, target)
        packed, target.profile = probe_backend(args.socket, profile, args.timeout)
        command = " ".join(["vhostuser-fuzz", "--socket-path", args.socket, "--profile", args.profile,
                            "--seed", str(args.seed)])
        cfg = RunConfig(cases=args.cases, seed=args.seed, kinds=kinds, start=args.start,
                        out_dir=args.out, keep=keep, max_reproducers=args.max_reproducers,
                        shrink_budget=args.shrink_budget, command=command,
                        progress=args.progress)
        log = (lambda s: print(s, file=sys.stderr)) if args.json else print
        summary = run(target, cfg, spawner=spawner, allow_packed=packed and not args.no_packed,
                      log=log)
    except (OSError, FrontendError, RuntimeError) as exc:
        print(f"vhostuser-fuzz: {exc}", file=sys.stderr)
        return 2
    finally:
        if spawner:
            spawner.stop()
    print(json.dumps(summary.to_json()) if args.json else summary.line())
    return 1 if summary.failing else 0


if __name__ == "__main__":
    sys.exit(main())
