"""Runs one case over a socket with the library's front-end.

Every case gets its own connection and guest memory, brought up as far as
the case's ``setup.stage`` says, so a case never depends on the one before
it and replays alone.
"""
from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass, field

from ..frontend import (BackendClosed, FeatureError, Frontend, FrontendError, GuestMemory,
                        GuestMemoryError, RingFull, RingProtocolError, Virtqueue)
from ..frontend.device import DEFAULT_PROTOCOL_FEATURES
from ..protocol import VRING_ADDR, Feature, ProtocolFeature, Request, bit
from . import layout
from .case import Case, Setup
from .generate import NEEDS_PROTOCOL_FEATURE
from .profiles import Profile

# Requests whose answer we wait for even without NEED_REPLY.
REPLYING = {int(r) for r in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                             Request.GET_VRING_BASE, Request.GET_QUEUE_NUM, Request.GET_CONFIG,
                             Request.GET_INFLIGHT_FD, Request.GET_MAX_MEM_SLOTS,
                             Request.GET_STATUS)}
NEED_REPLY = 1 << 3


class SetupFailed(FrontendError):
    """The well-formed bring-up before a case's actions failed."""


@dataclass
class Observation:
    """What a case's actions provoked."""
    answered: bool = False
    closed: bool = False
    error_signalled: bool = False
    chains: int = 0               # chains the case added / published
    completed: int = 0            # of those, how many came back
    notes: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)   # behaviour words (feedback.py)


def features_for(profile: Profile, setup: Setup) -> int:
    wanted = bit(Feature.VERSION_1) | profile.device_features
    if setup.packed:
        wanted |= bit(Feature.RING_PACKED)
    if setup.indirect:
        wanted |= bit(Feature.RING_INDIRECT_DESC)
    if setup.event_idx:
        wanted |= bit(Feature.RING_EVENT_IDX)
    return wanted


def protocol_features_for(setup: Setup) -> int:
    """The front-end's protocol features minus those the case withholds."""
    withheld = 0
    for name in setup.withhold:
        withheld |= bit(ProtocolFeature[name])
    return DEFAULT_PROTOCOL_FEATURES & ~withheld


def accepted_frontend(path: str, timeout: float) -> Frontend:
    """A connection the back-end really serves.

    Back-ends that serve one front-end at a time (ours, QEMU's) refuse a new
    connection until they noticed the previous one close, which takes a
    moment: retry until GET_FEATURES is answered. Raises
    ConnectionRefusedError/FileNotFoundError when nothing listens at all.
    """
    deadline = time.monotonic() + timeout
    while True:
        fe = Frontend.connect(path, timeout=timeout)
        try:
            fe.get_features()
            return fe
        except (BackendClosed, BrokenPipeError, ConnectionResetError):
            fe.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)
        except BaseException:
            fe.close()
            raise


class CaseConnection:
    """One fuzzing connection: front-end, guest memory, queues."""

    def __init__(self, path: str, profile: Profile, *, timeout: float):
        self.path = path
        self.profile = profile
        self.timeout = timeout
        self.fe: Frontend | None = None
        self.mem: GuestMemory | None = None

    def open(self, setup: Setup, stage: str | None = None) -> Frontend:
        """Connects and brings the device up to ``stage`` (default setup's).

        Raises ConnectionRefusedError/FileNotFoundError when nothing listens,
        SetupFailed when the back-end refuses a well-formed bring-up."""
        self.close()
        self.fe = accepted_frontend(self.path, self.timeout)
        self.mem = GuestMemory(layout.REGIONS, name="fuzz")
        try:
            self.bring_up(setup, stage or setup.stage)
        except FeatureError:
            raise
        except (FrontendError, OSError, ValueError) as exc:
            raise SetupFailed(f"bring-up: {type(exc).__name__}: {exc}") from exc
        return self.fe

    def bring_up(self, setup: Setup, stage: str) -> None:
        fe, mem = self.fe, self.mem
        if stage == "connect":
            return
        # QEMU's order (hw/virtio/vhost-user.c, vhost.c): SET_FEATURES, then
        # FEATURES_OK; memory; every ring; DRIVER_OK last, with the rings
        # enabled before it (blk) or right after it (net).
        required = bit(Feature.VERSION_1) | (bit(Feature.RING_PACKED) if setup.packed else 0)
        fe.negotiate(features_for(self.profile, setup), protocol_features_for(setup),
                     required=required)
        fe.features_ok()
        if stage == "negotiated":
            return
        fe.set_mem_table(mem)
        mem.fill(layout.RAW_RING, layout.RAW_RING_SIZE)
        if stage == "memory":
            return
        self.setup_queues(setup)

    def setup_queues(self, setup: Setup) -> None:
        late = self.profile.enable_after_driver_ok
        for q in range(self.profile.queues):
            self.setup_queue(q, setup, enable=not late)
        self.fe.driver_ok()
        if late:
            for q in range(self.profile.queues):
                self._enable(q)

    def _enable(self, q: int) -> None:
        if self.fe.features & bit(Feature.PROTOCOL_FEATURES):
            self.fe.set_vring_enable(q, True)

    def setup_queue(self, q: int, setup: Setup, base: int | None = None, *,
                    enable: bool = True) -> Virtqueue:
        size = setup.queue_size if q == self.profile.fuzz_queue else 16
        return self.fe.setup_queue(q, size, err=True, base=base, enable=enable,
                                   indirect_entries=16 if setup.indirect else 0)

    def restart_queue(self, q: int, setup: Setup) -> Virtqueue:
        """GET_VRING_BASE, then a fresh ring resuming there: how a driver
        recovers one queue without touching the rest of the device."""
        base = self.fe.stop_queue(q)
        return self.setup_queue(q, setup, base=base)

    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None


