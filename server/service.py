"""The gRPC service: a thin servicer over the model owner, and the server's lifecycle.

The servicer validates, converts proto to domain types, delegates to the Predictor (Predict) or
the ModelOwner (everything that changes state), and converts back. Domain errors become status
codes in ONE place, `_rpc`:

    FusionInputError             INVALID_ARGUMENT   (the message names the field)
    UnknownEventError            NOT_FOUND
    CheckpointNotFoundError      NOT_FOUND
    IncompatibleCheckpointError  FAILED_PRECONDITION
    OverloadedError              RESOURCE_EXHAUSTED (gRPC itself answers it for oversized messages)
    NotReadyError, ShuttingDownError   UNAVAILABLE
    DeadlineExpiredError         DEADLINE_EXCEEDED  (not done if it had not started; see docs/errors.md)
    anything else                INTERNAL, with a generic message; the trace goes to the log

    >>> from titan_fusion.server.settings import ServiceConfig
    >>> service, port = create_server(ServiceConfig(port=0, metrics_port=-1, data_dir=tmp))  # doctest: +SKIP
    >>> service.wait_ready(10); service.stop()  # doctest: +SKIP
"""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import threading
import time
from collections import deque
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from titan_fusion.client.client import SERVER_KEEPALIVE_OPTIONS
from titan_fusion.client.pb import fusion_pb2 as pb
from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc

from .errors import (CheckpointError, CheckpointNotFoundError, ClientGoneError, ConfigError, DeadlineExpiredError,
                     FusionError, FusionInputError, IncompatibleCheckpointError, NotReadyError, OverloadedError,
                     ShuttingDownError, StorageError, TrainerDiedError, UnknownEventError)
from .events import (MAX_EVENT_ID_LENGTH, MAX_EXPERTS, MAX_FEATURE_ABS, MAX_FEATURES, MAX_NAME_LENGTH,
                     PROB_SUM_TOLERANCE, Expert, parse_event_id, parse_expert_fields, parse_features)
from .inference import Event, Prediction
from .journal import Journal
from .live import LiveScorer
from .metrics import Metrics
from .owner import BulkAck, BulkStream, ModelOwner, OutcomeAck, Predictor, Published
from . import cpus, security
from .settings import SERVICE_PREFIX, ServiceConfig
from .store import CheckpointInfo, CheckpointStore, check_name
from .trainer import LocalTrainer, TrainerProcess, freeze_start_up

log = logging.getLogger("titan_fusion.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FusionService"].full_name  # titan.fusion.v1.FusionService

