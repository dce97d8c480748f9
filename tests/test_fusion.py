"""TransformerFusion: the original API, the seven guards, fallback, bad input, determinism, resume."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import numpy as np
import torch

from titan_fusion.server import (FusionConfig, FusionInputError, IncompatibleCheckpointError,
                                 TransformerFusion)
from titan_fusion.server.checkpoint import MODEL_FILE, STATE_FILE
from titan_fusion.server.fusion import lr_at
from titan_fusion.server.model import FusionNet, NetConfig

# The network exactly as the original describes it (docs/quality.md: the defaults add to it).
AS_SPECIFIED = {"skill_bias": False, "logit_pool": False, "classic_tokens": False, "expert_identity": True,
                "ema_decay": 0.0}
FAST = {"min_samples": 20, "warmup_steps": 10, "batch_size": 8, "val_every": 5, "decay_steps": 200,
        "early_stopping_patience": 10_000}


def make(n_models: int = 4, **overrides) -> TransformerFusion:
    return TransformerFusion(config={**FAST, **overrides}, n_models=n_models)


def feed(f: TransformerFusion, events, predict: bool = True) -> list[tuple[float, float]]:
    outs = []
    for experts, feats, direction in events:
        if predict:
            outs.append(f.forward(experts, feats))
        f.update(experts, feats, direction)
    return outs


def fingerprint(f: TransformerFusion) -> dict:
    """Everything that must stay unchanged after a refused input."""
    d = {"stats": json.dumps(f.get_training_stats(), sort_keys=True),
         "attention": json.dumps(f.get_attention_weights(), sort_keys=True),
         "schema": (f._expert_names, f._feature_names)}
    if f._net is not None:
        d["params"] = [p.detach().clone() for p in f._net.parameters()]
        d["train"], d["val"], d["norm"] = f._train.state(), f._val.state(), f._norm.state()
    return d


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# ---------------------------------------------------------------- the original API and outputs
def test_forward_gives_valid_probabilities_from_both_sources(stream):
    f = make()
    events = list(stream(1, 60))
    for experts, feats, direction in events:
        up, down = f.forward(experts, feats)
        assert 0.0 <= up <= 1.0 and 0.0 <= down <= 1.0 and up + down == pytest.approx(1.0, abs=1e-12)
        f.update(experts, feats, direction)
    assert f.last_source == "fusion"
    up, down = f.forward(*events[0][:2])
    assert up + down == pytest.approx(1.0, abs=1e-12) and f.last_source == "fusion"


def test_get_training_stats_has_the_original_keys_and_the_operator_ones(stream):
    f = make()
    feed(f, stream(2, 40))
    s = f.get_training_stats()
    for key in ("samples_trained", "train_loss", "val_loss", "current_lr", "is_overfitting",
                "avg_attention_entropy", "train_steps", "train_buffer_size", "val_buffer_size",
                "patience_counter", "last_source", "ready"):
        assert key in s
    assert s["samples_trained"] == 40
    assert s["train_buffer_size"] + s["val_buffer_size"] == 40
    assert s["train_steps"] == 40 - 20 + 1  # one step per outcome from the 20th on
    assert math.isfinite(s["train_loss"]) and math.isfinite(s["val_loss"])


def test_attention_weights_by_expert_name_sum_to_one_and_start_uniform(stream):
    f = make()
    assert f.get_attention_weights() == {f"model_{i}": 0.25 for i in range(4)}
    feed(f, stream(3, 30))
    w = f.get_attention_weights()
    assert list(w) == ["good", "noise0", "noise1", "noise2"]
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-9)
    p = f.predict(*next(stream(4, 1))[:2])
    assert sum(p.attention.values()) == pytest.approx(1.0, abs=1e-9)
    # An untrained network as the original specifies it (query = 0, no skill prior) attends
    # uniformly: entropy ln 4. (With the skill prior it attends as the prior says: tested below.)
    fresh = make(learning_rate=1e-12, min_samples=1, **AS_SPECIFIED)
    feed(fresh, stream(5, 3))
    assert fresh.get_training_stats()["avg_attention_entropy"] == pytest.approx(math.log(4), abs=1e-6)


def test_attention_weight_follows_the_expert_not_its_position(stream):
    f = make()
    feed(f, stream(6, 60))
    experts, feats, _ = next(stream(7, 1))
    a = f.predict(experts, feats)
    b = f.predict(list(reversed(experts)), feats)
    assert b.prob_up == a.prob_up
    assert b.attention == a.attention and list(b.attention) == [e["name"] for e in reversed(experts)]


# ---------------------------------------------------------------- online learning
def test_training_starts_at_min_samples_and_is_incremental(stream):
    f = make()
    events = list(stream(8, 30))
    feed(f, events[:19])
    assert f.get_training_stats()["train_steps"] == 0 and not f.ready
    before = [p.detach().clone() for p in f._net.parameters()]
    f.update(*events[19])
    assert f.ready and f.get_training_stats()["train_steps"] == 1
    # The first step runs at lr 0 (warmup from 0): weights move only from step 2 on.
    f.update(*events[20])
    after = [p.detach().clone() for p in f._net.parameters()]
    assert any(not torch.equal(x, y) for x, y in zip(before, after))


def test_buffers_are_fifo_with_a_maximum_size(stream):
    f = make(train_buffer_size=16, val_buffer_size=4)
    events = list(stream(9, 80))
    feed(f, events, predict=False)
    s = f.get_training_stats()
    assert (s["train_buffer_size"], s["val_buffer_size"]) == (16, 4)
    # the newest training row is the last outcome that went to training
    last_train = f._train.gather()["x"][-1, 0, 0].item()
    from titan_fusion.server.fusion import split_uniform
    from titan_fusion.server.inference import prob_logit
    newest = max(i for i in range(80) if not split_uniform(0, i) < 0.2)
    assert last_train == pytest.approx(prob_logit(events[newest][0][0]["prob_up"]), rel=1e-6)


def test_the_learning_test_one_informative_expert_three_noise(stream):
    """Defaults, seeded: after 3,000 outcomes the fusion beats the plain average by >= 3 points on
    the next 2,000 (predict, then learn), and the informative expert has the largest weight."""
    f = TransformerFusion(n_models=4)
    events = list(stream(2026, 5000))
    feed(f, events[:3000], predict=False)
    hits_fused = hits_avg = 0
    for experts, feats, direction in events[3000:]:
        up, _ = f.forward(experts, feats)
        avg = sum(e["prob_up"] for e in experts) / len(experts)
        hits_fused += (up > 0.5) == (direction == "UP")
        hits_avg += (avg > 0.5) == (direction == "UP")
        f.update(experts, feats, direction)
    acc_fused, acc_avg = hits_fused / 2000, hits_avg / 2000
    assert acc_fused >= acc_avg + 0.03, (acc_fused, acc_avg)
    w = f.get_attention_weights()
    assert max(w, key=w.get) == "good", w


# ---------------------------------------------------------------- the seven guards
def test_guard_dropout_on_in_training_off_in_prediction(stream):
    f = make(dropout=0.2)
    feed(f, stream(10, 30))
    # four sites (attention weights, attention output, feed-forward output, pooled vector), masks
    # from the learner's checkpointed MaskSource
    assert f._net.config.dropout == 0.2 and f._masks.p == 0.2 and f._net.block.attn.dropout == 0.2
    b = f._train.gather()
    x, feats, skill = b["x"], torch.zeros(len(b["label"]), 2), b["skill"]
    assert f._net.training  # the learner's module trains; predictions read the snapshot
    out1, _, _ = f._net(x, feats, skill=skill)
    out2, _, _ = f._net(x, feats, skill=skill)
    assert not torch.equal(out1, out2)  # dropout is on in training
    experts, feats_, _ = next(stream(11, 1))
    assert f.forward(experts, feats_) == f.forward(experts, feats_)  # and off in prediction
    no_drop = make(dropout=0.0)
    feed(no_drop, stream(10, 30))
    o1, _, _ = no_drop._net(x, feats, skill=skill)
    assert torch.equal(o1, no_drop._net(x, feats, skill=skill)[0])


def test_guard_weight_decay_on_matrices_only():
    f = make(l2_lambda=0.05)
    f.update([{"prob_up": 0.5}] * 4, {"x": 1.0}, "UP")
    decay, no_decay = f._opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # each group is one slice of the flat parameter buffer: the matrices and embeddings, the rest
    (d,), (nd,) = decay["params"], no_decay["params"]
    named = dict(f._net.named_parameters())
    assert d.numel() + nd.numel() == sum(p.numel() for p in named.values())

    def inside(p, t):
        return t.data_ptr() <= p.data_ptr() < t.data_ptr() + t.numel() * t.element_size()
    in_decay = {n for n, p in named.items() if inside(p, d)}
    assert in_decay == {n for n, p in named.items() if p.dim() >= 2}
    assert all(inside(p, nd) for n, p in named.items() if n not in in_decay)
    assert not in_decay & {"pool.query", "head.bias", "block.ln_1.weight"}


def test_guard_weight_decay_shrinks_weights(stream):
    """Same data, same seed: with decay the weight matrices end up smaller."""
    norms = {}
    for l2 in (0.0, 5.0):
        f = make(l2_lambda=l2, learning_rate=0.01)
        feed(f, stream(12, 120), predict=False)
        norms[l2] = sum(float(p.detach().norm()) for p in f._opt.param_groups[0]["params"])
    assert norms[5.0] < 0.9 * norms[0.0]


def test_guard_warmup_from_zero_then_cosine_to_a_floor():
    c = FusionConfig(learning_rate=0.001, warmup_steps=100, decay_steps=1000, lr_floor_ratio=0.1)
    assert lr_at(0, c) == 0.0
    assert lr_at(50, c) == pytest.approx(0.0005)
    assert lr_at(100, c) == pytest.approx(0.001)
    assert lr_at(100 + 500, c) == pytest.approx(0.0001 + 0.0009 * 0.5)
    assert lr_at(1100, c) == pytest.approx(0.0001)
    assert lr_at(10**9, c) == pytest.approx(0.0001) and lr_at(10**9, c) > 0
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(100, 1200))


def test_guard_the_optimizer_uses_the_scheduled_rate(stream):
    f = make(warmup_steps=10, learning_rate=0.002)
    events = list(stream(13, 40))
    seen = []
    for ev in events:
        f.update(*ev)
        if f.version:
            seen.append((f.version - 1, f._opt.param_groups[0]["lr"]))
            assert f.get_training_stats()["current_lr"] == lr_at(f.version, f.config)
    assert seen[0] == (0, 0.0)
    assert all(lr == lr_at(step, f.config) for step, lr in seen)


def test_guard_gradient_clipping(stream):
    f = make(gradient_clip=1e-3)
    feed(f, stream(14, 25), predict=False)
    pre = f.get_training_stats()["last_grad_norm"]
    post = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in f._net.parameters() if p.grad is not None]))
    assert pre > 1e-3 and float(post) == pytest.approx(1e-3, rel=1e-3)


def test_guard_validation_split_ratio_is_seeded_and_near_val_split(stream):
    f = make(val_split=0.2, min_samples=10**6)  # no training: only the split
    feed(f, stream(15, 5000), predict=False)
    s = f.get_training_stats()
    share = 5000 and f._val_seen / 5000
    assert abs(share - 0.2) < 0.02
    g = make(val_split=0.2, min_samples=10**6)
    feed(g, stream(15, 5000), predict=False)
    assert g._val_seen == f._val_seen and s["val_buffer_size"] == 500
    none = make(val_split=0.0, min_samples=10**6)
    feed(none, stream(15, 100), predict=False)
    assert none.get_training_stats()["val_buffer_size"] == 0


@pytest.mark.parametrize("overrides", [{}, {"ema_decay": 0.0}])
def test_guard_early_stopping_fires_restores_best_pauses_and_resumes(stream, overrides):
    # A delta no loss can beat after the first check: the first check is the best; `patience`
    # checks (of one every val_every=5 steps) later early stopping fires.
    f = make(early_stopping_patience=2, early_stopping_delta=10.0, early_stopping_resume=5, val_every=5, **overrides)
    events = iter(stream(16, 400))
    while f.get_training_stats()["train_steps"] < 5:
        f.update(*next(events))
    # the weights validation scored: the moving average (served) with ema_decay, else the trained ones
    served = f._ema_flat if overrides.get("ema_decay", 0.999) > 0 else f._flat.data
    best, best_loss = served.clone(), f._val_loss_now()
    assert not torch.equal(best, f._flat.data) or "ema_decay" in overrides
    best_step = f._best_step
    assert best_step == 5 and f.get_training_stats()["best_val_loss"] == best_loss
    while not f.get_training_stats()["is_overfitting"]:
        f.update(*next(events))
    s = f.get_training_stats()
    assert s["train_steps"] == best_step + 2 * 5 and s["early_stops"] == 1 and s["patience_counter"] == 2
    # the best restored: what serves from now on, and what training goes on from, is the model
    # that scored best_val_loss (not the trained weights of that moment, with a moving average)
    assert torch.equal(f._flat.data, best) and torch.equal(served, best)
    assert s["best_val_loss"] == best_loss
    # Paused: new outcomes are buffered but no step runs until 5 fresh validation outcomes.
    val_at_pause, steps_at_pause, n = f._val_seen, s["train_steps"], s["samples_trained"]
    while f._val_seen - val_at_pause < 4:
        f.update(*next(events))
        assert f.get_training_stats()["train_steps"] == steps_at_pause
    assert f.get_training_stats()["samples_trained"] > n
    while f._val_seen - val_at_pause < 5:
        f.update(*next(events))
    s = f.get_training_stats()
    if f._val_seen - val_at_pause == 5 and s["train_steps"] == steps_at_pause:
        f.update(*next(events))  # the 5th fresh validation outcome resumes on the next update
        s = f.get_training_stats()
    assert not s["is_overfitting"] and s["train_steps"] > steps_at_pause
    assert s["best_val_loss"] == pytest.approx(f._val_loss_now(), abs=1) and math.isfinite(s["best_val_loss"])


@pytest.mark.parametrize("overrides", [{}, {"ema_decay": 0.0}, AS_SPECIFIED])
def test_validation_loss_is_the_served_models_log_loss_on_the_validation_buffer(stream, overrides):
    """_val_loss_now (torch, float32, the served weights: the moving average with ema_decay)
    equals the log loss of the served snapshot's own forward (NumpyNet, float64) to 1e-6."""
    f = make(**overrides)
    checked = 0
    for i, event in enumerate(stream(17, 700)):
        f.update(*event)
        if i % 100 == 99 and len(f._val):
            b = f._val.gather()
            p_up, _ = f.snapshot().net.forward(b["x"].double().numpy(), b["feats"].numpy(), b["skill"].double().numpy())
            p_label = np.where(b["label"].numpy() == 0, p_up, 1.0 - p_up)  # label 0 = UP
            assert f._val_loss_now() == pytest.approx(float(-np.mean(np.log(p_label))), abs=1e-6)
            checked += 1
    assert checked >= 5


