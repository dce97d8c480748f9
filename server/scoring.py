"""Scoring rules for probability forecasts of UP, and tests for comparing two forecasters.

Every function takes `p`, the forecast probability that the candle closes UP, and `y`, the outcome
(1 = UP, 0 = DOWN), as array-likes of the same length; numpy only (no scipy, no torch).

    >>> p, y = [0.9, 0.6, 0.5, 0.2], [1, 0, 1, 0]
    >>> accuracy(p, y)            # 0.9 right, 0.6 wrong, 0.5 a tie (half), 0.2 right: 2.5 / 4
    0.625
    >>> round(brier(p, y), 4)     # (0.01 + 0.36 + 0.25 + 0.04) / 4
    0.165

Conventions, decided once here:

- accuracy: a forecast of exactly 0.5 says nothing, so it counts half (as a coin flip would, in
  expectation); p > 0.5 calls UP, p < 0.5 calls DOWN.
- log loss: natural log, p clipped to [1e-12, 1 - 1e-12] (a forecast of exactly 0 or 1 that is wrong
  costs 27.6 nats instead of infinity).
- ECE (expected calibration error), 15 bins either way:
  equal width: bin b holds p in [b/15, (b+1)/15), the last bin also holds p = 1;
  equal mass: the forecasts sorted by p (a stable sort, so ties keep their order in time) and cut
  into 15 contiguous groups whose sizes differ by at most one (as numpy.array_split does); equal
  forecasts may land in different bins, and with fewer than 15 forecasts each is its own bin;
  ECE = sum over the non-empty bins of (n_b / n) * |mean(y_b) - mean(p_b)|.
- the calibrated band (`ece_band`): ECE has a noise floor. A perfectly calibrated forecaster that
  made the same forecasts p would see outcomes y* ~ Bernoulli(p); the band is the 95th percentile of
  its equal-mass ECE over B = 200 such draws (seeded). SPEC section 4: ECE under 2% on at least
  20,000 scored outcomes; on fewer, no larger than this band (`ece_ok`).
- comparisons (`compare`) are on per-step log losses, d_t = loss_a,t - loss_b,t (negative: a is
  better). The 95% confidence interval of mean(d) is a moving-block bootstrap (blocks of
  ceil(n^(1/3)) consecutive steps, B = 500, percentile interval), so that serial dependence (a
  regime that favours one method for a while) widens it as it should. The Diebold-Mariano test
  divides mean(d) by its Newey-West (Bartlett kernel) standard error with lag floor(n^(1/3)), and
  takes a two-sided p-value from the normal distribution.
- edge captured = (logloss_avg - logloss_method) / (logloss_avg - logloss_best_baseline): 1 is as
  good as the best baseline, 0 as the plain average, negative worse than it. When no baseline beats
  the average (denominator <= 0) there is no edge to capture: None ("n/a").

`RollingScore` is the online counterpart for the service: accuracy, log loss, Brier and an
equal-width ECE over the last `window` outcomes, O(1) per outcome, pure Python.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Mapping, Sequence

import numpy as np

EPS = 1e-12  # log loss clips p to [EPS, 1 - EPS]
N_BINS = 15
BAND_DRAWS = 200  # draws of the calibrated forecaster behind ece_band
BAND_LEVEL = 0.95
BOOT_DRAWS = 500  # block-bootstrap resamples behind compare()'s confidence interval
CI_LEVEL = 0.95


def _arrays(p: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"p and y differ in length: {p.size} != {y.size}")
    if p.size == 0:
        raise ValueError("no forecasts to score")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p must hold probabilities in [0, 1]")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y must hold outcomes 0 (DOWN) or 1 (UP)")
    return p, y


# ---------------------------------------------------------------------------------- per step
def correct_per_step(p: Any, y: Any) -> np.ndarray:
    """1 for a right call, 0 for a wrong one, 0.5 for p == 0.5 (a tie counts half)."""
    p, y = _arrays(p, y)
    hit = np.where(y == 1.0, p > 0.5, p < 0.5).astype(np.float64)
    hit[p == 0.5] = 0.5
    return hit


def log_loss_per_step(p: Any, y: Any) -> np.ndarray:
    """-ln of the probability given to what happened, p clipped to [1e-12, 1 - 1e-12]."""
    p, y = _arrays(p, y)
    q = np.clip(p, EPS, 1.0 - EPS)
    return -np.where(y == 1.0, np.log(q), np.log1p(-q))


def brier_per_step(p: Any, y: Any) -> np.ndarray:
    p, y = _arrays(p, y)
    return (p - y) ** 2


# ---------------------------------------------------------------------------------- metrics
def accuracy(p: Any, y: Any) -> float:
    """Share of right calls (p > 0.5 calls UP); p == 0.5 counts half."""
    return float(correct_per_step(p, y).mean())


def log_loss(p: Any, y: Any) -> float:
    """Mean negative log-likelihood, natural log (ln 2 = 0.6931 for a coin flip)."""
    return float(log_loss_per_step(p, y).mean())


def brier(p: Any, y: Any) -> float:
    """Mean squared error of the probability (0.25 for a coin flip)."""
    return float(brier_per_step(p, y).mean())


def _ece(p: np.ndarray, y: np.ndarray, bins: np.ndarray, n_bins: int) -> float:
    sp = np.bincount(bins, weights=p, minlength=n_bins)
    sy = np.bincount(bins, weights=y, minlength=n_bins)
    # sum_b (n_b/n) |sy_b/n_b - sp_b/n_b| = sum_b |sy_b - sp_b| / n; empty bins add 0
    return float(np.abs(sy - sp).sum() / p.size)


def width_bins(p: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Equal-width bin of each forecast: floor(p * n_bins), p = 1 in the last bin."""
    return np.minimum((np.asarray(p) * n_bins).astype(np.int64), n_bins - 1)