# Most specific first: the first match wins.
STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (UnknownEventError, grpc.StatusCode.NOT_FOUND),
    (FusionInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (CheckpointNotFoundError, grpc.StatusCode.NOT_FOUND),
    (IncompatibleCheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (TrainerDiedError, grpc.StatusCode.UNAVAILABLE),
    (StorageError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ClientGoneError, grpc.StatusCode.CANCELLED),
)

SOURCE_TO_PB = {"fusion": pb.SOURCE_FUSION, "average": pb.SOURCE_AVERAGE, None: pb.SOURCE_UNSPECIFIED}
REASON_TO_PB = {None: pb.FALLBACK_REASON_UNSPECIFIED, "disabled": pb.FALLBACK_REASON_DISABLED,
                "warming_up": pb.FALLBACK_REASON_WARMING_UP,
                "wrong_expert_count": pb.FALLBACK_REASON_WRONG_EXPERT_COUNT,
                "underperforming": pb.FALLBACK_REASON_UNDERPERFORMING}
DIRECTION_FROM_PB = {pb.DIRECTION_UP: 1, pb.DIRECTION_DOWN: 0}
_PredictResponse = pb.PredictResponse
BULK_CHUNK = 512  # RecordOutcomes rows per owner work item (one journal transaction)
BULK_INFLIGHT = 2  # chunks of one stream queued at the owner at once
MAX_LISTED_REJECTIONS = 100
BULK_DRAIN_SECONDS = 5.0  # after a cancelled stream, how long its handed-over chunks are waited for (Stats)
# A status message travels as a header, percent-encoded (3 bytes for each non-ASCII byte), and a
# grpc client refuses headers over 8 KiB at random, 16 KiB always (the caller gets RESOURCE_EXHAUSTED
# instead of the real status): messages quote the caller's input, so cap them, in UTF-8 bytes.
MAX_STATUS_MESSAGE = 2000  # UTF-8 bytes: at most 6,000 once percent-encoded
MAX_LISTED_MESSAGE = 500  # UTF-8 bytes of each listed bulk rejection's message


def bounded(message: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """`message`, cut to `limit` UTF-8 bytes (on a character boundary) with a mark that it was cut."""
    data = message.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return message
    cut = " ... (truncated)"
    return data[:limit - len(cut)].decode("utf-8", "ignore") + cut


def status_of(e: Exception) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(e, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _rpc(method: str) -> Callable:
    """Map errors to status codes and record latency and errors: the one place for both."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def handler(self: "FusionServicer", request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                result = fn(self, request, context)
            except FusionError as e:
                code = status_of(e)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                    message = "internal error; see the server log"
                else:
                    message = bounded(str(e))
            except Exception:
                code, message = grpc.StatusCode.INTERNAL, "internal error; see the server log"
                log.exception("%s failed", method)
            else:
                self._metrics.rpc_duration[method].observe(time.perf_counter() - started)  # bound child
                return result
            self._metrics.observe_rpc(method, time.perf_counter() - started, code.name)
            self._counters.add("errors")
            context.abort(code, message)
        return handler
    return decorate


class _Counters:
    """The service's own counters for Stats (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values = {"predictions": 0, "outcomes": 0, "duplicates": 0, "errors": 0}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)


def event_from_proto(experts: Any, features: Any) -> Event:
    """An Event from a request's repeated ExpertForecast and features map.

    The common request (every expert with prob_up in (0, 1], an optional prob_down that sums with
    it to 1, an optional confidence in [0, 1], names unique and short; finite features with short
    non-empty names) is converted with as few Python operations as possible. Anything else goes
    through the parsers of server/events.py, which refuse it naming the field, so that the fast path
    never decides an error message: it only accepts what they would accept, with the same result.
    """
    n = len(experts)
    if 0 < n <= MAX_EXPERTS:
        out = []
        named = 0
        names = set()
        for e in experts:
            up = e.prob_up
            # 0.0 may be unset (proto3 optional reads 0.0): the parsers tell required from 0.
            if not 0.0 < up <= 1.0:  # also NaN
                break
            down = e.prob_down
            if (down or e.HasField("prob_down")) and not (
                    0.0 <= down <= 1.0 and abs(up + down - 1.0) <= PROB_SUM_TOLERANCE):
                break
            confidence = e.confidence
            if confidence or e.HasField("confidence"):
                if not 0.0 <= confidence <= 1.0:
                    break
            else:
                confidence = None
            name = e.name
            if name:
                if len(name) > MAX_NAME_LENGTH:
                    break
                names.add(name)
                named += 1
                out.append(Expert(up, confidence, name))
            else:
                out.append(Expert(up, confidence, None))
        else:
            if len(names) == named:  # no duplicate names
                feats = {k: features[k] for k in features}  # dict(map): keys() walks in Python
                if len(feats) <= MAX_FEATURES and "" not in feats:
                    total = sum(feats.values())  # NaN or an infinity makes it non-finite
                    if total - total == 0.0 and (not feats or max(map(len, feats)) <= MAX_NAME_LENGTH
                                                 and max(map(abs, feats.values())) <= MAX_FEATURE_ABS):
                        return Event(tuple(out), feats)
    rows = [(e.prob_up if e.HasField("prob_up") else None, e.prob_down if e.HasField("prob_down") else None,
             e.confidence if e.HasField("confidence") else None, e.name or None) for e in experts]
    return Event(parse_expert_fields(rows, "experts"), parse_features(dict(features)))


def outcome_from_proto(request: pb.RecordOutcomeRequest) -> tuple[Event | None, str, int]:
    """(event or None for "the inputs of the Predict with this event_id", event_id, label)."""
    label = DIRECTION_FROM_PB.get(request.actual_direction)
    if label is None:
        d = request.actual_direction
        raise FusionInputError("actual_direction", "must be DIRECTION_UP or DIRECTION_DOWN, got "
                               f"{pb.Direction.Name(d) if d in pb.Direction.values() else d}")
    event_id = request.event_id
    if event_id and not (len(event_id) <= MAX_EVENT_ID_LENGTH and event_id.isprintable()):
        parse_event_id(event_id)  # raises, naming the field
    experts = request.experts
    if experts:
        return event_from_proto(experts, request.features), event_id, label
    if request.features:
        raise FusionInputError("experts", "features were sent without experts")
    if not event_id:
        raise FusionInputError("experts", "required, unless event_id names an earlier Predict")
    return None, event_id, label


def bulk_row(request: pb.RecordOutcomeRequest) -> tuple[tuple[Event | None, str, int] | None, str,
                                                       FusionInputError | None]:
    """A RecordOutcomes row, converted by the model owner: (outcome, "", None), or (None, the
    row's event_id as far as it can be reported, the error) for a row that is refused."""
    try:
        return outcome_from_proto(request), "", None
    except FusionInputError as e:
        return None, request.event_id[:MAX_EVENT_ID_LENGTH], e


def prediction_to_proto(p: Prediction, event_id: str) -> pb.PredictResponse:
    # Fields left at their default are not set: the same message, built with fewer operations.
    r = _PredictResponse(prob_up=p.prob_up, prob_down=p.prob_down, source=SOURCE_TO_PB[p.source],
                         reason=REASON_TO_PB[p.reason], model_version=p.model_version, event_id=event_id)
    add = r.attention.add
    for n, w in p.attention.items():
        add(name=n, weight=w)
    return r


def live_to_proto(live: dict) -> pb.LiveScores:
    def score(s: dict) -> pb.SourceScore:
        return pb.SourceScore(outcomes=s["n"], accuracy=_or_nan(s["accuracy"]), log_loss=_or_nan(s["log_loss"]),
                              brier=_or_nan(s["brier"]), ece=_or_nan(s["ece"]))
    src = live["sources"]
    return pb.LiveScores(served=score(src["served"]), fusion=score(src["fusion"]), average=score(src["average"]),
                         underperforming=live["underperforming"], switches=live["switches"],
                         log_loss_excess=_or_nan(live["excess"]), window=live["window"])


def _or_nan(x: float | None) -> float:
    return float("nan") if x is None else x


def checkpoint_to_proto(i: CheckpointInfo) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(name=i.name, samples_trained=i.samples_trained, train_steps=i.train_steps,
                             created_at=i.created_at, size_bytes=i.size_bytes)


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on time.monotonic(); None when the caller set none (gRPC then reports
    an enormous time remaining, which no timed wait accepts)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 10 * 365 * 86400:
        return None
    return time.monotonic() + remaining


def _wait(fut: futures.Future, deadline: float | None) -> Any:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return fut.result(timeout)
    except futures.TimeoutError:
        raise DeadlineExpiredError("the deadline passed before the model owner answered") from None


class FusionServicer(pb_grpc.FusionServiceServicer):
    def __init__(self, owner: ModelOwner, predictor: Predictor, metrics: Metrics, counters: _Counters,
                 started: float, *, bulk_streams: int = 4, max_message_bytes: int = 4 * 1024 * 1024):
        self._owner, self._predictor, self._metrics, self._counters = owner, predictor, metrics, counters
        self._started = started
        # A bulk stream holds a handler thread for as long as it is open: at most this many at once,
        # so that Predict, Stats and health always find one.
        self._bulk_streams = threading.BoundedSemaphore(bulk_streams)
        self._bulk_limit = bulk_streams
        # the listed rejections of a bulk answer stay well inside the largest message sent
        self._listing_budget = max_message_bytes // 4

    @_rpc("Predict")
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        event = event_from_proto(request.experts, request.features)
        event_id = request.event_id
        if event_id and not (len(event_id) <= MAX_EVENT_ID_LENGTH and event_id.isprintable()):
            parse_event_id(event_id)  # raises, naming the field
        p = self._predictor.predict(event, event_id, _deadline(context))
        self._counters.add("predictions")
        return prediction_to_proto(p, event_id)

    @_rpc("RecordOutcome")
    def RecordOutcome(self, request: pb.RecordOutcomeRequest, context: grpc.ServicerContext) -> pb.RecordOutcomeResponse:
        outcome = outcome_from_proto(request)
        ack: OutcomeAck = _wait(self._owner.submit("outcome", outcome, _deadline(context)), _deadline(context))
        self._counters.add("duplicates" if ack.duplicate else "outcomes")
        return pb.RecordOutcomeResponse(duplicate=ack.duplicate, samples_trained=ack.samples_trained,
                                        model_version=ack.model_version, used_predict_inputs=ack.used_predict_inputs)

    @_rpc("RecordOutcomes")
    def RecordOutcomes(self, request_iterator: Any, context: grpc.ServicerContext) -> pb.RecordOutcomesResponse:
        return self._bulk(request_iterator, context)

    @_rpc("RecordOutcomeBatches")
    def RecordOutcomeBatches(self, request_iterator: Any,
                             context: grpc.ServicerContext) -> pb.RecordOutcomesResponse:
        return self._bulk((row for batch in request_iterator for row in batch.outcomes), context)

    def _bulk(self, rows_in: Iterator[pb.RecordOutcomeRequest],
              context: grpc.ServicerContext) -> pb.RecordOutcomesResponse:
        if not self._bulk_streams.acquire(blocking=False):
            raise OverloadedError(f"{self._bulk_limit} bulk outcome streams are open already (service.max_bulk_streams); "
                                  "retry when one ends")
        try:
            return self._bulk_stream(rows_in, context)
        finally:
            self._bulk_streams.release()

    def _bulk_stream(self, rows_in: Iterator[pb.RecordOutcomeRequest],
                     context: grpc.ServicerContext) -> pb.RecordOutcomesResponse:
        """Journal a stream of rows in chunks of BULK_CHUNK (at most BULK_INFLIGHT queued at the
        owner at once) and sum up the owner's answers; a row's index counts rows from the start."""
        deadline = _deadline(context)
        resp = pb.RecordOutcomesResponse()
        inflight: deque[futures.Future] = deque()
        stream = BulkStream()  # a failed chunk fails the stream's later chunks too, at the owner

        listed_bytes = 0

        def count(ack: BulkAck) -> tuple[int, int]:
            """Stats' counters, chunk by chunk: a stream that fails or ends early still counts
            what was journaled."""
            accepted = sum(kind == "accepted" for kind, _ in ack.results)
            duplicates = sum(kind == "duplicate" for kind, _ in ack.results)
            self._counters.add("outcomes", accepted)
            self._counters.add("duplicates", duplicates)
            return accepted, duplicates

        def collect(fut: futures.Future) -> None:
            ack: BulkAck = _wait(fut, deadline)
            accepted, duplicates = count(ack)
            resp.accepted += accepted
            resp.duplicates += duplicates
            for kind, detail in ack.results:
                if kind not in ("accepted", "duplicate"):
                    index, event_id, error = detail
                    reject(index, event_id, error)
            resp.journal_sequence = max(resp.journal_sequence, ack.journal_seq)

        def reject(index: int, event_id: str, error: Exception) -> None:
            nonlocal listed_bytes
            resp.rejected += 1
            if len(resp.rejected_outcomes) < MAX_LISTED_REJECTIONS:
                row = pb.RejectedOutcome(index=index, event_id=event_id, code=status_of(error).name,
                                         message=bounded(str(error), MAX_LISTED_MESSAGE))
                size = row.ByteSize() + 4  # and its tag and length in the answer
                if listed_bytes + size <= self._listing_budget:
                    resp.rejected_outcomes.append(row)
                    listed_bytes += size

        # The rows go to the owner as they came, converted there (bulk_row): this thread only
        # receives, so that receiving the next row never waits for converting the last one.
        chunk: list = []
        rows = enumerate(rows_in)
        received = 0
        gone = False
        try:
            while True:
                try:
                    index, request = next(rows)
                except StopIteration:
                    break
                except grpc.RpcError:
                    # The client cancelled or broke the stream. The chunks already handed to the
                    # owner are journaled; the rows of the chunk being gathered are dropped (a re-run
                    # with the same event_ids journals exactly what is missing). grpc may also end
                    # the iterator of a cancelled stream as if the client had closed it (StopIteration,
                    # when it learns of the end of the messages before the cancel): then those rows
                    # are journaled, as a complete stream's would be.
                    log.info("a bulk outcome stream ended early: %d rows received, the first %d handed to "
                             "the owner", received, received - len(chunk))
                    gone = True
                    raise ClientGoneError("the client ended the stream") from None
                received = index + 1
                chunk.append((index, request))
                if len(chunk) >= BULK_CHUNK:
                    inflight.append(self._owner.submit("bulk", (chunk, bulk_row, stream), deadline, block=True))
                    chunk = []
                    while len(inflight) > BULK_INFLIGHT:  # back-pressure: at most this many chunks queued
                        collect(inflight.popleft())
            if chunk:
                inflight.append(self._owner.submit("bulk", (chunk, bulk_row, stream), deadline, block=True))
            while inflight:
                collect(inflight.popleft())
        except BaseException:
            # Count the chunks handed over that the owner journaled (after a cancel, give it a moment
            # to answer for them; after a failure, only those answered already), then fail as before.
            futures.wait(inflight, timeout=BULK_DRAIN_SECONDS if gone else 0)
            for fut in inflight:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    count(fut.result())
            raise
        return resp

    @_rpc("Stats")
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        pub: Published | None = self._owner.published
        if pub is None:
            raise NotReadyError("the service is starting: loading its checkpoint and replaying its journal")
        s = dict(pub.stats)
        names = pub.snapshot.schema.names
        s["avg_attention_entropy"] = pub.serving.avg_entropy(len(names))
        s["last_source"], s["last_reason"] = pub.serving.last_source, pub.serving.last_reason
        training = pb.TrainingStats(**{k: v for k, v in s.items() if k not in ("last_source", "last_reason")},
                                    last_source=SOURCE_TO_PB[s["last_source"]], last_reason=REASON_TO_PB[s["last_reason"]])
        c = self._counters.snapshot()
        service = pb.ServiceStats(**c, queue_depth=self._owner.queue_depth + self._predictor.depth,
                                  uptime_seconds=time.monotonic() - self._started, last_checkpoint=pub.last_checkpoint,
                                  journal_sequence=pub.journal_seq, applied_sequence=pub.applied_seq,
                                  training_lag=pub.training_lag)
        attention = [pb.ExpertWeight(name=n, weight=w) for n, w in pub.serving.weights(names).items()]
        return pb.StatsResponse(training=training, attention=attention, service=service, live=live_to_proto(pub.live))

    @_rpc("Checkpoint")
    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        A = pb.CheckpointRequest
        kind = {A.ACTION_SAVE: "save", A.ACTION_RESTORE: "restore", A.ACTION_LIST: "list"}.get(request.action)
        if kind is None:
            raise FusionInputError("action", "must be ACTION_SAVE, ACTION_RESTORE or ACTION_LIST")
        if kind == "restore" and not request.name:
            raise FusionInputError("name", "required to restore a checkpoint")
        if kind == "list" and request.name:
            raise FusionInputError("name", "must be empty to list checkpoints")
        if request.name:
            check_name(request.name, saving=kind == "save")
        infos = _wait(self._owner.submit(kind, request.name, _deadline(context)), _deadline(context))
        return pb.CheckpointResponse(checkpoints=[checkpoint_to_proto(i) for i in infos])


class DataDirLock:
    """One service per data directory: two owners would interleave one journal."""

    def __init__(self, data_dir: Path):
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a file in the way, no permission, a read-only mount: say which setting
            raise ConfigError(SERVICE_PREFIX + "data_dir",
                              f"{data_dir}: cannot use it as the data directory ({e.strerror or e})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise FusionError(f"another titan-fusion service is using the data directory {data_dir}") from None

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


class FusionService:
    """Owns everything a running service has: the gRPC server, health, metrics, owner, journal."""

    def __init__(self, config: ServiceConfig, *, registry: Any = None, freeze_gc: bool = False):
        """freeze_gc: once the model is recovered, before SERVING, collect and freeze the objects
        alive then out of the garbage collector's full passes (trainer.freeze_start_up): for a
        process that is this service's alone (`titan-fusion serve`), not a library caller's."""
        self.config = config
        self._freeze_gc = freeze_gc
        # Read the token and TLS files first: a ConfigError naming the parameter, nothing to undo.
        self.tokens = security.TokenSource.from_config(config)
        credentials = security.server_credentials(config)
        data = Path(config.data_dir)
        self._lock = DataDirLock(data)
        self.journal: Journal | None = None
        try:
            self._build(config, registry, data, credentials)
        except BaseException as e:
            self._release()
            if isinstance(e, RuntimeError):  # grpcio raises it when it cannot bind the port
                raise FusionError(f"cannot listen on {config.host}:{config.port}: {e}") from None
            raise
        security.log_posture(config, self.tokens)
        self.metrics_port: int | None = None
        self._stopped = False
        self._serving = threading.Event()
        self._health_lock = threading.Lock()  # SERVING (_announce_ready) against NOT_SERVING (_owner_failed)

    def _release(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self._lock.release()

    def _build(self, config: ServiceConfig, registry: Any, data: Path, credentials: Any) -> None:
        self.metrics = Metrics(registry)
        self.counters = _Counters()
        self.journal = Journal(data / "journal.sqlite3", horizon_seconds=config.event_horizon_seconds,
                               keep_outcomes=config.journal_keep_outcomes, keep_event_ids=config.journal_keep_event_ids,
                               keep_predictions=config.journal_keep_predictions)
        self.store = CheckpointStore(data / "checkpoints", keep=config.checkpoints_keep)
        self.cpu_split = cpu_split(config)
        self._affinity_before: dict[int, frozenset[int]] | None = None
        self.owner = ModelOwner(lambda: new_trainer(config, self.cpu_split), self.journal, self.store,
                                queue_size=config.queue_size,
                                checkpoint_every=config.checkpoint_every, on_publish=self._published,
                                on_outcome=lambda dup: self.metrics.count_outcome(dup),
                                on_checkpoint=self.metrics.count_checkpoint,
                                on_trainer_restart=self.metrics.trainer_restarts.inc,
                                on_fail=self._owner_failed,
                                scorer=LiveScorer(config.live_window, config.underperform_margin,
                                                  config.underperform_min_outcomes))
        self.predictor = Predictor(self.owner, max_pending=config.predict_queue_size,
                                   on_predictions=self._predicted)
        self.metrics.watch_queue_depth("owner", lambda: self.owner.queue_depth)
        self.metrics.watch_queue_depth("predict", lambda: self.predictor.depth)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        options = [*SERVER_KEEPALIVE_OPTIONS,
                   ("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes)]
        # Security (server/security.py): ONE interceptor checks the bearer token; TLS from files.
        def refused(method: str, code: grpc.StatusCode) -> None:  # counted like any failed RPC
            name = method.rsplit("/", 1)[-1]
            if method.startswith(f"/{SERVICE_NAME}/") and name in self.metrics.methods:
                self.metrics.observe_rpc(name, 0.0, code.name)
            self.counters.add("errors")

        interceptor = security.TokenInterceptor(security.AccessPolicy(config, self.tokens), on_refused=refused)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                                             thread_name_prefix="grpc"), options=options,
                                  interceptors=[interceptor])
        self._started = time.monotonic()
        pb_grpc.add_FusionServiceServicer_to_server(
            FusionServicer(self.owner, self.predictor, self.metrics, self.counters, self._started,
                           bulk_streams=config.bulk_streams, max_message_bytes=config.max_message_bytes), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise FusionError(f"cannot listen on {config.host}:{config.port}")

    def _published(self, pub: Published) -> None:
        self.metrics.observe_training(pub.stats)
        self.metrics.observe_attention(pub.serving.weights(pub.snapshot.schema.names))
        self.metrics.observe_live(pub.live, pub.last_outcome_time)
        self.metrics.training_lag.set(pub.training_lag)

    def _owner_failed(self, e: BaseException) -> None:
        """The model owner stopped (a bug, or a trainer that keeps dying): report NOT_SERVING, so
        that an orchestrator restarts the service (which recovers from the checkpoint and journal)."""
        log.error("the model owner failed; reporting NOT_SERVING: %s", e)
        with self._health_lock:
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _predicted(self, preds: list) -> None:
        """After each forecast computation (Predictor._compute): `preds` is its batch."""
        self.metrics.predict_batch_size.observe(len(preds))
        for p in preds:
            if isinstance(p, Prediction):
                self.metrics.count_prediction(p.source, p.reason)

    def start(self) -> "FusionService":
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.metrics_port >= 0:
            try:
                _, self.metrics_port = self.metrics.start_http_server(self.config.metrics_port, self.config.metrics_host)
            except OSError as e:
                self._stopped = True
                self._release()
                raise FusionError(f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port}: "
                                  f"{e.strerror or e}") from None
        self.server.start()
        if self.cpu_split is not None:  # after gRPC started its threads, before the owner starts the trainer
            split = self.cpu_split
            self._affinity_before = cpus.pin_process(split.service, grpc_cpus=split.service | split.trainer)
            log.info("the trainer runs on CPUs %s; the service's threads keep to CPUs %s, gRPC core's own "
                     "threads may use CPUs %s (trainer_cpus = %r)", cpus.fmt(split.trainer), cpus.fmt(split.service),
                     cpus.fmt(split.service | split.trainer), self.config.trainer_cpus)
        self.owner.start()
        threading.Thread(target=self._announce_ready, name="ready-watch", daemon=True).start()
        log.info("titan-fusion listening on %s:%d (metrics on %s), data in %s", self.config.host, self.port,
                 f"{self.config.metrics_host}:{self.metrics_port}" if self.metrics_port else "off",
                 self.config.data_dir)
        return self

    def _announce_ready(self) -> None:
        while not self.owner.ready.wait(0.05):
            if self.owner.failed is not None or self._stopped:
                return
        if self._freeze_gc:
            log.info("%d start-up objects frozen out of the garbage collector's full passes", freeze_start_up())
        with self._health_lock:  # an owner that failed meanwhile (_owner_failed) stays NOT_SERVING
            if self._stopped or self.owner.failed is not None:
                return
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self._serving.set()
            t = self.owner.trainer
            log.info("serving: %d outcomes learned, model version %d, training in %s", t.samples_trained, t.version,
                     "a child process" if isinstance(t, TrainerProcess) else "the model owner's thread")

    @property
    def serving(self) -> bool:
        """True once the model is recovered and the service reported SERVING."""
        return self._serving.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the model is recovered and the service SERVING; False on timeout or failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._serving.wait(0.05):
            if self.owner.failed is not None or (deadline is not None and time.monotonic() > deadline):
                return False
        return True

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, stop accepting, let in-flight calls finish (up to
        `grace` seconds), then stop the owner, which saves a checkpoint of anything unsaved."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.owner.stop(checkpoint=True)
        self.metrics.stop()
        self._release()
        if self._affinity_before is not None:  # a library caller's process gets its CPUs back
            cpus.restore(self._affinity_before, self.cpu_split.service | self.cpu_split.trainer)
        log.info("stopped")


def cpu_split(config: ServiceConfig) -> cpus.Split | None:
    """Where the trainer process and the service run (trainer_cpus, server/cpus.py); None: unpinned."""
    if config.trainer != "process":
        return None
    try:
        return cpus.split(config.trainer_cpus, cpus.available())
    except ValueError as e:
        raise ConfigError(SERVICE_PREFIX + "trainer_cpus", str(e)) from None


def new_trainer(config: ServiceConfig, split: cpus.Split | None = None) -> LocalTrainer | TrainerProcess:
    """The model, in a child process (trainer = "process", on split.trainer's CPUs if given) or in
    the owner's thread ("thread")."""
    if config.trainer == "process":  # torch is imported there, not in this process
        return TrainerProcess(config.fusion, config.n_models, cpus=None if split is None else split.trainer)
    import torch

    from .fusion import TransformerFusion
    torch.set_num_threads(1)  # bit-reproducible training; no contention with the gRPC threads
    return LocalTrainer(TransformerFusion(config.fusion, n_models=config.n_models))


def create_server(config: ServiceConfig, *, registry: Any = None,
                  freeze_gc: bool = False) -> tuple[FusionService, int]:
    """Build and start the service; returns it and the port it really listens on (port 0 picks one).
    freeze_gc: see FusionService."""
    service = FusionService(config, registry=registry, freeze_gc=freeze_gc).start()
    return service, service.port
