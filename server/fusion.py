"""TransformerFusion: the online learner around FusionNet, with the original class's API.

    >>> fusion = TransformerFusion(n_models=2, config={"fusion.min_samples": 2})
    >>> fusion.forward([{"prob_up": 0.6}, {"prob_up": 0.8}])   # warming up: the plain average
    (0.7, 0.30000000000000004)
    >>> fusion.last_source, fusion.last_reason
    ('average', 'warming_up')
    >>> fusion.update([{"prob_up": 0.6}, {"prob_up": 0.8}], actual_direction="UP")

Online learning. Each outcome is sent to the validation buffer with probability `val_split` (a
seeded hash of its sequence number, so a replay splits identically) or else to the training
buffer; both are FIFO with a maximum size. From `min_samples` outcomes on, every outcome triggers
`steps_per_outcome` AdamW steps on mini-batches of `batch_size` drawn from the training buffer, and
every `val_every` steps the loss on the whole validation buffer is measured. Training is a function
of the sequence of calls only, never of time: the same calls give bit-identical weights (torch on
one thread), and save + load + the same further calls equal never saving.

The seven guards against overfitting:
1. dropout (`dropout`) in attention, feed-forward and pooling, on in training, off in prediction;
2. L2 as AdamW weight decay (`l2_lambda`) on weight matrices and embeddings, not biases or norms;
3. early stopping: when the validation loss has not improved by `early_stopping_delta` for
   `early_stopping_patience` validation checks (one every `val_every` steps, so 50 x 10 = 500
   steps by default: patience counts evaluations, as in Keras and Lightning), the best weights
   seen are restored, `is_overfitting` turns
   true, and training pauses. New outcomes are still buffered. Once `early_stopping_resume` fresh
   validation outcomes have arrived, the restored weights are scored on them, that score becomes
   the new best, `is_overfitting` turns false, and training resumes. So `is_overfitting` means
   "the model is frozen at its best weights because more training was not helping"; if it is true
   most of the time, lower `learning_rate` or raise `dropout`/`l2_lambda`;
4. linear warmup of the learning rate from 0 over `warmup_steps`;
5. cosine decay after warmup, over `decay_steps`, to `learning_rate * lr_floor_ratio` (never 0,
   so the model keeps adapting to regime changes);
6. gradient clipping at global norm `gradient_clip`;
7. the held-out validation split (`val_split`) behind the early stopping and `val_loss`.

Fallback: the plain average of the experts' prob_up is served, and `last_source`/`last_reason` say
so, when `enabled` is false ("disabled"), before `min_samples` outcomes ("warming_up"), or when an
event has the wrong number of experts ("wrong_expert_count"). Training goes on while disabled, so
the model is ready when enabled again.

Schema. Features need no declaration: unless `feature_names` is configured, the first learned
outcome's feature names (sorted) become the schema; expert names likewise from the first learned
outcome whose experts are all named (else "model_0", "model_1", ...). Forecasts never fix the
schema, so replaying the outcomes alone rebuilds the same model; before the first outcome they are
the warm-up average. Later events with unknown features are refused; missing ones are refused or
imputed (`missing_features = "mean"`). Once names are known, an event whose experts are all named
is matched by name, whatever its order; a partly named one by position, each name checked.

Not thread-safe: one owner thread calls it (the service's ModelOwner).
"""
from __future__ import annotations

import copy
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .config import ARCHITECTURE_FIELDS, FusionConfig
from .errors import ConfigError, FusionInputError, IncompatibleCheckpointError
from .events import parse_direction
from .baselines import ClassicTokens
from .inference import (Event, NumpyNet, Prediction, Resolved, Schema, ServingStats, Snapshot, classic_rows,
                        expert_probs)
from .model import EXPERT_INPUTS, FusionNet, MaskSource, NetConfig, TrainStep

LOSS_WINDOW = 50  # train_loss is the mean of the last this-many mini-batch losses
HISTORY_LIMIT = 1000  # validation checks kept in the history
DEDUPE_WINDOW = 10_000  # event_ids remembered by update() to ignore a repeated outcome


def warm_up() -> None:
    """Pay torch's lazy start-up costs now: the first optimizer imports torch._dynamo (about 1.5 s
    here). The service calls this while it recovers, before it reports SERVING, so that its first
    outcome is not 1.5 s late."""
    p = torch.zeros(1, requires_grad=True)
    p.sum().backward()
    torch.optim.AdamW([p], lr=0.0, fused=True).step()


