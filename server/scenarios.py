"""Seeded streams of events to evaluate fusers on: synthetic pools of experts, and real BTC candles.

A `Stream` holds, per step t: the experts' prob_up (`probs`, shape (T, 4), experts "e0".."e3"), the
market features (`features`, name -> (T,) array), the outcome `y` (1 = UP) and, for the synthetic
ones, the true probability of UP `p_true` (so the oracle's log loss is known). `stream.events()`
yields `(probs, features, y)` one step at a time, as a fuser sees them.

    >>> s = make_stream("stable", seed=1, n_events=1000)
    >>> s.probs.shape, sorted(s.features), s.y.shape, s.p_true.shape
    ((1000, 4), ['mom', 'vol'], (1000,), (1000,))

The synthetic world (every scenario, numpy Generator seeded by (seed, scenario name)):

- the true logit is s_t ~ N(0, sigma^2), p_true = sigmoid(s_t), y_t ~ Bernoulli(p_true).
  sigma = 0.55 puts the accuracy ceiling (the oracle's) near 60.5%; the weak-signal variants
  ("<name>_weak") use sigma = 0.125: a ceiling near 52.5% and an oracle log loss only 0.002 nats
  below ln 2, as on real one-minute candles.
- expert i sees s_t through noise: s^_it = s_t + r_it sigma e_it, where r_it is its noise-to-signal
  ratio (its skill: lower is better) and e_it = sqrt(0.25) c_t + sqrt(0.75) u_it mixes a noise
  common to all experts (they read the same market) with its own. It reports the logit
  m_i k_i s^_it + b_i sigma: k_i = 1 / (1 + r_i^2) is the shrinkage that would make it calibrated
  at its nominal skill r_i, m_i a miscalibration (> 1 overconfident) and b_i a bias. An expert whose
  skill changes keeps its nominal k_i (it does not know), so it is then miscalibrated too.
- features: `vol`, a slow log-normal volatility (log-vol an AR(1) with phi = 0.995, around 1%), and
  `mom`, an AR(1) (phi = 0.9) that carries no information. Only `volatility` uses `vol`.

Scenarios (experts e0..e3; r = noise-to-signal, m = miscalibration, b = bias):

| name | what | the plain average's trouble |
|---|---|---|
| stable | r = 0.8, 1.2, 1.8, 2.5; m = 1.4, 0.7, 1.8, 1.0; b = 0, 0.1, -0.1, 0.05 | equal weights on unequal skill |
| switching | the best expert (r 0.7, others 3.0) rotates e0, e1, e2, e3, e0, ... every 3000 steps | yesterday's best is today's worst |
| clones | e0-e2 clones of one mediocre expert (r 1.8, m 1.5, own jitter r 0.2), e3 good (r 0.8) | 3/4 of the weight on one opinion |
| broken_inverted | e0 constant 0.5, e1 = 1 - a skilled forecast (r 1.0), e2, e3 skilled (r 1.0, 1.4) | e1 cancels e2, e0 dilutes |
| volatility | e0 good in high vol (r 0.6) and bad in low (3.0), e1 the reverse; e2, e3 r 1.8, 2.2 | the right expert depends on `vol` |

`btc` (`btc_stream`): experts computed from the 15-minute BTC-USD candles in data/ (8,686 candles
from its 8,721 rows, read_candles; 8,635 events after a 50-candle indicator warm-up and the last
candle, which has no outcome). At
step t every expert and feature uses candles 0..t only; y_t = 1 if candle t+1 closes above candle
t's close. No look-ahead: tests/test_scenarios.py changes future candles and checks the past is
unchanged.
"""
from __future__ import annotations

import csv
import datetime
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .baselines import OnlineLogistic

N_EXPERTS = 4
EXPERT_NAMES = tuple(f"e{i}" for i in range(N_EXPERTS))
SIGMA_STRONG = 0.55  # accuracy ceiling ~60.5%
SIGMA_WEAK = 0.125  # accuracy ceiling ~52.5%
COMMON_NOISE = 0.25  # share of each expert's noise variance common to all experts
SWITCH_PERIOD = 3000
DEFAULT_EVENTS = 20_000
BASE_SCENARIOS = ("stable", "switching", "clones", "broken_inverted", "volatility")
SCENARIOS = BASE_SCENARIOS + tuple(f"{s}_weak" for s in BASE_SCENARIOS) + ("btc",)
DATA_FILE = "BTC-USD-15-MIN.csv"
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / DATA_FILE
BTC_WARMUP = 50  # candles before the first event: the indicators' warm-up


