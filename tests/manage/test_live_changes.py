"""Changes to exports while a front-end is connected and doing I/O: stats,
resize (the guest is told), read-only, removing another export, stop/start."""
import os
import threading
import time

import pytest

from vhostuser.frontend import BackendClosed, BlkError, BlkRequest, BlkStatus
from vhostuser_devkit.patterns import pattern

from .conftest import MIB, answer_config_change, blk_frontend


@pytest.fixture
def disks(daemon, image):
    """d0: a RAM disk added with vhostuser-ctl; d1: a file added with the
    Python client; n0: a network interface (null back-end) via vhostuser-ctl."""
    daemon.ctl("add-blk", "d0", "--socket-path", "d0.sock", "--ramdisk", "16M", "--queues", "2")
    with daemon.client() as c:
        c.add_blk("d1", daemon.path("d1.sock"), blk_file=image)
    daemon.ctl("add-net", "n0", "--socket-path", "n0.sock", "--backend", "null", "--queues", "2")
    return daemon


def test_added_exports_are_listed_and_described(disks):
    listed = disks.ctl_json("--json", "list")
    assert [(e["name"], e["type"], e["state"]) for e in listed] == [
        ("d0", "blk", "running"), ("d1", "blk", "running"), ("n0", "net", "running")]
    table = disks.ctl("list").stdout.splitlines()
    assert table[0].split() == ["NAME", "TYPE", "STATE", "CONNECTED", "SOCKET"]
    assert table[2].split()[:4] == ["d1", "blk", "running", "no"]
    d1 = disks.call("describe", name="d1")
    assert d1["device"]["size"] == 8 * MIB and d1["device"]["backend"] == "file"
    assert d1["socket_path"] == disks.path("d1.sock") and os.path.exists(d1["socket_path"])
    assert d1["features"]["negotiated"] is None and d1["queues"] == []
    n0 = disks.call("describe", name="n0")
    assert n0["device"]["queues"] == 2
    assert "MQ" in n0["features"]["offered"]["names"]
    assert "MAC" in n0["features"]["offered"]["names"]
    assert n0["device"]["in_order"] is True and "IN_ORDER" in n0["features"]["offered"]["names"]
    disks.ctl("add-net", "n1", "--socket-path", "n1.sock", "--backend", "null", "--no-in-order")
    n1 = disks.call("describe", name="n1")
    assert n1["spec"]["in_order"] is False and n1["device"]["in_order"] is False
    assert "IN_ORDER" not in n1["features"]["offered"]["names"]


def test_io_is_counted_and_queue_state_is_shown(disks):
    with blk_frontend(disks.path("d0.sock"), queues=2) as blk:
        writes = [BlkRequest.write(i * 8, pattern(i, 4096)) for i in range(10)]
        assert all(r.ok for r in blk.execute(writes))
        reads = blk.execute([BlkRequest.read(i * 8, 4096) for i in range(10)], queue=1)
        assert [r.data for r in reads] == [pattern(i, 4096) for i in range(10)]

        stats = disks.ctl_json("stats", "d0")
        assert stats["connected"] is True
        assert stats["totals"]["writes"] == 10 and stats["totals"]["reads"] == 10
        assert stats["totals"]["bytes_written"] == 40960
        assert stats["totals"]["bytes_read"] == 40960
        q0, q1 = stats["queues"]
        assert (q0["writes"], q0["reads"], q1["writes"], q1["reads"]) == (10, 0, 0, 10)

        d0 = disks.call("describe", name="d0")
        assert d0["connected"] and d0["connections"] == 1
        negotiated = d0["features"]["negotiated"]["names"]
        assert "VERSION_1" in negotiated and "MQ" in negotiated
        assert "REPLY_ACK" in d0["protocol_features"]["negotiated"]["names"]
        queues = d0["queues"]
        assert [(q["index"], q["started"], q["enabled"], q["size"]) for q in queues] == [
            (0, True, True, 128), (1, True, True, 128)]
        assert [q["last_avail_idx"] for q in queues] == [10, 10]
        assert [q["popped"] for q in queues] == [10, 10]
    # the other disk saw nothing
    assert disks.call("stats", name="d1")["totals"]["writes"] == 0


