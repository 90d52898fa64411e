"""Validated settings, built from parsed options plus the secrets' files.

Every check lives here and raises ConfigError with a one-line message; the CLI
turns that into exit status 2. Secrets are read from files, the environment
or ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``), never echoed.
"""

import dataclasses
import ipaddress
import os
import re
import urllib.parse
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

from . import defaults
from .errors import ConfigError

#: Files read from ``$CREDENTIALS_DIRECTORY`` when present.
CREDENTIAL_FILES = {"provider_key": "provider_key", "service_tokens": "service_tokens",
                    "redis_password": "redis_password", "backend_proxy_password": "backend_proxy_password"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
OUTAGE_MODES = defaults.OUTAGE_MODES  # --backend-outage; xcflushd/outage.py says what each does


@dataclasses.dataclass(frozen=True)
class Settings:
    command: str
    redis_url: str
    backend_url: str
    auth_ttl: int
    frequency: int
    threads: int
    prio_threads: int
    report_auth_wait: float
    report_batch_size: int
    connect_timeout: float
    read_timeout: float
    max_term_wait: float
    log_level: str
    backend_outage: str = "strict"               # outage.MODES
    max_stale: int = defaults.MAX_STALE
    metrics_listen: Optional[Tuple[str, int]] = None  # (host, port); None: no /metrics
    backend_proxy: Optional[str] = None          # scheme://host:port, no credentials
    backend_proxy_user: Optional[str] = None
    backend_proxy_password: Optional[str] = dataclasses.field(default=None, repr=False)
    backend_ca_file: Optional[str] = None
    provider_key: Optional[str] = dataclasses.field(default=None, repr=False)
    service_tokens: Dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    redis_password: Optional[str] = dataclasses.field(default=None, repr=False)

    @property
    def redis_display(self) -> str:
        """The Redis address for logs: no password."""
        return redact_url(self.redis_url)


def redact_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


#: Largest number any option takes: seconds that fit Redis' EXPIRE and every timer (68 years).
LARGEST = 2 ** 31 - 1
#: Largest --threads / --prio-threads: each is a connection, a pool slot, a Redis client.
MAX_THREADS = 1000


def _positive(name: str, value, integer: bool = True, zero_ok: bool = False, maximum: int = LARGEST):
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name}: expected a {'whole ' if integer else ''}number, got {value!r}") from None
    if not number <= maximum:  # also nan; inf is above any maximum
        raise ConfigError(f"--{name}: expected a number up to {maximum}, got {value!r}")
    if number < 0 or (number == 0 and not zero_ok):
        raise ConfigError(f"--{name}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")
    return number


def parse_threads(name: str, value) -> int:
    """``N`` or the Ruby daemon's ``min:max`` (its max is the pool size)."""
    text = str(value)
    if ":" in text:
        low, _, high = text.partition(":")
        low_n, high_n = _positive(name, low, zero_ok=True), _positive(name, high, maximum=MAX_THREADS)
        if low_n > high_n:
            raise ConfigError(f"--{name}: min {low_n} is above max {high_n}")
        return high_n
    return _positive(name, text, maximum=MAX_THREADS)


def parse_redis(value: str) -> str:
    """``host[:port]`` or a ``redis://``, ``rediss://``, ``unix://`` URL -> URL."""
    text = str(value).strip()
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"--redis: unsupported scheme {parts.scheme!r} (use redis://, rediss:// or unix://)")
        if parts.scheme == "unix" and not parts.path:
            raise ConfigError("--redis: unix:// needs a socket path, e.g. unix:///run/redis/redis.sock")
        if parts.scheme != "unix":
            try:
                _ = parts.port
            except ValueError:
                raise ConfigError(f"--redis: bad port in {redact_url(text)!r}") from None
            if not parts.hostname:
                raise ConfigError(f"--redis: no host in {redact_url(text)!r}")
        return text
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(defaults.REDIS_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--redis: expected host:port, got {text!r}")
    return f"redis://{host}:{port}"


def parse_backend(value: str, secure: Optional[bool]) -> str:
    """The backend URL; ``--secure``/``--no-secure`` pick the scheme when none is given
    and refuse one that contradicts them."""
    text = str(value).strip()
    if "://" not in text:
        text = ("http://" if secure is False else "https://") + text
    text = text.rstrip("/")  # after the scheme test: "http://" has no host, it is not host "http"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"--backend: scheme must be http or https, got {parts.scheme!r}")
    if secure is True and parts.scheme == "http":
        raise ConfigError("--backend: http:// contradicts --secure (use https:// or --no-secure)")
    if secure is False and parts.scheme == "https":
        raise ConfigError("--backend: https:// contradicts --no-secure")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"--backend: bad port in {text!r}") from None
    if not parts.hostname or parts.username or parts.query:
        raise ConfigError("--backend: expected scheme://host[:port][/path] without credentials or query")
    return text


