"""virtio-net over vhost-user."""
from .backends import Frame, NetBackend, NetBackendError, TapBackend
from .device import NetDevice
from .spec import NetFeature

__all__ = ["Frame", "NetBackend", "NetBackendError", "NetDevice", "NetFeature", "TapBackend"]
