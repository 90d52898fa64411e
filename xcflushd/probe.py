"""``xcflushd check-backend``: does the backend accept our credentials?

A node with no pending reports makes no backend call in a flush cycle, so a
wrong provider key, backend URL or proxy only shows once traffic comes. The
rollout's health gate asks here instead: one read-only authorize call per
credential, for an application id that cannot exist. The backend checks the
service credentials before it looks the application up, so the answer says
which (threescale-backend.md 1.3, 4.4):

* ``404 application_not_found``: the credential was accepted;
* ``403 provider_key_invalid...``, ``service_token_invalid`` ...: refused;
* anything else (unreachable, 5xx, a proxy refusing us): the backend was not
  reached as the daemon would need.

Nothing is reported, so nothing is counted against any application. The
provider key is tried on the provider's default service (no service id);
each service token on its own service.
"""

from typing import List, NamedTuple

from .backend import ServiceCredentials, client_for
from .errors import BackendError, BackendRejected
from .keys import Credentials

#: An application id no provider has: the probe must never match a real application.
PROBE_APP_ID = "xcflushd-credentials-probe-0000000000"
#: Error codes about the service credentials themselves (threescale-backend.md 4.4).
REFUSED_CODES = frozenset({
    "provider_key_invalid", "provider_key_invalid_or_service_missing", "service_id_invalid",
    "service_token_invalid", "service_id_missing", "provider_key_or_service_token_required",
})


class Outcome(NamedTuple):
    credential: str        # "provider key" or "service token of service S"
    accepted: bool
    detail: str            # never the secret (backend messages are scrubbed)


def probe(settings) -> List[Outcome]:
    """One authorize call per configured credential, one after the other."""
    checks = []
    if settings.provider_key:
        checks.append(("provider key", "", ServiceCredentials(settings.provider_key)))
    for service_id, token in sorted(settings.service_tokens.items()):
        checks.append((f"service token of service {service_id}", service_id,
                       ServiceCredentials(service_tokens={service_id: token})))
    client = client_for(settings, ServiceCredentials(), priority_concurrency=1,
                        priority_queue=len(checks) or 1, max_connections=2)
    app = Credentials({"app_id": PROBE_APP_ID})
    outcomes = []
    try:
        for what, service_id, credentials in checks:
            client.service_credentials = credentials
            outcomes.append(_judge(what, client, service_id, app))
    finally:
        client.close()
    return outcomes


def _judge(what: str, client, service_id: str, app: Credentials) -> Outcome:
    try:
        status = client.authorize(service_id, app)
    except BackendRejected as exc:
        if exc.code in REFUSED_CODES:
            return Outcome(what, False, f"the backend refused the {what} ({exc})")
        return Outcome(what, False, f"unexpected answer to the {what} ({exc})")
    except BackendError as exc:
        return Outcome(what, False, f"backend not reached with the {what}: {exc}")
    # application_not_found (or, unexpectedly, an answer about a real application):
    # either way the service credentials got past the backend's check.
    return Outcome(what, True, f"{what} accepted ({status.reason_code or 'answered'})")