def lr_at(step: int, c: FusionConfig) -> float:
    """Learning rate for training step `step` (0-based): linear warmup from 0, then cosine to a floor."""
    if step < c.warmup_steps:
        return c.learning_rate * step / c.warmup_steps
    t = min(1.0, (step - c.warmup_steps) / c.decay_steps)
    return c.lr_floor + (c.learning_rate - c.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def split_uniform(seed: int, index: int) -> float:
    """A uniform number in [0, 1) from (seed, index) (splitmix64): the validation split's coin."""
    m = (1 << 64) - 1
    z = (seed * 0xD1B54A32D192ED03 + index + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


class RunningNorm:
    """Per-feature running mean and variance: cumulative for the first `window` updates, then an
    exponential moving average with that horizon. NaN inputs (missing features) are skipped."""

    def __init__(self, n: int, window: int):
        self.window = window
        self.count = torch.zeros(n, dtype=torch.float64)
        self.mean = torch.zeros(n, dtype=torch.float64)
        self.var = torch.zeros(n, dtype=torch.float64)
        self._shift_scale: tuple[torch.Tensor, torch.Tensor] | None = None  # cached until the next update

    def update(self, x: torch.Tensor) -> None:
        self._shift_scale = None
        seen = ~torch.isnan(x)
        self.count = self.count + seen
        alpha = torch.where(seen, torch.clamp(1.0 / self.count.clamp(min=1.0), min=1.0 / self.window), 0.0)
        delta = torch.where(seen, x - self.mean, 0.0)
        self.mean = self.mean + alpha * delta
        self.var = (1.0 - alpha) * (self.var + alpha * delta * delta)

    def shift_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std) with scale 0 for a constant feature: z = (x - shift) * scale.
        Computed once per update (every training step reads it); callers must not modify them."""
        if self._shift_scale is None:
            std = torch.sqrt(self.var)
            self._shift_scale = self.mean.clone(), torch.where(std > 1e-12, 1.0 / std, 0.0)
        return self._shift_scale

    @staticmethod
    def apply(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(B, F) raw -> normalized float32, clipped to [-5, 5]; NaN (missing) -> 0, the mean.
        The same formula as Snapshot.normalize."""
        return ((x - shift) * scale).nan_to_num(0.0).clamp(-5.0, 5.0).to(torch.float32)

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "var": self.var.clone()}

    def load(self, s: Mapping[str, torch.Tensor]) -> None:
        for k in ("count", "mean", "var"):
            if s[k].shape != self.mean.shape:
                raise IncompatibleCheckpointError(f"normalizer {k} has shape {tuple(s[k].shape)}, expected {tuple(self.mean.shape)}")
        self.count, self.mean, self.var = (s[k].to(torch.float64).clone() for k in ("count", "mean", "var"))
        self._shift_scale = None


