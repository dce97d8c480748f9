"""server/scoring.py: every metric against arithmetic done by hand, the calibrated band, the
bootstrap interval, the Diebold-Mariano test, and RollingScore against the batch metrics."""
from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest

from titan_fusion.server import scoring
from titan_fusion.server.scoring import RollingScore

P = [0.9, 0.6, 0.5, 0.2]
Y = [1, 0, 1, 0]


def test_doctests():
    assert doctest.testmod(scoring).failed == 0


def test_accuracy_ties_count_half():
    # 0.9 -> UP, right; 0.6 -> UP, wrong; 0.5 a tie: half; 0.2 -> DOWN, right
    assert scoring.accuracy(P, Y) == (1 + 0 + 0.5 + 1) / 4
    assert scoring.accuracy([0.5, 0.5], [0, 1]) == 0.5


def test_log_loss_by_hand():
    expected = -(math.log(0.9) + math.log(1 - 0.6) + math.log(0.5) + math.log(1 - 0.2)) / 4
    assert scoring.log_loss(P, Y) == pytest.approx(expected, abs=1e-15)
    assert scoring.log_loss([0.5] * 3, [1, 0, 1]) == pytest.approx(math.log(2))


def test_log_loss_clips_certain_mistakes():
    # p = 0 for an UP costs -ln(1e-12) = 27.63 nats, not infinity; p = 1 for an UP costs ~0
    assert scoring.log_loss([0.0], [1]) == pytest.approx(-math.log(1e-12))
    assert scoring.log_loss([1.0], [1]) == pytest.approx(1e-12, abs=1e-15)


def test_brier_by_hand():
    assert scoring.brier(P, Y) == pytest.approx((0.1 ** 2 + 0.6 ** 2 + 0.5 ** 2 + 0.2 ** 2) / 4)


def test_ece_width_by_hand():
    # 2 bins: [0, 0.5) holds 0.1, 0.3 (mean p 0.2, freq 1/2): |0.5 - 0.2| * 2/5 = 0.12
    #         [0.5, 1] holds 0.6, 0.8, 0.9 (mean p 0.7667, freq 2/3): |0.6667 - 0.7667| * 3/5 = 0.06
    p, y = [0.1, 0.3, 0.6, 0.8, 0.9], [0, 1, 1, 1, 0]
    assert scoring.ece_width(p, y, n_bins=2) == pytest.approx(0.12 + 0.06)
    # 15 bins, each of P in its own bin: ECE = mean |y - p| = (0.1 + 0.6 + 0.5 + 0.2) / 4
    assert scoring.ece_width(P, Y) == pytest.approx(0.35)
    # p = 1 falls in the last bin (not an out-of-range 16th)
    assert scoring.width_bins(np.array([0.0, 1 / 15, 0.99, 1.0])).tolist() == [0, 1, 14, 14]


def test_ece_mass_by_hand():
    # sorted: 0.1(y 0) 0.3(1) 0.6(1) | 0.8(1) 0.9(0); 5 into 2 bins: sizes 3 and 2
    # bin 0: mean p 1/3, freq 2/3: 1/3 * 3/5 = 0.2; bin 1: mean p 0.85, freq 1/2: 0.35 * 2/5 = 0.14
    p, y = [0.9, 0.1, 0.8, 0.3, 0.6], [0, 0, 1, 1, 1]
    assert scoring.ece_mass(p, y, n_bins=2) == pytest.approx(0.2 + 0.14)
    # fewer points than bins: each point is its own bin
    assert scoring.ece_mass(P, Y) == pytest.approx(0.35)
    # 20 points into 15 bins: sizes 2,2,2,2,2,1,...,1
    assert np.bincount(scoring.mass_bins(np.linspace(0, 1, 20))).tolist() == [2] * 5 + [1] * 10


def test_ece_of_a_constant_forecast_is_its_bias():
    # every forecast 0.6, UP half the time: one bin, |0.5 - 0.6| = 0.1 either way
    p, y = [0.6] * 6, [1, 0, 1, 0, 1, 0]
    assert scoring.ece_width(p, y) == pytest.approx(0.1)
    assert scoring.ece_mass(p, y, n_bins=1) == pytest.approx(0.1)
    # equal-mass bins cut by rank, ties included: 6 forecasts in 15 bins are 6 bins of one,
    # ECE = mean |y - p| = (0.4 + 0.6) / 2
    assert scoring.ece_mass(p, y) == pytest.approx(0.5)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        scoring.log_loss([0.5, 0.5], [1])
    with pytest.raises(ValueError, match="probabilities"):
        scoring.log_loss([1.5], [1])
    with pytest.raises(ValueError, match="outcomes"):
        scoring.log_loss([0.5], [2])
    with pytest.raises(ValueError, match="no forecasts"):
        scoring.accuracy([], [])


