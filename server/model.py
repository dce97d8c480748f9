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

import torch
import torch.nn as nn
import torch.nn.functional as F

# An expert's token inputs: logit(prob_up), confidence (0 when missing), has_confidence (1 or 0).
EXPERT_INPUTS = 3
PROB_EPS = 1e-4  # probabilities are clipped to [eps, 1 - eps] before the logit: |logit| <= 9.2


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


def prob_logit(p: float) -> float:
    """logit(p) with p clipped to [PROB_EPS, 1 - PROB_EPS]: an expert's first token input."""
    p = min(max(p, PROB_EPS), 1.0 - PROB_EPS)
    return math.log(p) - math.log1p(-p)


class SelfAttention(nn.Module):
    def __init__(self, c: NetConfig):
        super().__init__()
        self.n_head, self.head_dim = c.num_heads, c.hidden_dim // c.num_heads
        self.qkv = nn.Linear(c.hidden_dim, 3 * c.hidden_dim)
        self.proj = nn.Linear(c.hidden_dim, c.hidden_dim)
        self.dropout = c.dropout
        self.resid_drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        # softmax(q k^T / sqrt(hs)) v, with dropout on the attention weights while training
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, c: NetConfig):
        super().__init__()
        self.fc = nn.Linear(c.hidden_dim, c.ffn_mult * c.hidden_dim)
        self.proj = nn.Linear(c.ffn_mult * c.hidden_dim, c.hidden_dim)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, c: NetConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_dim)
        self.attn = SelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_dim)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


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
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden_dim, 2)
        if c.logit_pool:
            self.calib_scale = nn.Parameter(torch.ones(c.n_experts))  # per-expert calibration of its logit
            self.calib_shift = nn.Parameter(torch.zeros(c.n_experts))
            nn.init.zeros_(self.head.weight)  # the correction starts at 0: the pool alone speaks
            nn.init.zeros_(self.head.bias)

    def forward(self, experts: torch.Tensor, feats: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, skill: torch.Tensor | None = None):
        """experts (B, n, 3) token inputs (see EXPERT_INPUTS); feats (B, F) normalized; targets (B,)
        0=UP 1=DOWN; skill (B, n) log skill weights (with skill_bias).

        Returns (logits (B, 2), attention (B, n) averaged over heads, loss or None).
        """
        B, n, _ = experts.shape
        c = self.config
        if n != c.n_experts:
            raise ValueError(f"expected {c.n_experts} experts, got {n}")
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
        ctx = self.block(tokens)[:, :n]  # (B, n, C): the expert tokens, in context
        if c.skill_bias and (skill is None or skill.shape != (B, n)):
            raise ValueError(f"expected skill of shape ({B}, {n}), got {None if skill is None else tuple(skill.shape)}")
        pooled, w = self.pool(ctx, own, feats, skill if c.skill_bias else None)
        logits = self.head(self.drop(pooled))  # (B, 2)
        w = w.mean(dim=1)  # (B, n): attention per expert, averaged over heads
        if c.logit_pool:
            z = (w * (self.calib_scale * experts[..., 0] + self.calib_shift)).sum(dim=-1)  # (B,)
            logits = logits + torch.stack((0.5 * z, -0.5 * z), dim=-1)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, w, loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay weight matrices and embeddings; never biases, norms or the query."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
