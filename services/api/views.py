"""Pure decoding of REST request bodies and shaping of GET responses; no I/O, no clock.

Bodies are decoded the way GORB's handlers did (``json.NewDecoder(r.Body).Decode(&opts)``, gorb-spec
§2.1), so GORB clients keep working:

- an empty (or all-whitespace) body is the error ``EOF``; bad JSON is a 400 with the parser's text;
- object keys match the fields case-insensitively (``"HOST"`` fills ``host``; of two spellings of
  one field the later wins), unknown keys are ignored, and ``null`` leaves a field at its default;
  pulse ``args`` is a free map and keeps its keys as sent;
- a wrong type is a 400 with msgspec's text (``gorb.common.validation.decode``).

As in Go, a lone UTF-16 surrogate escape becomes U+FFFD, and ``"protocol": ""`` means tcp (Go
cannot tell an empty string from a missing one). Deliberate differences: text after the JSON value
is refused (Go read the first value and ignored the rest), and so are ``NaN``/``Infinity`` (not
JSON), integers beyond 64 bits and nesting deeper than 64 levels (what the bus cannot carry); a
number such as ``80.0`` is accepted for an integer field (JSON Schema calls it an integer).

Responses keep GORB's shapes (gorb-spec §2.8) with additions beside them: ``address`` (the
resolved IP), ``stats`` (the kernel's counters, null when the kernel has no entry), ``metrics`` with
``status_name``, ``last_check`` and ``last_result``; ``backends`` is ``[]``, never null.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from gorb.common import errors
from gorb.common.errors import GorbError, invalid
from gorb.common.model import BackendOptions, ServiceOptions
from gorb.common.validation import decode, validate_weight

MSG_EOF = "EOF"
MSG_WEIGHT_REQUIRED = "weight is required"

# GORB's integer statuses (K:pulse/status.go): StatusUp = 0, StatusDown = 1.
STATUS_CODES = {"up": 0, "down": 1}


# --- request bodies -------------------------------------------------------------------------------

def _last_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose key order is the order of each key's LAST occurrence, so that folding
    keys in order lets the later spelling win, as Go's decoder does."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.pop(key, None)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value ({name} is "
                     "not JSON)")


MAX_DEPTH = 64  # far below msgpack's nesting limit on the bus (511)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_INT_RANGE = (-(2**63), 2**64 - 1)  # what msgpack (the bus) carries


def _carryable(value: Any, depth: int = 0) -> Any:
    """``value`` made fit for the bus, as Go's decoder would have it: a lone UTF-16 surrogate
    (``"\\ud800"``) becomes U+FFFD; an integer beyond 64 bits or nesting deeper than
    ``MAX_DEPTH`` is a 400 (Go read such numbers as floats; no field here wants one)."""
    if depth > MAX_DEPTH:
        raise invalid(f"JSON nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise invalid(f"json: number {value} out of range")
        return value
    if isinstance(value, list):
        return [_carryable(v, depth + 1) for v in value]
    return {_carryable(k, depth + 1): _carryable(v, depth + 1) for k, v in value.items()}


def parse_json(raw: bytes) -> Any:
    """The JSON value in a request body; GorbError(INVALID) with ``EOF`` or the parser's text."""
    if not raw.strip():
        raise invalid(MSG_EOF)
    try:
        value = json.loads(raw, object_pairs_hook=_last_wins, parse_constant=_no_constant)
    except RecursionError:
        raise invalid(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes not UTF-8
        raise invalid(str(exc)) from None
    return _carryable(value)


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
               float: "number", type(None): "null"}


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise invalid(f"json: cannot unmarshal {_JSON_TYPES.get(type(value), 'value')} into {what}")
    return value


def _struct_type(annotation: msgspec.inspect.Type) -> type | None:
    """The Struct class a field holds (directly or as ``Struct | None``), if any."""
    if isinstance(annotation, msgspec.inspect.StructType):
        return annotation.cls
    if isinstance(annotation, msgspec.inspect.UnionType):
        for t in annotation.types:
            if isinstance(t, msgspec.inspect.StructType):
                return t.cls
    return None


