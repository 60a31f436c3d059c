"""The loop behind ``vhostuser-fuzz``: generate, run, judge, shrink, record."""
from __future__ import annotations

import collections
import os
import random
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from ..frontend import Frontend, FrontendError
from ..protocol import Feature, ProtocolFeature, bit
from . import generate, profiles
from .case import Case, Outcome, Verdict
from .execute import accepted_frontend
from .oracle import Target, Unsupported, run_case
from .replay import Reproducer
from .shrink import shrink
from .source import RandomSource


def case_for(profile: str, seed: int, index: int, *, allow_packed: bool,
             kinds: tuple[str, ...] | None = None) -> Case:
    """Case ``index`` of ``seed``: the same on every machine and run."""
    rng = random.Random(f"vhostuser-fuzz:{seed}:{index}")
    c = generate.case(RandomSource(rng), profile, allow_packed=allow_packed, kinds=kinds)
    c.seed, c.index = seed, index
    return c


class Spawner:
    """Starts the back-end from a command line and restarts it after it died,
    so one crash does not end a run. ``{socket}`` in the command is replaced."""

    def __init__(self, command: str, socket_path: str, *, startup: float = 10.0):
        self.argv = [a.replace("{socket}", socket_path) for a in shlex.split(command)]
        self.socket_path = socket_path
        self.startup = startup
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + self.startup
            while not os.path.exists(self.socket_path):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            else:
                return
            self.stop()
            time.sleep(0.2 * (attempt + 1))   # e.g. the old process still holds the path
        raise RuntimeError(f"back-end {self.argv[0]} did not start")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


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


def probe_backend(path: str, profile: profiles.Profile, timeout: float) -> tuple[bool, profiles.Profile]:
    """(packed rings offered, profile trimmed to the queues the device has)."""
    Frontend.connect(path, timeout=timeout, wait=5.0).close()   # wait for it to listen
    with accepted_frontend(path, timeout) as fe:
        offered = fe.offered_features
        queues = profile.queues
        if offered & bit(Feature.PROTOCOL_FEATURES):
            if fe.get_protocol_features() & bit(ProtocolFeature.MQ):
                queues = min(queues, fe.get_queue_num())
    return bool(offered & bit(Feature.RING_PACKED)), profiles.get(profile.name, queues)


def settle_backend(target: Target, spawner: Spawner | None, log: Callable[[str], None],
                   wait: float = 60.0) -> None:
    """After a failing case: restart the back-end we spawned, else wait
    (up to ``wait`` seconds) until it serves again, so one failure does not
    turn every later case into a false one."""
    if spawner is not None:
        spawner.restart()
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            accepted_frontend(target.path, 1.0).close()
            return
        except (FrontendError, OSError):
            time.sleep(0.5)
    log(f"back-end still not serving {wait:.0f}s after a failing case")


@dataclass
class Summary:
    counts: collections.Counter = field(default_factory=collections.Counter)
    skipped: int = 0
    reset_cleared_wedges: int = 0
    reproducers: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    restarts: int = 0

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    @property
    def failing(self) -> int:
        return self.counts[Verdict.WEDGED] + self.counts[Verdict.CRASHED]

    def line(self) -> str:
        verdicts = " ".join(f"{v.value} {self.counts[v]}" for v in Verdict)
        return (f"{self.cases} cases in {self.elapsed:.1f}s: {verdicts}"
                f" (WEDGED cleared by reset: {self.reset_cleared_wedges}; skipped {self.skipped};"
                f" back-end restarts {self.restarts})")

    def to_json(self) -> dict:
        return {"cases": self.cases, "verdicts": {v.value: self.counts[v] for v in Verdict},
                "wedged_cleared_by_reset": self.reset_cleared_wedges, "skipped": self.skipped,
                "elapsed": round(self.elapsed, 3), "reproducers": self.reproducers,
                "restarts": self.restarts}


@dataclass
class RunConfig:
    cases: int
    seed: int
    kinds: tuple[str, ...] | None = None
    start: int = 0
    out_dir: str = "fuzz-out"
    keep: frozenset = frozenset({Verdict.WEDGED, Verdict.CRASHED})
    max_reproducers: int = 20
    shrink_budget: int = 100
    command: str = ""
    progress: int = 0


def run(target: Target, cfg: RunConfig, *, spawner: Spawner | None = None,
        allow_packed: bool = True, log: Callable[[str], None] = print) -> Summary:
    summary = Summary()
    t0 = time.monotonic()
    kept = collections.Counter()

    def execute(case: Case) -> Outcome:
        outcome = run_case(target, case)
        if outcome.verdict.failing:
            settle_backend(target, spawner, log)
        return outcome

    for index in range(cfg.start, cfg.start + cfg.cases):
        case = case_for(target.profile.name, cfg.seed, index, allow_packed=allow_packed,
                        kinds=cfg.kinds)
        try:
            outcome = execute(case)
        except Unsupported:
            summary.skipped += 1
            continue
        except FrontendError as exc:     # a front-end bug must not look like a verdict
            log(f"case {index}: front-end error {exc!r}; skipped")
            summary.skipped += 1
            continue
        summary.counts[outcome.verdict] += 1
        if outcome.verdict is Verdict.WEDGED and outcome.reset_clears:
            summary.reset_cleared_wedges += 1
        if outcome.verdict.failing:
            log(f"case {index} ({case.kind}): {outcome.verdict.value}: {outcome.detail}")
        if outcome.verdict in cfg.keep and kept[outcome.verdict] < cfg.max_reproducers:
            kept[outcome.verdict] += 1
            small, small_outcome = case, outcome
            can_shrink = outcome.verdict is not Verdict.CRASHED or spawner is not None
            if outcome.verdict.failing and can_shrink and cfg.shrink_budget:
                small, small_outcome, tries = shrink(case, outcome, execute,
                                                     budget=cfg.shrink_budget)
                log(f"case {index}: shrunk from {len(case.actions)} to {len(small.actions)} "
                    f"actions in {tries} tries")
            os.makedirs(cfg.out_dir, exist_ok=True)
            path = os.path.join(cfg.out_dir, f"{target.profile.name}-{cfg.seed}-{index}-"
                                f"{outcome.verdict.value.lower()}.json")
            Reproducer(small, small_outcome, case if small is not case else None,
                       cfg.command).write(path)
            summary.reproducers.append(path)
            log(f"case {index}: reproducer {path}")
        if cfg.progress and (index - cfg.start + 1) % cfg.progress == 0:
            summary.elapsed = time.monotonic() - t0
            log(f"progress: {summary.line()}")
    summary.elapsed = time.monotonic() - t0
    summary.restarts = spawner.restarts if spawner else 0
    return summary
