"""A metric the backend does not know (a mapping rule's typo, a metric deleted in
3scale): it costs no other application's usage, the application's known
metrics are delivered, its own usage waits in the dead letter, and the gateway
is told 0:metric_invalid. Real redis-server, the simulator over HTTP."""

import json

import pytest

from xcflushd import deadletter
from xcflushd.backend import ServiceCredentials, make_client
from xcflushd.flusher import Flusher, FlushSettings
from xcflushd.keys import Credentials, auth_key, report_key
from xcflushd.storage import Storage, connect
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

APPS = 61
TYPO = 30  # the application whose gateway reports "hitz"
CONFIG = {
    "provider_key": "pk-test",
    "services": [{
        "id": "555", "default": True, "backend_version": "2",
        "metrics": {"hits": None, "search": "hits"},
        "plans": {"basic": {"hits": {"day": 100000}}},
        "applications": [{"app_id": f"app{i}", "plan": "basic"} for i in range(APPS)]
        + [{"app_id": "keyed", "app_keys": ["right"], "plan": "basic"}],
    }],
}


def app(i):
    return Credentials({"app_id": f"app{i}"})


@pytest.fixture
def many_apps():
    simulator = Simulator(CONFIG).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def flusher_for(redis_server):
    made = []

    def make(sim):
        backend = make_client(sim.url, ServiceCredentials("pk-test"), 2, 5)
        made.append(backend)
        return Flusher(Storage(connect(redis_server.url)), backend, FlushSettings(report_auth_wait=0, auth_ttl=600))

    yield make
    for backend in made:
        backend.close()


def dead_letters(r):
    return [json.loads(v) for v in r.hvals("xcflushd:dead_letter")]


def leftovers(r):
    return sorted(k for k in r.keys("*") if k.startswith(("to_flush:", "flushing_report_keys", "report")))


def test_an_unknown_metric_of_one_application_costs_no_one_else_a_hit(many_apps, r, flusher_for):
    gateway = Gateway(r)
    flusher = flusher_for(many_apps)
    results = []
    for cycle in range(3):
        for i in range(APPS):
            gateway.cache_report("555", app(i), "hits", i + cycle + 1)
        gateway.cache_report("555", app(TYPO), "hitz", 2)
        gateway.cache_report("555", app(TYPO), "search", 1)
        results.append(flusher.flush_once())

    received = many_apps.backend.received()["555"]
    for i in range(APPS):
        expected = {"hits": 3 * (i + 1) + 3}
        if i == TYPO:
            expected["search"] = 3
        assert received[f"app{i}"] == expected, i
    assert many_apps.backend.dropped() == {} and many_apps.backend.errors() == []
    assert leftovers(r) == []  # nothing waits that no cycle will deliver
    entries = dead_letters(r)
    assert sorted(e["usage"]["hitz"] for e in entries) == [2, 2, 2]
    assert all(e["usage"].keys() == {"hitz"} and 'metric "hitz" is invalid' in e["reason"] for e in entries)
    assert [res.refused for res in results] == [1, 1, 1]
    assert all(res.ok and res.dead_lettered == 0 for res in results)
    # One batch of all 61 in every cycle: each confirmed by its check (cold) or its cached
    # authorization, the typo's application by its check once hitz is set aside.
    assert [res.report_calls for res in results] == [1, 1, 1]
    assert r.hgetall(auth_key("555", app(TYPO))) == {"hits": "1", "search": "1", "hitz": "0:metric_invalid"}

    # Entries stay what `xcflushd dead-letter requeue` takes.
    first = deadletter.entries(r)[0]
    assert first.refusal is None and first.report_key == report_key("555", app(TYPO))
    assert deadletter.requeue(r, first) == deadletter.REQUEUED
    assert r.hgetall(report_key("555", app(TYPO))) == {"hitz": "2"}