def mass_bins(p: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Equal-mass bin of each forecast: rank by p (stable sort), cut into n_bins contiguous groups
    whose sizes differ by at most one (the first n % n_bins groups hold one more)."""
    p = np.asarray(p)
    order = np.argsort(p, kind="stable")
    sizes = np.full(n_bins, p.size // n_bins)
    sizes[: p.size % n_bins] += 1
    bins = np.empty(p.size, dtype=np.int64)
    bins[order] = np.repeat(np.arange(n_bins), sizes)
    return bins


def ece_width(p: Any, y: Any, n_bins: int = N_BINS) -> float:
    """ECE over n_bins equal-width bins of p."""
    p, y = _arrays(p, y)
    return _ece(p, y, width_bins(p, n_bins), n_bins)


def ece_mass(p: Any, y: Any, n_bins: int = N_BINS) -> float:
    """ECE over n_bins equal-mass bins (quantiles of p)."""
    p, y = _arrays(p, y)
    return _ece(p, y, mass_bins(p, n_bins), n_bins)


def ece_band(p: Any, *, n_bins: int = N_BINS, draws: int = BAND_DRAWS, level: float = BAND_LEVEL,
             seed: int = 0) -> float:
    """The `level` quantile of the equal-mass ECE of a calibrated forecaster making the forecasts
    p: outcomes y* ~ Bernoulli(p) drawn `draws` times (numpy Generator seeded with `seed`)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("no forecasts to score")
    return float(np.quantile(calibrated_eces(p, n_bins=n_bins, draws=draws, seed=seed), level))


def calibrated_eces(p: Any, *, n_bins: int = N_BINS, draws: int = BAND_DRAWS, seed: int = 0) -> np.ndarray:
    """The equal-mass ECE of each of `draws` calibrated draws y* ~ Bernoulli(p) (see ece_band)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    order = np.argsort(p, kind="stable")
    ps = p[order]
    sizes = np.full(n_bins, p.size // n_bins)
    sizes[: p.size % n_bins] += 1
    sizes = sizes[sizes > 0]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    sp = np.add.reduceat(ps, starts)  # the forecasts' sum per bin: the same for every draw
    out = np.empty(draws)
    chunk = max(1, 2_000_000 // max(1, p.size))  # draws per batch: bounded memory
    for lo in range(0, draws, chunk):
        hi = min(draws, lo + chunk)
        ys = (rng.random((hi - lo, p.size)) < ps).astype(np.float64)
        sy = np.add.reduceat(ys, starts, axis=1)
        out[lo:hi] = np.abs(sy - sp).sum(axis=1) / p.size
    return out


def ece_ok(ece: float, band: float, n: int, *, limit: float = 0.02, min_n: int = 20_000) -> bool:
    """SPEC section 4: ECE under `limit` on at least `min_n` outcomes; on fewer, within the band."""
    return bool(ece < limit) if n >= min_n else bool(ece <= band)


def reliability(p: Any, y: Any, n_bins: int = N_BINS, *, mass: bool = False) -> dict[str, list]:
    """Per non-empty bin: mean forecast, observed frequency of UP, count (for a reliability diagram)."""
    p, y = _arrays(p, y)
    bins = mass_bins(p, n_bins) if mass else width_bins(p, n_bins)
    n = np.bincount(bins, minlength=n_bins)
    sp = np.bincount(bins, weights=p, minlength=n_bins)
    sy = np.bincount(bins, weights=y, minlength=n_bins)
    keep = n > 0
    return {"mean_p": (sp[keep] / n[keep]).tolist(), "freq_up": (sy[keep] / n[keep]).tolist(),
            "count": n[keep].tolist()}


# ---------------------------------------------------------------------------------- comparisons
def default_block(n: int) -> int:
    """Block length of the moving-block bootstrap: ceil(n^(1/3)) (28 at n = 20,000)."""
    return max(1, math.ceil(n ** (1.0 / 3.0)))


def default_lag(n: int) -> int:
    """Newey-West truncation lag of the DM test: floor(n^(1/3)) (27 at n = 20,000)."""
    return max(0, int(math.floor(n ** (1.0 / 3.0) + 1e-9)))


def block_bootstrap_ci(d: Any, *, block: int | None = None, draws: int = BOOT_DRAWS, level: float = CI_LEVEL,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): mean(d) and its `level` percentile interval by the moving-block bootstrap.

    Each resample concatenates ceil(n / block) blocks of `block` consecutive values, their starts
    drawn uniformly from [0, n - block] (numpy Generator seeded with `seed`)."""
    d = np.asarray(d, dtype=np.float64).ravel()
    n = d.size
    if n == 0:
        raise ValueError("no values")
    block = min(n, block or default_block(n))
    k = math.ceil(n / block)
    cs = np.concatenate(([0.0], np.cumsum(d)))
    block_sums = cs[block:] - cs[:-block]  # block_sums[s] = d[s] + ... + d[s + block - 1]
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - block + 1, size=(draws, k))
    means = block_sums[starts].sum(axis=1) / (k * block)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(d.mean()), float(lo), float(hi)


