"""systemd readiness, status and watchdog notifications (sd_notify).

Wraps the ``sdnotify`` package behind the few calls the daemon needs. Under a
``Type=notify`` unit systemd sets ``NOTIFY_SOCKET`` (and, with ``WatchdogSec=``,
``WATCHDOG_USEC``/``WATCHDOG_PID``); anywhere else -- a terminal, a container
without systemd, the tests -- the variable is unset and every call here is a
silent no-op, so the daemon never has to ask whether it runs under systemd.

Thread safety: one :class:`Notifier` may be shared by all of the daemon's
threads; sends are serialised by a lock.
"""

import logging
import os
import socket
import threading
import time
from typing import Mapping, Optional

import sdnotify

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class _Socket(sdnotify.SystemdNotifier):
    """``sdnotify``'s sender, connected to an address we choose.

    ``sdnotify.SystemdNotifier`` reads ``NOTIFY_SOCKET`` from the process
    environment itself; :class:`Notifier` takes the environment as an argument
    (the tests pass their own), so this subclass only replaces the connection
    step and runs in ``debug`` mode, which makes ``notify()`` raise instead of
    swallowing errors: :class:`Notifier` decides what to do with them.
    """

    def __init__(self, address: str):  # replaces, does not call, the parent __init__
        self.debug = True
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.socket.connect(address)
        except OSError:
            self.socket.close()
            raise
        # A listener that stopped reading (its queue holds a few datagrams)
        # must not block the daemon, least of all its graceful stop: a full
        # queue fails the send instead, and the notification is dropped.
        self.socket.setblocking(False)

    def close(self) -> None:
        self.socket.close()


def _watchdog_interval(environ: Mapping[str, str]) -> Optional[float]:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``.

    ``None`` when systemd asked for no watchdog, when the value is not a
    positive integer, or when ``WATCHDOG_PID`` names another process (the
    variables were inherited by a child that is not the service's main process).
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1e6


def _one_line(text: str) -> str:
    """A STATUS= value: one line, newlines and carriage returns become spaces."""
    return " ".join(str(text).splitlines()).strip()


class Notifier:
    """Tells systemd about the daemon's life: ready, status, watchdog, stopping.

    None of the methods ever raises. A notification is advice to the service
    manager; losing one is harmless (at worst systemd's own timeouts apply),
    whereas an exception from, say, the watchdog thread or the SIGTERM path
    would take down a daemon that is otherwise working -- and the socket *can*
    go away under a running daemon (``systemctl daemon-reexec`` re-creates it,
    a test closes its end). So a failed send is retried once on a fresh
    connection, then logged (the first failure as a warning, later ones at
    debug level) and dropped.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ):
        self._address = environ.get("NOTIFY_SOCKET") or None
        #: True when systemd (or a test) listens on ``NOTIFY_SOCKET``.
        self.enabled: bool = self._address is not None
        #: Seconds between ``WATCHDOG=1`` pings, or ``None``: no watchdog wanted.
        self.watchdog_interval: Optional[float] = (
            _watchdog_interval(environ) if self.enabled else None
        )
        self._lock = threading.Lock()
        self._sock: Optional[_Socket] = None
        self._warned = False

    def ready(self, status: str) -> None:
        """The daemon can do its work: ``READY=1`` with a STATUS line."""
        self._send("READY=1", "STATUS=" + _one_line(status))

    def reloading(self, status: str) -> None:
        """A reload began: ``RELOADING=1`` (``ready()`` ends it), with the monotonic
        time systemd >= 253 asks for, and a STATUS line."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=" + _one_line(status))

    def status(self, text: str) -> None:
        """Replace the one-line STATUS shown by ``systemctl status``."""
        self._send("STATUS=" + _one_line(text))

    def watchdog(self) -> None:
        """Tell the watchdog the daemon is healthy (``WATCHDOG=1``)."""
        self._send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        """A graceful stop began: ``STOPPING=1`` with a STATUS line."""
        self._send("STOPPING=1", "STATUS=" + _one_line(status))

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before systemd's start/stop timeout fires."""
        try:
            usec = max(0, int(seconds * 1e6))
        except (TypeError, ValueError, OverflowError):
            return
        self._send(f"EXTEND_TIMEOUT_USEC={usec}")

    def close(self) -> None:
        """Close the socket (optional; a later call reconnects)."""
        with self._lock:
            self._drop()

    def _send(self, *assignments: str) -> None:
        if not self.enabled:
            return
        # systemd reads the datagram as UTF-8; sdnotify encodes as Latin-1, so
        # hand it the UTF-8 bytes spelled as Latin-1 characters.
        message = "\n".join(assignments).encode("utf-8", "replace").decode("latin-1")
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._sock = _Socket(self._address)
                    self._sock.notify(message)
                    return
                except Exception as exc:  # never let a notification kill the daemon
                    self._drop()
                    if attempt == 2:
                        self._report(exc, message)

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _report(self, exc: Exception, message: str) -> None:
        what = message.split("\n", 1)[0]
        if self._warned:
            log.debug("sd_notify %s to %s failed: %s", what, self._address, exc)
        else:
            self._warned = True
            log.warning("sd_notify %s to %s failed (further failures logged at debug): %s",
                        what, self._address, exc)
