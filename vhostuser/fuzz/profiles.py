"""What "a well-formed request" means per device type, for the oracle.

A profile names the virtio features to ask for, the queues to set up,
which queue cases fuzz, which one (untouched by cases) shows whether the
rest of the device still works, and the probe: one request that must
complete with success on a healthy device.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

from ..frontend import FrontendTimeout, GuestMemory, Virtqueue
from ..frontend.blk import BLK_FEATURES, OUTHDR, BlkStatus, BlkType
from ..frontend.connection import FrontendError
from ..protocol import bits


class ProbeFailed(FrontendError):
    """A well-formed request did not complete, or completed with an error."""


def _wait_for(vq: Virtqueue, token: object, timeout: float) -> int:
    """Waits for the chain added with ``token``; returns its used length.
    Completions of other chains (a case's) are dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProbeFailed(f"queue {vq.index}: probe not completed in {timeout}s")
        try:
            done = vq.wait(1, left)
        except FrontendTimeout:
            raise ProbeFailed(f"queue {vq.index}: probe not completed in {timeout}s") from None
        for used in done:
            if used.token is token:
                return used.length


def probe_blk(vq: Virtqueue, mem: GuestMemory, timeout: float) -> None:
    token = object()
    with mem.scratch():
        hdr = mem.alloc(OUTHDR.size, 16)
        mem.write(hdr, OUTHDR.pack(BlkType.IN, 0, 0))
        data = mem.alloc(512, 512)
        status = mem.alloc(1, 1)
        mem.write(status, b"\xff")
        vq.add([(hdr, OUTHDR.size, False), (data, 512, True), (status, 1, True)], token)
        vq.notify()
        vq.kick()   # whatever the suppression state says: extra kicks are harmless
        _wait_for(vq, token, timeout)
        got = mem.read(status, 1)[0]
    if got != BlkStatus.OK:
        raise ProbeFailed(f"queue {vq.index}: read of sector 0 completed with status {got}")


def probe_net(vq: Virtqueue, mem: GuestMemory, timeout: float) -> None:
    token = object()
    with mem.scratch():
        hdr = mem.alloc(12, 16)
        mem.write(hdr, bytes(12))
        frame = mem.alloc(60, 16)
        mem.write(frame, b"\xff" * 6 + bytes.fromhex("525400000001") + b"\x08\x00" + bytes(46))
        vq.add([(hdr, 12, False), (frame, 60, False)], token)
        vq.notify()
        vq.kick()
        _wait_for(vq, token, timeout)


def probe_echo(vq: Virtqueue, mem: GuestMemory, timeout: float) -> None:
    token = object()
    with mem.scratch():
        src = mem.alloc(16, 16)
        mem.write(src, b"vhostuser-probe!")
        dst = mem.alloc(16, 16)
        mem.fill(dst, 16)
        vq.add([(src, 16, False), (dst, 16, True)], token)
        vq.notify()
        vq.kick()
        _wait_for(vq, token, timeout)
        got = mem.read(dst, 16)
    if got != b"vhostuser-probe!":
        raise ProbeFailed(f"queue {vq.index}: echo came back as {got!r}")


@dataclass(frozen=True)
class Profile:
    name: str
    device_features: int
    queues: int                 # queues set up on every connection
    fuzz_queue: int             # where cases put their chains
    neighbour: int | None       # a queue no case touches
    probe: Callable[[Virtqueue, GuestMemory, float], None]
    # QEMU's vhost-net enables rings after DRIVER_OK, vhost-user-blk before.
    enable_after_driver_ok: bool = False
    # Rings per unit of GET_QUEUE_NUM's answer (net counts queue pairs).
    rings_per_queue: int = 1


# virtio-net: MAC (5), STATUS (16); the header is 12 bytes with VERSION_1.
NET_FEATURES = bits(5, 16)

PROFILES = {
    "blk": Profile("blk", BLK_FEATURES, 2, 0, 1, probe_blk),
    # rx 0, tx 1: cases transmit; no second pair to compare with.
    "net": Profile("net", NET_FEATURES, 2, 1, None, probe_net, enable_after_driver_ok=True,
                   rings_per_queue=2),
    "echo": Profile("echo", 0, 2, 0, 1, probe_echo),
}


def get(name: str, queues: int | None = None) -> Profile:
    """The named profile, optionally with fewer queues (a back-end with one
    queue has no neighbour to compare with)."""
    p = PROFILES[name]
    if queues is None or queues == p.queues:
        return p
    if queues < 1:
        raise ValueError("queues must be at least 1")
    neighbour = p.neighbour if p.neighbour is not None and p.neighbour < queues else None
    if p.fuzz_queue >= queues:
        raise ValueError(f"profile {name} fuzzes queue {p.fuzz_queue}: needs {p.fuzz_queue + 1} queues")
    return dataclasses.replace(p, queues=queues, neighbour=neighbour)
