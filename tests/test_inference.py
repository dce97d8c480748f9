"""The numpy inference snapshot equals FusionNet in eval mode."""
import numpy as np
import pytest
import torch

from titan_fusion.server.fusion import RunningNorm
from titan_fusion.server.inference import NumpyNet
from titan_fusion.server.model import FusionNet, NetConfig


@pytest.mark.parametrize("n_experts, n_features, heads, skill, pool", [
    (4, 3, 2, False, False), (4, 0, 2, False, False), (6, 5, 4, False, False), (1, 1, 1, False, False),
    (4, 3, 2, True, False), (4, 3, 2, False, True), (4, 3, 2, True, True), (4, 0, 2, True, True),
    (7, 3, 2, True, "no-identity")])
def test_snapshot_equals_torch_eval_to_1e6(n_experts, n_features, heads, skill, pool):
    torch.manual_seed(7)
    net = FusionNet(NetConfig(n_experts, n_features, hidden_dim=32, num_heads=heads, dropout=0.2,
                              skill_bias=skill, logit_pool=bool(pool), expert_identity=pool != "no-identity"))
    with torch.no_grad():  # move every weight off its init (the query starts at 0)
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    net.eval()
    g = torch.Generator().manual_seed(1)
    B = 64
    x = torch.stack((torch.randn(B, n_experts, generator=g) * 3, torch.rand(B, n_experts, generator=g),
                     (torch.rand(B, n_experts, generator=g) > 0.5).float()), dim=-1)
    raw = torch.randn(B, n_features, generator=g, dtype=torch.float64) * 100 + 50_000
    norm = RunningNorm(n_features, 1000)
    for row in raw:
        norm.update(row)
    shift, scale = norm.shift_scale()
    f = RunningNorm.apply(raw, shift, scale) if n_features else None
    logw = torch.log_softmax(torch.randn(B, n_experts, generator=g, dtype=torch.float64) * 2, dim=-1)
    sk = logw.float() if skill else None
    with torch.no_grad():
        logits, w, _ = net(x, f, skill=sk)
    ref_p = torch.softmax(logits.double(), dim=-1)[:, 0].numpy()
    snap = NumpyNet.of(net, shift.numpy(), scale.numpy())
    p, a = snap.forward(x.double().numpy(), raw.numpy(), logw.float().double().numpy() if skill else None)
    assert np.abs(p - ref_p).max() < 1e-6
    assert np.abs(a - w.double().numpy()).max() < 1e-6
    assert np.allclose(a.sum(axis=1), 1.0, atol=1e-12)
    # and in float64 the two agree to rounding
    net64 = net.double()
    with torch.no_grad():
        f64 = ((raw - shift) * scale).clamp(-5.0, 5.0) if n_features else None  # unrounded features
        l64, w64, _ = net64(x.double(), f64, skill=sk.double() if skill else None)
    assert np.abs(p - torch.softmax(l64, dim=-1)[:, 0].numpy()).max() < 1e-12


def test_snapshot_is_immutable():
    net = FusionNet(NetConfig(2, 1))
    snap = NumpyNet.of(net, np.zeros(1), np.ones(1))
    with pytest.raises(ValueError):
        snap.w["head"][0] = 1.0
    with pytest.raises(AttributeError):
        snap.n_head = 4


# ------------------------------------------------------------------ the single-event path
def _snapshot_with(n_models: int, cfg: dict, features: bool, missing: bool):
    """A snapshot of a trained learner (weights moved off their init), with its events."""
    from titan_fusion.server.fusion import TransformerFusion
    from titan_fusion.server.inference import Event
    from titan_fusion.server.synthetic import informative_stream

    config = {"min_samples": 20, "warmup_steps": 5, "batch_size": 8, "val_every": 5, "learning_rate": 3e-2,
              "missing_features": "mean" if missing else "reject", **cfg}
    fusion = TransformerFusion(config, n_models=n_models)
    stream = list(informative_stream(3, 90, n_noise=n_models - 1, features=features))
    for e, f, d in stream[:60]:
        fusion.update(e, f, d)
    events = []
    for i, (e, f, _) in enumerate(stream[60:]):
        e = [dict(x) for x in e]
        if i % 3 == 0:
            e[0]["confidence"] = 0.25 * (i % 5)
        if i % 4 == 1:
            e = e[::-1]  # by name, in another order
        if missing and f and i % 2:
            f = {k: v for k, v in f.items() if k != "rsi"}
        events.append(Event.parse(e, f))
    return fusion, events