@dataclass(frozen=True, eq=False)
class Stream:
    name: str
    seed: int
    probs: np.ndarray  # (T, n_experts) prob_up of each expert
    features: dict[str, np.ndarray]  # name -> (T,)
    y: np.ndarray  # (T,) int: 1 = UP, 0 = DOWN
    p_true: np.ndarray | None  # (T,) true probability of UP; None for real data
    expert_names: tuple[str, ...] = EXPERT_NAMES
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_experts(self) -> int:
        return int(self.probs.shape[1])

    def events(self) -> Iterator[tuple[list[float], dict[str, float], int]]:
        """(probs, features, y) per step, in time order, as plain Python values."""
        names = sorted(self.features)
        cols = [self.features[k].tolist() for k in names]
        probs = self.probs.tolist()
        ys = self.y.tolist()
        for t in range(len(ys)):
            yield probs[t], {k: c[t] for k, c in zip(names, cols)}, int(ys[t])

    def head(self, n: int) -> "Stream":
        """The first n events."""
        return Stream(self.name, self.seed, self.probs[:n], {k: v[:n] for k, v in self.features.items()},
                      self.y[:n], None if self.p_true is None else self.p_true[:n], self.expert_names,
                      self.description, dict(self.meta))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """A stationary AR(1) with unit variance."""
    e = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = e[0]
    s = math.sqrt(1.0 - phi * phi)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + s * e[t]
    return x


def _expert(s: np.ndarray, noise: np.ndarray, sigma: float, r: np.ndarray | float, *, r_nominal: float,
            m: float = 1.0, b: float = 0.0) -> np.ndarray:
    """prob_up of an expert: logit m k (s + r sigma noise) + b sigma, k = 1 / (1 + r_nominal^2)."""
    k = 1.0 / (1.0 + r_nominal * r_nominal)
    return _sigmoid(m * k * (s + np.asarray(r) * sigma * noise) + b * sigma)


