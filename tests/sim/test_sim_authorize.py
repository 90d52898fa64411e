"""authorize.xml / oauth_authorize.xml semantics over real HTTP (spec §1.3–1.5, §2.1–2.2, §4)."""

import defusedxml.ElementTree as ET
import pytest

from .helpers import XML_TYPE, auth

PK = "provider_key=pk123"


def error_code(response):
    return ET.fromstring(response.content).get("code")


def reason(response):
    return ET.fromstring(response.content).findtext("reason")


# --- limits ----------------------------------------------------------------------------


def test_current_equal_to_max_is_still_authorized(sim, http):
    sim.backend.set_usage("555", "a1b2c3", "hits", 1000, "day")
    assert auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}").status_code == 200
    sim.backend.set_usage("555", "a1b2c3", "hits", 1001, "day")
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}")
    assert r.status_code == 409
    assert reason(r) == "usage limits are exceeded"


def test_predicted_usage_checks_current_plus_usage_on_listed_metrics_and_ancestors(sim, http):
    sim.backend.set_usage("555", "a1b2c3", "hits", 998, "day")
    base = f"app_id=a1b2c3&app_key=s3cr3t&{PK}"
    assert auth(http, sim, base + "&usage[hits]=2").status_code == 200
    assert auth(http, sim, base + "&usage[hits]=3").status_code == 409
    # update is a child of hits: 998 + 3 on hits/day > 1000
    assert auth(http, sim, base + "&usage%5Bupdate%5D=3").status_code == 409
    # with flat_usage the usage is not propagated to hits
    r = auth(http, sim, base + "&usage[update]=3", headers={"3scale-options": "flat_usage=1"})
    assert r.status_code == 200


def test_predicted_usage_ignores_exceeded_metrics_not_listed(sim, http):
    sim.backend.set_usage("555", "a1b2c3", "search", 50, "minute")  # over 10
    base = f"app_id=a1b2c3&app_key=s3cr3t&{PK}"
    assert auth(http, sim, base).status_code == 409  # no usage: any exceeded limit denies
    assert auth(http, sim, base + "&usage[other]=1").status_code == 200
    assert auth(http, sim, base + "&usage[search]=1").status_code == 409


def test_predicted_usage_set_value(sim, http):
    sim.backend.set_usage("555", "a1b2c3", "hits", 999, "day")
    base = f"app_id=a1b2c3&app_key=s3cr3t&{PK}"
    assert auth(http, sim, base + "&usage[hits]=%23500").status_code == 200  # '#500' sets
    assert auth(http, sim, base + "&usage[hits]=%231001").status_code == 409


def test_authorize_does_not_count_usage(sim, http):
    auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}&usage[hits]=5")
    assert sim.backend.usage("555", "a1b2c3") == {}
    assert sim.backend.received() == {}


@pytest.mark.parametrize("usage, status, code", [
    ("usage[nope]=1", 404, "metric_invalid"),
    ("usage[hits]=-1", 403, "usage_value_invalid"),
    ("usage[hits]=1.5", 403, "usage_value_invalid"),
    ("usage[hits]=", 403, "usage_value_invalid"),
])
def test_bad_predicted_usage(sim, http, usage, status, code):
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}&{usage}")
    assert r.status_code == status
    assert error_code(r) == code


@pytest.mark.parametrize("query", ["usage=1", "usage=", "usage[]=1"])
def test_non_hash_usage_is_a_bare_403(sim, http, query):
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}&{query}")
    assert r.status_code == 403
    assert r.content == b""


def test_usage_hash_clash_is_a_400(sim, http):
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}&usage=1&usage[hits]=1")
    assert r.status_code == 400
    assert error_code(r) == "bad_request"


# --- service credentials (§1.3, §4.4) ----------------------------------------------------


