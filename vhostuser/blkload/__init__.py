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

from ..blk.spec import CONFIG_WRITEBACK_OFFSET, BlkFeature
from ..frontend import BlkClient, Frontend, GuestMemory
from ..frontend.blk import BLK_FEATURES
from ..protocol import Feature, bit
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
                 event_idx: bool = True, wait: float = 5.0, timeout: float = 10.0,
                 flush: bool = True, write_through: bool = False):
        """``flush``: negotiate VIRTIO_BLK_F_FLUSH (as Linux does), so the
        device may cache writes until a FLUSH (write-back); False leaves it
        (and CONFIG_WCE) out, and a device must then make every write stable
        before completing it. ``write_through``: negotiate FLUSH and
        CONFIG_WCE, then set ``writeback`` to 0 in the config space, as Linux
        does when "write through" is written to the disk's
        queue/write_cache."""
        self.ffi, self.lib = load()
        self.qd, self.bs, self.nq = qd, bs, queues
        size = _ring_size(qd)
        per_queue = size * 16 + 2 * (size * 8 + 64) + qd * (16 + 1) + qd * bs + 3 * 4096
        total = (queues * per_queue + (1 << 20) + (2 << 20) - 1) & ~((2 << 20) - 1)
        self.fe = Frontend.connect(socket, wait=wait, timeout=timeout)
        try:
            self.mem = self.fe.own(GuestMemory([(0, total)], name="blkload"))
            features = BLK_FEATURES
            if not flush:
                features &= ~bit(BlkFeature.FLUSH) & ~bit(BlkFeature.CONFIG_WCE)
            self.blk = BlkClient.setup(self.fe, queues=queues, packed=False, queue_size=size,
                                       indirect=False, event_idx=None if event_idx else False,
                                       memory=self.mem, features=features)
            self.event_idx = self.fe.has(Feature.RING_EVENT_IDX)
            self.flush = self.fe.has(BlkFeature.FLUSH)
            if flush and not self.flush:
                raise RuntimeError("the back-end does not offer VIRTIO_BLK_F_FLUSH")
            if write_through:
                if not self.fe.has(BlkFeature.CONFIG_WCE):
                    raise RuntimeError("write-through asked for, and the back-end does not "
                                       "offer VIRTIO_BLK_F_CONFIG_WCE")
                self.fe.set_config(CONFIG_WRITEBACK_OFFSET, b"\0")
                if self.blk.read_config().writeback != 0:
                    raise RuntimeError("the back-end did not switch to write-through")
            # virtio 1.4 5.2.6: no FLUSH negotiated means write-through; with
            # FLUSH, `writeback` says (1 when CONFIG_WCE was not negotiated).
            if not self.flush:
                self.cache_mode = "write-through"
            elif self.fe.has(BlkFeature.CONFIG_WCE):
                self.cache_mode = ("write-back" if self.blk.read_config().writeback
                                   else "write-through")
            else:
                self.cache_mode = "write-back"
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
            seed: int | None = None, flush_every: int = 0):
        cfg = self.ffi.new("struct lg_config *")
        cfg.nq, cfg.qd, cfg.bs = self.nq, self.qd, self.bs
        cfg.random, cfg.read_pct = int(random), read_pct
        cfg.event_idx, cfg.spin, cfg.verify = int(self.event_idx), int(spin), int(verify)
        span = min(span or self.capacity, self.capacity)
        cfg.capacity = span - span % self.bs
        cfg.start, cfg.max_ios, cfg.seconds = start, max_ios, seconds
        if flush_every and not self.flush:
            raise ValueError("--flush-every needs FLUSH negotiated")
        cfg.flush_every = flush_every
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
        "flushes": res.flushes,
        "flush_lat_us_mean": round(res.flush_lat_sum / res.flushes / 1e3, 2) if res.flushes
        else None,
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
        wait: float = 5.0, flush: bool = True, write_through: bool = False,
        flush_every: int = 0) -> dict:
    """One measurement; returns a dict (what --json prints)."""
    if write_through and not flush:
        raise ValueError("write-through is set through FLUSH and CONFIG_WCE: not with --no-flush")
    if rw not in RW_MODES:
        raise ValueError(f"rw must be one of {', '.join(RW_MODES)}")
    bs = parse_size(bs)
    if bs < 512 or bs % 512:
        raise ValueError("block size must be a multiple of 512")
    random, read_pct = RW_MODES[rw]
    if read_pct is None:
        read_pct = rwmixread
    span = parse_size(span) if span else None
    with Session(socket, qd=qd, bs=bs, queues=queues, event_idx=event_idx, wait=wait,
                 flush=flush, write_through=write_through) as s:
        # Looked up once connected: the back-end may have been starting up.
        if pid is None:
            pid = s.fe.peer_pid
        probe = BackendProbe(pid) if pid else None
        if warmup is None:
            warmup = min(1.0, seconds / 5)
        if warmup > 0:
            rc, _ = s.run(random=random, read_pct=read_pct, seconds=warmup, spin=spin,
                          verify=verify, span=span, flush_every=flush_every)
            if rc:
                raise RuntimeError(f"warm-up failed: {os.strerror(-rc)}")
        before = probe.sample() if probe else None
        client0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        rc, res = s.run(random=random, read_pct=read_pct, seconds=seconds, spin=spin,
                        verify=verify, span=span, flush_every=flush_every)
        wall = time.monotonic() - t0
        client1 = resource.getrusage(resource.RUSAGE_SELF)
        after = probe.sample() if probe else None
        out = {
            "socket": socket, "rw": rw, "bs": bs, "qd": qd, "queues": queues,
            "seconds": seconds, "rwmixread": read_pct, "verify": verify,
            "wait": "spin" if spin else "eventfd", "event_idx": s.event_idx,
            "capacity": s.capacity, "flush_negotiated": s.flush, "cache_mode": s.cache_mode,
            "flush_every": flush_every,
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


def stamp_file(path: str, size: int, chunk: int = 8 << 20, write_size: int | None = None) -> None:
    """Creates a raw image whose sectors carry the stamps --verify checks.
    ``write_size``: the size of each write (default: ``chunk``); 4096 fills
    the page cache with 4 KiB pages rather than large folios."""
    ffi, lib = load()
    buf = ffi.new("char[]", chunk)
    view = memoryview(ffi.buffer(buf))
    step = write_size or chunk
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            lib.lg_stamp(buf, done // 512, n // 512)
            for off in range(0, n, step):
                k = min(step, n - off)
                if os.pwrite(fd, view[off:off + k], done + off) != k:
                    raise OSError(f"{path}: short write")
            done += n
    finally:
        os.close(fd)


def warm_page_cache(path: str) -> dict:
    """Reads the pages of ``path`` that are not in the page cache (4 KiB at a
    time, readahead off); returns how many were there and how many were read."""
    ffi, lib = load()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        resident = ffi.new("uint64_t *")
        n = lib.lg_warm(fd, size, resident)
        if n < 0:
            raise OSError(-n, f"warming {path}: {os.strerror(-n)}")
        pages = (size + 4095) // 4096
        return {"pages": pages, "resident_before": resident[0], "read": n,
                "resident_pct_before": round(100 * resident[0] / pages, 2) if pages else 100.0}
    finally:
        os.close(fd)
