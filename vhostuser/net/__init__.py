"""virtio-net over vhost-user."""
from .backends import Frame, NetBackend, NetBackendError, TapBackend
from .device import NetDevice
from .spec import NetFeature
from .switch import Switch, SwitchPort, TapUplink, VxlanUplink

__all__ = ["Frame", "NetBackend", "NetBackendError", "NetDevice", "NetFeature", "Switch",
           "SwitchPort", "TapBackend", "TapUplink", "VxlanUplink"]