@pytest.mark.parametrize("creds, status, code, message", [
    ("", 403, "provider_key_or_service_token_required",
     "Provider key or service token are required"),
    ("service_id=555", 403, "provider_key_or_service_token_required",
     "Provider key or service token are required"),
    ("service_token=st-555", 422, "service_id_missing", "Service ID is missing"),
    ("service_token=nope&service_id=555", 403, "service_token_invalid",
     'service token "nope" or service id "555" is invalid'),
    ("service_token=st-555&service_id=556", 403, "service_token_invalid",
     'service token "st-555" or service id "556" is invalid'),
    ("provider_key=bad", 403, "provider_key_invalid_or_service_missing",
     'provider key "bad" invalid and/or service ID missing'),
    ("provider_key=bad&service_id=555", 403, "provider_key_invalid",
     'provider key "bad" is invalid'),
    ("provider_key=pk123&service_id=999", 403, "service_id_invalid",
     'service id "999" is invalid'),
    ("provider_key=pk-other&service_id=555", 403, "service_id_invalid",
     'service id "555" is invalid'),
    # provider_key wins over a valid service token
    ("provider_key=bad&service_token=st-555&service_id=555", 403, "provider_key_invalid",
     'provider key "bad" is invalid'),
])
def test_credential_errors(sim, http, creds, status, code, message):
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{creds}")
    assert r.status_code == status
    assert r.headers["Content-Type"] == XML_TYPE
    assert error_code(r) == code
    assert ET.fromstring(r.content).text == message


@pytest.mark.parametrize("creds", [
    "provider_key=pk123",                       # default service
    "provider_key=pk123&service_id=555",
    "service_token=st-555&service_id=555",
    "provider_key=%20%20&service_token=st-555&service_id=555",  # blank provider_key is absent
    "provider_key=pk123&service_id=",           # blank service_id: default service
])
def test_valid_credentials(sim, http, creds):
    assert auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{creds}").status_code == 200


def test_provider_without_service_id_uses_its_default_service(sim, http):
    # "api1" lives in service 556, not in pk123's default 555
    assert auth(http, sim, f"user_key=uk1&{PK}").status_code == 403
    assert auth(http, sim, f"user_key=uk1&{PK}&service_id=556").status_code == 200


def test_user_id_is_rejected(sim, http):
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}&user_id=bob")
    assert r.status_code == 400
    assert error_code(r) == "end_users_no_longer_supported"


def test_invalid_utf8_is_not_valid_data(sim, http):
    r = auth(http, sim, f"app_id=%ff&{PK}")
    assert r.status_code == 422
    assert error_code(r) == "not_valid_data"


# --- applications and validators -----------------------------------------------------------


@pytest.mark.parametrize("app, status, code", [
    ("app_id=nobody", 404, "application_not_found"),
    ("", 404, "application_not_found"),
    ("app_id=%20", 404, "application_not_found"),
    ("app_id=a1b2c3&user_key=uk-on-2", 403, "authentication_error"),
    ("user_key=unknown", 403, "user_key_invalid"),
])
def test_application_errors(sim, http, app, status, code):
    r = auth(http, sim, f"{app}&{PK}")
    assert r.status_code == status
    assert error_code(r) == code


def test_missing_app_id_message(sim, http):
    r = auth(http, sim, PK)
    assert ET.fromstring(r.content).text == "application id is missing"


def test_user_key_service_needs_no_app_key_and_app_id_service_checks_keys(sim, http):
    assert auth(http, sim, f"user_key=uk1&service_id=556&{PK}").status_code == 200
    assert auth(http, sim, f"app_id=a1b2c3&app_key=other-key&{PK}").status_code == 200
    r = auth(http, sim, f"app_id=a1b2c3&{PK}")
    assert (r.status_code, reason(r)) == (409, "application key is missing")
    r = auth(http, sim, f"app_id=a1b2c3&app_key=&{PK}")
    assert (r.status_code, reason(r)) == (409, "application key is missing")
    r = auth(http, sim, f"app_id=a1b2c3&app_key=x&{PK}",
             headers={"3scale-options": "rejection_reason_header=1"})
    assert (r.status_code, reason(r)) == (409, 'application key "x" is invalid')
    assert r.headers["3scale-rejection-reason"] == "application_key_invalid"
    # an app without keys needs none; its app_key is not checked
    assert auth(http, sim, f"app_id=nokeys&app_key=whatever&{PK}").status_code == 200


