"""The fusion network: experts as tokens, one transformer block, a learned output query.

    expert i ─ [logit p_i, confidence_i, has_confidence_i] ─ Linear ─ + id embedding_i ─┐ own_i
    features ─ normalized ─ Linear ─ + feature-type embedding ─────────────── feature token
    tokens = [own_1 .. own_n, feature token]
        └─ Block: x + Dropout(SelfAttention(LN(x))), then x + Dropout(MLP(LN(x)))  ─ ctx_1 .. ctx_n
    query = q + W_f · features                                  (market features condition the query)
    w_h,i = softmax_i(query_h · K(LN(ctx_i)) / sqrt(head_dim))  per head h, over the expert tokens only
    pooled = concat_h sum_i w_h,i · V(own_i)
    logits = Linear(Dropout(pooled)) -> (up, down);   softmax -> (prob_up, prob_down)

Attention weight of expert i = mean over heads of w_h,i. Keys read the context (what the other
experts and the market say), but values are each expert's own embedding, so the pooled vector is
literally a weighted sum over experts: w_i is how much the fused output leaned on expert i. The
query starts at zero, so an untrained network attends uniformly (entropy ln n).

Attention is written out rather than using nn.MultiheadAttention: its eval-mode fast path has given
wrong outputs on these machines (see NOTES), and the pooling needs the weights anyway.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# An expert's token inputs: logit(prob_up), confidence (0 when missing), has_confidence (1 or 0).
EXPERT_INPUTS = 3
_HALF_SIGNS = torch.tensor([0.5, -0.5])


@dataclass(frozen=True)
class NetConfig:
    n_experts: int
    n_features: int
    hidden_dim: int = 32
    num_heads: int = 2
    dropout: float = 0.2
    ffn_mult: int = 4
    # Each expert's recent skill (log of a weight, <= 0) as a bias on the pooling attention scores.
    skill_bias: bool = False
    # Output: the attention-weighted sum of per-expert calibrated logits, plus a correction from
    # the pooled vector (zero at init), instead of a head on the pooled vector alone.
    logit_pool: bool = False
    # A learned identity embedding per expert position. Without it the network cannot memorize
    # which expert was good: trust comes from the content and the skill prior only.
    expert_identity: bool = True

    def __post_init__(self) -> None:
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} is not divisible by num_heads={self.num_heads}")
        if self.n_experts < 1 or self.n_features < 0:
            raise ValueError(f"n_experts={self.n_experts} must be >= 1 and n_features={self.n_features} >= 0")


@dataclass(frozen=True)
class DropoutMasks:
    """The dropout masks of one training forward, already scaled: each element is 0 (dropped) or
    1 / (1 - p) (kept). `attn` multiplies the block's attention weights, `resid` the attention
    output, `mlp` the feed-forward output, `pooled` the pooled vector."""

    attn: torch.Tensor  # (B, num_heads, n_experts, n_tokens)
    resid: torch.Tensor  # (B, n_experts, hidden_dim)
    mlp: torch.Tensor  # (B, n_experts, hidden_dim)
    pooled: torch.Tensor  # (B, hidden_dim)

    @staticmethod
    def shapes(c: "NetConfig", batch: int) -> tuple[tuple[int, ...], ...]:
        """(attn, resid, mlp, pooled) shapes. Only the expert tokens' rows: the feature token's
        output of the block is never read (ctx = Block(tokens)[:n]), so it is not computed."""
        T = c.n_experts + (1 if c.n_features else 0)
        return ((batch, c.num_heads, c.n_experts, T), (batch, c.n_experts, c.hidden_dim),
                (batch, c.n_experts, c.hidden_dim), (batch, c.hidden_dim))


class MaskSource:
    """Dropout masks from a seeded PCG64 generator (numpy): one 16-bit draw per element, dropped
    when it is below round(p * 65536) (so the drop rate is p to within 1e-5). torch's CPU dropout
    (bernoulli_) costs ~10 ns per element; this ~1. Its state is plain ints (`state()`), so the
    learner checkpoints it and a resumed run draws the same masks."""

    def __init__(self, seed: int, p: float):
        self.p = p
        self._bits = np.random.PCG64(seed)
        self._threshold = np.uint16(min(round(p * 65536), 65535))
        self._scale = np.float32(1.0 / (1.0 - p))

    def masks(self, c: "NetConfig", batch: int) -> DropoutMasks | None:
        if self.p <= 0.0:
            return None
        shapes = DropoutMasks.shapes(c, batch)
        sizes = [math.prod(s) for s in shapes]
        total = sum(sizes)
        bits = self._bits.random_raw((total + 3) // 4).view(np.uint16)[:total]
        flat = np.multiply(bits >= self._threshold, self._scale, dtype=np.float32)
        # cut in numpy, then wrapped: ~2 us a mask, against ~5 for torch's split and view
        masks, offset = [], 0
        for shape, size in zip(shapes, sizes):
            masks.append(torch.from_numpy(flat[offset:offset + size].reshape(shape)))
            offset += size
        return DropoutMasks(*masks)

    def state(self) -> dict:
        return self._bits.state

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
            raise ValueError(f"not a PCG64 state: {state!r}")
        self._bits.state = state


def torch_masks(c: "NetConfig", batch: int) -> DropoutMasks | None:
    """Masks from torch's global RNG: what a training-mode forward uses when given none."""
    if c.dropout <= 0.0:
        return None
    keep = 1.0 - c.dropout
    return DropoutMasks(*((torch.rand(s) < keep).to(torch.float32) / keep for s in DropoutMasks.shapes(c, batch)))


