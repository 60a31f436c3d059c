"""The NBD back-end keeps the virtio write-cache contract against real
servers, seen from both ends: the recorder's log (what the device asked
of the back-end) and what the server received (nbdkit's log filter, and
qemu-nbd's own trace of each request's flags).

In write-back mode writes go as plain NBD writes and the guest's flushes
as NBD flushes; in write-through mode every write carries FUA when the
server offers it, and is otherwise followed by a flush that completes
before the guest hears of the write.

Needs Debian's libnbd0, qemu-utils and nbdkit; skipped without them unless
VHOSTUSER_REQUIRE_NBD=1 makes that a failure.
"""
import os
import re
import shutil
import tempfile
import time

import pytest

from vhostuser.blk import BlkDevice
from vhostuser.blk.libnbd import ffi
from vhostuser.blk.nbd import NbdBackend
from vhostuser.blk.record import RecordingBackend
from vhostuser.blk.recordlog import Kind, RecordLog
from vhostuser.frontend import BlkRequest, BlkStatus
from vhostuser_devkit.nbd import NbdServer, require_tools
from vhostuser_devkit.patterns import pattern
from vhostuser.testing.server import served_disk

MIB = 1 << 20
DISK = 16 * MIB
SLOW_FLUSH = 0.3            # seconds the no-FUA server's flush takes


@pytest.fixture(scope="module", autouse=True)
def nbd_tools():
    require_tools()


@pytest.fixture
def where(tmp_path):
    """Paths: short ones for sockets (107 bytes at most), files in tmp_path."""
    sockets = tempfile.mkdtemp(prefix="vhu-nbdwc-")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK)
    yield {"server": os.path.join(sockets, "srv.sock"), "dev": os.path.join(sockets, "dev.sock"),
           "image": str(image), "log": str(tmp_path / "server.log"),
           "rlog": str(tmp_path / "disk.rlog")}
    shutil.rmtree(sockets, ignore_errors=True)


# nbdkit's log filter: "connection=1 Write id=2 offset=0x1000 count=0x1000 fua=1 ..."
# when a command arrives, "connection=1 ...Write id=2 return=0" when it is answered.
_CALL = re.compile(r" connection=\d+ (\w+) id=(\d+)(.*) \.\.\.$")
_RETURN = re.compile(r" connection=\d+ \.\.\.(\w+) id=(\d+) return=(\S+)")


def nbdkit_events(log_path):
    """[(event, command, fields)] in the order the server logged them."""
    events = []
    with open(log_path) as f:
        for line in f:
            if m := _CALL.search(line):
                fields = dict(kv.split("=", 1) for kv in m.group(3).split())
                events.append(("call", m.group(1), {"id": m.group(2), **fields}))
            elif m := _RETURN.search(line):
                events.append(("return", m.group(1), {"id": m.group(2), "return": m.group(3)}))
    return events


def data_commands(events):
    """Writes and zeroes as (command, offset, fua), and flushes, in arrival order."""
    out = []
    for event, name, f in events:
        if event == "call" and name in ("Write", "Zero"):
            out.append((name, int(f["offset"], 16), int(f["fua"])))
        elif event == "call" and name == "Flush":
            out.append(("Flush",))
    return out


def recorded(rlog):
    with RecordLog(rlog) as log:
        done = {e.id for e in log.entries if e.kind == Kind.DONE and e.status == 0}
        return [(e.kind, e.offset) for e in log.entries
                if e.kind not in (Kind.DONE,) and e.id in done]


def test_nbdkit_write_through_writes_carry_fua(where):
    srv = NbdServer.nbdkit(["file", where["image"], f"logfile={where['log']}"],
                           unix=where["server"], filters=("log",)).start()
    try:
        backend = NbdBackend(srv.uri)
        assert backend.caps.fua and backend.caps.flush
        device = BlkDevice(RecordingBackend(backend, where["rlog"]))
        with served_disk(device, where["dev"]) as (_, blk):
            blk.write(0, pattern(0, 4096))              # write-back: no FUA, no flush
            blk.set_writeback(False)
            for i in range(1, 5):
                blk.write(8 * i, pattern(i, 4096))
                # answered: the server has answered this write, and it carried FUA
                events = nbdkit_events(where["log"])
                assert data_commands(events)[-1] == ("Write", 4096 * i, 1)
                assert events[-1][:2] == ("return", "Write") and events[-1][2]["return"] == "0"
            blk.write_zeroes([(64, 8)])                 # zeroes, then a flush
            assert data_commands(nbdkit_events(where["log"]))[-2:] == [
                ("Zero", 64 * 512, 0), ("Flush",)]
            blk.set_writeback(True)
            blk.write(80, pattern(9, 4096))
            blk.flush()
        commands = data_commands(nbdkit_events(where["log"]))
    finally:
        srv.kill()
    assert commands == ([("Write", 0, 0)] + [("Write", 4096 * i, 1) for i in range(1, 5)]
                        + [("Zero", 64 * 512, 0), ("Flush",), ("Write", 80 * 512, 0),
                           ("Flush",), ("Flush",)])        # the last: flush before close
    assert recorded(where["rlog"]) == (
        [(Kind.WRITE, 0)] + [(Kind.FUA, 4096 * i) for i in range(1, 5)]
        + [(Kind.ZEROES, 64 * 512), (Kind.FLUSH, 0), (Kind.WRITE, 80 * 512), (Kind.FLUSH, 0),
           (Kind.FLUSH, 0)])
    with open(where["image"], "rb") as f:
        assert f.read(5 * 4096) == b"".join(pattern(i, 4096) for i in range(5))