def _integer_only(annotation: msgspec.inspect.Type) -> bool:
    """Whether a field takes integers but not other numbers."""
    types = annotation.types if isinstance(annotation, msgspec.inspect.UnionType) else (annotation,)
    return (any(isinstance(t, msgspec.inspect.IntType) for t in types)
            and not any(isinstance(t, msgspec.inspect.FloatType) for t in types))


@functools.lru_cache(maxsize=None)
def _fields(cls: type[msgspec.Struct]) -> dict[str, msgspec.inspect.Field]:
    """``cls``'s fields by case-folded name."""
    return {f.encode_name.casefold(): f for f in msgspec.inspect.type_info(cls).fields}


def fold(obj: Mapping[str, Any], cls: type[msgspec.Struct]) -> dict[str, Any]:
    """``obj`` with keys renamed to ``cls``'s fields as Go matches them (case-insensitively, the
    later spelling winning), unknown keys and ``null`` values dropped; nested Structs likewise.

    A number without a fraction written as ``80.0`` counts as the integer 80 for an integer
    field: JSON Schema (and so the OpenAPI document) calls it an integer."""
    fields = _fields(cls)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        field = fields.get(key.casefold()) if isinstance(key, str) else None
        if field is None or value is None:
            continue
        nested = _struct_type(field.type)
        if nested is not None and isinstance(value, Mapping):
            value = fold(value, nested)
        elif isinstance(value, float) and value.is_integer() and _integer_only(field.type):
            value = int(value)
        out[field.encode_name] = value
    return out


def decode_service(raw: bytes) -> ServiceOptions:
    """The body of ``PUT /service/<vs>`` as ServiceOptions (not yet validated)."""
    value = parse_json(raw)
    if value is None:  # Go: decoding null into a struct leaves it as it was
        value = {}
    folded = fold(_object(value, "ServiceOptions"), ServiceOptions)
    if folded.get("protocol") == "":
        del folded["protocol"]
    return decode(folded, ServiceOptions)


def decode_backend(raw: bytes) -> BackendOptions:
    """The body of ``PUT /service/<vs>/<rs>`` as BackendOptions (not yet validated)."""
    value = parse_json(raw)
    if value is None:
        value = {}
    return decode(fold(_object(value, "BackendOptions"), BackendOptions), BackendOptions)


def decode_service_patch(raw: bytes) -> dict[str, Any]:
    """The body of ``PATCH /service/<vs>``: only the options it names, type-checked.

    The writer merges them into the stored options, validates the result and refuses a change of
    the service's kernel key (host, port, protocol, fwmark, family)."""
    folded = fold(_object(parse_json(raw), "ServiceOptions"), ServiceOptions)
    if folded.get("protocol") == "":
        folded["protocol"] = "tcp"
    decode(folded, ServiceOptions)  # types only: every field of ServiceOptions has a default
    return folded


def decode_weight(raw: bytes) -> int:
    """The weight in the body of ``PATCH /service/<vs>/<rs>``; the only field GORB used.

    FIX (gorb-spec §2.7, §8.10): GORB read an omitted weight as 0 and silently drained the
    backend; here it is a 400 ``weight is required``. A JSON number with no fraction (``10`` or
    ``10.0``, both integers in JSON Schema) is accepted; anything else is a 400."""
    value = parse_json(raw)
    if value is None:
        raise invalid(MSG_WEIGHT_REQUIRED)
    weight = None
    for key, v in _object(value, "BackendOptions").items():
        if isinstance(key, str) and key.casefold() == "weight":
            weight = v
    if weight is None:
        raise invalid(MSG_WEIGHT_REQUIRED)
    if isinstance(weight, float) and weight.is_integer():
        weight = int(weight)
    return validate_weight(weight)


def status_of(err: GorbError) -> int:
    return errors.HTTP_STATUS.get(err.errno, 500)


# --- GET responses --------------------------------------------------------------------------------

