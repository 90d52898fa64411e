"""Which of the metrics a gateway reported the backend knows.

A report call that carries one metric the backend does not know is answered
202 and then dropped whole, every application's usage in it (decision 5). The
one synchronous way to learn a name is unknown is an authorize call with the
metrics as predicted usage, ``usage[m]=0``: apisonator parses every name
(``Metric::Collection#process_usage``) and answers 404 ``metric_invalid``,
``metric "<name>" is invalid``, for the first unknown one. A predicted 0
changes none of our values (decision 4 reads only the usage reports, which
list every limit of the plan either way). Where apisonator checks the names:

* with a body, in its Limits validator, the last one: only a 200 or a 409
  ``limits_exceeded`` vouches for them. A denial before it (a wrong app_key,
  a suspended application, a referrer) says nothing about them;
* with ``no_body=1`` (apisonator since 3scale 2.10), right after it found the
  application, before any validator (``preload_usage_limits``); but its
  errors then have no body: a 404 does not say which name.

So each application is asked with a body; a named metric is set aside and
the rest asked again; after a denial that vouches for nothing the same names
are asked with ``no_body=1``; names an answer does not single out are asked
one by one. One call for an application whose metrics are all known, a few
for one with an unknown metric.
"""

from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from .authorizer import authorizations
from .backend import AuthStatus, BackendClient
from .errors import BackendError, BackendRejected, BackendUnavailable
from .keys import Credentials, denied

#: Denials that mean the backend does not know the application at all.
UNKNOWN_APPLICATION = frozenset({
    "application_not_found", "user_key_invalid", "authentication_error", "access_token_invalid",
})
#: Answers about one name of ``usage`` (usage_value_invalid: a name Rack's
#: brackets took apart, so its value is no longer a number).
_REFUSED_NAME = frozenset({"metric_invalid", "usage_value_invalid"})
_RUBY_SPACE = " \t\n\v\f\r\0"  # what Ruby's String#strip removes (process_usage strips names)


class Checked(NamedTuple):
    """What the backend said about one application's metrics."""

    known: Tuple[str, ...]               # metrics the backend knows
    refused: Dict[str, Tuple[str, str]]  # metric -> (error code, the backend's reason)
    # authorize(): the answer for exactly ``known``. check(): a denial of the
    # application itself (it is unknown: its metrics could not be asked about), else None.
    status: Optional[AuthStatus]


class _Probe:
    __slots__ = ("tag", "service_id", "creds", "metrics", "known", "refused", "answer", "waiting", "asked", "done")

    def __init__(self, tag: Any, service_id: str, creds: Credentials, metrics: Sequence[str]):
        self.tag, self.service_id, self.creds, self.metrics = tag, service_id, creds, tuple(metrics)
        self.known: List[str] = []
        self.refused: Dict[str, Tuple[str, str]] = {}
        self.answer: Optional[Tuple[Tuple[str, ...], AuthStatus]] = None  # the last approval and what it covered
        self.waiting = 1  # asks in flight
        self.asked = 1
        self.done: Union[None, Checked, BackendError] = None

    def take(self, group: Tuple[str, ...], bare: bool, outcome, full: bool) -> List[Tuple[Tuple[str, ...], bool]]:
        """One answer in; the asks it calls for out (``(names, no_body)``)."""
        if bare and isinstance(outcome, BackendRejected) and outcome.status == 404:
            # Asked bare only after a denial that found the application: a name is unknown.
            if len(group) > 1:
                return [((m,), True) for m in group]
            self.refused[group[0]] = ("metric_invalid", f"metric_invalid: HTTP 404 to an authorize with "
                                                        f"usage[{group[0]}]=0 and no_body=1, which names no metric")
            return []
        if isinstance(outcome, BackendError):
            self.done = outcome
            return []
        if bare:
            self.known.extend(group)
            return []
        status: AuthStatus = outcome
        if status.reason_code in _REFUSED_NAME:
            name = status.refused_metric
            named = [m for m in group if name is not None and (m == name or m.strip(_RUBY_SPACE) == name)]
            for metric in named:
                self.refused[metric] = (status.reason_code, f'{status.reason_code}: metric "{name}" is invalid')
            if named:
                rest = tuple(m for m in group if m not in named)
                return [(rest, False)] if rest else []
            if len(group) == 1:
                self.refused[group[0]] = (status.reason_code, f"{status.reason_code} (asked about this metric alone)")
                return []
            return [((m,), False) for m in group]
        if status.authorized or status.limits_exceeded:
            self.known.extend(group)
            self.answer = (group, status)
            return []
        if full or status.reason_code in UNKNOWN_APPLICATION:
            # A denial of the application: every metric takes it (authorize), or
            # nothing can be learnt about the names (check).
            known = tuple(m for m in self.metrics if m not in self.refused)
            self.done = Checked(known if full else (), dict(self.refused), status)
            return []
        return self._bare(group)  # denied before the names were checked

    def _bare(self, group: Tuple[str, ...]) -> List[Tuple[Tuple[str, ...], bool]]:
        """Ask with no_body=1, where apisonator takes names as given, but a report strips them: so
        stripped names are asked (in ``_run``). Nothing is left of a blank one: no metric has it."""
        for metric in group:
            if not metric.strip(_RUBY_SPACE):
                self.refused[metric] = ("metric_invalid", "metric_invalid: a blank metric name")
        rest = tuple(m for m in group if m.strip(_RUBY_SPACE))
        return [(rest, True)] if rest else []

    def settle(self, full: bool) -> Optional[Tuple[Tuple[str, ...], bool]]:
        """With no ask in flight: finish, or (authorize) the one more ask an answer for ``known`` takes."""
        known = tuple(m for m in self.metrics if m in self.known)
        if not full:
            self.done = Checked(known, dict(self.refused), None)
            return None
        if self.answer is not None and set(self.answer[0]) == set(known):
            self.done = Checked(known, dict(self.refused), self.answer[1])
            return None
        self.known = []  # asked again, all together
        return known, False


