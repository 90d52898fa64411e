"""known_metrics against the simulator over HTTP, and the parsers it reads answers with.

The property: whatever names a gateway reports, what known_metrics calls known
is applied by a report call, each name it refuses would drop a report call,
and the authorization it builds never holds 1 for a refused name.
"""

import xml.sax.saxutils

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xcftest import DEMO_CONFIG

from xcflushd import known_metrics
from xcflushd.backend import ServiceCredentials, _refused_metric, make_client, parse_check
from xcflushd.errors import BackendError, BackendRejected, BackendUnavailable
from xcflushd.keys import Credentials
from xcflushd.transport import Response
from xcflushd_sim.server import Simulator

NOKEYS = Credentials({"app_id": "free1"})        # a plan without limits
WRONG_KEY = Credentials({"app_id": "a1b2c3", "app_key": "wrong"})
# Names the service knows, near misses, and what Rack's brackets and apisonator's strip make of others.
NAMES = st.one_of(
    st.sampled_from(["hits", "search", "update", "other", "hitz", " hits", "hits\t", "hi\"ts", "a[b]", "x]y",
                     "usage", "s&m", "+", "%41", "é", "\\", "hits,metric:x"]),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12),
)


@pytest.fixture(scope="module")
def sim():
    simulator = Simulator(DEMO_CONFIG).start()
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def client(sim):
    backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
    yield backend
    backend.close()


def only(outcomes):
    [(tag, outcome)] = list(outcomes)
    return outcome


def applied(sim, client, usage):
    """How much of a report call with this usage the backend counted (a dropped call: none)."""
    sim.backend.reset()
    [(_, error)] = list(client.report_many([(0, "555", [(NOKEYS, usage)])], 1))
    assert error is None
    return sum(sum(metrics.values()) for apps in sim.backend.received().values() for metrics in apps.values())


APPS = st.lists(st.tuples(st.sampled_from([NOKEYS, WRONG_KEY, Credentials({"app_id": "free2"})]),
                          st.lists(NAMES, min_size=1, max_size=5, unique=True)), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(APPS, st.integers(1, 4))
def test_known_names_are_reported_and_refused_ones_never_authorized(sim, client, apps, concurrency):
    # Several applications in one call of check(): their answers interleave, as in a cycle.
    items = [(i, "555", creds, names) for i, (creds, names) in enumerate(apps)]
    outcomes = dict(known_metrics.check(client, items, concurrency))
    values_of = dict(known_metrics.authorize(client, items, concurrency))
    assert sorted(outcomes) == sorted(values_of) == list(range(len(apps)))
    for i, (_, names) in enumerate(apps):
        checked = outcomes[i]
        if isinstance(checked, BackendError):
            # Only a name the answers cannot carry (Rack takes brackets apart) may leave the check undecided.
            assert any(c in name for name in names for c in "[]"), checked
            continue
        assert sorted(checked.known + tuple(checked.refused)) == sorted(names)
        assert checked.status is None
        if checked.known:
            # apisonator strips names, and " hits" then overwrites "hits" (a Hash#update): one each.
            assert applied(sim, client, {m: 1 for m in checked.known}) == len({m.strip() for m in checked.known})
        for name in checked.refused:
            assert applied(sim, client, {name: 1}) == 0, name
        values = values_of[i]
        assert not isinstance(values, BackendError)
        for name in checked.refused:
            assert values[name] != "1"
        assert set(names) <= set(values)


def test_two_unknown_names_cost_three_calls(sim, client):
    sim.backend.reset()
    checked = only(known_metrics.check(client, [(0, "555", NOKEYS, ("hits", "nope", "search", "hitz"))], 4))
    assert checked.known == ("hits", "search") and sorted(checked.refused) == ["hitz", "nope"]
    assert sim.backend.calls()["authorize"] == 3


def test_an_unknown_application_is_said_so_and_its_names_left_alone(sim, client):
    checked = only(known_metrics.check(client, [(0, "555", Credentials({"app_id": "ghost"}), ("hits",))], 4))
    assert checked.status.reason_code == "application_not_found" and checked.known == () and checked.refused == {}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.builds(
    lambda text, code: f'<?xml version="1.0"?><error code="{code}">{text}</error>'.encode(),
    st.text(max_size=60), st.sampled_from(["metric_invalid", "x", ""])))
def test_the_refused_name_is_read_from_anything_without_an_exception(body):
    name = _refused_metric(body)
    assert name is None or isinstance(name, str)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=40).filter(
    lambda t: all(c in "\t\n" or ord(c) >= 32 for c in t) and "\ufffe" not in t and "\uffff" not in t))
def test_the_refused_name_comes_back_as_apisonator_wrote_it(name):
    body = ('<?xml version="1.0" encoding="UTF-8"?><error code="metric_invalid">'
            + xml.sax.saxutils.escape(f'metric "{name}" is invalid') + "</error>").encode()
    assert _refused_metric(body) == name


@settings(max_examples=100, deadline=None)
@given(st.integers(100, 599), st.binary(max_size=100))
def test_a_bare_check_answer_is_known_rejected_or_unavailable(status, body):
    try:
        outcome = parse_check(Response(status, {}, body))
    except BackendRejected as exc:
        assert 400 <= status < 500 and status != 409 and exc.code == ""
    except BackendUnavailable:
        assert not (400 <= status < 500) and status != 200
    else:
        assert outcome is None and status in (200, 409)


def test_each_answer_of_a_round_is_read_as_what_it_asked(sim, client):
    # A denied application's bare ask is queued while the same round's other answers are read.
    items = [(0, "555", WRONG_KEY, ("hits", "hitz"))]
    items += [(i, "555", Credentials({"app_id": f"free{i}"}), ("hits", "nope")) for i in (1, 2, 3)]
    outcomes = dict(known_metrics.check(client, items, 1))
    assert {tag: (c.known, sorted(c.refused)) for tag, c in outcomes.items()} == {
        0: (("hits",), ["hitz"]), 1: (("hits",), ["nope"]), 2: (("hits",), ["nope"]), 3: (("hits",), ["nope"])}
