"""Every Prometheus metric of the service, in one place, on an injectable CollectorRegistry.

All names start with `fusion_`, use base units (seconds), counters end in
`_total`, and every label has a small fixed set of values, initialized up front where known so that
a series reads 0 rather than being absent before its first event.

| Metric | Type | Labels | Meaning |
|---|---|---|---|
| `fusion_train_loss` | gauge | | mean training loss over recent steps (NaN before training) |
| `fusion_val_loss` | gauge | | latest validation loss (NaN before the first check) |
| `fusion_learning_rate` | gauge | | current learning rate (warmup, then cosine decay) |
| `fusion_attention_entropy` | gauge | | average entropy of the attention over experts, nats (ln n = uniform) |
| `fusion_attention_weight` | gauge | `expert` | mean attention weight per expert over the attention window; sums to 1 |
| `fusion_overfitting` | gauge | | 1 while early stopping has frozen the model at its best weights, else 0 |
| `fusion_samples_trained` | gauge | | outcomes learned by the model |
| `fusion_train_steps` | gauge | | training steps taken |
| `fusion_early_stops` | gauge | | times early stopping fired |
| `fusion_ready` | gauge | | 1 once min_samples outcomes are learned (the fusion may serve; see `fusion_underperforming` and `fusion.enabled`), else 0 |
| `fusion_train_buffer_size` | gauge | | outcomes in the training buffer |
| `fusion_val_buffer_size` | gauge | | outcomes in the validation buffer |
| `fusion_model_version` | gauge | | version of the serving model (its training steps) |
| `fusion_queue_depth` | gauge | `queue` = owner, predict | requests waiting in each bounded queue |
| `fusion_outcomes_total` | counter | | outcomes learned |
| `fusion_duplicates_total` | counter | | outcomes acknowledged without learning: duplicate event_id |
| `fusion_predictions_total` | counter | `source`, `reason` | forecasts served: source=fusion with reason=none, or source=average with reason=disabled, warming_up, wrong_expert_count, underperforming |
| `fusion_checkpoints_total` | counter | `action` = save, restore | checkpoints saved and restored |
| `fusion_checkpoint_errors_total` | counter | `action` = save, restore | checkpoint saves and restores that failed |
| `fusion_rpc_errors_total` | counter | `method`, `code` | RPCs that ended with a non-OK gRPC status (code like INVALID_ARGUMENT) |
| `fusion_rpc_duration_seconds` | histogram | `method` | RPC handling time, seconds, every status included |
| `fusion_predict_batch_size` | histogram | | Predicts computed together by one handler thread (flat combining: 1 for a Predict computed alone, more when Predicts queued while one was computed) |
| `fusion_live_log_loss` | gauge | `source` = served, fusion, average | rolling log loss on the outcomes of predicted events (live scoring; NaN before any) |
| `fusion_live_accuracy` | gauge | `source` | rolling accuracy, same window |
| `fusion_live_brier` | gauge | `source` | rolling Brier score, same window |
| `fusion_live_ece` | gauge | `source` | rolling expected calibration error (15 equal-width bins), same window |
| `fusion_live_window_outcomes` | gauge | | outcomes in the live-scoring window |
| `fusion_underperforming` | gauge | | 1 while the service serves the average because the fusion underperforms it, else 0 |
| `fusion_underperforming_switches_total` | counter | | switches between the fusion and the average by live scoring |
| `fusion_last_outcome_timestamp_seconds` | gauge | | unix time the newest outcome was recorded (journaled; learning a backlog later does not move it); 0: none journaled |
| `fusion_training_lag` | gauge | | outcomes journaled and not learned yet (a bulk replay's backlog while training catches up) |
| `fusion_trainer_restarts_total` | counter | | trainer processes that died and were replaced (the model rebuilt from checkpoint and journal) |

Usage: one `Metrics` per service; tests pass a fresh registry and read samples back:

    >>> from prometheus_client import CollectorRegistry
    >>> m = Metrics(CollectorRegistry())
    >>> m.count_prediction("average", "warming_up")
    >>> m.registry.get_sample_value("fusion_predictions_total", {"source": "average", "reason": "warming_up"})
    1.0
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server

# The statuses the service answers with (server/service.py STATUS_OF, the token check, a cancelled
# stream): their fusion_rpc_errors_total series exist at 0 before the first.
ERROR_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
               "DEADLINE_EXCEEDED", "CANCELLED", "UNAUTHENTICATED", "PERMISSION_DENIED", "INTERNAL")
DEFAULT_METHODS = ("Predict", "RecordOutcome", "RecordOutcomes", "RecordOutcomeBatches", "Stats", "Checkpoint")
QUEUES = ("owner", "predict")
LIVE_SOURCES = ("served", "fusion", "average")
CHECKPOINT_ACTIONS = ("save", "restore")
# The same strings as inference.SOURCE_* / REASON_* (kept here so that metrics imports no torch;
# tests/test_metrics.py checks that they agree).
SOURCE_FUSION, SOURCE_AVERAGE = "fusion", "average"
REASON_NONE = "none"  # the label for the fusion's own forecasts, whose reason is None
AVERAGE_REASONS = ("disabled", "warming_up", "wrong_expert_count", "underperforming")
PREDICTION_LABELS = ((SOURCE_FUSION, REASON_NONE),) + tuple((SOURCE_AVERAGE, r) for r in AVERAGE_REASONS)
# From a Predict's fraction of a millisecond up to a Checkpoint that learns a backlog first (up to
# 60 s) and a bulk stream (minutes): past the last bucket, a quantile reads as that bucket's bound.
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.05,
               0.1, 0.25, 1.0, 5.0, 30.0, 120.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # up to MAX_PREDICT_BATCH (server/owner.py)

# get_training_stats() key -> gauge attribute; booleans become 1/0, None becomes NaN.
_TRAINING_GAUGES = {
    "train_loss": "train_loss",
    "val_loss": "val_loss",
    "current_lr": "learning_rate",
    "avg_attention_entropy": "attention_entropy",
    "is_overfitting": "overfitting",
    "samples_trained": "samples_trained",
    "train_steps": "train_steps",
    "early_stops": "early_stops",
    "ready": "ready",
    "train_buffer_size": "train_buffer_size",
    "val_buffer_size": "val_buffer_size",
    "model_version": "model_version",
}


class Metrics:
    """The service's metrics. `registry` None: a new CollectorRegistry (never the global default),
    so that any number of services and tests can coexist in one process. Thread-safe, as
    prometheus_client's metric objects are."""

    def __init__(self, registry: CollectorRegistry | None = None, methods: Iterable[str] = DEFAULT_METHODS):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.methods = tuple(methods)
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        # --- training state, from get_training_stats() ---
        self.train_loss = gauge("fusion_train_loss", "Mean training loss over recent steps (NaN before training).")
        self.val_loss = gauge("fusion_val_loss", "Latest validation loss (NaN before the first check).")
        self.learning_rate = gauge("fusion_learning_rate", "Current learning rate.")
        self.attention_entropy = gauge("fusion_attention_entropy",
                                       "Average entropy of the attention over experts, in nats.")
        self.attention_weight = gauge("fusion_attention_weight",
                                      "Mean attention weight per expert over the attention window.", ("expert",))
        self.overfitting = gauge("fusion_overfitting",
                                 "1 while early stopping has frozen the model at its best weights, else 0.")
        self.samples_trained = gauge("fusion_samples_trained", "Outcomes learned by the model.")
        self.train_steps = gauge("fusion_train_steps", "Training steps taken.")
        self.early_stops = gauge("fusion_early_stops", "Times early stopping fired.")
        self.ready = gauge("fusion_ready", "1 once min_samples outcomes are learned, else 0. The fusion may serve "
                           "then, but not while disabled or underperforming.")
        self.train_buffer_size = gauge("fusion_train_buffer_size", "Outcomes in the training buffer.")
        self.val_buffer_size = gauge("fusion_val_buffer_size", "Outcomes in the validation buffer.")
        self.model_version = gauge("fusion_model_version", "Version of the serving model (its training steps).")
        self.train_loss.set(math.nan)  # no loss yet: NaN, like get_training_stats(), not a perfect 0
        self.val_loss.set(math.nan)
        self._experts: set[str] = set()
        self._attention_lock = threading.Lock()

        # --- queues ---
        self.queue_depth = gauge("fusion_queue_depth", "Requests waiting in a bounded queue.", ("queue",))
        self._queue_depth = {q: self.queue_depth.labels(q) for q in QUEUES}

        # --- counters ---
        self.outcomes = Counter("fusion_outcomes_total", "Outcomes learned.", registry=r)
        self.duplicates = Counter("fusion_duplicates_total",
                                  "Outcomes acknowledged without learning because their event_id was seen.",
                                  registry=r)
        self.predictions = Counter("fusion_predictions_total", "Forecasts served, by source and fallback reason.",
                                   ("source", "reason"), registry=r)
        self._predictions = {(s, reason): self.predictions.labels(s, reason) for s, reason in PREDICTION_LABELS}
        self.checkpoints = Counter("fusion_checkpoints_total", "Checkpoints saved and restored.", ("action",),
                                   registry=r)
        self._checkpoints = {a: self.checkpoints.labels(a) for a in CHECKPOINT_ACTIONS}
        self.checkpoint_errors = Counter("fusion_checkpoint_errors_total", "Checkpoint saves and restores that failed.",
                                         ("action",), registry=r)
        self._checkpoint_errors = {a: self.checkpoint_errors.labels(a) for a in CHECKPOINT_ACTIONS}
        # The codes the service answers with exist at 0 from the start: Prometheus' increase() cannot
        # see the first error of a series that appears with it, and a trader's few calls an hour make
        # that error count (FusionHighErrorRatio). Other codes appear when they happen.
        self.rpc_errors = Counter("fusion_rpc_errors_total", "RPCs that ended with a non-OK gRPC status.",
                                  ("method", "code"), registry=r)
        for m in self.methods:
            for code in ERROR_CODES:
                self.rpc_errors.labels(m, code)

        # --- latency ---
        self.rpc_duration_histogram = Histogram("fusion_rpc_duration_seconds", "RPC handling time in seconds.",
                                                ("method",), buckets=RPC_BUCKETS, registry=r)
        # Bound once: the hot path does self.rpc_duration[method].observe(seconds).
        self.rpc_duration = {m: self.rpc_duration_histogram.labels(m) for m in self.methods}
        self.predict_batch_size = Histogram("fusion_predict_batch_size", "Predicts computed together by one "
                                            "thread (1: computed alone; more: queued while another was computed).",
                                            buckets=BATCH_BUCKETS, registry=r)

        # --- live shadow scoring (server/live.py) ---
        self.live = {name: gauge(f"fusion_live_{name}", doc, ("source",)) for name, doc in (
            ("log_loss", "Rolling log loss on the outcomes of predicted events, by source."),
            ("accuracy", "Rolling accuracy on the outcomes of predicted events, by source."),
            ("brier", "Rolling Brier score on the outcomes of predicted events, by source."),
            ("ece", "Rolling expected calibration error (15 equal-width bins), by source."))}
        self._live = {(name, src): g.labels(src) for name, g in self.live.items() for src in LIVE_SOURCES}
        for child in self._live.values():
            child.set(math.nan)
        self.live_window_outcomes = gauge("fusion_live_window_outcomes", "Outcomes in the live-scoring window.")
        self.underperforming = gauge("fusion_underperforming",
                                     "1 while the average is served because the fusion underperforms it, else 0.")
        self.underperforming_switches = Counter("fusion_underperforming_switches_total",
                                                "Switches between the fusion and the average by live scoring.",
                                                registry=r)
        self._switches_seen = 0
        self.last_outcome_timestamp = gauge("fusion_last_outcome_timestamp_seconds",
                                            "Unix time the newest outcome was recorded (journaled); 0: none journaled.")
        self.training_lag = gauge("fusion_training_lag", "Outcomes journaled and not learned yet.")
        self.trainer_restarts = Counter("fusion_trainer_restarts_total",
                                        "Trainer processes that died and were replaced.", registry=r)

        self._server: Any = None
        self._thread: threading.Thread | None = None

    # --- recording ------------------------------------------------------------------------------

    def observe_training(self, stats: Mapping[str, Any]) -> None:
        """Set the training gauges from a TransformerFusion.get_training_stats()-style dict.
        Absent keys leave their gauge unchanged; NaN and None are set as NaN. The model version is
        stats["model_version"] if given, else stats["train_steps"]."""
        for key, attr in _TRAINING_GAUGES.items():
            if key in stats:
                getattr(self, attr).set(_number(stats[key]))
        if "model_version" not in stats and "train_steps" in stats:
            self.model_version.set(_number(stats["train_steps"]))

    def observe_live(self, live: Mapping[str, Any], last_outcome_time: float) -> None:
        """Set the live-scoring gauges from LiveScorer.snapshot()."""
        for src, score in live["sources"].items():
            for name in self.live:
                self._live[(name, src)].set(_number(score.get(name)))
        self.live_window_outcomes.set(live["sources"]["fusion"]["n"])
        self.underperforming.set(1.0 if live["underperforming"] else 0.0)
        if live["switches"] > self._switches_seen:  # counted by the scorer; the counter follows
            self.underperforming_switches.inc(live["switches"] - self._switches_seen)
        self._switches_seen = live["switches"]
        self.last_outcome_timestamp.set(last_outcome_time)

    def observe_attention(self, weights: Mapping[str, float]) -> None:
        """Set fusion_attention_weight per expert; experts no longer named are removed."""
        with self._attention_lock:
            for gone in self._experts - set(weights):
                self.attention_weight.remove(gone)
            for expert, w in weights.items():
                self.attention_weight.labels(expert).set(_number(w))
            self._experts = set(weights)

    def count_prediction(self, source: str, reason: str | None, n: int = 1) -> None:
        """Count `n` forecasts served by `source` ("fusion" or "average") for `reason` (None for the fusion)."""
        child = self._predictions.get((source, REASON_NONE if reason is None else reason))
        if child is None:
            raise ValueError(f"unknown prediction source/reason {source!r}/{reason!r} "
                             f"(known: {', '.join(f'{s}/{r}' for s, r in PREDICTION_LABELS)})")
        child.inc(n)

    def count_outcome(self, duplicate: bool = False, n: int = 1) -> None:
        """Count `n` outcomes: learned, or acknowledged as duplicates of a known event_id."""
        (self.duplicates if duplicate else self.outcomes).inc(n)

    def observe_rpc(self, method: str, seconds: float, code: str | None = None) -> None:
        """Record one RPC: its duration, and an error when `code` (a gRPC status name such as
        "INVALID_ARGUMENT", or a grpc.StatusCode) is neither None nor OK."""
        child = self.rpc_duration.get(method)
        if child is None:
            raise ValueError(f"unknown method {method!r} (known: {', '.join(self.methods)})")
        child.observe(seconds)
        if code is not None:
            name = getattr(code, "name", code)  # grpc.StatusCode.INVALID_ARGUMENT -> "INVALID_ARGUMENT"
            if name != "OK":
                self.rpc_errors.labels(method, name).inc()

    def watch_queue_depth(self, queue: str, depth: Callable[[], float]) -> None:
        """fusion_queue_depth{queue} is `depth()` read at each scrape: the live depth even while
        the queue's consumer is stuck (which is when FusionQueueBacklog matters)."""
        child = self._queue_depth.get(queue)
        if child is None:
            raise ValueError(f"unknown queue {queue!r} (known: {', '.join(QUEUES)})")
        child.set_function(depth)

    def count_checkpoint(self, action: str, ok: bool = True) -> None:
        """Count a checkpoint `action` ("save" or "restore"), or its failure when ok is False."""
        if action not in self._checkpoints:
            raise ValueError(f"unknown checkpoint action {action!r} (known: {', '.join(CHECKPOINT_ACTIONS)})")
        (self._checkpoints if ok else self._checkpoint_errors)[action].inc()

    # --- exposition -----------------------------------------------------------------------------

    def start_http_server(self, port: int, host: str = "127.0.0.1") -> tuple[Any, int]:
        """Serve this registry at http://host:port/metrics from a daemon thread. Port 0 picks a free
        port; returns (server, the port really bound). IPv6 hosts may be bracketed ("[::]")."""
        if self._server is not None:
            raise RuntimeError("the metrics HTTP server is already running")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        server, thread = _start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        self._server, self._thread = server, thread
        return server, server.server_port

    def stop(self) -> None:
        """Stop the HTTP server, if running. Idempotent."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)  # bools become 1.0/0.0
