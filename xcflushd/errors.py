"""Exceptions, grouped by what the caller can do about them.

Messages never carry secrets (provider key, service tokens, passwords) nor
full application credentials: they end up in logs.
"""


class XcflushdError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(XcflushdError):
    """Bad option, config file or secret source. The CLI prints it and exits 2."""


class MalformedKey(XcflushdError):
    """A Redis key or pub/sub message that does not follow the gateway's format."""


class BackendError(XcflushdError):
    """A backend call that did not succeed."""


class BackendUnavailable(BackendError):
    """Transport failure, timeout, 5xx or a body that is not what the API returns.

    Retrying later may work.
    """


class BackendRejected(BackendError):
    """The backend answered 4xx with (or without) an error document."""

    def __init__(self, status, code, message=""):
        self.status = status
        self.code = code or ""
        super().__init__(f"HTTP {status} {self.code or '(no error code)'}: {message}".rstrip(": "))


class StorageUnavailable(XcflushdError):
    """Redis could not be reached (after the retry policy gave up) or answered an error to a command we need."""


class StorageRefused(StorageUnavailable):
    """Redis answered, and said no for a reason that waiting does not fix: a read-only
    replica (READONLY), an ACL user without the permission (NOPERM) or a wrong
    password, a key of our own replaced by another type (WRONGTYPE), persistence
    failing (MISCONF).

    An operator has to act. A flush cycle that meets it writes nothing more,
    holds nothing and fails, counted and logged: what it could not move stays
    in its hand-over keys for a later cycle. Callers that only know
    StorageUnavailable treat it as one.
    """


class StorageFull(StorageUnavailable):
    """Redis refused a write because it is at ``maxmemory`` (``noeviction``).

    Commands that free memory (DEL, RENAME, HDEL) still work, so the caller
    degrades: it skips what needs new memory, counts it, and goes on.
    """
