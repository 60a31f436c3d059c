"""Read-only views of a device and its front-end session, as JSON-ready
dicts: feature names, device status, queue states, counters.

Everything here runs on the event loop thread, the thread that creates and
tears down sessions, so a session seen here is not freed halfway through.
"""
from __future__ import annotations

import enum
import os

from ..blk import BlkDevice, BlkFeature, FileBackend, RamBackend
from ..blk.device import LATENCY_BOUNDS_US
from ..device import Device
from ..net import NetDevice, NetFeature
from ..net.spec import format_mac
from ..protocol import DeviceStatus, Feature, ProtocolFeature, bit


def bit_names(value: int, *enums: type[enum.IntEnum]) -> list[str]:
    """Names of the set bits, from the first enum that knows each; others
    as "bit N"."""
    names = []
    for n in range(64):
        if value & (1 << n):
            for e in enums:
                try:
                    names.append(e(n).name)
                    break
                except ValueError:
                    continue
            else:
                names.append(f"bit {n}")
    return names


def _feature_enums(device: Device) -> tuple[type[enum.IntEnum], ...]:
    if isinstance(device, BlkDevice):
        return (BlkFeature, Feature)
    if isinstance(device, NetDevice):
        return (NetFeature, Feature)
    return (Feature,)


def _bits(value: int | None, enums) -> dict | None:
    if value is None:
        return None
    return {"bits": f"{value:#x}", "names": bit_names(value, *enums)}


def live_session(device: Device):
    session = device.session
    if session is None or session.closed:
        return None
    return session


def features(device: Device) -> dict:
    """Offered and (when a front-end is connected) negotiated features."""
    enums = _feature_enums(device)
    session = live_session(device)
    offered = device.features() | bit(Feature.PROTOCOL_FEATURES)
    negotiated = session.features if session is not None and session.features_set else None
    proto_negotiated = session.protocol_features if session is not None else None
    status = session.status if session is not None else None
    return {
        "features": {"offered": _bits(offered, enums), "negotiated": _bits(negotiated, enums)},
        "protocol_features": {"offered": _bits(device.protocol_features(), (ProtocolFeature,)),
                              "negotiated": _bits(proto_negotiated, (ProtocolFeature,))},
        "status": None if status is None else {
            "value": status, "names": bit_names(status, DeviceStatus)},
    }


def queue_states(device: Device) -> list[dict]:
    """One entry per virtqueue of the connected session (empty without one)."""
    session = live_session(device)
    if session is None:
        return []
    out = []
    for q in session.dataplane.queues:
        s = q.stats()
        out.append({
            "index": q.index, "started": q.started, "enabled": q.enabled, "size": q.size,
            "packed": q.packed, "last_avail_idx": q.last_avail_idx, "used_idx": q.used_idx,
            "inflight": s.inflight, "broken": q.broken, "error": q.error,
            "popped": s.popped, "pushed": s.pushed, "notifies": s.notifies, "kicks": s.kicks,
        })
    return out


def device_settings(device: Device) -> dict:
    """What the device is now (these change at run time, unlike the spec)."""
    if isinstance(device, BlkDevice):
        backend = device.backend
        return {
            "capacity_sectors": device.capacity, "size": device.capacity * 512,
            "read_only": device.read_only, "queues": device.num_queues,
            "qos": device.qos.as_dict(), "aio": device.aio,
            "aio_requested": device.aio_requested, "aio_note": device.aio_note,
            "sync_error": os.strerror(device.sync_error) if device.sync_error else None,
            "backend": ("file" if isinstance(backend, FileBackend)
                        else "ramdisk" if isinstance(backend, RamBackend)
                        else type(backend).__name__),
        }
    if isinstance(device, NetDevice):
        return {"mac": format_mac(device.mac), "mtu": device.mtu,
                "queues": device.queue_pairs, "in_order": device.in_order}
    return {"queues": device.num_queues}


def counters(device: Device) -> dict:
    """Totals and per-queue counters (blk: per queue, with the latency
    histogram; net: per queue pair)."""
    stats = getattr(device, "stats", None)
    metrics = getattr(device, "metrics", None)
    return {"totals": stats() if stats else {}, "queues": metrics() if metrics else []}


def latency_bounds_us() -> list[int | None]:
    """The histogram's bucket bounds, JSON-safe: None stands for infinity."""
    return [None if b == float("inf") else int(b) for b in LATENCY_BOUNDS_US]
