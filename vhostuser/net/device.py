"""The virtio-net device: features, config space, and who moves the frames."""
from __future__ import annotations

import array
import concurrent.futures
import contextlib
import inspect
import logging
import os
import reprlib
import struct
import threading

from ..dataplane import NativeHandler
from ..memory import GuestViews
from ..device import Device
from ..errors import ProtocolError
from ..loglimit import LogLimiter
from ..native import ffi, lib
from ..protocol import Feature, ProtocolFeature, Request, bit, bits
from ..queue import Queue
from .backends import (Frame, FrameBatch, LoopbackBackend, NetBackend, SinkBackend,
                       StaleFrameError, TapBackend)
from .spec import STATUS_LINK_UP, NetFeature, pack_config
from .switch import SwitchPort

log = logging.getLogger(__name__)

F = NetFeature
#: what a TAP with IFF_VNET_HDR carries end to end
TAP_OFFLOADS = (F.CSUM, F.GUEST_CSUM, F.HOST_TSO4, F.HOST_TSO6, F.HOST_ECN,
                F.GUEST_TSO4, F.GUEST_TSO6, F.GUEST_ECN)
DROP_REASONS = ["none", "short", "too_long", "bad_gso", "bad_csum", "disabled", "no_buffers", "io"]


def rarp_frame(mac: bytes) -> bytes:
    """A RARP request announcing mac (what QEMU sends after migration)."""
    eth = b"\xff" * 6 + mac + struct.pack("!H", 0x8035)
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
    return (eth + body).ljust(60, b"\0")


