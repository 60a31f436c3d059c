"""A blocking client of the control socket, for scripts, vhostuser-ctl and
tests: one request at a time, each method returning the reply's result or
raising :class:`ControlError` with the daemon's error code."""
from __future__ import annotations

import itertools
import json
import socket
from typing import Any
from ..errors import VhostUserError

DEFAULT_TIMEOUT = 60.0      # a remove may wait for requests in flight


class ControlError(VhostUserError):
    """The daemon refused a request; ``code`` is the reply's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlClient:
    """``with ControlClient(path) as c: c.call("list")``"""

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._file = self.sock.makefile("rb")
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send_line(self, line: bytes) -> dict:
        """Sends one raw line (a newline is added) and returns the reply object."""
        self.sock.sendall(line + b"\n")
        reply = self._file.readline()
        if not reply:
            raise ConnectionError("the daemon closed the control connection")
        return json.loads(reply)

    def request(self, cmd: str, args: dict | None = None) -> dict:
        """The whole reply object of one request."""
        rid = next(self._ids)
        body = {"id": rid, "cmd": cmd}
        if args is not None:
            body["args"] = args
        reply = self.send_line(json.dumps(body).encode())
        if reply.get("id") != rid:
            raise ConnectionError(f"reply to request {reply.get('id')!r}, expected {rid}")
        return reply

    def call(self, cmd: str, args: dict | None = None, **kwargs) -> Any:
        """The result of one command; ControlError if it was refused."""
        reply = self.request(cmd, {**(args or {}), **kwargs} if (args or kwargs) else None)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ControlError(err.get("code", "error"), err.get("message", "refused"))
        return reply.get("result")

    # -- the commands, by name ------------------------------------------------------
    def version(self) -> dict:
        return self.call("version")

    def list(self) -> list[dict]:
        return self.call("list")

    def describe(self, name: str) -> dict:
        return self.call("describe", name=name)

    def add(self, spec: dict) -> dict:
        return self.call("add", spec)

    def add_blk(self, name: str, socket_path: str, **settings) -> dict:
        return self.add({"type": "blk", "name": name, "socket_path": socket_path, **settings})

    def add_net(self, name: str, socket_path: str, **settings) -> dict:
        return self.add({"type": "net", "name": name, "socket_path": socket_path, **settings})

    def remove(self, name: str) -> dict:
        return self.call("remove", name=name)

    def stop(self, name: str) -> dict:
        return self.call("stop", name=name)

    def start(self, name: str) -> dict:
        return self.call("start", name=name)

    def resize(self, name: str, size: int | str) -> dict:
        return self.call("resize", name=name, size=size)

    def set_read_only(self, name: str, read_only: bool) -> dict:
        return self.call("set-read-only", name=name, read_only=read_only)

    def set_qos(self, name: str, **limits: int) -> dict:
        return self.call("set-qos", name=name, **limits)

    def stats(self, name: str | None = None) -> dict:
        return self.call("stats", name=name) if name is not None else self.call("stats")

    def metrics(self) -> dict:
        return self.call("metrics")
