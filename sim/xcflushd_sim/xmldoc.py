"""The XML documents of the backend, byte for byte (``threescale-backend.md`` §4.1–4.2).

apisonator builds them by string concatenation: one line, no whitespace between elements,
a fixed element order. So do we — it is also the cheapest way. Unlike apisonator, every text
and attribute is escaped (the real ``<reason>`` is not); quotes stay literal in text, as
Ruby's Builder leaves them.
"""

from typing import Dict, List

from .errors import SimError
from .model import AuthStatus
from .periods import format_time

DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'


def escape_text(text: str) -> str:
    if "&" in text or "<" in text or ">" in text:
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


def escape_attr(text: str) -> str:
    return escape_text(text).replace('"', "&quot;")


def status_document(status: AuthStatus) -> bytes:
    """``<status>`` for authorize / oauth_authorize (HTTP 200 or 409)."""
    parts: List[str] = [DECLARATION, "<status>"]
    if status.authorized:
        parts.append("<authorized>true</authorized>")
    else:
        parts.append("<authorized>false</authorized><reason>")
        parts.append(escape_text(status.denial.text))
        parts.append("</reason>")
    if status.application is not None:
        app_id, key, field, url = status.application
        parts.append(f"<application><id>{escape_text(app_id)}</id><key>{escape_text(key)}</key>"
                     f"<{field}>{escape_text(url)}</{field}></application>")
    parts.append(f"<plan>{escape_text(status.plan)}</plan>")
    if status.reports:
        parts.append("<usage_reports>")
        for r in status.reports:
            parts.append(f'<usage_report metric="{escape_attr(r.metric)}" period="{r.period}"')
            parts.append(' exceeded="true">' if r.current_value > r.max_value else ">")
            if r.start is not None:
                parts.append(f"<period_start>{format_time(r.start)}</period_start>"
                             f"<period_end>{format_time(r.end)}</period_end>")
            parts.append(f"<max_value>{r.max_value}</max_value>"
                         f"<current_value>{r.current_value}</current_value></usage_report>")
        parts.append("</usage_reports>")
    if status.app_keys is not None:
        app_id, service_id, keys = status.app_keys
        parts.append(f'<app_keys app="{escape_attr(app_id)}" svc="{escape_attr(service_id)}">')
        parts.extend(f'<key id="{escape_attr(k)}"/>' for k in keys)
        parts.append("</app_keys>")
    if status.hierarchy is not None:
        parts.append("<hierarchy>")
        parts.extend(f'<metric name="{escape_attr(name)}" children="{escape_attr(children)}"/>'
                     for name, children in status.hierarchy)
        parts.append("</hierarchy>")
    parts.append("</status>")
    return "".join(parts).encode("utf-8")


def error_document(error: SimError) -> bytes:
    """``<error code="...">message</error>`` for 400/403/404/422 answers."""
    return (f'{DECLARATION}<error code="{escape_attr(error.code)}">'
            f"{escape_text(error.message)}</error>").encode()


def errors_list_document(errors: List[Dict]) -> bytes:
    """``<errors>`` of the 2017 ``/transactions/errors.xml`` (dropped report batches)."""
    parts = [DECLARATION, "<errors>"]
    for e in errors:
        parts.append(f'<error code="{escape_attr(e["code"])}" '
                     f'timestamp="{escape_attr(e["timestamp"])}">'
                     f"{escape_text(e['message'])}</error>")
    parts.append("</errors>")
    return "".join(parts).encode("utf-8")
