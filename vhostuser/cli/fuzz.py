"""vhostuser-fuzz: fuzz a running vhost-user back-end over its socket.

Each case runs on a fresh connection; a liveness oracle then checks that a
well-formed request still completes and gives PASS, REJECT, WEDGED, CRASHED
or TIMEOUT (see vhostuser.fuzz.oracle). Cases are reproducible from the
seed; failures are deduplicated by crash signature, the first of each
signature is shrunk (keeping the signature) and written as a reproducer
file, which --replay runs again. --feedback keeps the cases that reached new
behaviour (or coverage, with --coverage) and mutates from them. Exit
status: 0 when no case was WEDGED, CRASHED or TIMEOUT and at most
--max-skipped percent went unjudged, 1 otherwise, 2 on usage errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..frontend import FrontendError
from ..fuzz import profiles
from ..fuzz.campaign import CampaignConfig, replay_case, run_campaign
from ..fuzz.case import KINDS, Verdict
from ..fuzz.oracle import CaseNotApplicable
from ..fuzz.replay import Reproducer, ReproducerError
from ..fuzz.runner import RunConfig
from ..fuzz.spawn import SpawnError
from . import common


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostuser-fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_version_option(p)
    p.add_argument("--socket-path", dest="socket", metavar="PATH",
                   help="the back-end's socket (required)")
    common.alias(p, "--socket", dest="socket", metavar="PATH")
    p.add_argument("--profile", choices=sorted(profiles.PROFILES), default="blk")
    p.add_argument("--cases", type=int, metavar="N",
                   help="cases to run (default 1000, or no limit with --seconds)")
    p.add_argument("--seconds", type=float, metavar="S", help="time budget")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--start", type=int, default=0, metavar="I", help="first case index")
    p.add_argument("--kinds", metavar="K,...", help=f"only these case kinds ({', '.join(KINDS)})")
    p.add_argument("--queues", type=int, metavar="N", help="queues to set up (default: profile's)")
    p.add_argument("--timeout", type=float, default=2.0, metavar="SEC",
                   help="how long a well-formed request may take")
    p.add_argument("--settle", type=float, default=0.05, metavar="SEC",
                   help="how long a malformed input may take to be answered")
    p.add_argument("--out", default="fuzz-out", metavar="DIR", help="where reproducers go")
    p.add_argument("--keep", default="WEDGED,CRASHED,TIMEOUT", metavar="V,...",
                   help="verdicts to write reproducers for")
    p.add_argument("--max-reproducers", type=int, default=20, metavar="N",
                   help="per verdict (failures: one per distinct signature)")
    p.add_argument("--shrink-budget", type=int, default=100, metavar="N",
                   help="re-runs spent shrinking each new failure (0: no shrinking)")
    p.add_argument("--spawn", metavar="CMD", help="start the back-end with CMD ({socket} is "
                   "replaced), keep its output, restart it after each failure")
    p.add_argument("--pid", type=int, help="the back-end's process, to tell crashes apart")
    p.add_argument("--sibling", metavar="PATH", help="another device of the same process, "
                   "probed after every case")
    p.add_argument("--no-packed", action="store_true",
                   help="never negotiate packed rings (makes case N of seed S the same "
                        "against back-ends that differ in offering them)")
    p.add_argument("--core-dumps", action="store_true",
                   help="let the spawned back-end dump core; gdb's backtrace goes into the "
                        "reproducer and the crash signature")
    p.add_argument("--feedback", action="store_true",
                   help="keep cases that reached new behaviour and mutate from them")
    p.add_argument("--coverage", action="store_true",
                   help="read the spawned back-end's coverage counters (a build with "
                        "fuzz/cov/covmap.c, see FUZZING.md) as behaviour")
    p.add_argument("--corpus", metavar="DIR", help="feedback corpus (default OUT/corpus)")
    p.add_argument("--seed-corpus", action="append", default=[], metavar="PATH",
                   help="reproducers or corpus files (or directories) to start feedback from;"
                        " repeatable")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="parallel workers, each with its own spawned back-end")
    p.add_argument("--max-skipped", type=float, default=5.0, metavar="PCT",
                   help="fail when more than PCT%% of cases could not be judged")
    p.add_argument("--progress", type=int, default=0, metavar="N", help="report every N cases")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--replay", metavar="FILE", help="run a reproducer file instead of fuzzing")
    return p


def _replay(args, cc: CampaignConfig, log) -> int:
    try:
        rep = Reproducer.read(args.replay)
    except (OSError, ReproducerError) as exc:
        print(f"vhostuser-fuzz: {exc}", file=sys.stderr)
        return 2
    try:
        outcome = replay_case(cc, rep.case, log)
    except CaseNotApplicable as exc:
        print(f"vhostuser-fuzz: back-end cannot run this case: {exc}", file=sys.stderr)
        return 2
    same = outcome.verdict == rep.outcome.verdict
    same_sig = outcome.signature == rep.outcome.signature
    print(f"{outcome.verdict.value} (recorded {rep.outcome.verdict.value}"
          f"{'' if same else ', DIFFERENT'}): {outcome.detail}")
    if outcome.signature:
        print(f"signature: {outcome.signature}"
              f"{'' if same_sig else f' (recorded: {rep.outcome.signature or None})'}")
    if outcome.exit_status:
        print(f"back-end: {outcome.exit_status}")
    if args.json:
        print(json.dumps({"verdict": outcome.to_json(), "recorded": rep.outcome.to_json(),
                          "same": same, "same_signature": same_sig}))
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
        profiles.get(args.profile, args.queues)
        if args.workers < 1:
            raise ValueError("--workers must be at least 1")
        if args.workers > 1 and not args.spawn:
            raise ValueError("--workers needs --spawn (each worker runs its own back-end)")
        if args.coverage and not args.spawn:
            raise ValueError("--coverage needs --spawn (the map is handed to the back-end)")
    except ValueError as exc:
        print(f"vhostuser-fuzz: {exc}", file=sys.stderr)
        return 2

    cases = args.cases if args.cases is not None else (None if args.seconds else 1000)
    command = " ".join(["vhostuser-fuzz", "--socket-path", args.socket, "--profile", args.profile,
                        "--seed", str(args.seed)] + (["--no-packed"] if args.no_packed else [])
                       + (["--spawn", repr(args.spawn)] if args.spawn else []))
    run_cfg = RunConfig(cases=cases, seed=args.seed, kinds=kinds, start=args.start,
                        out_dir=args.out, keep=keep, max_reproducers=args.max_reproducers,
                        shrink_budget=args.shrink_budget, command=command,
                        progress=args.progress, seconds=args.seconds)
    cc = CampaignConfig(socket=args.socket, profile=args.profile, run=run_cfg, spawn=args.spawn,
                        pid=args.pid, sibling=args.sibling, timeout=args.timeout,
                        settle=args.settle, queues=args.queues, no_packed=args.no_packed,
                        feedback=args.feedback, coverage=args.coverage,
                        core_dumps=args.core_dumps,
                        seed_paths=args.seed_corpus + ([args.out] if args.feedback else []),
                        corpus_dir=args.corpus or os.path.join(args.out, "corpus"),
                        workers=args.workers)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else print
    try:
        if args.replay:
            return _replay(args, cc, log)
        summary = run_campaign(cc, log)
    except (OSError, FrontendError, SpawnError, RuntimeError, ValueError) as exc:
        print(f"vhostuser-fuzz: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_json()) if args.json else summary.line())
    if summary.attempted and summary.skipped_share() * 100 > args.max_skipped:
        print(f"vhostuser-fuzz: {summary.skipped + summary.frontend_errors} of "
              f"{summary.attempted} cases not judged (more than {args.max_skipped}%)",
              file=sys.stderr)
        return 1
    return 1 if summary.failing else 0


if __name__ == "__main__":
    sys.exit(main())