# ---------------------------------------------------------------- fallback
def test_fallback_reasons(stream):
    experts = [{"prob_up": p} for p in (0.2, 0.4, 0.6, 0.9)]
    off = make(enabled=False)
    p = off.predict(experts)
    assert (p.source, p.reason, p.prob_up) == ("average", "disabled", pytest.approx(0.525))
    warm = make()
    p = warm.predict(experts, {"close": 1.0, "rsi": 2.0})
    assert (p.source, p.reason) == ("average", "warming_up") and warm.last_reason == "warming_up"
    feed(warm, stream(17, 25))
    assert warm.predict(experts[:3] + [{"prob_up": 0.5}], {"close": 1.0, "rsi": 2.0}).source == "fusion"
    p = warm.predict(experts[:3], {"close": 1.0, "rsi": 2.0})
    assert (p.source, p.reason, p.prob_up) == ("average", "wrong_expert_count", pytest.approx(0.4))
    assert warm.forward(experts[:3], {"close": 1.0, "rsi": 2.0}) == (pytest.approx(0.4), pytest.approx(0.6))
    assert warm.last_source == "average" and warm.last_reason == "wrong_expert_count"


def test_training_goes_on_while_disabled(stream):
    f = make(enabled=False)
    feed(f, stream(18, 30))
    assert f.get_training_stats()["train_steps"] > 0 and f.last_reason == "disabled"