class SelfAttention(nn.Module):
    def __init__(self, c: NetConfig):
        super().__init__()
        self.n_head, self.head_dim = c.num_heads, c.hidden_dim // c.num_heads
        self.qkv = nn.Linear(c.hidden_dim, 3 * c.hidden_dim)
        self.proj = nn.Linear(c.hidden_dim, c.hidden_dim)
        self.dropout = c.dropout
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def forward(self, x: torch.Tensor, n: int | None = None, masks: DropoutMasks | None = None) -> torch.Tensor:
        """x (B, T, C) -> the attention output of the first `n` tokens (all by default), (B, n, C)."""
        B, T, C = x.shape
        n = T if n is None else n
        nh, hs = self.n_head, self.head_dim
        qkv = self.qkv(x).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q = qkv[0, :, :, :n].reshape(B * nh, n, hs)
        k = qkv[1].reshape(B * nh, T, hs)
        v = qkv[2].reshape(B * nh, T, hs)
        # softmax(q k^T / sqrt(hs)) v, with dropout on the attention weights while training
        att = F.softmax(torch.bmm(q, k.transpose(1, 2)) * self.scale, dim=-1)  # (B nh, n, T)
        if masks is not None:
            att = att * masks.attn.view(B * nh, n, T)
        y = torch.bmm(att, v).view(B, nh, n, hs).transpose(1, 2).reshape(B, n, C)
        y = self.proj(y)
        return y * masks.resid if masks is not None else y


class MLP(nn.Module):
    def __init__(self, c: NetConfig):
        super().__init__()
        self.fc = nn.Linear(c.hidden_dim, c.ffn_mult * c.hidden_dim)
        self.proj = nn.Linear(c.ffn_mult * c.hidden_dim, c.hidden_dim)

    def forward(self, x: torch.Tensor, masks: DropoutMasks | None = None) -> torch.Tensor:
        y = self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return y * masks.mlp if masks is not None else y


class Block(nn.Module):
    def __init__(self, c: NetConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_dim)
        self.attn = SelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_dim)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, n: int | None = None, masks: DropoutMasks | None = None) -> torch.Tensor:
        """x (B, T, C) -> the block's output for the first `n` tokens (all by default)."""
        n = x.shape[1] if n is None else n
        x = x[:, :n] + self.attn(self.ln_1(x), n, masks)
        return x + self.mlp(self.ln_2(x), masks)


