"""Reproducer files: a case, the verdict it gave, and how to run it again.

    {"tool": "vhostuser-fuzz", "format": 1, "verdict": {...}, "case": {...},
     "original": {...} | null, "command": "..."}

``vhostuser-fuzz --replay FILE`` runs ``case`` again against a socket.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .case import FORMAT_VERSION, Case, Outcome
from ..errors import VhostUserError


class ReproducerError(VhostUserError, ValueError):
    """Not a reproducer file this version can read."""


@dataclass
class Reproducer:
    case: Case
    outcome: Outcome
    original: Case | None = None
    command: str = ""

    def to_json(self) -> dict:
        return {"tool": "vhostuser-fuzz", "format": FORMAT_VERSION,
                "verdict": self.outcome.to_json(), "case": self.case.to_json(),
                "original": self.original.to_json() if self.original else None,
                "command": self.command}

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str) -> "Reproducer":
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ReproducerError(f"{path}: not JSON: {exc}") from None
        if data.get("tool") != "vhostuser-fuzz" or data.get("format") != FORMAT_VERSION:
            raise ReproducerError(f"{path}: not a vhostuser-fuzz reproducer (format {FORMAT_VERSION})")
        try:
            return cls(Case.from_json(data["case"]), Outcome.from_json(data["verdict"]),
                       Case.from_json(data["original"]) if data.get("original") else None,
                       data.get("command", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReproducerError(f"{path}: malformed: {exc}") from None
