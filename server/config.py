"""Typed, frozen, validated configuration of the fusion model.

The twelve parameters of the original (`fusion.enabled` ... `fusion.early_stopping_delta`) keep their
names and defaults; the rest are what the design needs, each documented below and in the README.
`FusionConfig.from_mapping` takes the original dotted names ("fusion.hidden_dim") or plain names.
Every invalid value raises ConfigError naming the parameter.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import ConfigError

PREFIX = "fusion."
MISSING_FEATURE_POLICIES = ("reject", "mean")


@dataclass(frozen=True)
class FusionConfig:
    # --- the twelve parameters of the original ------------------------------------------------
    enabled: bool = True  # False: always serve the plain average
    hidden_dim: int = 32  # width of every token
    num_heads: int = 2  # attention heads; must divide hidden_dim
    dropout: float = 0.2  # on attention weights, the feed-forward output and the pooled vector
    learning_rate: float = 0.001  # peak AdamW learning rate, reached at the end of warmup
    l2_lambda: float = 0.01  # AdamW weight decay, on weight matrices and embeddings only
    warmup_steps: int = 100  # linear warmup from 0 over this many training steps
    min_samples: int = 200  # outcomes learned before the fusion serves and training starts
    val_split: float = 0.2  # share of outcomes held out for validation
    gradient_clip: float = 1.0  # max global gradient norm
    early_stopping_patience: int = 50  # validation checks without a val-loss improvement before stopping
    early_stopping_delta: float = 0.001  # smallest val-loss decrease that counts as an improvement

    # --- what the design adds -------------------------------------------------------------------
    # skill_bias, logit_pool, classic_tokens, expert_identity and ema_decay change the network the
    # original describes; their defaults are what docs/quality.md measured best (the ablation
    # table). The original's network: skill_bias=False, logit_pool=False, classic_tokens=False,
    # expert_identity=True, ema_decay=0.
    # Names of the experts, in order. Empty: the first event whose experts are all named fixes
    # them; until then, and for unnamed experts, "model_0", "model_1", ...
    expert_names: tuple[str, ...] = ()
    # Names of the market features. Empty: the first event that carries features fixes them.
    feature_names: tuple[str, ...] = ()
    # What to do when an event lacks a known feature: "reject" it, or impute the running "mean".
    missing_features: str = "reject"
    train_buffer_size: int = 2000  # FIFO capacity of the training buffer, in outcomes
    val_buffer_size: int = 500  # FIFO capacity of the validation buffer, in outcomes
    batch_size: int = 32  # mini-batch size of each training step
    steps_per_outcome: int = 1  # training steps run for each learned outcome, once ready
    val_every: int = 10  # training steps between validation-loss checks
    decay_steps: int = 10_000  # length of the cosine decay after warmup, in training steps
    lr_floor_ratio: float = 0.1  # the cosine decays to learning_rate * this, never to 0
    # After early stopping fires, training resumes once this many fresh validation outcomes arrived.
    early_stopping_resume: int = 50
    attention_window: int = 100  # fused forecasts averaged by get_attention_weights()
    # Feature normalization: running mean/variance over all outcomes until this many, then an
    # exponential moving average with this horizon (market levels drift).
    feature_norm_window: int = 1000
    seed: int = 0  # seeds weights, dropout, batch sampling and the validation split
    # Each expert's recent skill as a bias on the pooling attention: log weights of an exponentially
    # weighted average forecaster on log loss (learning rate skill_eta), discounted with a half-life
    # of skill_halflife outcomes so that it follows a change of the best expert (docs/model.md).
    skill_bias: bool = True
    skill_eta: float = 1.0
    skill_halflife: int = 1000
    # Output as the attention-weighted sum of per-expert calibrated logits plus a learned
    # correction (zero at first), rather than a head on the pooled vector alone.
    logit_pool: bool = True
    # The forecasts of classic online aggregators (Fixed Share, logistic stacking, recalibrated
    # average: server/baselines.py ClassicTokens) as extra tokens beside the experts'.
    classic_tokens: bool = True
    # A learned identity embedding per expert position (the original design). Off: no expert can be
    # trusted for its position alone, only for what it says and its recent skill.
    expert_identity: bool = False
    # Serve (and validate) an exponential moving average of the weights with this decay per
    # training step (0: off, the raw weights): online SGD's step-to-step jitter averaged away.
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "FusionConfig":
        """Build from a mapping of dotted ("fusion.hidden_dim") or plain ("hidden_dim") names.

        >>> FusionConfig.from_mapping({"fusion.hidden_dim": 64, "num_heads": 4}).hidden_dim
        64
        """
        if values is None:
            return cls()
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise ConfigError(repr(key), "parameter names are strings")
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name not in known:
                raise ConfigError(key, f"unknown parameter (known: {', '.join(sorted(known))})")
            if name in kwargs:
                raise ConfigError(key, "given twice (dotted and plain name)")
            kwargs[name] = _coerce(PREFIX + name, value, known[name].type)
        return cls(**kwargs)

    @classmethod
    def coerce(cls, config: "FusionConfig | Mapping[str, Any] | None") -> "FusionConfig":
        """Accept a FusionConfig, a mapping (dotted or plain names), or None for the defaults."""
        if isinstance(config, cls):
            return config
        if config is None or isinstance(config, Mapping):
            return cls.from_mapping(config)
        # An object with a get(name, default) method, like the original config store.
        if hasattr(config, "get"):
            values = {}
            for f in fields(cls):
                sentinel = object()
                value = config.get(PREFIX + f.name, sentinel)
                if value is not sentinel and value is not None:
                    values[f.name] = value
            return cls.from_mapping(values)
        raise ConfigError("config", f"expected FusionConfig, a mapping or None, got {type(config).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain names to JSON-able values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "FusionConfig":
        return dataclasses.replace(self, **changes)

    @property
    def lr_floor(self) -> float:
        return self.learning_rate * self.lr_floor_ratio


# Fields whose values change the network's shapes: a checkpoint must match them to load.
ARCHITECTURE_FIELDS = ("hidden_dim", "num_heads", "skill_bias", "logit_pool", "classic_tokens", "expert_identity")


def _coerce(name: str, value: Any, type_name: Any) -> Any:
    """Convert a raw value (from TOML, env or a dict) to the field's type, or raise naming it."""
    t = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if t == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if t == "int":
        if isinstance(value, bool):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if t == "float":
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(name, f"expected a number, got {value!r}")
    if t == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(name, f"expected a string, got {value!r}")
    if t.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(name, f"expected a list of names, got {value!r}")
    return value


