"""What the client returns, and the conversions between Python values and the protobuf messages.

The client hands back small frozen dataclasses and plain dicts, never protobuf objects, so that
code written against the in-process `TransformerFusion` does not meet protobuf types.

Enums become lower-case strings without their prefix (`SOURCE_FUSION` -> "fusion",
`FALLBACK_REASON_WARMING_UP` -> "warming_up"), and their UNSPECIFIED value becomes None.

>>> from titan_fusion.client.convert import to_expert_forecasts
>>> [f.prob_up for f in to_expert_forecasts([{"name": "TrendVIC", "prob_up": 0.6}])]
[0.6]
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

from titan_fusion.client.pb import fusion_pb2 as pb

__all__ = [
    "Prediction",
    "OutcomeAck",
    "CheckpointInfo",
    "to_expert_forecasts",
    "to_features",
    "to_direction",
    "prediction_from_proto",
    "local_average",
    "outcome_ack_from_proto",
    "checkpoint_from_proto",
    "stats_from_proto",
    "attention_from_proto",
    "json_finite",
]


@dataclass(frozen=True, slots=True)
class Prediction:
    """One fused forecast.

    `source` is "fusion" or "average"; `reason` says why the average served: "disabled",
    "warming_up", "wrong_expert_count", "underperforming" (decided by the service), or
    "unavailable" (the service could not be reached and the client averaged locally; then
    `model_version` is -1). `attention` maps expert name to weight, in the request's expert order.
    """

    prob_up: float
    prob_down: float
    source: str
    reason: str | None = None
    attention: dict[str, float] = field(default_factory=dict)
    model_version: int = 0
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class OutcomeAck:
    """The service's acknowledgement of one outcome.

    `duplicate` is True when the event_id had already been recorded (nothing was learned this
    time); after a retry that usually means the earlier attempt was recorded but its answer was
    lost. `attempts` counts the calls this acknowledgement took (1 without retries).
    """

    duplicate: bool
    samples_trained: int
    model_version: int
    used_predict_inputs: bool
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class BulkResult:
    """The service's answer to a RecordOutcomes stream (`FusionClient.record_outcomes`)."""

    accepted: int  # journaled; learned in order (training may trail: Stats training_lag)
    duplicates: int  # event_id already recorded: not learned again
    rejected: int  # refused rows; the first ones in `rejections` (at most 100, within a size budget)
    rejections: tuple[dict[str, Any], ...]  # {"index", "event_id", "code", "message"}
    journal_sequence: int


def bulk_result_from_proto(response: pb.RecordOutcomesResponse) -> BulkResult:
    return BulkResult(response.accepted, response.duplicates, response.rejected,
                      tuple({"index": r.index, "event_id": r.event_id, "code": r.code, "message": r.message}
                            for r in response.rejected_outcomes),
                      response.journal_sequence)


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A named checkpoint in the service's data directory. `created_at` is RFC 3339 UTC."""

    name: str
    samples_trained: int
    train_steps: int
    created_at: str
    size_bytes: int


# -- Python -> proto ----------------------------------------------------------------------------


def _getter(item: Any) -> Callable[[str], Any]:
    """item.get for a mapping (a dict checked first: it is the common case, and an ABC check is
    slow), else attribute access with None for a missing attribute."""
    if isinstance(item, dict) or isinstance(item, Mapping):
        return item.get
    return lambda key: getattr(item, key, None)


def _as_float(value: Any, where: str) -> float:
    if type(value) is float:  # the common case, first
        return value
    if isinstance(value, (bool, str, bytes)):  # a bool is an int to Python, never a probability;
        raise TypeError(f"{where} must be a number, got {value!r}")  # "0.6" is refused in-process too
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where} must be a number, got {value!r}") from None


