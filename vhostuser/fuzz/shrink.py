"""Greedy shrinking of a failing case: fewer actions, smaller numbers.

A candidate is kept when it still gives the same verdict and the same
crash signature (so a crash does not shrink into a different one). Each
try runs the case against the back-end again, so the budget bounds the
time spent.
"""
from __future__ import annotations

from typing import Callable

from .case import Case, Outcome

SIMPLE_INTS = (0, 1)


def _candidates(case: Case):
    """Smaller variants of case, most promising first."""
    n = len(case.actions)
    # Drop halves, then single actions (from the end: later actions depend
    # on earlier ones more often than the reverse).
    for size in (n // 2, 1):
        if size < 1:
            continue
        for start in range(n - size, -1, -size):
            c = case.copy()
            del c.actions[start:start + size]
            if c.actions:
                yield c
    for i, action in enumerate(case.actions):
        for key, value in action.items():
            if key == "op":
                continue
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and value not in SIMPLE_INTS:
                for simpler in (0, value // 2):
                    c = case.copy()
                    c.actions[i][key] = simpler
                    yield c
            elif isinstance(value, list) and value:
                c = case.copy()
                c.actions[i][key] = value[:-1]
                yield c
            elif isinstance(value, str) and len(value) > 2 and key in ("payload", "data"):
                c = case.copy()
                c.actions[i][key] = value[:len(value) // 4 * 2]
                yield c
    if case.setup.queue_size > 4:     # the probes need room for a 3-descriptor chain
        c = case.copy()
        c.setup.queue_size //= 2
        yield c


def shrink(case: Case, outcome: Outcome, run: Callable[[Case], Outcome], *,
           budget: int = 200, log: Callable[[str], None] = lambda s: None) -> tuple[Case, Outcome, int]:
    """Returns (smallest case found, its outcome, tries used)."""
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for candidate in _candidates(case):
            if tries >= budget:
                break
            tries += 1
            got = run(candidate)
            if got.verdict == outcome.verdict and got.signature == outcome.signature:
                log(f"shrunk to {len(candidate.actions)} actions ({tries} tries)")
                case, outcome, improved = candidate, got, True
                break
    return case, outcome, tries
