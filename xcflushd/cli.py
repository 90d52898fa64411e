"""Command line: the only module that parses arguments or exits.

``xcflushd run`` runs the daemon; ``xcflushd flush`` runs one flush cycle;
``xcflushd status`` reports on the daemons and the backlog in Redis;
``xcflushd dead-letter`` lists, requeues or drops the reports set aside.
``xcflushd check-config`` validates what ``run`` would read and touches nothing;
``xcflushd check-backend`` asks the backend whether it accepts the credentials (probe.py).
Every option can also come from the config file (``key = value``, keys are the
long option names) and from ``XCFLUSHD_<NAME>`` environment variables;
flags win over the environment, the environment over the file.
"""

import logging
import os
import re
import sys
from typing import List, Optional, Tuple

import configargparse

from . import __version__, defaults
from .config import build_settings, redact_url
from .errors import ConfigError

ENV_PREFIX = "XCFLUSHD_"
# Options whose value is a secret, and options whose URL may carry one (user:pass@),
# with what to use instead: as flags they would show in `ps` to every user of the node.
_SECRET_OPTIONS = {
    "--provider-key": ("-k", f"--provider-key-file, {ENV_PREFIX}PROVIDER_KEY or the config file"),
    "--service-token": (None, f"--service-tokens-file, {ENV_PREFIX}SERVICE_TOKEN or the config file"),
}
_URL_OPTIONS = {
    "--redis": ("-r", "a Redis password", f"--redis-password-file, {ENV_PREFIX}REDIS or the config file"),
    "--backend-proxy": (None, "a proxy password", f"--backend-proxy-password-file, {ENV_PREFIX}BACKEND_PROXY "
                        "or the config file"),
}
_URL_AUTHORITY = re.compile(r"://([^/?#\s]*)")
_URL_QUERY_PASSWORD = re.compile(r"://\S*[?&]password=", re.IGNORECASE)  # redis-py reads ?password=
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
    p.add_argument("command", choices=("run", "flush", "check-config", "check-backend", "status", "dead-letter"),
                   help="run: the daemon; flush: one flush cycle, then exit; check-config: validate flags, "
                        "environment, config file and secrets, then exit; "
                        "check-backend: one read-only authorize call per credential (exit 0 all accepted, "
                        "1 one refused or the backend unreachable); status: daemons and backlog "
                        "(exit 0 healthy, 1 degraded, 2 Redis unreachable); "
                        "dead-letter list | requeue ID... | drop ID...: the reports set aside")
    p.add_argument("arguments", nargs="*", metavar="ARG", help="dead-letter: list, requeue or drop, then entry ids")
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
    p.add_argument("--backend-outage", default="strict", metavar="MODE",
                   help="while the backend cannot be reached: strict (cached authorizations expire as usual), "
                        "resilient (they are kept, up to --max-stale), allow (resilient, and the gateway's new "
                        "applications are allowed unless cached as denied: fails open)")
    p.add_argument("--max-stale", default=defaults.MAX_STALE, metavar="SECONDS",
                   help="resilient, allow: how long after the backend last answered cached authorizations are "
                        "still served")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    p.add_argument("--metrics-listen", default=defaults.METRICS_LISTEN, metavar="HOST:PORT",
                   help="run: serve Prometheus /metrics here ([IPv6]:PORT for IPv6); empty disables it")
    p.add_argument("--json", action="store_true",
                   help="status, dead-letter list: print JSON")
    p.add_argument("--all", action="store_true", help="dead-letter requeue/drop: every entry")
    p.add_argument("--yes", action="store_true", help="dead-letter drop --all: really")
    return p


def _has_url_password(text: str) -> bool:
    """True when ``text`` holds a URL with ``user:password@`` or a ``password=`` parameter."""
    return bool(_URL_QUERY_PASSWORD.search(text)) or any(
        ":" in m.group(1).rpartition("@")[0] for m in _URL_AUTHORITY.finditer(text))


