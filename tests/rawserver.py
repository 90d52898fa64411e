"""A raw TCP server on a free loopback port, for backends that break HTTP on purpose.

Each connection goes to ``handle(conn, stopping)`` in a thread of its own and is
closed afterwards; an ``OSError`` there (the client gave up first: a cap, a
deadline, a framing error) ends only that connection. Used by the transport's
property tests, the hostile-backend tests and the benchmark's hostile table.
"""

import socket
import threading
from typing import Callable, Optional, Tuple


class RawServer:
    def __init__(self, handle: Callable[[socket.socket, threading.Event], None]):
        self.handle = handle
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handle(conn, self.stopping)
        except OSError:
            pass

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()


def read_request(conn: socket.socket) -> Optional[Tuple[bytes, bytes]]:
    """One request's head and its ``Content-Length`` body; None when the client closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = conn.recv(65536)
        if not got:
            return None
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        got = conn.recv(65536)
        if not got:
            return None
        body += got
    return head, body
