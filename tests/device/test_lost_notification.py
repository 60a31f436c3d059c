"""A completion published but never signalled must not hang the driver
(issue 14, point 2).

A back-end that dies between publishing a used index and writing the call
eventfd leaves nothing in flight, so nothing would ever signal that ring
again. Every ring is therefore signalled once when it gets a call fd and
when it starts: spurious for a fresh driver, the rescue for a reconnected
one. The fault hook VHOSTUSER_FAULT=exit-before-notify:N (csrc/vu_fault.c)
makes a back-end die at exactly that point.
"""
import os
import select
import subprocess
import sys
import time

import pytest

from vhostuser.blk import BlkDevice, RamBackend
from vhostuser.frontend import BlkClient, Frontend
from vhostuser.frontend.blk import BlkRequest
from vhostuser.frontend.device import DEFAULT_FEATURES
from vhostuser.frontend.memory import GuestMemory
from vhostuser.net import NetDevice, SinkBackend
from vhostuser.protocol import Feature, bit
from vhostuser.testing.server import BackgroundServer

FAULT_EXIT = 86


def signalled(call_fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([call_fd], [], [], timeout)[0])


@pytest.mark.parametrize("kind", ["blk", "net"])
@pytest.mark.parametrize("packed", [False, True])
def test_every_ring_is_signalled_once_it_is_set_up(tmp_path, kind, packed):
    device = BlkDevice(RamBackend(1 << 20)) if kind == "blk" else NetDevice(SinkBackend())
    path = str(tmp_path / "dev.sock")
    try:
        with BackgroundServer(device, path):
            with Frontend.connect(path) as fe:
                if kind == "blk":
                    blk = BlkClient.setup(fe, packed=packed)
                    queues = blk.queues
                else:
                    features = DEFAULT_FEATURES | (bit(Feature.RING_PACKED) if packed else 0)
                    fe.negotiate(features)
                    mem = fe.own(GuestMemory([(0, 4 << 20)], name="net"))
                    fe.set_mem_table(mem)
                    queues = [fe.setup_queue(i, 64, mem=mem) for i in range(2)]
                # Nothing submitted: each ring still gets one interrupt.
                for q in queues:
                    assert signalled(q.call_fd), f"ring {q.index} never signalled"
                    assert q.take_calls() >= 1
    finally:
        device.close()


def test_fault_hook_kills_after_publishing_before_signalling(tmp_path):
    """The hook dies at the promised point: the 3rd completion is in the used
    ring, and its interrupt never came."""
    path = str(tmp_path / "blk.sock")
    env = {**os.environ, "VHOSTUSER_FAULT": "exit-before-notify:3"}
    proc = subprocess.Popen([sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", path,
                             "--ramdisk", "1M"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        with Frontend.connect(path, wait=20) as fe:
            blk = BlkClient.setup(fe, event_idx=False)
            vq = blk.queues[0]
            vq.take_calls()                     # the set-up interrupt
            blk.write(0, b"a" * 512)            # notifications 1 and 2
            blk.write(1, b"b" * 512)
            blk.submit([BlkRequest.write(2, b"c" * 512)])
            assert proc.wait(timeout=20) == FAULT_EXIT, proc.stderr.read().decode()
            # published before the death ...
            deadline = time.monotonic() + 5
            done = []
            while not done and time.monotonic() < deadline:
                done = vq.poll()
            assert [u.token.sector for u in done] == [2]
            # ... and never signalled
            assert not signalled(vq.call_fd, timeout=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
