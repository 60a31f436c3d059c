"""Per-queue metrics kept in C, and QoS token buckets in the data path."""
import asyncio
import threading
import time

import pytest

from vhostuser.blk import BlkDevice, BlockBackend, RamBackend
from vhostuser.blk.device import LATENCY_BOUNDS_US
from vhostuser.frontend import BlkClient, BlkRequest, Frontend
from vhostuser.qos import QosError, QosLimits
from vhostuser.testing.server import BackgroundServer

MiB = 1 << 20


def test_metrics_count_requests_bytes_errors_and_latency(blk_client):
    dev = BlkDevice(RamBackend(4 * MiB), num_queues=2)
    with blk_client(dev, queues=2) as (_, c):
        c.execute([BlkRequest.write(8 * i, bytes([i]) * 4096) for i in range(10)], queue=0)
        c.execute([BlkRequest.read(8 * i, 4096) for i in range(7)], queue=1)
        c.flush(queue=1)
        past_end = c.execute([BlkRequest.read(c.capacity, 512)], queue=0)[0]
        assert past_end.status == 1
        q0, q1 = dev.metrics()
        total = dev.stats()
    assert (q0["writes"], q0["reads"], q0["errors"], q0["requests"]) == (10, 1, 1, 11)
    assert q0["bytes_written"] == 10 * 4096 and q0["bytes_read"] == 0   # the failed read moved nothing
    assert (q1["reads"], q1["flushes"], q1["requests"], q1["errors"]) == (7, 1, 8, 0)
    assert q1["bytes_read"] == 7 * 4096
    for q in (q0, q1):
        assert q["inflight"] == 0
        assert len(q["latency_us"]) == len(LATENCY_BOUNDS_US)
        assert sum(q["latency_us"]) == q["requests"]
        assert q["latency_ns_sum"] > 0
    assert total["requests"] == 19 and total["bytes_read"] == 7 * 4096


class GatedBackend(BlockBackend):
    """Reads wait until released, so requests can be caught in flight."""

    def __init__(self):
        self.data = bytearray(MiB)
        self.released = False

    def size(self):
        return len(self.data)

    async def read(self, offset, bufs):
        while not self.released:
            await asyncio.sleep(0.005)
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)

    def write(self, offset, bufs):
        for b in bufs:
            self.data[offset:offset + len(b)] = b
            offset += len(b)


