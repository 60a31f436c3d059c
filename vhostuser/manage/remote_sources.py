"""Disks on network storage as daemon exports: ``"nbd": URI`` (libnbd) and
``"rbd": "POOL/IMAGE"`` (librbd). Their libraries load only when such an
export is opened."""
from __future__ import annotations

from typing import Any

from . import checks
from .errors import BadArgument
from .specs import Source, register_blk_source

#: longest a remote request may wait (reconnects included) before IOERR
MAX_REMOTE_TIMEOUT = 3600.0


def _remote_timeout(v: Any, spec: dict) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_REMOTE_TIMEOUT:
        raise BadArgument(f"'remote_timeout' must be 0..{MAX_REMOTE_TIMEOUT:g} seconds "
                          f"(0: wait forever), not {v!r}")
    return float(v)


def _check_nbd(v: Any, spec: dict) -> str:
    uri = checks.as_str(v, "nbd")
    if not uri.startswith(("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")):
        raise BadArgument(f"'nbd' must be an NBD URI (nbd://HOST[:PORT]/EXPORT or "
                          f"nbd+unix:///EXPORT?socket=PATH), not {uri!r}")
    return uri


def _open_nbd(uri: str, settings: dict):
    from ..blk.nbd import NbdBackend
    return NbdBackend(uri, read_only=settings["read_only"],
                      timeout=settings["remote_timeout"] or None,
                      connections=settings["nbd_connections"])


def _check_rbd(v: Any, spec: dict) -> str:
    name = checks.as_str(v, "rbd", max_len=1024)
    parts = name.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise BadArgument(f"'rbd' must be POOL/IMAGE or POOL/NAMESPACE/IMAGE, not {name!r}")
    return name


def _open_rbd(name: str, settings: dict):
    from ..blk.rbd import RbdBackend
    return RbdBackend.from_spec(name, conf=settings["rbd_conf"], client_id=settings["rbd_id"],
                                read_only=settings["read_only"],
                                timeout=settings["remote_timeout"] or None)


def _optional_path(key: str):
    return lambda v, spec: None if v is None else checks.as_abs_path(v, key)


register_blk_source(Source("nbd", _check_nbd, _open_nbd, options={
    "remote_timeout": (_remote_timeout, 30.0),
    "nbd_connections": (lambda v, spec: checks.as_int(v, "nbd_connections", 1, 16), 1),
}, blocking=True))
register_blk_source(Source("rbd", _check_rbd, _open_rbd, options={
    "remote_timeout": (_remote_timeout, 30.0),
    "rbd_conf": (_optional_path("rbd_conf"), None),
    "rbd_id": (lambda v, spec: checks.as_str(v, "rbd_id", max_len=256), "admin"),
}, blocking=True))
