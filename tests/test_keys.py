"""The gateway's wire format, byte for byte (shared protocol, section 7)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xcflushd import keys
from xcflushd.errors import MalformedKey
from xcflushd.keys import (
    Credentials,
    auth_key,
    auth_request_message,
    denial_reason,
    parse_auth_request,
    parse_report_key,
    parse_usage,
    report_key,
    split_suffixed,
)


def test_credentials_sorted_and_escaped_as_in_the_ruby_spec():
    creds = Credentials({"app_key": "ak", "referrer": "r", "app_id": "a:i,1"})
    assert creds.encode() == "app_id:a\\:i\\,1,app_key:ak,referrer:r"


def test_protocol_examples():
    creds = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t", "referrer": "example.org"})
    assert auth_key("555", creds) == "auth,service_id:555,app_id:a1b2c3,app_key:s3cr3t,referrer:example.org"
    assert report_key("555", creds) == "report,service_id:555,app_id:a1b2c3,app_key:s3cr3t"
    assert auth_key("555", Credentials({"user_key": "a:user,key"})) == "auth,service_id:555,user_key:a\\:user\\,key"
    assert auth_request_message("555", creds, "hits") == \
        "service_id:555,app_id:a1b2c3,app_key:s3cr3t,referrer:example.org,metric:hits"


def test_unknown_credential_names_are_dropped():
    creds = Credentials.decode("app_id:x,color:blue,user_key:k")
    assert creds.items() == (("app_id", "x"), ("user_key", "k"))


@pytest.mark.parametrize("service_id,fields", [
    ("555", {"app_id": "a1", "app_key": "k"}),
    ("5:5,5", {"user_key": "u:s,e\\r"}),
    ("1", {"access_token": "t,o:k", "app_id": "a", "user_id": "u"}),
])
def test_report_key_round_trip(service_id, fields):
    creds = Credentials(fields)
    assert parse_report_key(report_key(service_id, creds)) == (service_id, creds)


def test_report_key_leaves_referrer_out():
    with_ref = Credentials({"app_id": "a", "referrer": "x.org"})
    without = Credentials({"app_id": "a"})
    assert report_key("1", with_ref) == report_key("1", without)


def test_auth_request_keeps_raw_message_for_channel_and_key():
    raw = "service_id:5\\:5,app_id:a\\,b,referrer:r.org,metric:se\\,arch"
    req = parse_auth_request(raw)
    assert req.service_id == "5:5"
    assert req.metric == "se,arch"
    assert req.credentials.get("app_id") == "a,b"
    assert req.response_channel == "xc_channel_auth_response:" + raw
    assert req.auth_key == "auth,service_id:5\\:5,app_id:a\\,b,referrer:r.org"


@pytest.mark.parametrize("raw", [
    "", "metric:hits", "service_id:1,metric:hits", "service_id:1,app_id:a", "app_id:a,service_id:1,metric:m",
    "service_id:1,app_id:a,metric:", "service_id:,app_id:a,metric:hits", "service_id:1,nocolon,metric:hits",
    "service_id:1,color:blue,metric:hits",
])
def test_malformed_auth_requests_are_refused(raw):
    with pytest.raises(MalformedKey):
        parse_auth_request(raw)


def test_usage_values_split_into_good_and_bad():
    usage, bad = parse_usage({"hits": "17", "search": "0", "up": "x", "neg": "-3"})
    assert usage == {"hits": 17}
    assert bad == {"up": "x", "neg": "-3"}


def test_hand_over_suffixes():
    assert split_suffixed("to_flush:report,service_id:1,app_id:a_20170621145501_0123456789ab", "to_flush:") == \
        ("report,service_id:1,app_id:a", "0123456789ab")
    assert split_suffixed("flushing_report_keys_20170621145501", "flushing_report_keys") == ("", None)
    assert split_suffixed("to_flush:report,service_id:1,app_id:a_20170621145501_0123456789ab-3", "to_flush:") == \
        ("report,service_id:1,app_id:a", "0123456789ab")
    with pytest.raises(MalformedKey):
        split_suffixed("to_flush:report,service_id:1,app_id:a", "to_flush:")


def test_denial_reason_as_the_gateway_reads_it():
    assert denial_reason("0:limits_exceeded") == "limits_exceeded"
    assert denial_reason("0") is None
    assert denial_reason("1") is None


def test_redacted_credentials_hide_secrets():
    creds = Credentials({"app_id": "visible", "app_key": "supersecretkey", "user_key": "abc"})
    text = creds.redacted()
    assert "visible" in text and "supersecretkey" not in text and "supe..." in text


def _regex_fields(text):
    """The general path, for any text: split at unescaped commas, then at the first unescaped colon."""
    pairs = []
    for field in keys._SEP.split(text):
        parts = keys._NAME_VALUE.split(field, 1)
        if len(parts) != 2:
            return None
        pairs.append((keys.unescape(parts[0]), keys.unescape(parts[1])))
    return pairs


@settings(max_examples=400, deadline=None)
@given(st.text(st.sampled_from("ab:,\\é \x00"), max_size=30), st.integers(0, 2))
def test_the_unescaped_fast_split_is_the_regular_expressions(text, maxsplit):
    assert keys._split(text, maxsplit) == keys._SEP.split(text, maxsplit)
    try:
        fields = keys._split_fields(text)
    except MalformedKey:
        fields = None
    assert fields == _regex_fields(text)
