"""POST /transactions.xml: envelope errors, whole-batch drops, ledgers, propagation (§2.4, §5)."""

import time

import defusedxml.ElementTree as ET
import pytest

from xcflushd_sim.server import Simulator

from .helpers import NOW, XML_TYPE, auth, report, spec_config

CREDS = "provider_key=pk123&service_id=555"


def tx(i, app=None, user_key=None, timestamp=None, **usage):
    parts = []
    if app is not None:
        parts.append(f"transactions[{i}][app_id]={app}")
    if user_key is not None:
        parts.append(f"transactions[{i}][user_key]={user_key}")
    if timestamp is not None:
        parts.append(f"transactions[{i}][timestamp]={timestamp}")
    parts += [f"transactions[{i}][usage][{m}]={v}" for m, v in usage.items()]
    return "&".join(parts)


def test_accepted_report_is_202_with_empty_body_and_counts(sim, http):
    r = report(http, sim, f"{tx(0, 'a1b2c3', hits=17, search=5)}&{CREDS}")
    assert (r.status_code, r.content) == (202, b"")
    assert r.headers["Content-Type"] == XML_TYPE
    assert r.headers["Content-Length"] == "0"
    assert sim.backend.received() == {"555": {"a1b2c3": {"hits": 17, "search": 5}}}
    assert sim.backend.calls() == {"authorize": 0, "oauth_authorize": 0, "report": 1}
    assert sim.backend.errors() == []


def test_percent_encoded_brackets_as_the_ruby_gem_sends_them(sim, http):
    body = ("transactions%5B0%5D%5Bapp_id%5D=a1b2c3&transactions%5B0%5D%5Busage%5D%5Bhits%5D=17"
            "&transactions%5B0%5D%5Busage%5D%5Bsearch%5D=5&provider_key=pk123&service_id=555")
    assert report(http, sim, body).status_code == 202
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 17, "search": 5}


def test_usage_propagates_to_ancestors_but_ledger_keeps_raw_usage(sim, http):
    report(http, sim, f"{tx(0, 'a1b2c3', hits=17, search=5)}&{CREDS}")
    assert sim.backend.usage("555", "a1b2c3") == {
        "hits": {p: 22 for p in ("minute", "hour", "day", "week", "month", "year", "eternity")},
        "search": {p: 5 for p in ("minute", "hour", "day", "week", "month", "year", "eternity")},
    }
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 17, "search": 5}
    r = auth(http, sim, "app_id=a1b2c3&app_key=s3cr3t&provider_key=pk123")
    values = {(u.get("metric"), u.get("period")): u.findtext("current_value")
              for u in ET.fromstring(r.content).iter("usage_report")}
    assert values[("hits", "day")] == "22"
    assert values[("search", "minute")] == "5"


def test_flat_usage_extension_does_not_propagate(sim, http):
    report(http, sim, f"{tx(0, 'a1b2c3', search=5)}&{CREDS}",
           headers={"3scale-options": "flat_usage=1"})
    assert sim.backend.usage("555", "a1b2c3") == {"search": {
        p: 5 for p in ("minute", "hour", "day", "week", "month", "year", "eternity")}}


def test_set_value_sets_counters_and_ledger(sim, http):
    report(http, sim, f"{tx(0, 'a1b2c3', hits=7)}&{CREDS}")
    report(http, sim, f"{tx(0, 'a1b2c3', hits='%2342')}&{CREDS}")  # '#42'
    assert sim.backend.usage("555", "a1b2c3")["hits"]["day"] == 42
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 42}
    report(http, sim, f"{tx(0, 'a1b2c3', search='%233')}&{CREDS}")  # a set propagates as a set
    assert sim.backend.usage("555", "a1b2c3")["hits"]["day"] == 3


def test_batch_over_several_apps_and_user_key_keyed_by_app_id(sim, http):
    body = "&".join([tx(0, "a1b2c3", hits=1), tx(5, user_key="uk-on-2", hits=2),
                     tx(9, "a1b2c3", update=3), CREDS])
    assert report(http, sim, body).status_code == 202
    assert sim.backend.received() == {"555": {"a1b2c3": {"hits": 1, "update": 3},
                                              "viakey": {"hits": 2}}}


def test_reports_ignore_limits_and_application_state(sim, http):
    body = "&".join([tx(0, "suspended", hits=5000), CREDS])
    assert report(http, sim, body).status_code == 202
    assert sim.backend.usage("555", "suspended")["hits"]["day"] == 5000
    assert sim.backend.errors() == []


