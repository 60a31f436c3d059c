"""Managing a running back-end daemon: many exports (disks, interfaces) in
one process, added, changed and removed at run time.

* :mod:`.daemon` — :class:`Daemon`, the Python API (on the event loop)
* :mod:`.specs` — checking export specs, building devices, back-end registry
* :mod:`.export` — one export's lifecycle (serve, drain, stop)
* :mod:`.describe` — read-only views: features, queue states, counters
* :mod:`.control` — the control socket (JSON lines), its protocol documented
* :mod:`.client` — :class:`ControlClient`, a blocking client of that socket
* :mod:`.prometheus` — a Prometheus endpoint (needs prometheus-client)
* :mod:`.errors` — why a request was refused, with stable error codes
"""
from .client import ControlClient, ControlError
from .daemon import Daemon
from .errors import ManageError

__all__ = ["ControlClient", "ControlError", "Daemon", "ManageError"]