def test_app_key_is_stripped(sim, http):
    assert auth(http, sim, f"app_id=a1b2c3&app_key=+s3cr3t+&{PK}").status_code == 200


def test_user_key_reaches_app_on_app_id_service(sim, http):
    assert auth(http, sim, f"user_key=uk-on-2&{PK}").status_code == 200


@pytest.mark.parametrize("referrer, status, text", [
    ("&referrer=www.example.org", 200, None),
    ("&referrer=a.b.example.org", 200, None),
    ("&referrer=api.test", 200, None),
    ("&referrer=*", 200, None),                        # the bypass value
    ("&referrer=example.org", 409, 'referrer "example.org" is not allowed'),
    ("&referrer=api.test.evil", 409, 'referrer "api.test.evil" is not allowed'),
    ("", 409, "referrer is missing"),
])
def test_referrer_filters(sim, http, referrer, status, text):
    r = auth(http, sim, f"app_id=ref&{PK}{referrer}",
             headers={"3scale-options": "rejection_reason_header=1"})
    assert r.status_code == status
    if text:
        assert reason(r) == text
        assert r.headers["3scale-rejection-reason"] == "referrer_not_allowed"


def test_inactive_application_is_denied_after_key_check(sim, http):
    r = auth(http, sim, f"app_id=suspended&{PK}",
             headers={"3scale-options": "rejection_reason_header=1"})
    assert (r.status_code, reason(r)) == (409, "application is not active")
    assert r.headers["3scale-rejection-reason"] == "application_not_active"


def test_no_body_extension_and_deprecated_param(sim, http):
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}",
             headers={"3scale-options": "no_body=1"})
    assert (r.status_code, r.content) == (200, b"")
    r = auth(http, sim, f"app_id=nobody&{PK}&no_body=true")
    assert (r.status_code, r.content) == (404, b"")
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}",
             headers={"3scale-options": "no_body=0"})
    assert r.content.startswith(b"<?xml")


def test_list_app_keys_extension(sim, http):
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}",
             headers={"3scale-options": "list_app_keys=1"})
    assert (b'<app_keys app="a1b2c3" svc="555"><key id="s3cr3t"/><key id="other-key"/>'
            b"</app_keys></status>") in r.content


# --- oauth_authorize -------------------------------------------------------------------------


def test_oauth_on_non_oauth_service_is_409_oauth_not_enabled(sim, http):
    r = auth(http, sim, f"app_id=a1b2c3&{PK}", endpoint="oauth_authorize",
             headers={"3scale-options": "rejection_reason_header=1"})
    assert r.status_code == 409
    assert reason(r) == "oauth is not enabled"
    assert r.headers["3scale-rejection-reason"] == "oauth_not_enabled"
    assert ET.fromstring(r.content).findtext("application/id") == "a1b2c3"


def test_oauth_requires_app_id(sim, http):
    r = auth(http, sim, f"service_id=557&{PK}", endpoint="oauth_authorize")
    assert (r.status_code, error_code(r)) == (404, "application_not_found")


def test_oauth_access_token_stands_for_the_app(sim, http):
    r = auth(http, sim, f"service_id=557&access_token=tok1&{PK}", endpoint="oauth_authorize")
    assert r.status_code == 200
    assert ET.fromstring(r.content).findtext("application/id") == "94bd2de3"
    r = auth(http, sim, f"service_id=557&access_token=bad&{PK}", endpoint="oauth_authorize")
    assert (r.status_code, error_code(r)) == (404, "access_token_invalid")
    # with an app_id the token is not looked at
    r = auth(http, sim, f"service_id=557&app_id=94bd2de3&access_token=bad&{PK}",
             endpoint="oauth_authorize")
    assert r.status_code == 200