def test_a_denied_application_has_its_metrics_checked_before_any_validator(many_apps, r, flusher_for):
    # A wrong app_key: the authorize is denied before apisonator looks at usage,
    # so the names are asked with no_body=1, where it looks at them first.
    wrong_key = Credentials({"app_id": "keyed", "app_key": "wrong"})
    gateway = Gateway(r)
    gateway.cache_report("555", wrong_key, "hits", 5)
    gateway.cache_report("555", wrong_key, "hitz", 1)

    result = flusher_for(many_apps).flush_once()

    assert many_apps.backend.received().get("555", {}).get("keyed") == {"hits": 5}  # reports do not check keys
    assert result.refused == 1 and result.failed == 0
    assert [e["usage"] for e in dead_letters(r)] == [{"hitz": 1}]
    assert leftovers(r) == []
    # The gateway is denied both: the application's denial covers every metric.
    assert r.hgetall(auth_key("555", wrong_key)) == {"hits": "0:application_key_invalid",
                                                      "hitz": "0:application_key_invalid"}


def test_a_report_of_unknown_metrics_only_goes_to_the_dead_letter_whole(many_apps, r, flusher_for):
    gateway = Gateway(r)
    gateway.cache_report("555", app(1), "hitz", 4)
    gateway.cache_report("555", app(1), "other", 1)

    result = flusher_for(many_apps).flush_once()

    assert [e["usage"] for e in dead_letters(r)] == [{"hitz": 4, "other": 1}]
    assert many_apps.backend.received() == {} and many_apps.backend.dropped() == {}
    assert result.refused == 1 and result.report_calls == 0
    assert leftovers(r) == []
    assert r.hgetall(auth_key("555", app(1))) == {"hits": "1", "hitz": "0:metric_invalid",
                                                   "other": "0:metric_invalid"}


def test_a_denial_of_the_application_does_not_vouch_for_its_metric_names(many_apps, r, flusher_for):
    # Cached from an answer that stopped at the key check: apisonator never looked at "hitz".
    r.hset(auth_key("555", app(1)), mapping={"hits": "1"})
    r.hset(auth_key("555", app(2)), mapping={"hits": "0:application_key_invalid", "hitz": "0:application_key_invalid"})
    gateway = Gateway(r)
    gateway.cache_report("555", app(1), "hits", 3)
    gateway.cache_report("555", app(2), "hits", 4)
    gateway.cache_report("555", app(2), "hitz", 1)

    result = flusher_for(many_apps).flush_once()

    assert many_apps.backend.received()["555"] == {"app1": {"hits": 3}, "app2": {"hits": 4}}
    assert many_apps.backend.dropped() == {}
    assert result.refused == 1


def test_a_priority_request_for_an_unknown_metric_is_denied(many_apps, r, renewer_for):
    renewer_for(many_apps.url)
    gateway = Gateway(r)
    assert gateway.priority_authorization("555", app(3), "hitz") == "0:metric_invalid"
    assert gateway.priority_authorization("555", app(3), "hits") == "1"
    assert r.hgetall(auth_key("555", app(3))) == {"hits": "1", "hitz": "0:metric_invalid"}


def test_an_application_met_twice_in_a_chunk_is_checked_once(many_apps, r, flusher_for):
    gateway = Gateway(r)
    gateway.cache_report("555", app(1), "hits", 2)
    gateway.cache_report("555", app(1), "hitz", 1)
    # A leftover of a dead cycle (a Ruby-era suffix: no lease to wait for), beside a new report.
    r.rename(report_key("555", app(1)), "to_flush:" + report_key("555", app(1)) + "_20261207000000")
    r.delete("report_keys")
    gateway.cache_report("555", app(1), "hits", 3)
    gateway.cache_report("555", app(1), "hitz", 1)

    result = flusher_for(many_apps).flush_once(recover=True)

    assert many_apps.backend.received()["555"]["app1"] == {"hits": 5}
    assert sorted(e["usage"]["hitz"] for e in dead_letters(r)) == [1, 1]
    assert result.checked == 1 and result.refused == 2
    assert leftovers(r) == []
