"""A whole campaign: the back-end (spawned or given), its coverage map,
generation or feedback, and parallel workers whose results are merged.

Each worker has its own back-end (``--spawn`` with ``{socket}`` suffixed
``.wN``), coverage map and share of the work: generation splits the case
indices (worker w runs start+w, start+w+N, ...), feedback workers share the
corpus directory. Their summaries merge into one, failures deduped by
signature across workers (one reproducer file per signature is kept).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from . import profiles
from .case import Case, Verdict
from .coverage import CoverageMap
from .feedback import Behaviours, run_feedback, seed_cases
from .harness import Harness
from .oracle import Target
from .runner import RunConfig, Summary, pid_alive, probe_backend, run
from .spawn import Spawner


@dataclass
class CampaignConfig:
    socket: str
    profile: str
    run: RunConfig
    spawn: str | None = None
    pid: int | None = None
    sibling: str | None = None
    timeout: float = 2.0
    settle: float = 0.05
    queues: int | None = None
    no_packed: bool = False
    feedback: bool = False
    coverage: bool = False
    core_dumps: bool = False
    seed_paths: list[str] = field(default_factory=list)
    corpus_dir: str | None = None
    workers: int = 1


def worker_socket(cc: CampaignConfig, worker: int) -> str:
    return cc.socket if cc.workers == 1 else f"{cc.socket}.w{worker}"


def run_worker(cc: CampaignConfig, worker: int,
               log: Callable[[str], None]) -> tuple[Summary, Behaviours]:
    sock = worker_socket(cc, worker)
    cov = CoverageMap(f"-w{worker}") if cc.coverage else None
    spawner = None
    if cc.spawn:
        env = {**os.environ, **cov.env()} if cov else None
        spawner = Spawner(cc.spawn, sock, env=env, core_dumps=cc.core_dumps)
    target = Target(sock, profiles.get(cc.profile, cc.queues), timeout=cc.timeout,
                    settle=cc.settle, alive=pid_alive(cc.pid) if cc.pid else None,
                    sibling=cc.sibling)
    try:
        if spawner:
            spawner.start()
        packed, target.profile = probe_backend(sock, target.profile, cc.timeout)
        harness = Harness(target, spawner, log=log, backtraces=cc.core_dumps, coverage=cov)
        allow_packed = packed and not cc.no_packed
        rc = dataclasses.replace(cc.run, start=cc.run.start + worker, stride=cc.workers)
        if cc.feedback:
            seeds = seed_cases(cc.seed_paths, cc.profile) if worker == 0 else []
            if cc.run.cases is not None:    # the count is for the whole campaign
                share = cc.run.cases // cc.workers + (worker < cc.run.cases % cc.workers)
                rc = dataclasses.replace(rc, cases=share)
            return run_feedback(harness, rc, allow_packed=allow_packed, seeds=seeds,
                                corpus_dir=cc.corpus_dir, tag=f"w{worker}", log=log)
        return run(harness, rc, allow_packed=allow_packed, log=log)
    finally:
        if spawner:
            spawner.stop()
        if cov:
            cov.close()


def _child(cc: CampaignConfig, worker: int, results) -> None:
    def log(line: str) -> None:           # stderr: stdout carries the summary
        print(f"[w{worker}] {line}", file=sys.stderr, flush=True)
    try:
        summary, seen = run_worker(cc, worker, log)
        results.put((worker, summary.to_json(), sorted(seen.seen), ""))
    except Exception as exc:      # reported by the parent, which decides
        results.put((worker, None, [], f"{type(exc).__name__}: {exc}"))


def merge(parts: list[dict], seen: Behaviours) -> Summary:
    """One summary from the workers' (JSON) summaries."""
    total = Summary()
    for p in parts:
        for v, n in p["verdicts"].items():
            total.counts[Verdict(v)] += n
        total.skipped += p["skipped"]
        total.frontend_errors += p["frontend_errors"]
        total.reset_cleared_wedges += p["wedged_cleared_by_reset"]
        total.elapsed = max(total.elapsed, p["elapsed"])
        total.restarts += p["restarts"]
        total.corpus += p["corpus"]
        total.unnegotiated.update(p["unnegotiated"])
        for sig, entry in p["signatures"].items():
            known = total.signatures.get(sig)
            if known is None:
                total.signatures[sig] = dict(entry)
                continue
            known["count"] += entry["count"]
            if entry["reproducer"] and known["reproducer"]:
                try:                      # the same bug found twice: keep one file
                    os.unlink(entry["reproducer"])
                except OSError:
                    pass
            elif entry["reproducer"]:
                known["reproducer"] = entry["reproducer"]
        total.reproducers += [r for r in p["reproducers"] if os.path.exists(r)]
    total.behaviours = len(seen)
    total.edges = seen.edges()
    return total


def run_campaign(cc: CampaignConfig, log: Callable[[str], None] = print) -> Summary:
    if cc.workers == 1:
        return run_worker(cc, 0, log)[0]
    if not cc.spawn:
        raise ValueError("--workers needs --spawn (each worker runs its own back-end)")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(cc, w, results), name=f"fuzz-w{w}")
             for w in range(cc.workers)]
    for p in procs:
        p.start()
    parts, seen, errors = [], Behaviours(), []
    for _ in procs:
        worker, summary, features, error = results.get()
        if error:
            errors.append(f"worker {worker}: {error}")
            continue
        parts.append(summary)
        seen.seen |= set(features)
    for p in procs:
        p.join()
    if errors and not parts:
        raise RuntimeError("; ".join(errors))
    for e in errors:
        log(e)
    return merge(parts, seen)


def replay_case(cc: CampaignConfig, case: Case, log: Callable[[str], None]):
    """Runs one case as a campaign would (same queue count cut, spawned
    back-end, triage); returns its Outcome."""
    cov = None
    spawner = Spawner(cc.spawn, cc.socket, core_dumps=cc.core_dumps) if cc.spawn else None
    target = Target(cc.socket, profiles.get(case.profile, cc.queues), timeout=cc.timeout,
                    settle=cc.settle, alive=pid_alive(cc.pid) if cc.pid else None,
                    sibling=cc.sibling)
    try:
        if spawner:
            spawner.start()
        _, target.profile = probe_backend(cc.socket, target.profile, cc.timeout)
        harness = Harness(target, spawner, log=log, backtraces=cc.core_dumps, coverage=cov)
        return harness.run(case)
    finally:
        if spawner:
            spawner.stop()