def _validate(c: FusionConfig) -> None:
    def need(cond: bool, param: str, msg: str) -> None:
        if not cond:
            raise ConfigError(PREFIX + param, msg)

    for f in fields(c):
        v = getattr(c, f.name)
        t = f.type if isinstance(f.type, str) else f.type.__name__
        if t == "int":
            need(isinstance(v, int) and not isinstance(v, bool), f.name, f"expected an integer, got {v!r}")
        elif t == "float":
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                 f.name, f"expected a finite number, got {v!r}")
        elif t == "bool":
            need(isinstance(v, bool), f.name, f"expected true or false, got {v!r}")

    need(c.hidden_dim >= 1, "hidden_dim", f"must be >= 1, got {c.hidden_dim}")
    need(c.num_heads >= 1, "num_heads", f"must be >= 1, got {c.num_heads}")
    need(c.hidden_dim % c.num_heads == 0, "hidden_dim",
         f"{c.hidden_dim} is not divisible by num_heads={c.num_heads}")
    need(0.0 <= c.dropout < 1.0, "dropout", f"must be in [0, 1), got {c.dropout}")
    need(c.learning_rate > 0.0, "learning_rate", f"must be > 0, got {c.learning_rate}")
    need(c.l2_lambda >= 0.0, "l2_lambda", f"must be >= 0, got {c.l2_lambda}")
    need(c.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {c.warmup_steps}")
    need(c.min_samples >= 1, "min_samples", f"must be >= 1, got {c.min_samples}")
    need(0.0 <= c.val_split < 1.0, "val_split", f"must be in [0, 1), got {c.val_split}")
    need(c.gradient_clip > 0.0, "gradient_clip", f"must be > 0, got {c.gradient_clip}")
    need(c.early_stopping_patience >= 1, "early_stopping_patience",
         f"must be >= 1, got {c.early_stopping_patience}")
    need(c.early_stopping_delta >= 0.0, "early_stopping_delta",
         f"must be >= 0, got {c.early_stopping_delta}")
    for name in ("expert_names", "feature_names"):
        names = getattr(c, name)
        need(isinstance(names, tuple) and all(isinstance(n, str) and n for n in names),
             name, f"must be a list of non-empty names, got {names!r}")
        dup = sorted({n for n in names if names.count(n) > 1})
        need(not dup, name, f"duplicate names: {', '.join(dup)}")
    need(c.missing_features in MISSING_FEATURE_POLICIES, "missing_features",
         f"must be one of {', '.join(MISSING_FEATURE_POLICIES)}, got {c.missing_features!r}")
    need(c.train_buffer_size >= 1, "train_buffer_size", f"must be >= 1, got {c.train_buffer_size}")
    need(c.val_buffer_size >= 1, "val_buffer_size", f"must be >= 1, got {c.val_buffer_size}")
    need(c.batch_size >= 1, "batch_size", f"must be >= 1, got {c.batch_size}")
    need(c.steps_per_outcome >= 1, "steps_per_outcome", f"must be >= 1, got {c.steps_per_outcome}")
    need(c.val_every >= 1, "val_every", f"must be >= 1, got {c.val_every}")
    need(c.decay_steps >= 1, "decay_steps", f"must be >= 1, got {c.decay_steps}")
    need(0.0 < c.lr_floor_ratio <= 1.0, "lr_floor_ratio",
         f"must be in (0, 1] (a learning rate of 0 stops online adaptation), got {c.lr_floor_ratio}")
    need(c.early_stopping_resume >= 1, "early_stopping_resume",
         f"must be >= 1, got {c.early_stopping_resume}")
    need(c.attention_window >= 1, "attention_window", f"must be >= 1, got {c.attention_window}")
    need(c.feature_norm_window >= 2, "feature_norm_window", f"must be >= 2, got {c.feature_norm_window}")
    need(0 <= c.seed < 2**63, "seed", f"must be in [0, 2**63), got {c.seed}")
    need(c.skill_eta > 0.0, "skill_eta", f"must be > 0, got {c.skill_eta}")
    need(c.skill_halflife >= 1, "skill_halflife", f"must be >= 1, got {c.skill_halflife}")
    need(0.0 <= c.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {c.ema_decay}")
