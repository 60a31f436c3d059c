"""Feedback mode (``vhostuser-fuzz --feedback``): keep the cases that made
the target do something new, and mutate from them.

"Something new" is a behaviour feature no earlier case showed. Features
are what the front-end sees (each request's answer in words, which request
a disconnect followed, completions and their status bytes, errors
signalled, acceptances and refusals of requests that lack their protocol
feature, the verdict, the crash signature) plus, when the target exports
coverage counters (:mod:`.coverage`), its edges with bucketed hit counts. The same
features are counted in generation mode, so the two modes compare on one
scale: distinct behaviours reached in a time budget.

The corpus starts from earlier reproducers and corpus files (``--corpus``,
``--seed-corpus``) and a few generated cases; each round either mutates a
corpus entry (favouring entries whose features are rare) or generates a
fresh case, choosing by which of the two has lately found more new features
per second (never less than MIN_SHARE of either): early on, when everything
is new, generation's breadth pays; once it saturates, mutation takes over. Workers share the corpus directory: each
writes its new entries there and picks up the others' now and then.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from .case import Case, Outcome
from .harness import Harness
from .mutate import Mutator
from .replay import Reproducer, ReproducerError
from .runner import Recorder, RunConfig, Summary, case_for

INITIAL_GENERATED = 20         # fresh cases tried before mutating starts
SYNC_EVERY = 50                # rounds between looks at other workers' entries
MIN_SHARE = 0.1                # neither generation nor mutation drops below this
DECAY = 0.97                   # weight of the past in the schedule's averages


class Behaviours:
    """Distinct behaviour features seen so far, and how often each was hit."""

    def __init__(self):
        self.seen: set[str] = set()
        self.hits: collections.Counter = collections.Counter()

    @staticmethod
    def features(case: Case, outcome: Outcome) -> set[str]:
        feats = set(outcome.events)
        feats.add(f"kind:{case.kind}:{outcome.verdict.value}:{outcome.recovery}")
        if outcome.signature:
            feats.add(f"sig:{outcome.signature}")
        return feats

    def add(self, case: Case, outcome: Outcome) -> set[str]:
        """Records the case's features; returns those that were new."""
        feats = self.features(case, outcome)
        self.hits.update(feats)
        new = feats - self.seen
        self.seen |= new
        return new

    def rarity(self, feats: set[str]) -> float:
        """How rare a case's features are now: what a mutation of it may
        reach that others do not."""
        return sum(1.0 / self.hits[f] for f in feats if self.hits[f])

    def __len__(self) -> int:
        return len(self.seen)

    def edges(self) -> int:
        return len({f.rsplit(":", 1)[0] for f in self.seen if f.startswith("cov:")})


@dataclass
class Entry:
    case: Case
    features: set[str]         # what it reached when it entered
    seconds: float = 1.0       # what it cost to run
    picked: int = 0
    name: str = ""


@dataclass
class Corpus:
    directory: str | None = None
    tag: str = "w0"                      # this worker's prefix for its files
    entries: list[Entry] = field(default_factory=list)
    _known: set[str] = field(default_factory=set)   # file names loaded or written
    _serial: int = 0

    def add(self, case: Case, features: set[str], seconds: float) -> Entry:
        entry = Entry(case, features, seconds)
        self.entries.append(entry)
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)
            self._serial += 1
            entry.name = f"{self.tag}-{self._serial:06d}.json"
            path = os.path.join(self.directory, entry.name)
            with open(path + ".tmp", "w") as f:
                f.write(case.dumps())
            os.replace(path + ".tmp", path)
            self._known.add(entry.name)
        return entry

    def pick(self, rng: random.Random, seen: "Behaviours") -> Entry:
        """Of a few entries drawn at random, the one whose features are
        rarest per second of running it, less so the more it was picked
        (AFL's favoured entries, roughly)."""
        sample = rng.sample(self.entries, min(5, len(self.entries)))
        best = max(sample, key=lambda e: (seen.rarity(e.features) + 0.01)
                   / (max(e.seconds, 0.02) * (1 + e.picked) ** 0.5))
        best.picked += 1
        return best

    def foreign(self) -> list[Case]:
        """Other workers' entries not seen yet (not run here: they are
        parents only)."""
        if not self.directory or not os.path.isdir(self.directory):
            return []
        out = []
        for name in sorted(os.listdir(self.directory)):
            if name in self._known or not name.endswith(".json"):
                continue
            self._known.add(name)
            try:
                with open(os.path.join(self.directory, name)) as f:
                    out.append(Case.from_json(json.load(f)))
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return out


