"""Test data that shows where it came from: distinct per seed and per byte
position, so a block read from the wrong place or the wrong request never
matches."""
import random


def pattern(seed: int, n: int) -> bytes:
    """n pseudo-random bytes, the same for the same seed (fast: made in C)."""
    return random.Random(seed).randbytes(n)
