"""The status document's fast path reads exactly what the XML parser reads.

``parse_status`` matches the backend's own one-line document with a regular
expression and sends every other document to the XML parser. These
properties hold the two to the same answer on generated documents, the
backend's shape with hostile text (escapes, quotes, ``]]>``, control and
non-ASCII characters) and with bytes inserted, deleted or changed anywhere.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xcflushd.backend import (
    BackendClient,
    BackendUnavailable,
    ServiceCredentials,
    _canonical_status,
    _tree_status,
    make_client,
    parse_status,
)
from xcflushd.errors import BackendError
from xcflushd.keys import Credentials
from xcflushd.transport import Response
from xcflushd_sim.xmldoc import escape_attr, escape_text

SAFE = "abcXYZ019 _-.:/+=!#$%'()*,;?@[]^`{|}~"          # what the fast path takes as it is
HOSTILE = SAFE + "&<>\"\t\n\r\x00\x1f\x7f]é€\ufffe"     # what it must leave to the XML parser
PERIODS = ["minute", "hour", "day", "week", "month", "year", "eternity"]


def tree(body: bytes):
    try:
        return _tree_status(body, 200)
    except BackendUnavailable:
        return None


NUMBERS = st.integers(0, 10**20).map(str)
# Past int()'s limit of 4300 digits, with leading zeros, and one digit short of it.
HUGE_NUMBERS = st.one_of(NUMBERS, st.integers(4290, 4400).map(lambda n: "9" * n),
                         st.integers(4300, 4400).map(lambda n: "0" * n + "1"), st.just("1" * 4300))


@st.composite
def documents(draw, alphabet, escape, numbers=NUMBERS):
    """A status document in the backend's order, texts from ``alphabet``."""
    text = st.text(alphabet, max_size=12)
    esc_text = (lambda t: escape_text(t)) if escape else (lambda t: t)
    esc_attr = (lambda t: escape_attr(t)) if escape else (lambda t: t)
    parts = ['<?xml version="1.0" encoding="UTF-8"?><status>']
    if draw(st.booleans()):
        parts.append("<authorized>true</authorized>")
    else:
        parts.append("<authorized>false</authorized>")
        if draw(st.booleans()):
            parts.append(f"<reason>{esc_text(draw(st.sampled_from(['usage limits are exceeded', ''])) + draw(text))}"
                         "</reason>")
    if draw(st.booleans()):
        field = draw(st.sampled_from(["redirect_url", "redirect_uri"]))
        parts.append(f"<application><id>{esc_text(draw(text))}</id><key>{esc_text(draw(text))}</key>"
                     f"<{field}>{esc_text(draw(text))}</{field}></application>")
    parts.append(f"<plan>{esc_text(draw(text))}</plan>")
    metrics = st.one_of(st.sampled_from(["hits", "search", ""]), text)
    if draw(st.booleans()):
        parts.append("<usage_reports>")
        for _ in range(draw(st.integers(0, 4))):
            period = draw(st.one_of(st.sampled_from(PERIODS), text))
            current, maximum = draw(numbers), draw(numbers)
            exceeded = (len(current), current) > (len(maximum), maximum)  # as ints, for the usual numbers
            parts.append(f'<usage_report metric="{esc_attr(draw(metrics))}" period="{esc_attr(period)}"'
                         + (' exceeded="true">' if exceeded else ">"))
            if period != "eternity":
                parts.append(f"<period_start>{esc_text(draw(text))}</period_start>"
                             f"<period_end>{esc_text(draw(text))}</period_end>")
            parts.append(f"<max_value>{maximum}</max_value><current_value>{current}</current_value></usage_report>")
        parts.append("</usage_reports>")
    if draw(st.booleans()):
        keys = "".join(f'<key id="{esc_attr(draw(text))}"/>' for _ in range(draw(st.integers(0, 2))))
        parts.append(f'<app_keys app="{esc_attr(draw(text))}" svc="{esc_attr(draw(text))}">{keys}</app_keys>')
    if draw(st.booleans()):
        parts.append("<hierarchy>")
        for _ in range(draw(st.integers(0, 4))):
            children = " ".join(draw(st.lists(metrics, max_size=3)))
            parts.append(f'<metric name="{esc_attr(draw(metrics))}" children="{esc_attr(children)}"/>')
        parts.append("</hierarchy>")
    parts.append("</status>")
    return "".join(parts).encode("utf-8", errors="surrogatepass")


