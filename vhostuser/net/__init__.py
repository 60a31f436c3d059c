"""virtio-net over vhost-user."""
from .backends import (Frame, FrameBatch, LoopbackBackend, NetBackend, NetBackendError,
                       SinkBackend, StaleFrameError, TapBackend)
from .device import NetDevice
from .spec import NetFeature
from .switch import Switch, SwitchPort, TapUplink, VxlanUplink

__all__ = ["Frame", "FrameBatch", "LoopbackBackend", "NetBackend", "NetBackendError",
           "NetDevice", "NetFeature", "SinkBackend", "StaleFrameError", "Switch", "SwitchPort",
           "TapBackend", "TapUplink", "VxlanUplink"]