# ---------------------------------------------------------------- invalid input changes nothing
BAD_EVENTS = [
    ([{"prob_up": float("nan")}] * 4, None, "UP", "model_outputs[0].prob_up"),
    ([{"prob_up": 0.5}] * 3 + [{"prob_up": float("inf")}], None, "UP", "model_outputs[3].prob_up"),
    ([{"prob_up": 1.2}] + [{"prob_up": 0.5}] * 3, None, "UP", "model_outputs[0].prob_up"),
    ([{"prob_up": -0.01}] + [{"prob_up": 0.5}] * 3, None, "UP", "model_outputs[0].prob_up"),
    ([{"prob_up": "0.5"}] + [{"prob_up": 0.5}] * 3, None, "UP", "model_outputs[0].prob_up"),
    ([{"prob_up": True}] + [{"prob_up": 0.5}] * 3, None, "UP", "model_outputs[0].prob_up"),
    ([{}] + [{"prob_up": 0.5}] * 3, None, "UP", "model_outputs[0].prob_up"),
    ([{"prob_up": 0.6, "prob_down": 0.6}] + [{"prob_up": 0.5}] * 3, None, "UP", "model_outputs[0].prob_down"),
    ([{"prob_up": 0.6, "confidence": 2}] + [{"prob_up": 0.5}] * 3, None, "UP", "model_outputs[0].confidence"),
    ([{"prob_up": 0.6, "name": "a"}, {"prob_up": 0.5, "name": "a"}, {"prob_up": 0.5}, {"prob_up": 0.5}], None,
     "UP", "model_outputs[1].name"),
    ([], None, "UP", "model_outputs"),
    ("0.5,0.5", None, "UP", "model_outputs"),
    ([{"prob_up": 0.5}] * 4, {"close": "high"}, "UP", "features.close"),
    ([{"prob_up": 0.5}] * 4, {"close": float("nan")}, "UP", "features.close"),
    ([{"prob_up": 0.5}] * 4, {"close": 1.0, "rsi": 1.0, "volume": 3.0}, "UP", "features"),
    ([{"prob_up": 0.5}] * 4, {"close": 1.0}, "UP", "features"),
    ([{"prob_up": 0.5}] * 4, [1.0, 2.0], "UP", "features"),
    ([{"prob_up": 0.5}] * 4, {"close": 1.0, "rsi": 1.0}, "SIDEWAYS", "actual_direction"),
    ([{"prob_up": 0.5}] * 4, {"close": 1.0, "rsi": 1.0}, None, "actual_direction"),
    ([{"prob_up": 0.5}] * 3, {"close": 1.0, "rsi": 1.0}, "UP", "model_outputs"),
]


