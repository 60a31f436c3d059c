"""virtio-blk over vhost-user."""
from .backends import BackendError, BlockBackend, FileBackend, RamBackend
from .device import BlkDevice
from .spec import BlkConfig, BlkFeature, BlkStatus, BlkType

__all__ = ["BackendError", "BlkConfig", "BlkDevice", "BlkFeature", "BlkStatus", "BlkType",
           "BlockBackend", "FileBackend", "RamBackend"]
