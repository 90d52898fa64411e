"""A TCP proxy in front of redis-server that loses one reply on purpose.

Issue 28: every command the daemon's retry policy may re-send must be harmless
twice. The dangerous moment is a command Redis has executed whose reply never
reached the client: the retry sends it again, and the gateway may have
written in between. ``lose_reply`` sets that moment up exactly: the chosen
command is forwarded, and when Redis's reply to it comes back the proxy runs
``between`` (the gateway's writes, on a connection of its own), then closes
both sides of that connection instead of forwarding the reply. Once; after
that the proxy is a plain pipe.

Both directions are read with ``hiredis.Reader`` to pair each reply with
its command (Redis answers in order). The bytes go through untouched; a
reply is lost together with whatever else Redis sent in the same read (for
a pipeline, replies the client would have thrown away with the connection
anyway). A connection that subscribes is piped without pairing.
"""

import collections
import socket
import threading
from typing import Callable, Deque, List, NamedTuple, Optional

import hiredis

SUBSCRIBING = {"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"}


class Command(NamedTuple):
    name: str          # upper case
    args: List[str]    # decoded with surrogateescape, like the daemon's strings

    @property
    def keys(self) -> List[str]:
        """The keys a script declares (EVAL, EVALSHA); every argument for other commands."""
        if self.name in ("EVAL", "EVALSHA") and len(self.args) >= 2 and self.args[1].isdigit():
            return self.args[2:2 + int(self.args[1])]
        return self.args


def _command(parts) -> Optional[Command]:
    if not isinstance(parts, list) or not parts or not all(isinstance(p, bytes) for p in parts):
        return None
    words = [p.decode("utf-8", "surrogateescape") for p in parts]
    return Command(words[0].upper(), words[1:])


class _Connection:
    def __init__(self):
        self.expected: Deque[bool] = collections.deque()  # per command sent: is its reply the one to lose?
        self.piped = False   # subscribed: pushes, not replies; no pairing


class FaultProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self.upstream = (host, upstream_port)
        self.sock = socket.create_server((host, 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://{host}:{self.port}"
        self.lost: Optional[Command] = None      # the command whose reply was lost, once it was
        self.fired = threading.Event()
        self.error: Optional[Exception] = None   # raised by ``between``
        self._lock = threading.Lock()
        self._match: Optional[Callable[[Command], bool]] = None
        self._between: Optional[Callable[[Command], None]] = None
        self._countdown = 0
        self._doomed: Optional[Command] = None
        self._closing = threading.Event()
        self._sockets: List[socket.socket] = []
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()

    def lose_reply(self, match: Callable[[Command], bool], nth: int = 1,
                   between: Optional[Callable[[Command], None]] = None) -> None:
        """Lose the reply to the ``nth`` command ``match`` accepts, running ``between`` first."""
        with self._lock:
            self._match, self._between, self._countdown = match, between, nth
            self._doomed, self.lost, self.error = None, None, None
            self.fired.clear()

    def disarm(self) -> None:
        with self._lock:
            self._match = self._between = None

    def close(self) -> None:
        self._closing.set()
        self.sock.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            _close(s)

    # ---- the pipe ------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets = [s for s in self._sockets if s.fileno() != -1] + [client, upstream]
            state = _Connection()
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._replies, args=(client, upstream, state), daemon=True).start()

    def _doom(self, command: Optional[Command]) -> bool:
        with self._lock:
            if command is None or self._match is None or self._doomed is not None or not self._match(command):
                return False
            self._countdown -= 1
            if self._countdown > 0:
                return False
            self._doomed = command
            return True

    def _requests(self, client: socket.socket, upstream: socket.socket, state: _Connection) -> None:
        reader = hiredis.Reader()
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if not state.piped:
                    reader.feed(data)
                    while True:
                        parts = reader.gets()
                        if parts is False:
                            break
                        command = _command(parts)
                        # Queued before the bytes go on: the reply cannot come first.
                        state.expected.append(self._doom(command))
                        if command is not None and command.name in SUBSCRIBING:
                            state.piped = True
                            break
                upstream.sendall(data)
        except (OSError, hiredis.ProtocolError):
            pass
        _close(client)
        _close(upstream)

    def _replies(self, client: socket.socket, upstream: socket.socket, state: _Connection) -> None:
        reader = hiredis.Reader()
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                losing = False
                if not state.piped:
                    reader.feed(data)
                    while reader.gets() is not False:
                        if state.expected and state.expected.popleft():
                            losing = True
                if losing:
                    self._lose()
                    break
                client.sendall(data)
        except (OSError, hiredis.ProtocolError):
            pass
        _close(client)
        _close(upstream)

    def _lose(self) -> None:
        with self._lock:
            command, between = self._doomed, self._between
        try:
            if between is not None:
                between(command)  # Redis has run the command; its client has not heard back
        except Exception as exc:  # for the test to see, not a dead thread and a hung client
            self.error = exc
        with self._lock:
            self.lost = command
            self._match = self._between = None
        self.fired.set()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