def test_inflight_counts_python_requests_until_they_finish(blk_client):
    backend = GatedBackend()
    dev = BlkDevice(backend)
    with blk_client(dev) as (_, c):
        c.write(0, b"x" * 512)
        c.submit([BlkRequest.read(0, 512) for _ in range(5)])
        deadline = time.monotonic() + 5
        while dev.metrics()[0]["inflight"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.metrics()[0]["inflight"] == 5
        backend.released = True
        done = c.reap(5)
        assert all(r.ok and r.data == b"x" * 512 for r in done)
        m = dev.metrics()[0]
    assert m["inflight"] == 0
    assert (m["reads"], m["writes"], m["requests"]) == (5, 1, 6)
    assert sum(m["latency_us"]) == 6


def test_qos_limits_are_validated():
    with pytest.raises(QosError):
        QosLimits(iops=-1)
    with pytest.raises(QosError):
        QosLimits(bps="fast")
    assert QosLimits().unlimited and not QosLimits(iops=5).unlimited


def _drive(client, stop_at, counts, key, nbytes=4096, depth=8):
    """Reads at a queue depth until stop_at; counts completed requests."""
    done = 0
    while time.monotonic() < stop_at:
        reqs = client.execute([BlkRequest.read(8 * (i % 64), nbytes) for i in range(depth)],
                              depth=depth, timeout=30)
        assert all(r.ok for r in reqs)
        done += len(reqs)
    counts[key] = done


def _run_side_by_side(limited, neighbour, seconds, nbytes=4096):
    counts = {}
    stop_at = time.monotonic() + seconds
    start = time.monotonic()
    threads = [threading.Thread(target=_drive, args=(c, stop_at, counts, k, nbytes))
               for k, c in (("limited", limited), ("neighbour", neighbour))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts, time.monotonic() - start


@pytest.fixture
def two_disks(tmp_path):
    """Two RAM disks served by one process, each with its own front-end."""
    devs = [BlkDevice(RamBackend(4 * MiB)) for _ in range(2)]
    with BackgroundServer(devs[0], str(tmp_path / "a.sock")), \
            BackgroundServer(devs[1], str(tmp_path / "b.sock")), \
            Frontend.connect(str(tmp_path / "a.sock")) as fa, \
            Frontend.connect(str(tmp_path / "b.sock")) as fb:
        yield devs, BlkClient.setup(fa), BlkClient.setup(fb)
    for d in devs:
        d.close()


def test_iops_limit_holds_one_disk_while_its_neighbour_runs_free(two_disks):
    (limited_dev, free_dev), limited, neighbour = two_disks
    limits = QosLimits(iops=100, iops_burst=10)
    limited_dev.set_qos(limits)
    counts, elapsed = _run_side_by_side(limited, neighbour, 2.0)
    # The bucket allows rate * time + burst; the last batch of 8 may have been
    # admitted just before the deadline.
    ceiling = limits.iops * elapsed + limits.iops_burst + 8
    print(f"limited {counts['limited']} neighbour {counts['neighbour']} in {elapsed:.2f}s")
    assert counts["limited"] <= ceiling
    assert counts["limited"] >= 0.5 * limits.iops * 2.0
    assert counts["neighbour"] >= 4 * counts["limited"]
    assert limited_dev.metrics()[0]["throttled"] > 0
    assert free_dev.metrics()[0]["throttled"] == 0


def test_bandwidth_limit_counts_bytes(two_disks):
    (limited_dev, _), limited, neighbour = two_disks
    limits = QosLimits(bps=MiB, bps_burst=128 * 1024)
    limited_dev.set_qos(limits)
    counts, elapsed = _run_side_by_side(limited, neighbour, 2.0, nbytes=64 * 1024)
    moved = counts["limited"] * 64 * 1024
    ceiling = limits.bps * elapsed + limits.bps_burst + 8 * 64 * 1024
    assert 0.5 * limits.bps * 2.0 <= moved <= ceiling
    assert counts["neighbour"] >= 4 * counts["limited"]


def test_limits_change_at_run_time(two_disks):
    (dev, _), client, _ = two_disks
    dev.set_qos(QosLimits(iops=50, iops_burst=1))
    counts = {}
    _drive(client, time.monotonic() + 1.0, counts, "slow")
    # Lifted while the queue may be asleep on the old limit: it wakes at once.
    dev.set_qos(QosLimits())
    _drive(client, time.monotonic() + 1.0, counts, "free")
    assert counts["slow"] <= 50 * 1.0 + 1 + 8 + 8
    assert counts["free"] >= 4 * counts["slow"]
    assert dev.qos == QosLimits()


def test_a_throttled_queue_wakes_in_every_session(tmp_path):
    """A throttled queue sleeps on its QoS timer in its worker's epoll. Each
    session has a new worker, often at the address the last one was freed
    from: the timer must be put in the new epoll all the same (a device
    that remembered the worker by its address did not, and the queue slept
    for ever)."""
    dev = BlkDevice(RamBackend(4 * MiB))
    dev.set_qos(QosLimits(iops=50, iops_burst=1))
    path = str(tmp_path / "q.sock")
    try:
        with BackgroundServer(dev, path):
            for session in range(8):
                with Frontend.connect(path, timeout=5) as fe:
                    c = BlkClient.setup(fe)
                    throttled = dev.metrics()[0]["throttled"]
                    reqs = c.execute([BlkRequest.read(8 * i, 4096) for i in range(8)],
                                     depth=8, timeout=5)
                    assert all(r.ok for r in reqs), session
                    assert dev.metrics()[0]["throttled"] > throttled, session
    finally:
        dev.close()
