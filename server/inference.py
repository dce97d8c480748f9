"""An immutable inference snapshot of the fusion network, computed with numpy.

The learner publishes a Snapshot after its state changes (a training step, a new outcome's
normalizer update, a load). Predictions and validation losses read it, never the torch module: so
prediction needs no train/eval mode switch, no autograd, no lock (a snapshot never changes once
made), and costs numpy's per-call overhead instead of torch's (tens of microseconds for one event,
against hundreds). `tests/test_inference.py` checks it equals FusionNet in eval mode to 1e-6.

The math is FusionNet.forward (server/model.py) in eval mode, in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .model import FusionNet

LN_EPS = 1e-5  # nn.LayerNorm's default
GELU_C = math.sqrt(2.0 / math.pi)


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    inv_c = 1.0 / x.shape[-1]  # sum * (1/C) rather than mean(): numpy's mean() costs more per call
    d = x - x.sum(axis=-1, keepdims=True) * inv_c
    var = (d * d).sum(axis=-1, keepdims=True) * inv_c
    return d / np.sqrt(var + LN_EPS) * g + b


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Weights (float64 numpy, transposed for x @ W), the feature normalizer, and the schema."""

    version: int  # training steps of the weights
    n_experts: int
    n_features: int
    n_head: int
    w: dict[str, np.ndarray]
    norm_shift: np.ndarray  # (F,) running mean
    norm_scale: np.ndarray  # (F,) 1 / running std, 0 for a constant feature

    @classmethod
    def of(cls, net: FusionNet, version: int, norm_shift: np.ndarray, norm_scale: np.ndarray) -> "Snapshot":
        c = net.config
        w = {}
        for k, p in net.named_parameters():
            a = p.detach().numpy().astype(np.float64)
            w[k] = a.T.copy() if a.ndim == 2 and k != "expert_id.weight" else a
        # constant terms folded once: each expert's input bias plus its identity embedding, ...
        w["own_bias"] = w.pop("expert_in.bias") + w.pop("expert_id.weight")  # (n, C)
        if c.n_features:  # ... and the feature token's bias plus its type embedding
            w["feature_bias"] = w.pop("feature_in.bias") + w.pop("feature_type")
        for a in w.values():
            a.setflags(write=False)
        return cls(version, c.n_experts, c.n_features, c.num_heads, w,
                   norm_shift.copy(), norm_scale.copy())

    def normalize(self, feats_raw: np.ndarray) -> np.ndarray:
        """(B, F) raw features -> normalized, clipped to [-5, 5]; NaN (missing) -> 0 (the mean)."""
        z = (feats_raw - self.norm_shift) * self.norm_scale
        return np.clip(np.where(z != z, 0.0, z), -5.0, 5.0)  # z != z: NaN

    def forward(self, x: np.ndarray, feats_raw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """x (B, n, 3) token inputs, feats_raw (B, F) -> prob_up (B,), attention (B, n).

        Attention is averaged over heads, in schema order; each row sums to 1.
        """
        w, nh = self.w, self.n_head
        B, n, _ = x.shape
        own = x @ w["expert_in.weight"] + w["own_bias"]  # (B, n, C)
        C = own.shape[-1]
        hs = C // nh
        tokens = own
        f = None
        if self.n_features:
            f = self.normalize(feats_raw)  # (B, F)
            ft = f @ w["feature_in.weight"] + w["feature_bias"]  # (B, C)
            tokens = np.concatenate((own, ft[:, None, :]), axis=1)  # (B, T, C)
        T = tokens.shape[1]
        # transformer block: self-attention then feed-forward, pre-norm, residual
        h = _layer_norm(tokens, w["block.ln_1.weight"], w["block.ln_1.bias"])
        qkv = h @ w["block.attn.qkv.weight"] + w["block.attn.qkv.bias"]  # (B, T, 3C)
        qkv = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs))  # (B, nh, T, T)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        tokens = tokens + y @ w["block.attn.proj.weight"] + w["block.attn.proj.bias"]
        h = _layer_norm(tokens, w["block.ln_2.weight"], w["block.ln_2.bias"])
        h = h @ w["block.mlp.fc.weight"] + w["block.mlp.fc.bias"]
        h = 0.5 * h * (1.0 + np.tanh(GELU_C * (h + 0.044715 * h * h * h)))
        tokens = tokens + h @ w["block.mlp.proj.weight"] + w["block.mlp.proj.bias"]
        ctx = tokens[:, :n]  # (B, n, C)
        # pooling: the (feature-conditioned) query over the expert tokens; values from `own`
        query = w["pool.query"] + f @ w["pool.query_from_features.weight"] if self.n_features else \
            np.repeat(w["pool.query"][None, :], B, axis=0)  # (B, C)
        kk = _layer_norm(ctx, w["pool.ln.weight"], w["pool.ln.bias"]) @ w["pool.key.weight"] + w["pool.key.bias"]
        vv = own @ w["pool.value.weight"] + w["pool.value.bias"]
        qh = query.reshape(B, nh, 1, hs)
        kh = kk.reshape(B, n, nh, hs).transpose(0, 2, 3, 1)  # (B, nh, hs, n)
        vh = vv.reshape(B, n, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, n, hs)
        a = _softmax(qh @ kh / math.sqrt(hs))  # (B, nh, 1, n)
        pooled = (a @ vh).reshape(B, C)
        logits = pooled @ w["head.weight"] + w["head.bias"]  # (B, 2)
        prob_up = 1.0 / (1.0 + np.exp(logits[:, 1] - logits[:, 0]))
        return prob_up, a[:, :, 0, :].mean(axis=1)
