"""vhostuser-blkload: a load generator for any vhost-user-blk back-end.

The control plane (negotiation, memory table, rings, eventfds) is done with
vhostuser's pure-Python front-end; the data path is a C loop
(csrc/blkload/loadgen.c, the extension ``vhostuser._blkload`` built with the
package) that drives the split rings directly, so the client is not the
bottleneck. Command line: ``vhostuser-blkload`` (or ``python -m
vhostuser.blkload``).

    from vhostuser.blkload import run
    result = run("/tmp/disk.sock", rw="randread", bs=4096, qd=32, seconds=10)
"""
from __future__ import annotations

import os
import resource
import time

from ..frontend import BlkClient, Frontend, GuestMemory
from ..protocol import Feature
from .procstat import BackendProbe, find_backend_pid

RW_MODES = {  # name -> (random, read percentage)
    "read": (False, 100), "write": (False, 0),
    "randread": (True, 100), "randwrite": (True, 0), "randrw": (True, None),
}
MAX_RING = 1024   # libvhost-user's (qemu-storage-daemon's) VIRTQUEUE_MAX_SIZE


def load():
    """The compiled C loop: (ffi, lib) of ``vhostuser._blkload``."""
    try:
        from .. import _blkload
    except ImportError as exc:
        raise RuntimeError("vhostuser._blkload (the load generator's C loop) is not built: "
                           "install the package, or run 'python3 csrc/build_native.py' "
                           "at the root of a checkout") from exc
    return _blkload.ffi, _blkload.lib


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = text.strip().lower().rstrip("b").rstrip("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def _ring_size(qd: int) -> int:
    size = 128
    while size < 3 * qd:
        size *= 2
    if size > MAX_RING:
        raise ValueError(f"queue depth {qd} needs {3 * qd} descriptors; at most "
                         f"{MAX_RING // 3} fits a {MAX_RING}-entry ring")
    return size


class Session:
    """A connected, negotiated front-end with rings and buffers for the C loop."""

    def __init__(self, socket: str, *, qd: int, bs: int, queues: int = 1,
                 event_idx: bool = True, wait: float = 5.0, timeout: float = 10.0):
        self.ffi, self.lib = load()
        self.qd, self.bs, self.nq = qd, bs, queues
        size = _ring_size(qd)
        per_queue = size * 16 + 2 * (size * 8 + 64) + qd * (16 + 1) + qd * bs + 3 * 4096
        total = (queues * per_queue + (1 << 20) + (2 << 20) - 1) & ~((2 << 20) - 1)
        self.fe = Frontend.connect(socket, wait=wait, timeout=timeout)
        try:
            self.mem = self.fe.own(GuestMemory([(0, total)], name="blkload"))
            self.blk = BlkClient.setup(self.fe, queues=queues, packed=False, queue_size=size,
                                       indirect=False, event_idx=None if event_idx else False,
                                       memory=self.mem)
            self.event_idx = self.fe.has(Feature.RING_EVENT_IDX)
            self.capacity = self.blk.capacity * 512
            self.cqueues = self.ffi.new("struct lg_queue[]", queues)
            for i, vq in enumerate(self.blk.queues):
                ring = vq.ring
                cq = self.cqueues[i]
                cq.desc_uva = self.mem.uva(ring.desc_gpa)
                cq.avail_uva = self.mem.uva(ring.driver_gpa)
                cq.used_uva = self.mem.uva(ring.device_gpa)
                cq.size = size
                cq.kick_fd, cq.call_fd = vq.kick_fd, vq.call_fd
                hdr = self.mem.alloc(16 * qd, 64)
                st = self.mem.alloc(qd, 64)
                data = self.mem.alloc(qd * bs, 4096)
                cq.hdr_gpa, cq.hdr_uva = hdr, self.mem.uva(hdr)
                cq.st_gpa, cq.st_uva = st, self.mem.uva(st)
                cq.data_gpa, cq.data_uva = data, self.mem.uva(data)
        except BaseException:
            self.fe.close()
            raise

    def close(self) -> None:
        self.fe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, *, random: bool, read_pct: int, seconds: float, spin: bool = False,
            verify: bool = False, max_ios: int = 0, start: int = 0, span: int | None = None,
            seed: int | None = None):
        cfg = self.ffi.new("struct lg_config *")
        cfg.nq, cfg.qd, cfg.bs = self.nq, self.qd, self.bs
        cfg.random, cfg.read_pct = int(random), read_pct
        cfg.event_idx, cfg.spin, cfg.verify = int(self.event_idx), int(spin), int(verify)
        span = min(span or self.capacity, self.capacity)
        cfg.capacity = span - span % self.bs
        cfg.start, cfg.max_ios, cfg.seconds = start, max_ios, seconds
        cfg.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
        res = self.ffi.new("struct lg_result *")
        rc = self.lib.lg_run(self.cqueues, cfg, res)
        return rc, res


