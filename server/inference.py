"""The serving side: events, the schema, and immutable inference snapshots computed with numpy.

The learner (TransformerFusion) publishes a Snapshot after its state changes: a training step, a
new outcome (the feature normalizer moves), a load. A snapshot holds everything a prediction needs
(schema, readiness, weights, normalizer) and never changes once made, so any thread may predict
with it, without a lock, while the owner thread trains. Predictions and validation losses read it,
never the torch module: no train/eval mode switch, no autograd, and numpy's per-call overhead
instead of torch's (tens of microseconds for one event, against hundreds).
`tests/test_inference.py` checks NumpyNet equals FusionNet in eval mode to 1e-6.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .errors import FusionInputError
from .events import Expert, parse_experts, parse_features, plain_average
from .model import FusionNet, prob_logit

SOURCE_FUSION = "fusion"
SOURCE_AVERAGE = "average"
REASON_DISABLED = "disabled"
REASON_WARMING_UP = "warming_up"
REASON_WRONG_EXPERT_COUNT = "wrong_expert_count"
REASON_UNDERPERFORMING = "underperforming"  # decided by the service's live scoring

LN_EPS = 1e-5  # nn.LayerNorm's default
GELU_C = math.sqrt(2.0 / math.pi)  # tanh-GELU: 0.5 h (1 + tanh(C (h + 0.044715 h^3)))
GELU_K = GELU_C * 0.044715


def _standardize(x: np.ndarray) -> np.ndarray:
    """LayerNorm without its gain and bias (folded into the next linear layer)."""
    inv_c = 1.0 / x.shape[-1]  # sum * (1/C) rather than mean(): numpy's mean() costs more per call
    d = x - x.sum(axis=-1, keepdims=True) * inv_c
    return d / np.sqrt((d * d).sum(axis=-1, keepdims=True) * inv_c + LN_EPS)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True, eq=False)
class NumpyNet:
    """FusionNet.forward (server/model.py) in eval mode, in float64 numpy: weights (transposed for
    x @ W, constant terms folded) and the feature normalizer."""

    n_experts: int
    n_features: int
    n_head: int
    skill_bias: bool
    logit_pool: bool
    w: dict[str, np.ndarray]
    norm_shift: np.ndarray  # (F,) running mean
    norm_scale: np.ndarray  # (F,) 1 / running std, 0 for a constant feature

    @classmethod
    def of(cls, net: FusionNet, norm_shift: np.ndarray, norm_scale: np.ndarray,
           params: dict[str, torch.Tensor] | None = None) -> "NumpyNet":
        """From `net`'s weights, or from `params` (same names) when given, e.g. their moving average."""
        c = net.config
        hs = c.hidden_dim // c.num_heads
        source = params if params is not None else dict(net.named_parameters())
        p = {k: v.detach().numpy().astype(np.float64) for k, v in source.items()}
        T = lambda name: p[name].T.copy()  # noqa: E731  x @ W layout
        w: dict[str, np.ndarray] = {"expert_in": T("expert_in.weight"),  # own_bias: (n, C), or (C,) without identity
                                    "own_bias": p["expert_in.bias"] + p.get("expert_id.weight", 0.0)}
        if c.n_features:
            w["feature_in"] = T("feature_in.weight")
            w["feature_bias"] = p["feature_in.bias"] + p["feature_type"]
            w["query_from_features"] = T("pool.query_from_features.weight")
        # Constants folded once, so that a forward runs fewer numpy calls (each costs ~1 us here):
        # a LayerNorm's gain and bias into the linear layer after it, 1/sqrt(head_dim) into the
        # queries and keys, GELU's 1/2 into the projection after it, the two-logit head into one
        # logit difference.
        def fold_ln(ln: str, lin_w: np.ndarray, lin_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return p[f"{ln}.weight"][:, None] * lin_w, p[f"{ln}.bias"] @ lin_w + lin_b
        qkv_w, qkv_b = fold_ln("block.ln_1", T("block.attn.qkv.weight"), p["block.attn.qkv.bias"])
        qkv_w[:, :c.hidden_dim] /= math.sqrt(hs)
        qkv_b[:c.hidden_dim] /= math.sqrt(hs)
        w["qkv"], w["qkv_bias"] = qkv_w, qkv_b
        w["attn_proj"], w["attn_proj_bias"] = T("block.attn.proj.weight"), p["block.attn.proj.bias"]
        w["fc"], w["fc_bias"] = fold_ln("block.ln_2", T("block.mlp.fc.weight"), p["block.mlp.fc.bias"])
        w["mlp_proj"], w["mlp_proj_bias"] = 0.5 * T("block.mlp.proj.weight"), p["block.mlp.proj.bias"]
        key_w, key_b = fold_ln("pool.ln", T("pool.key.weight"), p["pool.key.bias"])
        w["key"], w["key_bias"] = key_w / math.sqrt(hs), key_b / math.sqrt(hs)
        w["query"] = p["pool.query"]
        w["value"], w["value_bias"] = T("pool.value.weight"), p["pool.value.bias"]
        w["head"] = p["head.weight"][0] - p["head.weight"][1]  # (C,): logit(up) - logit(down)
        w["head_bias"] = p["head.bias"][0] - p["head.bias"][1]
        if c.skill_bias:
            w["skill_scale"] = p["pool.skill_scale"]
        if c.logit_pool:
            w["calib_scale"], w["calib_shift"] = p["calib_scale"], p["calib_shift"]
        for a in w.values():
            a.setflags(write=False)
        return cls(c.n_experts, c.n_features, c.num_heads, c.skill_bias, c.logit_pool, w,
                   norm_shift.copy(), norm_scale.copy())

    def normalize(self, feats_raw: np.ndarray) -> np.ndarray:
        """(B, F) raw features -> normalized, clipped to [-5, 5]; NaN (missing) -> 0 (the mean)."""
        z = (feats_raw - self.norm_shift) * self.norm_scale
        return np.clip(np.where(z != z, 0.0, z), -5.0, 5.0)  # z != z: NaN

    def forward(self, x: np.ndarray, feats_raw: np.ndarray | None,
                skill: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """x (B, n, 3) token inputs, feats_raw (B, F), skill (B, n) or (n,) log skill weights (with
        skill_bias) -> prob_up (B,), attention (B, n).

        Attention is averaged over heads, in schema order; each row sums to 1.
        """
        w, nh = self.w, self.n_head
        B, n, _ = x.shape
        own = x @ w["expert_in"] + w["own_bias"]  # (B, n, C)
        C = own.shape[-1]
        hs = C // nh
        tokens = own
        if self.n_features:
            f = self.normalize(feats_raw)  # (B, F)
            ft = f @ w["feature_in"] + w["feature_bias"]  # (B, C)
            tokens = np.concatenate((own, ft[:, None, :]), axis=1)  # (B, T, C)
        T = tokens.shape[1]
        # transformer block: self-attention then feed-forward, pre-norm, residual
        qkv = _standardize(tokens) @ w["qkv"] + w["qkv_bias"]  # (B, T, 3C), q pre-scaled by 1/sqrt(hs)
        qkv = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        att = _softmax(qkv[0] @ qkv[1].transpose(0, 1, 3, 2))  # (B, nh, T, T)
        y = (att @ qkv[2]).transpose(0, 2, 1, 3).reshape(B, T, C)
        tokens = tokens + (y @ w["attn_proj"] + w["attn_proj_bias"])
        h = _standardize(tokens) @ w["fc"] + w["fc_bias"]
        h = h * (1.0 + np.tanh(h * (GELU_C + GELU_K * h * h)))  # 2 * GELU(h); the 1/2 is in mlp_proj
        tokens = tokens + (h @ w["mlp_proj"] + w["mlp_proj_bias"])
        # pooling: the (feature-conditioned) query over the expert tokens; values from `own`
        if self.n_features:
            qh = (w["query"] + f @ w["query_from_features"]).reshape(B, nh, 1, hs)
        else:
            qh = np.broadcast_to(w["query"].reshape(1, nh, 1, hs), (B, nh, 1, hs))
        kh = (_standardize(tokens[:, :n]) @ w["key"] + w["key_bias"]).reshape(B, n, nh, hs).transpose(0, 2, 3, 1)
        vh = (own @ w["value"] + w["value_bias"]).reshape(B, n, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, n, hs)
        scores = qh @ kh  # (B, nh, 1, n); keys pre-scaled by 1/sqrt(hs)
        if self.skill_bias:
            scores = scores + w["skill_scale"] * np.reshape(skill, (-1, 1, 1, n))
        a = _softmax(scores)
        pooled = (a @ vh).reshape(B, C)
        z = pooled @ w["head"] + w["head_bias"]  # logit(up) - logit(down)
        if self.logit_pool:
            z = z + (a.mean(axis=1)[:, 0, :] * (w["calib_scale"] * x[:, :, 0] + w["calib_shift"])).sum(axis=-1)
        prob_up = 1.0 / (1.0 + np.exp(-z))
        return prob_up, a[:, :, 0, :].mean(axis=1)


@dataclass(frozen=True)
class Event:
    """One validated event: experts in request order, features by name."""

    experts: tuple[Expert, ...]
    features: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, model_outputs: Any, features: Any = None) -> "Event":
        return cls(parse_experts(model_outputs), parse_features(features))


@dataclass(frozen=True)
class Prediction:
    prob_up: float
    prob_down: float
    source: str  # "fusion" or "average"
    reason: str | None  # why the average served; None for the fusion
    attention: dict[str, float]  # by expert name, in request order; sums to 1
    model_version: int  # training steps of the model that produced it


@dataclass(frozen=True)
class Resolved:
    """An event mapped onto the schema: experts in schema order, features as a raw vector."""

    x: list[list[float]]  # per expert, schema order: [logit(prob_up), confidence, has_confidence]
    feats: list[float]  # raw, schema order; NaN = missing (imputed by the running mean)
    order: list[int]  # order[j] = request index of schema expert j
    expert_names: tuple[str, ...] | None  # names to fix, when the schema has none yet
    feature_names: tuple[str, ...] | None  # feature schema to fix, when not fixed yet


@dataclass(frozen=True)
class Schema:
    """Which experts and features an event must carry.

    Fixed by configuration or by the first learned outcome (never by a forecast, so that replaying
    the outcomes alone rebuilds the same model). `expert_names` None: experts are matched by
    position; otherwise an event whose experts are all named is matched by name.
    """

    n_models: int
    expert_names: tuple[str, ...] | None
    feature_names: tuple[str, ...] | None  # None: not fixed yet
    missing_features: str = "reject"

    @property
    def names(self) -> tuple[str, ...]:
        return self.expert_names or tuple(f"model_{i}" for i in range(self.n_models))

    def resolve(self, ev: Event, field: str = "model_outputs") -> Resolved:
        """Map an event with n_models experts onto the schema, or raise FusionInputError. `field` is
        what the caller calls the experts ("model_outputs" in-process, "experts" on the wire)."""
        order, schema, new_expert_names, new_feature_names = self.check(ev, field)
        experts = [ev.experts[k] for k in order]
        return Resolved(
            x=[[prob_logit(e.prob_up), 0.0, 0.0] if e.confidence is None else [prob_logit(e.prob_up), e.confidence, 1.0]
               for e in experts],
            feats=[ev.features.get(n, math.nan) for n in schema],
            order=order, expert_names=new_expert_names, feature_names=new_feature_names)

    def check(self, ev: Event, field: str = "model_outputs"):
        """Validate an event against the schema without building the model's inputs: (order,
        feature schema, expert names to fix or None, feature names to fix or None)."""
        names = [e.name for e in ev.experts]
        new_expert_names = None
        order = list(range(self.n_models))
        if self.expert_names is None:
            if all(names):
                new_expert_names = tuple(names)
        elif all(names) and tuple(names) != self.expert_names:
            unknown = [n for n in names if n not in self.expert_names]
            if unknown:
                raise FusionInputError(field, f"unknown expert name(s) {', '.join(map(repr, unknown))}; "
                                       f"expected {', '.join(self.expert_names)}")
            index = {n: i for i, n in enumerate(names)}
            order = [index[n] for n in self.expert_names]
        new_feature_names = None
        schema = self.feature_names
        if schema is None:
            schema = new_feature_names = tuple(sorted(ev.features))
        unknown = sorted(set(ev.features) - set(schema))
        if unknown:
            raise FusionInputError("features", f"unknown feature(s) {', '.join(unknown)}; the schema is "
                                   f"[{', '.join(schema)}]")
        missing = [n for n in schema if n not in ev.features]
        if missing and self.missing_features == "reject":
            raise FusionInputError("features", f"missing feature(s) {', '.join(missing)}; the schema is "
                                   f"[{', '.join(schema)}] (set fusion.missing_features = \"mean\" to impute)")
        return order, schema, new_expert_names, new_feature_names


def expert_probs(x: Sequence[Sequence[float]]) -> list[float]:
    """The experts' (clipped) prob_up, back from their token inputs' logits."""
    return [1.0 / (1.0 + math.exp(-e[0])) for e in x]


def classic_rows(classic: Any, probs: Sequence[float]) -> list[list[float]]:
    """Token inputs of the classic aggregators' forecasts, given the experts' `expert_probs`."""
    return [[prob_logit(p), 0.0, 0.0] for p in classic.predict(probs)]


def average_prediction(ev: Event, reason: str, version: int) -> Prediction:
    p = plain_average(ev.experts)
    names = [e.name or f"model_{i}" for i, e in enumerate(ev.experts)]
    return Prediction(p, 1.0 - p, SOURCE_AVERAGE, reason, {n: 1.0 / len(names) for n in names}, version)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Everything a prediction needs, frozen at one moment of the learner."""

    version: int  # training steps of the weights
    enabled: bool
    ready: bool  # min_samples outcomes learned
    schema: Schema
    net: NumpyNet | None  # None before the schema is fixed
    skill_logw: np.ndarray | None = None  # (tokens,) the recent-skill log weights, schema order
    classic: Any = None  # a frozen copy of the learner's ClassicTokens (classic_tokens), never changed

    def predict(self, events: Sequence[Event], field: str = "model_outputs") -> list[Prediction | FusionInputError]:
        """One batched forward for the events that the fusion serves; the plain average, with its
        reason, for the others; a FusionInputError in place of an event that does not fit the schema.

        Reasons, in order: disabled, wrong_expert_count, warming_up.
        """
        out: list[Prediction | FusionInputError | None] = [None] * len(events)
        fused: list[tuple[int, Resolved]] = []
        for i, ev in enumerate(events):
            if not self.enabled:
                out[i] = average_prediction(ev, REASON_DISABLED, self.version)
            elif len(ev.experts) != self.schema.n_models:
                out[i] = average_prediction(ev, REASON_WRONG_EXPERT_COUNT, self.version)
            elif self.schema.feature_names is None:  # nothing learned yet
                out[i] = average_prediction(ev, REASON_WARMING_UP, self.version)
            else:
                try:
                    r = self.schema.resolve(ev, field)
                except FusionInputError as e:
                    out[i] = e
                    continue
                if self.ready:
                    fused.append((i, r))
                else:
                    out[i] = average_prediction(ev, REASON_WARMING_UP, self.version)
        if fused:
            n = self.schema.n_models
            x = [r.x + classic_rows(self.classic, expert_probs(r.x)) if self.classic is not None else r.x
                 for _, r in fused]
            probs, weights = self.net.forward(
                np.array(x, dtype=np.float64),
                np.array([r.feats for _, r in fused], dtype=np.float64).reshape(len(fused), -1), self.skill_logw)
            if self.classic is not None:  # attention on an aggregator's token goes to the experts behind it
                weights = weights[:, :n] + weights[:, n:] @ np.array(self.classic.shares())
            names = self.schema.names
            for (i, r), p_up, w in zip(fused, probs.tolist(), weights.tolist()):
                attention = [("", 0.0)] * n
                for j, req in enumerate(r.order):
                    attention[req] = (names[j], w[j])
                out[i] = Prediction(p_up, 1.0 - p_up, SOURCE_FUSION, None, dict(attention), self.version)
        return out  # type: ignore[return-value]


class ServingStats:
    """What the forecasts served say: the attention of the last `window` fused forecasts (in
    schema order) and the last source and reason. Thread-safe: predicting threads record, the
    owner reads and saves."""

    def __init__(self, window: int):
        self._lock = threading.Lock()
        self._attention: deque[list[float]] = deque(maxlen=window)
        self.last_source: str | None = None
        self.last_reason: str | None = None

    def record(self, predictions: Iterable[Prediction | Exception], schema_names: Sequence[str],
               served: Iterable[Prediction | Exception] | None = None) -> None:
        """Attention from the fusion's forecasts in `predictions`; the last source and reason from
        `served` (what was answered, when the service overrode the fusion), else `predictions`."""
        predictions = list(predictions)
        last = next((p for p in reversed(list(served) if served is not None else predictions)
                     if isinstance(p, Prediction)), None)
        rows = []
        for p in predictions:
            if isinstance(p, Prediction):
                if p.source == SOURCE_FUSION:
                    rows.append([p.attention[n] for n in schema_names])
        with self._lock:
            self._attention.extend(rows)
            if last is not None:
                self.last_source, self.last_reason = last.source, last.reason

    def weights(self, names: Sequence[str]) -> dict[str, float]:
        """Mean weight per expert over the window (uniform before the first fused forecast)."""
        with self._lock:
            rows = list(self._attention)
        if not rows:
            return {n: 1.0 / len(names) for n in names}
        sums = [math.fsum(col) for col in zip(*rows)]
        total = math.fsum(sums)
        return {n: s / total for n, s in zip(names, sums)}

    def avg_entropy(self, n: int) -> float:
        """Mean of -sum(w ln w) over the window (ln n, uniform, before the first fused forecast)."""
        with self._lock:
            rows = list(self._attention)
        if not rows:
            return math.log(n)
        return math.fsum(-math.fsum(x * math.log(x) for x in w if x > 0.0) for w in rows) / len(rows)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"attention": [list(w) for w in self._attention],
                    "last_source": self.last_source, "last_reason": self.last_reason}

    def load(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self._attention.clear()
            self._attention.extend([float(x) for x in w] for w in state.get("attention") or ())
            self.last_source, self.last_reason = state.get("last_source"), state.get("last_reason")