@settings(max_examples=300, deadline=None)
@given(documents(SAFE, escape=False))
def test_the_backends_own_documents_take_the_fast_path_and_read_the_same(body):
    fast = _canonical_status(body)
    assert fast is not None, body[:300]
    assert fast == tree(body)


@st.composite
def one_hostile_character(draw):
    """Safe text with one character that is not: where the fast path must either read it as XML does or refuse."""
    char = draw(st.sampled_from(sorted(set(HOSTILE) - set(SAFE))))
    return draw(documents(SAFE + char * 4, escape=False))


@settings(max_examples=250, deadline=None)
@given(st.one_of(documents(HOSTILE, escape=True), documents(HOSTILE, escape=False), one_hostile_character()))
def test_hostile_text_reads_the_same_or_goes_to_the_xml_parser(body):
    fast = _canonical_status(body)
    if fast is not None:
        assert fast == tree(body)


@st.composite
def mutated(draw, numbers=NUMBERS):
    body = bytearray(draw(documents(SAFE, escape=False, numbers=numbers)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(body)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.one_of(st.sampled_from(b'<>&"/= \t\n\x00\xc3\xa9'), st.integers(0, 255)))
        if kind == "insert":
            body[at:at] = bytes([byte])
        elif at < len(body):
            body[at:at + 1] = b"" if kind == "delete" else bytes([byte])
    return bytes(body)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_any_byte_changed_reads_the_same_or_goes_to_the_xml_parser(body):
    fast = _canonical_status(body)
    if fast is not None:
        assert fast == tree(body), body[:300]


@pytest.mark.parametrize("body", [
    # whitespace between elements, single quotes, an entity, a CDATA section, a comment
    b'<?xml version="1.0" encoding="UTF-8"?>\n<status><authorized>true</authorized><plan>p</plan></status>',
    b"<?xml version='1.0' encoding='UTF-8'?><status><authorized>true</authorized><plan>p</plan></status>",
    b'<?xml version="1.0" encoding="UTF-8"?><status><authorized>true</authorized><plan>a&amp;b</plan></status>',
    b'<?xml version="1.0" encoding="UTF-8"?><status><authorized>true</authorized><plan><![CDATA[x]]></plan></status>',
    b'<?xml version="1.0" encoding="UTF-8"?><status><!-- c --><authorized>true</authorized><plan>p</plan></status>',
])
def test_other_spellings_go_to_the_xml_parser_and_still_parse(body):
    assert _canonical_status(body) is None
    assert tree(body) is not None


def test_parse_status_answers_the_same_on_both_paths():
    body = (b'<?xml version="1.0" encoding="UTF-8"?><status><authorized>false</authorized>'
            b"<reason>usage limits are exceeded</reason><plan>Basic</plan><usage_reports>"
            b'<usage_report metric="hits" period="day" exceeded="true"><period_start>2017-06-21 00:00:00 +0000'
            b"</period_start><period_end>2017-06-22 00:00:00 +0000</period_end><max_value>1000</max_value>"
            b"<current_value>1003</current_value></usage_report></usage_reports>"
            b'<hierarchy><metric name="hits" children="search"/></hierarchy></status>')
    spaced = body.replace(b"<plan>", b"\n<plan>")  # the same document, off the fast path
    assert _canonical_status(body) is not None and _canonical_status(spaced) is None
    headers = {"content-type": "application/vnd.3scale-v2.0+xml"}
    fast, slow = (parse_status(Response(409, headers, b)) for b in (body, spaced))
    assert fast == slow
    assert fast.limits_exceeded and fast.usage_reports[0].current_value == 1003
    assert fast.hierarchy == {"hits": ["search"]}


@pytest.mark.parametrize("app_id, app_key", [("a1b2c3", "s3cr3t"), ("small", None), ("free1", None),
                                             ("a1b2c3", "wrong-key")])
def test_the_simulators_documents_take_the_fast_path(sim, app_id, app_key):
    """The simulator writes the backend's documents: the benchmarks measure the path production takes."""
    client = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
    try:
        creds = Credentials({"app_id": app_id, **({"app_key": app_key} if app_key else {})})
        response = client.transport.request(client._authorize_request("555", creds))
    finally:
        client.close()
    assert response.status in (200, 409)
    assert _canonical_status(response.body) is not None, response.body[:300]
    assert _canonical_status(response.body) == tree(response.body)


_SLOTS = {name: "v" for name in ("reason", "id", "key", "url", "plan", "metric", "period", "start", "end",
                                 "app", "svc", "key_id", "name", "children")}
_TEMPLATE = ('<?xml version="1.0" encoding="UTF-8"?><status><authorized>false</authorized><reason>{reason}</reason>'
             "<application><id>{id}</id><key>{key}</key><redirect_url>{url}</redirect_url></application>"
             '<plan>{plan}</plan><usage_reports><usage_report metric="{metric}" period="{period}">'
             "<period_start>{start}</period_start><period_end>{end}</period_end><max_value>5</max_value>"
             '<current_value>1</current_value></usage_report></usage_reports><app_keys app="{app}" svc="{svc}">'
             '<key id="{key_id}"/></app_keys><hierarchy><metric name="{name}" children="{children}"/></hierarchy>'
             "</status>")


@pytest.mark.parametrize("slot", sorted(_SLOTS))
def test_each_character_in_each_place_reads_the_same_or_goes_to_the_xml_parser(slot):
    """Every byte value, alone and beside text, in every text and attribute of the document."""
    assert _canonical_status(_TEMPLATE.format(**_SLOTS).encode()) is not None
    for byte in range(256):
        for value in (bytes([byte]), b"a" + bytes([byte]) + b"b"):
            body = _TEMPLATE.format(**dict(_SLOTS, **{slot: "\x00"})).encode().replace(b"\x00", value)
            fast = _canonical_status(body)
            if fast is not None:
                assert fast == tree(body), (slot, value)


# ---- every answer is a status or one failed call ---------------------------------------

def one_failed_call_or(parse, *args):
    """``parse(*args)``'s result, or the BackendError it raised, checked to be one bounded line.

    Any other exception fails the test: on the priority path it would leave the
    request's callers unanswered, in a cycle it would end the authorize phase.
    """
    try:
        return parse(*args)
    except BackendError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message and len(message) < 500, message[:300]
        return exc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(documents(SAFE, escape=False, numbers=HUGE_NUMBERS),
                      documents(HOSTILE, escape=True, numbers=HUGE_NUMBERS), mutated(HUGE_NUMBERS)),
       status=st.sampled_from([200, 409, 400, 403, 404, 422, 500]),
       ctype=st.sampled_from(["application/vnd.3scale-v2.0+xml", "text/xml; charset=utf-8", "text/html", ""]),
       reason=st.one_of(st.none(), st.text(max_size=40).map(lambda t: " ".join(t.split()))))