def test_qemu_nbd_receives_fua_on_write_through_writes(where):
    trace = ("--trace", "nbd_receive_request")
    srv = NbdServer.qemu_nbd(where["image"], unix=where["server"], log_path=where["log"],
                             extra_args=trace).start()
    try:
        backend = NbdBackend(srv.uri)
        assert backend.caps.fua
        device = BlkDevice(RecordingBackend(backend, where["rlog"]))
        with served_disk(device, where["dev"]) as (_, blk):
            blk.write(0, pattern(0, 4096))
            blk.set_writeback(False)
            for i in range(1, 4):
                blk.write(8 * i, pattern(i, 4096))
                assert qemu_requests(where["log"])[-1] == (1, 4096 * i, 1)   # type, from, FUA
            blk.set_writeback(True)
            blk.write(40, pattern(5, 4096))
        requests = qemu_requests(where["log"])
    finally:
        srv.kill()
    writes = [(offset, flags) for kind, offset, flags in requests if kind == 1]
    assert writes == [(0, 0), (4096, 1), (8192, 1), (12288, 1), (40 * 512, 0)]
    assert [k for k, _ in recorded(where["rlog"])] == [Kind.WRITE, Kind.FUA, Kind.FUA, Kind.FUA,
                                                       Kind.WRITE, Kind.FLUSH]


# qemu-nbd --trace nbd_receive_request:
# "Got request: { magic = 0x25609513, .flags = 0x1, .type = 0x1, from = 4096, len = 4096 }"
_QEMU_REQUEST = re.compile(r"nbd_receive_request .*\.flags = 0x([0-9a-f]+), \.type = "
                           r"0x([0-9a-f]+), from = (\d+)")


def qemu_requests(log_path):
    """[(type, offset, FUA flag)] of the requests qemu-nbd received."""
    with open(log_path) as f:
        return [(int(m.group(2), 16), int(m.group(3)), int(m.group(1), 16) & 1)
                for m in map(_QEMU_REQUEST.search, f) if m]


def test_server_without_fua_gets_a_flush_the_guest_waits_for(where):
    """nbdkit's eval plugin: a raw file behind shell commands, FUA not
    offered, and a flush that takes SLOW_FLUSH seconds. A write-through
    write completes only after that flush: no sooner than SLOW_FLUSH."""
    image = where["image"]
    plugin = ["eval", f"get_size=echo {DISK}",
              f"pread=dd if={image} iflag=skip_bytes,count_bytes skip=$4 count=$3 bs=64k "
              "status=none",
              f"pwrite=dd of={image} oflag=seek_bytes seek=$4 conv=notrunc bs=64k "
              "iflag=fullblock status=none",
              "can_write=exit 0", "can_flush=exit 0", "can_fua=echo none",
              f"flush=sleep {SLOW_FLUSH}; sync {image}", f"logfile={where['log']}"]
    srv = NbdServer.nbdkit(plugin, unix=where["server"], filters=("log",)).start()
    try:
        backend = NbdBackend(srv.uri)
        assert backend.caps.flush and not backend.caps.fua
        device = BlkDevice(RecordingBackend(backend, where["rlog"]))
        with served_disk(device, where["dev"]) as (_, blk):
            blk.write(0, pattern(0, 4096))
            assert data_commands(nbdkit_events(where["log"])) == [("Write", 0, 0)]
            blk.set_writeback(False)
            for i in range(1, 3):
                t0 = time.monotonic()
                blk.write(8 * i, pattern(i, 4096))
                assert time.monotonic() - t0 >= SLOW_FLUSH
                events = nbdkit_events(where["log"])
                assert data_commands(events)[-2:] == [("Write", 4096 * i, 0), ("Flush",)]
                # the write was answered before the flush was sent
                assert [e[:2] for e in events[-4:]] == [("call", "Write"), ("return", "Write"),
                                                        ("call", "Flush"), ("return", "Flush")]
            assert blk.read(8, 4096) == pattern(1, 4096)
    finally:
        srv.kill()
    assert [k for k, _ in recorded(where["rlog"])] == [Kind.WRITE, Kind.FUA, Kind.FUA,
                                                       Kind.FLUSH]


def test_guest_flush_after_losing_unflushed_writes_is_an_io_error_once(where):
    """The server (no multi-conn) restarts between the guest's write-back
    write and its flush: a flush on the new connection doesn't cover that
    write, so the guest's flush fails, once; the data is still read back."""
    srv = NbdServer.nbdkit(["file", where["image"], "multi-conn-mode=disable"],
                           unix=where["server"], filters=("multi-conn",)).start()
    try:
        backend = NbdBackend(srv.uri, timeout=10)
        assert not backend.caps.multi_conn
        with served_disk(BlkDevice(backend), where["dev"]) as (_, blk):
            blk.write(0, pattern(1, 4096))                 # acknowledged, not flushed
            conn = backend._conns[0]
            srv.kill()
            deadline = time.monotonic() + 5
            while conn.h != ffi.NULL:                       # the loss is seen
                assert time.monotonic() < deadline
                time.sleep(0.01)
            srv.start()
            [first] = blk.execute([BlkRequest.flush()], timeout=30)
            assert first.status == BlkStatus.IOERR
            [second] = blk.execute([BlkRequest.flush()], timeout=30)
            assert second.ok
            assert blk.read(0, 4096) == pattern(1, 4096)
    finally:
        srv.kill()