def _numpy_reference(fusion, snap, events) -> list[tuple[float, dict[str, float]]]:
    """(prob_up, attention by expert name in request order) of each event through NumpyNet.forward,
    batched: the plain numpy form of the network that OneEventNet folds and compiles."""
    from titan_fusion.server.inference import classic_rows, expert_probs
    rs = [snap.schema.resolve(ev) for ev in events]
    x = [r.x + (classic_rows(fusion._classic, expert_probs(r.x)) if fusion._classic is not None else []) for r in rs]
    probs, weights = snap.net.forward(np.array(x, dtype=np.float64),
                                      np.array([r.feats for r in rs], dtype=np.float64).reshape(len(rs), -1),
                                      snap.skill_logw)
    n = snap.schema.n_models
    if fusion._classic is not None:  # attention on an aggregator's token goes to the experts behind it
        weights = weights[:, :n] + weights[:, n:] @ np.array(snap.classic.shares())
    out = []
    for r, p, w in zip(rs, probs.tolist(), weights.tolist()):
        attention = [("", 0.0)] * n
        for j, req in enumerate(r.order):
            attention[req] = (snap.schema.names[j], w[j])
        out.append((p, dict(attention)))
    return out


@pytest.mark.parametrize("cfg, features, missing", [
    ({}, True, False),  # the defaults: skill_bias, logit_pool, classic tokens, no identity, EMA
    ({}, False, False),
    ({}, True, True),
    ({"skill_bias": False, "logit_pool": False, "classic_tokens": False, "expert_identity": True, "ema_decay": 0.0},
     True, False),
    ({"skill_bias": True, "logit_pool": False, "classic_tokens": False}, True, True),
    ({"skill_bias": False, "logit_pool": True, "classic_tokens": True, "expert_identity": True}, False, False),
    ({"num_heads": 4}, True, False),
    ({"num_heads": 1, "hidden_dim": 16}, True, True),
])
def test_single_event_path_equals_the_numpy_reference_and_torch(cfg, features, missing):
    from titan_fusion.server.inference import Prediction, classic_rows, expert_probs

    fusion, events = _snapshot_with(4, cfg, features, missing)
    snap = fusion.snapshot()
    assert snap.ready and snap.net is not None
    reference = _numpy_reference(fusion, snap, events)
    for one_bounded in (True, False):
        if not one_bounded:  # the path that subtracts the softmax maxima, for weights without a bound
            snap.__dict__.pop("_one")  # a fresh fold (cached per snapshot), forced down that path
            snap._one.bounded = False
        together = snap.predict(events)
        for ev, (p_ref, att_ref), b in zip(events, reference, together):
            one = snap.predict([ev])[0]
            assert isinstance(one, Prediction) and one.source == "fusion"
            assert abs(one.prob_up - p_ref) < 1e-9
            assert list(one.attention) == list(att_ref)  # request order
            assert max(abs(one.attention[k] - att_ref[k]) for k in att_ref) < 1e-9
            assert abs(sum(one.attention.values()) - 1.0) < 1e-12
            assert snap.predict([ev])[0] == one == b  # the same bits every time, alone or in a batch
    # and the reference equals torch in eval mode (the learner's own token inputs)
    net = fusion._net
    net.eval()
    try:
        if fusion._ema is not None:
            saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
            net.load_state_dict({**saved, **fusion._ema})
        shift, scale = fusion._norm.shift_scale()
        for ev, (p_ref, _) in zip(events, reference):
            r = snap.schema.resolve(ev)
            x = r.x + (classic_rows(fusion._classic, expert_probs(r.x)) if fusion._classic is not None else [])
            feats = torch.tensor([r.feats], dtype=torch.float64)
            f = RunningNorm.apply(feats, shift, scale) if net.config.n_features else None
            skill = fusion._skill[None].float() if net.config.skill_bias else None
            with torch.no_grad():
                logits, _, _ = net(torch.tensor([x], dtype=torch.float32), f, skill=skill)
            assert abs(float(torch.softmax(logits.double(), -1)[0, 0]) - p_ref) < 1e-6
    finally:
        if fusion._ema is not None:
            net.load_state_dict(saved)
        net.train()