def test_the_backends_documents_with_any_values_are_a_status_or_one_failed_call(body, status, ctype, reason):
    headers = {"content-type": ctype, **({"3scale-rejection-reason": reason} if reason is not None else {})}
    outcome = one_failed_call_or(parse_status, Response(status, headers, body))
    if not isinstance(outcome, BackendError):
        assert all(isinstance(u.metric, str) and isinstance(u.period, str) and isinstance(u.current_value, int)
                   and isinstance(u.max_value, int) for u in outcome.usage_reports), outcome
    one_failed_call_or(BackendClient._report_outcome, Response(status, headers, body))


@pytest.mark.parametrize("where", ["max_value", "current_value"])
def test_a_number_too_long_for_int_is_the_same_failed_call_on_both_paths(where):
    tag = b"<%s>" % where.encode()
    body = _TEMPLATE.format(**_SLOTS).encode().replace(tag, tag + b"9" * 5000)
    spaced = body.replace(b"<plan>", b"\n<plan>")  # the same document, off the fast path
    assert _canonical_status(spaced) is None
    outcomes = [one_failed_call_or(parse_status, Response(409, {"content-type": "application/xml"}, b))
                for b in (body, spaced)]
    assert [str(o) for o in outcomes] == ["authorize: malformed usage_report"] * 2, outcomes


@pytest.mark.parametrize("attribute", [b' metric="v"', b' period="v"'])
def test_a_usage_report_without_metric_or_period_is_a_failed_call(attribute):
    body = _TEMPLATE.format(**_SLOTS).encode().replace(attribute, b"", 1)
    assert _canonical_status(body) is None
    outcome = one_failed_call_or(parse_status, Response(200, {"content-type": "application/xml"}, body))
    assert str(outcome) == "authorize: malformed usage_report", outcome
