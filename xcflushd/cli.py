"""Command line: the only module that parses arguments or exits.

``xcflushd run`` runs the daemon; ``xcflushd flush`` runs one flush cycle;
``xcflushd status`` reports on the daemons and the backlog in Redis.
Every option can also come from the config file (``key = value``, keys are the
long option names) and from ``XCFLUSHD_<NAME>`` environment variables;
flags win over the environment, the environment over the file.
"""

import logging
import os
import re
import sys
from typing import List, Optional

import configargparse

from . import __version__, defaults
from .config import build_settings
from .errors import ConfigError

ENV_PREFIX = "XCFLUSHD_"
# Secrets that would show in `ps` when given as flags.
_SECRET_FLAGS = re.compile(r"^(-k.*|--provider-key(=.*)?|--service-token(=.*)?)$")
_URL_PASSWORD = re.compile(r"^(rediss?|unix)://[^/@]*:[^/@]*@")
# Control characters (and Unicode line breaks) a log record may quote from Redis data.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]} | {
    0x0a: "\\n", 0x0d: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class _OneLineFormatter(logging.Formatter):
    """A record is one line: a newline in a key or message from Redis cannot forge another."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_CONTROL)


class _Parser(configargparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message.splitlines()[0])

    def exit(self, status=0, message=None):  # --help / --version
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


def build_parser(config_files: Optional[List[str]] = None) -> configargparse.ArgumentParser:
    p = _Parser(
        prog="xcflushd",
        description="Flushes the 3scale XC gateway's cached reports and authorizations to the 3scale backend.",
        default_config_files=[defaults.CONFIG_FILE] if config_files is None else config_files,
        auto_env_var_prefix=ENV_PREFIX,
        args_for_setting_config_path=["-c", "--config"],
        config_arg_help_message=f"config file (default {defaults.CONFIG_FILE} when it exists)",
    )
    p.add_argument("command", choices=("run", "flush", "status"),
                   help="run: the daemon; flush: one flush cycle, then exit; status: daemons and backlog "
                        "(exit 0 healthy, 1 degraded, 2 Redis unreachable)")
    p.add_argument("--version", action="version", version=f"xcflushd {__version__}")
    p.add_argument("-r", "--redis", default=f"localhost:{defaults.REDIS_PORT}",
                   help="host[:port], redis://[user:pass@]host:port/db, rediss://... (TLS) or unix:///path")
    p.add_argument("--redis-password-file", metavar="FILE", help="file holding the Redis password")
    p.add_argument("-b", "--backend", default=defaults.BACKEND_URL, help="3scale backend URL")
    p.add_argument("-k", "--provider-key", help="provider key (environment or config file only: flags show in ps)")
    p.add_argument("--provider-key-file", metavar="FILE", help="file holding the provider key")
    p.add_argument("--service-token", action="append", metavar="SERVICE_ID=TOKEN",
                   help="service token for a service, repeatable (environment or config file only)")
    p.add_argument("--service-tokens-file", metavar="FILE", help="file of SERVICE_ID=TOKEN lines")
    p.add_argument("-a", "--auth-ttl", default=defaults.AUTH_TTL, help="seconds a cached authorization lives")
    p.add_argument("-f", "--frequency", default=defaults.FREQUENCY, help="seconds between flush cycles")
    p.add_argument("-t", "--threads", default=str(defaults.THREADS), help="flush HTTP concurrency: N or min:max")
    p.add_argument("-p", "--prio-threads", default=str(defaults.PRIO_THREADS),
                   help="priority authorizations in flight at once: N or min:max (max is used)")
    p.add_argument("--secure", dest="secure", action="store_const", const=True, default=None,
                   help="talk HTTPS to the backend (default unless the URL says http://)")
    p.add_argument("--no-secure", dest="secure", action="store_const", const=False, help="talk plain HTTP")
    p.add_argument("--report-auth-wait", default=defaults.REPORT_AUTH_WAIT,
                   help="seconds between reporting and authorizing (the backend applies reports asynchronously)")
    p.add_argument("--report-batch-size", default=defaults.REPORT_BATCH_SIZE,
                   help="transactions per report call (1 disables batching)")
    p.add_argument("--backend-proxy", metavar="URL",
                   help="http:// or https:// proxy for backend calls, [user@]host:port (Basic, Digest or NTLM); "
                        "a password only from the environment, the config file or --backend-proxy-password-file")
    p.add_argument("--backend-proxy-password-file", metavar="FILE", help="file holding the proxy password")
    p.add_argument("--backend-ca-file", metavar="FILE",
                   help="PEM CA bundle to verify the backend (and an https:// proxy) instead of the system store")
    p.add_argument("--backend-connect-timeout", default=defaults.BACKEND_CONNECT_TIMEOUT, help="seconds")
    p.add_argument("--backend-read-timeout", default=defaults.BACKEND_READ_TIMEOUT, help="seconds")
    p.add_argument("--max-term-wait", default=defaults.MAX_TERM_WAIT,
                   help="seconds a graceful stop may take before in-flight usage is left in Redis")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    p.add_argument("--json", action="store_true",
                   help="status: print the status document as JSON")
    return p


def refuse_visible_secrets(argv: List[str]) -> None:
    """Secrets given as flags show in `ps` to every user of the node."""
    for i, arg in enumerate(argv):
        if _SECRET_FLAGS.match(arg):
            name = "--service-token" if arg.startswith("--service-token") else "--provider-key"
            alternative = "--service-tokens-file" if name == "--service-token" else "--provider-key-file"
            raise ConfigError(f"refusing {name} on the command line, where ps shows it: use {alternative}, "
                              f"{ENV_PREFIX}{name[2:].upper().replace('-', '_')} or the config file")
        value = arg.split("=", 1)[1] if arg.startswith("--redis=") else (
            argv[i + 1] if arg in ("-r", "--redis") and i + 1 < len(argv) else "")
        if _URL_PASSWORD.match(value):
            raise ConfigError("refusing a Redis password on the command line, where ps shows it: "
                              f"use --redis-password-file, {ENV_PREFIX}REDIS or the config file")


def setup_logging(level: str) -> None:
    # Keys and messages from Redis may hold bytes that are not UTF-8 (kept as
    # surrogates): written raw they make a line the journal stores as a blob,
    # or, under a strict locale, a logging error instead of the line.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    handler = logging.StreamHandler(sys.stdout)
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:  # the journal stamps lines itself
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(_OneLineFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def main(argv: Optional[List[str]] = None, environ=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    try:
        refuse_visible_secrets(argv)
        options = build_parser().parse_args(argv, env_vars=environ)
        settings = build_settings(options, environ)
    except ConfigError as exc:
        print(f"xcflushd: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if settings.command == "status":
        return _status(settings, options.json)
    from .daemon import Daemon  # after validation: a bad flag costs no imports

    daemon = Daemon(settings, environ)
    try:
        return daemon.flush() if settings.command == "flush" else daemon.run()
    except ConfigError as exc:
        print(f"xcflushd: error: {exc}", file=sys.stderr)
        return 2


def _status(settings, as_json: bool) -> int:
    import json

    from . import status
    from .storage import connect

    client = connect(settings.redis_url, settings.redis_password, pool_size=2, timeout=5.0)
    try:
        document = status.collect(client)
    finally:
        client.close()
    print(json.dumps(document, indent=2, sort_keys=True) if as_json else
          status.render(document, settings.redis_display))
    return status.exit_code(document)


if __name__ == "__main__":
    sys.exit(main())
