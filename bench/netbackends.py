"""Python network back-ends for the net benchmark (bench/net.py).

    python -m vhostuser.cli.net --socket-path S --backend bench.netbackends:Sink
    python -m vhostuser.cli.net --socket-path S --backend bench.netbackends:Echo [--poll 1000]

Both are as small as a Python back-end gets, so what the benchmark measures
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
    io forwarding does), on the same queue pair. A frame that finds no
    receive buffer is dropped and counted in ``dropped``."""

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def transmit(self, queue_pair, frames):
        device = self.device
        if device is None:
            return
        inject = device.inject
        for f in frames:
            views = f.views
            if not inject(views[0].tobytes() if len(views) == 1 else f.tobytes(), queue_pair):
                self.dropped += 1