class Schedule:
    """Generation or mutation, by their recent yield of new features per
    second (moving averages), as a two-armed bandit."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.found = {"generate": 1.0, "mutate": 1.0}
        self.spent = {"generate": 1.0, "mutate": 1.0}

    def choose(self) -> str:
        rate = {arm: self.found[arm] / max(self.spent[arm], 1e-3) for arm in self.found}
        share = rate["generate"] / (rate["generate"] + rate["mutate"] or 1.0)
        share = min(max(share, MIN_SHARE), 1 - MIN_SHARE)
        return "generate" if self.rng.random() < share else "mutate"

    def update(self, arm: str, new: int, seconds: float) -> None:
        self.found[arm] = DECAY * self.found[arm] + (1 - DECAY) * new
        self.spent[arm] = DECAY * self.spent[arm] + (1 - DECAY) * seconds


def seed_cases(paths: list[str], profile: str) -> list[Case]:
    """Cases from reproducer files and corpus files (or directories of
    them) for ``profile``; unreadable files are skipped."""
    files: list[str] = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "**", "*.json"), recursive=True)) \
            if os.path.isdir(p) else [p]
    out = []
    for path in files:
        try:
            case = Reproducer.read(path).case
        except ReproducerError:
            try:
                with open(path) as f:
                    case = Case.from_json(json.load(f))
            except (OSError, ValueError, TypeError, KeyError):
                continue
        except OSError:
            continue
        if case.profile == profile:
            out.append(case)
    return out


def run_feedback(harness: Harness, cfg: RunConfig, *, allow_packed: bool,
                 seeds: list[Case] = (), corpus_dir: str | None = None, tag: str = "w0",
                 log: Callable[[str], None] = print) -> tuple[Summary, Behaviours]:
    profile = harness.target.profile.name
    rng = random.Random(f"vhostuser-fuzz-feedback:{cfg.seed}:{tag}")
    mutator = Mutator(rng, allow_packed=allow_packed)
    rec = Recorder(harness, cfg, log)
    seen = Behaviours()
    corpus = Corpus(corpus_dir, tag)
    if corpus_dir and os.path.isdir(corpus_dir):    # an earlier run's: among the seeds
        corpus._known.update(os.listdir(corpus_dir))
    deadline = time.monotonic() + cfg.seconds if cfg.seconds else None
    generated = cfg.start
    rounds = 0

    def budget_left() -> bool:
        if cfg.cases is not None and rec.summary.cases + rec.summary.skipped \
                + rec.summary.frontend_errors >= cfg.cases:
            return False
        return deadline is None or time.monotonic() < deadline

    schedule = Schedule(rng)

    def attempt(case: Case, label: str, arm: str | None = None) -> None:
        t0 = time.monotonic()
        outcome = rec.execute(case, label)
        seconds = time.monotonic() - t0
        new = seen.add(case, outcome) if outcome is not None else set()
        if arm:
            schedule.update(arm, len(new), seconds)
        rec.summary.behaviours = len(seen)
        if new:
            corpus.add(case, Behaviours.features(case, outcome), seconds)

    for case in seeds:                   # earlier reproducers and corpus entries first
        if not budget_left():
            break
        if not allow_packed and case.setup.packed:
            continue
        attempt(case, f"{tag}-seed{rounds}")
        rounds += 1
    while budget_left():
        rounds += 1
        if rounds % SYNC_EVERY == 0:
            for case in corpus.foreign():
                if case.profile == profile and (allow_packed or not case.setup.packed):
                    corpus.entries.append(Entry(case, set()))
        if not corpus.entries or generated - cfg.start < INITIAL_GENERATED \
                or schedule.choose() == "generate":
            case = case_for(profile, cfg.seed, generated, allow_packed=allow_packed,
                            kinds=cfg.kinds)
            generated += 1
            attempt(case, f"{cfg.seed}-{generated - 1}", "generate")
            continue
        parent = corpus.pick(rng, seen)
        donor = rng.choice(corpus.entries).case
        child = mutator.mutate(parent.case, donor)
        if cfg.kinds and child.kind not in cfg.kinds:
            continue
        attempt(child, f"{tag}-m{rounds}", "mutate")
    summary = rec.finish()
    summary.corpus = len(corpus.entries)
    summary.edges = seen.edges()
    return summary, seen
