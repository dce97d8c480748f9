"""Online fusers to measure the transformer against: classic ways of combining experts' forecasts.

One interface, river-style: `predict_proba_one(probs, features) -> float` (the probability of UP)
before the outcome is known, then `learn_one(probs, features, y)` (y = 1 for UP, 0 for DOWN).
`probs` is the experts' prob_up in a fixed order, `features` the market features (a name -> number
mapping, or None). Every fuser is deterministic, numpy-only, O(n_experts) per step (the stackers
O(d^2) with d their number of inputs), and makes no use of anything but the past.

    >>> f = EWA(n_experts=2)
    >>> f.predict_proba_one([0.8, 0.4], None)     # equal weights before any outcome
    0.6000000000000001
    >>> f.learn_one([0.8, 0.4], None, 1)          # UP: weights go as 0.8 : 0.4 (eta = 1)
    >>> round(f.predict_proba_one([0.8, 0.4], None), 4)   # (0.8 * 0.8 + 0.4 * 0.4) / 1.2
    0.6667

Experts' probabilities are clipped to [1e-4, 1 - 1e-4] (as the transformer clips its inputs, so
|logit| <= 9.2) by every fuser except PlainAverage, which is exactly the service's fallback.

| fuser | what it does | its parameter |
|---|---|---|
| PlainAverage | mean of prob_up | none |
| RecalibratedAverage | online Platt scaling: sigmoid(a logit(avg) + b) | ridge 1, forgetting 1e-4 |
| FollowTheLeader | the expert with the lowest cumulative log loss | none |
| EWA | exponentially weighted average on log loss | eta = 1 |
| FixedShare | EWA, then share alpha of the weight uniformly | eta = 1, alpha = 1/1000 |
| OnlineLogisticStacking | logistic regression on the experts' logits + bias | ridge 1, forgetting 1e-4 |
| ...(interactions=True) | + normalized features + logit x feature products | same |
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

CLIP = 1e-4  # experts' probabilities are clipped to [CLIP, 1 - CLIP]


def _clip(p: float) -> float:
    return min(max(float(p), CLIP), 1.0 - CLIP)


def logit(p: float) -> float:
    p = _clip(p)
    return math.log(p / (1.0 - p))


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class Fuser(Protocol):
    """What every fuser (and the transformer's adapter) offers."""

    name: str

    def predict_proba_one(self, probs: Sequence[float], features: Mapping[str, float] | None = None) -> float: ...

    def learn_one(self, probs: Sequence[float], features: Mapping[str, float] | None, y: int) -> None: ...


# ---------------------------------------------------------------------------------- averages
class PlainAverage:
    """The mean of the experts' prob_up: what the service serves when the fusion cannot.

    >>> PlainAverage().predict_proba_one([0.6, 0.8, 0.4], None)
    0.6
    """

    name = "average"

    def __init__(self, n_experts: int | None = None):
        self.n_experts = n_experts

    def predict_proba_one(self, probs: Sequence[float], features: Mapping[str, float] | None = None) -> float:
        return math.fsum(probs) / len(probs)

    def learn_one(self, probs: Sequence[float], features: Mapping[str, float] | None, y: int) -> None:
        pass


class OnlineLogistic:
    """Logistic regression learned online by Newton steps on a forgetting, ridge-regularized loss.

    After each outcome, with x the inputs, p = sigmoid(w.x), the gradient g = (p - y) x and the
    curvature h = p (1 - p):

        H <- (1 - forget) H + forget * ridge * I + h x x^T      (H starts at ridge * I)
        w <- w - H^-1 g                                          (w starts at w0)

    i.e. a full Newton step on a quadratic model of the past losses plus ridge/2 |w - w0|^2 (the
    "online Newton" or Laplace-filter form of logistic regression). There is no learning rate to
    tune: the step size is the inverse curvature, large early and about 1 / (number of outcomes)
    later. `forget` discounts old outcomes (memory about 1 / forget outcomes), so that the weights
    track slow changes in the experts; the forget * ridge * I term keeps H >= ridge * I, so a step
    is never larger than |g| / ridge. Costs O(d^2) per outcome (d = len(w0); a solve of d x d).
    """

    def __init__(self, w0: Sequence[float], *, ridge: float = 1.0, forget: float = 1e-4):
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        if not 0.0 <= forget < 1.0:
            raise ValueError(f"forget must be in [0, 1), got {forget}")
        self.w = np.array(w0, dtype=np.float64)
        d = self.w.size
        self.ridge, self.forget = float(ridge), float(forget)
        self.H = ridge * np.eye(d)
        self._ridge_eye = forget * ridge * np.eye(d)

    def predict(self, x: np.ndarray) -> float:
        return sigmoid(float(self.w @ x))

    def learn(self, x: np.ndarray, y: int) -> None:
        p = sigmoid(float(self.w @ x))
        h = max(p * (1.0 - p), 1e-6)
        if self.forget:
            self.H *= 1.0 - self.forget
            self.H += self._ridge_eye
        self.H += h * np.outer(x, x)
        self.w -= np.linalg.solve(self.H, (p - y) * x)


class RecalibratedAverage:
    """Online Platt scaling of the plain average: sigmoid(a * logit(avg) + b), (a, b) learned by
    OnlineLogistic from (a, b) = (1, 0), i.e. starting as the average itself (up to the clip).

    Default ridge 1 and forgetting 1e-4 (a memory of about 10,000 outcomes).
    """

    name = "recal_average"

    def __init__(self, n_experts: int | None = None, *, ridge: float = 1.0, forget: float = 1e-4):
        self.lr = OnlineLogistic([1.0, 0.0], ridge=ridge, forget=forget)

    @staticmethod
    def _x(probs: Sequence[float]) -> np.ndarray:
        return np.array([logit(math.fsum(probs) / len(probs)), 1.0])

    def predict_proba_one(self, probs: Sequence[float], features: Mapping[str, float] | None = None) -> float:
        return self.lr.predict(self._x(probs))

    def learn_one(self, probs: Sequence[float], features: Mapping[str, float] | None, y: int) -> None:
        self.lr.learn(self._x(probs), y)


# ---------------------------------------------------------------------------------- experts' weights
def _expert_losses(probs: Sequence[float], y: int) -> list[float]:
    """Each expert's log loss on this outcome (probabilities clipped to [CLIP, 1 - CLIP])."""
    return [-math.log(_clip(p) if y else 1.0 - _clip(p)) for p in probs]


class FollowTheLeader:
    """The forecast of the expert with the lowest cumulative log loss so far (ties: the first).

    Before any outcome, every expert has loss 0, so it follows expert 0."""

    name = "ftl"

    def __init__(self, n_experts: int):
        self.loss = [0.0] * n_experts

    def leader(self) -> int:
        return min(range(len(self.loss)), key=self.loss.__getitem__)

    def predict_proba_one(self, probs: Sequence[float], features: Mapping[str, float] | None = None) -> float:
        return _clip(probs[self.leader()])

    def learn_one(self, probs: Sequence[float], features: Mapping[str, float] | None, y: int) -> None:
        for i, l in enumerate(_expert_losses(probs, y)):
            self.loss[i] += l


class EWA:
    """Exponentially weighted average forecaster (Vovk; Cesa-Bianchi and Lugosi, ch. 2-3):
    p = sum_i w_i p_i with w_i proportional to exp(-eta L_i), L_i expert i's cumulative log loss.

    eta = 1 (the default) makes it the Bayesian mixture of the experts: log loss is 1-exp-concave,
    so its regret against the best expert is at most ln(n_experts) nats over ANY horizon (no tuning
    to T). Weights are kept as log-weights, renormalized every step.
    """

    name = "ewa"

    def __init__(self, n_experts: int, *, eta: float = 1.0):
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        self.eta = eta
        self.logw = [0.0] * n_experts

    def weights(self) -> list[float]:
        m = max(self.logw)
        e = [math.exp(v - m) for v in self.logw]
        s = math.fsum(e)
        return [v / s for v in e]

    def predict_proba_one(self, probs: Sequence[float], features: Mapping[str, float] | None = None) -> float:
        return math.fsum(w * _clip(p) for w, p in zip(self.weights(), probs))

    def learn_one(self, probs: Sequence[float], features: Mapping[str, float] | None, y: int) -> None:
        logw = [v - self.eta * l for v, l in zip(self.logw, _expert_losses(probs, y))]
        m = max(logw)
        self.logw = [v - m for v in logw]


class FixedShare(EWA):
    """Fixed Share (Herbster and Warmuth 1998): EWA's loss update, then every expert gets back a
    share alpha / n of the total weight: w_i <- (1 - alpha) v_i + alpha / n, v the normalized EWA
    update. No expert's weight falls below alpha / n, so when the best expert changes the forecaster
    follows the new one within about ln(n / alpha) / (per-step loss gap) steps, where EWA must first
    undo the whole cumulative loss lead of the old one.

    alpha = 1/1000 (default): the switching rate it is tuned for is one switch per ~1000 steps (the
    optimal alpha is about (number of switches) / T); its price on a stream without switches is
    about alpha nats per step (0.001), and eta = 1 as in EWA.
    """

    name = "fixed_share"

    def __init__(self, n_experts: int, *, eta: float = 1.0, alpha: float = 1e-3):
        super().__init__(n_experts, eta=eta)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def learn_one(self, probs: Sequence[float], features: Mapping[str, float] | None, y: int) -> None:
        super().learn_one(probs, features, y)
        n = len(self.logw)
        w = [(1.0 - self.alpha) * v + self.alpha / n for v in self.weights()]
        self.logw = [math.log(v) if v > 0 else -math.inf for v in w]


# ---------------------------------------------------------------------------------- stacking
class _FeatureNorm:
    """Per-feature running mean and variance (Welford), over learned outcomes only."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] | None = None
        self.n = 0
        self.mean = self.m2 = np.zeros(0)

    def fix(self, features: Mapping[str, float] | None) -> None:
        if self.names is None:
            self.names = tuple(sorted(features or ()))
            self.mean = np.zeros(len(self.names))
            self.m2 = np.zeros(len(self.names))

    def raw(self, features: Mapping[str, float] | None) -> np.ndarray:
        if not self.names:
            return np.zeros(0)
        return np.array([float(features[k]) for k in self.names])

    def z(self, features: Mapping[str, float] | None) -> np.ndarray:
        """Normalized features, clipped to [-5, 5]; 0 before two outcomes or for a constant one."""
        x = self.raw(features)
        if self.n < 2:
            return np.zeros_like(x)
        sd = np.sqrt(self.m2 / (self.n - 1))
        z = np.divide(x - self.mean, sd, out=np.zeros_like(x), where=sd > 1e-12)
        return np.clip(z, -5.0, 5.0)

    def update(self, features: Mapping[str, float] | None) -> None:
        x = self.raw(features)
        self.n += 1
        delta = x - self.mean
        self.mean = self.mean + delta / self.n
        self.m2 = self.m2 + delta * (x - self.mean)


class OnlineLogisticStacking:
    """Logistic regression on the experts' logits and a bias, learned online (OnlineLogistic: Newton
    steps, ridge 1 toward the start, forgetting 1e-4, i.e. a memory of about 10,000 outcomes).

    Starts at w = (1/n, ..., 1/n, 0): the sigmoid of the mean logit, close to the plain average.

    With `interactions=True`, the inputs are also the market features, normalized online (running
    mean and variance of the learned outcomes, clipped to [-5, 5]; the feature names are those of
    the first event, sorted), and the product of each expert's logit with each normalized feature,
    so that an expert's weight can depend on the market (weights for those start at 0):
    d = n + 1 + F + n F inputs (4 experts, 2 features: 15).
    """

    def __init__(self, n_experts: int, *, interactions: bool = False, ridge: float = 1.0, forget: float = 1e-4):
        self.n = n_experts
        self.interactions = interactions
        self.name = "stacking_x" if interactions else "stacking"
        self._ridge, self._forget = ridge, forget
        self.norm = _FeatureNorm()
        self.lr: OnlineLogistic | None = None
        if not interactions:
            self._build(0)

    def _build(self, n_features: int) -> None:
        d = self.n + 1 + n_features + self.n * n_features
        w0 = np.zeros(d)
        w0[: self.n] = 1.0 / self.n
        self.lr = OnlineLogistic(w0, ridge=self._ridge, forget=self._forget)

    def _x(self, probs: Sequence[float], features: Mapping[str, float] | None) -> np.ndarray:
        if len(probs) != self.n:
            raise ValueError(f"expected {self.n} experts, got {len(probs)}")
        z = np.array([logit(p) for p in probs])
        if not self.interactions:
            return np.append(z, 1.0)
        if self.lr is None:
            self.norm.fix(features)
            self._build(len(self.norm.names))
        f = self.norm.z(features)
        return np.concatenate((z, [1.0], f, np.outer(z, f).ravel()))

    def predict_proba_one(self, probs: Sequence[float], features: Mapping[str, float] | None = None) -> float:
        x = self._x(probs, features)  # builds the model on the first event (interactions)
        return self.lr.predict(x)

    def learn_one(self, probs: Sequence[float], features: Mapping[str, float] | None, y: int) -> None:
        x = self._x(probs, features)
        self.lr.learn(x, y)
        if self.interactions:
            self.norm.update(features)

    @property
    def weights(self) -> np.ndarray:
        return self.lr.w.copy()


def all_baselines(n_experts: int) -> list[Any]:
    """A fresh instance of every baseline, in report order (PlainAverage first)."""
    return [PlainAverage(n_experts), RecalibratedAverage(n_experts), FollowTheLeader(n_experts),
            EWA(n_experts), FixedShare(n_experts), OnlineLogisticStacking(n_experts),
            OnlineLogisticStacking(n_experts, interactions=True)]


BASELINE_NAMES = ("average", "recal_average", "ftl", "ewa", "fixed_share", "stacking", "stacking_x")


# ---------------------------------------------------------------------------------- inside the fusion
class ClassicTokens:
    """The classic aggregators whose forecasts the transformer sees as extra tokens (FusionConfig
    `classic_tokens`): Fixed Share, online logistic stacking and the recalibrated average, each
    learned online on the same outcomes, in the same prequential order.

    `shares()` says how much each aggregator leans on each expert (its weights; |coefficients|
    for stacking; uniform for the recalibrated average), so that attention on an aggregator's token
    can be reported as attention on the experts behind it. State is plain lists (JSON), restored
    exactly by `load`.
    """

    NAMES = ("fixed_share", "stacking", "recal_average")

    def __init__(self, n_experts: int):
        self.n = n_experts
        self.fs = FixedShare(n_experts)
        self.stacking = OnlineLogisticStacking(n_experts)
        self.recal = RecalibratedAverage(n_experts)

    def predict(self, probs: Sequence[float]) -> list[float]:
        return [self.fs.predict_proba_one(probs), self.stacking.predict_proba_one(probs),
                self.recal.predict_proba_one(probs)]

    def learn(self, probs: Sequence[float], y: int) -> None:
        self.fs.learn_one(probs, None, y)
        self.stacking.learn_one(probs, None, y)
        self.recal.learn_one(probs, None, y)

    def shares(self) -> list[list[float]]:
        beta = np.abs(self.stacking.lr.w[: self.n])
        total = float(beta.sum())
        stack = (beta / total).tolist() if total > 0 else [1.0 / self.n] * self.n
        return [self.fs.weights(), stack, [1.0 / self.n] * self.n]

    def forecaster(self) -> "ClassicForecaster":
        """`predict` with the current state frozen, in plain floats: what an inference snapshot uses."""
        return ClassicForecaster(self.fs.weights(), self.stacking.lr.w.tolist(), self.recal.lr.w.tolist())

    def __deepcopy__(self, memo: dict) -> "ClassicTokens":
        """A full, independent copy (inference snapshots take one after every outcome), without
        copy.deepcopy's generic walk: the state is a few floats, lists of floats and arrays."""
        new = _copy_state(self)
        memo[id(self)] = new
        return new

    def state(self) -> dict:
        return {"fs_logw": list(self.fs.logw),
                "stacking": [self.stacking.lr.w.tolist(), self.stacking.lr.H.tolist()],
                "recal": [self.recal.lr.w.tolist(), self.recal.lr.H.tolist()]}

    def load(self, state: Mapping) -> None:
        self.fs.logw = [float(v) for v in state["fs_logw"]]
        for lr, (w, h) in ((self.stacking.lr, state["stacking"]), (self.recal.lr, state["recal"])):
            lr.w = np.array(w, dtype=np.float64)
            lr.H = np.array(h, dtype=np.float64)


