"""The Prometheus endpoint: scraped over HTTP on loopback after some I/O."""
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from vhostuser.frontend import BlkRequest, BlkStatus, Frontend
from vhostuser.manage.prometheus import cumulative_buckets, parse_address
from vhostuser_devkit.daemon import WITH_PYTHON, DaemonProcess
from vhostuser_devkit.patterns import pattern

from .conftest import blk_frontend


def scrape(daemon) -> dict:
    address = daemon.call("version")["prometheus"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_scrape_counts_io_per_queue(daemon):
    with daemon.client() as c:
        c.add_blk("d0", daemon.path("d0.sock"), ramdisk="8M", queues=2)
        c.add_net("n0", daemon.path("n0.sock"), backend="null", queues=2)
    with blk_frontend(daemon.path("d0.sock"), queues=2) as blk:
        blk.execute([BlkRequest.write(i * 8, pattern(i, 4096)) for i in range(12)], queue=1)
        blk.execute([BlkRequest.read(0, 512) for _ in range(3)], queue=0)
        blk.flush(queue=0)
        s = scrape(daemon)
    assert value(s, "vhostuser_export_up", export="d0", type="blk") == 1
    assert value(s, "vhostuser_export_connected", export="d0", type="blk") == 1
    assert value(s, "vhostuser_export_connected", export="n0", type="net") == 0
    assert value(s, "vhostuser_blk_capacity_bytes", export="d0") == 8 << 20
    req = "vhostuser_blk_requests_total"
    assert value(s, req, export="d0", queue="1", op="write") == 12
    assert value(s, req, export="d0", queue="0", op="write") == 0
    assert value(s, req, export="d0", queue="0", op="read") == 3
    assert value(s, req, export="d0", queue="0", op="flush") == 1
    assert value(s, "vhostuser_blk_bytes_total", export="d0", queue="1", direction="write") == 12 * 4096
    assert value(s, "vhostuser_blk_bytes_total", export="d0", queue="0", direction="read") == 3 * 512
    assert value(s, "vhostuser_blk_errors_total", export="d0", queue="0") == 0
    assert value(s, "vhostuser_blk_inflight_requests", export="d0", queue="1") == 0
    # The histogram agrees with the control socket's numbers, made cumulative.
    queues = daemon.call("stats", name="d0")["queues"]
    lat = "vhostuser_blk_request_latency_seconds_bucket"
    for q in queues:
        for le, n in cumulative_buckets(q["latency_us"]):
            assert value(s, lat, export="d0", queue=str(q["queue"]), le=le) == n
    assert value(s, lat, export="d0", queue="1", le="+Inf") == 12      # every write timed
    assert value(s, "vhostuser_blk_request_latency_seconds_count", export="d0", queue="1") == 12
    assert value(s, "vhostuser_blk_request_latency_seconds_sum", export="d0", queue="1") > 0
    for d in ("tx", "rx"):
        assert value(s, "vhostuser_net_packets_total", export="n0", queue_pair="1",
                     direction=d) == 0
    assert value(s, "vhostuser_net_dropped_total", export="n0", queue_pair="0", direction="tx",
                 reason="short") == 0


def test_failures_and_log_lines_held_back_are_counted(workdir):
    """Python back-ends failing every request: the log has one line per kind
    of failure, the scrape counts them all and the lines held back."""
    d = DaemonProcess(workdir, cwd=str(Path(__file__).resolve().parents[2]), backends=WITH_PYTHON,
                      env={"VHOSTUSER_LOG_INTERVAL": "3600"})     # however slow the machine
    try:
        d.call("add", type="blk", name="d0", socket_path=d.path("d0.sock"), queues=2,
               backend="tests.manage.pybackends:FailingDisk")
        d.call("add", type="net", name="n0", socket_path=d.path("n0.sock"),
               backend="tests.manage.pybackends:FailingNet")
        with blk_frontend(d.path("d0.sock"), queues=2) as blk:
            for q in (0, 1):
                reqs = blk.execute([BlkRequest.write(i, bytes(512)) for i in range(10)], queue=q)
                assert {r.status for r in reqs} == {BlkStatus.IOERR}
        frame = bytes.fromhex("020000000001" "020000000002" "88b5") + bytes(46)
        with Frontend.setup(d.path("n0.sock"), queues=2) as fe:
            buf = fe.memory.alloc(12 + len(frame))
            fe.memory.write(buf, bytes(12) + frame)
            for _ in range(5):
                fe.queues[1].submit([(buf, 12 + len(frame))])
                fe.queues[1].wait()
        s = scrape(d)
    finally:
        rc = d.terminate()
    assert rc == 0, d.output()
    for q in ("0", "1"):
        assert value(s, "vhostuser_blk_errors_total", export="d0", queue=q) == 10
    # Both queues' failures share one log line (the first); 19 were held back.
    assert (value(s, "vhostuser_blk_log_suppressed_total", export="d0", queue="0")
            + value(s, "vhostuser_blk_log_suppressed_total", export="d0", queue="1")) == 19
    assert value(s, "vhostuser_net_transmit_errors_total", export="n0", queue_pair="0") == 5
    assert value(s, "vhostuser_net_log_suppressed_total", export="n0", queue_pair="0") == 4
    out = d.output()
    assert out.count("failed: [Errno 5] Input/output error") == 2, out   # first, and at remove
    assert out.count("failed: [Errno 113] No route to host") == 2, out
    assert "Traceback" not in out, out


def test_removed_export_leaves_the_scrape(daemon):
    daemon.call("add", type="blk", name="d0", socket_path=daemon.path("d0.sock"), ramdisk="1M")
    assert ("vhostuser_export_up", (("export", "d0"), ("type", "blk"))) in scrape(daemon)
    daemon.call("remove", name="d0")
    assert not any(dict(labels).get("export") == "d0" for _, labels in scrape(daemon))


def test_cumulative_buckets_and_addresses():
    counts = [0] * 26
    counts[0], counts[3], counts[25] = 2, 5, 1
    buckets = cumulative_buckets(counts)
    assert buckets[0] == ("1e-06", 2) and buckets[3] == ("8e-06", 7)
    assert buckets[-1] == ("+Inf", 8) and buckets[-2][1] == 7
    assert parse_address(":9100") == ("127.0.0.1", 9100)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
