"""``xcflushd-backend-sim``: run the 3scale backend simulator in the foreground.

    xcflushd-backend-sim [--listen 127.0.0.1:8081] [--config FILE.json] [--demo-apps N]
                         [--latency-ms N] [--fault-rate R] [--fault-kinds a,b]
                         [--fault-seed N] [--fault-timeout-s S] [--log-level LEVEL]

Without ``--config`` it serves :func:`~xcflushd_sim.config.demo_config` (provider key
``pk-demo``). Once listening it prints one line, ``xcflushd-backend-sim listening on URL``.
SIGTERM or SIGINT stop it cleanly (exit 0). Bad flags or config: one line on stderr, exit 2.
"""

import argparse
import json
import logging
import signal
import sys
import threading
from typing import List, NoReturn, Optional, Tuple

from .config import ConfigError, demo_config
from .faults import KINDS
from .server import Simulator

PROG = "xcflushd-backend-sim"


class _UsageError(Exception):
    """Bad command line or config: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _listen(value: str) -> Tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {value!r}")
    return number


def _rate(value: str) -> float:
    number = _non_negative(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {value!r}")
    return number


def _kinds(value: str) -> List[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown fault kind(s) {unknown or value!r}; known: {','.join(KINDS)}")
    return kinds


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A 3scale Service Management API simulator.")
    parser.add_argument("--listen", type=_listen, default=("127.0.0.1", 8081),
                        metavar="HOST:PORT", help="address to serve on (default 127.0.0.1:8081)")
    parser.add_argument("--config", metavar="FILE.json",
                        help="backend config (default: a demo config, see --demo-apps)")
    parser.add_argument("--demo-apps", type=int, default=10, metavar="N",
                        help="applications in the demo config (default 10)")
    parser.add_argument("--latency-ms", type=_non_negative, default=0.0, metavar="N",
                        help="delay added to every 3scale call")
    parser.add_argument("--fault-rate", type=_rate, default=0.0, metavar="R",
                        help="probability of an injected fault per call (0..1)")
    parser.add_argument("--fault-kinds", type=_kinds, metavar="a,b",
                        help=f"fault kinds to inject ({','.join(KINDS)})")
    parser.add_argument("--fault-seed", type=int, metavar="N", help="seed for reproducibility")
    parser.add_argument("--fault-timeout-s", type=_non_negative, metavar="S",
                        help="how long a 'timeout' fault holds the connection (default 30)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="DEBUG logs one line per request")
    return parser


def _load_config(args: argparse.Namespace) -> dict:
    if args.config is None:
        if args.demo_apps < 0:
            raise _UsageError("--demo-apps must be >= 0")
        return demo_config(args.demo_apps)
    try:
        with open(args.config, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise _UsageError(f"cannot read --config {args.config}: {exc.strerror}") from None
    except ValueError as exc:
        raise _UsageError(f"--config {args.config} is not valid JSON: {exc}") from None


def _faults(args: argparse.Namespace) -> Optional[dict]:
    spec: dict = {}
    if args.fault_rate:
        spec["rate"] = args.fault_rate
    if args.fault_kinds:
        spec["kinds"] = args.fault_kinds
    if args.fault_seed is not None:
        spec["seed"] = args.fault_seed
    if args.fault_timeout_s is not None:
        spec["timeout_s"] = args.fault_timeout_s
    return spec or None


def main(argv: Optional[List[str]] = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status (0 stopped, 1 cannot listen, 2 usage)."""
    try:
        args = _parser().parse_args(argv)
        config = _load_config(args)
        host, port = args.listen
        sim = Simulator(config, host=host, port=port, latency=args.latency_ms / 1000.0,
                        faults=_faults(args))
    except (_UsageError, ConfigError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def _on_signal(signum: int, _frame) -> None:
        # Only set a flag: the main thread does the stopping.
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        sim.start()
    except OSError as exc:
        print(f"{PROG}: error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        print(f"{PROG} listening on {sim.url}", flush=True)
        while not stop.wait(3600):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