@pytest.mark.parametrize("experts, feats, direction, field", BAD_EVENTS)
def test_invalid_input_names_the_field_and_changes_nothing(stream, experts, feats, direction, field):
    f = make()
    feed(f, stream(19, 30))
    before = fingerprint(f)
    with pytest.raises(FusionInputError) as e:
        f.update(experts, feats, direction)
    assert isinstance(e.value, ValueError) and e.value.field == field, str(e.value)
    assert str(e.value).startswith(field)
    if direction in ("UP", "DOWN") and field != "model_outputs" or field.startswith("model_outputs["):
        with pytest.raises(FusionInputError):
            f.forward(experts, feats)
    assert_same(before, fingerprint(f))


def test_missing_features_can_be_imputed_by_the_running_mean(stream):
    f = make(missing_features="mean")
    feed(f, stream(20, 40))
    experts = next(stream(21, 1))[0]
    p = f.predict(experts, {"close": f._norm.mean[0].item()})  # rsi missing: its mean is imputed
    q = f.predict(experts, {"close": f._norm.mean[0].item(), "rsi": f._norm.mean[1].item()})
    assert p.prob_up == pytest.approx(q.prob_up, abs=1e-12)
    f.update(experts, {"close": 50_000.0}, "UP")  # learnable too
    assert f.get_training_stats()["samples_trained"] == 41


def test_schema_comes_from_the_first_event_or_from_config():
    f = make()
    f.update([{"prob_up": 0.5, "name": n} for n in "abcd"], {"rsi": 50.0, "close": 1.0}, "UP")
    assert f.get_training_stats()["feature_names"] == ["close", "rsi"]
    assert f.expert_names == tuple("abcd")
    with pytest.raises(FusionInputError, match="unknown expert name.*'e'"):
        f.update([{"prob_up": 0.5, "name": n} for n in "abce"], {"rsi": 50.0, "close": 1.0}, "UP")
    g = make(feature_names=["rsi"], expert_names=["w", "x", "y", "z"])
    assert g.get_training_stats()["feature_names"] == ["rsi"] and g.expert_names == tuple("wxyz")
    with pytest.raises(FusionInputError, match="unknown feature.*close"):
        g.forward([{"prob_up": 0.5}] * 4, {"rsi": 1.0, "close": 2.0})