class NetDevice(Device):
    """A virtio-net interface served from a TAP, a Python back-end or a
    port of a :class:`~vhostuser.net.switch.Switch`."""

    device_id = 1

    def __init__(self, backend: TapBackend | NetBackend | SwitchPort | SinkBackend |
                 LoopbackBackend, *, queue_pairs: int = 1,
                 mac: bytes = b"\x52\x54\x00\x12\x34\x56", mtu: int = 1500, poll_us: int = 0,
                 in_order: bool = True):
        if not 1 <= queue_pairs <= 16:
            raise ValueError(f"queue pairs must be 1..16, not {queue_pairs}")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU must be 68..65535, not {mtu}")
        super().__init__(2 * queue_pairs, poll_us=poll_us)
        self.backend = backend
        self.queue_pairs = queue_pairs
        self.mac = mac
        self.in_order = in_order
        if isinstance(backend, TapBackend):
            kind = lib.VU_NET_BACKEND_TAP
            if not backend.fds:
                backend.open()
        elif isinstance(backend, NetBackend):
            kind = lib.VU_NET_BACKEND_PYTHON
            backend.device = self
        elif isinstance(backend, SwitchPort):      # a port of the built-in switch
            kind = lib.VU_NET_BACKEND_SWITCH
        elif isinstance(backend, SinkBackend):
            kind = lib.VU_NET_BACKEND_SINK
        elif isinstance(backend, LoopbackBackend):
            kind = lib.VU_NET_BACKEND_LOOPBACK
        else:
            raise TypeError(f"not a network back-end: {backend!r}")
        self._kind = kind
        self._net = lib.vu_net_new(kind)
        if self._net == ffi.NULL:
            raise MemoryError("vu_net_new")
        self._handle = ffi.new_handle(self)
        self._net.py_ctx = self._handle
        # What the operator configured: a front-end's NET_SET_MTU holds for
        # its session only (restored at reset and disconnect).
        self._configured_mtu = mtu
        self._net.mtu = mtu
        if kind == lib.VU_NET_BACKEND_TAP:
            for i, fd in enumerate(backend.fds):
                self._net.tap_fds[i] = fd
            # Header size and offloads of the TAP follow the negotiated
            # features; until then (QEMU sends SEND_RARP before SET_FEATURES
            # after a migration) agree on VERSION_1's 12-byte header.
            lib.vu_net_set_features(self._net, 1 << 32)
        if kind == lib.VU_NET_BACKEND_SWITCH:
            try:
                backend.bind(self._net, queue_pairs)
            except BaseException:
                lib.vu_net_free(self._net)
                self._net = ffi.NULL
                raise
        self._attach_lock = threading.Lock()   # inject vs. session teardown
        # Views over guest buffers: the connected data plane's (on_connect);
        # this one serves a device driven without a session (the ring lab).
        self._views = GuestViews()
        # A Python back-end's transmit() for one queue pair: the worker's
        # calls and a RARP announcement never overlap.
        self._tx_locks = [threading.Lock() for _ in range(queue_pairs)]
        # the RARP announcement a thread will send (None: no thread waiting)
        self._rarp_frame: bytes | None = None
        self._rarp_lock = threading.Lock()
        self._closed = False
        # A failing transmit() fails every batch: logged rate-limited, and
        # counted per queue pair (under its transmit lock).
        self._log = LogLimiter(log)
        self._tx_errors = [0] * queue_pairs

    @property
    def mtu(self) -> int:
        return self._net.mtu

    # -- negotiation -----------------------------------------------------------
    def device_features(self) -> int:
        wanted = [F.MAC, F.MTU, F.STATUS, F.MRG_RXBUF, F.GUEST_ANNOUNCE]
        if self.in_order:
            # Every back-end uses buffers in the order they were made
            # available (a frame at a time, under the ring's lock), so
            # drivers may take their cheaper in-order paths. (DPDK's then
            # sends multi-segment frames without indirect descriptors.)
            wanted.append(Feature.IN_ORDER)
        if self.queue_pairs > 1:
            wanted.append(F.MQ)
        # Offloads only where the back-end honours them: a Python back-end
        # and a switch port get plain, fully checksummed frames.
        if self._kind == lib.VU_NET_BACKEND_TAP:
            wanted += TAP_OFFLOADS
        return bits(*wanted)

    def protocol_features(self) -> int:
        features = super().protocol_features() | bit(ProtocolFeature.MTU)
        if self._announces:
            features |= bit(ProtocolFeature.RARP)
        return features

    @property
    def _announces(self) -> bool:
        """Whether a RARP has a network to go to: the sink drops everything
        and the loopback's only peer is the guest itself."""
        return self._kind not in (lib.VU_NET_BACKEND_SINK, lib.VU_NET_BACKEND_LOOPBACK)

    def config_space(self) -> bytes:
        return pack_config(self.mac, STATUS_LINK_UP, self.queue_pairs, self._net.mtu)

    def on_features(self, features: int) -> None:
        lib.vu_net_set_features(self._net, features)

    def on_reset(self) -> None:
        lib.vu_net_set_features(self._net, 0)
        self._net.mtu = self._configured_mtu

    def set_mtu(self, mtu: int) -> None:
        if not 68 <= mtu <= 65535:
            raise ProtocolError(Request.NET_SET_MTU, f"MTU {mtu} out of range")
        self._net.mtu = mtu

    def send_rarp(self, mac: bytes) -> None:
        if not self._announces:
            raise ProtocolError(Request.SEND_RARP, "this back-end has no network to announce to")
        frame = rarp_frame(bytes(mac[:6]))
        if self._kind == lib.VU_NET_BACKEND_TAP:
            hdr = bytes(self._net.hdr_len)
            os.write(self.backend.fds[0], hdr + frame)
        elif self._kind == lib.VU_NET_BACKEND_SWITCH:
            self.backend.send(frame)
        else:
            # Queue pair 0's worker may be inside transmit() right now, and
            # the event loop must not wait for back-end code: a thread of
            # its own takes its turn. One at a time: while it waits, later
            # announcements only replace the frame it will send (a front-end
            # could otherwise start a thread per message).
            with self._rarp_lock:
                waiting = self._rarp_frame is not None
                self._rarp_frame = frame
            if not waiting:
                threading.Thread(target=self._python_announce, name="vhostuser-rarp",
                                 daemon=True).start()

    def _python_announce(self) -> None:
        with self._tx_locks[0]:
            with self._rarp_lock:
                frame, self._rarp_frame = self._rarp_frame, None
            if self._closed or frame is None:
                return
            self._transmit(0, [Frame([memoryview(frame)], bytes(12), len(frame))],
                           "a RARP announcement")

    def _transmit(self, qp: int, batch: list[Frame], what: str | None = None) -> None:
        """transmit() under queue pair qp's lock: a failure is logged
        (rate-limited) and counted, a return value warned about once. An
        OSError (the network's trouble) is one line, anything else (a bug)
        comes with its traceback."""
        try:
            outcome = self.backend.transmit(qp, batch)
        except Exception as exc:
            self._tx_errors[qp] += 1
            what = what or ("1 frame" if len(batch) == 1 else f"{len(batch)} frames")
            if isinstance(exc, OSError):
                self._log.log((type(exc), exc.errno), logging.WARNING,
                              "Python network back-end: transmit of %s (queue pair %d) failed: "
                              "%s", what, qp, exc, source=qp)
            else:
                self._log.log((type(exc), None), logging.ERROR,
                              "Python network back-end failed on %s (queue pair %d): %s: %s",
                              what, qp, type(exc).__name__, exc, exc_info=exc, source=qp)
            return
        if outcome is None:
            return
        if inspect.isawaitable(outcome) or isinstance(outcome, concurrent.futures.Future):
            # Work that runs on after the call would read frames the guest
            # may have reused by then (or memory the front-end took back).
            close = getattr(outcome, "close", None)
            if close is not None:
                close()         # no "never awaited" warning per batch
            elif isinstance(outcome, concurrent.futures.Future) and not outcome.cancel():
                concurrent.futures.wait([outcome])   # running: the frames outlive it
            self._tx_errors[qp] += 1
            self._log.once("async", logging.ERROR,
                           "network back-end: %s.transmit() is async or returned a Future; it "
                           "must do its work in the call (frames are valid during the call "
                           "only)", type(self.backend).__name__)
        else:
            self._log.once("return", logging.WARNING,
                           "network back-end: %s.transmit() returned %s; return values are "
                           "ignored", type(self.backend).__name__, reprlib.repr(outcome))

    # -- serving -------------------------------------------------------------------
    def on_connect(self, session) -> None:
        super().on_connect(session)
        self._views = session.dataplane.views

    def queue_handler(self, queue: Queue):
        if queue.index % 2 == 1:
            # The device only reads transmit queues; DPDK's virtio PMD leaves
            # WRITE set on some packed indirect entries there, and DPDK's own
            # vhost ignores it too.
            queue._vq.ignore_write = True
        if queue.index % 2 == 0:
            with self._attach_lock:
                self._net.rxq[queue.index // 2] = queue._vq
            if self._kind == lib.VU_NET_BACKEND_SWITCH:
                self.backend.attach()       # deliveries may use rxq[] from now on
        return NativeHandler(lib.vu_net_handler, self._net, keepalive=self)

    def quiesce(self) -> None:
        # The session frees its queues next: the switch must stop delivering
        # into them first (vu_switch_detach waits for a delivery under way),
        # and so must inject() from a back-end's own thread.
        if self._kind == lib.VU_NET_BACKEND_SWITCH:
            self.backend.detach()
        self._forget_queues()
        super().quiesce()

    def _forget_queues(self) -> None:
        with self._attach_lock:
            for i in range(self.queue_pairs):
                self._net.rxq[i] = ffi.NULL

    def on_disconnect(self, session) -> None:
        if self._kind == lib.VU_NET_BACKEND_SWITCH:
            self.backend.detach()
        self._forget_queues()
        self._net.mtu = self._configured_mtu
        super().on_disconnect(session)

    def inject(self, frame: bytes, queue_pair: int = 0) -> bool:
        """Hands a frame to the guest on receive queue ``queue_pair``."""
        if not 0 <= queue_pair < self.queue_pairs:
            raise ValueError(f"queue pair {queue_pair} out of range")
        with self._attach_lock:
            if self._net.rxq[queue_pair] == ffi.NULL:
                return False
            return lib.vu_net_inject(self._net, queue_pair, frame, len(frame)) == 0

    def inject_many(self, frames, queue_pair: int = 0) -> int:
        """Hands many frames to the guest on receive queue ``queue_pair``:
        one lock, one flush and one notification for all of them. Each is a
        bytes-like object or a :class:`Frame` of a transmit batch (this
        device's or another's, during that transmit call: copied once,
        straight from the sending guest's memory); a whole
        :class:`FrameBatch` goes as it is. Returns how many were delivered;
        the others were dropped and counted."""
        if not 0 <= queue_pair < self.queue_pairs:
            raise ValueError(f"queue pair {queue_pair} out of range")
        if type(frames) is FrameBatch:
            # Its lock: the transmit() it came from, maybe on another
            # thread, returns only once this is done with its frames.
            with frames._lock:
                if not frames._live:
                    raise StaleFrameError("a frame batch is valid only during transmit()")
                # The C side counts a queue not attached (atomically:
                # workers count into the same counters).
                with self._attach_lock:
                    return lib.vu_net_inject_frames(self._net, queue_pair, frames._c, frames._n)
        items = frames if isinstance(frames, list) else list(frames)
        if not items:
            return 0
        batches = {id(f._batch): f._batch for f in items
                   if type(f) is Frame and f._batch is not None}
        if not batches:
            return self._inject_items(items, queue_pair)
        with contextlib.ExitStack() as held:
            # In one order (of id) whatever the call: two threads injecting
            # frames of the same batches never wait for each other's.
            for key in sorted(batches):
                held.enter_context(batches[key]._lock)
            return self._inject_items(items, queue_pair)

    def _inject_items(self, items: list, queue_pair: int) -> int:
        """inject_many() of a list, the locks of its frames' batches held."""
        kinds = {type(f) for f in items}
        if kinds <= _PLAIN_BYTES:
            # bytes objects: laid end to end by join (C speed), one C call
            buf = b"".join(items)
            lens = array.array("I", map(len, items))
            call = (lib.vu_net_inject_packed, ffi.from_buffer(buf),
                    ffi.cast("uint32_t *", ffi.from_buffer(lens)))
        elif kinds == {Frame} and all(f._c is not None for f in items):
            for f in items:
                f._check()
            ptrs = ffi.new("struct vu_net_frame *[]", [f._c for f in items])
            call = (lib.vu_net_inject_frames, ptrs)
        else:
            iov, niov, keep = _iovecs(items)
            call = (lib.vu_net_inject_iovs, iov, niov)
        with self._attach_lock:
            return call[0](self._net, queue_pair, *call[1:], len(items))

    def stats(self) -> dict[str, int]:
        """The counters of :meth:`metrics` summed over the queue pairs (drops
        as ``tx_dropped_REASON``), plus the switch's when it is a port."""
        total: dict[str, int] = {}
        for m in self.metrics():
            for name, value in m.items():
                if name == "queue_pair":
                    continue
                parts = value.items() if isinstance(value, dict) else [(None, value)]
                for reason, count in parts:
                    key = name if reason is None else f"{name}_{reason}"
                    total[key] = total.get(key, 0) + count
        if self._kind == lib.VU_NET_BACKEND_SWITCH and self.backend.index is not None:
            total.update({f"switch_{k}": v for k, v in self.backend.stats().items()})
        return total

    def metrics(self) -> list[dict]:
        """Per queue pair: packets and bytes each way, offloads, drops by
        reason (transmit is guest to back-end), calls of a Python
        back-end's transmit() that raised, and log lines about them held
        back by the rate limit."""
        out = []
        for qp in range(self.queue_pairs):
            s = self._net.stats[qp]
            m = {"queue_pair": qp}
            for name in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_gso",
                         "tx_csum_partial", "rx_gso", "rx_csum_partial"):
                m[name] = getattr(s, name)
            m["tx_dropped"] = {r: s.tx_dropped[i] for i, r in enumerate(DROP_REASONS) if i}
            m["rx_dropped"] = {r: s.rx_dropped[i] for i, r in enumerate(DROP_REASONS) if i}
            m["transmit_errors"] = self._tx_errors[qp]
            m["log_suppressed"] = self._log.suppressed.get(qp, 0)
            out.append(m)
        return out

    def close(self) -> None:
        for lock in self._tx_locks:     # a RARP announcement under way ends first
            with lock:
                self._closed = True
        if self._kind == lib.VU_NET_BACKEND_SWITCH:
            self.backend.close()        # the switch forgets the port before it is freed
        if self._net != ffi.NULL:
            lib.vu_net_free(self._net)
            self._net = ffi.NULL
        self._log.flush()
        self.backend.close()

    def _python_transmit(self, qp: int, frames, n: int) -> None:
        # Nothing per frame here: a Frame is made, and read from guest
        # memory, only when the back-end looks at it.
        batch = FrameBatch(self, frames, n)
        try:
            with self._tx_locks[qp]:
                self._transmit(qp, batch)
        finally:
            batch._end()


