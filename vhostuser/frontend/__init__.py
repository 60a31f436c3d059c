"""A vhost-user front-end (the driver side) in pure Python, without a VM.

Talks to any vhost-user back-end over its unix socket: for tests, benchmarks
and fuzzing. Guest memory is memfd regions mapped here; rings are written
into it as a driver would. Needs neither QEMU nor vhostuser's C module.

    with Frontend.connect(path) as fe:
        blk = BlkClient.setup(fe, queues=1, packed=False)
        blk.write(0, b"x" * 512)
        assert blk.read(0, 512) == b"x" * 512
"""
from .blk import BlkClient, BlkConfig, BlkError, BlkRequest, BlkStatus, BlkType
from ..message import Message
from .connection import (BackendClosed, FrontendConnection, FrontendError, FrontendTimeout,
                         ReplyError)
from .device import DEFAULT_FEATURES, DEFAULT_PROTOCOL_FEATURES, FeatureError, Frontend
from .memory import GuestMemory, GuestMemoryError, Region
from .packed import PackedRing
from .split import SplitRing
from .virtqueue import Buffer, RingFull, RingProtocolError, Used, Virtqueue

__all__ = [
    "BackendClosed", "BlkClient", "BlkConfig", "BlkError", "BlkRequest", "BlkStatus", "BlkType",
    "Buffer", "FrontendConnection", "DEFAULT_FEATURES", "DEFAULT_PROTOCOL_FEATURES", "FeatureError",
    "Frontend", "FrontendError", "FrontendTimeout", "GuestMemory", "GuestMemoryError", "Message",
    "PackedRing", "Region", "ReplyError", "RingFull", "RingProtocolError", "SplitRing", "Used",
    "Virtqueue",
]