class AttentionPool(nn.Module):
    """A learned (feature-conditioned) query attends over the expert tokens; see the module doc."""

    def __init__(self, c: NetConfig):
        super().__init__()
        self.n_head, self.head_dim = c.num_heads, c.hidden_dim // c.num_heads
        self.query = nn.Parameter(torch.zeros(c.hidden_dim))
        self.query_from_features = nn.Linear(c.n_features, c.hidden_dim, bias=False) if c.n_features else None
        if self.query_from_features is not None:
            nn.init.zeros_(self.query_from_features.weight)
        self.ln = nn.LayerNorm(c.hidden_dim)
        self.key = nn.Linear(c.hidden_dim, c.hidden_dim)
        self.value = nn.Linear(c.hidden_dim, c.hidden_dim)
        if c.skill_bias:  # how much the recent-skill prior counts; 1 at init: attention = skill weights
            self.skill_scale = nn.Parameter(torch.ones(1))

    def forward(self, ctx: torch.Tensor, own: torch.Tensor, feats: torch.Tensor | None,
                skill: torch.Tensor | None = None):
        B, n, C = ctx.shape
        q = self.query.expand(B, C)  # (B, C)
        if self.query_from_features is not None:
            q = q + self.query_from_features(feats)
        q = q.view(B, self.n_head, 1, self.head_dim)  # (B, nh, 1, hs)
        k = self.key(self.ln(ctx)).view(B, n, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, n, hs)
        v = self.value(own).view(B, n, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, n, hs)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, 1, n)
        if skill is not None:
            scores = scores + self.skill_scale * skill[:, None, None, :]
        w = F.softmax(scores, dim=-1)  # (B, nh, 1, n)
        pooled = (w @ v).reshape(B, C)  # (B, C): heads concatenated
        return pooled, w.squeeze(2)  # (B, C), (B, nh, n)


class FusionNet(nn.Module):
    def __init__(self, c: NetConfig):
        super().__init__()
        self.config = c
        self.expert_in = nn.Linear(EXPERT_INPUTS, c.hidden_dim)
        if c.expert_identity:
            self.expert_id = nn.Embedding(c.n_experts, c.hidden_dim)
        if c.n_features:
            self.feature_in = nn.Linear(c.n_features, c.hidden_dim)
            self.feature_type = nn.Parameter(torch.zeros(c.hidden_dim))
        self.block = Block(c)
        self.pool = AttentionPool(c)
        self.head = nn.Linear(c.hidden_dim, 2)
        if c.logit_pool:
            self.calib_scale = nn.Parameter(torch.ones(c.n_experts))  # per-expert calibration of its logit
            self.calib_shift = nn.Parameter(torch.zeros(c.n_experts))
            nn.init.zeros_(self.head.weight)  # the correction starts at 0: the pool alone speaks
            nn.init.zeros_(self.head.bias)

    def forward(self, experts: torch.Tensor, feats: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, skill: torch.Tensor | None = None,
                masks: DropoutMasks | None = None):
        """experts (B, n, 3) token inputs (see EXPERT_INPUTS); feats (B, F) normalized; targets (B,)
        0=UP 1=DOWN; skill (B, n) log skill weights (with skill_bias). In training mode dropout
        uses `masks` (the learner draws them from its checkpointed MaskSource), or masks from
        torch's RNG when none are given; in eval mode there is no dropout and `masks` is ignored.

        Returns (logits (B, 2), attention (B, n) averaged over heads, loss or None).
        """
        B, n, _ = experts.shape
        c = self.config
        if n != c.n_experts:
            raise ValueError(f"expected {c.n_experts} experts, got {n}")
        if not self.training:
            masks = None
        elif masks is None:
            masks = torch_masks(c, B)
        own = self.expert_in(experts)  # (B, n, C)
        if c.expert_identity:
            own = own + self.expert_id.weight
        tokens = own
        if c.n_features:
            if feats is None or feats.shape != (B, c.n_features):
                raise ValueError(f"expected features of shape ({B}, {c.n_features}), got "
                                 f"{None if feats is None else tuple(feats.shape)}")
            feat_token = (self.feature_in(feats) + self.feature_type).unsqueeze(1)  # (B, 1, C)
            tokens = torch.cat((own, feat_token), dim=1)  # (B, n + 1, C)
        ctx = self.block(tokens, n, masks)  # (B, n, C): the expert tokens, in context
        if c.skill_bias and (skill is None or skill.shape != (B, n)):
            raise ValueError(f"expected skill of shape ({B}, {n}), got {None if skill is None else tuple(skill.shape)}")
        pooled, w = self.pool(ctx, own, feats, skill if c.skill_bias else None)
        if masks is not None:
            pooled = pooled * masks.pooled
        logits = self.head(pooled)  # (B, 2)
        w = w.mean(dim=1)  # (B, n): attention per expert, averaged over heads
        if c.logit_pool:
            z = (w * (self.calib_scale * experts[..., 0] + self.calib_shift)).sum(dim=-1)  # (B,)
            logits = logits + z[:, None] * _HALF_SIGNS  # (+z/2, -z/2)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, w, loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay weight matrices and embeddings; never biases, norms or the query."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def _linear_grad(P: dict, G: dict, name: str, d: torch.Tensor, x: torch.Tensor, *,
                 input_grad: bool = True) -> torch.Tensor | None:
    """Backward of the Linear `name` (y = x W^T + b) given d = dL/dy (N, out) and its input x
    (N, in): dL/dW and dL/db written into G, dL/dx returned (None without `input_grad`)."""
    torch.mm(d.t(), x, out=G[name + ".weight"])
    torch.sum(d, 0, out=G[name + ".bias"])
    return torch.mm(d, P[name + ".weight"]) if input_grad else None


