"""Prometheus metrics of a daemon's exports (prometheus-client), served over
HTTP when the daemon is asked to (``--prometheus ADDR:PORT``).

Per export: ``vhostuser_export_up``, ``vhostuser_export_connected``.
Per disk: ``vhostuser_blk_capacity_bytes``, ``vhostuser_blk_read_only``; per
disk queue: ``vhostuser_blk_requests_total{op}``,
``vhostuser_blk_bytes_total{direction}``, ``vhostuser_blk_errors_total``,
``vhostuser_blk_unsupported_total``, ``vhostuser_blk_throttled_total``,
``vhostuser_blk_inflight_requests``, ``vhostuser_blk_log_suppressed_total`` and
the histogram ``vhostuser_blk_request_latency_seconds``. Per interface queue
pair: ``vhostuser_net_packets_total{direction}``,
``vhostuser_net_bytes_total{direction}``,
``vhostuser_net_dropped_total{direction,reason}`` (tx: from the guest),
``vhostuser_net_transmit_errors_total``, ``vhostuser_net_log_suppressed_total``.
"""
from __future__ import annotations

import logging
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from ..blk.device import LATENCY_BOUNDS_US
from . import describe
from .daemon import Daemon
from .export import RUNNING

log = logging.getLogger(__name__)

BLK_OPS = {"reads": "read", "writes": "write", "flushes": "flush", "discards": "discard",
           "write_zeroes": "write_zeroes", "others": "other"}
#: Where the device may report the latencies' sum, and the unit: the
#: histogram's _sum and _count appear once one of these is there.
LATENCY_SUM_KEYS = (("latency_sum_ns", 1e-9), ("latency_ns_sum", 1e-9), ("latency_sum_us", 1e-6))
_LE = [floatToGoString(b / 1e6) for b in LATENCY_BOUNDS_US]


def _snapshot(daemon: Daemon) -> list[dict]:
    """Runs on the daemon's loop: everything a scrape needs, copied."""
    out = []
    for export in daemon.exports.values():
        out.append({"name": export.name, "type": export.spec.type,
                    "up": export.state == RUNNING, "connected": export.connected,
                    "device": describe.device_settings(export.device),
                    **describe.counters(export.device)})
    return out