def newey_west_var(d: Any, lag: int | None = None) -> float:
    """Long-run variance of d: gamma_0 + 2 sum_{k=1..lag} (1 - k / (lag + 1)) gamma_k (Bartlett)."""
    d = np.asarray(d, dtype=np.float64).ravel()
    n = d.size
    lag = default_lag(n) if lag is None else lag
    e = d - d.mean()
    v = float(e @ e) / n
    for k in range(1, min(lag, n - 1) + 1):
        v += 2.0 * (1.0 - k / (lag + 1.0)) * float(e[k:] @ e[:-k]) / n
    return v


def diebold_mariano(d: Any, lag: int | None = None) -> tuple[float, float]:
    """(statistic, two-sided p-value) of H0: E[d] = 0, d the per-step loss differences.

    statistic = mean(d) / sqrt(newey_west_var(d, lag) / n), p = erfc(|statistic| / sqrt 2).
    Identical losses (d all 0) give (0, 1); a constant non-zero d gives (+-inf, 0)."""
    d = np.asarray(d, dtype=np.float64).ravel()
    n = d.size
    if n == 0:
        raise ValueError("no values")
    m = float(d.mean())
    v = newey_west_var(d, lag)
    if v <= 1e-300:
        if abs(m) <= 1e-300:
            return 0.0, 1.0
        return math.copysign(math.inf, m), 0.0
    stat = m / math.sqrt(v / n)
    return stat, math.erfc(abs(stat) / math.sqrt(2.0))


