import os
import sys

import pytest



@pytest.fixture
def blk_spawn():
    """--spawn command line for our blk back-end (a process: a crash can't take pytest down)."""
    return (f"{sys.executable} -m vhostuser.cli.blk --socket-path {{socket}} --ramdisk 16M "
            f"--num-queues 2")