def to_expert_forecasts(experts: Iterable[Any]) -> list[pb.ExpertForecast]:
    """Experts as `ExpertForecast` messages.

    Each item is a mapping or an object with `prob_up` (required) and optionally `prob_down`,
    `confidence` and `name` (or `model_name`, as the original `ModelOutput` calls it). A missing or
    None optional field stays unset in the message. Ranges are the service's to check.

    >>> class ModelOutput:
    ...     model_name, prob_up, prob_down, confidence = "Oscillator", 0.3, 0.7, 0.9
    >>> [f] = to_expert_forecasts([ModelOutput()])
    >>> f.name, f.prob_up, f.prob_down, f.confidence
    ('Oscillator', 0.3, 0.7, 0.9)
    >>> [f] = to_expert_forecasts([{"prob_up": 0.55}])
    >>> f.HasField("prob_up"), f.HasField("prob_down"), f.HasField("confidence"), f.name
    (True, False, False, '')
    >>> to_expert_forecasts([{"name": "TrendVIC"}])
    Traceback (most recent call last):
    ...
    ValueError: experts[0].prob_up is required
    """
    if experts is None or isinstance(experts, (str, bytes, Mapping)):
        raise TypeError(
            f"experts must be a sequence of forecasts, got {type(experts).__name__}"
        )
    forecasts = []
    for i, item in enumerate(experts):
        get = _getter(item)
        prob_up = get("prob_up")
        if prob_up is None:
            raise ValueError(f"experts[{i}].prob_up is required")
        fields = {"prob_up": _as_float(prob_up, f"experts[{i}].prob_up")}
        for key in ("prob_down", "confidence"):
            value = get(key)
            if value is not None:
                fields[key] = _as_float(value, f"experts[{i}].{key}")
        name = get("name")
        if name is None:
            name = get("model_name")
        if name is not None:
            if not isinstance(name, str):
                raise TypeError(f"experts[{i}].name must be a str, got {type(name).__name__}")
            fields["name"] = name
        forecasts.append(pb.ExpertForecast(**fields))
    return forecasts


def to_features(features: Mapping[str, float] | None) -> dict[str, float]:
    """Market features as the request's name -> value map (raw values: the service normalizes).

    >>> to_features({"close": 50000, "rsi": 55.5})
    {'close': 50000.0, 'rsi': 55.5}
    """
    if features is None:
        return {}
    if not isinstance(features, Mapping):
        raise TypeError(
            f"features must be a mapping of name to number, got {type(features).__name__}"
        )
    out = {}
    for k, v in features.items():
        if not isinstance(k, str):  # str(k) could merge 1 and "1" into one feature
            raise TypeError(f"feature names must be str, got {k!r}")
        out[k] = _as_float(v, f"features[{k!r}]")
    return out


def to_direction(actual_direction: Any) -> int:
    """"UP" or "DOWN" (any case) as a `Direction`; anything else is a ValueError.

    >>> to_direction("up") == pb.DIRECTION_UP, to_direction("DOWN") == pb.DIRECTION_DOWN
    (True, True)
    >>> to_direction("FLAT")
    Traceback (most recent call last):
    ...
    ValueError: actual_direction must be "UP" or "DOWN", got 'FLAT'
    """
    if isinstance(actual_direction, str):
        direction = {"UP": pb.DIRECTION_UP, "DOWN": pb.DIRECTION_DOWN}.get(
            actual_direction.strip().upper()
        )
        if direction is not None:
            return direction
    raise ValueError(f'actual_direction must be "UP" or "DOWN", got {actual_direction!r}')


# -- proto -> Python ----------------------------------------------------------------------------


def _enum_name(enum: EnumDescriptor, number: int, prefix: str) -> str | None:
    """Lower-case name of an enum value without its prefix; None for UNSPECIFIED (0)."""
    if number == 0:
        return None
    value = enum.values_by_number.get(number)
    if value is None:  # a newer service than this client's generated code
        return f"unknown_{number}"
    return value.name.removeprefix(prefix).lower()


def _source(number: int) -> str | None:
    return _enum_name(pb.Source.DESCRIPTOR, number, "SOURCE_")


def _reason(number: int) -> str | None:
    return _enum_name(pb.FallbackReason.DESCRIPTOR, number, "FALLBACK_REASON_")


_ENUM_PREFIXES = {
    pb.Source.DESCRIPTOR.full_name: "SOURCE_",
    pb.FallbackReason.DESCRIPTOR.full_name: "FALLBACK_REASON_",
    pb.Direction.DESCRIPTOR.full_name: "DIRECTION_",
}


def _message_to_dict(message: Message) -> dict[str, Any]:
    """Every field of a flat message, by name, in field order; enums as lower-case strings."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.enum_type is not None:
            prefix = _ENUM_PREFIXES.get(fd.enum_type.full_name, "")
            convert = lambda n, e=fd.enum_type, p=prefix: _enum_name(e, n, p)  # noqa: E731
        else:
            convert = lambda v: v  # noqa: E731
        if fd.is_repeated:
            out[fd.name] = [convert(v) for v in value]
        else:
            out[fd.name] = convert(value)
    return out


def attention_from_proto(weights: Iterable[pb.ExpertWeight]) -> dict[str, float]:
    """Expert name -> weight, in the message's order (an unnamed expert is "model_<index>")."""
    return {(w.name or f"model_{i}"): w.weight for i, w in enumerate(weights)}


def prediction_from_proto(response: pb.PredictResponse) -> Prediction:
    return Prediction(
        prob_up=response.prob_up,
        prob_down=response.prob_down,
        source=_source(response.source) or "unspecified",  # a server that forgot to say
        reason=_reason(response.reason),
        attention=attention_from_proto(response.attention),
        model_version=response.model_version,
        event_id=response.event_id or None,
    )


