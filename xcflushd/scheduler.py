"""Runs the flush cycle every ``frequency`` seconds on a drift-free deadline.

A cycle that overruns its slot pushes the next one back rather than starting
cycles back to back. ``last_tick`` is the loop's heartbeat for the watchdog;
it moves at least every second while the loop is idle.
"""

import logging
import threading
import time
from typing import Callable, Optional

from .flusher import FlushResult

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, job: Callable[[bool], FlushResult], frequency: float, stop: threading.Event,
                 recovery_interval: float, on_result: Callable[[FlushResult], None] = lambda r: None,
                 clock: Callable[[], float] = time.monotonic):
        self.job = job
        self.frequency = frequency
        self.stop = stop
        self.recovery_interval = recovery_interval
        self.on_result = on_result
        self.clock = clock
        self.last_tick = clock()
        self.next_run: Optional[float] = None  # wall-clock time of the next cycle
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self.run, name="flush-scheduler", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: Optional[float] = None) -> bool:
        """True when the loop has ended."""
        if self._thread:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        deadline = self.clock()
        last_recovery = None
        while not self.stop.is_set():
            self.last_tick = now = self.clock()
            if now >= deadline:
                recover = last_recovery is None or now - last_recovery >= self.recovery_interval
                if recover:
                    last_recovery = now
                result = None
                try:
                    result = self.job(recover)
                except Exception as exc:  # flush_once does not raise; belt and braces
                    log.error("flush cycle crashed: %s: %s", type(exc).__name__, exc)
                deadline += self.frequency
                if deadline <= self.clock():
                    log.warning("flush cycle overran its %ss slot; next cycle starts now", self.frequency)
                    deadline = self.clock()
                # Before on_result: the status line it writes names the next cycle, not this one.
                self.next_run = time.time() + (deadline - self.clock())
                if result is not None:
                    try:
                        self.on_result(result)
                    except Exception as exc:
                        log.error("reporting the flush cycle failed: %s: %s", type(exc).__name__, exc)
            self.stop.wait(max(0.0, min(1.0, deadline - self.clock())))