def compare(loss_a: Any, loss_b: Any, *, block: int | None = None, lag: int | None = None,
            draws: int = BOOT_DRAWS, seed: int = 0) -> dict[str, Any]:
    """Per-step losses of a and b (same steps): the mean difference a - b (negative: a better), its
    block-bootstrap confidence interval, and the Diebold-Mariano statistic and p-value."""
    a = np.asarray(loss_a, dtype=np.float64).ravel()
    b = np.asarray(loss_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"loss series differ in length: {a.size} != {b.size}")
    d = a - b
    mean, lo, hi = block_bootstrap_ci(d, block=block, draws=draws, seed=seed)
    stat, pval = diebold_mariano(d, lag)
    return {"mean_diff": mean, "ci_low": lo, "ci_high": hi, "dm_stat": stat, "dm_p": pval,
            "block": min(d.size, block or default_block(d.size)),
            "lag": default_lag(d.size) if lag is None else lag}


def edge_captured(ll_avg: float, ll_method: float, ll_best: float) -> float | None:
    """(ll_avg - ll_method) / (ll_avg - ll_best); None when no baseline beats the average."""
    den = ll_avg - ll_best
    if not den > 0.0:
        return None
    return (ll_avg - ll_method) / den


# ---------------------------------------------------------------------------------- rolling
class RollingScore:
    """Accuracy, log loss, Brier and equal-width ECE over the last `window` outcomes.

    O(1) per update: running sums over a deque, with a full re-summation every `window` updates
    (amortized O(1)) so that floating-point drift never builds up. Pure Python: no numpy per call.
    The conventions are scoring's (ties count half, p clipped to [1e-12, 1 - 1e-12] in the log).

    >>> r = RollingScore(window=2)
    >>> r.update(0.8, 1); r.update(0.4, 1); r.update(0.5, 0)
    >>> s = r.snapshot()
    >>> s["n"], s["accuracy"], round(s["brier"], 3)    # the last two: (0.4, 1) wrong, (0.5, 0) a tie
    (2, 0.25, 0.305)
    """

    def __init__(self, window: int, n_bins: int = N_BINS):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
        self.window = window
        self.n_bins = n_bins
        self.total = 0  # outcomes ever seen
        self._items: deque[tuple[float, int]] = deque()
        self._resum()

    @staticmethod
    def _terms(p: float, y: int) -> tuple[float, float, float]:
        q = min(max(p, EPS), 1.0 - EPS)
        ll = -math.log(q) if y else -math.log1p(-q)
        hit = 0.5 if p == 0.5 else float((p > 0.5) == bool(y))
        return hit, ll, (p - y) ** 2

    def _bin(self, p: float) -> int:
        return min(int(p * self.n_bins), self.n_bins - 1)

    def _resum(self) -> None:
        self._hits = self._ll = self._br = 0.0
        self._bn = [0] * self.n_bins
        self._bp = [0.0] * self.n_bins
        self._by = [0.0] * self.n_bins
        for p, y in self._items:
            self._add(p, y, 1)
        self._since_resum = 0

    def _add(self, p: float, y: int, sign: int) -> None:
        hit, ll, br = self._terms(p, y)
        self._hits += sign * hit
        self._ll += sign * ll
        self._br += sign * br
        b = self._bin(p)
        self._bn[b] += sign
        self._bp[b] += sign * p
        self._by[b] += sign * y

    def update(self, p: float, y: int) -> None:
        """Score forecast `p` (of UP) against outcome `y` (1 = UP, 0 = DOWN)."""
        p = float(p)
        if not 0.0 <= p <= 1.0:  # also refuses NaN
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        if y not in (0, 1):
            raise ValueError(f"y must be 0 or 1, got {y!r}")
        y = int(y)
        self._items.append((p, y))
        self._add(p, y, 1)
        if len(self._items) > self.window:
            self._add(*self._items.popleft(), -1)
        self.total += 1
        self._since_resum += 1
        if self._since_resum >= self.window:
            self._resum()

    def __len__(self) -> int:
        return len(self._items)

    def snapshot(self) -> dict[str, Any]:
        """{"n", "total", "accuracy", "log_loss", "brier", "ece"} over the window; None when empty."""
        n = len(self._items)
        if n == 0:
            return {"n": 0, "total": self.total, "accuracy": None, "log_loss": None, "brier": None, "ece": None}
        ece = sum(abs(self._by[b] - self._bp[b]) for b in range(self.n_bins) if self._bn[b] > 0) / n
        return {"n": n, "total": self.total, "accuracy": self._hits / n, "log_loss": self._ll / n,
                "brier": self._br / n, "ece": ece}

    def state(self) -> dict[str, Any]:
        """JSON-able state (the window's outcomes and the running sums); `load()` restores it
        exactly: the same snapshots, now and after the same further updates."""
        return {"window": self.window, "n_bins": self.n_bins, "total": self.total,
                "items": [[p, y] for p, y in self._items],
                "sums": {"hits": self._hits, "log_loss": self._ll, "brier": self._br, "bin_n": list(self._bn),
                         "bin_p": list(self._bp), "bin_y": list(self._by), "since_resum": self._since_resum}}

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore a `state()`. Without its "sums" (or with another window or bin count) the sums
        are recomputed from the outcomes, equal to the saved ones up to rounding."""
        items = [(float(p), int(y)) for p, y in state["items"]]
        window = int(state.get("window", self.window))
        n_bins = int(state.get("n_bins", self.n_bins))
        same = window == self.window and n_bins == self.n_bins
        self._items = deque(items[-self.window:])
        self.total = int(state.get("total", len(items)))
        sums = state.get("sums")
        if same and sums is not None and len(items) <= self.window:
            self._hits, self._ll, self._br = float(sums["hits"]), float(sums["log_loss"]), float(sums["brier"])
            self._bn = [int(v) for v in sums["bin_n"]]
            self._bp = [float(v) for v in sums["bin_p"]]
            self._by = [float(v) for v in sums["bin_y"]]
            self._since_resum = int(sums["since_resum"])
        else:
            self._resum()

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "RollingScore":
        r = cls(int(state["window"]), int(state.get("n_bins", N_BINS)))
        r.load(state)  # the same window and bins: restored exactly
        return r


def summary(p: Sequence[float] | np.ndarray, y: Sequence[int] | np.ndarray, *, band_draws: int = BAND_DRAWS,
            seed: int = 0) -> dict[str, Any]:
    """Every metric of one forecaster: log loss, accuracy, Brier, both ECEs, the band, ece_ok."""
    p, y = _arrays(p, y)
    e_mass = ece_mass(p, y)
    band = ece_band(p, draws=band_draws, seed=seed)
    return {"n": int(p.size), "log_loss": log_loss(p, y), "accuracy": accuracy(p, y), "brier": brier(p, y),
            "ece_width": ece_width(p, y), "ece_mass": e_mass, "ece_band95": band,
            "ece_ok": ece_ok(e_mass, band, int(p.size))}
