"""Log lines for events that can repeat without bound (a flood of bad requests or answers)."""

import logging
import threading
import time


class RateLimitedLog:
    """At most ``burst`` lines per ``window`` seconds; then one line saying how many were held back."""

    def __init__(self, logger: logging.Logger, what: str, burst: int = 10, window: float = 10.0):
        self.logger, self.what, self.burst, self.window = logger, what, burst, window
        self.started, self.count, self.suppressed = 0.0, 0, 0
        self.lock = threading.Lock()

    def warning(self, msg: str, *args) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args) -> None:
        self.log(logging.ERROR, msg, *args)

    def log(self, level: int, msg: str, *args) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.started >= self.window:
                if self.suppressed:
                    self.logger.log(level, "%d more %s were not logged", self.suppressed, self.what)
                self.started, self.count, self.suppressed = now, 0, 0
            self.count += 1
            if self.count > self.burst:
                self.suppressed += 1
                return
        self.logger.log(level, msg, *args)