def test_ece_band_holds_a_calibrated_forecaster_most_of_the_time():
    rng = np.random.default_rng(7)
    p = rng.uniform(0.3, 0.7, 2000)
    band = scoring.ece_band(p, seed=1)
    inside = sum(scoring.ece_mass(p, (rng.random(p.size) < p).astype(int)) <= band for _ in range(200))
    assert 0.90 <= inside / 200 <= 0.99  # the 95th percentile: ~95% inside
    # a forecaster 5 points too bullish is outside it
    y = (rng.random(p.size) < p - 0.05).astype(int)
    assert scoring.ece_mass(p, y) > band
    # deterministic for a seed
    assert scoring.ece_band(p, seed=1) == band


def test_ece_band_shrinks_with_more_outcomes():
    # the noise floor of SPEC section 4: ~2.2% at 5,000 outcomes, ~1.1% at 20,000 (15 equal-mass bins)
    rng = np.random.default_rng(3)
    med5 = np.median(scoring.calibrated_eces(rng.uniform(0.35, 0.65, 5000), draws=100))
    med20 = np.median(scoring.calibrated_eces(rng.uniform(0.35, 0.65, 20000), draws=100))
    assert 0.015 < med5 < 0.03 and 0.007 < med20 < 0.015


def test_ece_ok_rule():
    assert scoring.ece_ok(0.019, band=0.0, n=20_000)  # >= 20,000 outcomes: under 2%
    assert not scoring.ece_ok(0.021, band=0.05, n=20_000)
    assert scoring.ece_ok(0.03, band=0.031, n=5000)  # fewer: within the band
    assert not scoring.ece_ok(0.03, band=0.029, n=5000)


def test_block_bootstrap_ci_contains_the_true_mean():
    # d = 0.01 + AR(1) noise (phi 0.5): the true mean difference is 0.01
    rng = np.random.default_rng(11)
    e = rng.standard_normal(5000)
    noise = np.empty_like(e)
    noise[0] = e[0]
    for t in range(1, e.size):
        noise[t] = 0.5 * noise[t - 1] + e[t]
    d = 0.01 + 0.05 * noise
    mean, lo, hi = scoring.block_bootstrap_ci(d, seed=0)
    assert mean == pytest.approx(d.mean())
    assert lo < 0.01 < hi and lo < mean < hi
    # a constant difference has a degenerate interval
    assert scoring.block_bootstrap_ci([0.3] * 50) == pytest.approx((0.3, 0.3, 0.3))
    # seeded
    assert scoring.block_bootstrap_ci(d, seed=0) == (mean, lo, hi)


def test_block_bootstrap_interval_is_wider_for_dependent_data():
    # the same values, once in runs of 50 (serially dependent), once shuffled: the blocks see the runs
    rng = np.random.default_rng(5)
    runs = np.repeat(rng.standard_normal(100), 50)
    shuffled = rng.permutation(runs)
    _, lo_r, hi_r = scoring.block_bootstrap_ci(runs, block=50)
    _, lo_s, hi_s = scoring.block_bootstrap_ci(shuffled, block=50)
    assert hi_r - lo_r > 3 * (hi_s - lo_s)


def test_newey_west_and_dm_by_hand():
    # d = 1, 2, 3, 4 with lag 1: e = -1.5, -0.5, 0.5, 1.5
    # gamma_0 = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    # gamma_1 = (0.75 - 0.25 + 0.75) / 4 = 0.3125, Bartlett weight 1 - 1/2 = 0.5
    # long-run variance = 1.25 + 2 * 0.5 * 0.3125 = 1.5625; statistic = 2.5 / sqrt(1.5625 / 4) = 4
    d = [1.0, 2.0, 3.0, 4.0]
    assert scoring.newey_west_var(d, lag=1) == pytest.approx(1.5625)
    stat, p = scoring.diebold_mariano(d, lag=1)
    assert stat == pytest.approx(4.0)
    assert p == pytest.approx(math.erfc(4.0 / math.sqrt(2.0)))  # 6.3e-5
    assert scoring.default_lag(27) == 3 and scoring.default_lag(20_000) == 27
    assert scoring.default_block(20_000) == 28


