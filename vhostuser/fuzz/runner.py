"""The loop behind ``vhostuser-fuzz``: generate, run, judge, record.

:class:`Recorder` is shared with feedback mode (:mod:`.feedback`): it counts
verdicts, dedupes failures by crash signature, shrinks the first case of
each signature (keeping the signature, not only the verdict) and writes one
reproducer per signature.
"""
from __future__ import annotations

import collections
import itertools
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from ..frontend import FrontendError
from ..protocol import Feature, ProtocolFeature, bit
from . import generate, profiles
from .case import Case, Outcome, Verdict
from .execute import accepted_frontend
from .harness import Harness
from .oracle import CaseNotApplicable
from .replay import Reproducer
from .shrink import shrink
from .source import RandomSource
from .spawn import Spawner  # noqa: F401  (re-exported: older callers import it from here)


def case_for(profile: str, seed: int, index: int, *, allow_packed: bool,
             kinds: tuple[str, ...] | None = None) -> Case:
    """Case ``index`` of ``seed``: the same on every machine and run, given
    the same ``allow_packed`` (see FUZZING.md)."""
    rng = random.Random(f"vhostuser-fuzz:{seed}:{index}")
    c = generate.case(RandomSource(rng), profile, allow_packed=allow_packed, kinds=kinds)
    c.seed, c.index = seed, index
    return c


def pid_alive(pid: int) -> Callable[[], bool]:
    def alive() -> bool:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return alive


