"""The crash-consistency recorder and the replay of its log: what is logged
and in which order, logs cut short or damaged, which changes the contract
requires at each crash point, the images rebuilt (sector-atomic tearing
only), and the replay command line."""
import asyncio
import os
import random
import subprocess
import sys

import pytest

from vhostuser.blk import BlockBackend
from vhostuser.blk.crash import SECTOR, CrashModel
from vhostuser.blk.record import RecordingBackend
from vhostuser.blk.recordlog import FAILED, OK, HEADER, Kind, LogWriter, RecordLog, \
    RecordLogError

DISK = 64 * SECTOR


class RamDisk(BlockBackend):
    def __init__(self, size=DISK):
        self.data = bytearray(size)
        self.calls = []

    def size(self):
        return len(self.data)

    def read(self, offset, bufs):
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)

    def write(self, offset, bufs):
        if offset >= len(self.data):
            raise OSError("beyond the end")
        for b in bufs:
            self.data[offset:offset + len(b)] = b
            offset += len(b)
        self.calls.append("write")

    def flush(self):
        self.calls.append("flush")


class AsyncRamDisk(RamDisk):
    async def write(self, offset, bufs):
        await asyncio.sleep(0)
        super().write(offset, bufs)


def kinds(path):
    with RecordLog(path) as log:
        return [(e.kind, e.id, e.status) for e in log.entries]


def test_every_change_is_logged_at_start_and_done(tmp_path):
    path = str(tmp_path / "r.log")
    disk = RamDisk()
    rec = RecordingBackend(disk, path)
    rec.write(0, [memoryview(b"a" * 512), memoryview(b"b" * 512)])
    rec.write_fua(1024, [memoryview(b"c" * 512)])       # default: write, then flush
    rec.write_zeroes(0, 512, False)
    with pytest.raises(OSError):
        rec.write(DISK, [memoryview(b"x" * 512)])
    rec.flush()
    rec.close()
    assert disk.calls == ["write", "write", "flush", "write", "flush"]
    assert kinds(path) == [
        (Kind.WRITE, 1, 0), (Kind.DONE, 1, OK), (Kind.FUA, 2, 0), (Kind.DONE, 2, OK),
        (Kind.ZEROES, 3, 0), (Kind.DONE, 3, OK), (Kind.WRITE, 4, 0), (Kind.DONE, 4, FAILED),
        (Kind.FLUSH, 5, 0), (Kind.DONE, 5, OK)]
    with RecordLog(path) as log:
        assert log.disk_size == DISK and not log.truncated
        assert log.data(log.entries[0]) == b"a" * 512 + b"b" * 512
        assert log.data(log.entries[2]) == b"c" * 512
        assert (log.entries[4].offset, log.entries[4].length) == (0, 512)


def test_an_async_call_is_done_only_when_awaited(tmp_path):
    path = str(tmp_path / "r.log")
    rec = RecordingBackend(AsyncRamDisk(), path)

    async def run():
        first = rec.write(0, [memoryview(b"a" * 512)])
        second = rec.write_fua(512, [memoryview(b"b" * 512)])
        assert [k for k, _, _ in kinds(path)] == [Kind.WRITE, Kind.FUA]
        await second
        await first
    asyncio.run(run())
    assert kinds(path)[2:] == [(Kind.DONE, 2, OK), (Kind.DONE, 1, OK)]


def test_recorded_backend_by_name_with_its_options(tmp_path):
    rec = RecordingBackend("examples.sparse_dict:SparseDictDisk", str(tmp_path / "r.log"),
                           size=str(DISK))
    assert rec.size() == DISK and rec.supports("discard")
    rec.discard(0, 4096)
    assert kinds(str(tmp_path / "r.log")) == [(Kind.DISCARD, 1, 0), (Kind.DONE, 1, OK)]
    from vhostuser.blk import BackendError
    with pytest.raises(BackendError):
        RecordingBackend("examples.sparse_dict", str(tmp_path / "x.log"))


def test_a_log_cut_short_keeps_its_whole_records(tmp_path):
    path = str(tmp_path / "r.log")
    log = LogWriter(path, DISK)
    op = log.start(Kind.WRITE, 0, 1024, b"z" * 1024)
    log.done(op, True)
    log.start(Kind.WRITE, 1024, 1024, b"y" * 1024)
    log.close()
    size = os.path.getsize(path)
    for cut in (size - 1, size - 1024, size - 1030):
        os.truncate(path, cut)
        with RecordLog(path) as back:
            assert back.truncated
            assert [e.kind for e in back.entries] == [Kind.WRITE, Kind.DONE]


