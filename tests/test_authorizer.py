"""Per-metric authorization values (decision 4), from parsed backend answers."""

import pytest

from xcflushd.authorizer import authorizations
from xcflushd.backend import Response, parse_status
from xcflushd.errors import BackendRejected, BackendUnavailable

XML = "application/vnd.3scale-v2.0+xml"
EXAMPLE_B = (
    '<?xml version="1.0" encoding="UTF-8"?><status><authorized>false</authorized>'
    "<reason>usage limits are exceeded</reason><plan>Basic</plan><usage_reports>"
    '<usage_report metric="hits" period="day" exceeded="true"><period_start>2017-06-21 00:00:00 +0000</period_start>'
    "<period_end>2017-06-22 00:00:00 +0000</period_end><max_value>1000</max_value>"
    "<current_value>1003</current_value></usage_report>"
    '<usage_report metric="hits" period="eternity"><max_value>1000000</max_value>'
    "<current_value>53271</current_value></usage_report>"
    '<usage_report metric="search" period="minute"><period_start>2017-06-21 14:55:00 +0000</period_start>'
    "<period_end>2017-06-21 14:56:00 +0000</period_end><max_value>10</max_value>"
    "<current_value>3</current_value></usage_report></usage_reports>"
    '<hierarchy><metric name="hits" children="search update"/><metric name="hits" children="search update"/>'
    '<metric name="search" children=""/></hierarchy></status>'
)


def response(status, body, ctype=XML, **headers):
    msg = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    if ctype:
        msg["content-type"] = ctype
    return Response(status, msg, body.encode())


def test_example_b_parents_deny_children_unlimited_metric_allowed():
    status = parse_status(response(409, EXAMPLE_B, **{"3scale_rejection_reason": "limits_exceeded"}))
    assert authorizations(status, ["hits", "search", "update", "other"]) == {
        "hits": "0:limits_exceeded", "search": "0:limits_exceeded",
        "update": "0:limits_exceeded", "other": "1"}


def test_limits_detected_from_reason_text_without_header():
    status = parse_status(response(409, EXAMPLE_B))
    assert status.limits_exceeded


def test_current_equal_to_max_denies_the_next_hit():
    body = EXAMPLE_B.replace("<current_value>3</current_value>", "<current_value>10</current_value>")
    body = body.replace("<current_value>1003</current_value>", "<current_value>999</current_value>")
    body = body.replace("false</authorized><reason>usage limits are exceeded</reason>", "true</authorized>")
    values = authorizations(parse_status(response(200, body)), ["hits"])
    assert values == {"hits": "1", "search": "0:limits_exceeded"}


def test_grandchildren_of_a_denied_metric_are_denied():
    body = EXAMPLE_B.replace('<metric name="search" children=""/>', '<metric name="search" children="deep"/>')
    values = authorizations(parse_status(response(409, body)), ["deep"])
    assert values["deep"] == "0:limits_exceeded"


def test_non_limit_denial_uses_the_rejection_code():
    body = ('<?xml version="1.0" encoding="UTF-8"?><status><authorized>false</authorized>'
            '<reason>application key "x" is invalid</reason><plan>Basic</plan></status>')
    coded = parse_status(response(409, body, **{"3scale_rejection_reason": "application_key_invalid"}))
    assert authorizations(coded, ["hits", "search"]) == {"hits": "0:application_key_invalid",
                                                         "search": "0:application_key_invalid"}
    bare = parse_status(response(409, body))
    assert authorizations(bare, ["hits"]) == {"hits": "0"}


def test_application_errors_are_cached_as_denials():
    body = '<?xml version="1.0" encoding="UTF-8"?><error code="application_not_found">nope</error>'
    assert authorizations(parse_status(response(404, body)), ["hits"]) == {"hits": "0:application_not_found"}


def test_our_credential_errors_raise_instead_of_denying_everyone():
    body = ('<?xml version="1.0" encoding="UTF-8"?>'
            '<error code="provider_key_invalid">provider key "pk" is invalid</error>')
    with pytest.raises(BackendRejected) as info:
        parse_status(response(403, body))
    assert info.value.code == "provider_key_invalid"
    assert '"pk"' not in str(info.value)


@pytest.mark.parametrize("status,body,ctype", [
    (500, "Internal Server Error\n", "text/plain"),
    (503, "<html><body>down</body></html>", "text/html"),
    (200, EXAMPLE_B[: len(EXAMPLE_B) // 2], XML),
    (200, "not xml at all", XML),
    (200, EXAMPLE_B, "text/html"),
    (200, '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><status>&b;</status>', XML),
    (200, "<status><plan>x</plan></status>", XML),
])
def test_garbage_is_an_error_for_that_call(status, body, ctype):
    with pytest.raises(BackendUnavailable):
        parse_status(response(status, body, ctype))


@pytest.mark.parametrize("body", [
    b'<?xml version="1.0"?><!DOCTYPE status><status><authorized>true</authorized></status>',
    b'<!DOCTYPE s SYSTEM "file:///etc/passwd"><status><authorized>true</authorized></status>',
    '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE s [<!ENTITY a "true">]>'
    '<status><authorized>&a;</authorized></status>'.encode("utf-16"),
    # no "<!" in ASCII bytes: the fast path (no checking pass) must not take these
    '<?xml version="1.0" encoding="UTF-16BE"?><!DOCTYPE s [<!ENTITY a "true">]>'
    '<status><authorized>&a;</authorized></status>'.encode("utf-16-be"),
    '<?xml version="1.0" encoding="UTF-16LE"?><!DOCTYPE s [<!ENTITY a "true">]>'
    '<status><authorized>&a;</authorized></status>'.encode("utf-16-le"),
])
def test_a_status_document_declaring_a_dtd_is_refused_whatever_its_encoding(body):
    with pytest.raises(BackendUnavailable, match="DTDForbidden"):
        parse_status(Response(200, {"content-type": XML}, body))


def test_empty_4xx_is_an_error_not_a_denial():
    with pytest.raises(BackendRejected):
        parse_status(response(403, "", None))
