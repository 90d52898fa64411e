"""Pure pieces of the simulator: Rack parsing, periods, timestamps, config checks, demo config."""

import calendar

import pytest

from xcflushd_sim.config import ConfigError, demo_config
from xcflushd_sim.errors import SimError
from xcflushd_sim.model import Backend
from xcflushd_sim.params import flag, no_body, parse_nested, parse_options_header
from xcflushd_sim.periods import compute_bounds, format_time, parse_timestamp

from .helpers import spec_config


def utc(*fields):
    return calendar.timegm(fields + (0,) * (9 - len(fields)))


# --- Rack nested parameters ------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    (b"usage[hits]=1&usage%5Bsearch%5D=2", {"usage": {"hits": "1", "search": "2"}}),
    (b"transactions[0][app_id]=a&transactions[0][usage][hits]=2&transactions[7][user_key]=u",
     {"transactions": {"0": {"app_id": "a", "usage": {"hits": "2"}}, "7": {"user_key": "u"}}}),
    (b"a=1&a=2", {"a": "2"}),
    (b"k&e=&p=a+b%2B", {"k": None, "e": "", "p": "a b+"}),
    (b"a[]=1&a[]=2", {"a": ["1", "2"]}),
    (b"a[][x]=1&a[][y]=2&a[][x]=3", {"a": [{"x": "1", "y": "2"}, {"x": "3"}]}),
    (b"[usage][hits]=1", {"[usage]": {"hits": "1"}}),  # Rack 3 keeps the leading bracket
    (b"&&a=1& b=2", {"a": "1", "b": "2"}),
    (b"", {}),
])
def test_parse_nested(query, expected):
    assert parse_nested(query) == expected


@pytest.mark.parametrize("query, code, status", [
    (b"usage=1&usage[hits]=1", "bad_request", 400),
    (b"usage[hits]=1&usage[]=1", "bad_request", 400),
    (b"a=%zz", "bad_request", 400),
    (b"a=%C3%28", "not_valid_data", 422),
    (b"a" + b"[x]" * 40 + b"=1", "bad_request", 400),
])
def test_parse_nested_errors(query, code, status):
    with pytest.raises(SimError) as info:
        parse_nested(query)
    assert (info.value.code, info.value.http_status) == (code, status)


def test_parse_limits():
    assert len(parse_nested(b"&".join(b"a%d=1" % i for i in range(4096)))) == 4096
    with pytest.raises(SimError, match=r"\(4097\) exceeds limit \(4096\)"):
        parse_nested(b"&".join(b"a%d=1" % i for i in range(4097)))
    with pytest.raises(SimError, match="total query size"):
        parse_nested(b"a=" + b"x" * (4 * 1024 * 1024))


def test_extension_flags():
    ext = parse_options_header("hierarchy=1&flat_usage=true&no_body=0&list[]=a&h[k]=v")
    assert flag(ext, "hierarchy") and not flag(ext, "flat_usage")
    assert ext["list"] == ["a"] and ext["h"] == {"k": "v"}
    assert not no_body(ext, {})
    assert no_body({"no_body": "yes"}, {}) and no_body({}, {"no_body": "true"})
    assert not no_body({}, {"no_body": "false"}) and not no_body({}, {})
    assert parse_options_header("a=%zz") == {}


# --- periods and timestamps --------------------------------------------------------------------


def test_bounds_week_starts_monday_and_ends_are_next_starts():
    bounds = compute_bounds(utc(2017, 12, 31, 23, 59, 59))  # a Sunday
    fmt = {p: (format_time(s), e and format_time(e)) for p, (s, e) in bounds.items()}
    assert fmt == {
        "minute": ("2017-12-31 23:59:00 +0000", "2018-01-01 00:00:00 +0000"),
        "hour": ("2017-12-31 23:00:00 +0000", "2018-01-01 00:00:00 +0000"),
        "day": ("2017-12-31 00:00:00 +0000", "2018-01-01 00:00:00 +0000"),
        "week": ("2017-12-25 00:00:00 +0000", "2018-01-01 00:00:00 +0000"),
        "month": ("2017-12-01 00:00:00 +0000", "2018-01-01 00:00:00 +0000"),
        "year": ("2017-01-01 00:00:00 +0000", "2018-01-01 00:00:00 +0000"),
        "eternity": ("1970-01-01 00:00:00 +0000", None),
    }
    monday = compute_bounds(utc(2018, 1, 1, 0, 0, 0))["week"]
    assert monday == (utc(2018, 1, 1), utc(2018, 1, 8))
    assert compute_bounds(utc(2016, 2, 29, 12))["month"] == (utc(2016, 2, 1), utc(2016, 3, 1))