def test_dm_small_for_a_clearly_better_method_large_for_identical_ones():
    rng = np.random.default_rng(2)
    base = rng.exponential(0.69, 3000)
    better = base - 0.05 + 0.02 * rng.standard_normal(3000)
    c = scoring.compare(better, base)
    assert c["mean_diff"] < 0 and c["ci_high"] < 0 and c["dm_p"] < 1e-6
    same = scoring.compare(base, base)
    assert (same["mean_diff"], same["dm_stat"], same["dm_p"]) == (0.0, 0.0, 1.0)


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    e = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = e[0]
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return x


def test_dm_rejects_a_true_null_about_5_percent_of_the_time():
    # 200 series of 1000 differences with mean 0: p < 0.05 in ~5% of them (iid), and the HAC
    # variance keeps it near 5% for serially dependent differences too (AR(1), phi 0.5)
    rng = np.random.default_rng(0)
    iid = np.mean([scoring.diebold_mariano(rng.standard_normal(1000))[1] < 0.05 for _ in range(200)])
    ar = np.mean([scoring.diebold_mariano(_ar1(rng, 1000, 0.5))[1] < 0.05 for _ in range(200)])
    assert 0.02 <= iid <= 0.09
    assert ar <= 0.13


def test_edge_captured():
    assert scoring.edge_captured(0.69, 0.68, 0.67) == pytest.approx(0.5)  # half the best baseline's edge
    assert scoring.edge_captured(0.69, 0.70, 0.67) == pytest.approx(-0.5)  # worse than the average
    assert scoring.edge_captured(0.69, 0.68, 0.69) is None  # no baseline beats the average
    assert scoring.edge_captured(0.69, 0.68, 0.70) is None


def test_rolling_score_equals_batch_metrics_on_its_window():
    rng = np.random.default_rng(4)
    p = np.round(rng.uniform(0, 1, 1000), 2)  # rounding makes exact ties at 0.5 and values 0, 1
    p[::97] = 0.5
    y = (rng.random(1000) < p).astype(int)
    r = RollingScore(window=150)
    for t in range(1000):
        r.update(float(p[t]), int(y[t]))
        if t in (0, 10, 149, 150, 151, 499, 999):
            lo = max(0, t + 1 - 150)
            pw, yw = p[lo:t + 1], y[lo:t + 1]
            s = r.snapshot()
            assert s["n"] == t + 1 - lo and s["total"] == t + 1
            assert s["accuracy"] == pytest.approx(scoring.accuracy(pw, yw), abs=1e-12)
            assert s["log_loss"] == pytest.approx(scoring.log_loss(pw, yw), abs=1e-9)
            assert s["brier"] == pytest.approx(scoring.brier(pw, yw), abs=1e-12)
            assert s["ece"] == pytest.approx(scoring.ece_width(pw, yw), abs=1e-12)


def test_rolling_score_state_round_trips_through_json():
    r = RollingScore(window=5)
    for p, y in [(0.7, 1), (0.2, 0), (0.5, 1), (0.9, 0), (0.6, 1), (0.3, 1)]:
        r.update(p, y)
    s = json.loads(json.dumps(r.state()))
    r2 = RollingScore.from_state(s)
    assert r2.snapshot() == r.snapshot()
    r.update(0.8, 1)
    r2.update(0.8, 1)
    assert r2.snapshot() == r.snapshot()
    # into another window: the newest outcomes, sums recomputed
    r3 = RollingScore(window=2)
    r3.load(s)
    assert r3.snapshot()["n"] == 2 and r3.snapshot()["total"] == 6
    assert r3.snapshot()["brier"] == pytest.approx(((0.6 - 1) ** 2 + (0.3 - 1) ** 2) / 2)


def test_rolling_score_empty_and_bad_input():
    r = RollingScore(window=3)
    assert r.snapshot() == {"n": 0, "total": 0, "accuracy": None, "log_loss": None, "brier": None, "ece": None}
    with pytest.raises(ValueError):
        r.update(float("nan"), 1)
    with pytest.raises(ValueError):
        r.update(0.5, 2)
    with pytest.raises(ValueError):
        RollingScore(window=0)


def test_summary_has_every_metric():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.4, 0.6, 500)
    y = (rng.random(500) < p).astype(int)
    s = scoring.summary(p, y, band_draws=50)
    assert set(s) == {"n", "log_loss", "accuracy", "brier", "ece_width", "ece_mass", "ece_band95", "ece_ok"}
    assert s["ece_mass"] == scoring.ece_mass(p, y) and s["n"] == 500