@pytest.mark.parametrize("bad, code, message", [
    (tx(1, "ghost", hits=1), "application_not_found", 'application with id="ghost" was not found'),
    (tx(1, user_key="nope", hits=1), "user_key_invalid", 'user key "nope" is invalid'),
    (tx(1, "a1b2c3", user_key="uk-on-2", hits=1), "authentication_error",
     "either app_id or user_key is allowed, not both"),
    (tx(1, "a1b2c3", nope=1), "metric_invalid", 'metric "nope" is invalid'),
    (tx(1, "a1b2c3", hits="x1"), "usage_value_invalid",
     'usage value "x1" for metric "hits" is invalid'),
    (tx(1, "a1b2c3", hits="-1"), "usage_value_invalid",
     'usage value "-1" for metric "hits" is invalid'),
    (tx(1, "a1b2c3", timestamp=NOW - 86401, hits=1), "transaction_timestamp_too_old",
     "reporting transactions older than 86400 seconds is not allowed"),
    (tx(1, "a1b2c3", timestamp=NOW + 3601, hits=1), "transaction_timestamp_too_new",
     "reporting transactions more than 3600 seconds in the future is not allowed"),
])
def test_one_invalid_transaction_drops_the_whole_batch(sim, http, bad, code, message):
    body = "&".join([tx(0, "nokeys", hits=3), bad, tx(2, user_key="uk-on-2", search=4), CREDS])
    r = report(http, sim, body)
    assert (r.status_code, r.content) == (202, b"")  # the drop is asynchronous in 3scale
    assert sim.backend.received() == {}
    assert sim.backend.usage("555", "nokeys") == {}
    assert sim.backend.usage("555", "viakey") == {}
    [error] = sim.backend.errors()
    assert (error["service_id"], error["code"], error["message"]) == ("555", code, message)
    assert len(error["transactions"]) == 3
    assert error["transactions"][0] == {"app_id": "nokeys", "usage": {"hits": "3"}}
    dropped = sim.backend.dropped()["555"]
    assert dropped["nokeys"] == {"hits": 3}
    assert dropped["viakey"] == {"search": 4}


def test_timestamps_inside_the_window_are_accepted(sim, http):
    body = "&".join([tx(0, "a1b2c3", timestamp=NOW - 86400, hits=1),
                     tx(1, "a1b2c3", timestamp=NOW + 3600, hits=2),
                     tx(2, "a1b2c3", timestamp="2017-06-21%2014:00:00%20-01:00", hits=4),
                     tx(3, "a1b2c3", timestamp="not-a-time", hits=8), CREDS])
    assert report(http, sim, body).status_code == 202
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 15}
    usage = sim.backend.usage("555", "a1b2c3")["hits"]
    # 14:00 -01:00 is 15:00 UTC, in the next hour, as is now + 1 h; yesterday's hit is not
    # in today's counter
    assert (usage["hour"], usage["day"], usage["eternity"]) == (8, 14, 15)


def test_future_timestamps_do_not_evict_the_current_period(sim, http):
    body = "&".join([tx(0, "a1b2c3", hits=1)] + [
        tx(i, "a1b2c3", timestamp=NOW + 60 * i, hits=10) for i in range(1, 6)] + [CREDS])
    assert report(http, sim, body).status_code == 202
    assert sim.backend.usage("555", "a1b2c3")["hits"]["minute"] == 1


def test_all_zero_transactions_are_skipped_before_validation(sim, http):
    body = "&".join([tx(0, "ghost", hits=0), tx(1, "a1b2c3", hits=0, search=2), CREDS])
    assert report(http, sim, body).status_code == 202
    assert sim.backend.errors() == []
    assert sim.backend.received() == {"555": {"a1b2c3": {"search": 2}}}


def test_transaction_without_usage_still_validates_its_app(sim, http):
    body = "&".join(["transactions[0][app_id]=ghost", tx(1, "a1b2c3", hits=1), CREDS])
    assert report(http, sim, body).status_code == 202
    assert sim.backend.received() == {}
    assert sim.backend.errors()[0]["code"] == "application_not_found"