@pytest.mark.parametrize("text, expected", [
    ("1498056930", 1498056930),
    (" 1498056930 ", 1498056930),
    ("2017-06-21 14:55:30", utc(2017, 6, 21, 14, 55, 30)),
    ("2017-06-21 14:55:30 -08:00", utc(2017, 6, 21, 22, 55, 30)),
    ("2017-06-21 14:55:30 +0130", utc(2017, 6, 21, 13, 25, 30)),
    ("2017-06-21T14:55:30Z", utc(2017, 6, 21, 14, 55, 30)),
    ("2017-06-21 14:55:30 UTC", utc(2017, 6, 21, 14, 55, 30)),
    ("2017-06-21", utc(2017, 6, 21)),
    ("", None), ("garbage", None), ("2017-13-01", None), (None, None), ({"a": "b"}, None),
])
def test_parse_timestamp(text, expected):
    assert parse_timestamp(text) == expected


# --- config --------------------------------------------------------------------------------


def broken(mutate):
    config = spec_config()
    mutate(config)
    return config


@pytest.mark.parametrize("config, message", [
    ([], "JSON object"),
    ({"services": []}, "non-empty"),
    ({"provider_key": "p", "services": [{"id": ""}]}, "id"),
    ({"services": [{"id": "1"}]}, "provider_key"),
    (broken(lambda c: c.update(extra=1)), "unknown key"),
    (broken(lambda c: c["services"][0].update(backend_version="3")), "backend_version"),
    (broken(lambda c: c["services"][0]["metrics"].update(x="nope")), "unknown parent"),
    (broken(lambda c: c["services"][0]["metrics"].update(a="b", b="a")), "cycle"),
    (broken(lambda c: c["services"][0]["plans"].update(p={"nope": {"day": 1}})),
     "unknown metric"),
    (broken(lambda c: c["services"][0]["plans"].update(p={"hits": {"fortnight": 1}})),
     "period"),
    (broken(lambda c: c["services"][0]["plans"].update(p={"hits": {"day": -1}})), "int >= 0"),
    (broken(lambda c: c["services"][0]["applications"].append({"app_id": "a1b2c3",
                                                              "plan": "Free"})), "duplicate"),
    (broken(lambda c: c["services"][0]["applications"].append({"app_id": "z", "plan": "x"})),
     "plan"),
    (broken(lambda c: c["services"][0]["applications"].append({"plan": "Free"})), "app_id"),
    (broken(lambda c: c["services"][1].update(default=True)), "second default"),
    (broken(lambda c: c["services"].append(dict(c["services"][1]))), "duplicate id"),
])
def test_bad_configs(config, message):
    with pytest.raises(ConfigError, match=message):
        Backend(config)


def test_plan_limits_come_out_finest_period_first():
    config = spec_config()
    config["services"][0]["plans"]["Basic"]["hits"] = {"eternity": 9, "minute": 1, "week": 3}
    backend = Backend(config)
    status = backend.authorize({"app_id": "a1b2c3", "app_key": "s3cr3t", "provider_key": "pk123"})
    assert [(r.metric, r.period) for r in status.reports] == [
        ("hits", "minute"), ("hits", "week"), ("hits", "eternity"), ("search", "minute")]


def test_demo_config():
    config = demo_config(7, n_services=3)
    backend = Backend(config)  # valid
    services = config["services"]
    assert [s["id"] for s in services] == ["1001", "1002", "1003"]
    assert [s["backend_version"] for s in services] == ["2", "1", "2"]
    apps = {a["app_id"]: (s["id"], a) for s in services for a in s["applications"]}
    assert sorted(apps, key=lambda a: int(a.split("-")[1])) == [f"app-{n}" for n in range(7)]
    assert apps["app-0"] == ("1001", {"app_id": "app-0", "plan": "default",
                                      "app_keys": ["key-0"]})
    assert apps["app-1"] == ("1002", {"app_id": "app-1", "plan": "default", "user_key": "uk-1"})
    ok = backend.authorize({"user_key": "uk-1", "service_id": "1002",
                            "provider_key": "pk-demo", "usage": {"search": "1000"}})
    assert ok.authorized
    assert demo_config(10)["services"][0]["applications"][-1]["plan"] == "default"
    assert demo_config(10)["services"][1]["applications"][-1] == {
        "app_id": "app-9", "plan": "unlimited", "user_key": "uk-9"}
    assert demo_config(0)["services"][0]["applications"] == []