class RingBuffer:
    """FIFO of labelled outcomes with a maximum size, stored as preallocated tensors."""

    COLUMNS = ("x", "feats", "label", "skill")

    def __init__(self, capacity: int, n_experts: int, n_features: int):
        self.capacity = capacity
        self.data = {
            "x": torch.zeros(capacity, n_experts, EXPERT_INPUTS),  # token inputs, float32
            "skill": torch.zeros(capacity, n_experts),  # the experts' skill log weights when it was forecast
            "feats": torch.zeros(capacity, n_features, dtype=torch.float64),
            "label": torch.zeros(capacity, dtype=torch.long),
        }
        self.start = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, row: Mapping[str, Any]) -> None:
        i = (self.start + self.size) % self.capacity
        for k in self.COLUMNS:
            self.data[k][i] = torch.as_tensor(row[k], dtype=self.data[k].dtype)
        if self.size < self.capacity:
            self.size += 1
        else:
            self.start = (self.start + 1) % self.capacity

    def gather(self, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Rows at logical positions `idx` (0 = oldest); all rows, oldest first, when None."""
        if idx is None:
            idx = torch.arange(self.size)
        phys = (idx + self.start) % self.capacity
        return {k: v.index_select(0, phys) for k, v in self.data.items()}

    def state(self) -> dict[str, torch.Tensor]:
        return self.gather()

    def load(self, s: Mapping[str, torch.Tensor]) -> None:
        n = int(s["label"].shape[0])
        keep = min(n, self.capacity)  # a smaller configured buffer keeps the newest rows
        for k in self.COLUMNS:
            if s[k].shape[1:] != self.data[k].shape[1:]:
                raise IncompatibleCheckpointError(f"buffer column {k} has shape {tuple(s[k].shape)}, "
                                                  f"expected (*, {', '.join(map(str, self.data[k].shape[1:]))})")
            self.data[k][:keep] = s[k][n - keep:].to(self.data[k].dtype)
        self.start, self.size = 0, keep


class FlatParams:
    """The network's parameters as views into one contiguous float32 buffer, and their gradients as
    views into another, so that whole-model operations are one tensor op each: zeroing the
    gradients, their global norm and clipping, the AdamW update (one tensor per group), the moving
    average of the weights, a copy of the best weights. The matrices and embeddings (AdamW's decay
    group, FusionNet.param_groups) come first, so each group is one contiguous slice.

    The parameters stay the module's nn.Parameters (same names, shapes and objects; state_dict and
    load_state_dict work as before): only their storage moves. Autograd accumulates into an
    existing .grad in place, so backward writes straight into the flat gradient buffer; never set
    the grads to None (zero `grad` instead)."""

    def __init__(self, net: torch.nn.Module, weight_decay: float):
        groups = net.param_groups(weight_decay)
        ordered = [p for g in groups for p in g["params"]]
        names = {id(p): n for n, p in net.named_parameters()}
        if len(ordered) != len(names):
            raise ValueError("param_groups must cover every parameter once")
        self.n_decay = sum(p.numel() for p in groups[0]["params"])
        self.weight_decay = weight_decay
        total = sum(p.numel() for p in ordered)
        self.data = torch.empty(total)
        self.grad = torch.zeros(total)
        self.layout: dict[str, tuple[int, torch.Size]] = {}  # name -> (offset, shape)
        offset = 0
        with torch.no_grad():
            for p in ordered:
                k = p.numel()
                self.data[offset:offset + k].copy_(p.reshape(-1))
                p.data = self.data[offset:offset + k].view(p.shape)
                p.grad = self.grad[offset:offset + k].view(p.shape)
                self.layout[names[id(p)]] = (offset, p.shape)
                offset += k

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """`flat` (laid out like `data`) as a name -> tensor dict of views into it."""
        return {n: flat[o:o + math.prod(shape)].view(shape) for n, (o, shape) in self.layout.items()}

    def load(self, flat: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy a name -> tensor mapping into `flat`; raises KeyError/RuntimeError if it does not fit."""
        if set(tensors) != set(self.layout):
            raise KeyError(f"parameters {sorted(set(tensors) ^ set(self.layout))} do not match")
        for n, view in self.views(flat).items():
            view.copy_(tensors[n])

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """torch's fused AdamW over two tensors: the decay slice and the no-decay slice."""
        decay, no_decay = self.data[:self.n_decay], self.data[self.n_decay:]
        decay.grad, no_decay.grad = self.grad[:self.n_decay], self.grad[self.n_decay:]
        return torch.optim.AdamW([{"params": [decay], "weight_decay": self.weight_decay, "name": "decay"},
                                  {"params": [no_decay], "weight_decay": 0.0, "name": "no_decay"}],
                                 lr=lr, fused=True)

    @staticmethod
    def adamw_step(opt: torch.optim.Optimizer, lr: float) -> None:
        """`opt.step()` at learning rate `lr` for an optimizer made by optimizer(), without
        torch.optim's Python overhead per call (~0.2 ms here): the same state initialization, step
        count and fused kernel, so bit for bit the same result (tests/test_fusion.py checks it)."""
        for g in opt.param_groups:
            g["lr"] = lr
            p = g["params"][0]
            st = opt.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            beta1, beta2 = g["betas"]
            torch._fused_adamw_([p], [p.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["step"]],
                                amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"],
                                eps=g["eps"], maximize=False)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale the gradients to global norm <= max_norm (as torch's clip_grad_norm_: by
        max_norm / (norm + 1e-6) when that is below 1); returns the norm before clipping."""
        norm = float(torch.linalg.vector_norm(self.grad))
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            self.grad.mul_(coef)
        return norm


class TransformerFusion:
    """Fuses `n_models` experts' prob_up into (prob_up, prob_down) and learns online. See module doc."""

    def __init__(self, config: FusionConfig | Mapping[str, Any] | None = None, n_models: int = 4):
        self.config = c = FusionConfig.coerce(config)
        if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 1:
            raise ConfigError("n_models", f"must be an integer >= 1, got {n_models!r}")
        if c.expert_names and len(c.expert_names) != n_models:
            raise ConfigError("fusion.expert_names", f"names {len(c.expert_names)} experts, but n_models={n_models}")
        self.n_models = n_models
        self._expert_names: tuple[str, ...] | None = c.expert_names or None
        self._feature_names: tuple[str, ...] | None = c.feature_names or None
        self._net: FusionNet | None = None  # built when the feature schema is known
        self._opt: torch.optim.Optimizer | None = None
        self._norm: RunningNorm | None = None
        self._train: RingBuffer | None = None
        self._val: RingBuffer | None = None
        self._best_net: dict[str, torch.Tensor] | None = None
        self._flat: FlatParams | None = None  # the parameters and gradients, flat
        self._ema: dict[str, torch.Tensor] | None = None  # moving average of the weights (ema_decay > 0): views into _ema_flat
        self._ema_flat: torch.Tensor | None = None
        self._masks: MaskSource | None = None  # dropout's RNG (checkpointed)
        self._snap: Snapshot | None = None  # inference snapshot of the current state; None = stale
        self._sampler = torch.Generator()
        self._sampler.manual_seed(c.seed)
        self._outcomes = 0
        self._steps = 0
        self._val_seen = 0
        self._val_loss = math.nan
        self._best_val_loss = math.inf
        self._best_step = 0
        self._checks_since_best = 0  # validation checks without an improvement of the val loss
        self._paused_at_val_seen: int | None = None  # set while early stopping has paused training
        self._early_stops = 0
        self._last_grad_norm = math.nan
        self._losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self._serving = ServingStats(c.attention_window)
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LIMIT)
        self._recent_ids: dict[str, None] = {}  # insertion-ordered: the oldest is evicted first
        # The experts' recent skill (schema order): log weights of a discounted exponentially
        # weighted average forecaster; 0 = uniform. Updated by every learned outcome.
        self._classic = ClassicTokens(n_models) if c.classic_tokens else None
        self._tokens = n_models + (len(ClassicTokens.NAMES) if c.classic_tokens else 0)  # expert + classic tokens
        self._skill = torch.zeros(self._tokens, dtype=torch.float64)
        if self._feature_names is not None:
            self._build(len(self._feature_names))

    # ------------------------------------------------------------------ the original API
    def forward(self, model_outputs: Sequence[Any], features: Mapping[str, float] | None = None, *,
                event_id: str | None = None) -> tuple[float, float]:
        """(prob_up, prob_down) for the next candle; sums to 1. Raises FusionInputError on bad input.
        `event_id` is accepted for parity with FusionClient.forward (in-process it is not needed)."""
        p = self.predict(model_outputs, features)
        return p.prob_up, p.prob_down

    def update(self, model_outputs: Sequence[Any], features: Mapping[str, float] | None = None,
               actual_direction: str = "UP", *, event_id: str | None = None) -> None:
        """Learn from how the candle closed ("UP" or "DOWN"). Raises FusionInputError on bad input,
        including the wrong number of experts (such an outcome cannot be learned from).

        With an `event_id`, an outcome already learned under the same id (among the last
        DEDUPE_WINDOW ids) is ignored, as the service does: a retried update never trains twice."""
        label = parse_direction(actual_direction)
        event = Event.parse(model_outputs, features)
        if event_id is not None:
            if not isinstance(event_id, str) or not event_id:
                raise FusionInputError("event_id", f"must be a non-empty string, got {event_id!r}")
            if event_id in self._recent_ids:
                return
        self.learn(event, label)
        if event_id is not None:
            if len(self._recent_ids) >= DEDUPE_WINDOW:
                self._recent_ids.pop(next(iter(self._recent_ids)))
            self._recent_ids[event_id] = None

    def get_training_stats(self) -> dict[str, Any]:
        c = self.config
        return {
            "samples_trained": self._outcomes,
            "train_loss": math.fsum(self._losses) / len(self._losses) if self._losses else math.nan,
            "val_loss": self._val_loss,
            "current_lr": lr_at(self._steps, c),
            "is_overfitting": self._paused_at_val_seen is not None,
            **self._serving.training_stats(self.n_models),  # avg_attention_entropy, last_source, last_reason
            "train_steps": self._steps,
            "best_val_loss": self._best_val_loss,
            "patience_counter": self._checks_since_best,
            "early_stops": self._early_stops,
            "train_buffer_size": len(self._train) if self._train else 0,
            "val_buffer_size": len(self._val) if self._val else 0,
            "enabled": c.enabled,
            "ready": self.ready,
            "min_samples": c.min_samples,
            "last_grad_norm": self._last_grad_norm,
            "n_models": self.n_models,
            "expert_names": list(self.expert_names),
            "feature_names": list(self._feature_names or ()),
        }

    def get_attention_weights(self) -> dict[str, float]:
        """Mean attention weight per expert over the last `attention_window` fused forecasts
        (uniform before the first one). Sums to 1."""
        return self._serving.weights(self.expert_names)

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        """Write the whole state to directory `path` (fusion_model.pt + fusion_state.json), atomically.
        `extra` (JSON-able) is stored in fusion_state.json under "extra"."""
        tensors: dict[str, Any] = {"sampler_rng": self._sampler.get_state(), "skill": self._skill.clone()}
        if self._net is not None:
            tensors.update(
                net=self._net.state_dict(), optimizer=self._opt.state_dict(), best_net=self._best_net, ema=self._ema,
                norm=self._norm.state(), train=self._train.state(), val=self._val.state())
        state = {
            "config": self.config.to_dict(),
            "n_models": self.n_models,
            "expert_names": list(self._expert_names) if self._expert_names else None,
            "feature_names": list(self._feature_names) if self._feature_names is not None else None,
            "counters": {"outcomes": self._outcomes, "steps": self._steps, "val_seen": self._val_seen,
                         "best_step": self._best_step, "checks_since_best": self._checks_since_best,
                         "paused_at_val_seen": self._paused_at_val_seen,
                         "early_stops": self._early_stops},
            "val_loss": _jsonable(self._val_loss),
            "best_val_loss": _jsonable(self._best_val_loss),
            "last_grad_norm": _jsonable(self._last_grad_norm),
            "losses": list(self._losses),
            "serving": self._serving.state(),
            "history": [{k: _jsonable(v) for k, v in h.items()} for h in self._history],
            "recent_event_ids": list(self._recent_ids),
            "classic": self._classic.state() if self._classic is not None else None,
            "dropout_rng": self._masks.state() if self._masks is not None else None,
            "extra": dict(extra or {}),
        }
        checkpoint.write_checkpoint(path, tensors, state)

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore the whole state from directory `path`. On any error (missing, corrupt, other
        architecture) raises a CheckpointError and leaves this instance untouched. Returns the
        checkpoint's "extra" mapping."""
        tensors, state = checkpoint.read_checkpoint(path)
        fresh = TransformerFusion(self.config, self.n_models)
        try:
            fresh._restore(tensors, state)
        except IncompatibleCheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise IncompatibleCheckpointError(f"checkpoint at {path} does not fit this model: {type(e).__name__}: {e}") from None
        vars(self).clear()
        vars(self).update(vars(fresh))
        return dict(state.get("extra") or {})

    # ------------------------------------------------------------------ richer API
    @property
    def ready(self) -> bool:
        """At least min_samples outcomes learned: the fusion may serve."""
        return self._outcomes >= self.config.min_samples

    @property
    def samples_trained(self) -> int:
        """Outcomes learned so far."""
        return self._outcomes

    @property
    def schema(self) -> Schema:
        """Which experts and features events must carry (see inference.Schema)."""
        return self._schema()

    @property
    def version(self) -> int:
        """Training steps so far: the version of the model that serves."""
        return self._steps

    @property
    def expert_names(self) -> tuple[str, ...]:
        return self._expert_names or tuple(f"model_{i}" for i in range(self.n_models))

    def predict(self, model_outputs: Sequence[Any], features: Mapping[str, float] | None = None) -> Prediction:
        """Like forward(), with the source, reason, attention and model version."""
        result = self.predict_events([Event.parse(model_outputs, features)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def predict_events(self, events: Sequence[Event]) -> list[Prediction | FusionInputError]:
        """Predict a batch of validated events, each as it would be alone. An event that does not fit
        the schema gets its FusionInputError in its place; the others are unaffected."""
        preds = self.snapshot().predict(events)
        self._serving.record(preds, self.expert_names)
        return preds

    @property
    def last_source(self) -> str | None:
        """"fusion" or "average": what served the last forecast."""
        return self._serving.last_source

    @property
    def last_reason(self) -> str | None:
        """Why the average served the last forecast ("disabled", "warming_up", ...); None for fusion."""
        return self._serving.last_reason

    @property
    def serving_stats(self) -> ServingStats:
        """Where forecasts made elsewhere (the service's predicting threads) are recorded."""
        return self._serving

    def learn(self, event: Event, label: int) -> None:
        """Learn one validated outcome (label 1 = UP, 0 = DOWN)."""
        if label not in (0, 1):
            raise FusionInputError("actual_direction", f"label must be 1 (UP) or 0 (DOWN), got {label!r}")
        if len(event.experts) != self.n_models:
            raise FusionInputError("model_outputs", f"expected {self.n_models} expert outputs, got {len(event.experts)}")
        r = self._schema().resolve(event)
        self._fix_schema(r)
        c = self.config
        feats = torch.tensor(r.feats, dtype=torch.float64)
        self._norm.update(feats)
        self._snap = None
        x = r.x
        if self._classic is not None:  # the classic aggregators forecast first, then learn (prequential)
            probs = expert_probs(r.x)
            x = x + classic_rows(self._classic, probs)
        row = {"x": x, "feats": feats, "label": 1 - label, "skill": self._skill.clone()}
        self._update_skill(x, label)
        if self._classic is not None:
            self._classic.learn(probs, label)
        to_val = c.val_split > 0 and split_uniform(c.seed, self._outcomes) < c.val_split
        (self._val if to_val else self._train).append(row)
        self._outcomes += 1
        if to_val:
            self._val_seen += 1
        if not self.ready:
            return
        if self._paused_at_val_seen is not None:
            if self._val_seen - self._paused_at_val_seen < c.early_stopping_resume:
                return
            self._resume()
        if len(self._train) == 0:
            return
        for _ in range(c.steps_per_outcome):
            self._step()
            if self._paused_at_val_seen is not None:
                break

    # ------------------------------------------------------------------ internals
    def _build(self, n_features: int) -> None:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self._net = FusionNet(NetConfig(self._tokens, n_features, c.hidden_dim, c.num_heads, c.dropout,
                                            skill_bias=c.skill_bias, logit_pool=c.logit_pool,
                                            expert_identity=c.expert_identity))
        # Always in training mode: predictions and validation read the Snapshot, never the module.
        self._net.train()
        self._flat = FlatParams(self._net, c.l2_lambda)
        self._opt = self._flat.optimizer(lr_at(0, c))
        self._train_step = TrainStep(self._net)
        self._ema_flat = torch.empty_like(self._flat.data) if c.ema_decay > 0.0 else None
        self._masks = MaskSource(c.seed + 1, c.dropout)
        self._norm = RunningNorm(n_features, c.feature_norm_window)
        self._train = RingBuffer(c.train_buffer_size, self._tokens, n_features)
        self._val = RingBuffer(c.val_buffer_size, self._tokens, n_features)

    def _schema(self) -> Schema:
        return Schema(self.n_models, self._expert_names, self._feature_names, self.config.missing_features)

    def _fix_schema(self, r: Resolved) -> None:
        if r.expert_names is not None or r.feature_names is not None:
            self._snap = None
        if self._expert_names is None and r.expert_names is not None:
            self._expert_names = r.expert_names
        if self._feature_names is None and r.feature_names is not None:
            self._feature_names = r.feature_names
        if self._net is None:
            self._build(len(self._feature_names))

    def _update_skill(self, x: list[list[float]], label: int) -> None:
        """Discounted EWA on log loss: logw <- decay * logw - eta * loss, renormalized."""
        c = self.config
        logit = torch.tensor([row[0] for row in x], dtype=torch.float64)
        loss = F.softplus(-logit) if label == 1 else F.softplus(logit)  # -log p_i(outcome)
        decay = 0.5 ** (1.0 / c.skill_halflife)
        logw = decay * self._skill - c.skill_eta * loss
        self._skill = logw - torch.logsumexp(logw, dim=0)

    def snapshot(self) -> Snapshot:
        """The immutable inference snapshot of the current state (rebuilt only after a change)."""
        if self._snap is None:
            net = None
            if self._net is not None:
                shift, scale = self._norm.shift_scale()
                net = NumpyNet.of(self._net, shift.numpy(), scale.numpy(), self._ema)
            self._snap = Snapshot(self._steps, self.config.enabled, self.ready, self._schema(), net,
                                  self._skill.numpy().copy() if self.config.skill_bias else None,
                                  copy.deepcopy(self._classic))
        return self._snap

    def _step(self) -> None:
        c = self.config
        n = len(self._train)
        idx = torch.randperm(n, generator=self._sampler)[: c.batch_size]
        b = self._train.gather(idx)
        lr = lr_at(self._steps, c)
        net_config = self._net.config
        f = RunningNorm.apply(b["feats"], *self._norm.shift_scale()) if net_config.n_features else None
        # the loss of self._net(...) in training mode and its gradients, written into the flat grad buffer
        loss = self._train_step(b["x"], f, b["label"], b["skill"], self._masks.masks(net_config, len(idx)))
        self._last_grad_norm = self._flat.clip_grad_norm(c.gradient_clip)
        FlatParams.adamw_step(self._opt, lr)
        self._update_ema()
        self._snap = None
        self._steps += 1
        self._losses.append(float(loss.detach()))
        if self._steps % c.val_every == 0:
            self._check_validation()

    def _update_ema(self) -> None:
        """Moving average of the weights, with a decay that ramps up from 0 over the first steps
        (min(ema_decay, (1 + t) / (10 + t))) so that early weights do not linger."""
        d = self.config.ema_decay
        if d <= 0.0:
            return
        if self._ema is None:
            self._reset_ema()
            return
        d = min(d, (1.0 + self._steps) / (10.0 + self._steps))
        self._ema_flat.lerp_(self._flat.data, 1.0 - d)  # ema = d ema + (1 - d) weights, one op

    def _reset_ema(self) -> None:
        if self.config.ema_decay > 0.0:
            self._ema_flat.copy_(self._flat.data)
            self._ema = self._flat.views(self._ema_flat)

    def _best_copy(self) -> dict[str, torch.Tensor]:
        """A copy of the weights that validation scores (one flat clone), as a state_dict-like name ->
        tensor dict: the moving average once there is one (what _val_loss_now scores and the service
        serves), else the trained weights. Early stopping puts these back, so that the model it
        pauses on is the one that scored best_val_loss."""
        served = self._ema_flat if self._ema is not None else self._flat.data
        return self._flat.views(served.clone())

    def _val_loss_now(self) -> float:
        """Mean log loss of the served weights (the moving average, with ema_decay) on the
        validation buffer, each outcome's loss capped at -log(1e-12).

        The network's own eval-mode forward in float32 (torch.func.functional_call with the served
        weights): the same function as the served NumpyNet (tests/test_fusion.py checks them to
        1e-6), at a fraction of its cost on a batch of hundreds. Through NumpyNet, in float64, it
        was ~16 ms every val_every steps: a third of the training time."""
        if len(self._val) == 0:
            return math.nan
        b = self._val.gather()
        net = self._net
        c = net.config
        f = RunningNorm.apply(b["feats"], *self._norm.shift_scale()) if c.n_features else None
        skill = b["skill"] if c.skill_bias else None
        net.eval()
        try:
            with torch.no_grad():
                if self._ema is None:
                    logits, _, _ = net(b["x"], f, skill=skill)
                else:
                    logits, _, _ = torch.func.functional_call(net, self._ema, (b["x"], f), {"skill": skill})
        finally:
            net.train()
        logp = torch.log_softmax(logits.double(), dim=-1).gather(1, b["label"].view(-1, 1))
        return float(-logp.clamp_(min=math.log(1e-12)).mean())

    def _check_validation(self) -> None:
        c = self.config
        self._val_loss = v = self._val_loss_now()
        self._history.append({"step": self._steps, "samples": self._outcomes, "lr": lr_at(self._steps, c),
                              "train_loss": self._losses[-1] if self._losses else math.nan, "val_loss": v})
        if math.isnan(v):
            return
        if v < self._best_val_loss - c.early_stopping_delta:
            self._best_val_loss = v
            self._best_step = self._steps
            self._checks_since_best = 0
            self._best_net = self._best_copy()
            return
        self._checks_since_best += 1
        if self._checks_since_best >= c.early_stopping_patience:
            # Early stopping: back to the best weights, pause until fresh validation data arrives.
            if self._best_net is not None:
                self._net.load_state_dict(self._best_net)
                self._reset_ema()
                self._snap = None
            self._paused_at_val_seen = self._val_seen
            self._early_stops += 1

    def _resume(self) -> None:
        """Fresh validation outcomes have arrived since early stopping: re-baseline and train again."""
        self._paused_at_val_seen = None
        self._val_loss = self._best_val_loss = self._val_loss_now()
        self._best_step = self._steps
        self._checks_since_best = 0
        self._best_net = self._best_copy()

    def _restore(self, tensors: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        """Fill this fresh instance from a checkpoint; raise if it does not fit."""
        cfg = state.get("config") or {}
        for name in ARCHITECTURE_FIELDS:
            if cfg.get(name) != getattr(self.config, name):
                raise IncompatibleCheckpointError(
                    f"checkpoint has fusion.{name}={cfg.get(name)!r}, this model has {getattr(self.config, name)!r}")
        if state.get("n_models") != self.n_models:
            raise IncompatibleCheckpointError(f"checkpoint has n_models={state.get('n_models')!r}, this model has {self.n_models}")
        saved_features = state.get("feature_names")
        if self._feature_names is not None and saved_features is not None and tuple(saved_features) != self._feature_names:
            raise IncompatibleCheckpointError(f"checkpoint features {saved_features} differ from the configured "
                                              f"{list(self._feature_names)}")
        names = state.get("expert_names")
        if self.config.expert_names and names and tuple(names) != self.config.expert_names:
            raise IncompatibleCheckpointError(f"checkpoint experts {names} differ from the configured "
                                              f"{list(self.config.expert_names)}")
        self._expert_names = tuple(names) if names else self._expert_names
        if saved_features is not None:
            self._feature_names = tuple(saved_features)
        self._sampler.set_state(tensors["sampler_rng"])
        if tensors["skill"].shape != self._skill.shape:
            raise IncompatibleCheckpointError(f"checkpoint skill state has shape {tuple(tensors['skill'].shape)}")
        self._skill = tensors["skill"].to(torch.float64).clone()
        if "net" in tensors:
            if self._net is None or self._net.config.n_features != len(self._feature_names):
                self._build(len(self._feature_names))
            self._net.load_state_dict(tensors["net"])
            # A checkpoint of the per-parameter layout (before the flat buffers and the numpy
            # dropout RNG) fails here (its optimizer has 31 tensors in 2 groups, not 2: ValueError)
            # or on the missing "dropout_rng" (KeyError): IncompatibleCheckpointError either way.
            self._opt.load_state_dict(tensors["optimizer"])
            self._masks.set_state(state["dropout_rng"])
            if tensors["best_net"] is not None:
                best = torch.empty_like(self._flat.data)
                self._flat.load(best, tensors["best_net"])
                self._best_net = self._flat.views(best)
            if tensors.get("ema") is not None and self._ema_flat is not None:
                # (with ema_decay now 0, the saved average is not used: the trained weights serve)
                self._flat.load(self._ema_flat, tensors["ema"])
                self._ema = self._flat.views(self._ema_flat)
            self._norm.load(tensors["norm"])
            self._train.load(tensors["train"])
            self._val.load(tensors["val"])
        k = state["counters"]
        self._outcomes, self._steps, self._val_seen = int(k["outcomes"]), int(k["steps"]), int(k["val_seen"])
        self._best_step, self._early_stops = int(k["best_step"]), int(k["early_stops"])
        self._checks_since_best = int(k["checks_since_best"])
        self._paused_at_val_seen = k["paused_at_val_seen"]
        self._val_loss = float(state["val_loss"])  # float("nan") / float("inf") read what _jsonable wrote
        self._best_val_loss = float(state["best_val_loss"])
        self._last_grad_norm = float(state["last_grad_norm"])
        self._losses.extend(float(x) for x in state["losses"])
        self._serving.load(state["serving"])
        self._history.extend({k: float(v) if k in ("lr", "train_loss", "val_loss") else v for k, v in h.items()}
                             for h in state["history"])
        self._recent_ids = dict.fromkeys(state.get("recent_event_ids") or ())
        if self._classic is not None:
            self._classic.load(state["classic"])


def _jsonable(x: float) -> float | str:
    """JSON has no NaN or infinity: store them as strings."""
    return x if math.isfinite(x) else repr(x)