def _make_fd(kind: str) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "socket":           # e.g. SET_BACKEND_REQ_FD's channel; our end is dropped
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.close()
        return theirs.detach()
    if kind.startswith("memfd:"):
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, int(kind.split(":", 1)[1]))
        return fd
    raise ValueError(f"unknown fd kind {kind!r}")


def _payload(conn: CaseConnection, payload) -> bytes:
    if isinstance(payload, str):
        return bytes.fromhex(payload)
    if payload.get("template") == "vring_addr":
        base = conn.mem.uva(layout.RAW_RING) if conn.mem and conn.mem.regions else 0
        mask = (1 << 64) - 1
        return VRING_ADDR.pack(payload["index"], payload["flags"], (base + payload["desc"]) & mask,
                               (base + payload["used"]) & mask, (base + payload["avail"]) & mask,
                               payload["log"])
    raise ValueError(f"unknown payload template {payload!r}")


KNOWN_FLAGS = 0x3 | 1 << 2 | NEED_REPLY      # version, REPLY, NEED_REPLY


def _request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return "unknown"


def _length_class(n: int) -> str:
    if n in (0, 1):
        return str(n)
    return "sector" if n % 512 == 0 else "small" if n < 512 else "large"


def _answer(msg) -> str:
    """A reply in words: its request, size, whether its payload is all zero
    (a REPLY_ACK of success) or not, and fds."""
    payload = msg.payload
    zero = "zero" if not any(payload) else "nonzero"
    return (f"{_request_name(msg.request)}:{min(len(payload), 300)}:{zero}"
            + (f":fds{len(msg.fds)}" if msg.fds else ""))


def _acceptance(a: dict, replies: list[str], closed: bool) -> str:
    """What a back-end did with a request it should refuse: "refused" (a
    non-zero REPLY_ACK, a disconnect), "accepted" (a zero ack, a reply, or
    silence without NEED_REPLY), "silent" (no ack although asked)."""
    if closed:
        return "refused"
    if a["request"] in REPLYING:
        return "accepted" if replies else "silent"
    if a["flags"] & NEED_REPLY:
        if not replies:
            return "silent"
        return "accepted" if replies[0].endswith(":8:zero") else "refused"
    return "accepted"


def _readable(sock: socket.socket, wait: float) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


