"""Validated inputs: expert forecasts, market features and outcome directions.

Every public entry point (the in-process class and the gRPC servicer) goes through these parsers,
so a bad value is refused the same way everywhere, with a FusionInputError naming the field,
before anything is changed.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import FusionInputError

# prob_up + prob_down may differ from 1 by this much (experts round their outputs).
PROB_SUM_TOLERANCE = 1e-3
MAX_NAME_LENGTH = 128
MAX_EXPERTS = 64
MAX_FEATURES = 256
MAX_EVENT_ID_LENGTH = 256
# A feature's magnitude above this is a sentinel or a unit error, not a market reading; its square
# (the running variance that normalizes the feature) stays far from float64's overflow.
MAX_FEATURE_ABS = 1e15
DIRECTIONS = {"UP": 1, "DOWN": 0}


@dataclass(frozen=True)
class Expert:
    prob_up: float
    confidence: float | None = None
    name: str | None = None


def _get(obj: Any, key: str) -> Any:
    if type(obj) is dict or isinstance(obj, Mapping):  # a dict first: ABC checks are slow
        return obj.get(key)
    return getattr(obj, key, None)


def _number(value: Any, field: str, *, required: bool, lo: float | None = None,
            hi: float | None = None) -> float | None:
    if type(value) is float and value - value == 0.0 and (lo is None or lo <= value <= hi):
        return value  # the common case, finite and in range, without ABC checks
    if value is None:
        if required:
            raise FusionInputError(field, "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FusionInputError(field, f"must be a number, got {type(value).__name__}")
    x = float(value)
    if math.isnan(x):
        raise FusionInputError(field, "is NaN")
    if math.isinf(x):
        raise FusionInputError(field, "is infinite")
    if lo is not None and hi is not None and not lo <= x <= hi:
        raise FusionInputError(field, f"must be in [{lo:g}, {hi:g}], got {x!r}")
    return x


def parse_experts(model_outputs: Any, field: str = "model_outputs") -> tuple[Expert, ...]:
    """Validate a sequence of expert outputs (objects with attributes, or dicts).

    Each has `prob_up` in [0, 1]; optional `prob_down` (prob_up + prob_down = 1 within 1e-3),
    `confidence` in [0, 1], and `name` (or `model_name`), unique within the event.

    >>> parse_experts([{"prob_up": 0.6, "name": "trend"}])[0]
    Expert(prob_up=0.6, confidence=None, name='trend')
    """
    if type(model_outputs) not in (list, tuple) and (
            isinstance(model_outputs, (str, bytes, Mapping)) or not isinstance(model_outputs, Sequence)):
        raise FusionInputError(field, f"must be a list of expert outputs, got {type(model_outputs).__name__}")
    rows = []
    for i, o in enumerate(model_outputs):
        if type(o) is dict:  # the usual case, without _get's checks
            get = o.get
            name = get("name")
            rows.append((get("prob_up"), get("prob_down"), get("confidence"), name if name is not None else get("model_name")))
        elif o is None:
            raise FusionInputError(f"{field}[{i}]", "is missing")
        else:
            name = _get(o, "name")
            rows.append((_get(o, "prob_up"), _get(o, "prob_down"), _get(o, "confidence"),
                         name if name is not None else _get(o, "model_name")))
    return parse_expert_fields(rows, field)


def parse_expert_fields(rows: Sequence[tuple[Any, Any, Any, Any]], field: str) -> tuple[Expert, ...]:
    """The validation of parse_experts on (prob_up, prob_down, confidence, name) tuples: what the
    gRPC servicer builds straight from its messages."""
    if len(rows) == 0:
        raise FusionInputError(field, "is empty: at least one expert output is required")
    if len(rows) > MAX_EXPERTS:
        raise FusionInputError(field, f"has {len(rows)} experts; at most {MAX_EXPERTS}")
    experts = []
    seen: dict[str, int] = {}
    for i, (prob_up, prob_down, confidence, name) in enumerate(rows):
        # a plain float in [0, 1] is what _number would return as it is; anything else goes through it
        if not (type(prob_up) is float and 0.0 <= prob_up <= 1.0):
            prob_up = _number(prob_up, f"{field}[{i}].prob_up", required=True, lo=0.0, hi=1.0)
        if prob_down is not None:
            if not (type(prob_down) is float and 0.0 <= prob_down <= 1.0):
                prob_down = _number(prob_down, f"{field}[{i}].prob_down", required=False, lo=0.0, hi=1.0)
            if prob_down is not None and abs(prob_up + prob_down - 1.0) > PROB_SUM_TOLERANCE:
                raise FusionInputError(f"{field}[{i}].prob_down",
                                       f"prob_up + prob_down = {prob_up + prob_down:.6g}, must be 1 (within {PROB_SUM_TOLERANCE:g})")
        if confidence is not None and not (type(confidence) is float and 0.0 <= confidence <= 1.0):
            confidence = _number(confidence, f"{field}[{i}].confidence", required=False, lo=0.0, hi=1.0)
        if name is not None:
            if not isinstance(name, str):
                raise FusionInputError(f"{field}[{i}].name", f"must be a string, got {type(name).__name__}")
            if name == "":
                name = None
            elif len(name) > MAX_NAME_LENGTH:
                raise FusionInputError(f"{field}[{i}].name", f"longer than {MAX_NAME_LENGTH} characters")
            elif name in seen:
                raise FusionInputError(f"{field}[{i}].name", f"duplicate expert name {name!r} (also at index {seen[name]})")
            else:
                seen[name] = i
        experts.append(Expert(prob_up, confidence, name))
    return tuple(experts)


def parse_features(features: Any, field: str = "features") -> dict[str, float]:
    """Validate a mapping of feature name to finite number within +-MAX_FEATURE_ABS. None means
    no features."""
    if features is None:
        return {}
    if type(features) is not dict and not isinstance(features, Mapping):
        raise FusionInputError(field, f"must be a mapping of name to number, got {type(features).__name__}")
    if len(features) > MAX_FEATURES:
        raise FusionInputError(field, f"has {len(features)} features; at most {MAX_FEATURES}")
    out: dict[str, float] = {}
    for name, value in features.items():
        if not isinstance(name, str) or not name:
            raise FusionInputError(field, f"feature names must be non-empty strings, got {name!r}")
        if len(name) > MAX_NAME_LENGTH:
            raise FusionInputError(f"{field}.{name[:32]}...", f"name longer than {MAX_NAME_LENGTH} characters")
        # a float in range (so finite) is what _number would return as it is
        out[name] = value if type(value) is float and -MAX_FEATURE_ABS <= value <= MAX_FEATURE_ABS else \
            _number(value, f"{field}.{name}", required=True, lo=-MAX_FEATURE_ABS, hi=MAX_FEATURE_ABS)
    return out


def parse_direction(direction: Any, field: str = "actual_direction") -> int:
    """"UP" -> 1, "DOWN" -> 0 (case-insensitive); anything else is refused."""
    if isinstance(direction, str) and direction.strip().upper() in DIRECTIONS:
        return DIRECTIONS[direction.strip().upper()]
    raise FusionInputError(field, f'must be "UP" or "DOWN", got {direction!r}')


def parse_event_id(event_id: Any, field: str = "event_id") -> str:
    """A caller's key for a candle: "" (none) or at most 256 printable characters."""
    if event_id is None:
        return ""
    if not isinstance(event_id, str):
        raise FusionInputError(field, f"must be a string, got {type(event_id).__name__}")
    if len(event_id) > MAX_EVENT_ID_LENGTH:
        raise FusionInputError(field, f"longer than {MAX_EVENT_ID_LENGTH} characters")
    if not event_id.isprintable():
        raise FusionInputError(field, "has non-printable characters")
    return event_id


def plain_average(experts: Sequence[Expert]) -> float:
    """The fallback forecast: the mean of the experts' prob_up."""
    return math.fsum(e.prob_up for e in experts) / len(experts)
