"""Python back-ends named ``MODULE:CLASS``: the one way both
``vhostuser-blk --backend`` / ``vhostuser-net --backend`` and the daemon's
``"backend"`` spec key find and build them."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any
from .errors import VhostUserError


class PluginError(VhostUserError, ValueError):
    """The class can't be found or built; the message says why, in one line."""


def load_class(spec: str, base: type) -> type:
    """``MODULE:CLASS`` -> the class, which must subclass ``base``. Like
    ``python -m``, modules in the current directory import too."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise PluginError(f"{spec!r}: want MODULE:CLASS")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"{spec}: {exc}") from None
    except Exception as exc:         # the module itself failed while importing
        raise PluginError(f"{spec}: importing {module_name} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{spec}: not a {public_name(base)} subclass")
    return cls


def public_name(cls: type) -> str:
    """``vhostuser.blk.BlockBackend``, not the module it is defined in."""
    module = cls.__module__
    while "." in module:
        parent = module.rsplit(".", 1)[0]
        if getattr(sys.modules.get(parent), cls.__name__, None) is not cls:
            break
        module = parent
    return f"{module}.{cls.__name__}"


def instantiate(cls: type, spec: str, options: dict[str, Any]) -> Any:
    """``cls(**options)``, with ``-`` in option names read as ``_``."""
    kwargs = {key.replace("-", "_"): value for key, value in options.items()}
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise PluginError(f"{spec}: {type(exc).__name__}: {exc}") from None


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}``."""
    options = {}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise PluginError(f"{kv!r}: want KEY=VALUE")
        options[key] = value
    return options
