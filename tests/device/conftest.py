"""Our devices served in-process, driven by the library's own front-end."""
import contextlib

import pytest

from vhostuser.frontend import BlkClient, Frontend
from vhostuser.testing.server import BackgroundServer


@pytest.fixture
def serve(tmp_path):
    """serve(device) -> context manager yielding (server, frontend)."""
    @contextlib.contextmanager
    def run(device, name="dev.sock"):
        path = str(tmp_path / name)
        with BackgroundServer(device, path) as srv:
            with Frontend.connect(path) as fe:
                yield srv, fe
        close = getattr(device, "close", None)
        if close:
            close()
    return run


@pytest.fixture
def blk_client(serve):
    """blk_client(device, **setup) -> context manager yielding (server, BlkClient)."""
    @contextlib.contextmanager
    def run(device, **setup):
        with serve(device) as (srv, fe):
            yield srv, BlkClient.setup(fe, **setup)
    return run
