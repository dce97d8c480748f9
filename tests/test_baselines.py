"""server/baselines.py: each fuser against two or three steps worked by hand, sanity cases, and one
contract run over every fuser (the transformer's adapter included)."""
from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from titan_fusion.server import baselines
from titan_fusion.server.baselines import (
    EWA,
    FixedShare,
    FollowTheLeader,
    OnlineLogisticStacking,
    PlainAverage,
    RecalibratedAverage,
    all_baselines,
    sigmoid,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_doctests():
    assert doctest.testmod(baselines).failed == 0


def test_plain_average_is_the_mean_unclipped():
    f = PlainAverage()
    assert f.predict_proba_one([0.2, 0.4, 0.9], None) == pytest.approx(0.5)
    f.learn_one([0.2, 0.4, 0.9], None, 1)  # learns nothing
    assert f.predict_proba_one([0.0, 1.0], None) == 0.5
    assert f.predict_proba_one([0.0, 0.0], None) == 0.0  # no clip: exactly the service's fallback


def test_follow_the_leader_by_hand():
    f = FollowTheLeader(2)
    # step 1: both have loss 0, the first leads
    assert f.predict_proba_one([0.7, 0.4], None) == 0.7
    f.learn_one([0.7, 0.4], None, 1)  # L = (-ln 0.7, -ln 0.4) = (0.357, 0.916)
    # step 2: expert 0 leads
    assert f.predict_proba_one([0.2, 0.9], None) == 0.2
    f.learn_one([0.2, 0.9], None, 1)  # L = (0.357 - ln 0.2, 0.916 - ln 0.9) = (1.966, 1.022)
    assert f.loss == pytest.approx([-math.log(0.7) - math.log(0.2), -math.log(0.4) - math.log(0.9)])
    # step 3: expert 1 leads
    assert f.predict_proba_one([0.6, 0.3], None) == 0.3


def test_ewa_by_hand():
    f = EWA(2)  # eta = 1: weights proportional to the product of the probabilities given to the outcomes
    assert f.predict_proba_one([0.8, 0.4], None) == pytest.approx(0.6)  # (0.8 + 0.4) / 2
    f.learn_one([0.8, 0.4], None, 1)  # w ~ (0.8, 0.4) = (2/3, 1/3)
    assert f.predict_proba_one([0.3, 0.6], None) == pytest.approx(2 / 3 * 0.3 + 1 / 3 * 0.6)  # 0.4
    f.learn_one([0.3, 0.6], None, 0)  # w ~ (0.8 * 0.7, 0.4 * 0.4) = (0.56, 0.16)
    assert f.weights() == pytest.approx([0.56 / 0.72, 0.16 / 0.72])
    assert f.predict_proba_one([0.5, 0.9], None) == pytest.approx((0.56 * 0.5 + 0.16 * 0.9) / 0.72)  # 0.5889


def test_ewa_learning_rate():
    f = EWA(2, eta=0.5)  # w ~ (0.8^0.5, 0.4^0.5)
    f.learn_one([0.8, 0.4], None, 1)
    w0, w1 = math.sqrt(0.8), math.sqrt(0.4)
    assert f.predict_proba_one([1.0, 0.0], None) == pytest.approx((w0 * (1 - 1e-4) + w1 * 1e-4) / (w0 + w1))


def test_fixed_share_by_hand():
    f = FixedShare(2, alpha=0.1)  # after each EWA update: w <- 0.9 w + 0.1 / 2
    assert f.predict_proba_one([0.8, 0.4], None) == pytest.approx(0.6)
    f.learn_one([0.8, 0.4], None, 1)  # EWA: (2/3, 1/3); shared: (0.9 * 2/3 + 0.05, 0.9 * 1/3 + 0.05) = (0.65, 0.35)
    assert f.weights() == pytest.approx([0.65, 0.35])
    assert f.predict_proba_one([0.3, 0.6], None) == pytest.approx(0.65 * 0.3 + 0.35 * 0.6)  # 0.405
    f.learn_one([0.3, 0.6], None, 0)  # EWA: (0.65 * 0.7, 0.35 * 0.4) / 0.595 = (0.7647, 0.2353)
    v = [0.65 * 0.7 / 0.595, 0.35 * 0.4 / 0.595]
    w = [0.9 * v[0] + 0.05, 0.9 * v[1] + 0.05]  # (0.7382, 0.2618)
    assert f.weights() == pytest.approx(w)
    assert f.predict_proba_one([0.5, 0.9], None) == pytest.approx(w[0] * 0.5 + w[1] * 0.9)  # 0.6047


def test_fixed_share_with_alpha_0_is_ewa():
    a, b = EWA(3), FixedShare(3, alpha=0.0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        probs = rng.uniform(0.1, 0.9, 3).tolist()
        assert a.predict_proba_one(probs, None) == pytest.approx(b.predict_proba_one(probs, None), abs=1e-12)
        y = int(rng.random() < 0.5)
        a.learn_one(probs, None, y)
        b.learn_one(probs, None, y)


def test_recalibrated_average_by_hand():
    # ridge 1, no forgetting: H starts at I, w at (a, b) = (1, 0)
    f = RecalibratedAverage(ridge=1.0, forget=0.0)
    z = logit(0.7)  # the average of 0.6 and 0.8
    assert f.predict_proba_one([0.6, 0.8], None) == pytest.approx(0.7)  # sigmoid(1 * z + 0): the average
    f.learn_one([0.6, 0.8], None, 0)
    # x = (z, 1), p = 0.7, g = (p - y) x = 0.7 x, h = p (1 - p) = 0.21, H = I + h x x^T.
    # Sherman-Morrison: H^-1 x = x / (1 + h |x|^2), so the step is 0.7 x / (1 + 0.21 (z^2 + 1))
    step = 0.7 / (1 + 0.21 * (z * z + 1))
    a1, b1 = 1 - step * z, 0 - step * 1  # (0.5641, -0.5144)
    assert f.lr.w == pytest.approx([a1, b1])
    # step 2: both experts at 0.5: x = (0, 1), the forecast is sigmoid(b1)
    p2 = sigmoid(b1)  # 0.3742
    assert f.predict_proba_one([0.5, 0.5], None) == pytest.approx(p2)
    f.learn_one([0.5, 0.5], None, 1)
    # H2 = H1 + h2 e2 e2^T with h2 = p2 (1 - p2); g2 = (p2 - 1) (0, 1); w2 = w1 - H2^-1 g2 (2 x 2 inverse)
    h1 = 0.21
    H11, H12, H22 = 1 + h1 * z * z, h1 * z, 1 + h1 + p2 * (1 - p2)
    det = H11 * H22 - H12 * H12
    g2 = p2 - 1
    a2, b2 = a1 - (-H12 * g2) / det, b1 - (H11 * g2) / det  # (0.4958, -0.0726)
    assert f.lr.w == pytest.approx([a2, b2])
    assert f.predict_proba_one([0.7, 0.7], None) == pytest.approx(sigmoid(a2 * z + b2))  # 0.5860


def test_stacking_by_hand():
    f = OnlineLogisticStacking(2, ridge=1.0, forget=0.0)  # w starts at (1/2, 1/2, 0)
    x = np.array([logit(0.6), logit(0.8), 1.0])
    p1 = sigmoid(0.5 * x[0] + 0.5 * x[1])  # sigmoid of the mean logit: 0.7101
    assert f.predict_proba_one([0.6, 0.8], None) == pytest.approx(p1)
    f.learn_one([0.6, 0.8], None, 1)
    # first Newton step from H = I: w1 = w0 - (p1 - 1) x / (1 + p1 (1 - p1) |x|^2)
    w1 = np.array([0.5, 0.5, 0.0]) - (p1 - 1) * x / (1 + p1 * (1 - p1) * (x @ x))
    assert f.weights == pytest.approx(w1)
    x2 = np.array([logit(0.3), logit(0.45), 1.0])
    assert f.predict_proba_one([0.3, 0.45], None) == pytest.approx(sigmoid(w1 @ x2))


def test_stacking_with_interactions_inputs():
    f = OnlineLogisticStacking(2, interactions=True, ridge=1.0, forget=0.0)
    # before any outcome: features normalize to 0, so it is the sigmoid of the mean logit
    assert f.predict_proba_one([0.6, 0.8], {"vol": 1.0, "mom": 5.0}) == pytest.approx(
        sigmoid((logit(0.6) + logit(0.8)) / 2))
    assert f.lr.w.size == 2 + 1 + 2 + 2 * 2  # logits, bias, features, logit x feature
    f.learn_one([0.5, 0.5], {"vol": 1.0, "mom": 5.0}, 1)
    f.learn_one([0.5, 0.5], {"vol": 3.0, "mom": 5.0}, 0)
    # running mean 2, sd sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt 2; mom is constant: 0
    assert f.norm.names == ("mom", "vol")
    assert f.norm.z({"vol": 4.0, "mom": 5.0}) == pytest.approx([0.0, 2.0 / math.sqrt(2.0)])


def test_stacking_with_interactions_learns_a_feature_dependent_weight():
    # expert 0 is right when vol > 0, expert 1 when vol < 0: only the interaction terms can tell
    rng = np.random.default_rng(1)
    f, plain = OnlineLogisticStacking(2, interactions=True), OnlineLogisticStacking(2)
    loss_x = loss_plain = 0.0
    for t in range(3000):
        vol = float(rng.standard_normal())
        y = int(rng.random() < 0.5)
        good, bad = (0.75 if y else 0.25), float(rng.uniform(0.2, 0.8))
        probs = [good, bad] if vol > 0 else [bad, good]
        feats = {"vol": vol}
        px, pp = f.predict_proba_one(probs, feats), plain.predict_proba_one(probs, feats)
        if t >= 1000:
            loss_x -= math.log(px if y else 1 - px)
            loss_plain -= math.log(pp if y else 1 - pp)
        f.learn_one(probs, feats, y)
        plain.learn_one(probs, feats, y)
    assert loss_x < 0.9 * loss_plain


def test_ftl_picks_the_better_expert():
    rng = np.random.default_rng(3)
    f = FollowTheLeader(3)
    for _ in range(500):
        y = int(rng.random() < 0.5)
        good = 0.7 if y else 0.3
        probs = [float(rng.uniform(0.3, 0.7)), good if rng.random() < 0.8 else 1 - good, 0.5]
        f.learn_one(probs, None, y)
    assert f.leader() == 1


def _switching_losses(fuser, n: int = 2000, switch: int = 1000) -> tuple[float, float]:
    """Two experts; expert 0 is right (0.7 on the outcome) before `switch`, expert 1 after. Returns the
    fuser's log loss over the 200 steps right after the switch, and over the last 200 steps."""
    rng = np.random.default_rng(0)
    losses = []
    for t in range(n):
        y = int(rng.random() < 0.5)
        right, wrong = (0.7, 0.3) if y else (0.3, 0.7)
        probs = [right, wrong] if t < switch else [wrong, right]
        p = fuser.predict_proba_one(probs, None)
        losses.append(-math.log(p if y else 1 - p))
        fuser.learn_one(probs, None, y)
    return float(np.mean(losses[switch:switch + 200])), float(np.mean(losses[-200:]))


def test_fixed_share_recovers_after_a_switch_faster_than_ewa():
    ewa_after, ewa_end = _switching_losses(EWA(2))
    fs_after, fs_end = _switching_losses(FixedShare(2))
    # EWA must first undo ~850 nats of lead: still wrong 200 steps after the switch (and at the end)
    assert ewa_after > 1.0 and ewa_end > 1.0
    # Fixed Share's weight on expert 1 never fell below alpha / 2: it switches within ~10 steps
    assert fs_after < 0.45 and fs_end < 0.40


def _contract_fusers() -> list:
    from titan_fusion.server.backtest import TransformerFuser
    fast = {"min_samples": 20, "warmup_steps": 5, "batch_size": 8, "val_every": 5}
    return all_baselines(4) + [TransformerFuser(fast, 4)]


def test_every_fuser_keeps_the_contract():
    """Probabilities in [0, 1], deterministic (two instances on the same stream agree), and a forecast
    depends only on the past: learning never changes a forecast already made."""
    from titan_fusion.server.scenarios import make_stream
    stream = make_stream("volatility", seed=3, n_events=80)
    runs = []
    for _ in range(2):
        fusers = _contract_fusers()
        out = {f.name: [] for f in fusers}
        for probs, feats, y in stream.events():
            for f in fusers:
                p = f.predict_proba_one(probs, feats)
                assert 0.0 <= p <= 1.0 and math.isfinite(p), f.name
                out[f.name].append(p)
            for f in fusers:
                f.learn_one(probs, feats, y)
        runs.append(out)
    assert runs[0] == runs[1]
    assert len(runs[0]) == 8  # seven baselines and the transformer, all distinctly named
    # every learner moved away from its start (the plain average never does)
    for name, ps in runs[0].items():
        if name != "average":
            assert ps[-1] != pytest.approx(float(np.mean(stream.probs[-1])), abs=1e-9), name