def _layer_norm_grad(P: dict, G: dict, name: str, d: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                     rstd: torch.Tensor) -> torch.Tensor:
    """Backward of the LayerNorm `name` over the last dimension, with the mean and 1/std its
    forward saved: weight and bias gradients written into G, dL/dx returned."""
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        d, x, (x.shape[-1],), mean, rstd, P[name + ".weight"], P[name + ".bias"], (True, True, True))
    G[name + ".weight"].copy_(dw)
    G[name + ".bias"].copy_(db)
    return dx


def flushing_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (torch can set it, not report it): a
    float32 product that should be denormal comes out 0. About 1 us."""
    return float(np.multiply(np.float32(1e-30), np.float32(1e-10))) == 0.0


def _softmax_last_(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension, in place. torch's CPU softmax over a last dimension as
    short as the block's attention rows (8 tokens) costs ~70 us on (64, 7, 8) here; these four
    ops ~20."""
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


def _softmax_last_grad_(d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Backward of _softmax_last_ with output y: dL/dx = y * (d - sum(d * y)), written into d and
    returned (~13 us on (64, 7, 8) against ~28 for torch's _softmax_backward_data)."""
    return d.sub_((d * y).sum(-1, keepdim=True)).mul_(y)


# tanh-GELU written as u * sigmoid(2 sqrt(2/pi) (u + 0.044715 u^3)): the same function as
# F.gelu(u, approximate="tanh") ((1 + tanh z) / 2 = sigmoid(2z)).
_GELU_2K = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu_tanh(u: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """F.gelu(u, approximate="tanh"), and what its backward reuses: the sigmoid factor s and u^2.
    torch's CPU kernels for the tanh GELU cost ~60 us forward and ~65 backward on the (224, 128)
    hidden layer here; these elementwise ops ~40 each."""
    u2 = u * u
    s = torch.mul(u2, _GELU_2K * _GELU_A).add_(_GELU_2K).mul_(u).sigmoid_()
    return u * s, (s, u2)


def _gelu_tanh_grad(d: torch.Tensor, u: torch.Tensor, saved: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Backward of _gelu_tanh: d * (s + u s (1 - s) 2K (1 + 3A u^2)). Overwrites the saved u^2."""
    s, u2 = saved
    p = u2.mul_(3.0 * _GELU_2K * _GELU_A).add_(_GELU_2K).mul_(u)
    return p.mul_(torch.addcmul(s, s, s, value=-1.0)).add_(s).mul_(d)


class TrainStep:
    """One training forward and backward of a FusionNet in training mode, written out: the loss
    (mean cross-entropy) of `net(experts, feats, targets, skill, masks)` and its gradients, written
    into each parameter's .grad (overwritten, not accumulated). The same function and gradients as
    `loss.backward()` through FusionNet.forward (tests/test_fusion.py checks them against autograd),
    at a fraction of the cost on CPU: no autograd graph, no per-parameter gradient accumulation,
    fused aten kernels for the LayerNorm and pooling softmax backward passes, and gradients written
    straight into their (flat) buffers with out=.

    Denormal floats are flushed to zero while it runs (torch.set_flush_denormal: this thread's
    FTZ/DAZ flags, put back as they were after): the skill prior drives some pooling attention
    weights below 1e-38, and the gradients that flow back through them stay denormal through the
    whole backward. Every matrix product or GELU that reads a denormal falls to x86's microcode
    path, which made the step ~25% slower (2.3 to 1.75 ms here); the values flushed are below
    1.2e-38, far under the rounding error of the gradients they are added to. Only with one
    intra-op thread (the service's setting): torch's worker threads, created on demand, would
    inherit the flags and keep them.

    The network's parameters must not be re-created after this is built (in-place updates, e.g. an
    optimizer's or load_state_dict's, are seen)."""

    def __init__(self, net: "FusionNet"):
        self.net = net
        self.c = net.config
        named = dict(net.named_parameters())
        for n, p in named.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.p = {n: p.detach() for n, p in named.items()}
        self.g = {n: p.grad for n, p in named.items()}
        # W^T of each weight matrix, the forward's addmm operand: views made once, not per call
        self.pt = {n: p.t() for n, p in self.p.items() if p.dim() == 2}

    def __call__(self, experts: torch.Tensor, feats: torch.Tensor | None, targets: torch.Tensor,
                 skill: torch.Tensor | None, masks: DropoutMasks | None) -> torch.Tensor:
        if torch.get_num_threads() != 1 or flushing_denormals():
            return self._forward_backward(experts, feats, targets, skill, masks)
        torch.set_flush_denormal(True)
        try:
            return self._forward_backward(experts, feats, targets, skill, masks)
        finally:
            torch.set_flush_denormal(False)

    def _forward_backward(self, experts: torch.Tensor, feats: torch.Tensor | None, targets: torch.Tensor,
                          skill: torch.Tensor | None, masks: DropoutMasks | None) -> torch.Tensor:
        c, P, G, PT = self.c, self.p, self.g, self.pt
        B, n, _ = experts.shape
        if n != c.n_experts:
            raise ValueError(f"expected {c.n_experts} experts, got {n}")
        C, nh = c.hidden_dim, c.num_heads
        hs = C // nh
        nf = c.n_features
        T = n + (1 if nf else 0)
        Bn = B * n
        scale = 1.0 / math.sqrt(hs)
        mm, addmm = torch.mm, torch.addmm
        with torch.no_grad():
            # ---------------------------------------------------------------- forward
            x2 = experts.reshape(Bn, EXPERT_INPUTS)
            own = addmm(P["expert_in.bias"], x2, PT["expert_in.weight"])  # (Bn, C)
            if c.expert_identity:
                own = (own.view(B, n, C) + P["expert_id.weight"]).view(Bn, C)
            if nf:
                ft = addmm(P["feature_in.bias"] + P["feature_type"], feats, PT["feature_in.weight"])  # (B, C)
                tokens = torch.cat((own.view(B, n, C), ft.view(B, 1, C)), dim=1)  # (B, T, C)
            else:
                tokens = own.view(B, n, C)
            h1, mu1, rs1 = torch.native_layer_norm(tokens, (C,), P["block.ln_1.weight"], P["block.ln_1.bias"], 1e-5)
            qkv = addmm(P["block.attn.qkv.bias"], h1.view(B * T, C), PT["block.attn.qkv.weight"])
            # heads-major, (3, B nh, T, hs), in one copy: q, k and v are views bmm reads as they are
            # (a copy per part took ~2x as long; the backward's dqkv mirrors it)
            qkv = qkv.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).reshape(3, B * nh, T, hs)
            q, k, v = qkv[0, :, :n], qkv[1], qkv[2]
            att = _softmax_last_(torch.bmm(q, k.transpose(1, 2)).mul_(scale))  # (B nh, n, T)
            attd = att * masks.attn.view(B * nh, n, T) if masks is not None else att
            y = torch.bmm(attd, v).view(B, nh, n, hs).transpose(1, 2).reshape(Bn, C)
            ao = addmm(P["block.attn.proj.bias"], y, PT["block.attn.proj.weight"]).view(B, n, C)
            tok_n = tokens[:, :n]
            x1 = torch.addcmul(tok_n, ao, masks.resid) if masks is not None else tok_n + ao  # (B, n, C)
            h2, mu2, rs2 = torch.native_layer_norm(x1, (C,), P["block.ln_2.weight"], P["block.ln_2.bias"], 1e-5)
            u = addmm(P["block.mlp.fc.bias"], h2.view(Bn, C), PT["block.mlp.fc.weight"])  # (Bn, H)
            g, gelu_saved = _gelu_tanh(u)
            mo = addmm(P["block.mlp.proj.bias"], g, PT["block.mlp.proj.weight"]).view(B, n, C)
            ctx = torch.addcmul(x1, mo, masks.mlp) if masks is not None else x1 + mo  # (B, n, C)
            # pooling: per head, scores over the expert tokens, kept as (B, n, nh)
            if nf:
                qp = addmm(P["pool.query"], feats, PT["pool.query_from_features.weight"])  # (B, C)
            else:
                qp = P["pool.query"].expand(B, C)
            qs = (qp * scale).view(B, 1, nh, hs)
            hp, mup, rsp = torch.native_layer_norm(ctx, (C,), P["pool.ln.weight"], P["pool.ln.bias"], 1e-5)
            K = addmm(P["pool.key.bias"], hp.view(Bn, C), PT["pool.key.weight"]).view(B, n, nh, hs)
            V = addmm(P["pool.value.bias"], own, PT["pool.value.weight"]).view(B, n, nh, hs)
            sp = (qs * K).sum(-1)  # (B, n, nh)
            if c.skill_bias:
                s3 = skill.view(B, n, 1)
                sp = torch.addcmul(sp, s3, P["pool.skill_scale"])
            w = torch.softmax(sp, dim=1)  # (B, n, nh)
            pooled = (w.unsqueeze(-1) * V).sum(1).view(B, C)
            pd = pooled * masks.pooled if masks is not None else pooled
            logits = addmm(P["head.bias"], pd, PT["head.weight"])  # (B, 2)
            if c.logit_pool:
                wm = w.mean(2)  # (B, n)
                x0 = experts[:, :, 0]
                zc = torch.addcmul(P["calib_shift"], x0, P["calib_scale"])  # (B, n)
                z = (wm * zc).sum(-1, keepdim=True)  # (B, 1)
                logits = torch.addcmul(logits, z, _HALF_SIGNS)
            logp = torch.log_softmax(logits, dim=-1)
            loss = -logp.gather(1, targets.view(B, 1)).mean()
            # ---------------------------------------------------------------- backward
            dl = logp.exp_()  # softmax - onehot, / B
            dl.scatter_add_(1, targets.view(B, 1), torch.full((B, 1), -1.0)).mul_(1.0 / B)
            dpooled = _linear_grad(P, G, "head", dl, pd)  # (B, C)
            if masks is not None:
                dpooled.mul_(masks.pooled)
            dP = dpooled.view(B, 1, nh, hs)
            dw = (dP * V).sum(-1)  # (B, n, nh)
            if c.logit_pool:
                dz = mm(dl, _HALF_SIGNS.view(2, 1))  # (B, 1)
                dzc = dz * wm  # (B, n)
                torch.sum(dzc * x0, 0, out=G["calib_scale"])
                torch.sum(dzc, 0, out=G["calib_shift"])
                dw.add_((dz * zc).mul_(1.0 / nh).unsqueeze(-1))
            dV = (w.unsqueeze(-1) * dP).view(Bn, C)
            dsp = torch._softmax_backward_data(dw, w, 1, torch.float32)  # (B, n, nh)
            if c.skill_bias:
                G["pool.skill_scale"].copy_((dsp * s3).sum().view(1))
            dsp4 = dsp.unsqueeze(-1)
            dqp = (dsp4 * K).sum(1).view(B, C).mul_(scale)
            dK = (dsp4 * qs).view(Bn, C)
            torch.sum(dqp, 0, out=G["pool.query"])
            if nf:
                mm(dqp.t(), feats, out=G["pool.query_from_features.weight"])
            dhp = _linear_grad(P, G, "pool.key", dK, hp.view(Bn, C))
            down = _linear_grad(P, G, "pool.value", dV, own)  # (Bn, C)
            dctx = _layer_norm_grad(P, G, "pool.ln", dhp.view(B, n, C), ctx, mup, rsp)
            dmo = (dctx * masks.mlp if masks is not None else dctx).view(Bn, C)
            du = _gelu_tanh_grad(_linear_grad(P, G, "block.mlp.proj", dmo, g), u, gelu_saved)
            dh2 = _linear_grad(P, G, "block.mlp.fc", du, h2.view(Bn, C)).view(B, n, C)
            dx1 = _layer_norm_grad(P, G, "block.ln_2", dh2, x1, mu2, rs2)
            dx1.add_(dctx)  # (B, n, C): the residual
            dao = (dx1 * masks.resid if masks is not None else dx1).view(Bn, C)
            dy = _linear_grad(P, G, "block.attn.proj", dao, y).view(B, n, nh, hs).transpose(1, 2).reshape(B * nh, n, hs)
            dqkv = torch.empty(3, B * nh, T, hs)  # heads-major like qkv
            dattd = torch.bmm(dy, v.transpose(1, 2))  # (B nh, n, T)
            torch.bmm(attd.transpose(1, 2), dy, out=dqkv[2])  # dv
            if masks is not None:
                dattd.mul_(masks.attn.view(B * nh, n, T))
            ds = _softmax_last_grad_(dattd, att).mul_(scale)
            # dq through a temporary: bmm into the strided dqkv[0, :, :n] is ~2x slower than the copy
            dqkv[0, :, :n].copy_(torch.bmm(ds, k))
            if T > n:
                dqkv[0, :, n:].zero_()  # the feature token's query reaches nothing
            torch.bmm(ds.transpose(1, 2), q, out=dqkv[1])  # dk
            dqkv = dqkv.view(3, B, nh, T, hs).permute(1, 3, 0, 2, 4).reshape(B * T, 3 * C)
            dh1 = _linear_grad(P, G, "block.attn.qkv", dqkv, h1.view(B * T, C)).view(B, T, C)
            dtok = _layer_norm_grad(P, G, "block.ln_1", dh1, tokens, mu1, rs1)
            down = down.view(B, n, C).add_(dtok[:, :n]).add_(dx1)  # (B, n, C): d own
            if c.expert_identity:
                torch.sum(down, 0, out=G["expert_id.weight"])
            down = down.view(Bn, C)
            _linear_grad(P, G, "expert_in", down, x2, input_grad=False)
            if nf:
                dft = dtok[:, n]  # (B, C)
                _linear_grad(P, G, "feature_in", dft, feats, input_grad=False)
                G["feature_type"].copy_(G["feature_in.bias"])
        return loss