def backend_metrics(view: Mapping[str, Any], now: float) -> dict[str, Any]:
    """GORB's ``metrics`` object for a writer BackendView, plus ``status_name`` and the last check.

    The writer's view carries pulse's verdict as ``health`` (``status`` up|down|unknown, ``since``:
    when it last changed) and the last result as ``check`` (``at``, ``ok``, ``error``,
    ``latency``, ``health``: the share of recent checks passed; kept in memory only, so null after
    a writer restart until the next check). From them, as GORB reported (K:pulse/metrics.go):

        status   GORB's integer, 1 only for down: a backend not checked yet reads as Up (0), as
                 GORB's fresh pulse did (status_name says "unknown")
        health   the share of recent checks passed; before any check 1 (GORB's initial pulse
                 metrics; GORB's API showed 0 there, bug §8.6), 0 for a down backend
        uptime   whole seconds since it came up; 0 unless up (``now`` is the wall clock)

    A view without ``health`` (a writer without pulse) reads as never checked.
    """
    health = view.get("health") or {}
    check = view.get("check")
    name = health.get("status", "unknown")
    if name not in STATUS_CODES:
        name = "unknown"
    if check is not None and check.get("health") is not None:
        share = float(check["health"])
    else:
        share = 0.0 if name == "down" else 1.0
    uptime = 0
    if name == "up" and health.get("since"):
        uptime = max(0, int(now - health["since"]))
    return {
        "status": STATUS_CODES.get(name, 0),
        "status_name": name,
        "health": share,
        "uptime": uptime,
        "last_check": None if check is None else check.get("at"),
        "last_result": None if check is None else {
            "ok": check.get("ok"), "error": check.get("error", ""),
            "latency": check.get("latency")},
        "checks": 0 if check is None else check.get("checks", 0),
        "consecutive_passes": 0 if check is None else check.get("passes", 0),
        "consecutive_failures": 0 if check is None else check.get("failures", 0),
        "held_in": bool(health.get("held_in", False)),  # fail-open keeps it in although down
    }


def current_weight(view: Mapping[str, Any]) -> int:
    """The weight the kernel has now if the writer saw the kernel entry; else the weight the
    writer wants it to have (configured weight and health); else the configured one."""
    kernel = view.get("kernel")
    if kernel is not None and kernel.get("weight") is not None:
        return kernel["weight"]
    if view.get("weight") is not None:
        return view["weight"]
    return view["options"]["weight"]


def backend_info(view: Mapping[str, Any], now: float) -> dict[str, Any]:
    """``GET /service/<vs>/<rs>``: GORB's BackendInfo plus the resolved ``address`` and the
    kernel's dest ``stats`` (incl. active/inactive connections).

    As in GORB, ``options.weight`` is the current weight (0 while down) and ``options.pulse`` the
    pulse in effect, defaults filled in (here: the backend's own fields, then its service's)."""
    options = dict(view["options"])
    options["weight"] = current_weight(view)
    if view.get("pulse") is not None:
        options["pulse"] = view["pulse"]
    kernel = view.get("kernel")
    return {
        "options": options,
        "metrics": backend_metrics(view, now),
        "address": view.get("address", ""),
        "stats": None if kernel is None else kernel.get("stats"),
    }


def service_health(backends: Mapping[str, Mapping[str, Any]], now: float) -> float:
    """The mean health of a service's backends; 1 with none ("healthy, albeit useless": GORB K)."""
    if not backends:
        return 1.0
    return sum(backend_metrics(b, now)["health"] for b in backends.values()) / len(backends)


def service_info(view: Mapping[str, Any], now: float) -> dict[str, Any]:
    """``GET /service/<vs>``: GORB's ServiceInfo (options as stored, health, backend ids) plus the
    resolved ``address`` and the kernel's service ``stats``."""
    backends = view.get("backends") or {}
    kernel = view.get("kernel")
    return {
        "options": dict(view["options"]),
        "health": service_health(backends, now),
        "backends": sorted(backends),
        "address": view.get("address", ""),
        "stats": None if kernel is None else kernel.get("stats"),
    }


def encode(value: Any) -> bytes:
    """GORB's JSON output: tab-indented, no trailing newline (K:util/json.go)."""
    return json.dumps(value, indent="\t", ensure_ascii=False).encode()