def synthetic_stream(name: str, seed: int, n_events: int = DEFAULT_EVENTS) -> Stream:
    """One of the synthetic scenarios (see the module docstring); "<name>_weak" for a weak signal."""
    base, weak = (name[:-5], True) if name.endswith("_weak") else (name, False)
    if base not in BASE_SCENARIOS:
        raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    if n_events < 1:
        raise ValueError(f"n_events must be >= 1, got {n_events}")
    n = n_events
    sigma = SIGMA_WEAK if weak else SIGMA_STRONG
    rng = _rng(seed, name)
    s = sigma * rng.standard_normal(n)
    p_true = _sigmoid(s)
    y = (rng.random(n) < p_true).astype(np.int64)
    common = rng.standard_normal(n)
    own = rng.standard_normal((N_EXPERTS, n))
    noise = math.sqrt(COMMON_NOISE) * common + math.sqrt(1.0 - COMMON_NOISE) * own  # (4, T)
    log_vol = _ar1(rng, n, 0.995)
    vol = 0.01 * np.exp(0.5 * log_vol)
    mom = _ar1(rng, n, 0.9)
    meta: dict[str, Any] = {"sigma": sigma, "weak": weak}

    if base == "stable":
        r, m, b = (0.8, 1.2, 1.8, 2.5), (1.4, 0.7, 1.8, 1.0), (0.0, 0.1, -0.1, 0.05)
        probs = [_expert(s, noise[i], sigma, r[i], r_nominal=r[i], m=m[i], b=b[i]) for i in range(4)]
        desc = "stable skill differences: noise-to-signal 0.8, 1.2, 1.8, 2.5; miscalibrated"
    elif base == "switching":
        best = (np.arange(n) // SWITCH_PERIOD) % N_EXPERTS
        m = (1.3, 0.8, 1.5, 1.0)
        probs = [_expert(s, noise[i], sigma, np.where(best == i, 0.7, 3.0), r_nominal=1.5, m=m[i])
                 for i in range(4)]
        meta["period"] = SWITCH_PERIOD
        desc = f"the best expert (r 0.7, others 3.0) rotates every {SWITCH_PERIOD} steps"
    elif base == "clones":
        shared = noise[0]
        clones = [_expert(s, shared + 0.2 / 1.8 * own[i + 1], sigma, 1.8, r_nominal=1.8, m=1.5) for i in range(3)]
        probs = clones + [_expert(s, noise[3], sigma, 0.8, r_nominal=0.8, m=1.0)]
        desc = "three clones of one mediocre expert (r 1.8) and one good expert (r 0.8)"
    elif base == "broken_inverted":
        probs = [np.full(n, 0.5),
                 1.0 - _expert(s, noise[1], sigma, 1.0, r_nominal=1.0, m=1.2),
                 _expert(s, noise[2], sigma, 1.0, r_nominal=1.0, m=1.3),
                 _expert(s, noise[3], sigma, 1.4, r_nominal=1.4, m=0.8)]
        desc = "e0 constant 0.5, e1 inverted skilled, e2 and e3 skilled"
    else:  # volatility
        high = _sigmoid(2.0 * log_vol)  # 0..1: how high the volatility is
        probs = [_expert(s, noise[0], sigma, 0.6 + 2.4 * (1.0 - high), r_nominal=1.8, m=1.2),
                 _expert(s, noise[1], sigma, 0.6 + 2.4 * high, r_nominal=1.8, m=1.2),
                 _expert(s, noise[2], sigma, 1.8, r_nominal=1.8, m=1.0),
                 _expert(s, noise[3], sigma, 2.2, r_nominal=2.2, m=1.4)]
        desc = "e0 good in high volatility, e1 in low (feature vol); e2, e3 constant"
    if weak:
        desc += "; weak signal (accuracy ceiling ~52.5%)"
    return Stream(name, seed, np.stack(probs, axis=1), {"vol": vol, "mom": mom}, y, p_true,
                  EXPERT_NAMES, desc, meta)


# ---------------------------------------------------------------------------------- BTC candles
def read_candles(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """close and volume of data/BTC-USD-15-MIN.csv (or `path`), one row per candle in time order.

    The timestamps (`Datetime` or `Date`, with UTC offsets) are read, because the file is not clean:
    it has three snapshots taken inside a candle (timestamps with seconds, such as 2021-10-27
    14:46:02+01:00, and its last row), and after that one, 32 candles again that it already had
    (2021-10-27 06:00-13:45 UTC once more, written with +00:00 instead of +01:00). A candle that
    comes again replaces the earlier copy (the later download: the same closes here), snapshots and
    rows without a price are dropped, and the rest is put in time order: 8,686 candles from the
    8,721 rows. `dropped` counts what went."""
    path = Path(path) if path is not None else DEFAULT_DATA
    if not path.exists():
        raise FileNotFoundError(f"{path}: no candle file; pass --data PATH (the repository's data/{DATA_FILE})")
    candles: dict[float, tuple[float, float]] = {}
    rows = dropped = 0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows += 1
            stamp = datetime.datetime.fromisoformat(row.get("Datetime") or row["Date"])
            try:
                close, volume = float(row["Close"]), float(row["Volume"])
            except (TypeError, ValueError):  # "null" in a row without trading data
                dropped += 1
                continue
            if stamp.second or stamp.microsecond or not (math.isfinite(close) and close > 0):
                dropped += 1  # a snapshot inside a candle, not a candle
                continue
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=datetime.timezone.utc)
            key = stamp.timestamp()
            dropped += key in candles
            candles[key] = (close, volume)
    times = sorted(candles)
    return {"close": np.array([candles[t][0] for t in times]), "volume": np.array([candles[t][1] for t in times]),
            "time": np.array(times), "rows": rows, "dropped": dropped}


def _ema(x: np.ndarray, span: int) -> np.ndarray:
    a = 2.0 / (span + 1.0)
    out = np.empty_like(x)
    out[0] = x[0]
    for t in range(1, x.size):
        out[t] = out[t - 1] + a * (x[t] - out[t - 1])
    return out


def _rolling_mean(x: np.ndarray, w: int) -> np.ndarray:
    """Mean of x[t-w+1 .. t] (fewer at the start): causal."""
    cs = np.concatenate(([0.0], np.cumsum(x)))
    t = np.arange(1, x.size + 1)
    lo = np.maximum(0, t - w)
    return (cs[t] - cs[lo]) / (t - lo)


def _rolling_std(x: np.ndarray, w: int) -> np.ndarray:
    m = _rolling_mean(x, w)
    m2 = _rolling_mean(x * x, w)
    return np.sqrt(np.maximum(m2 - m * m, 0.0))


def _rsi(close: np.ndarray, n: int = 14) -> np.ndarray:
    """Wilder's RSI(n), causal; 50 until the first move."""
    d = np.diff(close, prepend=close[0])
    up, down = np.maximum(d, 0.0), np.maximum(-d, 0.0)
    au = ad = 0.0
    out = np.empty_like(close)
    for t in range(close.size):
        au += (up[t] - au) / n
        ad += (down[t] - ad) / n
        out[t] = 50.0 if au + ad == 0 else 100.0 * au / (au + ad)
    return out


def btc_from_candles(close: np.ndarray, volume: np.ndarray, *, warmup: int = BTC_WARMUP,
                     name: str = "btc", seed: int = 0) -> Stream:
    """Four experts and five features from candles; event t (candle index warmup + t) uses candles
    up to its own, its outcome is whether the next candle closes higher.

    Experts (each a logistic of a score, scaled so most forecasts fall in 0.4-0.6):
    - e0 trend: EMA(8) - EMA(21) of the close, over close x rolling std of returns (32): follows it;
    - e1 oscillator: RSI(14) mean reversion, sigmoid(-(rsi - 50) / 50);
    - e2 volume: a volume surge (log-volume z-score over 32 candles, above 0) times the sign of the
      candle's return: a surge confirms the move;
    - e3 ML: online logistic regression (OnlineLogistic, no forgetting) on the last four returns
      over the rolling volatility, fitted prequentially: at candle t it first learns candle t-1's
      inputs with its now-known outcome (did candle t close higher), then predicts.
    Features: ret_1 (log return of the candle), ret_4 (of the last four), vol (rolling std of log
    returns, 32), rsi, volume_z (log-volume z-score, 32).
    """
    close = np.asarray(close, dtype=np.float64)
    volume = np.asarray(volume, dtype=np.float64)
    if close.shape != volume.shape or close.ndim != 1:
        raise ValueError("close and volume must be 1-d arrays of the same length")
    if close.size < warmup + 2:
        raise ValueError(f"need at least {warmup + 2} candles, got {close.size}")
    ret = np.diff(np.log(close), prepend=math.log(close[0]))  # ret[t]: candle t's log return
    vol = np.maximum(_rolling_std(ret, 32), 1e-6)
    ret4 = _rolling_mean(ret, 4) * 4.0
    rsi = _rsi(close)
    lv = np.log1p(volume)
    lv_sd = _rolling_std(lv, 32)
    volume_z = np.divide(lv - _rolling_mean(lv, 32), lv_sd, out=np.zeros_like(lv), where=lv_sd > 1e-9)
    spread = (_ema(close, 8) - _ema(close, 21)) / (close * vol)
    p_trend = _sigmoid(0.25 * spread)
    p_osc = _sigmoid(-(rsi - 50.0) / 50.0)
    p_volume = _sigmoid(0.2 * np.maximum(volume_z, 0.0) * np.sign(ret))
    up_next = np.zeros(close.size, dtype=np.int64)
    up_next[:-1] = close[1:] > close[:-1]  # the outcome of candle t; unknown for the last candle

    lags = np.stack([np.roll(ret, k) for k in range(4)], axis=1) / vol[:, None]
    lags[:4] = 0.0
    lags = np.clip(lags, -5.0, 5.0)
    ml = OnlineLogistic(np.zeros(5), ridge=10.0, forget=0.0)
    p_ml = np.full(close.size, 0.5)
    for t in range(1, close.size):
        x_prev = np.append(lags[t - 1], 1.0)
        ml.learn(x_prev, int(up_next[t - 1]))  # known at t: candle t closed above candle t-1?
        p_ml[t] = ml.predict(np.append(lags[t], 1.0))

    sl = slice(warmup, close.size - 1)  # the last candle has no outcome
    probs = np.stack([p_trend[sl], p_osc[sl], p_volume[sl], p_ml[sl]], axis=1)
    feats = {"ret_1": ret[sl], "ret_4": ret4[sl], "vol": vol[sl], "rsi": rsi[sl], "volume_z": volume_z[sl]}
    return Stream(name, seed, probs, feats, up_next[sl], None, EXPERT_NAMES,
                  "BTC-USD 15-minute candles: trend (e0), RSI (e1), volume (e2), online logistic (e3)",
                  {"candles": int(close.size), "warmup": warmup, "seed_independent": True})


def btc_stream(seed: int = 0, n_events: int | None = None, data: str | Path | None = None) -> Stream:
    """The `btc` scenario from the candle file (the seed changes nothing in the data)."""
    c = read_candles(data)
    s = btc_from_candles(c["close"], c["volume"], seed=seed)
    return s.head(n_events) if n_events is not None and n_events < len(s) else s


def make_stream(name: str, seed: int, n_events: int | None = None, *, data: str | Path | None = None) -> Stream:
    """Any scenario by name. n_events None: DEFAULT_EVENTS for synthetic ones, every candle for btc."""
    if name == "btc":
        return btc_stream(seed, n_events, data)
    return synthetic_stream(name, seed, DEFAULT_EVENTS if n_events is None else n_events)


def oracle_log_loss(stream: Stream, start: int = 0) -> float | None:
    """Log loss of the true probabilities from step `start` on; None for real data."""
    if stream.p_true is None:
        return None
    p, y = stream.p_true[start:], stream.y[start:]
    return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))