def test_damage_inside_the_log_is_an_error(tmp_path):
    path = str(tmp_path / "r.log")
    log = LogWriter(path, DISK)
    log.done(log.start(Kind.WRITE, 0, 512, b"q" * 512), True)
    log.done(log.start(Kind.FLUSH), True)
    log.close()
    with open(path, "r+b") as f:
        f.seek(HEADER.size + 32 + 100)
        f.write(b"!")
    with pytest.raises(RecordLogError, match="checksum"):
        RecordLog(path)
    with open(path, "r+b") as f:
        f.write(b"NOTALOG!")
    with pytest.raises(RecordLogError, match="not a vhostuser"):
        RecordLog(path)


# -- the crash model -----------------------------------------------------------------------

def sector_data(tag, n=1):
    return bytes([tag]) * (SECTOR * n)


def build(tmp_path, script):
    """Writes a log from a script of ("start", name, kind, sector, nsectors) /
    ("done", name[, ok]); returns (path, {name: start index})."""
    path = str(tmp_path / "m.log")
    log = LogWriter(path, DISK)
    ids, index = {}, {}
    for n, step in enumerate(script):
        if step[0] == "start":
            _, name, kind, sector, count = step
            data = sector_data(ord(name[0]), count) if kind.carries_data else None
            ids[name] = log.start(kind, sector * SECTOR, count * SECTOR, data)
            index[name] = n
        else:
            log.done(ids[step[1]], step[2] if len(step) > 2 else True)
    log.close()
    return path, index


SCRIPT = [
    ("start", "A", Kind.WRITE, 0, 2), ("done", "A"),      # before the flush: required after it
    ("start", "F", Kind.FLUSH, 0, 0),
    ("start", "B", Kind.WRITE, 2, 1), ("done", "B"),      # completed after the flush started
    ("done", "F"),
    ("start", "C", Kind.FUA, 3, 1), ("done", "C"),        # write-through: required once done
    ("start", "D", Kind.WRITE, 4, 1), ("done", "D", False),  # failed: may be partly there
    ("start", "E", Kind.DISCARD, 5, 1), ("done", "E"),    # no defined content: never required
    ("start", "G", Kind.WRITE, 6, 3),                     # still in flight at the end
]


def names(ops, index):
    by_start = {v: k for k, v in index.items()}
    return [by_start[op.start] for op in ops]


def test_required_and_optional_changes_at_each_point(tmp_path):
    path, index = build(tmp_path, SCRIPT)
    with RecordLog(path) as log:
        model = CrashModel(log)
        end = model.points
        assert names(model.classify(end)[0], index) == ["A", "C"]
        assert names(model.classify(end)[1], index) == ["B", "D", "E", "G"]
        # before the flush completed, nothing written is required
        before_f_done = index["B"] + 2
        assert names(model.classify(before_f_done)[0], index) == []
        assert names(model.classify(before_f_done)[1], index) == ["A", "B"]
        # the FUA write: optional while in flight, required once done
        assert "C" in names(model.classify(index["C"] + 1)[1], index)
        assert "C" in names(model.classify(index["C"] + 2)[0], index)
        assert names(model.classify(0)[0] + model.classify(0)[1], index) == []
        with pytest.raises(ValueError):
            model.classify(end + 1)
        # negative controls
        assert names(CrashModel(log, trust_flush=False).classify(end)[0], index) == ["C"]
        assert names(CrashModel(log, trust_fua=False).classify(end)[0], index) == ["A"]


def read_sectors(path):
    data = open(path, "rb").read()
    return [data[i:i + SECTOR] for i in range(0, len(data), SECTOR)]


def test_rebuilt_images_hold_what_is_required_and_tear_only_at_sectors(tmp_path):
    """With 512-byte atomicity (the strict model)."""
    path, _ = build(tmp_path, SCRIPT)
    base = tmp_path / "base.img"
    base.write_bytes(b"\x01" * DISK)
    out = str(tmp_path / "state.img")
    old = sector_data(1)
    with RecordLog(path) as log:
        model = CrashModel(log, atomic=SECTOR)
        model.apply(model.state(model.points, "required"), str(base), out)
        s = read_sectors(out)
        assert s[0] == s[1] == sector_data(ord("A")) and s[3] == sector_data(ord("C"))
        assert s[2] == s[4] == s[5] == s[6] == old
        model.apply(model.state(model.points, "all"), str(base), out)
        s = read_sectors(out)
        assert s[2] == sector_data(ord("B")) and s[4] == sector_data(ord("D"))
        assert s[5] == bytes(SECTOR) and s[6:9] == [sector_data(ord("G"))] * 3
        rng = random.Random(7)
        seen = set()
        for _ in range(200):
            model.apply(model.state(model.points, "random", rng), str(base), out)
            s = read_sectors(out)
            assert s[0] == s[1] == sector_data(ord("A")) and s[3] == sector_data(ord("C"))
            for i, name in ((2, "B"), (4, "D"), (6, "G"), (7, "G"), (8, "G")):
                assert s[i] in (old, sector_data(ord(name))), i
            assert s[5] in (old, bytes(SECTOR))
            seen.add(tuple(s[i] == old for i in (6, 7, 8)))
        assert len(seen) == 8            # G torn every way over its three sectors
        assert len(model.states(model.points, 5, rng)) == 5
        assert [st.variant for st in model.states(0, 5, rng)] == ["required"]   # nothing optional


