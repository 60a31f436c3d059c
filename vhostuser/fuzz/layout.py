"""The guest memory every fuzz connection shares with the back-end.

Two adjacent 1 MiB regions (buffers may straddle them), a 2 MiB hole, and a
small region after it. Rings built by the front-end's allocator sit at the
bottom of region 0; cases put their buffers in DATA, and raw rings that
messages cases describe in RAW_RING (the small region: an index beyond such
a ring points past the mapping, as a malicious driver would make it).
"""
from __future__ import annotations

MiB = 1 << 20
REGIONS = ((0, 1 * MiB), (1 * MiB, 1 * MiB), (4 * MiB, 64 << 10))
MEMORY_END = 4 * MiB + (64 << 10)

DATA = 0x80000                 # case buffers, up to the region boundary
DATA_SIZE = 0x10000
BOUNDARY = 1 * MiB             # between the two adjacent regions
HOLE = 2 * MiB                 # [2 MiB, 4 MiB): nothing mapped
RAW_RING = 4 * MiB             # raw rings of messages cases (region 2)
RAW_RING_SIZE = 64 << 10


def interesting_addresses() -> tuple[int, ...]:
    """Guest addresses worth pointing a descriptor at."""
    return (DATA, DATA + 0x100, DATA + 0x1000 - 8, BOUNDARY - 8, BOUNDARY - 512, BOUNDARY,
            HOLE, HOLE - 1, RAW_RING - 16, MEMORY_END - 1, MEMORY_END - 16, MEMORY_END,
            0, 1 << 32, 1 << 63, (1 << 64) - 1, (1 << 64) - 16)


INTERESTING_LENGTHS = (0, 1, 2, 15, 16, 17, 511, 512, 513, 4096, 65536, 1 << 20,
                       (1 << 31), (1 << 32) - 1)