def _option_and_value(argv: List[str], i: int, options) -> Tuple[Optional[str], str]:
    """The option ``argv[i]`` names, resolved as argparse does (exact name, else the one
    option it abbreviates; short options glued to their value), and its value."""
    arg = argv[i]
    following = argv[i + 1] if i + 1 < len(argv) else ""
    if arg.startswith("--") and len(arg) > 2:
        name, eq, glued = arg.partition("=")
        if name not in options:  # an abbreviation; an ambiguous one is refused too
            name = next((s for s in (*_SECRET_OPTIONS, *_URL_OPTIONS) if s.startswith(name)), name)
        return name, glued if eq else following
    if arg.startswith("-") and len(arg) > 1 and arg[1] != "-":
        glued = arg[2:]
        for long, (short, *_rest) in (*_SECRET_OPTIONS.items(), *_URL_OPTIONS.items()):
            if arg[:2] == short:
                return long, glued or following
        return arg[:2], glued or following
    return None, arg


def refuse_visible_secrets(argv: List[str], options=None) -> None:
    """Secrets given as flags show in `ps` to every user of the node: refuse them, in every
    spelling argparse accepts, without ever quoting the secret."""
    options = options or {s for a in build_parser([])._actions for s in a.option_strings}
    for i, arg in enumerate(argv):
        name, value = _option_and_value(argv, i, options)
        if name in _SECRET_OPTIONS:
            raise ConfigError(f"refusing {name} on the command line, where ps shows it: "
                              f"use {_SECRET_OPTIONS[name][1]}")
        if name in _URL_OPTIONS and _has_url_password(value):
            _, what, alternative = _URL_OPTIONS[name]
            raise ConfigError(f"refusing {what} in {name} on the command line, where ps shows it: "
                              f"use {alternative}")
        if _has_url_password(arg):  # any other place a URL with a password can hide
            raise ConfigError("refusing a password in a URL on the command line, where ps shows it: "
                              "use the environment or the config file")


def describe(settings) -> str:
    """One line on what a configuration amounts to; never a secret (check-config prints it)."""
    credentials = []
    if settings.provider_key:
        credentials.append("provider key")
    if settings.service_tokens:
        credentials.append(f"{len(settings.service_tokens)} service token(s)")
    if settings.redis_password:
        credentials.append("redis password")
    if settings.backend_proxy_password:
        credentials.append("proxy password")
    proxy = f", backend proxy {redact_url(settings.backend_proxy)}" if settings.backend_proxy else ""
    if settings.backend_proxy and settings.backend_proxy_user:
        proxy += " (with a user name)"
    stale = f" (max-stale {settings.max_stale}s)" if settings.backend_outage != "strict" else ""
    return (f"redis {settings.redis_display}, backend {settings.backend_url}{proxy}, "
            f"frequency {settings.frequency}s, auth-ttl {settings.auth_ttl}s, "
            f"backend-outage {settings.backend_outage}{stale}, credentials: {', '.join(credentials)}")


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
    if settings.command == "dead-letter":
        try:
            action, ids = _dead_letter_arguments(options)
        except ConfigError as exc:
            print(f"xcflushd: error: {exc}", file=sys.stderr)
            return 2
        return _dead_letter(settings, action, ids, options)
    if options.arguments:
        print(f"xcflushd: error: unexpected argument {options.arguments[0]!r}", file=sys.stderr)
        return 2
    if settings.command == "check-config":  # nothing contacted, nothing written
        print(f"config OK: {describe(settings)}")
        return 0
    setup_logging(settings.log_level)
    if settings.command == "status":
        return _status(settings, options.json)
    if settings.command == "check-backend":
        return _check_backend(settings)
    from .daemon import Daemon  # after validation: a bad flag costs no imports

    def reread():  # SIGHUP: the same command line and environment, the files read again
        return build_settings(build_parser().parse_args(argv, env_vars=environ), environ)

    daemon = Daemon(settings, environ, reread)
    try:
        return daemon.flush() if settings.command == "flush" else daemon.run()
    except ConfigError as exc:
        print(f"xcflushd: error: {exc}", file=sys.stderr)
        return 2