def test_tearing_keeps_aligned_physical_blocks_whole(tmp_path):
    """The default unit is 4 KiB, aligned on the disk: a 10-sector write at
    sector 4 is torn into sectors 4-7, 8-15 and 16-17 at most."""
    path, _ = build(tmp_path, [("start", "T", Kind.WRITE, 4, 14)])
    base = tmp_path / "base.img"
    base.write_bytes(b"\x01" * DISK)
    out = str(tmp_path / "t.img")
    units = [range(4, 8), range(8, 16), range(16, 18)]
    seen = set()
    with RecordLog(path) as log:
        model = CrashModel(log)
        assert model.atomic == 4096
        rng = random.Random(3)
        for _ in range(400):
            model.apply(model.state(model.points, "random", rng), str(base), out)
            s = read_sectors(out)
            landed = []
            for unit in units:
                kinds = {s[i] == sector_data(ord("T")) for i in unit}
                assert len(kinds) == 1, "a 4 KiB block was torn"
                landed.append(kinds.pop())
            assert all(s[i] == sector_data(1) for i in (*range(4), *range(18, 64)))
            seen.add(tuple(landed))
        assert len(seen) == 8
        with pytest.raises(ValueError):
            CrashModel(log, atomic=1000)


def test_overlapping_writes_apply_in_completion_order(tmp_path):
    path, index = build(tmp_path, [
        ("start", "X", Kind.WRITE, 0, 2), ("start", "Y", Kind.WRITE, 1, 2),
        ("done", "Y"), ("done", "X"),                 # X finished last: its sector 1 wins
        ("start", "F", Kind.FLUSH, 0, 0), ("done", "F"),
        ("start", "Z", Kind.FUA, 0, 1), ("done", "Z"),
    ])
    base = tmp_path / "base.img"
    base.write_bytes(bytes(DISK))
    out = str(tmp_path / "s.img")
    with RecordLog(path) as log:
        model = CrashModel(log)
        model.apply(model.state(model.points, "required"), str(base), out)
        s = read_sectors(out)
        assert s[0] == sector_data(ord("Z")) and s[1] == sector_data(ord("X"))
        assert s[2] == sector_data(ord("Y"))


def test_interesting_points_and_spread(tmp_path):
    path, index = build(tmp_path, SCRIPT)
    with RecordLog(path) as log:
        model = CrashModel(log)
        points = model.interesting_points()
        assert index["F"] in points and model.points in points
        # after every record but a flush's start: a flush changes nothing until done
        assert points == sorted({index["F"]} | {i + 1 for i, e in enumerate(log.entries)
                                                if e.kind != Kind.FLUSH})
        chosen = model.choose_points(3)
        assert len(chosen) == 3 and chosen[-1] == model.points
        assert model.choose_points(1000) == points


# -- the command line ------------------------------------------------------------------

def replay(*args):
    return subprocess.run([sys.executable, "-m", "vhostuser.blk.replay", *args],
                          capture_output=True, text=True)


def test_replay_command_line(tmp_path):
    path, index = build(tmp_path, SCRIPT)
    base = tmp_path / "base.img"
    base.write_bytes(b"\x01" * DISK)
    info = replay(path, "--base", str(base), "--info")
    assert info.returncode == 0, info.stderr
    assert "1 DISCARD, 1 FLUSH, 1 FUA, 4 WRITE" in info.stdout
    assert "1 failed, 1 never finished" in info.stdout
    out = tmp_path / "end.img"
    done = replay(path, "--base", str(base), "--out", str(out), "--variant", "all")
    assert done.returncode == 0 and read_sectors(str(out))[2] == sector_data(ord("B"))
    # A check that needs A's sectors: it fails before the flush completed, never after.
    check = (f"{sys.executable} -c \"import sys; d = open(sys.argv[1], 'rb').read(512); "
             f"sys.exit(d != bytes([{ord('A')}]) * 512)\" {{}}")
    res = replay(path, "--base", str(base), "--check", check, "--points", "100",
                 "--keep-failed", str(tmp_path / "failed"))
    assert res.returncode == 1
    failed_points = {int(line.split()[2]) for line in res.stdout.splitlines()
                     if line.startswith("FAIL")}
    assert failed_points and max(failed_points) <= index["B"] + 2
    assert os.listdir(tmp_path / "failed")
    ok = replay(path, "--base", str(base), "--check", check, "--points", "1")
    assert ok.returncode == 0 and "0 failed" in ok.stdout      # the end only
    bad = replay(str(base), "--base", str(base), "--info")
    assert bad.returncode == 1 and "not a vhostuser block record log" in bad.stderr