@pytest.mark.parametrize("extra, status, text", [
    ("", 200, None),
    ("&app_key=883bdb8dbc3b6b77dbcf26845560fdbb", 200, None),
    ("&app_key=", 409, "application key is missing"),   # present-but-empty forces the check
    ("&app_key=bad", 409, 'application key "bad" is invalid'),
    ("&redirect_url=http%3A%2F%2Fevil", 409, 'redirect_url "http://evil" is invalid'),
    ("&redirect_uri=http%3A%2F%2Fevil", 409, 'redirect_uri "http://evil" is invalid'),
])
def test_oauth_key_and_redirect_checks(sim, http, extra, status, text):
    r = auth(http, sim, f"service_id=557&app_id=94bd2de3&{PK}{extra}",
             endpoint="oauth_authorize")
    assert r.status_code == status
    if text:
        assert reason(r) == text


def test_plain_authorize_on_oauth_service_checks_key_only_when_given(sim, http):
    assert auth(http, sim, f"service_id=557&app_id=94bd2de3&{PK}").status_code == 200
    r = auth(http, sim, f"service_id=557&app_id=94bd2de3&app_key=bad&{PK}")
    assert r.status_code == 409
    assert b"<application>" not in r.content


# --- what xcflushd learns about metric names (known_metrics.py) ---------------------------

HIERARCHY = {"3scale-options": "hierarchy=1&rejection_reason_header=1"}
NO_BODY = {"3scale-options": "no_body=1&rejection_reason_header=1"}


def usage_reports(response):
    return [(u.get("metric"), u.get("period"), u.findtext("max_value"), u.findtext("current_value"))
            for u in ET.fromstring(response.content).iter("usage_report")]


def test_a_predicted_usage_of_0_still_has_its_name_checked(sim, http):
    r = auth(http, sim, f"app_id=a1b2c3&app_key=s3cr3t&{PK}&usage[hits]=0&usage[nope]=0", headers=HIERARCHY)
    assert (r.status_code, error_code(r)) == (404, "metric_invalid")
    assert ET.fromstring(r.content).text == 'metric "nope" is invalid'
    assert "3scale-rejection-reason" not in r.headers


def test_a_predicted_usage_of_0_leaves_every_usage_report_as_it_is(sim, http):
    sim.backend.set_usage("555", "a1b2c3", "search", 50, "minute")  # over its 10
    base = f"app_id=a1b2c3&app_key=s3cr3t&{PK}"
    plain = auth(http, sim, base, headers=HIERARCHY)
    predicted = auth(http, sim, base + "&usage[hits]=0", headers=HIERARCHY)
    # Only hits (and its ancestors) is judged, but the reports list every limit either way.
    assert (plain.status_code, predicted.status_code) == (409, 200)
    assert usage_reports(plain) == usage_reports(predicted) and len(usage_reports(plain)) == 4


@pytest.mark.parametrize("app", ["app_id=a1b2c3&app_key=wrong", "app_id=suspended"])
def test_names_are_checked_after_the_validators_with_a_body_and_before_them_with_no_body(sim, http, app):
    query = f"{app}&{PK}&usage[nope]=0"
    with_body = auth(http, sim, query, headers=HIERARCHY)
    assert with_body.status_code == 409  # a key or state denial: the names were never looked at
    bare = auth(http, sim, query, headers=NO_BODY)
    assert (bare.status_code, bare.content) == (404, b"")  # an unknown name, and no body to say so
    known = auth(http, sim, f"{app}&{PK}&usage[hits]=0&usage[search]=0", headers=NO_BODY)
    assert (known.status_code, known.content) == (409, b"")


def test_with_no_body_an_unknown_application_is_the_same_bare_404(sim, http):
    r = auth(http, sim, f"app_id=ghost&{PK}&usage[hits]=0", headers=NO_BODY)
    assert (r.status_code, r.content) == (404, b"")


def test_with_no_body_names_are_looked_up_as_given(sim, http):
    # apisonator strips names when it parses usage (the body path), not when it loads limits.
    query = f"app_id=nokeys&{PK}&usage[%20hits]=0"
    assert auth(http, sim, query, headers=HIERARCHY).status_code == 200
    assert auth(http, sim, query, headers=NO_BODY).status_code == 404
