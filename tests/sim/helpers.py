"""Shared pieces of the simulator tests: a spec-shaped config, a fixed clock, request helpers.

The clock is fixed at the time of the spec's examples (2017-06-21 14:55:30 UTC), so period
boundaries in the XML are exact.
"""

import calendar

NOW = calendar.timegm((2017, 6, 21, 14, 55, 30, 0, 0, 0))
XML_TYPE = "application/vnd.3scale-v2.0+xml"


def spec_config():
    """Services and apps shaped after threescale-backend.md §4.6."""
    return {
        "provider_key": "pk123",
        "services": [
            {"id": "555", "default": True, "backend_version": "2", "tokens": ["st-555"],
             "metrics": {"hits": None, "search": "hits", "update": "hits", "other": None},
             "plans": {"Basic": {"hits": {"day": 1000, "month": 20000, "eternity": 1000000},
                                 "search": {"minute": 10}},
                       "Free": {}},
             "applications": [
                 {"app_id": "a1b2c3", "app_keys": ["s3cr3t", "other-key"], "plan": "Basic"},
                 {"app_id": "nokeys", "plan": "Basic"},
                 {"app_id": "free", "app_keys": ["k"], "plan": "Free"},
                 {"app_id": "suspended", "plan": "Basic", "state": "suspended"},
                 {"app_id": "ref", "plan": "Free", "referrers": ["*.example.org", "api.test"]},
                 {"app_id": "viakey", "user_key": "uk-on-2", "plan": "Free"},
             ]},
            {"id": "556", "backend_version": "1", "tokens": ["st-556"],
             "metrics": {"hits": None, "search": "hits"},
             "plans": {"Gold": {"hits": {"day": 5}}},
             "applications": [{"app_id": "api1", "user_key": "uk1", "plan": "Gold"}]},
            {"id": "557", "backend_version": "oauth",
             "metrics": {"hits": None},
             "plans": {"Ultimate": {"hits": {"week": 5000}}},
             "applications": [
                 {"app_id": "94bd2de3", "app_keys": ["883bdb8dbc3b6b77dbcf26845560fdbb"],
                  "plan": "Ultimate", "redirect_url": "http://localhost:8080/oauth/oauth_redirect",
                  "access_tokens": ["tok1"]}]},
            {"id": "900", "provider_key": "pk-other",
             "metrics": {"hits": None}, "plans": {"p": {}},
             "applications": [{"app_id": "x", "plan": "p"}]},
        ],
    }


def auth(http, sim, query, endpoint="authorize", headers=None, **kwargs):
    """GET an authorization endpoint with a raw (already encoded) query string."""
    return http.get(f"{sim.url}/transactions/{endpoint}.xml?{query}", headers=headers or {},
                    **kwargs)


def report(http, sim, body, headers=None, **kwargs):
    """POST a raw form body to /transactions.xml."""
    all_headers = {"Content-Type": "application/x-www-form-urlencoded"}
    all_headers.update(headers or {})
    return http.post(f"{sim.url}/transactions.xml", data=body, headers=all_headers, **kwargs)
