"""The serving side: events, the schema, and immutable inference snapshots (numpy weights, folded;
the single-event forward compiled in server/onekernel.py).

The learner (TransformerFusion) publishes a Snapshot after its state changes: a training step, a
new outcome (the feature normalizer moves), a load. A snapshot holds everything a prediction needs
(schema, readiness, weights, normalizer) and never changes once made, so any thread may predict
with it, without a lock, while the owner thread trains. Predictions read it,
never the torch module: no train/eval mode switch, no autograd, no torch per-call overhead
(hundreds of microseconds for one event). `tests/test_inference.py` checks NumpyNet equals
FusionNet in eval mode to 1e-6, and the compiled single-event forward equals NumpyNet.
"""
from __future__ import annotations

import functools
import math
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from titan_fusion.client.convert import average_names

from .errors import FusionInputError
from .events import Expert, parse_experts, parse_features, plain_average

if TYPE_CHECKING:  # the service process predicts without torch: only the trainer imports it
    import torch

    from .model import FusionNet

SOURCE_FUSION = "fusion"
SOURCE_AVERAGE = "average"
REASON_DISABLED = "disabled"
REASON_WARMING_UP = "warming_up"
REASON_WRONG_EXPERT_COUNT = "wrong_expert_count"
REASON_UNDERPERFORMING = "underperforming"  # decided by the service's live scoring

PROB_EPS = 1e-4  # probabilities are clipped to [eps, 1 - eps] before the logit: |logit| <= 9.2
LN_EPS = 1e-5  # nn.LayerNorm's default
GELU_C = math.sqrt(2.0 / math.pi)  # tanh-GELU: 0.5 h (1 + tanh(C (h + 0.044715 h^3)))
GELU_K = GELU_C * 0.044715


def prob_logit(p: float) -> float:
    """logit(p) with p clipped to [PROB_EPS, 1 - PROB_EPS]: an expert's first token input."""
    p = min(max(p, PROB_EPS), 1.0 - PROB_EPS)
    return math.log(p) - math.log1p(-p)


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


def _aug_cols(a: np.ndarray) -> np.ndarray:
    """(r, C) -> (r, C + 1): a zero last column."""
    return np.concatenate((a, np.zeros((a.shape[0], 1))), axis=1)


