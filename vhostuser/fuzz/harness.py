"""One case against the back-end, with the evidence triage needs.

Shared by generation, feedback mode, shrinking and ``--replay``: runs the
case through the oracle, and for a failing one waits for a dying process,
takes what the back-end printed during the case and how it ended, computes
the crash signature, and then gets the back-end serving again (restarting
the process we spawned, else waiting for it) so the next case is judged on
its own.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from ..frontend import FrontendError, FrontendTimeout
from . import cores, triage
from .case import Case, Outcome, Verdict
from .coverage import CoverageMap
from .execute import accepted_frontend
from .oracle import Target, run_case
from .spawn import Spawner

LOG_LINES = 60          # back-end output lines kept in an outcome


class Harness:
    def __init__(self, target: Target, spawner: Spawner | None = None, *,
                 log: Callable[[str], None] = print, backtraces: bool = False,
                 settle_wait: float = 60.0, coverage: CoverageMap | None = None):
        self.target = target
        self.spawner = spawner
        self.log = log
        self.backtraces = backtraces
        self.settle_wait = settle_wait
        self.coverage = coverage      # the target's counters, zeroed per case
        self._runs = 0
        if spawner is not None:
            target.alive = spawner.alive

    def run(self, case: Case) -> Outcome:
        """The case's outcome, triaged; the back-end serves again afterwards.
        Raises oracle.CaseNotApplicable when the back-end cannot run the case."""
        sp = self.spawner
        if sp is not None and not sp.alive():
            self.log(f"back-end found dead before a case ({sp.wait_for_death(0)}); restarting")
            sp.restart()
        mark = sp.mark() if sp else 0
        if self.coverage is not None:
            self.coverage.reset()
        try:
            outcome = run_case(self.target, case)
        except FrontendTimeout as exc:     # anywhere the oracle did not expect one
            outcome = Outcome(Verdict.TIMEOUT, f"front-end timed out: {exc}")
            if self.target.dies_within(self.target.grace):
                outcome = replace(outcome, verdict=Verdict.CRASHED)
        if self.coverage is not None:
            outcome.events = outcome.events + self.coverage.features()
            self._runs += 1
            if self._runs == 20 and not self.coverage.ever_c:
                self.log("no C edge coverage from the back-end after 20 cases: is it built "
                         "with -fsanitize-coverage=trace-pc-guard and fuzz/cov/covmap.c, and "
                         "is that build the one running? (see FUZZING.md)")
        if not outcome.verdict.failing:
            return outcome
        lines: list[str] = []
        trace: list[str] = []
        if sp is not None:
            status = sp.wait_for_death(self.target.grace if outcome.verdict is Verdict.CRASHED
                                       else 0)
            lines = sp.output_since(mark, LOG_LINES)
            if status and self.backtraces:
                trace = cores.backtrace(sp.exe, sp.core_path())
            outcome = replace(outcome, exit_status=status, log_tail=lines,
                              backtrace=trace)
        outcome = replace(outcome, signature=triage.signature(outcome, lines, trace,
                                                              self.target.path))
        self.settle()
        return outcome

    def settle(self) -> None:
        """Restarts the back-end we spawned, else waits (bounded) until it
        serves, so one failure does not turn the next cases into false ones."""
        if self.spawner is not None:
            self.spawner.restart()
            return
        deadline = time.monotonic() + self.settle_wait
        while time.monotonic() < deadline:
            try:
                accepted_frontend(self.target.path, 1.0).close()
                return
            except (FrontendError, OSError):
                time.sleep(0.5)
        self.log(f"back-end still not serving {self.settle_wait:.0f}s after a failing case")
