"""Error catalogue of the simulated backend: codes, HTTP statuses and messages.

Codes, statuses and message texts follow apisonator's ``errors.rb`` as summarised in
``threescale-backend.md`` §4.4 (current era, plus the 2017 ``access_token_invalid``).
Two families:

* :class:`SimError` — answered as ``<error code="CODE">MESSAGE</error>`` with its HTTP
  status (403/404/422/400), or stored in the async error log when a report batch is dropped.
  :class:`EmptyReply` is the same but with no body (apisonator's ``halt 403``).
* :class:`Denial` — a validator's rejection: HTTP 409 with a status document whose
  ``<reason>`` is the text; the code only travels in the ``3scale-rejection-reason`` header.
"""

from typing import NamedTuple, Optional


class SimError(Exception):
    """A request-level error of the 3scale API (not a simulator bug)."""

    def __init__(self, code: str, message: str, http_status: int = 403):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


class EmptyReply(SimError):
    """An error answered with a status code and an empty body."""

    def __init__(self, http_status: int):
        super().__init__("", "", http_status)


class Denial(NamedTuple):
    """Why an authorization was refused (HTTP 409)."""

    code: str
    text: str


def _blank(value) -> bool:
    # Ruby's blank?: nil, or a string of whitespace only.
    return value is None or (isinstance(value, str) and not value.strip())


# --- credentials (403 unless noted) -------------------------------------------------------

def provider_key_invalid(key) -> SimError:
    return SimError("provider_key_invalid", f'provider key "{key}" is invalid')


def provider_key_invalid_or_service_missing(key) -> SimError:
    return SimError("provider_key_invalid_or_service_missing",
                    f'provider key "{key}" invalid and/or service ID missing')


def service_id_invalid(service_id) -> SimError:
    return SimError("service_id_invalid", f'service id "{service_id}" is invalid')


def provider_key_or_service_token_required() -> SimError:
    return SimError("provider_key_or_service_token_required",
                    "Provider key or service token are required")


def service_id_missing() -> SimError:
    return SimError("service_id_missing", "Service ID is missing", 422)


def service_token_invalid(token, service_id) -> SimError:
    return SimError("service_token_invalid",
                    f'service token "{token}" or service id "{service_id}" is invalid')


# --- applications -----------------------------------------------------------------------

def application_not_found(app_id=None) -> SimError:
    if app_id is None:
        return SimError("application_not_found", "application id is missing", 404)
    return SimError("application_not_found", f'application with id="{app_id}" was not found', 404)


def user_key_invalid(key) -> SimError:
    return SimError("user_key_invalid", f'user key "{key}" is invalid')


def authentication_error() -> SimError:
    return SimError("authentication_error", "either app_id or user_key is allowed, not both")


def access_token_invalid(token) -> SimError:
    # 2017 backend (A17 errors.rb, AccessTokenInvalid < NotFound).
    return SimError("access_token_invalid",
                    f'token "{token}" is invalid: expired or never defined', 404)


# --- usage --------------------------------------------------------------------------------

def metric_invalid(name) -> SimError:
    return SimError("metric_invalid", f'metric "{name}" is invalid', 404)


def usage_value_invalid(metric, value) -> SimError:
    if not isinstance(value, str) or _blank(value):
        return SimError("usage_value_invalid",
                        f'usage value for metric "{metric}" can not be empty')
    return SimError("usage_value_invalid", f'usage value "{value}" for metric "{metric}" is invalid')


def transaction_timestamp_too_old() -> SimError:
    return SimError("transaction_timestamp_too_old",
                    "reporting transactions older than 86400 seconds is not allowed")


def transaction_timestamp_too_new() -> SimError:
    return SimError("transaction_timestamp_too_new",
                    "reporting transactions more than 3600 seconds in the future is not allowed")


# --- malformed requests (400 / 422) -------------------------------------------------------

def bad_request(message: Optional[str] = None) -> SimError:
    return SimError("bad_request", message or
                    "request contains syntax errors, should not be repeated without modification",
                    400)


def not_valid_data() -> SimError:
    return SimError("not_valid_data", "all data must be valid UTF8", 422)


def content_type_invalid(content_type) -> SimError:
    return SimError("content_type_invalid", f"invalid Content-Type: {content_type}", 400)


def transactions_is_blank() -> SimError:
    return SimError("transactions_is_blank", "transactions parameter is blank", 400)


def transactions_format_invalid() -> SimError:
    return SimError("transactions_format_invalid", "transactions format is invalid", 400)


def transactions_has_nil_transaction() -> SimError:
    return SimError("transactions_has_nil_transaction", "transactions has a nil transaction", 400)


def end_users_no_longer_supported() -> SimError:
    return SimError("end_users_no_longer_supported",
                    "End-users are no longer supported, do not specify the user_id parameter", 400)


# --- denials (409) ------------------------------------------------------------------------

LIMITS_EXCEEDED = Denial("limits_exceeded", "usage limits are exceeded")
APPLICATION_NOT_ACTIVE = Denial("application_not_active", "application is not active")
SERVICE_NOT_ACTIVE = Denial("service_not_active", "service is not active")
OAUTH_NOT_ENABLED = Denial("oauth_not_enabled", "oauth is not enabled")


def application_key_invalid(key) -> Denial:
    if _blank(key):
        return Denial("application_key_invalid", "application key is missing")
    return Denial("application_key_invalid", f'application key "{key}" is invalid')


def referrer_not_allowed(referrer) -> Denial:
    if _blank(referrer):
        return Denial("referrer_not_allowed", "referrer is missing")
    return Denial("referrer_not_allowed", f'referrer "{referrer}" is not allowed')


def redirect_invalid(field: str, value) -> Denial:
    # field is "redirect_url" or "redirect_uri": the code and text follow the param used.
    return Denial(f"{field}_invalid", f'{field} "{value}" is invalid')
