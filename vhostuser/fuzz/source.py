"""Where generators get their choices from.

The same generator code serves the command (a seeded ``random.Random``:
case N of seed S is always the same case) and pytest (hypothesis ``draw``:
hypothesis then shrinks by its own means).
"""
from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


class Source:
    """The four kinds of choice a generator makes."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, options: Sequence[T]) -> T:
        raise NotImplementedError

    def boolean(self, p_true: float = 0.5) -> bool:
        raise NotImplementedError

    def blob(self, max_len: int) -> bytes:
        raise NotImplementedError


class RandomSource(Source):
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options):
        return options[self.rng.randrange(len(options))]

    def boolean(self, p_true: float = 0.5) -> bool:
        return self.rng.random() < p_true

    def blob(self, max_len: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_len))


class HypothesisSource(Source):
    """Wraps the ``draw`` of a ``@st.composite`` strategy."""

    def __init__(self, draw):
        from hypothesis import strategies as st   # only needed under hypothesis
        self.draw = draw
        self.st = st

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def choice(self, options):
        return self.draw(self.st.sampled_from(list(options)))

    def boolean(self, p_true: float = 0.5) -> bool:
        # hypothesis shrinks booleans towards False; p_true is a hint only.
        return self.draw(self.st.booleans())

    def blob(self, max_len: int) -> bytes:
        return self.draw(self.st.binary(max_size=max_len))