class Proxy(NamedTuple):
    url: Optional[str]            # scheme://host[:port], without credentials
    user: Optional[str] = None
    password: Optional[str] = None


def parse_proxy(value: Optional[str], password_file: Optional[str] = None,
                environ: Mapping[str, str] = os.environ) -> Proxy:
    """``--backend-proxy`` (``user:pass@`` allowed from the environment or the config file) and
    its password from ``--backend-proxy-password-file`` or the credential ``backend_proxy_password``."""
    if not value:
        if password_file:
            raise ConfigError("--backend-proxy-password-file: no --backend-proxy to use it with")
        return Proxy(None)
    text = str(value).strip()
    parts = urllib.parse.urlsplit(text)
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"--backend-proxy: bad port in {redact_url(text)!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"--backend-proxy: expected http(s)://[user@]host:port, got {redact_url(text)!r}")
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    source = password_file or _credential(environ, "backend_proxy_password")
    if source:
        what = "--backend-proxy-password-file" if password_file else "credential backend_proxy_password"
        password = read_secret(source, what)
        if user is None:
            raise ConfigError(f"{what}: --backend-proxy has no user name (http://USER@host:port)")
    return Proxy(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}", user, password)


def parse_ca_file(value: Optional[str]) -> Optional[str]:
    if not value:
        return None
    try:
        with open(value, "rb") as fh:
            head = fh.read(65536)
    except OSError as exc:
        raise ConfigError(f"--backend-ca-file: cannot read {value}: {exc.strerror or type(exc).__name__}") from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise ConfigError(f"--backend-ca-file: {value} holds no PEM certificate")
    return os.path.abspath(value)


_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")


def parse_listen(value: Optional[str], name: str = "metrics-listen") -> Optional[Tuple[str, int]]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); empty -> None (disabled)."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    shown = text if len(text) <= 40 else text[:40] + "..."
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"--{name}: expected [IPv6]:PORT, got {shown!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--{name}: not an IPv6 address in {shown!r}") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"--{name}: expected HOST:PORT (e.g. 127.0.0.1:9422), got {shown!r}")
        if ":" in host:
            raise ConfigError(f"--{name}: write an IPv6 address in brackets, [{host}]:{port}")
        if not _HOSTNAME.fullmatch(host):
            raise ConfigError(f"--{name}: not a host name or address in {shown!r}")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"--{name}: port must be 1-65535, got {shown!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether only this node can reach ``host`` (names other than localhost count as reachable)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{what}: cannot read {path}: {reason}") from None
    if not text:
        raise ConfigError(f"{what}: {path} is empty")
    return text


_TOKEN_LINE = re.compile(r"^\s*([^=\s]+)\s*=\s*(\S+)\s*$")


def parse_service_tokens(lines, where: str) -> Dict[str, str]:
    tokens = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _TOKEN_LINE.match(line)
        if not match:
            raise ConfigError(f"{where}: line {number}: expected SERVICE_ID=TOKEN")
        tokens[match.group(1)] = match.group(2)
    return tokens


def _credential(environ: Mapping[str, str], name: str) -> Optional[str]:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = os.path.join(directory, CREDENTIAL_FILES[name])
    return path if os.path.exists(path) else None