def average_names(names: list[str]) -> list[str]:
    """The attention keys of a plain average, one per expert in order: each expert's name, or
    model_<i> for an unnamed one; model_<i> for all when that would repeat a key (a repeated key
    would merge two experts' weights in the attention map).

    >>> average_names(["a", ""]), average_names(["model_1", "", "x"])
    (['a', 'model_1'], ['model_0', 'model_1', 'model_2'])
    """
    keys = [name or f"model_{i}" for i, name in enumerate(names)]
    if len(set(keys)) != len(keys):
        keys = [f"model_{i}" for i in range(len(names))]
    return keys


def local_average(
    forecasts: list[pb.ExpertForecast], *, event_id: str | None = None
) -> Prediction:
    """The plain average of the experts' prob_up, computed here when the service cannot answer.

    >>> p = local_average(to_expert_forecasts([{"name": "a", "prob_up": 0.6}, {"prob_up": 0.4}]))
    >>> p.prob_up, p.prob_down, p.source, p.reason, p.attention
    (0.5, 0.5, 'average', 'unavailable', {'a': 0.5, 'model_1': 0.5})
    """
    if not forecasts:
        raise ValueError("cannot average zero experts")
    for i, f in enumerate(forecasts):
        if not (math.isfinite(f.prob_up) and 0.0 <= f.prob_up <= 1.0):
            raise ValueError(f"experts[{i}].prob_up must be in [0, 1], got {f.prob_up!r}")
    prob_up = math.fsum(f.prob_up for f in forecasts) / len(forecasts)
    names = average_names([f.name for f in forecasts])
    weight = 1.0 / len(forecasts)
    return Prediction(
        prob_up=prob_up,
        prob_down=1.0 - prob_up,
        source="average",
        reason="unavailable",
        attention={name: weight for name in names},
        model_version=-1,
        event_id=event_id or None,
    )


def outcome_ack_from_proto(response: pb.RecordOutcomeResponse, *, attempts: int = 1) -> OutcomeAck:
    return OutcomeAck(
        duplicate=response.duplicate,
        samples_trained=response.samples_trained,
        model_version=response.model_version,
        used_predict_inputs=response.used_predict_inputs,
        attempts=attempts,
    )


def checkpoint_from_proto(info: pb.CheckpointInfo) -> CheckpointInfo:
    return CheckpointInfo(
        name=info.name,
        samples_trained=info.samples_trained,
        train_steps=info.train_steps,
        created_at=info.created_at,
        size_bytes=info.size_bytes,
    )


def stats_from_proto(response: pb.StatsResponse) -> dict[str, Any]:
    """Every `TrainingStats` field at the top level, then "attention", "service" and "live" (live
    shadow scoring: "served", "fusion", "average" scores and the switch's state).

    >>> stats = stats_from_proto(pb.StatsResponse(
    ...     training=pb.TrainingStats(samples_trained=1152, last_source=pb.SOURCE_AVERAGE,
    ...                               last_reason=pb.FALLBACK_REASON_WARMING_UP),
    ...     attention=[pb.ExpertWeight(name="TrendVIC", weight=1.0)],
    ...     service=pb.ServiceStats(predictions=7)))
    >>> stats["samples_trained"], stats["last_source"], stats["last_reason"], stats["is_overfitting"]
    (1152, 'average', 'warming_up', False)
    >>> stats["attention"], stats["service"]["predictions"]
    ({'TrendVIC': 1.0}, 7)
    """
    stats = _message_to_dict(response.training)
    stats["attention"] = attention_from_proto(response.attention)
    stats["service"] = _message_to_dict(response.service)
    stats["live"] = {**_message_to_dict(response.live),
                     **{src: _message_to_dict(getattr(response.live, src)) for src in ("served", "fusion", "average")}}
    return stats


def json_finite(x: Any) -> Any:
    """`x` with None for every NaN or infinity, through dicts, lists and tuples, and numpy scalars
    as Python numbers (by duck typing: the client has no numpy): what strict JSON can hold. The
    statistics say "no value yet" with NaN; json.dumps would write a bare NaN, which jq and
    JavaScript refuse. `titan-fusion stats` and the backtest reports print through this.

    >>> json_finite({"train_loss": float("nan"), "history": [float("inf"), 0.5]})
    {'train_loss': None, 'history': [None, 0.5]}
    """
    if isinstance(x, float):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_finite(v) for v in x]
    if type(x).__module__ == "numpy" and hasattr(x, "item"):  # a numpy scalar
        return json_finite(x.item())
    return x