def cumulative_buckets(counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts -> Prometheus' cumulative (le, count) pairs, in seconds."""
    running, out = 0, []
    for le, n in zip(_LE, counts):
        running += n
        out.append((le, running))
    return out


def latency_sum(m: dict) -> float | None:
    for key, scale in LATENCY_SUM_KEYS:
        if key in m:
            return m[key] * scale
    return None


class ExportCollector:
    """A prometheus-client collector over the daemon's exports. Scrapes come
    from the HTTP server's thread; the numbers are read on the daemon's loop."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def describe(self):
        # Registering must not collect: that would wait on the loop we run in.
        return []

    def collect(self):
        exports = self.daemon.call_threadsafe(_snapshot, self.daemon)
        yield from families(exports)


def families(exports: list[dict]):
    """Metric families from a snapshot (see _snapshot)."""
    up = GaugeMetricFamily("vhostuser_export_up", "1 while the export serves its socket",
                           labels=["export", "type"])
    connected = GaugeMetricFamily("vhostuser_export_connected",
                                  "1 while a front-end is connected", labels=["export", "type"])
    capacity = GaugeMetricFamily("vhostuser_blk_capacity_bytes", "Disk size",
                                 labels=["export"])
    read_only = GaugeMetricFamily("vhostuser_blk_read_only", "1 if the disk refuses writes",
                                  labels=["export"])
    q = ["export", "queue"]
    requests = CounterMetricFamily("vhostuser_blk_requests", "Requests completed, by type",
                                   labels=q + ["op"])
    bytes_ = CounterMetricFamily("vhostuser_blk_bytes", "Bytes read or written by the guest",
                                 labels=q + ["direction"])
    errors = CounterMetricFamily("vhostuser_blk_errors", "Requests answered with an I/O error",
                                 labels=q)
    unsupported = CounterMetricFamily("vhostuser_blk_unsupported",
                                      "Requests of a type the disk does not support", labels=q)
    throttled = CounterMetricFamily("vhostuser_blk_throttled",
                                    "Requests delayed by the QoS limits", labels=q)
    inflight = GaugeMetricFamily("vhostuser_blk_inflight_requests", "Requests in flight",
                                 labels=q)
    blk_suppressed = CounterMetricFamily(
        "vhostuser_blk_log_suppressed", "Log lines about failed requests held back by the "
        "rate limit", labels=q)
    latency = HistogramMetricFamily("vhostuser_blk_request_latency_seconds",
                                    "Time from taking a request to completing it", labels=q)
    qp = ["export", "queue_pair", "direction"]
    packets = CounterMetricFamily("vhostuser_net_packets",
                                  "Frames moved (tx: from the guest, rx: to it)", labels=qp)
    net_bytes = CounterMetricFamily("vhostuser_net_bytes", "Bytes of the frames moved",
                                    labels=qp)
    dropped = CounterMetricFamily("vhostuser_net_dropped", "Frames dropped, by reason",
                                  labels=qp + ["reason"])
    per_pair = ["export", "queue_pair"]
    tx_errors = CounterMetricFamily("vhostuser_net_transmit_errors",
                                    "Calls of a Python back-end's transmit() that raised",
                                    labels=per_pair)
    net_suppressed = CounterMetricFamily(
        "vhostuser_net_log_suppressed", "Log lines about failed transmits held back by the "
        "rate limit", labels=per_pair)
    for e in exports:
        name, kind = e["name"], e["type"]
        up.add_metric([name, kind], int(e["up"]))
        connected.add_metric([name, kind], int(e["connected"]))
        if kind == "blk":
            capacity.add_metric([name], e["device"]["size"])
            read_only.add_metric([name], int(e["device"]["read_only"]))
            for m in e["queues"]:
                labels = [name, str(m["queue"])]
                for key, op in BLK_OPS.items():
                    if key in m:
                        requests.add_metric(labels + [op], m[key])
                bytes_.add_metric(labels + ["read"], m.get("bytes_read", 0))
                bytes_.add_metric(labels + ["write"], m.get("bytes_written", 0))
                errors.add_metric(labels, m.get("errors", 0))
                unsupported.add_metric(labels, m.get("unsupported", 0))
                throttled.add_metric(labels, m.get("throttled", 0))
                inflight.add_metric(labels, m.get("inflight", 0))
                blk_suppressed.add_metric(labels, m.get("log_suppressed", 0))
                if "latency_us" in m:
                    latency.add_metric(labels, cumulative_buckets(m["latency_us"]),
                                       latency_sum(m))
        elif kind == "net":
            for m in e["queues"]:
                pair = str(m["queue_pair"])
                for d in ("tx", "rx"):
                    packets.add_metric([name, pair, d], m[f"{d}_packets"])
                    net_bytes.add_metric([name, pair, d], m[f"{d}_bytes"])
                    for reason, n in m[f"{d}_dropped"].items():
                        dropped.add_metric([name, pair, d, reason], n)
                tx_errors.add_metric([name, pair], m.get("transmit_errors", 0))
                net_suppressed.add_metric([name, pair], m.get("log_suppressed", 0))
    yield from (up, connected, capacity, read_only, requests, bytes_, errors, unsupported,
                throttled, inflight, blk_suppressed, latency, packets, net_bytes, dropped,
                tx_errors, net_suppressed)


def parse_address(text: str) -> tuple[str, int]:
    """"ADDR:PORT", "[v6]:PORT" or ":PORT" (loopback) -> (addr, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--prometheus wants ADDR:PORT, not {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):   # noqa: A002: the base class's name
        """No access log on stderr."""


class PrometheusEndpoint:
    """The HTTP endpoint (its own thread), with a registry holding only the
    daemon's collector. The socket is bound at once; ``serve=False`` leaves
    the thread to :meth:`serve` (a sandboxed daemon starts it once it is
    confined, so the thread is born without privileges)."""

    def __init__(self, daemon: Daemon, addr: str, port: int, *, serve: bool = True):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ExportCollector(daemon))
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        server = type("_Server", (ThreadingWSGIServer,), {"address_family": family})
        self.httpd = make_server(addr, port, make_wsgi_app(self.registry), server,
                                 handler_class=_QuietHandler)
        self.thread: threading.Thread | None = None
        host, bound_port = self.httpd.server_address[:2]
        self.address = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        daemon.prometheus_address = self.address
        if serve:
            self.serve()

    def serve(self) -> None:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="prometheus",
                                       daemon=True)
        self.thread.start()
        log.info("Prometheus metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(5)
        self.httpd.server_close()