def _status(settings, as_json: bool) -> int:
    import json

    from . import status

    client = _tool_client(settings)
    try:
        document = status.collect(client)
    finally:
        client.close()
    print(json.dumps(document, indent=2, sort_keys=True) if as_json else
          status.render(document, settings.redis_display))
    return status.exit_code(document)


def _tool_client(settings):
    """The Redis client of status and dead-letter: an operator waits on it, so Redis
    down costs a second of retries, not the daemon's ten."""
    from .storage import connect

    return connect(settings.redis_url, settings.redis_password, pool_size=2, timeout=5.0, retry_budget=1.0)


def _check_backend(settings) -> int:
    from .probe import probe

    outcomes = probe(settings)
    for outcome in outcomes:
        print(("ok: " if outcome.accepted else "FAILED: ") + outcome.detail)
    return 0 if all(o.accepted for o in outcomes) else 1


_DEAD_LETTER_ACTIONS = ("list", "requeue", "drop")


def _dead_letter_arguments(options):
    if not options.arguments or options.arguments[0] not in _DEAD_LETTER_ACTIONS:
        raise ConfigError("dead-letter: expected list, requeue ID... or drop ID...")
    action, ids = options.arguments[0], options.arguments[1:]
    if action == "list" and (ids or options.all):
        raise ConfigError("dead-letter list takes no entry ids")
    if action != "list" and not ids and not options.all:
        raise ConfigError(f"dead-letter {action}: name the entries (ids from `dead-letter list`) or give --all")
    if ids and options.all:
        raise ConfigError(f"dead-letter {action}: entry ids or --all, not both")
    if action == "drop" and options.all and not options.yes:
        raise ConfigError("dead-letter drop --all deletes every entry for good: add --yes")
    return action, ids


def _dead_letter(settings, action: str, ids: List[str], options) -> int:
    """0: done; 1: some entry refused or already gone; 2: bad ids or Redis unreachable."""
    import json

    from . import deadletter
    from .errors import StorageUnavailable

    # Entries quote Redis keys, which may hold bytes that are not UTF-8 or line
    # breaks: under a strict locale printing them would be a traceback, raw
    # they could forge lines of the listing.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    client = _tool_client(settings)
    try:
        found = deadletter.entries(client)
        if action == "list":
            print(json.dumps([e.as_dict() for e in found], indent=2) if options.json else _render_entries(found))
            return 0
        try:
            chosen = found if options.all else deadletter.select(found, ids)
        except ValueError as exc:
            print(f"xcflushd: error: dead-letter {action}: {exc}", file=sys.stderr)
            return 2
        status = 0
        for entry in chosen:
            outcome = deadletter.requeue(client, entry) if action == "requeue" else deadletter.drop(client, entry)
            line = f"{entry.id} {outcome}"
            if outcome == deadletter.GONE:
                line += ": changed or taken by someone else since it was read"
            elif outcome == deadletter.REFUSED:
                line += ": " + deadletter.refusal_after(entry, outcome)
            if outcome in (deadletter.GONE, deadletter.REFUSED):
                status = 1
            print(line.translate(_CONTROL))  # a refusal may quote metric names from Redis
        if not chosen:
            print("the dead letter is empty")
        return status
    except StorageUnavailable as exc:
        print(f"xcflushd: error: Redis at {settings.redis_display} unreachable: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()


def _render_entries(found) -> str:
    if not found:
        return "the dead letter is empty"
    lines = []
    for e in found:
        usage = ",".join(f"{m}={v}" for m, v in sorted(e.usage.items())) or "-"
        lines.append(f"{e.id}  {e.at or '-'}  service {e.service_id or '-'}  {e.credentials}  usage {usage}"
                     .translate(_CONTROL))
        lines.append(f"    why: {e.reason or '-'}".translate(_CONTROL))
        if e.refusal:
            lines.append(f"    not requeueable: {e.refusal}".translate(_CONTROL))
    lines.append(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}; "
                 "`xcflushd dead-letter requeue ID...` retries them, `drop ID...` deletes them")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
