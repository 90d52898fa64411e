"""Query-string and form-body parsing with Rack's nested-parameter semantics.

apisonator reads every parameter through ``Rack::Utils.parse_nested_query`` (Rack 3.1), so a
faithful simulator must too: keys are percent-decoded *before* brackets are interpreted
(``usage%5Bhits%5D=1`` == ``usage[hits]=1``), ``a[b][c]=v`` builds nested dicts, ``a[]=v``
builds lists, a key without ``=`` has the value None, and a clash between a hash and a
non-hash (``usage=1&usage[hits]=1``) is a 400. The ``3scale-options`` header is parsed the
same way. Rack 3.1's limits are kept: 4096 parameters, 4 MiB, nesting depth 32.
"""

import re
from typing import Any, Dict, Optional
from urllib.parse import unquote_to_bytes

from . import errors

PARAMS_LIMIT = 4096
BYTESIZE_LIMIT = 4 * 1024 * 1024
DEPTH_LIMIT = 32

_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _unescape(raw: bytes) -> str:
    # Fast path: most keys and values are plain ASCII without escapes.
    if b"%" in raw or b"+" in raw:
        if _BAD_ESCAPE.search(raw):
            raise errors.bad_request("invalid %-encoding (" + raw.decode("latin-1") + ")")
        raw = unquote_to_bytes(raw.replace(b"+", b" "))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.not_valid_data() from None


def parse_nested(qs: bytes, params_limit: int = PARAMS_LIMIT,
                 bytesize_limit: int = BYTESIZE_LIMIT) -> Dict[str, Any]:
    """Parse ``a=1&b[c]=2`` into ``{"a": "1", "b": {"c": "2"}}``; raise SimError when malformed."""
    params: Dict[str, Any] = {}
    if not qs:
        return params
    if len(qs) > bytesize_limit:
        raise errors.bad_request(f"total query size ({len(qs)}) exceeds limit ({bytesize_limit})")
    separators = qs.count(b"&")
    if separators >= params_limit:
        raise errors.bad_request(
            f"total number of query parameters ({separators + 1}) exceeds limit ({params_limit})")
    for piece in qs.split(b"&"):
        piece = piece.lstrip(b" ")  # Rack's separator is /& */
        if not piece:
            continue
        key, eq, value = piece.partition(b"=")
        name = _unescape(key)
        if "[" not in name:
            if name:
                params[name] = _unescape(value) if eq else None
            continue
        _normalize(params, name, _unescape(value) if eq else None, 0)
    return params


def _type_error(key: str, expected: str, got: Any) -> errors.SimError:
    return errors.bad_request(
        f"expected {expected} (got {type(got).__name__}) for param `{key}'")


def _normalize(params: Any, name: str, value: Optional[str], depth: int) -> Any:
    """Port of Rack 3.1 ``QueryParser#_normalize_params``."""
    if depth >= DEPTH_LIMIT:
        raise errors.bad_request("exceeded available parameter key space")
    if depth == 0:
        # At the top level a leading "[" is part of the key: "[usage][hits]" -> "[usage]".
        start = name.find("[", 1)
        if start > 0:
            key, after = name[:start], name[start:]
        else:
            key, after = name, ""
    elif name.startswith("[]"):
        key, after = "[]", name[2:]
    elif name.startswith("[") and name.find("]", 1) > 0:
        end = name.find("]", 1)
        key, after = name[1:end], name[end + 1:]
    else:
        key, after = name, ""

    if not key:
        return params
    if after == "":
        if key == "[]" and depth != 0:
            return [value]
        params[key] = value
    elif after == "[":
        params[name] = value
    elif after == "[]":
        current = params.setdefault(key, [])
        if not isinstance(current, list):
            raise _type_error(key, "Array", current)
        current.append(value)
    elif after.startswith("[]"):
        child = after[3:-1] if (after[2:3] == "[" and after.endswith("]")) else ""
        if not child or "[" in child or "]" in child:
            child = after[2:]
        current = params.setdefault(key, [])
        if not isinstance(current, list):
            raise _type_error(key, "Array", current)
        last = current[-1] if current else None
        if isinstance(last, dict) and child not in last:
            _normalize(last, child, value, depth + 1)
        else:
            current.append(_normalize({}, child, value, depth + 1))
    else:
        current = params.setdefault(key, {})
        if not isinstance(current, dict):
            raise _type_error(key, "Hash", current)
        params[key] = _normalize(current, after, value, depth + 1)
    return params


def parse_options_header(value: Optional[str]) -> Dict[str, Any]:
    """Parse the ``3scale-options`` header; a malformed header counts as no extensions."""
    if not value:
        return {}
    try:
        return parse_nested(value.encode("latin-1", "replace"))
    except errors.SimError:
        return {}


def flag(extensions: Dict[str, Any], name: str) -> bool:
    """Extension flags are on only when their value is exactly the string ``1``."""
    return extensions.get(name) == "1"


def no_body(extensions: Dict[str, Any], params: Optional[Dict[str, Any]]) -> bool:
    """``no_body`` is the exception: any value but ``0``/``false``, also as a URL param.

    (apisonator ``Listener.threescale_extensions``: the deprecated query parameter has users.)
    """
    value = extensions.get("no_body")
    if value is None and params is not None:
        value = params.get("no_body")
    return value is not None and value not in ("0", "false")
