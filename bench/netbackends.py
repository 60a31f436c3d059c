"""Python network back-ends for the net benchmark (bench/net.py).

    python -m vhostuser.cli.net --socket-path S --backend bench.netbackends:Sink
    python -m vhostuser.cli.net --socket-path S --backend bench.netbackends:Echo [--poll 1000]

All are as small as a Python back-end gets, so what the benchmark measures
is vhostuser's path to and from Python, not the back-end's own work.
"""
from __future__ import annotations

from vhostuser.net import NetBackend


class Sink(NetBackend):
    """Drops every frame the front-end transmits."""

    def transmit(self, queue_pair, frames):
        pass


class Echo(NetBackend):
    """Sends every frame back to the front-end unchanged (as DPDK testpmd's
    io forwarding does), on the same queue pair, through the batch path:
    the whole batch in one inject_many call (one flush, one notification;
    each frame copied once, from its transmit buffer to a receive buffer).
    Frames that find no receive buffer are dropped and counted in
    ``dropped``."""

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def transmit(self, queue_pair, frames):
        self.dropped += len(frames) - self.inject_many(frames, queue_pair)


class EchoCopy(NetBackend):
    """Echo through Python bytes: each frame copied into a bytes object (as
    a back-end that looks at or changes the data does), the batch handed
    back with one inject_many."""

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def transmit(self, queue_pair, frames):
        out = [f.tobytes() for f in frames]
        self.dropped += len(out) - self.inject_many(out, queue_pair)


class EchoEach(NetBackend):
    """Echo the way it had to be done before inject_many: one inject (a
    lock, a flush and a notification) per frame, from a copy in Python."""

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def transmit(self, queue_pair, frames):
        inject = self.inject
        for f in frames:
            if not inject(f.tobytes(), queue_pair):
                self.dropped += 1