@pytest.mark.parametrize("body, status, code", [
    (CREDS, 400, "transactions_is_blank"),
    (f"transactions=&{CREDS}", 400, "transactions_is_blank"),
    (f"transactions=x&{CREDS}", 400, "transactions_format_invalid"),
    (f"transactions[]=x&{CREDS}", 400, "transactions_format_invalid"),
    (f"transactions[0]&{CREDS}", 400, "transactions_has_nil_transaction"),
    (f"{tx(0, 'a1b2c3', hits=1)}&transactions[0][user_id]=bob&{CREDS}", 400,
     "end_users_no_longer_supported"),
    (f"{tx(0, 'a1b2c3', hits=1)}&user_id=bob&{CREDS}", 400, "end_users_no_longer_supported"),
    (f"{tx(0, 'a1b2c3', hits=1)}", 403, "provider_key_or_service_token_required"),
    (f"{tx(0, 'a1b2c3', hits=1)}&service_token=st-555", 422, "service_id_missing"),
    (f"{tx(0, 'a1b2c3', hits=1)}&provider_key=bad&service_id=555", 403,
     "provider_key_invalid"),
    (f"{tx(0, 'a1b2c3', hits=1)}&provider_key=pk123&service_id=1", 403, "service_id_invalid"),
    (f"{tx(0, 'a1b2c3', hits=1)}&{CREDS}&x=%C3%28", 422, "not_valid_data"),
])
def test_envelope_errors_are_synchronous(sim, http, body, status, code):
    r = report(http, sim, body)
    assert r.status_code == status
    assert ET.fromstring(r.content).get("code") == code
    assert sim.backend.received() == {}
    assert sim.backend.errors() == []


def test_service_token_credentials_and_query_string_params(sim, http):
    r = http.post(f"{sim.url}/transactions.xml?service_token=st-555&service_id=555",
                  data=tx(0, "a1b2c3", hits=2),
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 202
    assert sim.backend.received() == {"555": {"a1b2c3": {"hits": 2}}}


def test_content_type_must_be_a_form(sim, http):
    r = report(http, sim, f"{tx(0, 'a1b2c3', hits=1)}&{CREDS}",
               headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert ET.fromstring(r.content).text == "invalid Content-Type: application/json"
    r = report(http, sim, f"{tx(0, 'a1b2c3', hits=1)}&{CREDS}",
               headers={"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"})
    assert r.status_code == 202


def test_rack_parameter_limit(sim, http):
    big = "&".join(tx(i, "a1b2c3", hits=1) for i in range(2051))  # 4102 params + 2 creds
    r = report(http, sim, f"{big}&{CREDS}")
    assert r.status_code == 400
    assert ET.fromstring(r.content).text == \
        "total number of query parameters (4104) exceeds limit (4096)"
    ok = "&".join(tx(i, "a1b2c3", hits=1) for i in range(2000))
    assert report(http, sim, f"{ok}&{CREDS}").status_code == 202
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 2000}


def test_errors_xml_lists_dropped_batches_newest_first(sim, http):
    report(http, sim, f"{tx(0, 'ghost', hits=1)}&{CREDS}")
    report(http, sim, f"{tx(0, 'a1b2c3', nope=1)}&{CREDS}")
    r = http.get(f"{sim.url}/transactions/errors.xml?{CREDS}")
    assert r.status_code == 200
    assert r.content == (
        b'<?xml version="1.0" encoding="UTF-8"?><errors>'
        b'<error code="metric_invalid" timestamp="2017-06-21 14:55:30 +0000">'
        b'metric "nope" is invalid</error>'
        b'<error code="application_not_found" timestamp="2017-06-21 14:55:30 +0000">'
        b'application with id="ghost" was not found</error></errors>')
    other = http.get(f"{sim.url}/transactions/errors.xml?provider_key=pk-other")
    assert other.content.endswith(b"<errors></errors>")
    assert http.delete(f"{sim.url}/transactions/errors.xml?{CREDS}").status_code == 200
    assert http.get(f"{sim.url}/transactions/errors.xml?{CREDS}").content.endswith(
        b"<errors></errors>")


def test_real_clock_is_used_by_default(http):
    with Simulator(spec_config()) as sim:
        body = f"{tx(0, 'a1b2c3', timestamp=int(time.time()) - 60, hits=1)}&{CREDS}"
        assert report(http, sim, body).status_code == 202
        assert sim.backend.received() == {"555": {"a1b2c3": {"hits": 1}}}


def test_one_unknown_metric_drops_its_own_transaction_whole(sim, http):
    # A single application's call: its known metric goes with the unknown one (observed).
    r = report(http, sim, f"{tx(0, 'nokeys', hits=3, hitz=1)}&{CREDS}")
    assert (r.status_code, r.content) == (202, b"")
    assert sim.backend.received() == {}
    assert sim.backend.dropped() == {"555": {"nokeys": {"hits": 3, "hitz": 1}}}
    assert [e["code"] for e in sim.backend.errors()] == ["metric_invalid"]
