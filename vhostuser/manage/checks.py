"""Typed argument checks for management requests. JSON has no integer/bool
distinction Python respects (True is an int), so every check is explicit and
raises BadArgument naming the argument."""
from __future__ import annotations

import os
from typing import Any

from .errors import BadArgument

_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def no_unknown_keys(args: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise BadArgument(f"{what}: unknown argument{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))} (known: {', '.join(sorted(allowed))})")


def require(args: dict, key: str, what: str) -> Any:
    if key not in args:
        raise BadArgument(f"{what}: {key!r} is required")
    return args[key]


def as_str(value: Any, key: str, *, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise BadArgument(f"{key!r} must be a string, not {type_name(value)}")
    if not value or len(value) > max_len:
        raise BadArgument(f"{key!r} must be 1..{max_len} characters")
    return value


def as_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise BadArgument(f"{key!r} must be true or false, not {type_name(value)}")
    return value


def as_int(value: Any, key: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadArgument(f"{key!r} must be an integer, not {type_name(value)}")
    if not lo <= value <= hi:
        raise BadArgument(f"{key!r} must be {lo}..{hi}, not {value}")
    return value


def as_size(value: Any, key: str, *, multiple: int = 1) -> int:
    """Bytes from an integer or a string like "64M", "1G", "4096"."""
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        mult = 1
        if text and text[-1] in _SIZE_UNITS:
            mult, text = _SIZE_UNITS[text[-1]], text[:-1]
        if not text.isdigit():
            raise BadArgument(f"{key!r}: bad size {value!r} (e.g. 4096, \"64M\", \"1G\")")
        size = int(text) * mult
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise BadArgument(f"{key!r} must be a size (integer bytes or e.g. \"64M\"), "
                          f"not {type_name(value)}")
    if size <= 0 or size % multiple:
        raise BadArgument(f"{key!r} must be a positive multiple of {multiple} bytes, not {size}")
    return size


def as_abs_path(value: Any, key: str) -> str:
    """Absolute paths only: the daemon's working directory is not the
    caller's, so a relative path would silently mean something else."""
    path = as_str(value, key)
    if not os.path.isabs(path):
        raise BadArgument(f"{key!r} must be an absolute path, not {path!r}")
    if "\0" in path:
        raise BadArgument(f"{key!r} contains a NUL byte")
    return os.path.normpath(path)


def as_dict(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise BadArgument(f"{key!r} must be an object, not {type_name(value)}")
    return value


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
