"""A trading ensemble that fuses four experts, in-process or through the titan-fusion service.

The ensemble asks its fusion for (prob_up, prob_down) before each decision and reports how the
candle closed once it has. Moving the fusion out of the process is one line:

    fusion = TransformerFusion(CONFIG, n_models=4)   # in-process: needs torch
    fusion = FusionClient("localhost:50051")         # remote: needs grpcio and protobuf only

Everything else (the `Ensemble` below) stays as it is. Run it on the bundled BTC 15-minute candles:

    python examples/ensemble.py                           # in-process TransformerFusion
    titan-fusion serve --port 50051 &                     # or: make run
    python examples/ensemble.py --remote localhost:50051  # the same, through the service

Each candle has an event_id, given to the forecast before it and to its outcome after. Remote, it
is what the service's live scoring pairs them by: without it on the forecast, the service cannot
score what it served, and never switches to the plain average when the fusion does worse (the
in-process class ignores it). The service also records an outcome once however often it is sent,
so an outcome that could not be delivered is simply kept and sent again later. Every
decision says what served its forecast (`last_source`, `last_reason`: the fusion, or the plain
average and why, "unavailable" when the service did not answer and the client averaged locally),
and a forecast that failed outright is a HOLD: the loop never dies on the fusion's errors.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from titan_fusion.client import FusionClient, FusionClientError, InvalidArgumentError, NotFoundError

MAX_PENDING = 10_000  # undelivered outcomes kept for the next candles; the oldest go beyond this

DATA = Path(__file__).resolve().parent.parent / "data" / "BTC-USD-15-MIN.csv"
CONFIG = {"fusion.min_samples": 200}  # the original's config store, with its dotted names
SYMBOL = "BTC-USD:15m"


def make_fusion(remote: str | None):
    if remote:
        # The one-line change. retries=0: the ensemble keeps what it could not deliver and sends it
        # again at the next candle, so a down service costs a candle one short call, not retries.
        return FusionClient(remote, retries=0)
    from titan_fusion.server import TransformerFusion  # torch lives here, not in the client

    return TransformerFusion(CONFIG, n_models=4)


@dataclass(frozen=True)
class Candle:
    time: str
    close: float
    volume: float


@dataclass(frozen=True)
class ModelOutput:
    """One expert's forecast, as the original Titan ensemble's models return it."""

    model_name: str
    prob_up: float
    prob_down: float
    confidence: float


def load_candles(path: Path) -> list[Candle]:
    """The candles in time order, each once, `time` in UTC (the event_id's key: one instant, one
    string). The file has snapshots inside a candle (seconds in the timestamp) and repeats 32
    candles after a jump back in time (data/README.md): both are skipped."""
    candles: list[Candle] = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            t = datetime.datetime.fromisoformat(r["Datetime"]).astimezone(datetime.timezone.utc)
            if t.second or (candles and t.isoformat() <= candles[-1].time):
                continue
            candles.append(Candle(t.isoformat(), float(r["Close"]), float(r["Volume"])))
    return candles


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _output(name: str, prob_up: float, confidence: float) -> ModelOutput:
    prob_up = min(max(prob_up, 0.01), 0.99)
    return ModelOutput(name, prob_up, 1.0 - prob_up, min(max(confidence, 0.0), 1.0))


def rsi(closes: list[float], n: int = 14) -> float:
    moves = [b - a for a, b in zip(closes[-n - 1:-1], closes[-n:])]
    gain = sum(m for m in moves if m > 0)
    loss = -sum(m for m in moves if m < 0)
    return 100.0 if loss == 0 else 100.0 - 100.0 / (1.0 + gain / loss)


# Four toy experts in the roles of the original's TrendVIC, Oscillator, VolumeMetrix, ML_Classifier.
def trend(history: list[Candle]) -> ModelOutput:
    closes = [c.close for c in history]
    fast, slow = sum(closes[-8:]) / 8, sum(closes[-32:]) / 32
    gap = (fast - slow) / slow
    return _output("TrendVIC", _sigmoid(200 * gap), min(abs(gap) * 100, 1.0))


def oscillator(history: list[Candle]) -> ModelOutput:
    r = rsi([c.close for c in history])
    return _output("Oscillator", 0.5 + (50.0 - r) / 250.0, abs(r - 50.0) / 50.0)


def volume(history: list[Candle]) -> ModelOutput:
    avg = sum(c.volume for c in history[-32:]) / 32 or 1.0
    surge = min(history[-1].volume / avg - 1.0, 2.0)
    direction = math.copysign(1.0, history[-1].close - history[-2].close)
    return _output("VolumeMetrix", 0.5 + 0.05 * direction * max(surge, 0.0), surge / 2.0)


def classifier(history: list[Candle]) -> ModelOutput:
    r = [(b.close - a.close) / a.close for a, b in zip(history[-4:-1], history[-3:])]
    return _output("ML_Classifier", _sigmoid(60 * r[-1] - 30 * r[-2] + 10 * r[-3]), 0.5)


EXPERTS = (trend, oscillator, volume, classifier)


class Ensemble:
    """Asks the experts, fuses them, decides; learns from each closed candle.

    `fusion` is anything with the original TransformerFusion's API: the in-process class or a
    FusionClient.
    """

    def __init__(self, fusion, threshold: float = 0.55):
        self.fusion = fusion
        self.threshold = threshold
        self.pending: list[tuple[list[ModelOutput], dict[str, float], str, str]] = []
        self.served: Counter[str] = Counter()  # what served each decision: "fusion", "average/warming_up", ...

    def decide(self, history: list[Candle],
               event_id: str | None = None) -> tuple[str, float | None, str, list[ModelOutput], dict[str, float]]:
        """(action, prob_up or None, what served it, the experts' outputs, the features) for the
        candle after `history`; `event_id` names that candle (its outcome is recorded under it)."""
        outputs = [expert(history) for expert in EXPERTS]
        features = {"close": history[-1].close, "rsi": rsi([c.close for c in history]),
                    "volume": history[-1].volume}
        try:
            prob_up, _prob_down = self.fusion.forward(outputs, features, event_id=event_id)
        except (FusionClientError, ValueError) as err:  # e.g. RESOURCE_EXHAUSTED: no forecast, no trade
            print(f"{history[-1].time}: no forecast ({type(err).__name__}: {err}); HOLD")
            self.served["none"] += 1
            return "HOLD", None, "none", outputs, features
        served = self.fusion.last_source if self.fusion.last_reason is None else \
            f"{self.fusion.last_source}/{self.fusion.last_reason}"
        if served != "fusion" and self.served[served] == 0:  # say so the first time, and count them all
            print(f"{history[-1].time}: forecast served by the {served.replace('/', ' (')})")
        self.served[served] += 1
        if prob_up >= self.threshold:
            action = "BUY"
        elif prob_up <= 1.0 - self.threshold:
            action = "SELL"
        else:
            action = "HOLD"
        return action, prob_up, served, outputs, features

    def record_outcome(self, outputs, features, actual_direction: str, event_id: str) -> None:
        self.pending.append((outputs, features, actual_direction, event_id))
        if len(self.pending) > MAX_PENDING:
            print(f"outcome {self.pending.pop(0)[3]} dropped: more than {MAX_PENDING} undelivered")
        while self.pending:
            outputs, features, direction, key = self.pending[0]
            try:
                self.fusion.update(outputs, features, direction, event_id=key)
            except (InvalidArgumentError, NotFoundError, ValueError) as err:  # refused for good (bad
                print(f"outcome {key} refused ({err}); dropped")  # inputs, in-process too): resending cannot help
            except FusionClientError as err:  # down, busy, starting, a token or a server fault: kept,
                print(f"outcome {key} not delivered ({err}); {len(self.pending)} pending")  # sent next candle
                return
            self.pending.pop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", metavar="HOST:PORT", help="use the titan-fusion service")
    parser.add_argument("--candles", type=int, default=800, help="candles to trade")
    args = parser.parse_args()

    candles = load_candles(DATA)[: args.candles + 33]
    fusion = make_fusion(args.remote)
    ensemble = Ensemble(fusion)
    hits = traded = 0
    # From the end of the warm-up on, whatever served (the fusion, or the average while the fusion
    # underperformed or the service was down): scoring the fusion's candles alone would leave out
    # the stretches it did badly. [hits of what served, hits of the plain average, candles]
    scored = [0, 0, 0]
    for t in range(33, len(candles)):
        history, closed = candles[:t], candles[t]
        event_id = f"{SYMBOL}:{closed.time}"  # the candle forecast, then learned
        action, prob_up, served, outputs, features = ensemble.decide(history, event_id)  # before the candle
        went_up = closed.close > history[-1].close
        direction = "UP" if went_up else "DOWN"
        ensemble.record_outcome(outputs, features, direction, event_id=event_id)

        if prob_up is not None and not served.endswith("/warming_up"):
            scored[0] += (prob_up > 0.5) == went_up
            scored[1] += (sum(o.prob_up for o in outputs) / len(outputs) > 0.5) == went_up
            scored[2] += 1
        if action != "HOLD":
            traded += 1
            hits += (action == "BUY") == went_up

    n = len(candles) - 33
    k = scored[2]
    print(f"{n} candles; forecasts served by: {dict(ensemble.served)}")
    if k:
        print(f"after the warm-up ({k} candles): accuracy of what served {scored[0] / k:.3f}, of the plain average "
              f"{scored[1] / k:.3f}")
    print(f"{traded} trades, hit rate {hits / max(traded, 1):.3f}")
    try:
        stats = fusion.get_training_stats()
        weights = fusion.get_attention_weights()
    except FusionClientError as err:
        print(f"no statistics: the service did not answer ({err})")
    else:
        print({k: stats[k] for k in ("samples_trained", "train_loss", "val_loss", "current_lr",
                                     "is_overfitting", "avg_attention_entropy", "last_source")})
        print("attention:", {k: round(v, 3) for k, v in weights.items()})
    if isinstance(fusion, FusionClient):
        print(f"forecasts served by the local fallback: {fusion.fallback_count}")
        fusion.close()


if __name__ == "__main__":
    main()