def test_a_batch_answers_each_event_as_it_would_alone():
    """Refusals and fallbacks in a batch are each event's own: the same error (field and message)
    or the same forecast, to the bit, as the event alone."""
    from titan_fusion.server.errors import FusionInputError
    from titan_fusion.server.inference import Event, Prediction

    fusion, events = _snapshot_with(4, {}, True, False)
    snap = fusion.snapshot()
    bad = [Event.parse([{"prob_up": 0.5, "name": n} for n in ("good", "noise0", "noise1", "other")], {"close": 1.0, "rsi": 2.0}),
           Event.parse([{"prob_up": 0.5}] * 4, {"close": 1.0}),  # a missing feature
           Event.parse([{"prob_up": 0.5}] * 4, {"close": 1.0, "rsi": 2.0, "volume": 3.0}),
           Event.parse([{"prob_up": 0.5}] * 3, {"close": 1.0, "rsi": 2.0})]  # wrong expert count
    together = snap.predict(bad + events[:1])
    kinds = []
    for ev, b in zip(bad + events[:1], together):
        one = snap.predict([ev])[0]
        if isinstance(b, FusionInputError):
            assert isinstance(one, FusionInputError) and (one.field, str(one)) == (b.field, str(b))
            kinds.append("refused")
        else:
            assert isinstance(b, Prediction) and b == one
            kinds.append(b.reason or b.source)
    assert kinds == ["refused", "refused", "refused", "wrong_expert_count", "fusion"]


def test_single_event_net_equals_numpy_net_for_many_shapes():
    """OneEventNet against NumpyNet.forward on random weights: features or not, heads, skill,
    logit_pool, identity, classic tokens (shares), both softmax paths."""
    from titan_fusion.server.inference import OneEventNet

    g = np.random.default_rng(5)
    for n, nf, heads, skill, pool, ident, ncl in [(4, 3, 2, False, False, True, 0), (4, 0, 2, True, True, False, 0),
                                                  (7, 2, 2, True, True, False, 3), (7, 0, 4, False, True, True, 3),
                                                  (1, 1, 1, True, False, True, 0), (6, 5, 4, True, True, True, 2)]:
        torch.manual_seed(n + nf)
        net = FusionNet(NetConfig(n, nf, hidden_dim=32, num_heads=heads, skill_bias=skill, logit_pool=pool,
                                  expert_identity=ident))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn_like(p))
        snap = NumpyNet.of(net, g.normal(size=nf), np.abs(g.normal(size=nf)))
        logw = np.log(g.dirichlet(np.ones(n))) if skill else None
        ne = n - ncl
        shares = g.dirichlet(np.ones(ne), size=ncl).tolist() if ncl else None
        for bounded in (True, False):
            one = OneEventNet(snap, logw, shares)
            one.bounded = one.bounded and bounded
            for _ in range(10):
                x = np.stack([g.normal(size=n) * 3, g.random(n), (g.random(n) > 0.5) * 1.0], -1)
                x[ne:, 1:] = 0.0
                raw = g.normal(size=nf) * 2
                if nf and g.random() < 0.3:
                    raw[0] = np.nan  # missing: the running mean
                p, a = snap.forward(x[None], raw[None], logw)
                if ncl:
                    a = a[:, :ne] + a[:, ne:] @ np.array(shares)
                p1, a1 = one.forward(x.ravel().tolist() + one.features(raw.tolist()) + [1.0])
                assert abs(p1 - p[0]) < 1e-12
                assert np.abs(np.array(a1) - a[0]).max() < 1e-12


@pytest.mark.parametrize("names", [("model_1", "", "x"), ("", "model_0", ""), ("a", "", "b")])
def test_the_plain_average_has_one_attention_weight_per_expert_whatever_their_names(names):
    """An unnamed expert is model_<i> in the attention map; when that would repeat a name given to
    another expert, every key is model_<i>: one weight per expert, summing to 1 (as the client's
    local fallback)."""
    from titan_fusion.server.inference import Event, average_prediction
    p = average_prediction(Event.parse([{"prob_up": 0.5, "name": n} if n else {"prob_up": 0.5} for n in names]),
                           "wrong_expert_count", 1)
    assert len(p.attention) == 3 and sum(p.attention.values()) == pytest.approx(1.0)
    if names == ("a", "", "b"):
        assert list(p.attention) == ["a", "model_1", "b"]