# ---------------------------------------------------------------- determinism and exact resume
def test_same_seed_same_calls_bit_identical(stream):
    a, b = make(), make()
    outs_a, outs_b = feed(a, stream(22, 120)), feed(b, stream(22, 120))
    assert outs_a == outs_b
    assert_same(fingerprint(a), fingerprint(b))
    c = make(seed=1)
    feed(c, stream(22, 120))
    assert not all(torch.equal(x, y) for x, y in zip(a._net.parameters(), c._net.parameters()))


def test_save_then_load_then_the_same_calls_equals_never_saving(tmp_path, stream):
    # early stopping fires and resumes within the run, so its state crosses the save too
    cfg = dict(early_stopping_patience=3, early_stopping_resume=3)
    events = list(stream(23, 400))
    a = make(**cfg)
    feed(a, events[:170])
    a.save(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == [MODEL_FILE, STATE_FILE]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
    b = make(**cfg)
    b.load(tmp_path / "ckpt")
    assert_same(fingerprint(a), fingerprint(b))
    outs_a, outs_b = feed(a, events[170:]), feed(b, events[170:])
    assert outs_a == outs_b
    assert_same(fingerprint(a), fingerprint(b))
    assert a.get_training_stats()["early_stops"] >= 1
    sa, sb = a._opt.state_dict()["state"], b._opt.state_dict()["state"]
    assert all(torch.equal(sa[k][m], sb[k][m]) for k in sa for m in sa[k])


def test_checkpoint_files_are_safe_formats(tmp_path, stream):
    f = make()
    feed(f, stream(24, 30))
    f.save(tmp_path / "c")
    torch.load(tmp_path / "c" / MODEL_FILE, weights_only=True)
    state = json.loads((tmp_path / "c" / STATE_FILE).read_text())
    assert state["config"]["hidden_dim"] == 32 and state["counters"]["outcomes"] == 30


def test_save_is_atomic_a_failed_write_leaves_the_old_checkpoint(tmp_path, stream, monkeypatch):
    f = make()
    feed(f, stream(25, 30))
    f.save(tmp_path / "c")
    old = (tmp_path / "c" / STATE_FILE).read_text()
    feed(f, stream(26, 5))
    from titan_fusion.server import checkpoint

    def crash(path, data):
        raise OSError("disk full")  # the write fails part-way: a fault we cannot cause for real
    monkeypatch.setattr(checkpoint, "_write_file", crash)
    with pytest.raises(OSError):
        f.save(tmp_path / "c")
    assert (tmp_path / "c" / STATE_FILE).read_text() == old
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_loading_another_architecture_fails_and_leaves_the_instance_untouched(tmp_path, stream):
    wide = make(hidden_dim=64)
    feed(wide, stream(27, 30))
    wide.save(tmp_path / "wide")
    f = make()
    feed(f, stream(28, 30))
    before = fingerprint(f)
    with pytest.raises(IncompatibleCheckpointError, match="hidden_dim=64"):
        f.load(tmp_path / "wide")
    assert_same(before, fingerprint(f))
    f.save(tmp_path / "four")
    with pytest.raises(IncompatibleCheckpointError, match="n_models=4, this model has 5"):
        make(n_models=5).load(tmp_path / "four")


def test_a_checkpoint_loads_with_the_moving_average_turned_off_or_on(tmp_path, stream):
    """ema_decay is not architecture: a checkpoint saved with the moving average loads with it off
    (the trained weights serve, as with ema_decay = 0 all along), and one saved without it loads
    with it on (the average starts from the trained weights)."""
    f = make()
    feed(f, stream(29, 120))
    f.save(tmp_path / "ema")
    off = make(ema_decay=0.0)
    off.load(tmp_path / "ema")
    assert off._ema is None and torch.equal(off._flat.data, f._flat.data)
    feed(off, stream(30, 20))
    off.save(tmp_path / "plain")
    on = make()
    on.load(tmp_path / "plain")
    assert torch.equal(on._flat.data, off._flat.data)
    feed(on, stream(31, 20))
    assert on._ema is not None and on.get_training_stats()["samples_trained"] == 160


def test_a_corrupt_checkpoint_is_detected(tmp_path, stream):
    f = make()
    feed(f, stream(29, 30))
    f.save(tmp_path / "c")
    data = bytearray((tmp_path / "c" / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "c" / MODEL_FILE).write_bytes(bytes(data))
    g = make()
    with pytest.raises(IncompatibleCheckpointError, match="checksum"):
        g.load(tmp_path / "c")
    (tmp_path / "c" / MODEL_FILE).write_bytes(bytes(data[:100]))
    with pytest.raises(IncompatibleCheckpointError):
        g.load(tmp_path / "c")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_carrying_a_pickle_is_refused_without_running_it(tmp_path, stream, monkeypatch):
    import hashlib
    import pickle
    f = make()
    feed(f, stream(30, 30))
    f.save(tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"net": _Exploit()})
    torch.save({"net": _Exploit()}, tmp_path / "c" / MODEL_FILE)
    for blob in (payload, (tmp_path / "c" / MODEL_FILE).read_bytes()):
        (tmp_path / "c" / MODEL_FILE).write_bytes(blob)
        state = json.loads((tmp_path / "c" / STATE_FILE).read_text())
        state["checksums"][MODEL_FILE] = hashlib.sha256(blob).hexdigest()  # checksum made to match
        (tmp_path / "c" / STATE_FILE).write_text(json.dumps(state))
        with pytest.raises(IncompatibleCheckpointError, match="safe loader"):
            make().load(tmp_path / "c")
        assert not (tmp_path / "pwned").exists()


def test_net_validates_shapes():
    net = FusionNet(NetConfig(4, 2))
    with pytest.raises(ValueError, match="expected 4 experts"):
        net(torch.zeros(1, 3, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="features of shape"):
        net(torch.zeros(1, 4, 3), None)


def test_update_with_a_repeated_event_id_does_not_train_twice(tmp_path, stream):
    f = make()
    events = list(stream(31, 40))
    for i, (experts, feats, direction) in enumerate(events):
        f.update(experts, feats, direction, event_id=f"BTCUSDT:1m:{i}")
    before = fingerprint(f)
    f.update(*events[5], event_id="BTCUSDT:1m:5")  # a retry
    assert_same(before, fingerprint(f))
    f.save(tmp_path / "c")
    g = make()
    g.load(tmp_path / "c")
    g.update(*events[6], event_id="BTCUSDT:1m:6")  # remembered across save/load
    assert g.get_training_stats()["samples_trained"] == 40
    with pytest.raises(FusionInputError, match="event_id"):
        g.update(*events[6], event_id="")


def test_forecasts_never_fix_the_schema_outcomes_do():
    f = make()
    p = f.predict([{"prob_up": 0.5, "name": n} for n in "abcd"], {"volume": 3.0})
    assert p.reason == "warming_up" and f.get_training_stats()["feature_names"] == []
    f.update([{"prob_up": 0.5, "name": n} for n in "wxyz"], {"rsi": 50.0}, "UP")
    assert f.get_training_stats()["feature_names"] == ["rsi"] and f.expert_names == tuple("wxyz")


def test_skill_is_a_discounted_ewa_on_log_loss():
    f = make(skill_bias=True, skill_eta=1.0, skill_halflife=2, classic_tokens=False)
    experts = [{"prob_up": p, "name": n} for p, n in ((0.8, "a"), (0.5, "b"), (0.2, "c"), (0.5, "d"))]
    f.update(experts, None, "UP")
    losses = [-math.log(p) for p in (0.8, 0.5, 0.2, 0.5)]
    logw = [-l for l in losses]
    norm = math.log(sum(math.exp(v) for v in logw))
    assert f._skill.tolist() == pytest.approx([v - norm for v in logw], abs=1e-9)
    f.update(experts, None, "DOWN")
    decay = 0.5 ** 0.5
    logw = [decay * (v - norm) + math.log(p) for v, p in zip(logw, (0.2, 0.5, 0.8, 0.5))]
    norm = math.log(sum(math.exp(v) for v in logw))
    assert f._skill.tolist() == pytest.approx([v - norm for v in logw], abs=1e-9)
    # the buffer keeps the skill as it was when the event was forecast (before its own outcome)
    rows = torch.cat([f._train.gather()["skill"], f._val.gather()["skill"]])
    assert any(torch.allclose(r, torch.zeros(4)) for r in rows)


def test_untrained_skill_bias_and_logit_pool_give_the_skill_weighted_log_linear_pool(stream):
    """With the query at 0 and the correction at 0, attention = the skill weights and the output is
    their weighted sum of the experts' logits: a classic pool the network then corrects."""
    f = make(skill_bias=True, logit_pool=True, classic_tokens=False, min_samples=30, learning_rate=1e-12)
    feed(f, stream(32, 30), predict=False)
    experts, feats, _ = next(stream(33, 1))
    p = f.predict(experts, feats)
    w = torch.softmax(f._skill, 0).tolist()
    assert list(p.attention.values()) == pytest.approx(w, abs=1e-6)
    from titan_fusion.server.inference import prob_logit
    z = sum(wi * prob_logit(e["prob_up"]) for wi, e in zip(w, experts))
    assert p.prob_up == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-6)


def test_exact_resume_with_skill_bias_and_logit_pool(tmp_path, stream):
    cfg = dict(skill_bias=True, logit_pool=True, skill_halflife=50)
    events = list(stream(34, 200))
    a = make(**cfg)
    feed(a, events[:90])
    a.save(tmp_path / "c")
    b = make(**cfg)
    b.load(tmp_path / "c")
    assert feed(a, events[90:]) == feed(b, events[90:])
    assert_same(fingerprint(a), fingerprint(b))
    assert torch.equal(a._skill, b._skill)
    with pytest.raises(IncompatibleCheckpointError, match="skill_bias"):
        make(**AS_SPECIFIED).load(tmp_path / "c")


def test_ema_weights_serve_and_resume_exactly(tmp_path, stream):
    cfg = dict(ema_decay=0.9, skill_bias=True, logit_pool=True)
    events = list(stream(35, 160))
    a = make(**cfg)
    feed(a, events[:100])
    raw = {n: p.detach().clone() for n, p in a._net.named_parameters()}
    assert any(not torch.equal(raw[n], a._ema[n]) for n in raw)  # the served weights are the average
    snap_w = a.snapshot().net.w["head"]
    from titan_fusion.server.inference import NumpyNet
    assert not np.array_equal(snap_w, NumpyNet.of(a._net, *[t.numpy() for t in a._norm.shift_scale()]).w["head"])
    a.save(tmp_path / "c")
    b = make(**cfg)
    b.load(tmp_path / "c")
    assert feed(a, events[100:]) == feed(b, events[100:])
    assert all(torch.equal(a._ema[n], b._ema[n]) for n in a._ema)


def test_classic_tokens_resume_exactly_and_report_weights_per_expert(tmp_path, stream):
    cfg = dict(classic_tokens=True, skill_bias=True, logit_pool=True)
    events = list(stream(36, 160))
    a = make(**cfg)
    feed(a, events[:100])
    assert a._net.config.n_experts == 4 + 3 and a._skill.shape == (7,)
    p = a.predict(*events[100][:2])
    assert list(p.attention) == ["good", "noise0", "noise1", "noise2"]
    assert sum(p.attention.values()) == pytest.approx(1.0, abs=1e-9)
    a.save(tmp_path / "c")
    b = make(**cfg)
    b.load(tmp_path / "c")
    assert feed(a, events[100:]) == feed(b, events[100:])
    assert_same(fingerprint(a), fingerprint(b))
    assert a._classic.state() == b._classic.state()


# ---------------------------------------------------------------- the fast training step
NET_CONFIGS = [dict(skill_bias=True, logit_pool=True, expert_identity=False),
               dict(skill_bias=False, logit_pool=False, expert_identity=True)]


@pytest.mark.parametrize("cfg", NET_CONFIGS)
@pytest.mark.parametrize("n_features", [3, 0])
@pytest.mark.parametrize("dropout", [0.2, 0.0])
def test_train_step_equals_autograd_through_the_module(cfg, n_features, dropout):
    """TrainStep's loss and gradients are those of FusionNet.forward in training mode (with the
    same dropout masks) and loss.backward(), for every parameter."""
    import copy
    from titan_fusion.server.model import MaskSource, TrainStep
    torch.manual_seed(3)
    c = NetConfig(7, n_features, dropout=dropout, **cfg)
    ref = FusionNet(c)
    with torch.no_grad():
        for p in ref.parameters():  # away from the initialization (zero head, unit calibration)
            p.add_(0.3 * torch.randn_like(p))
    fast = copy.deepcopy(ref)
    B = 32
    x, y, skill = torch.randn(B, 7, 3), torch.randint(0, 2, (B,)), torch.randn(B, 7)
    feats = torch.randn(B, n_features) if n_features else None
    masks = MaskSource(5, dropout).masks(c, B)
    assert (masks is None) == (dropout == 0.0)
    ref.train()
    _, _, loss = ref(x, feats, y, skill, masks=masks)
    loss.backward()
    step = TrainStep(fast)
    for p in fast.parameters():
        p.grad.fill_(float("nan"))  # every gradient is overwritten
    loss_fast = step(x, feats, y, skill, masks)
    assert float(loss_fast) == pytest.approx(float(loss.detach()), rel=1e-6)
    scale = max(float(p.grad.abs().max()) for p in ref.parameters())
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.isfinite(b.grad).all(), name
        # relative to the gradient's own size, or to the largest one for gradients that are 0 in
        # exact arithmetic (the pooling key's bias: softmax ignores a shift common to all scores)
        tol = max(1e-5 * float(a.grad.abs().max()), 1e-6 * scale)
        assert float((a.grad - b.grad).abs().max()) <= tol, name


def test_train_step_flushes_denormals_only_while_it_runs_and_puts_the_flag_back(monkeypatch):
    """The step turns flushing on for itself with one intra-op thread, and leaves the thread's flag
    as it found it: off stays off, on stays on; with more threads (whose workers would inherit the
    flag) it does not touch it. The flag itself is read, not mocked; the setter is watched."""
    from titan_fusion.server.model import TrainStep, flushing_denormals
    torch.manual_seed(5)
    c = NetConfig(4, 2, skill_bias=True, logit_pool=True)
    step = TrainStep(FusionNet(c))
    x, y, skill, feats = torch.randn(8, 4, 3), torch.randint(0, 2, (8,)), torch.randn(8, 4), torch.randn(8, 2)
    seen: list[bool] = []
    real = torch.set_flush_denormal

    def watch(on: bool) -> bool:
        seen.append(on)
        return real(on)

    monkeypatch.setattr(torch, "set_flush_denormal", watch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not flushing_denormals()
        step(x, feats, y, skill, None)
        assert seen == [True, False] and not flushing_denormals()
        real(True)
        seen.clear()
        step(x, feats, y, skill, None)
        assert seen == [] and flushing_denormals()  # already on: left on
        real(False)
        torch.set_num_threads(2)
        step(x, feats, y, skill, None)
        assert seen == [] and not flushing_denormals()
    finally:
        real(False)
        torch.set_num_threads(threads)


def test_training_forward_with_all_kept_masks_is_the_eval_forward():
    """Masks only drop: with every element kept (scale 1) training mode computes eval mode's function."""
    from titan_fusion.server.model import DropoutMasks
    torch.manual_seed(4)
    c = NetConfig(5, 2, dropout=0.2, skill_bias=True, logit_pool=True)
    net = FusionNet(c)
    B = 6
    x, feats, skill = torch.randn(B, 5, 3), torch.randn(B, 2), torch.randn(B, 5)
    ones = DropoutMasks(*(torch.ones(s) for s in DropoutMasks.shapes(c, B)))
    net.train()
    train_out = net(x, feats, skill=skill, masks=ones)[0]
    net.eval()
    assert torch.allclose(train_out, net(x, feats, skill=skill)[0], atol=1e-6)


def test_mask_source_rate_scale_determinism_and_state():
    from titan_fusion.server.model import MaskSource
    c = NetConfig(7, 3, dropout=0.2)
    a, b = MaskSource(9, 0.2), MaskSource(9, 0.2)
    ma = [a.masks(c, 32) for _ in range(20)]
    mb = [b.masks(c, 32) for _ in range(20)]
    for x, y in zip(ma, mb):  # same seed, same masks
        assert all(torch.equal(getattr(x, k), getattr(y, k)) for k in ("attn", "resid", "mlp", "pooled"))
    values = torch.cat([getattr(m, k).reshape(-1) for m in ma for k in ("attn", "resid", "mlp", "pooled")])
    assert values.unique().tolist() == [0.0, pytest.approx(1.25)]
    assert abs(float((values == 0).float().mean()) - 0.2) < 0.005  # ~430,000 draws
    assert not torch.equal(ma[0].resid, ma[1].resid)
    state = a.state()
    after = a.masks(c, 32)
    fresh = MaskSource(0, 0.2)
    fresh.set_state(json.loads(json.dumps(state)))  # plain ints: it goes into fusion_state.json
    assert torch.equal(fresh.masks(c, 32).mlp, after.mlp)
    assert MaskSource(9, 0.0).masks(c, 32) is None
    with pytest.raises(ValueError):
        fresh.set_state({"bit_generator": "MT19937"})


def test_flat_adamw_and_clipping_equal_torch_per_parameter():
    """The flat buffers with two AdamW groups (FlatParams.adamw_step) = torch.optim.AdamW over
    the per-parameter groups, decay on matrices only; the flat clipping = clip_grad_norm_."""
    import copy
    from titan_fusion.server.fusion import FlatParams
    torch.manual_seed(6)
    ref = FusionNet(NetConfig(7, 3, skill_bias=True, logit_pool=True))
    net = copy.deepcopy(ref)
    flat = FlatParams(net, 0.05)
    opt_ref = torch.optim.AdamW(ref.param_groups(0.05), lr=0.01, fused=True)
    opt = flat.optimizer(0.0)
    for step in range(6):
        lr = 0.01 * (step + 1)
        for g in opt_ref.param_groups:
            g["lr"] = lr
        for p, q in zip(ref.parameters(), net.parameters()):
            g = torch.randn_like(p) * (0.01 if step % 2 else 1.0)  # clipped on odd steps only
            p.grad = g.clone()
            q.grad.copy_(g)
        norm_ref = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0))
        assert flat.clip_grad_norm(1.0) == pytest.approx(norm_ref, rel=1e-5)
        opt_ref.step()
        FlatParams.adamw_step(opt, lr)
        for (name, a), b in zip(ref.named_parameters(), net.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (step, name)
    # and bit for bit what torch.optim.AdamW does with the same two flat tensors
    twin = copy.deepcopy(ref)
    twin_flat = FlatParams(twin, 0.05)
    twin_flat.data.copy_(flat.data)
    twin_opt = twin_flat.optimizer(0.0)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict would share the tensors)
    for lr in (0.003, 0.001):
        g = torch.randn_like(flat.grad)
        flat.grad.copy_(g)
        twin_flat.grad.copy_(g)
        FlatParams.adamw_step(opt, lr)
        for group in twin_opt.param_groups:
            group["lr"] = lr
        twin_opt.step()
        assert torch.equal(flat.data, twin_flat.data)


