"""QoS limits: per-device token buckets enforced in the C data plane.

A limit of 0 means unlimited. A burst is the bucket's size: how far above the
rate a device may go after being idle (0: one second's worth of the rate).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from .errors import VhostUserError


class QosError(VhostUserError, ValueError):
    """A limit that can't be applied (negative, or a burst below the rate)."""


@dataclass(frozen=True)
class QosLimits:
    iops: int = 0          # requests per second
    bps: int = 0           # bytes per second (reads and writes together)
    iops_burst: int = 0    # requests the bucket holds
    bps_burst: int = 0     # bytes the bucket holds

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise QosError(f"{name} must be a non-negative integer, not {value!r}")
        if self.iops_burst and self.iops_burst < 1:
            raise QosError("iops_burst must be at least 1")

    @property
    def unlimited(self) -> bool:
        return self.iops == 0 and self.bps == 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