def _max_asks(probe: _Probe) -> int:
    return 2 * len(probe.metrics) + 4


def _run(backend: BackendClient, items: Iterable[Tuple[Any, str, Credentials, Sequence[str]]], concurrency: int,
         on_idle, full: bool) -> Iterator[Tuple[Any, Union[Checked, BackendError]]]:
    """Rounds of calls: the first streams through ``items``; later ones ask what answers called for."""
    body: Iterable = ((_Probe(*item), tuple(item[3])) for item in items)
    bare: List = []
    while True:
        next_body: List = []
        next_bare: List = []
        for asks, no_body in ((body, False), (bare, True)):
            many = backend.check_many if no_body else backend.authorize_many
            strip = (lambda names: tuple(m.strip(_RUBY_SPACE) for m in names)) if no_body else tuple
            requests = ((a, a[0].service_id, a[0].creds, strip(a[1])) for a in asks)
            for (probe, group), outcome in many(requests, concurrency, on_idle=on_idle):
                probe.waiting -= 1
                if probe.done is not None:
                    continue
                more = probe.take(group, no_body, outcome, full)
                if probe.done is None and not more and not probe.waiting:
                    final = probe.settle(full)
                    more = [final] if final is not None else []
                if more and probe.asked + len(more) > _max_asks(probe):
                    probe.done = BackendUnavailable("authorize: answers about metric names did not settle")
                if probe.done is not None:
                    yield probe.tag, probe.done
                    continue
                for names, bare_ask in more:
                    probe.waiting += 1
                    probe.asked += 1
                    (next_bare if bare_ask else next_body).append((probe, names))
        if not next_body and not next_bare:
            return
        body, bare = next_body, next_bare


def check(backend: BackendClient, items: Iterable[Tuple[Any, str, Credentials, Sequence[str]]], concurrency: int,
          on_idle=None) -> Iterator[Tuple[Any, Union[Checked, BackendError]]]:
    """``(tag, service_id, credentials, metrics)`` in; ``(tag, Checked or error)`` out, as they finish."""
    return _run(backend, items, concurrency, on_idle, full=False)


def authorize(backend: BackendClient, items: Iterable[Tuple[Any, str, Credentials, Sequence[str]]],
              concurrency: int) -> Iterator[Tuple[Any, Union[Dict[str, str], BackendError]]]:
    """Auth values for the reported metrics (decision 4) that never hold ``1`` for a metric the
    backend does not know: that one gets ``0:metric_invalid``, what an APIcast without XC would
    get from authrep (404 metric_invalid), so the gateway denies it."""
    for tag, outcome in _run(backend, items, concurrency, None, full=True):
        if isinstance(outcome, BackendError):
            yield tag, outcome
            continue
        values = authorizations(outcome.status, outcome.known)
        values.update((metric, denied(code)) for metric, (code, _) in outcome.refused.items())
        yield tag, values
