"""A network back-end that drops every frame the guest sends: the Python
transmit path with nothing behind it, e.g. as a fuzzing target
(FUZZING.md)::

    vhostuser-net --socket-path /tmp/net.sock --backend examples.null_net:NullNet
"""
from __future__ import annotations

from vhostuser.net import NetBackend


class NullNet(NetBackend):
    def __init__(self):
        super().__init__()
        self.frames = 0

    def transmit(self, queue_pair: int, frames) -> None:
        self.frames += len(frames)
