"""server/scenarios.py: seeded, the promised shapes and structure, and no look-ahead on real candles."""
from __future__ import annotations

import doctest

import numpy as np
import pytest

from titan_fusion.server import scenarios, scoring
from titan_fusion.server.scenarios import (
    BASE_SCENARIOS,
    SCENARIOS,
    btc_from_candles,
    make_stream,
    oracle_log_loss,
    read_candles,
)

SYNTHETIC = [s for s in SCENARIOS if s != "btc"]


def test_doctests():
    assert doctest.testmod(scenarios).failed == 0


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_shapes_ranges_and_seeds(name):
    s = make_stream(name, seed=1, n_events=600)
    assert len(s) == 600 and s.probs.shape == (600, 4) and s.expert_names == ("e0", "e1", "e2", "e3")
    assert ((s.probs >= 0) & (s.probs <= 1)).all() and ((s.p_true > 0) & (s.p_true < 1)).all()
    assert set(np.unique(s.y)) <= {0, 1}
    assert sorted(s.features) == ["mom", "vol"] and all(v.shape == (600,) for v in s.features.values())
    again, other = make_stream(name, seed=1, n_events=600), make_stream(name, seed=2, n_events=600)
    assert np.array_equal(s.probs, again.probs) and np.array_equal(s.y, again.y)
    assert not np.array_equal(s.y, other.y)
    probs, feats, y = next(s.events())
    assert probs == s.probs[0].tolist() and feats == {"mom": s.features["mom"][0], "vol": s.features["vol"][0]}
    assert y == s.y[0] and isinstance(y, int)


def test_scenarios_differ_from_each_other():
    a, b = make_stream("stable", 1, 300), make_stream("clones", 1, 300)
    assert not np.array_equal(a.y, b.y)


@pytest.mark.parametrize("name,lo,hi", [("stable", 0.59, 0.62), ("stable_weak", 0.518, 0.532)])
def test_accuracy_ceiling(name, lo, hi):
    s = make_stream(name, 1, 20_000)
    ceiling = float(np.maximum(s.p_true, 1 - s.p_true).mean())  # the oracle's expected accuracy
    assert lo < ceiling < hi
    # the oracle beats every expert and the average in log loss
    oracle = oracle_log_loss(s)
    assert oracle < scoring.log_loss(s.probs.mean(axis=1), s.y)
    assert all(oracle < scoring.log_loss(s.probs[:, i], s.y) for i in range(4))


def _expert_losses(s, sl=slice(None)):
    return [scoring.log_loss(s.probs[sl, i], s.y[sl]) for i in range(4)]


def test_stable_skill_order():
    ll = _expert_losses(make_stream("stable", 1, 20_000))
    assert ll[0] < ll[1] < min(ll[2], ll[3])


def test_switching_rotates_the_best_expert():
    s = make_stream("switching", 1, 12_000)
    for regime in range(4):
        sl = slice(regime * scenarios.SWITCH_PERIOD, (regime + 1) * scenarios.SWITCH_PERIOD)
        assert int(np.argmin(_expert_losses(s, sl))) == regime


def test_clones_are_clones():
    s = make_stream("clones", 1, 5000)
    c = np.corrcoef(s.probs.T)
    assert min(c[0, 1], c[0, 2], c[1, 2]) > 0.95 and c[0, 3] < 0.9
    ll = _expert_losses(s)
    assert ll[3] < min(ll[:3])


def test_broken_and_inverted():
    s = make_stream("broken_inverted", 1, 5000)
    assert (s.probs[:, 0] == 0.5).all()
    assert scoring.accuracy(s.probs[:, 1], s.y) < 0.47  # inverted
    assert scoring.accuracy(s.probs[:, 2], s.y) > 0.55


def test_volatility_decides_who_is_good():
    s = make_stream("volatility", 1, 20_000)
    high = s.features["vol"] > np.median(s.features["vol"])
    hi, lo = _expert_losses(s, high), _expert_losses(s, ~high)
    assert hi[0] < hi[1] and lo[1] < lo[0]


def test_weak_variants_have_the_same_structure():
    for base in BASE_SCENARIOS:
        s = make_stream(f"{base}_weak", 1, 300)
        assert s.meta["weak"] and s.meta["sigma"] == scenarios.SIGMA_WEAK


def test_unknown_scenario():
    with pytest.raises(ValueError, match="unknown scenario"):
        make_stream("nope", 1, 10)


# ---------------------------------------------------------------------------------- btc
def _random_candles(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    close = 40_000 * np.exp(np.cumsum(0.003 * rng.standard_normal(n)))
    volume = rng.lognormal(17, 0.8, n)
    volume[::37] = 0.0  # the real file has zero-volume rows
    return close, volume


def test_btc_file_has_the_documented_size():
    s = make_stream("btc", seed=1)
    candles = read_candles()
    # 8,721 rows: three snapshots inside a candle (seconds in the timestamp) and 32 candles the file
    # has twice (after a jump back of 7.8 hours) are not candles of their own
    assert (candles["rows"], candles["dropped"], len(candles["close"])) == (8721, 35, 8686)
    assert (np.diff(candles["time"]) >= 900).all()  # in time order, 15 minutes apart or more (gaps)
    assert len(s) == 8686 - scenarios.BTC_WARMUP - 1 == 8635
    assert s.p_true is None and oracle_log_loss(s) is None
    assert sorted(s.features) == ["ret_1", "ret_4", "rsi", "vol", "volume_z"]
    assert ((s.probs > 0) & (s.probs < 1)).all()
    # the outcome: candle t+1 closes above candle t
    c = candles["close"]
    t = 123
    assert s.y[t] == int(c[scenarios.BTC_WARMUP + t + 1] > c[scenarios.BTC_WARMUP + t])
    assert len(make_stream("btc", seed=1, n_events=500)) == 500


def test_btc_missing_data_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        make_stream("btc", 1, data=tmp_path / "none.csv")


def test_btc_no_look_ahead():
    """Changing the candles from index k on leaves every earlier event's experts and features
    unchanged, and every outcome that is decided before k."""
    close, volume = _random_candles(400, 0)
    base = btc_from_candles(close, volume)
    w = scenarios.BTC_WARMUP
    for k in (w + 10, 200, 398):
        c2, v2 = close.copy(), volume.copy()
        rng = np.random.default_rng(k)
        c2[k:] *= np.exp(0.05 * rng.standard_normal(400 - k))
        v2[k:] = rng.lognormal(18, 1.0, 400 - k)
        changed = btc_from_candles(c2, v2)
        t = k - w  # the event of candle k: the first that may see the change
        assert np.array_equal(base.probs[:t], changed.probs[:t])
        for name in base.features:
            assert np.array_equal(base.features[name][:t], changed.features[name][:t]), name
        assert np.array_equal(base.y[:t - 1], changed.y[:t - 1])  # y of candle k-1 needs candle k
        assert not np.array_equal(base.probs[t:], changed.probs[t:])  # the change does reach the later ones


def test_btc_online_model_learns_from_the_past():
    # candles whose returns alternate in sign: the online logistic expert (e3) learns to call the reversal
    n = 600
    r = 0.004 * np.where(np.arange(n) % 2 == 0, 1.0, -1.0) + 0.0005 * np.random.default_rng(1).standard_normal(n)
    close = 30_000 * np.exp(np.cumsum(r))
    s = btc_from_candles(close, np.full(n, 1e7))
    assert scoring.accuracy(s.probs[-200:, 3], s.y[-200:]) > 0.95
    assert abs(s.probs[0, 3] - 0.5) < abs(s.probs[-1, 3] - 0.5)  # it grew confident with data
