"""A raw TCP server on a free loopback port, for backends that break HTTP (or the API) on purpose.

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


# The backend's own one-line status document (the parser's fast path), with a max_value to fill in.
STATUS_DOC = (b'<?xml version="1.0" encoding="UTF-8"?><status><authorized>true</authorized><plan>Basic</plan>'
              b'<usage_reports><usage_report metric="hits" period="day"><period_start>2017-06-21 00:00:00 +0000'
              b"</period_start><period_end>2017-06-22 00:00:00 +0000</period_end><max_value>%s</max_value>"
              b"<current_value>1</current_value></usage_report></usage_reports></status>")
HUGE = b"9" * 5000  # more digits than int() takes (sys.get_int_max_str_digits: 4300)


class StatusServer(RawServer):
    """A backend answering each authorize call with STATUS_DOC, its max_value
    ``max_value[0](app_id)`` (a list, so a test can change it while the server
    runs), and ``report_status`` to anything else, after ``on_report()``: what
    happens to Redis while a report call is in flight."""

    def __init__(self, max_value: list, on_report: Callable[[], None] = lambda: None, report_status: int = 202):
        self.max_value = max_value
        self.on_report = on_report
        self.report_status = report_status
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket, _stopping: threading.Event) -> None:
        request = read_request(conn)
        if request is None:
            return
        if b"authorize.xml" not in request[0].split(b"\r\n")[0]:
            self.on_report()
            conn.sendall(b"HTTP/1.1 %d Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                         % self.report_status)
            return
        app_id = request[0].split(b"app_id=")[1].split(b"&")[0].split(b" ")[0]
        body = STATUS_DOC % self.max_value[0](app_id)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.3scale-v2.0+xml\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