class OneEventNet:
    """NumpyNet.forward for one event (B = 1): what does not depend on the event is folded once
    per snapshot (here, in numpy), so that a forward is a product with a constant matrix and a few
    small ones, run as one compiled function (server/onekernel.py; bind()). In numpy it was about
    35 calls on small arrays, each costing about 1 us whatever its size.

    The algebra is exact; only rounding differs from NumpyNet.forward (1e-15):

    - Everything before the first LayerNorm is linear in u = [token inputs (3 per token), the
      normalized features, 1], and so are the pooling's values seen through the head (only
      value_h . head_h counts, per head), logit_pool's calibrated logits and the pooling keys'
      weights times the feature-conditioned query. One product `u @ M` gives them all.
    - Token vectors carry one more, constant, component: 1 in the residual stream, sqrt(eps) once
      centered (`P`, which also scales by 1/sqrt(C)), so that |d|^2 = var + eps is one row-wise dot,
      and constant biases ride along with the weights.
    - Self-attention: the keys' bias cancels in the softmax (it adds q_i . b_k to every key of row
      i), the values go through the output projection per head first (V_h W_proj,h), and their bias
      passes through the softmax unchanged (rows sum to 1) into the residual. The queries come out
      masked per head, so all heads' scores are one product. The pooling's key bias cancels too.
    - Only the expert tokens are carried past the self-attention: the feature token is a key and a
      value there, but nothing reads its own output.
    - The pooling's tail (the softmax normalizers, the head's logit, attention per expert with the
      classic tokens' shares) is one product of the exponentiated scores with a matrix whose
      constant columns come from M's bias row.
    - Softmax without subtracting the maximum when it cannot overflow or underflow: every score is
      bounded by norms of the weights (a LayerNorm output has norm <= sqrt(C); the features are
      clipped to [-5, 5]); when a bound exceeds MAX_SCORE, the maxima are subtracted as usual.

    `skill` (the snapshot's skill log weights, with skill_bias) and `shares` (the classic
    aggregators' weights over the experts, one row per classic token) are constants of a snapshot.
    """

    MAX_SCORE = 300.0  # exp(+-300) is far from float64's overflow and from its subnormals

    # the folded arrays live only in _args, the compiled forward's arguments
    __slots__ = ("shift", "scale", "bounded", "_args", "_kernel")

    def __init__(self, net: NumpyNet, skill: np.ndarray | None = None,
                 shares: Sequence[Sequence[float]] | None = None):
        w = net.w
        n, nf, nh = net.n_experts, net.n_features, net.n_head
        C = w["qkv"].shape[0]
        hs, C1, sq = C // nh, C + 1, math.sqrt(C)
        T = n + (1 if nf else 0)
        ne = n - (len(shares) if shares is not None else 0)  # the experts; then the classic tokens
        P = np.zeros((C1, C1))  # centering and 1/sqrt(C); the constant component 1 -> sqrt(eps)
        P[:C, :C] = (np.eye(C) - 1.0 / C) / sq
        P[C, C] = math.sqrt(LN_EPS)
        qkv = w["qkv"]
        idx = np.arange(n)
        rows = 3 * n + nf + 1  # u: 3 inputs per token, the features, 1
        # M's output: D (T, C1) the centered tokens; X (n, C1) the expert tokens (plus the constant
        # 1) plus the attention's constant output; RG (n, ne + 1 + nh) per token its shares over the
        # experts, 1, and per head value_h . head_h (+ its calibrated logit / nh with logit_pool);
        # with features, WKQ (C1, nh) the pooling keys' weights times the query.
        own1 = np.zeros((3 + n, C1))  # [the expert inputs' weights (3 rows); the bias of each token]
        own1[:3, :C] = w["expert_in"]
        own1[3:, :C] = w["own_bias"]
        own1[3:, C] = 1.0
        own_p = own1 @ P
        K = ne + 1 + nh
        b_d = slice(0, T * C1)
        b_x = slice(b_d.stop, b_d.stop + n * C1)
        b_rg = slice(b_x.stop, b_x.stop + n * K)
        b_wkq = slice(b_rg.stop, b_rg.stop + (C1 * nh if nf else 0))
        M = np.zeros((rows, b_wkq.stop))
        D = M[:, b_d].reshape(rows, T, C1)  # views of M (splitting an axis never copies)
        D[:3 * n].reshape(n, 3, T, C1)[idx, :, idx] = own_p[:3]
        D[-1, :n] = own_p[3:]
        X = M[:, b_x].reshape(rows, n, C1)
        X[:3 * n].reshape(n, 3, n, C1)[idx, :, idx] = own1[:3]
        X[-1] = own1[3:]
        X[-1, :, :C] += w["qkv_bias"][2 * C:] @ w["attn_proj"] + w["attn_proj_bias"]
        RG = M[:, b_rg].reshape(rows, n, K)
        head_split = np.zeros((C, nh))  # the head, per head
        head_split.reshape(nh, hs, nh)[np.arange(nh), :, np.arange(nh)] = w["head"].reshape(nh, hs)
        vh = own1[:, :C] @ (w["value"] @ head_split)  # (3 + n, nh): value_h(own) . head_h, linear part
        g_x = np.broadcast_to(vh[:3], (n, 3, nh)).copy()
        g_b = vh[3:] + w["value_bias"] @ head_split
        if net.logit_pool:
            g_x[:, 0, :] += (w["calib_scale"] / nh)[:, None]
            g_b += (w["calib_shift"] / nh)[:, None]
        RG[:3 * n].reshape(n, 3, n, K)[idx, :, idx, ne + 1:] = g_x
        RG[-1, :, ne + 1:] = g_b
        RG[-1, :, ne] = 1.0
        RG[-1, :ne, :ne] = np.eye(ne)
        if shares is not None:
            RG[-1, ne:, :ne] = shares
        # the pooling keys' weights (LayerNorm folded, 1/sqrt(hs) in) times the query, per head
        key = (sq * w["key"]).reshape(C, nh, hs)
        wkq0 = np.zeros((C1, nh))
        wkq0[:C] = np.einsum("chs,hs->ch", key, w["query"].reshape(nh, hs))
        if nf:
            fr = slice(3 * n, 3 * n + nf)
            f_in = np.zeros((nf + 1, C1))  # [the features' weights; the feature token's bias]
            f_in[:nf, :C] = w["feature_in"]
            f_in[nf, :C] = w["feature_bias"]
            f_in[nf, C] = 1.0
            f_p = f_in @ P
            D[fr, n] = f_p[:nf]
            D[-1, n] = f_p[nf]
            wkq = M[:, b_wkq].reshape(rows, C1, nh)
            wkq[fr, :C] = np.einsum("chs,khs->kch", key, w["query_from_features"].reshape(nf, nh, hs))
            wkq[-1] = wkq0
            # |d . wkq_h| <= |wkq_h| <= |wkq0_h| + 5 sum_k |wkq_k,h| (normalized features are in [-5, 5])
            norms = np.sqrt(np.einsum("kch,kch->kh", wkq[fr], wkq[fr]))
            pool_bound = float((np.sqrt(np.einsum("ch,ch->h", wkq0, wkq0)) + 5.0 * norms.sum(axis=0)).max())
            wkq_const = None  # from u @ M, per event
        else:
            pool_bound = float(np.sqrt(np.einsum("ch,ch->h", wkq0, wkq0)).max())
            wkq_const = wkq0.T.copy()  # (nh, C1)
        # self-attention: [queries masked per head (nh blocks of C) | keys | per head v_h @ proj_h]
        W1 = np.zeros((C1, nh * C + C + nh * C1))
        q_b = np.zeros((nh, C))
        qh = qkv[:, :C].reshape(C, nh, hs)
        W1[:C, :nh * C].reshape(C, nh, nh, hs)[:, np.arange(nh), np.arange(nh)] = qh
        q_b.reshape(nh, nh, hs)[np.arange(nh), np.arange(nh)] = w["qkv_bias"][:C].reshape(nh, hs)
        W1[:C, nh * C:(nh + 1) * C] = qkv[:, C:2 * C]
        vw = W1[:C, (nh + 1) * C:].reshape(C, nh, C1)
        vw[:, :, :C] = np.einsum("chs,hsd->chd", qkv[:, 2 * C:].reshape(C, nh, hs), w["attn_proj"].reshape(nh, hs, C))
        W1 *= sq
        # |q_i . k_j| <= |q_i| |k_j| per head, and a LayerNorm's output (over sqrt(C)) has norm <= 1
        col2 = np.einsum("ck,ck->k", W1, W1)
        q_norm = np.sqrt(col2[:nh * C].reshape(nh, C).sum(axis=1)) + np.sqrt(np.einsum("hc,hc->h", q_b, q_b))
        k_norm = np.sqrt(col2[nh * C:(nh + 1) * C].reshape(nh, hs).sum(axis=1))
        att_bound = float((q_norm * k_norm).max())
        # LayerNorm 2 and the MLP: x2 @ [P | P fc | P3], where P3 also adds the MLP's output bias
        # (x2's constant component is 1)
        W2 = np.zeros((C1, 2 * C1 + w["fc"].shape[1]))
        W2[:, :C1] = P
        W2[:, C1:-C1] = P[:, :C] @ (sq * w["fc"])
        W2[:, -C1:] = P
        W2[C, -C1:-1] += w["mlp_proj_bias"] @ P[:C, :C]
        W3 = w["mlp_proj"] @ P[:C]
        if net.skill_bias:
            s = float(w["skill_scale"][0]) * np.asarray(skill, dtype=np.float64)
            skill_w = s - s.max()  # a constant shift: the softmax is the same
        else:
            skill_w = None
        self.bounded = att_bound <= self.MAX_SCORE and pool_bound <= self.MAX_SCORE
        self.shift, self.scale = net.norm_shift.tolist(), net.norm_scale.tolist()
        # the compiled forward's arguments: C-contiguous float64, read-only (one compiled signature);
        # wkq and skill empty when the event supplies them or there are none
        def arg(a: np.ndarray | None, empty: tuple[int, ...]) -> np.ndarray:
            a = np.ascontiguousarray(a if a is not None else np.empty(empty), dtype=np.float64)
            a.setflags(write=False)
            return a
        self._args = (arg(M, ()), arg(W1, ()), arg(q_b.reshape(nh * C), ()), arg(W2, ()), arg(w["fc_bias"], ()),
                      arg(W3, ()), arg(wkq_const, (0, 0)), arg(skill_w, (0,)), n, ne, nh, C, T,
                      b_d.start, b_x.start, b_rg.start, b_wkq.start, float(w["head_bias"]), 1.0 / nh, GELU_K, GELU_C)
        self._kernel = None  # bound in the process that forecasts (bind()), never pickled

    def bind(self) -> "OneEventNet":
        """Bind the compiled forward (server/onekernel.py, numba), compiled or loaded from its
        cache first (the service does that while it starts). Snapshot.prepare() calls this in the
        service process before the snapshot is published; the trainer process, which folds
        snapshots, never imports numba."""
        if self._kernel is None:
            from . import onekernel
            onekernel.warm()
            self._kernel = onekernel.forward
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "_kernel"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        self._kernel = None
        for a in self._args:  # unpickled arrays are writable: read-only again, the signature warm() compiled
            if isinstance(a, np.ndarray):
                a.setflags(write=False)

    def features(self, raw: Iterable[float]) -> list[float]:
        """NumpyNet.normalize for one event, in Python floats: NaN -> 0, clipped to [-5, 5]."""
        out = []
        for x, s, k in zip(raw, self.shift, self.scale):
            z = (x - s) * k
            out.append(0.0 if z != z else (5.0 if z > 5.0 else (-5.0 if z < -5.0 else z)))
        return out

    def forward(self, u: list[float]) -> tuple[float, list[float]]:
        """u = [token inputs (3 per token: the experts in schema order, then the classic tokens),
        normalized features, 1.0] -> (prob_up, attention per expert, with the classic tokens'
        attention given to the experts behind them). The algebra above, compiled
        (server/onekernel.py): one call, holding the interpreter lock throughout."""
        kernel = self._kernel if self._kernel is not None else self.bind()._kernel
        x = np.array(u)
        if x.shape != self._args[0].shape[:1]:  # the kernel reads u without bounds checks
            raise ValueError(f"expected {self._args[0].shape[0]} inputs, got {x.shape}")
        p, att = kernel(x, *self._args, self.bounded)
        return p, att.tolist()


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
    position; otherwise an event whose experts are all named is matched by name, and one whose
    experts are partly named by position, each name checked against its position's.
    """

    n_models: int
    expert_names: tuple[str, ...] | None
    feature_names: tuple[str, ...] | None  # None: not fixed yet
    missing_features: str = "reject"

    def fixing(self, expert_names: tuple[str, ...] | None,
               feature_names: tuple[str, ...] | None) -> "Schema":
        """This schema with what a learned outcome fixes (check()'s names to fix; None: nothing):
        names already fixed stay."""
        if expert_names is None and feature_names is None:
            return self
        return replace(self, expert_names=self.expert_names or expert_names,
                       feature_names=self.feature_names if self.feature_names is not None else feature_names)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return self.expert_names or tuple(f"model_{i}" for i in range(self.n_models))

    @functools.cached_property
    def identity(self) -> tuple[int, ...]:
        """The order of an event whose experts come in schema order (check returns this object)."""
        return tuple(range(self.n_models))

    @functools.cached_property
    def _feature_set(self) -> frozenset[str]:
        return frozenset(self.feature_names or ())

    def resolve(self, ev: Event, field: str = "model_outputs") -> Resolved:
        """Map an event with n_models experts onto the schema, or raise FusionInputError. `field` is
        what the caller calls the experts ("model_outputs" in-process, "experts" on the wire)."""
        order, schema, new_expert_names, new_feature_names = self.check(ev, field)
        experts = [ev.experts[k] for k in order]
        return Resolved(
            x=[[prob_logit(e.prob_up), 0.0, 0.0] if e.confidence is None else [prob_logit(e.prob_up), e.confidence, 1.0]
               for e in experts],
            feats=[ev.features.get(n, math.nan) for n in schema],
            order=list(order), expert_names=new_expert_names, feature_names=new_feature_names)

    def check(self, ev: Event, field: str = "model_outputs"):
        """Validate an event against the schema without building the model's inputs: (order,
        feature schema, expert names to fix or None, feature names to fix or None). The order is
        `identity` when the experts come in schema order."""
        names = [e.name for e in ev.experts]
        new_expert_names = None
        order: Sequence[int] = self.identity
        if self.expert_names is None:
            if all(names):
                new_expert_names = tuple(names)
        elif all(names):
            if tuple(names) != self.expert_names:  # (in schema order, the usual case: nothing to do)
                unknown = [n for n in names if n not in self.expert_names]
                if unknown:
                    raise FusionInputError(field, f"unknown expert name(s) {listed(unknown)}; "
                                           f"expected {listed(self.expert_names, SCHEMA_LISTED)}")
                index = {n: i for i, n in enumerate(names)}
                order = [index[n] for n in self.expert_names]
        elif any(names):  # partly named: matched by position, so each name must be its position's
            for i, n in enumerate(names):
                if n and n != self.expert_names[i]:
                    where = (f"the schema's expert {self.expert_names.index(n)}" if n in self.expert_names
                             else "not in the schema")
                    raise FusionInputError(f"{field}[{i}].name", f"{n!r} is {where}, and experts that are not all named "
                                           f"are matched by position: expected {self.expert_names[i]!r} here (the "
                                           f"schema: {listed(self.expert_names, SCHEMA_LISTED)}); name every expert to send "
                                           "them in any order")
        new_feature_names = None
        schema = self.feature_names
        if schema is None:
            schema = new_feature_names = tuple(sorted(ev.features))
        elif ev.features.keys() == self._feature_set:  # the usual case: exactly the schema's features
            return order, schema, new_expert_names, new_feature_names
        unknown = sorted(set(ev.features) - set(schema))
        if unknown:
            raise FusionInputError("features", f"unknown feature(s) {listed(unknown)}; the schema is "
                                   f"[{listed(schema, SCHEMA_LISTED)}]")
        missing = [n for n in schema if n not in ev.features]
        if missing and self.missing_features == "reject":
            raise FusionInputError("features", f"missing feature(s) {listed(missing)}; the schema is "
                                   f"[{listed(schema, SCHEMA_LISTED)}] (set fusion.missing_features = \"mean\" to impute)")
        return order, schema, new_expert_names, new_feature_names


SCHEMA_LISTED = 32  # names of the schema shown in an error message (the caller's own: 8)


def listed(names: Sequence[str], limit: int = 8, width: int = 64) -> str:
    """Names for an error message: quoted (so that odd characters show), each cut to `width`
    characters, at most `limit` of them and how many more.

    >>> listed(["close", "rsi"]), listed([str(i) for i in range(10)], limit=2)
    ("'close', 'rsi'", "'0', '1' and 8 more")
    """
    shown = [repr(n if len(n) <= width else n[:width] + "...") for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def expert_probs(x: Sequence[Sequence[float]]) -> list[float]:
    """The experts' (clipped) prob_up, back from their token inputs' logits."""
    return [1.0 / (1.0 + math.exp(-e[0])) for e in x]


def classic_rows(classic: Any, probs: Sequence[float]) -> list[list[float]]:
    """Token inputs of the classic aggregators' forecasts, given the experts' `expert_probs`."""
    return [[prob_logit(p), 0.0, 0.0] for p in classic.predict(probs)]


def average_prediction(ev: Event, reason: str, version: int) -> Prediction:
    p = plain_average(ev.experts)
    names = average_names([e.name for e in ev.experts])
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

    @functools.cached_property
    def _shares(self) -> list[list[float]]:
        return self.classic.shares()

    @functools.cached_property
    def _forecaster(self) -> Any:
        return self.classic.forecaster()

    @functools.cached_property
    def _one(self) -> OneEventNet:
        """The single-event forward, folded on first use or by prepare() (validation never needs it)."""
        return OneEventNet(self.net, self.skill_logw, self._shares if self.classic is not None else None)

    def fold(self) -> "Snapshot":
        """Fold what single-event forecasts need now rather than on the first Predict (the trainer
        process does, before it sends the snapshot)."""
        if self.net is not None and self.ready and self.enabled:
            self._one  # noqa: B018 - the cached fold
            if self.classic is not None:
                self._forecaster  # noqa: B018
        return self

    def prepare(self) -> "Snapshot":
        """fold(), and the compiled forward bound (onekernel.warm compiles or loads it once per
        process): the model owner calls this before it publishes the snapshot, off the Predict path."""
        self.fold()
        if "_one" in self.__dict__:
            self._one.bind()
        return self

    def predict(self, events: Sequence[Event], field: str = "model_outputs") -> list[Prediction | FusionInputError]:
        """predict_one for each event: the fusion's forecast, or the plain average with its reason
        for an event it does not serve (in order: disabled, wrong_expert_count, warming_up), or a
        FusionInputError in place of an event that does not fit the schema. Each event gets the
        same bits whatever else is in the batch. Through the compiled single-event forward this
        costs less than NumpyNet's batched forward up to about 8 events, the batches that Predicts
        in flight form (docs/PERFORMANCE.md)."""
        return [self.predict_one(ev, field) for ev in events]

    def predict_one(self, ev: Event, field: str = "model_outputs") -> Prediction | FusionInputError:
        """One event's forecast through OneEventNet (the first one folds it, if prepare() did not):
        every forecast of a snapshot takes this path, so that the same event on the same snapshot
        always gets the same bits. NumpyNet.forward is the reference it equals to rounding
        (tests/test_inference.py)."""
        schema = self.schema
        if not self.enabled:
            return average_prediction(ev, REASON_DISABLED, self.version)
        experts = ev.experts
        if len(experts) != schema.n_models:
            return average_prediction(ev, REASON_WRONG_EXPERT_COUNT, self.version)
        if schema.feature_names is None:  # nothing learned yet
            return average_prediction(ev, REASON_WARMING_UP, self.version)
        try:
            order = schema.check(ev, field)[0]
        except FusionInputError as e:
            return e
        if not self.ready:
            return average_prediction(ev, REASON_WARMING_UP, self.version)
        one = self._one
        u: list[float] = []
        log, log1p, lo, hi = math.log, math.log1p, PROB_EPS, 1.0 - PROB_EPS
        for k in order:  # the token inputs: prob_logit inline, a call per value costs more here
            e = experts[k]
            p = e.prob_up
            p = lo if p < lo else (hi if p > hi else p)
            if e.confidence is None:
                u += (log(p) - log1p(-p), 0.0, 0.0)
            else:
                u += (log(p) - log1p(-p), e.confidence, 1.0)
        if self.classic is not None:
            exp = math.exp
            for p in self._forecaster.predict([1.0 / (1.0 + exp(-v)) for v in u[::3]]):  # expert_probs
                p = lo if p < lo else (hi if p > hi else p)
                u += (log(p) - log1p(-p), 0.0, 0.0)
        feats = ev.features
        u += one.features([feats.get(name, math.nan) for name in schema.feature_names])
        u.append(1.0)
        p_up, w = one.forward(u)
        names = schema.names
        if order is schema.identity:
            attention = dict(zip(names, w))
        else:
            pairs = [("", 0.0)] * len(order)
            for j, req in enumerate(order):
                pairs[req] = (names[j], w[j])
            attention = dict(pairs)
        return Prediction(p_up, 1.0 - p_up, SOURCE_FUSION, None, attention, self.version)


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
        if served is None and type(predictions) is list and len(predictions) == 1:  # one forecast
            p = predictions[0]
            if type(p) is Prediction:
                row = [p.attention[n] for n in schema_names] if p.source == SOURCE_FUSION else None
                with self._lock:
                    if row is not None:
                        self._attention.append(row)
                    self.last_source, self.last_reason = p.source, p.reason
                return
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

    def training_stats(self, n: int) -> dict[str, Any]:
        """What these statistics contribute to get_training_stats()."""
        return {"avg_attention_entropy": self.avg_entropy(n), "last_source": self.last_source,
                "last_reason": self.last_reason}

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"attention": [list(w) for w in self._attention],
                    "last_source": self.last_source, "last_reason": self.last_reason}

    def load(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self._attention.clear()
            self._attention.extend([float(x) for x in w] for w in state.get("attention") or ())
            self.last_source, self.last_reason = state.get("last_source"), state.get("last_reason")