def test_a_checkpoint_of_the_per_parameter_layout_is_incompatible(tmp_path, stream):
    """Checkpoints written before the flat buffers (31-tensor optimizer state, torch dropout RNG,
    no dropout_rng) are refused with IncompatibleCheckpointError, never a crash."""
    from titan_fusion.server import checkpoint
    f = make()
    feed(f, stream(40, 30), predict=False)
    f.save(tmp_path / "new")
    tensors, state = checkpoint.read_checkpoint(tmp_path / "new")
    old_opt = torch.optim.AdamW(f._net.param_groups(0.01), lr=0.001, fused=True)
    for p in f._net.parameters():
        old_opt.state[p]["step"] = torch.tensor(3.0)
        old_opt.state[p]["exp_avg"] = torch.zeros_like(p)
        old_opt.state[p]["exp_avg_sq"] = torch.zeros_like(p)
    old_tensors = dict(tensors, optimizer=old_opt.state_dict(), torch_rng=torch.get_rng_state())
    old_state = {k: v for k, v in state.items() if k not in ("dropout_rng", "checksums", "format_version")}
    checkpoint.write_checkpoint(tmp_path / "old", old_tensors, old_state)
    with pytest.raises(IncompatibleCheckpointError):
        make().load(tmp_path / "old")
    # without the dropout RNG state alone, too
    checkpoint.write_checkpoint(tmp_path / "no_rng", tensors, old_state)
    g = make()
    with pytest.raises(IncompatibleCheckpointError):
        g.load(tmp_path / "no_rng")
    assert g._net is None  # untouched
    make().load(tmp_path / "new")