def _secrets(options, environ: Mapping[str, str]) -> Tuple[Optional[str], Dict[str, str], Optional[str]]:
    provider_key = options.provider_key
    if options.provider_key_file:
        provider_key = read_secret(options.provider_key_file, "--provider-key-file")
    elif not provider_key and _credential(environ, "provider_key"):
        provider_key = read_secret(_credential(environ, "provider_key"), "credential provider_key")

    tokens: Dict[str, str] = {}
    tokens_file = options.service_tokens_file or _credential(environ, "service_tokens")
    if tokens_file:
        tokens.update(parse_service_tokens(read_secret(tokens_file, "service tokens").splitlines(), tokens_file))
    tokens.update(parse_service_tokens(options.service_token or [], "--service-token"))

    password = None
    if options.redis_password_file:
        password = read_secret(options.redis_password_file, "--redis-password-file")
    elif _credential(environ, "redis_password"):
        password = read_secret(_credential(environ, "redis_password"), "credential redis_password")
    return provider_key, tokens, password


def build_settings(options, environ: Mapping[str, str] = os.environ) -> Settings:
    """Parsed options (an argparse namespace) -> Settings, or ConfigError."""
    auth_ttl = _positive("auth-ttl", options.auth_ttl)
    frequency = _positive("frequency", options.frequency)
    if frequency > auth_ttl:
        raise ConfigError(f"--frequency ({frequency}) must not exceed --auth-ttl ({auth_ttl}): "
                          "cached authorizations would expire between flushes")
    batch = _positive("report-batch-size", options.report_batch_size)
    if batch > defaults.REPORT_BATCH_SIZE:
        raise ConfigError(f"--report-batch-size: the backend takes at most {defaults.REPORT_BATCH_SIZE} "
                          f"transactions per call, got {batch}")
    outage = str(options.backend_outage).strip().lower()
    if outage not in OUTAGE_MODES:
        raise ConfigError(f"--backend-outage: expected one of {', '.join(OUTAGE_MODES)}, "
                          f"got {options.backend_outage!r}")
    max_stale = _positive("max-stale", options.max_stale)
    if outage != "strict" and max_stale <= auth_ttl:
        raise ConfigError(f"--max-stale ({max_stale}) must exceed --auth-ttl ({auth_ttl}) with --backend-outage "
                          f"{outage}: cached authorizations would expire before it")
    level = str(options.log_level).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {options.log_level!r}")
    provider_key, tokens, password = _secrets(options, environ)
    proxy = parse_proxy(options.backend_proxy, options.backend_proxy_password_file, environ)
    if not provider_key and not tokens and options.command not in ("status", "dead-letter"):
        raise ConfigError("no backend credentials: give --provider-key-file (or XCFLUSHD_PROVIDER_KEY, "
                          "provider-key in the config file) or service tokens")
    return Settings(
        command=options.command,
        redis_url=parse_redis(options.redis),
        backend_url=parse_backend(options.backend, options.secure),
        auth_ttl=auth_ttl,
        frequency=frequency,
        threads=parse_threads("threads", options.threads),
        prio_threads=parse_threads("prio-threads", options.prio_threads),
        report_auth_wait=_positive("report-auth-wait", options.report_auth_wait, integer=False, zero_ok=True),
        report_batch_size=batch,
        connect_timeout=_positive("backend-connect-timeout", options.backend_connect_timeout, integer=False),
        read_timeout=_positive("backend-read-timeout", options.backend_read_timeout, integer=False),
        max_term_wait=_positive("max-term-wait", options.max_term_wait, integer=False),
        log_level=level,
        backend_outage=outage,
        max_stale=max_stale,
        metrics_listen=parse_listen(options.metrics_listen),
        backend_proxy=proxy.url,
        backend_proxy_user=proxy.user,
        backend_proxy_password=proxy.password,
        backend_ca_file=parse_ca_file(options.backend_ca_file),
        provider_key=provider_key,
        service_tokens=tokens,
        redis_password=password,
    )
