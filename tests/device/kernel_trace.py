"""The kernel's own record of when a file's data was written and synced
(ftrace: ext4_da_write_begin, ext4_sync_file_enter/exit), in a trace
instance of our own with the monotonic clock, so tests can compare it with
time.monotonic(). This is the outside view of a back-end's durability: the
kernel saw the data written, then a sync start and end, before the driver
saw the completion."""
from __future__ import annotations

import os
import re
import subprocess
import uuid
from dataclasses import dataclass

TRACEFS = "/sys/kernel/tracing"
EVENTS = ("ext4/ext4_da_write_begin", "ext4/ext4_sync_file_enter", "ext4/ext4_sync_file_exit")
LINE = re.compile(r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+\[\d+\]\s+\S+\s+(?P<ts>\d+\.\d+): "
                  r"(?P<event>ext4_\w+): dev \d+,\d+ ino (?P<ino>\d+)(?P<rest>.*)$")


class TraceUnavailable(RuntimeError):
    pass


@dataclass
class Sync:
    start: float
    end: float


class Ext4Trace:
    """Data writes and syncs of one inode, as the kernel saw them."""

    def __init__(self, inode: int):
        if not os.path.isdir(os.path.join(TRACEFS, "events")):
            subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True)
        if not os.path.isdir(os.path.join(TRACEFS, "events", "ext4")):
            raise TraceUnavailable("no tracefs with ext4 events (root and a kernel with "
                                   "ftrace needed)")
        self.dir = os.path.join(TRACEFS, "instances", f"vhu-{uuid.uuid4().hex[:8]}")
        os.mkdir(self.dir)
        try:
            self._write("trace_clock", "mono")
            self._write("buffer_size_kb", "8192")
            for event in EVENTS:
                self._write(f"events/{event}/filter", f"ino == {inode}")
                self._write(f"events/{event}/enable", "1")
            self._write("tracing_on", "1")
        except BaseException:
            self.close()
            raise
        self.inode = inode

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(value)

    def lines(self) -> list[str]:
        with open(os.path.join(self.dir, "trace")) as f:
            return [line for line in f if not line.startswith("#")]

    def read(self) -> tuple[list[tuple[float, int, int]], list[Sync]]:
        """(writes as (time, pos, len), syncs), oldest first."""
        writes, syncs, open_syncs = [], [], {}
        for line in self.lines():
            m = LINE.match(line)
            if not m or int(m["ino"]) != self.inode:
                continue
            ts, pid, event = float(m["ts"]), int(m["pid"]), m["event"]
            if event == "ext4_da_write_begin":
                pos, length = re.search(r"pos (\d+) len (\d+)", m["rest"]).groups()
                writes.append((ts, int(pos), int(length)))
            elif event == "ext4_sync_file_enter":
                open_syncs[pid] = ts
            elif event == "ext4_sync_file_exit" and pid in open_syncs:
                if " ret 0" in m["rest"]:
                    syncs.append(Sync(open_syncs.pop(pid), ts))
                else:
                    open_syncs.pop(pid)
        return writes, syncs

    def close(self) -> None:
        try:
            self._write("tracing_on", "0")
        except OSError:
            pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


def unsynced(writes, syncs, completions: dict[int, float], size: int) -> list[int]:
    """Offsets whose completion (seen by the driver at completions[offset])
    was not preceded by a sync that started after their data was written
    and ended before that moment."""
    bad = []
    for offset, seen in completions.items():
        written = [ts for ts, pos, length in writes
                   if pos < offset + size and offset < pos + length and ts <= seen]
        if not written:
            bad.append(offset)
            continue
        last = max(written)
        if not any(s.start >= last and s.end <= seen for s in syncs):
            bad.append(offset)
    return bad
