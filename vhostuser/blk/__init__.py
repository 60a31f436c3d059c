"""virtio-blk over vhost-user.

The wire constants (``vhostuser.blk.spec``) import without the C data plane,
so the driver side (``vhostuser.frontend``) can use them; the device and
back-ends load it on first use.
"""
from .spec import BlkConfig, BlkFeature, BlkStatus, BlkType

_LAZY = {
    "BackendError": "backends", "BlockBackend": "backends", "FileBackend": "backends",
    "RamBackend": "backends", "Unsupported": "backends", "BlkDevice": "device",
}

__all__ = ["BackendError", "BlkConfig", "BlkDevice", "BlkFeature", "BlkStatus", "BlkType",
           "BlockBackend", "FileBackend", "RamBackend", "Unsupported"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
