"""Live shadow scoring: is the fusion beating the plain average, on this trader's outcomes?

For every outcome whose event_id an earlier Predict served (while the fusion was ready), the model
owner scores three forecasts of that event against how the candle closed: what the service served,
the fusion's own forecast (computed even while the average is served), and the plain average. Each
is a RollingScore over the last `window` such outcomes (accuracy, log loss, Brier, calibration).

The switch, the original's "graceful fallback if fusion underperforms": once at least
`min_outcomes` are in the window, when the fusion's rolling log loss exceeds the average's by more
than `margin` nats, the service serves the average (source AVERAGE, reason UNDERPERFORMING) and
keeps scoring the fusion in the shadow; it serves the fusion again when the excess falls to
`margin / 2` or below (hysteresis, so it does not flap). Each switch is logged and counted.

    >>> s = LiveScorer(window=4, margin=0.05, min_outcomes=2)
    >>> for _ in range(2):
    ...     switched = s.observe(served=0.9, fusion=0.9, average=0.6, y=0)  # fusion confidently wrong
    >>> s.underperforming, s.switches
    (True, 1)
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from .scoring import RollingScore

log = logging.getLogger("titan_fusion.server.live")
SOURCES = ("served", "fusion", "average")


class LiveScorer:
    def __init__(self, window: int = 500, margin: float = 0.01, min_outcomes: int = 200):
        self.window, self.margin, self.min_outcomes = window, margin, min_outcomes
        self.load(None)  # nothing scored yet

    def observe(self, served: float, fusion: float, average: float, y: int) -> bool:
        """Score one outcome; True when it flipped what is served."""
        for source, p in (("served", served), ("fusion", fusion), ("average", average)):
            self.scores[source].update(p, y)
        return self._decide()

    def excess(self) -> float | None:
        """Fusion's rolling log loss minus the average's (positive: the fusion is worse)."""
        f, a = self.scores["fusion"].snapshot(), self.scores["average"].snapshot()
        if f["n"] < self.min_outcomes:
            return None
        return f["log_loss"] - a["log_loss"]

    def _decide(self) -> bool:
        excess = self.excess()
        if excess is None:
            return False
        if not self.underperforming and excess > self.margin:
            self.underperforming = True
        elif self.underperforming and excess <= self.margin / 2:
            self.underperforming = False
        else:
            return False
        self.switches += 1
        log.warning("live scoring: the fusion's log loss is %+.4f nats against the plain average over the last %d "
                    "outcomes: now serving %s", excess, self.scores["fusion"].snapshot()["n"],
                    "the average (underperforming)" if self.underperforming else "the fusion again")
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"sources": {s: r.snapshot() for s, r in self.scores.items()}, "window": self.window,
                "underperforming": self.underperforming, "switches": self.switches, "excess": self.excess()}

    def state(self) -> dict[str, Any]:
        return {"scores": {s: r.state() for s, r in self.scores.items()},
                "underperforming": self.underperforming, "switches": self.switches}

    def load(self, state: Mapping[str, Any] | None) -> None:
        """Start over from `state` (what state() returned), or from nothing (None: no outcome
        scored). Nothing scored before stays: a recovery that starts again after its trainer
        died scores the journal's outcomes once."""
        self.scores = {s: RollingScore(self.window) for s in SOURCES}
        self.underperforming = False
        self.switches = 0
        if not state:
            return
        for s in SOURCES:
            if s in state.get("scores", {}):
                self.scores[s].load(state["scores"][s])
        self.underperforming = bool(state.get("underperforming", False))
        self.switches = int(state.get("switches", 0))
