"""``/metrics`` over HTTP, and the backlog gauges kept current.

The server is prometheus_client's own (a threading WSGI server in a daemon
thread, one thread per scrape). A scrape only reads values already recorded
by the engine and by ``BacklogWatch``: it touches neither Redis nor the
backend and takes no lock a flush cycle or the priority path holds, so a slow
or stuck scraper cannot delay either.
"""

import logging
import threading
from typing import Optional, Tuple

from prometheus_client import REGISTRY, start_http_server

from . import metrics
from .config import is_loopback
from .errors import ConfigError, StorageUnavailable
from .storage import read_backlog

log = logging.getLogger(__name__)


def display(address: Tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(address: Tuple[str, int], registry=REGISTRY):
    """Listen on ``address`` and serve ``/metrics``; ConfigError (one line) if it cannot bind."""
    host, port = address
    try:
        server, _thread = start_http_server(port, host, registry)
    except OSError as exc:  # busy port, an address not on this node, a name that does not resolve
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"--metrics-listen {display(address)}: cannot listen: {reason}") from None
    bound = display(server.server_address[:2])
    if is_loopback(host):
        log.info("metrics: http://%s/metrics", bound)
    else:
        log.warning("metrics: http://%s/metrics is reachable from other hosts, not only this node "
                    "(--metrics-listen %s)", bound, display(address))
    return server


class BacklogWatch:
    """Counts what waits in Redis every ``interval`` seconds and when poked (after each cycle).

    Its own thread, so the counting (SCANs) delays neither a cycle nor a scrape.
    """

    def __init__(self, client, stop: threading.Event, interval: float):
        self.redis = client
        self.stop = stop
        self.interval = interval
        self._poked = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "BacklogWatch":
        self._thread = threading.Thread(target=self._run, name="backlog-metrics", daemon=True)
        self._thread.start()
        return self

    def poke(self) -> None:
        self._poked.set()

    def refresh(self) -> bool:
        try:
            backlog = read_backlog(self.redis)
        except StorageUnavailable as exc:
            log.debug("backlog not counted: %s", exc)
            return False
        metrics.backlog(backlog.reports_pending, backlog.dead_letters)
        return True

    def _run(self) -> None:
        while not self.stop.is_set():
            self.refresh()
            self._poked.wait(self.interval)
            self._poked.clear()
