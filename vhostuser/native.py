"""The compiled data plane (``vhostuser._native``) and its error mapping."""
from __future__ import annotations

import logging
import os

from . import errors

try:
    from ._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "vhostuser's C data plane is not built: install the package with "
        "`pip install .` (or `pip install -e .`)") from exc

_MEMORY_CODES = {lib.VU_ERR_MMAP, lib.VU_ERR_REGION_OVERLAP, lib.VU_ERR_TOO_MANY_REGIONS,
                 lib.VU_ERR_REGION_NOT_FOUND, lib.VU_ERR_REGION_BEYOND_FD}
_ADDRESS_CODES = {lib.VU_ERR_ADDR_UNMAPPED, lib.VU_ERR_RING_UNMAPPED}


def strerror(code: int) -> str:
    return ffi.string(lib.vu_strerror(-abs(code))).decode()


def error_name(code: int) -> str:
    """The C enum name of an error code, e.g. ``VU_ERR_CHAIN_LOOP``."""
    code = abs(code)
    for name in dir(lib):
        if name.startswith("VU_ERR_") and getattr(lib, name) == code:
            return name
    return f"VU_ERR_{code}"


def error_for(code: int, context: str = "") -> errors.NativeError:
    code = abs(code)
    if code in _MEMORY_CODES:
        cls = errors.MemoryMapError
    elif code in _ADDRESS_CODES:
        cls = errors.AddressError
    else:
        cls = errors.QueueError
    return cls(code, strerror(code), context)


def check(rc: int, context: str = "") -> int:
    """Raises the exception for a negative C return code; returns rc otherwise."""
    if rc < 0:
        raise error_for(rc, context)
    return rc


# Names for log lines about C devices, keyed by their vu_dev address.
device_names: dict[int, str] = {}
_log = logging.getLogger("vhostuser.queue")


@ffi.def_extern()
def vu_on_queue_broken(dev, index, err, detail):
    name = device_names.get(int(ffi.cast("uintptr_t", dev)), "device")
    _log.error("%s: queue %d broken: %s (%s, value %#x); it stays stopped until the device "
               "is reset", name, index, error_name(err), strerror(err), detail)


@ffi.def_extern()
def vu_on_uring_failed(dev, index, err):
    name = device_names.get(int(ffi.cast("uintptr_t", dev)), "device")
    _log.error("%s: queue %d: io_uring_enter failed (%s); the queue's I/O is done "
               "synchronously from now on", name, index, os.strerror(err))