class Executor:
    """Runs the actions of one case on an open CaseConnection."""

    def __init__(self, conn: CaseConnection, *, settle: float):
        self.conn = conn
        self.settle = settle

    def run(self, case: Case) -> Observation:
        obs = Observation()
        vq = self.conn.fe.queues.get(self.conn.profile.fuzz_queue)
        start = self._ring_position(vq)
        self._last = "start"
        self._statuses: dict[int, int] = {}      # id(token) -> gpa of the chain's status byte
        try:
            for action in case.actions:
                getattr(self, "_op_" + action["op"])(action, obs, vq)
                if obs.closed:
                    break
            if vq is not None and not obs.closed:
                self._wait_for_answer(vq, start, obs)
        except BackendClosed:
            obs.closed = True
        except (BrokenPipeError, ConnectionResetError):
            obs.closed = True
        except RingProtocolError as exc:
            # The device wrote a used element no driver could accept.
            obs.notes.append(f"ring protocol error: {exc}")
            obs.events.append("ring-protocol-error")
            obs.answered = True
        if obs.closed:
            obs.events.append(f"closed-after:{self._last}")
        if obs.error_signalled:
            obs.events.append("error-signalled")
        return obs

    # -- observation ------------------------------------------------------------
    def _ring_position(self, vq: Virtqueue | None):
        if vq is None:
            return None
        ring = vq.ring
        return ring.read_desc(0)[3] if ring.packed else ring.read_used_idx()

    def _moved(self, vq: Virtqueue, start) -> bool:
        return self._ring_position(vq) != start

    def _wait_for_answer(self, vq: Virtqueue, start, obs: Observation) -> None:
        """Up to ``settle`` seconds for the case's chains to come back, an
        error to be signalled, or the connection to close."""
        deadline = time.monotonic() + self.settle
        sock = self.conn.fe.conn.sock
        fds = [vq.call_fd, sock] + ([vq.err_fd] if vq.err_fd is not None else [])
        while True:
            if vq.take_errors():
                obs.error_signalled = True
            if obs.chains:
                done = vq.poll()
                obs.completed += len(done)
                self._note_completions(done, obs)
                if obs.completed >= obs.chains:
                    obs.answered = True
                    return
            elif self._moved(vq, start):
                obs.answered = True
                obs.events.append("ring-moved")
                return
            if obs.error_signalled:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready = select.select(fds, [], [], left)[0]
            vq.take_calls()
            if sock in ready:
                self._drain(obs, 0)
                if obs.closed:
                    return

    def _note_completions(self, done, obs: Observation) -> None:
        for used in done:
            words = [f"used-len:{_length_class(used.length)}"]
            gpa = self._statuses.get(id(used.token))
            if gpa is not None:
                try:
                    words.append(f"status:{self.conn.mem.read(gpa, 1)[0]}")
                except GuestMemoryError:
                    pass
            obs.events.append("completed:" + ",".join(words))

    def _drain(self, obs: Observation, wait: float) -> list[str]:
        """Reads whatever the back-end sent; notes a closed connection.
        Returns what came, in words (see _answer)."""
        fe = self.conn.fe
        got: list[str] = []
        while _readable(fe.conn.sock, wait):
            try:
                msg = fe.recv_raw(self.conn.timeout)
            except BackendClosed:
                obs.closed = True
                return got + ["closed"]
            except FrontendError as exc:       # a malformed or partial answer
                obs.notes.append(f"bad answer: {exc}")
                obs.closed = True
                return got + ["bad-answer"]
            got.append(_answer(msg))
            msg.close_fds()
            obs.answered = True
            wait = 0
        return got

    # -- actions ------------------------------------------------------------------
    def _op_msg(self, a: dict, obs: Observation, vq) -> None:
        payload = _payload(self.conn, a["payload"])
        fds = [_make_fd(kind) for kind in a.get("fds", ())]
        try:
            self.conn.fe.send_raw(a["request"], a["flags"], payload, fds, size=a.get("size"))
        finally:
            for fd in fds:
                os.close(fd)
        lacking = self._lacking(a)
        wants_answer = a["request"] in REPLYING or a["flags"] & NEED_REPLY
        # A refusal may be a disconnect: give it time to show.
        replies = self._drain(obs, self.settle if wants_answer or lacking else 0)
        got = "+".join(replies) or "none"
        name = _request_name(a["request"]) + ("/rsv" if a["flags"] & ~KNOWN_FLAGS else "")
        obs.events.append(f"msg:{name}:{got}")
        self._last = name
        if lacking:
            how = _acceptance(a, replies, obs.closed)
            obs.events.append(f"{how}-without:{lacking}:{name}")
            if how == "accepted":
                obs.notes.append(f"{name} accepted without {lacking}")

    def _lacking(self, a: dict) -> str | None:
        """What makes the request one to refuse: reserved header flag bits,
        or a protocol feature it belongs to that was not negotiated."""
        if a["flags"] & ~KNOWN_FLAGS:
            return "reserved-flags"
        needs = NEEDS_PROTOCOL_FEATURE.get(a["request"])
        if needs and not self.conn.fe.protocol_features & bit(ProtocolFeature[needs]):
            return needs
        return None

    def _op_poke(self, a: dict, obs: Observation, vq) -> None:
        try:
            self.conn.mem.write(a["gpa"], bytes.fromhex(a["data"]))
        except GuestMemoryError:
            obs.notes.append(f"poke at {a['gpa']:#x} outside memory: skipped")

    def _op_desc(self, a: dict, obs: Observation, vq) -> None:
        if vq is None:
            return
        ring = vq.ring
        slot = a["slot"] % ring.size
        if ring.packed:
            ring.write_desc(slot, a["addr"], a["len"], a.get("id", 0), a["flags"])
        else:
            ring.write_desc(slot, a["addr"], a["len"], a["flags"], a.get("next", 0))

    def _op_avail(self, a: dict, obs: Observation, vq) -> None:
        if vq is None or vq.ring.packed:
            return
        ring = vq.ring
        for i, head in enumerate(a["heads"]):
            ring.write_avail(ring.avail_idx + i, head)
        ring.set_avail_idx((ring.avail_idx + a.get("advance", len(a["heads"]))) & 0xFFFF)

    def _op_chain(self, a: dict, obs: Observation, vq) -> None:
        if vq is None:
            return
        token = object()
        try:
            vq.add([tuple(b) for b in a["buffers"]], token)
        except (ValueError, RingFull) as exc:
            obs.notes.append(f"chain not added: {exc}")
            obs.events.append("chain-not-added")
            return
        obs.chains += 1
        gpa, length, writable = a["buffers"][-1]
        if writable and length == 1:      # a virtio-blk status byte
            self._statuses[id(token)] = gpa

    def _op_kick(self, a: dict, obs: Observation, vq) -> None:
        if vq is None:
            return
        if obs.chains:
            vq.ring.publish()
        vq.kick()
