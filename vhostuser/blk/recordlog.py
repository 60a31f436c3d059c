"""The crash-consistency recorder's log file: writing it and reading it back.

The log holds what a back-end was asked to change, in the order the calls
started and finished, with the data written, so that any disk state a
power cut could leave behind can be rebuilt from the disk's first state
(``vhostuser.blk.crash``).

Layout (little-endian)::

    header   8 bytes  b"VHUBLKR1"
             8 bytes  disk size in bytes
    record  32 bytes  kind u8, status u8, 2 reserved, crc32 of the data u32,
                      id u64, offset u64, length u64
            length bytes of data, for WRITE and FUA records only

A call appends a start record (WRITE, FUA, ZEROES, DISCARD or FLUSH) with a
new id before the back-end runs it, and a DONE record with that id (status
0 ok, 1 failed) once it returned. Offsets and lengths are in bytes. Each
record goes to the file in one write(2), so a recorder killed at any moment
leaves whole records and perhaps one cut short at the end, which the reader
drops (``RecordLog.truncated``).
"""
from __future__ import annotations

import enum
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from ..errors import VhostUserError

MAGIC = b"VHUBLKR1"
HEADER = struct.Struct("<8sQ")
RECORD = struct.Struct("<BBHIQQQ")
OK, FAILED = 0, 1


class Kind(enum.IntEnum):
    WRITE = 1       # write(): may stay in a cache until a flush
    FUA = 2         # write_fua(): stable when done
    ZEROES = 3      # write_zeroes()
    DISCARD = 4     # discard()
    FLUSH = 5       # flush()
    DONE = 6        # the call with this id returned

    @property
    def carries_data(self) -> bool:
        return self in (Kind.WRITE, Kind.FUA)


class RecordLogError(VhostUserError, ValueError):
    """Not a recorder log, or a damaged one (not just cut short at the end)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One record. ``data_pos`` is where its data starts in the file (-1: none)."""
    kind: Kind
    status: int
    id: int
    offset: int
    length: int
    data_pos: int = -1


class LogWriter:
    """Appends records; safe to call from several threads at once."""

    def __init__(self, path: str, disk_size: int):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                           | os.O_CLOEXEC, 0o644)
        os.write(self._fd, HEADER.pack(MAGIC, disk_size))
        self._lock = threading.Lock()
        self._next_id = 1

    def start(self, kind: Kind, offset: int = 0, length: int = 0,
              data: bytes | None = None) -> int:
        """Records a call about to run; returns its id for :meth:`done`."""
        if kind.carries_data and (data is None or len(data) != length):
            raise ValueError(f"{kind.name} needs its {length} bytes of data")
        crc = zlib.crc32(data) if data else 0
        with self._lock:
            op_id = self._next_id
            self._next_id += 1
            head = RECORD.pack(kind, 0, 0, crc, op_id, offset, length)
            self._append([head, data] if data else [head])
        return op_id

    def done(self, op_id: int, ok: bool) -> None:
        with self._lock:
            self._append([RECORD.pack(Kind.DONE, OK if ok else FAILED, 0, 0, op_id, 0, 0)])

    def _append(self, parts: list[bytes]) -> None:
        if self._fd < 0:
            raise ValueError(f"{self.path}: log closed")
        total = sum(len(p) for p in parts)
        written = os.writev(self._fd, parts)
        if written != total:        # a full disk: a record cut short is a lie
            raise OSError(f"{self.path}: short write to the log ({written} of {total})")

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class RecordLog:
    """A log read back: ``entries`` in file order; data stays in the file
    and is read on demand with :meth:`data`."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.disk_size, self.entries, self.truncated = self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse(self) -> tuple[int, list[Entry], bool]:
        end = os.fstat(self._fd).st_size
        head = os.pread(self._fd, HEADER.size, 0)
        if len(head) < HEADER.size or head[:8] != MAGIC:
            raise RecordLogError(f"{self.path}: not a vhostuser block record log")
        _, disk_size = HEADER.unpack(head)
        entries: list[Entry] = []
        pos = HEADER.size
        with open(self.path, "rb") as f:
            f.seek(pos)
            while pos < end:
                raw = f.read(RECORD.size)
                if len(raw) < RECORD.size:
                    return disk_size, entries, True
                kind, status, _, crc, op_id, offset, length = RECORD.unpack(raw)
                try:
                    kind = Kind(kind)
                except ValueError:
                    raise RecordLogError(f"{self.path}: unknown record kind {kind} at byte "
                                         f"{pos}") from None
                data_pos = -1
                pos += RECORD.size
                if kind.carries_data:
                    if pos + length > end:
                        return disk_size, entries, True
                    data = f.read(length)
                    if zlib.crc32(data) != crc:
                        if pos + length == end:     # the last record, cut mid-write
                            return disk_size, entries, True
                        raise RecordLogError(f"{self.path}: data of record {op_id} at byte "
                                             f"{pos} doesn't match its checksum")
                    data_pos = pos
                    pos += length
                entries.append(Entry(kind, status, op_id, offset, length, data_pos))
        return disk_size, entries, False

    def data(self, entry: Entry) -> bytes:
        """The bytes a WRITE or FUA record carries."""
        if entry.data_pos < 0:
            raise ValueError(f"a {entry.kind.name} record carries no data")
        return os.pread(self._fd, entry.length, entry.data_pos)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RecordLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