def _summary(lib, res) -> dict:
    el = res.elapsed or 1e-9
    pct = {name: lib.lg_percentile(res, p) / 1e3
           for name, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))}
    return {
        "ios": res.ios, "reads": res.reads, "writes": res.writes,
        "errors": res.errors, "verify_errors": res.verify_errors,
        "elapsed_s": round(res.elapsed, 4),
        "iops": round(res.ios / el, 1),
        "mbps": round(res.bytes / el / 1e6, 2),
        "lat_us": {"mean": round(res.lat_sum / max(res.ios, 1) / 1e3, 2),
                   "min": round(res.lat_min / 1e3, 2), "max": round(res.lat_max / 1e3, 2),
                   **{k: round(v, 2) for k, v in pct.items()}},
        "kicks": res.kicks, "calls": res.calls, "sleeps": res.sleeps,
        "stalled": bool(res.stalled),
    }


def run(socket: str, *, rw: str = "randread", bs: int | str = 4096, qd: int = 32,
        queues: int = 1, seconds: float = 10.0, warmup: float | None = None,
        rwmixread: int = 50, verify: bool = False, spin: bool = False,
        event_idx: bool = True, pid: int | None = None, span: int | str | None = None,
        wait: float = 5.0) -> dict:
    """One measurement; returns a dict (what --json prints)."""
    if rw not in RW_MODES:
        raise ValueError(f"rw must be one of {', '.join(RW_MODES)}")
    bs = parse_size(bs)
    if bs < 512 or bs % 512:
        raise ValueError("block size must be a multiple of 512")
    random, read_pct = RW_MODES[rw]
    if read_pct is None:
        read_pct = rwmixread
    span = parse_size(span) if span else None
    with Session(socket, qd=qd, bs=bs, queues=queues, event_idx=event_idx, wait=wait) as s:
        # Looked up once connected: the back-end may have been starting up.
        if pid is None:
            pid = s.fe.peer_pid
        probe = BackendProbe(pid) if pid else None
        if warmup is None:
            warmup = min(1.0, seconds / 5)
        if warmup > 0:
            rc, _ = s.run(random=random, read_pct=read_pct, seconds=warmup, spin=spin,
                          verify=verify, span=span)
            if rc:
                raise RuntimeError(f"warm-up failed: {os.strerror(-rc)}")
        before = probe.sample() if probe else None
        client0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        rc, res = s.run(random=random, read_pct=read_pct, seconds=seconds, spin=spin,
                        verify=verify, span=span)
        wall = time.monotonic() - t0
        client1 = resource.getrusage(resource.RUSAGE_SELF)
        after = probe.sample() if probe else None
        out = {
            "socket": socket, "rw": rw, "bs": bs, "qd": qd, "queues": queues,
            "seconds": seconds, "rwmixread": read_pct, "verify": verify,
            "wait": "spin" if spin else "eventfd", "event_idx": s.event_idx,
            "capacity": s.capacity,
            **_summary(s.lib, res),
            "client_cpu_s": round((client1.ru_utime + client1.ru_stime)
                                  - (client0.ru_utime + client0.ru_stime), 3),
            "wall_s": round(wall, 3),
        }
    if probe:
        out["backend"] = probe.report(before, after, res.ios)
    if rc:
        out["error"] = os.strerror(-rc)
    return out


def prefill(socket: str, *, bs: int | str = "128k", qd: int = 16, wait: float = 5.0,
            span: int | str | None = None) -> dict:
    """Writes every sector once (stamped, so --verify can check reads later)."""
    bs = parse_size(bs)
    with Session(socket, qd=qd, bs=bs, wait=wait) as s:
        size = min(parse_size(span) if span else s.capacity, s.capacity)
        size -= size % bs
        rc, res = s.run(random=False, read_pct=0, seconds=3600, verify=True,
                        max_ios=size // bs, span=size)
        if rc:
            raise RuntimeError(f"prefill failed: {os.strerror(-rc)}")
        return {"bytes": res.bytes, "elapsed_s": res.elapsed, "errors": res.errors}


def stamp_file(path: str, size: int, chunk: int = 8 << 20) -> None:
    """Creates a raw image whose sectors carry the stamps --verify checks."""
    ffi, lib = load()
    buf = ffi.new("char[]", chunk)
    view = ffi.buffer(buf)
    with open(path, "wb") as f:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            lib.lg_stamp(buf, done // 512, n // 512)
            f.write(view[:n])
            done += n