def probe_backend(path: str, profile: profiles.Profile, timeout: float, *,
                  wait: float = 30.0) -> tuple[bool, profiles.Profile]:
    """(packed rings offered, profile trimmed to the queues the device has).

    Retries for up to ``wait`` seconds: a back-end that was just started (or
    restarted) may listen before it answers."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with accepted_frontend(path, timeout) as fe:
                offered = fe.offered_features
                queues = profile.queues
                if offered & bit(Feature.PROTOCOL_FEATURES):
                    fe.get_protocol_features()
                    if fe.offered_protocol_features & bit(ProtocolFeature.MQ):
                        fe.set_protocol_features(bit(ProtocolFeature.MQ))
                        queues = min(queues, fe.get_queue_num() * profile.rings_per_queue)
            return bool(offered & bit(Feature.RING_PACKED)), profiles.get(profile.name, queues)
        except (FrontendError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class Summary:
    counts: collections.Counter = field(default_factory=collections.Counter)
    skipped: int = 0                 # the back-end lacks what the case needs
    frontend_errors: int = 0         # our front-end failed: neither a verdict nor a skip
    reset_cleared_wedges: int = 0
    signatures: dict = field(default_factory=dict)   # signature -> {count, verdict, ...}
    reproducers: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    restarts: int = 0
    behaviours: int = 0              # distinct behaviour features seen (see feedback.py)
    edges: int = 0                   # of those, coverage features (target's counters)
    corpus: int = 0                  # feedback mode: cases kept
    # "accepted/refused/silent-without:FEATURE:REQUEST" -> cases (kind unnegotiated)
    unnegotiated: collections.Counter = field(default_factory=collections.Counter)

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    @property
    def attempted(self) -> int:
        return self.cases + self.skipped + self.frontend_errors

    @property
    def failing(self) -> int:
        return sum(self.counts[v] for v in Verdict if v.failing)

    def skipped_share(self) -> float:
        return (self.skipped + self.frontend_errors) / self.attempted if self.attempted else 0.0

    def line(self) -> str:
        verdicts = " ".join(f"{v.value} {self.counts[v]}" for v in Verdict)
        extra = f"; behaviours {self.behaviours}" if self.behaviours else ""
        extra += f"; corpus {self.corpus}" if self.corpus else ""
        return (f"{self.cases} cases in {self.elapsed:.1f}s: {verdicts}"
                f" (distinct failures {len(self.signatures)}; WEDGED cleared by reset:"
                f" {self.reset_cleared_wedges}; skipped {self.skipped}; front-end errors"
                f" {self.frontend_errors}; back-end restarts {self.restarts}{extra})")

    def to_json(self) -> dict:
        return {"cases": self.cases, "verdicts": {v.value: self.counts[v] for v in Verdict},
                "wedged_cleared_by_reset": self.reset_cleared_wedges, "skipped": self.skipped,
                "frontend_errors": self.frontend_errors, "signatures": self.signatures,
                "elapsed": round(self.elapsed, 3), "reproducers": self.reproducers,
                "restarts": self.restarts, "behaviours": self.behaviours,
                "edges": self.edges, "corpus": self.corpus,
                "unnegotiated": dict(sorted(self.unnegotiated.items()))}


@dataclass
class RunConfig:
    cases: int | None            # None: until ``seconds`` run out
    seed: int
    kinds: tuple[str, ...] | None = None
    start: int = 0
    out_dir: str = "fuzz-out"
    keep: frozenset = frozenset({Verdict.WEDGED, Verdict.CRASHED, Verdict.TIMEOUT})
    max_reproducers: int = 20    # per verdict
    shrink_budget: int = 100
    command: str = ""
    progress: int = 0
    seconds: float | None = None
    stride: int = 1              # generation: every stride-th index (parallel workers)


class Recorder:
    """Runs cases through a Harness and keeps the score."""

    def __init__(self, harness: Harness, cfg: RunConfig, log: Callable[[str], None]):
        self.harness = harness
        self.cfg = cfg
        self.log = log
        self.summary = Summary()
        self._kept = collections.Counter()
        self._t0 = time.monotonic()

    def execute(self, case: Case, label: str) -> Outcome | None:
        """Runs and records one case; None when it was not judged."""
        try:
            outcome = self.harness.run(case)
        except CaseNotApplicable:
            self.summary.skipped += 1
            return None
        except FrontendError as exc:     # a front-end bug must not look like a verdict
            self.log(f"case {label}: front-end error {exc!r}; not judged")
            self.summary.frontend_errors += 1
            return None
        self.record(case, outcome, label)
        return outcome

    def record(self, case: Case, outcome: Outcome, label: str) -> None:
        s = self.summary
        s.counts[outcome.verdict] += 1
        s.unnegotiated.update(e for e in outcome.events if "-without:" in e)
        if outcome.verdict is Verdict.WEDGED and outcome.reset_clears:
            s.reset_cleared_wedges += 1
        if outcome.verdict.failing:
            self._failure(case, outcome, label)
        elif outcome.verdict in self.cfg.keep and self._kept[outcome.verdict] < self.cfg.max_reproducers:
            self._kept[outcome.verdict] += 1
            self._write(case, outcome, None, label)
        if self.cfg.progress and s.cases % self.cfg.progress == 0:
            self.log(f"progress: {self.finish().line()}")

    def _failure(self, case: Case, outcome: Outcome, label: str) -> None:
        sig = outcome.signature
        known = self.summary.signatures.get(sig)
        if known is not None:
            known["count"] += 1
            return
        self.log(f"case {label} ({case.kind}): {outcome.verdict.value}: {outcome.detail}")
        self.log(f"case {label}: new signature: {sig}")
        entry = {"count": 1, "verdict": outcome.verdict.value, "case": label, "reproducer": None}
        self.summary.signatures[sig] = entry
        if outcome.verdict not in self.cfg.keep or self._kept[outcome.verdict] >= self.cfg.max_reproducers:
            return
        self._kept[outcome.verdict] += 1
        small, small_outcome = case, outcome
        can_shrink = outcome.verdict is not Verdict.CRASHED or self.harness.spawner is not None
        if can_shrink and self.cfg.shrink_budget:
            small, small_outcome, tries = shrink(case, outcome, self._rerun,
                                                 budget=self.cfg.shrink_budget)
            self.log(f"case {label}: shrunk from {len(case.actions)} to {len(small.actions)} "
                     f"actions in {tries} tries, signature kept")
        entry["reproducer"] = self._write(small, small_outcome, case if small is not case else None,
                                          label)

    def _rerun(self, case: Case) -> Outcome:
        try:
            return self.harness.run(case)
        except (CaseNotApplicable, FrontendError) as exc:
            return Outcome(Verdict.PASS, f"not judged: {exc}")

    def _write(self, case: Case, outcome: Outcome, original: Case | None, label: str) -> str:
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        path = os.path.join(self.cfg.out_dir, f"{case.profile}-{label}-"
                            f"{outcome.verdict.value.lower()}.json")
        Reproducer(case, outcome, original, self.cfg.command).write(path)
        self.summary.reproducers.append(path)
        self.log(f"case {label}: reproducer {path}")
        return path

    def finish(self) -> Summary:
        self.summary.elapsed = time.monotonic() - self._t0
        sp = self.harness.spawner
        self.summary.restarts = sp.restarts if sp else 0
        return self.summary


def run(harness: Harness, cfg: RunConfig, *, allow_packed: bool = True,
        log: Callable[[str], None] = print):
    """Generation alone: case ``start``, ``start + stride``, ... of the seed,
    for ``cases`` cases or ``seconds`` seconds, whichever ends first.
    Returns (Summary, Behaviours)."""
    from .feedback import Behaviours     # measured in both modes, to compare them
    rec = Recorder(harness, cfg, log)
    seen = Behaviours()
    deadline = time.monotonic() + cfg.seconds if cfg.seconds else None
    end = cfg.start + cfg.cases if cfg.cases is not None else None
    for index in itertools.count(cfg.start, cfg.stride):
        if end is not None and index >= end:
            break
        if deadline is not None and time.monotonic() > deadline:
            break
        case = case_for(harness.target.profile.name, cfg.seed, index, allow_packed=allow_packed,
                        kinds=cfg.kinds)
        outcome = rec.execute(case, f"{cfg.seed}-{index}")
        if outcome is not None:
            seen.add(case, outcome)
            rec.summary.behaviours = len(seen)
    summary = rec.finish()
    summary.edges = seen.edges()
    return summary, seen
