"""Test only: run ``xcflushd`` with one of its threads made to hang, to prove the watchdog.

    python tests/systemd/wedge.py THREAD [xcflushd arguments...]

THREAD is ``scheduler`` (hangs after its first flush cycle), ``listener``
(after subscribing to the requests channel) or ``engine`` (the backend
engine loop, a second after it starts). The production code has no hook:
the hang is patched in here, then ``xcflushd.cli.main`` runs as usual.
"""

import sys
import threading
import time


def _hang() -> None:
    threading.Event().wait()


def wedge(thread: str) -> None:
    if thread == "scheduler":
        from xcflushd.daemon import Daemon

        on_result = Daemon._on_result

        def on_result_then_hang(self, result):
            on_result(self, result)
            _hang()

        Daemon._on_result = on_result_then_hang
    elif thread == "listener":
        from xcflushd.renewer import PriorityRenewer

        init = PriorityRenewer.__init__

        class HangingEvent(threading.Event):
            def set(self):
                super().set()
                if threading.current_thread().name == "auth-listener":
                    _hang()

        def init_with_hang(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.subscribed = HangingEvent()

        PriorityRenewer.__init__ = init_with_hang
    elif thread == "engine":
        from xcflushd.transport import Engine

        step = Engine._step
        started = []

        def step_then_hang(self):
            started.append(time.monotonic()) if not started else None
            if time.monotonic() - started[0] > 1.0:
                _hang()
            return step(self)

        Engine._step = step_then_hang
    else:
        sys.exit(f"wedge.py: unknown thread {thread!r}")


if __name__ == "__main__":
    wedge(sys.argv[1])
    from xcflushd.cli import main

    sys.exit(main(sys.argv[2:]))
