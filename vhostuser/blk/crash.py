"""Disk states a power cut may leave, rebuilt from a recorder log.

The contract (virtio 1.4, 5.2.6): a write is stable once it completed and
either it was a write-through write (FUA) or a FLUSH submitted after its
completion completed too. A crash point ``p`` is a moment between two log
records: the first ``p`` happened, the rest didn't. At ``p``:

* required: every change that completed OK before the start of the last
  FLUSH that completed OK before ``p``, and every FUA write that completed
  OK before ``p``;
* optional: every other change that started before ``p`` (completed but
  not flushed, still in flight, or failed): any part of it may be there.

A state applies the required changes and a chosen subset of the optional
ones, in the order they completed (those still in flight last, in the
order they started): completion order is an order the disk may have
applied them in, since a request that started after another completed
comes after it.

Tearing: an optional change may land in part. The spec promises no
atomicity at all; we take the unit to be ``atomic`` bytes, aligned: each
such block of a change lands whole or not at all. The default is 4096, the
physical block our devices advertise (``physical_block_exp`` 3), which is
what file systems rely on for their own in-place writes (ext4's 1 KiB
superblock, written in place, is unreadable if torn in half) and what the
storage beneath gives (page-cache pages, RBD objects). ``atomic=512`` is
the stricter sector-level model. A discard's range has no defined
content: it is optional always, and applied as zeroes when chosen.

``trust_fua=False`` / ``trust_flush=False`` build the states of a back-end
that ignored write-through or flushes: negative controls, showing that a
check catches lost data.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from .recordlog import OK, Entry, Kind, RecordLog

SECTOR = 512
#: Default unit of atomicity (bytes, aligned): the devices' physical block.
ATOMIC = 4096
#: Changes of up to this many units are torn unit by unit; longer ones in
#: up to TEAR_RUNS runs (a random subset of 100k units is no more telling,
#: and slow).
TEAR_UNITS = 64
TEAR_RUNS = 8
_ZERO_CHUNK = bytes(1 << 20)


@dataclass(slots=True)
class Op:
    """One logged call: where it started and ended in the log."""
    entry: Entry            # its start record
    start: int              # index of the start record
    done: int | None = None  # index of its DONE record
    ok: bool = False

    @property
    def kind(self) -> Kind:
        return self.entry.kind


@dataclass
class Piece:
    """Part of a change applied to a state: byte ``ranges`` (start, length)
    relative to the change's offset, or None for all of it."""
    op: Op
    ranges: list[tuple[int, int]] | None = None


@dataclass
class CrashState:
    point: int
    variant: str
    pieces: list[Piece] = field(default_factory=list)
    required: int = 0           # how many changes had to be there
    optional: int = 0           # how many might have been
    chosen: int = 0             # optional ones applied (maybe torn)

    def describe(self) -> str:
        return (f"point {self.point} ({self.variant}): {self.required} required, "
                f"{self.chosen} of {self.optional} optional applied")


