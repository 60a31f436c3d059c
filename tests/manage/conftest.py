"""A real vhostuser-daemon process per test, managed over its control
socket with vhostuser-ctl (a process too) and the Python client."""
import contextlib
import os
import socket

import pytest

from vhostuser import protocol
from vhostuser.frontend import BlkClient, Frontend
from vhostuser.frontend.device import DEFAULT_PROTOCOL_FEATURES
from vhostuser.protocol import ProtocolFeature, Request, bit

MIB = 1 << 20


@pytest.fixture
def image(workdir):
    path = os.path.join(workdir, "disk.img")
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
    return path


@contextlib.contextmanager
def blk_frontend(path: str, *, backend_channel: bool = False, **setup):
    """A connected BlkClient; with backend_channel, also the front-end's end
    of the back-end channel (SET_BACKEND_REQ_FD), as QEMU sets it up."""
    fe = Frontend.connect(path, wait=5)
    channel = None
    try:
        if backend_channel:
            setup["protocol_features"] = DEFAULT_PROTOCOL_FEATURES | bit(ProtocolFeature.BACKEND_REQ)
        blk = BlkClient.setup(fe, **setup)
        if backend_channel:
            channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fe.request(Request.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
            theirs.close()
            channel.settimeout(10)
        yield (blk, channel) if backend_channel else blk
    finally:
        if channel is not None:
            channel.close()
        fe.close()


def answer_config_change(channel: socket.socket) -> None:
    """Reads the back-end's CONFIG_CHANGE_MSG and acks it as QEMU does."""
    request, flags, size = protocol.HEADER.unpack(channel.recv(protocol.HEADER_SIZE,
                                                               socket.MSG_WAITALL))
    assert request == protocol.BackendRequest.CONFIG_CHANGE_MSG
    if size:
        channel.recv(size, socket.MSG_WAITALL)
    if flags & protocol.FLAG_NEED_REPLY:
        channel.sendall(protocol.pack_header(request, protocol.VERSION | protocol.FLAG_REPLY, 8)
                        + protocol.U64.pack(0))
