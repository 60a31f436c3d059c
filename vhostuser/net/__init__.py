"""virtio-net over vhost-user."""
from .backends import (Frame, LoopbackBackend, NetBackend, NetBackendError, SinkBackend,
                       TapBackend)
from .device import NetDevice
from .spec import NetFeature
from .switch import Switch, SwitchPort, TapUplink, VxlanUplink

__all__ = ["Frame", "LoopbackBackend", "NetBackend", "NetBackendError", "NetDevice",
           "NetFeature", "SinkBackend", "Switch", "SwitchPort", "TapBackend", "TapUplink",
           "VxlanUplink"]