def test_resize_while_connected_reaches_the_guest(disks):
    with blk_frontend(disks.path("d0.sock"), backend_channel=True) as (blk, channel):
        assert blk.capacity == 16 * MIB // 512
        blk.write(0, b"k" * 512)
        result = disks.ctl_json("resize", "d0", "32M")
        assert result == {"name": "d0", "size": 32 * MIB, "capacity_sectors": 65536,
                          "guest_notified": True}
        answer_config_change(channel)
        assert blk.read_config().capacity == 32 * MIB // 512
        far = 40 * MIB // 512
        with pytest.raises(BlkError):
            blk.write(far, b"x" * 512)                       # still beyond the end
        blk.write(30 * MIB // 512, b"z" * 512)               # beyond the old end
        assert blk.read(30 * MIB // 512, 512) == b"z" * 512
        assert blk.read(0, 512) == b"k" * 512


def test_resize_of_a_file_disk_changes_the_file(disks, image):
    with blk_frontend(disks.path("d1.sock")) as blk:
        r = disks.call("resize", name="d1", size=12 * MIB)
        assert r["guest_notified"] is False          # this front-end has no back-end channel
        assert blk.read_config().capacity == 12 * MIB // 512
    assert os.path.getsize(image) == 12 * MIB


def test_read_only_while_connected(disks, image):
    with blk_frontend(disks.path("d1.sock")) as blk:
        blk.write(8, b"a" * 4096)
        assert disks.ctl_json("set-read-only", "d1", "on") == {"name": "d1", "read_only": True}
        (w,) = blk.execute([BlkRequest.write(8, b"b" * 4096)])
        assert w.status == BlkStatus.IOERR
        assert blk.read(8, 4096) == b"a" * 4096
        assert disks.call("describe", name="d1")["device"]["read_only"] is True
        disks.ctl("set-read-only", "d1", "off")
        blk.write(8, b"c" * 4096)
        assert blk.read(8, 4096) == b"c" * 4096
    with open(image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(4096) == b"c" * 4096
    # a new front-end on a read-only disk is offered VIRTIO_BLK_F_RO
    disks.call("set-read-only", name="d1", read_only=True)
    assert "RO" in disks.call("describe", name="d1")["features"]["offered"]["names"]


def test_removing_one_export_leaves_the_other_undisturbed(disks):
    errors, rounds = [], [0]
    removed = threading.Event()
    after_removal = [0]

    def io_loop(blk):
        # Writes a round's pattern over 64 KiB, reads it back, compares.
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                n = rounds[0]
                reqs = [BlkRequest.write(i * 8, pattern(n * 100 + i, 4096)) for i in range(16)]
                assert all(r.ok for r in blk.execute(reqs, depth=16))
                reads = blk.execute([BlkRequest.read(i * 8, 4096) for i in range(16)])
                got = [r.data for r in reads]
                if got != [pattern(n * 100 + i, 4096) for i in range(16)]:
                    errors.append(f"round {n}: data differs")
                    return
                rounds[0] += 1
                if removed.is_set():
                    after_removal[0] += 1
                    if after_removal[0] >= 20:
                        return
        except Exception as exc:                 # noqa: BLE001 - reported below
            errors.append(repr(exc))

    with blk_frontend(disks.path("d0.sock")) as blk0, \
            blk_frontend(disks.path("d1.sock")) as blk1:
        blk1.write(0, b"1" * 4096)
        worker = threading.Thread(target=io_loop, args=(blk0,))
        worker.start()
        while rounds[0] < 5 and worker.is_alive():
            time.sleep(0.01)
        assert disks.ctl_json("remove", "d1") == {"name": "d1", "removed": True}
        removed.set()
        worker.join(30)
        assert not worker.is_alive()
        assert errors == []
        assert after_removal[0] >= 20
        # d1's front-end was disconnected; its socket is gone
        with pytest.raises(BackendClosed):
            blk1.fe.get_features()
        assert not os.path.exists(disks.path("d1.sock"))
    assert [e["name"] for e in disks.call("list")] == ["d0", "n0"]
    assert disks.call("stats", name="d0")["totals"]["writes"] == 16 * rounds[0]


def test_stop_then_start_keeps_the_disk(disks):
    with blk_frontend(disks.path("d0.sock")) as blk:
        blk.write(0, b"s" * 512)
        stopped = disks.ctl_json("stop", "d0")
        assert stopped["state"] == "stopped" and stopped["connected"] is False
        with pytest.raises(BackendClosed):
            blk.fe.get_features()
    assert not os.path.exists(disks.path("d0.sock"))
    assert disks.ctl("stop", "d0", check=False).returncode == 1        # already stopped
    assert disks.ctl_json("start", "d0")["state"] == "running"
    with blk_frontend(disks.path("d0.sock")) as blk:
        assert blk.read(0, 512) == b"s" * 512
    assert disks.call("describe", name="d0")["connections"] == 2


def test_net_export_shows_its_front_end_and_counts_frames(disks):
    from vhostuser.frontend import Buffer, Frontend, GuestMemory
    from vhostuser.net import NetFeature
    from vhostuser.protocol import Feature, bits

    with Frontend.connect(disks.path("n0.sock"), wait=5) as fe:
        fe.negotiate(bits(Feature.VERSION_1, NetFeature.MAC, NetFeature.MQ))
        mem = fe.own(GuestMemory([(0, 1 << 20)], name="net"))
        fe.set_mem_table(mem)
        queues = [fe.setup_queue(i, 64, mem=mem) for i in range(4)]
        frame = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x00" + bytes(50)
        for _ in range(3):
            gpa = mem.alloc(12 + len(frame))
            mem.write(gpa, bytes(12) + frame)        # virtio_net_hdr_v1, no offloads
            queues[3].add([Buffer(gpa, 12 + len(frame), False)])
        queues[3].notify()
        assert len(queues[3].wait(3)) == 3           # transmit queue of pair 1

        n0 = disks.call("describe", name="n0")
        assert n0["connected"] is True
        assert n0["features"]["negotiated"]["names"] == [
            "MAC", "MQ", "PROTOCOL_FEATURES", "VERSION_1"]
        assert [q["started"] for q in n0["queues"]] == [True] * 4
        stats = disks.ctl_json("stats", "n0")
        assert stats["totals"]["tx_packets"] == 3
        pairs = stats["queues"]
        assert [p["tx_packets"] for p in pairs] == [0, 3]
        assert pairs[1]["tx_bytes"] == 3 * len(frame)