class ClassicForecaster:
    """ClassicTokens.predict for a frozen state, with plain Python floats: on a handful of experts,
    numpy's per-call overhead costs more than the arithmetic. The same formulas; the stacking's dot
    product is summed in Python, so it may differ from numpy's in the last bit."""

    __slots__ = ("fs_w", "stack_w", "recal_w")

    def __init__(self, fs_weights: Sequence[float], stacking_w: Sequence[float], recal_w: Sequence[float]):
        self.fs_w = list(fs_weights)
        self.stack_w = list(stacking_w)  # n weights, then the bias
        self.recal_w = list(recal_w)  # (a, b)

    def predict(self, probs: Sequence[float]) -> list[float]:
        """[Fixed Share, stacking, recalibrated average] forecasts of UP."""
        clipped = [min(max(float(p), CLIP), 1.0 - CLIP) for p in probs]
        z = self.stack_w[-1]
        for w, p in zip(self.stack_w, clipped):
            z += w * math.log(p / (1.0 - p))
        a, b = self.recal_w
        return [math.fsum(w * p for w, p in zip(self.fs_w, clipped)), sigmoid(z),
                sigmoid(a * logit(math.fsum(probs) / len(probs)) + b)]


def _copy_state(obj: Any) -> Any:
    """A deep copy of state made of numbers, strings, None, numpy arrays, lists and tuples, and
    instances of this module's classes holding the same; anything else goes to copy.deepcopy."""
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if type(obj) is np.ndarray:
        return obj.copy()
    if type(obj) in (list, tuple):
        items = [_copy_state(v) for v in obj]
        return items if type(obj) is list else tuple(items)
    if type(obj).__module__ == __name__ and hasattr(obj, "__dict__"):
        new = object.__new__(type(obj))
        new.__dict__.update({k: _copy_state(v) for k, v in vars(obj).items()})
        return new
    return copy.deepcopy(obj)
