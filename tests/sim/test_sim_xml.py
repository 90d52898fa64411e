"""The simulator's XML is byte-exact to threescale-backend.md §4.1/§4.2/§4.6 (one line)."""

import re

import defusedxml.ElementTree as ET
import pytest

from xcflushd_sim.server import Simulator

from .helpers import NOW, XML_TYPE, auth, spec_config


def one_line(pretty: str) -> bytes:
    """The spec pretty-prints; the backend sends the same document without whitespace."""
    return re.sub(r">\s+<", "><", pretty.strip()).encode()


EXAMPLE_A = one_line("""
<?xml version="1.0" encoding="UTF-8"?>
<status>
  <authorized>true</authorized>
  <plan>Basic</plan>
  <usage_reports>
    <usage_report metric="hits" period="day">
      <period_start>2017-06-21 00:00:00 +0000</period_start>
      <period_end>2017-06-22 00:00:00 +0000</period_end>
      <max_value>1000</max_value>
      <current_value>42</current_value>
    </usage_report>
    <usage_report metric="hits" period="month">
      <period_start>2017-06-01 00:00:00 +0000</period_start>
      <period_end>2017-07-01 00:00:00 +0000</period_end>
      <max_value>20000</max_value>
      <current_value>7310</current_value>
    </usage_report>
    <usage_report metric="hits" period="eternity">
      <max_value>1000000</max_value>
      <current_value>52310</current_value>
    </usage_report>
    <usage_report metric="search" period="minute">
      <period_start>2017-06-21 14:55:00 +0000</period_start>
      <period_end>2017-06-21 14:56:00 +0000</period_end>
      <max_value>10</max_value>
      <current_value>3</current_value>
    </usage_report>
  </usage_reports>
  <hierarchy>
    <metric name="hits" children="search update"/>
    <metric name="hits" children="search update"/>
    <metric name="hits" children="search update"/>
    <metric name="search" children=""/>
  </hierarchy>
</status>
""")

EXAMPLE_B = one_line("""
<?xml version="1.0" encoding="UTF-8"?>
<status>
  <authorized>false</authorized>
  <reason>usage limits are exceeded</reason>
  <plan>Basic</plan>
  <usage_reports>
    <usage_report metric="hits" period="day" exceeded="true">
      <period_start>2017-06-21 00:00:00 +0000</period_start>
      <period_end>2017-06-22 00:00:00 +0000</period_end>
      <max_value>1000</max_value>
      <current_value>1003</current_value>
    </usage_report>
    <usage_report metric="hits" period="month">
      <period_start>2017-06-01 00:00:00 +0000</period_start>
      <period_end>2017-07-01 00:00:00 +0000</period_end>
      <max_value>20000</max_value>
      <current_value>8271</current_value>
    </usage_report>
    <usage_report metric="hits" period="eternity">
      <max_value>1000000</max_value>
      <current_value>53271</current_value>
    </usage_report>
    <usage_report metric="search" period="minute">
      <period_start>2017-06-21 14:55:00 +0000</period_start>
      <period_end>2017-06-21 14:56:00 +0000</period_end>
      <max_value>10</max_value>
      <current_value>3</current_value>
    </usage_report>
  </usage_reports>
  <hierarchy>
    <metric name="hits" children="search update"/>
    <metric name="hits" children="search update"/>
    <metric name="hits" children="search update"/>
    <metric name="search" children=""/>
  </hierarchy>
</status>
""")

# Element order as the backend emits it: <application> before <plan> (spec §4.6 note).
EXAMPLE_D = one_line("""
<?xml version="1.0" encoding="UTF-8"?>
<status>
  <authorized>true</authorized>
  <application>
    <id>94bd2de3</id>
    <key>883bdb8dbc3b6b77dbcf26845560fdbb</key>
    <redirect_url>http://localhost:8080/oauth/oauth_redirect</redirect_url>
  </application>
  <plan>Ultimate</plan>
  <usage_reports>
    <usage_report metric="hits" period="week">
      <period_start>2017-06-19 00:00:00 +0000</period_start>
      <period_end>2017-06-26 00:00:00 +0000</period_end>
      <max_value>5000</max_value>
      <current_value>1</current_value>
    </usage_report>
  </usage_reports>
</status>
""")

A_QUERY = "app_id=a1b2c3&app_key=s3cr3t&service_id=555&provider_key=pk123"


def set_hits(sim, day, month, eternity, search_minute):
    backend = sim.backend
    backend.set_usage("555", "a1b2c3", "hits", day, "day")
    backend.set_usage("555", "a1b2c3", "hits", month, "month")
    backend.set_usage("555", "a1b2c3", "hits", eternity, "eternity")
    backend.set_usage("555", "a1b2c3", "search", search_minute, "minute")


def test_example_a_authorized_with_hierarchy_is_byte_exact(sim, http):
    set_hits(sim, 42, 7310, 52310, 3)
    r = auth(http, sim, A_QUERY, headers={"3scale-options": "hierarchy=1"})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == XML_TYPE
    assert r.content == EXAMPLE_A
    assert b"\n" not in r.content