class CrashModel:
    """The ops of a :class:`RecordLog` and the crash states at its points."""

    def __init__(self, log: RecordLog, *, atomic: int = ATOMIC, trust_fua: bool = True,
                 trust_flush: bool = True):
        if atomic < SECTOR or atomic % SECTOR:
            raise ValueError(f"atomic must be a multiple of {SECTOR}, not {atomic}")
        self.log = log
        self.atomic = atomic
        self.trust_fua = trust_fua
        self.trust_flush = trust_flush
        self.ops: list[Op] = []
        by_id: dict[int, Op] = {}
        for i, entry in enumerate(log.entries):
            if entry.kind == Kind.DONE:
                op = by_id.get(entry.id)
                if op is None or op.done is not None:
                    raise ValueError(f"{log.path}: DONE record {i} for unknown op {entry.id}")
                op.done, op.ok = i, entry.status == OK
            else:
                op = Op(entry, i)
                by_id[entry.id] = op
                self.ops.append(op)

    @property
    def points(self) -> int:
        """Crash points are 0..points (0: before anything was logged)."""
        return len(self.log.entries)

    def interesting_points(self) -> list[int]:
        """Points where what may be there changes: right after each
        completion, right after each change started (it may be there in
        part), right before each flush starts; plus the end."""
        entries = self.log.entries
        found = {len(entries)}
        for i, entry in enumerate(entries):
            if entry.kind == Kind.FLUSH:
                found.add(i)
            else:
                found.add(i + 1)
        return sorted(found)

    def choose_points(self, count: int) -> list[int]:
        """``count`` points spread evenly over the interesting ones (all of
        them if there are fewer), always including the end."""
        points = self.interesting_points()
        if count >= len(points):
            return points
        if count <= 1:
            return points[-1:]
        step = (len(points) - 1) / max(1, count - 1)
        return sorted({points[round(i * step)] for i in range(count)})

    def classify(self, point: int) -> tuple[list[Op], list[Op]]:
        """(required, optional) changes at ``point``, each in apply order."""
        if not 0 <= point <= self.points:
            raise ValueError(f"crash point {point} not in 0..{self.points}")
        barrier = -1        # start of the last flush that completed OK before point
        if self.trust_flush:
            for op in self.ops:
                if (op.kind == Kind.FLUSH and op.ok and op.done is not None
                        and op.done < point):
                    barrier = max(barrier, op.start)
        required, optional = [], []
        for op in self.ops:
            if op.start >= point or op.kind == Kind.FLUSH:
                continue
            completed = op.ok and op.done is not None and op.done < point
            if op.kind == Kind.DISCARD:
                must = False
            elif op.kind == Kind.FUA and self.trust_fua:
                must = completed
            else:
                must = completed and op.done < barrier
            (required if must else optional).append(op)
        order = self._apply_order(point)
        required.sort(key=order)
        optional.sort(key=order)
        return required, optional

    @staticmethod
    def _apply_order(point: int):
        def key(op: Op):
            if op.done is not None and op.done < point:
                return (0, op.done)
            return (1, op.start)
        return key

    def state(self, point: int, variant: str = "random",
              rng: random.Random | None = None) -> CrashState:
        """One state at ``point``. ``variant``: ``required`` (no optional
        change), ``all`` (every optional change whole) or ``random`` (a
        random subset, each chosen change perhaps torn)."""
        required, optional = self.classify(point)
        st = CrashState(point, variant, required=len(required), optional=len(optional))
        chosen: dict[int, Piece] = {}
        for op in optional:
            if variant == "all":
                chosen[op.start] = Piece(op)
            elif variant == "random":
                if rng is None:
                    raise ValueError("a random state needs rng")
                if rng.random() < 0.5:
                    chosen[op.start] = Piece(op, _tear(op, self.atomic, rng))
            elif variant != "required":
                raise ValueError(f"unknown variant {variant!r}")
        st.chosen = len(chosen)
        order = self._apply_order(point)
        pieces = [Piece(op) for op in required] + list(chosen.values())
        pieces.sort(key=lambda piece: order(piece.op))
        st.pieces = pieces
        return st

    def states(self, point: int, count: int, rng: random.Random) -> list[CrashState]:
        """``required`` and ``all`` first, then random ones, ``count`` in all
        (fewer when nothing is optional: the state is then unique)."""
        required, optional = self.classify(point)
        if not optional:
            return [self.state(point, "required")]
        out = [self.state(point, "required")]
        if count > 1:
            out.append(self.state(point, "all"))
        while len(out) < count:
            out.append(self.state(point, "random", rng))
        return out

    # -- building the image ---------------------------------------------------------
    def apply(self, state: CrashState, base: str, out: str) -> None:
        """Writes ``out``: a copy of ``base`` (the disk when recording began)
        with the state's changes applied."""
        _copy(base, out)
        fd = os.open(out, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for piece in state.pieces:
                self._apply_piece(fd, piece)
        finally:
            os.close(fd)

    def _apply_piece(self, fd: int, piece: Piece) -> None:
        entry = piece.op.entry
        data = self.log.data(entry) if entry.kind.carries_data else None
        for start, length in piece.ranges if piece.ranges is not None else [(0, entry.length)]:
            if data is not None:
                _pwrite_all(fd, data[start:start + length], entry.offset + start)
            else:
                _write_zeroes(fd, entry.offset + start, length)


def _units(offset: int, length: int, atomic: int) -> list[tuple[int, int]]:
    """The change's bytes cut at ``atomic`` boundaries of the disk, as
    (start, length) relative to ``offset``."""
    out, pos, end = [], offset, offset + length
    while pos < end:
        stop = min(end, (pos // atomic + 1) * atomic)
        out.append((pos - offset, stop - pos))
        pos = stop
    return out


def _tear(op: Op, atomic: int, rng: random.Random) -> list[tuple[int, int]] | None:
    """Which parts of an optional change land: all of it half the time,
    else a random subset of its atomic units (None: all)."""
    units = _units(op.entry.offset, op.entry.length, atomic)
    if len(units) <= 1 or rng.random() < 0.5:
        return None
    if len(units) <= TEAR_UNITS:
        return _merge([u for u in units if rng.random() < 0.5])
    cuts = sorted(rng.sample(range(1, len(units)), min(TEAR_RUNS - 1, len(units) - 1)))
    bounds = [0, *cuts, len(units)]
    return _merge([u for a, b in zip(bounds, bounds[1:]) if rng.random() < 0.5
                   for u in units[a:b]])


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def _copy(src: str, dst: str) -> None:
    """A copy of ``src`` (in the kernel; sparse where the file system allows)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done)
                if n == 0:
                    break
                done += n
        except OSError:
            done = 0
        if done < size:
            fin.seek(0)
            fout.seek(0)
            fout.truncate(0)
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
        fout.truncate(size)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_zeroes(fd: int, offset: int, length: int) -> None:
    while length > 0:
        n = min(length, len(_ZERO_CHUNK))
        _pwrite_all(fd, _ZERO_CHUNK[:n], offset)
        offset, length = offset + n, length - n