def test_the_compiled_forward_travels_unbound_and_gives_the_same_bits_after(tmp_path):
    """A folded snapshot crosses from the trainer process pickled: without its compiled forward
    (numba's dispatcher is the process's own), which the receiving process binds; the forecast is
    the same to the bit."""
    import pickle

    fusion, events = _snapshot_with(4, {}, True, False)
    snap = fusion.snapshot().fold()
    assert snap._one._kernel is None  # folded, not bound (the trainer never imports numba)
    sent = pickle.loads(pickle.dumps(snap))
    assert sent._one._kernel is None
    assert sent.prepare()._one._kernel is not None
    for ev in events[:5]:
        assert sent.predict([ev])[0] == snap.predict([ev])[0]
    from titan_fusion.server import onekernel
    assert len(onekernel.forward.signatures) == 1  # unpickled arrays made read-only again: no second compile


def test_the_compiled_forward_compiles_without_a_cache_where_none_can_be_written(tmp_path):
    """Where numba finds nowhere to write its cache (a read-only install and home), the module
    still loads: it compiles at start instead of failing."""
    import os
    import subprocess
    import sys
    (tmp_path / "nowhere.py").write_text("class NoLocator:\n"
                                         "    @classmethod\n"
                                         "    def from_function(cls, py_func, source_path):\n"
                                         "        return None  # as a read-only install and home are\n")
    script = """
from numba.core.caching import NullCache
from titan_fusion.server import onekernel
assert isinstance(onekernel.forward._cache, NullCache)
print("loaded")
"""
    env = dict(os.environ, NUMBA_CACHE_LOCATOR_CLASSES="nowhere.NoLocator",
               PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["loaded"], out.stderr[-2000:]
    assert "cannot be cached" in out.stderr  # said at import: every start will compile


def test_a_compile_that_cannot_be_cached_still_serves(tmp_path):
    """Saving the compiled forward's cache fails (a full disk): numba raises after it compiled,
    and the service's warm-up keeps what it compiled (a warning), instead of failing. numba wrote
    the cache's index before the code that failed: the index goes, so that a later start cannot
    load the code file it names (the previous version's, after an upgrade)."""
    import os
    import subprocess
    import sys
    script = """
import errno, logging
import numba.core.caching as caching
def full(self, name, data):
    raise OSError(errno.ENOSPC, "No space left on device")
caching.IndexDataCacheFile._save_data = full  # the index is written, the compiled code is not
logging.basicConfig(level=logging.WARNING)
from titan_fusion.server import onekernel
onekernel.warm()
print(len(onekernel.forward.signatures))
"""
    cache = tmp_path / "cache"  # empty: it must compile and save
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["1"], out.stderr[-2000:]
    assert "cannot be cached" in out.stderr and "No space left on device" in out.stderr
    assert not [p.name for p in cache.rglob("*") if p.name.startswith("onekernel.forward") and p.suffix == ".nbi"]


def test_the_forecasts_run_the_signature_the_warm_up_compiled():
    """onekernel.warm() compiles for the argument types OneEventNet passes: serving forecasts adds
    no second compilation (which would stall the first Predict)."""
    from titan_fusion.server import onekernel
    fusion, events = _snapshot_with(4, {}, True, False)
    snap = fusion.snapshot().prepare()
    onekernel.warm()
    for ev in events[:3]:
        snap.predict([ev])
    assert len(onekernel.forward.signatures) == 1


def test_the_compiled_gelus_tanh_equals_libms_to_rounding():
    """onekernel._tanh (one exp) in place of math.tanh: within 2.3e-16 absolute everywhere, the
    saturated ends and the non-finite values included."""
    import math

    from titan_fusion.server import onekernel
    xs = [*np.linspace(-40.0, 40.0, 80_001), *np.logspace(-300, 1.5, 600), *-np.logspace(-300, 1.5, 600),
          0.0, -0.0, 19.06, 20.0, 20.5, -20.5, math.inf, -math.inf]
    assert max(abs(onekernel._tanh(x) - math.tanh(x)) for x in xs) <= 2.3e-16
    assert math.isnan(onekernel._tanh(math.nan))