def test_example_b_limits_exceeded_is_byte_exact_with_rejection_header(sim, http):
    set_hits(sim, 1003, 8271, 53271, 3)
    r = auth(http, sim, A_QUERY,
             headers={"3scale-options": "hierarchy=1&rejection_reason_header=1"})
    assert r.status_code == 409
    assert r.content == EXAMPLE_B
    assert r.headers["3scale-rejection-reason"] == "limits_exceeded"


def test_rejection_header_only_when_requested_with_exactly_1(sim, http):
    set_hits(sim, 1003, 0, 0, 0)
    for options in ("", "rejection_reason_header=true", "rejection_reason_header=0"):
        r = auth(http, sim, A_QUERY, headers={"3scale-options": options})
        assert r.status_code == 409
        assert "3scale-rejection-reason" not in r.headers


def test_hierarchy_only_with_exactly_1(sim, http):
    for options in ("", "hierarchy=true", "hierarchy=0", "hierarchy"):
        r = auth(http, sim, A_QUERY, headers={"3scale-options": options})
        assert r.status_code == 200
        assert b"<hierarchy>" not in r.content


def test_hierarchy_also_on_409(sim, http):
    r = auth(http, sim, "app_id=a1b2c3&app_key=nope&service_id=555&provider_key=pk123",
             headers={"3scale-options": "hierarchy=1"})
    assert r.status_code == 409
    assert r.content.endswith(b'<metric name="search" children=""/></hierarchy></status>')


@pytest.mark.parametrize("query, status, body", [
    ("user_key=bad_key&service_id=556&provider_key=pk123", 403,
     b'<error code="user_key_invalid">user key "bad_key" is invalid</error>'),
    ("app_id=foo&service_id=555&provider_key=pk123", 404,
     b'<error code="application_not_found">application with id="foo" was not found</error>'),
    ("app_id=a1b2c3&service_id=555&provider_key=pk_bad", 403,
     b'<error code="provider_key_invalid">provider key "pk_bad" is invalid</error>'),
])
def test_example_c_error_documents_are_byte_exact(sim, http, query, status, body):
    r = auth(http, sim, query)
    assert r.status_code == status
    assert r.headers["Content-Type"] == XML_TYPE
    assert r.content == b'<?xml version="1.0" encoding="UTF-8"?>' + body


def test_example_d_oauth_authorize_has_application_section(sim, http):
    sim.backend.set_usage("557", "94bd2de3", "hits", 1, "week")
    r = auth(http, sim, "app_id=94bd2de3&service_id=557&redirect_url=http%3A%2F%2Flocalhost"
                        "%3A8080%2Foauth%2Foauth_redirect&provider_key=pk123",
             endpoint="oauth_authorize")
    assert r.status_code == 200
    assert r.content == EXAMPLE_D


def test_oauth_redirect_uri_param_names_the_element(sim, http):
    r = auth(http, sim, "app_id=94bd2de3&service_id=557&provider_key=pk123&redirect_uri="
                        "http%3A%2F%2Flocalhost%3A8080%2Foauth%2Foauth_redirect",
             endpoint="oauth_authorize")
    assert r.status_code == 200
    assert (b"<redirect_uri>http://localhost:8080/oauth/oauth_redirect</redirect_uri>"
            b"</application>") in r.content


def test_example_e_non_limits_denial_and_plan_without_limits(sim, http):
    r = auth(http, sim, "app_id=free&app_key=wrong&service_id=555&provider_key=pk123")
    assert r.status_code == 409
    assert r.content == (b'<?xml version="1.0" encoding="UTF-8"?><status><authorized>false'
                         b'</authorized><reason>application key "wrong" is invalid</reason>'
                         b"<plan>Free</plan></status>")


def test_exceeded_only_when_current_is_greater_than_max(sim, http):
    set_hits(sim, 1000, 0, 0, 11)
    r = auth(http, sim, A_QUERY)
    assert r.status_code == 409  # search/minute 11 > 10
    doc = ET.fromstring(r.content)
    flags = {(u.get("metric"), u.get("period")): u.get("exceeded")
             for u in doc.iter("usage_report")}
    assert flags == {("hits", "day"): None, ("hits", "month"): None,
                     ("hits", "eternity"): None, ("search", "minute"): "true"}


def test_eternity_has_no_period_bounds_and_others_do(sim, http):
    r = auth(http, sim, A_QUERY)
    for report in ET.fromstring(r.content).iter("usage_report"):
        has_bounds = report.find("period_start") is not None
        assert has_bounds == (report.get("period") != "eternity")
        assert (report.find("period_end") is not None) == has_bounds


def test_special_characters_are_escaped():
    config = spec_config()
    service = config["services"][0]
    service["plans"]['A&B <"x">'] = {"hits": {"day": 1}}
    service["applications"].append({"app_id": "esc", "plan": 'A&B <"x">',
                                     "referrers": ["ok.example"]})
    with Simulator(config, clock=lambda: NOW) as sim:
        import requests
        r = requests.get(f"{sim.url}/transactions/authorize.xml?app_id=esc&provider_key=pk123"
                         "&referrer=%3Cscript%3E%26")
    assert r.status_code == 409
    assert (b'<reason>referrer "&lt;script&gt;&amp;" is not allowed</reason>'
            b'<plan>A&amp;B &lt;"x"&gt;</plan>') in r.content
    doc = ET.fromstring(r.content)
    assert doc.findtext("plan") == 'A&B <"x">'
