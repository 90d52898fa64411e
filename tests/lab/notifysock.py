"""A stand-in for systemd's notification socket, to test sd_notify senders."""

import os
import select
import socket
import time
from pathlib import Path

__all__ = ["NotifyListener"]


class NotifyListener:
    """A real ``NOTIFY_SOCKET``: a bound AF_UNIX datagram socket, like systemd's.

    :meth:`messages` returns what arrived so far as ``(monotonic time, {key: value})``.
    """

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list = []

    def environ(self, **extra) -> dict:
        return {"NOTIFY_SOCKET": self.path, **extra}

    def poll(self, timeout: float = 0.0) -> list:
        """Read every datagram available within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return self.received
            data = self.sock.recv(65536)
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.received.append((time.monotonic(), fields))

    def wait_for(self, key: str, timeout: float, value=None, alive=None) -> dict:
        """The first message (old or new) holding ``key`` (with ``value``, if given).

        ``alive``: a callable; when it returns false the wait ends at once (the
        sender died), with an AssertionError like a timeout.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            if alive is not None and not alive():
                self.poll(0.1)
                for _, fields in self.received[seen:]:
                    if key in fields and (value is None or fields[key] == value):
                        return fields
                raise AssertionError(f"sender gone before {key}; got {self.received!r}")
            for _, fields in self.received[seen:]:
                if key in fields and (value is None or fields[key] == value):
                    return fields
            seen = len(self.received)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} within {timeout}s; got {self.received!r}")
            self.poll(min(left, 0.2))

    def close(self) -> None:
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