#: types whose len() is their size in bytes
_PLAIN_BYTES = {bytes, bytearray}


def _iovecs(items):
    """(struct iovec[], uint32_t niov[], objects to keep alive) for
    vu_net_inject_iovs: a bytes-like item is one iovec, a transmit batch's
    Frame its own."""
    niov = ffi.new("uint32_t[]", len(items))
    parts = []
    keep = []
    for i, f in enumerate(items):
        if type(f) is Frame and f._c is not None:
            c = f._check()
            for j in range(c.niov):
                parts.append((c.iov[j].iov_base, c.iov[j].iov_len))
            niov[i] = c.niov
        elif isinstance(f, Frame):
            for v in f.views:
                buf = ffi.from_buffer(v)
                keep.append(buf)
                parts.append((buf, len(v)))
            niov[i] = len(f.views)
        else:
            buf = ffi.from_buffer(f)
            keep.append(buf)
            parts.append((buf, len(buf)))
            niov[i] = 1
    iov = ffi.new("struct iovec[]", len(parts))
    for k, (base, length) in enumerate(parts):
        iov[k].iov_base = base
        iov[k].iov_len = length
    return iov, niov, keep


@ffi.def_extern()
def vu_net_py_tx(ctx, qp, frames, n):
    device: NetDevice = ffi.from_handle(ctx)
    try:
        device._python_transmit(qp, frames, n)
    except Exception as exc:
        device._log.log(("batch", type(exc)), logging.ERROR,
                        "Python network batch of %d frames failed: %s: %s", n,
                        type(exc).__name__, exc, exc_info=exc, source=qp)
    return 0
