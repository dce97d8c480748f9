"""One thread owns the model; predictions read what it publishes.

    gRPC handler threads ──Predict──▶ Predictor ──reads──▶ owner.published (immutable Snapshot)
            │                           └─ inputs with an event_id ─┐
            └──RecordOutcome/Checkpoint──▶ bounded queue ◀──────────┘
                                              ▼
                               ModelOwner thread: journal (SQLite) ─▶ TransformerFusion.learn
                                              └─ publishes Snapshot + stats after each batch

ModelOwner is the only code that touches the TransformerFusion (its torch module, optimizer and
buffers), the journal and the checkpoint store. Work reaches it through a bounded queue: a full
queue raises OverloadedError at once. It drains what is queued (never waiting for more), commits the
outcomes of the batch to the journal in one transaction, learns them in journal order, publishes a
new Published (snapshot + statistics), and only then answers the batch: nothing is acknowledged
before its commit, and a Predict sent after an acknowledgement sees the model that includes it.

Predictor answers Predicts without the owner: the first caller to find it idle becomes the leader
and computes one batched forward, with the newest published snapshot, for every Predict queued at
that moment (its own included); the others wait for it. A lone Predict is computed in its own
handler thread, with no hand-off; concurrent ones share a forward. Training never blocks a Predict:
they only share the interpreter.

On start, the owner loads the newest valid checkpoint, replays the journal's outcomes after it
through the same learn() as live outcomes (training is event-driven and deterministic, so the model
is the one an uninterrupted service would have), and only then reports ready.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from .errors import (DeadlineExpiredError, FusionInputError, NotReadyError, OverloadedError,
                     ShuttingDownError, UnknownEventError)
from .fusion import TransformerFusion
from .inference import Event, Prediction, ServingStats, Snapshot
from .journal import Journal
from .store import CheckpointInfo, CheckpointStore, check_name

log = logging.getLogger("titan_fusion.server.owner")
MAX_BATCH = 256  # work items taken from the queue at once
MAX_PREDICT_BATCH = 256


@dataclass(frozen=True)
class OutcomeAck:
    duplicate: bool
    samples_trained: int
    model_version: int
    used_predict_inputs: bool
    seq: int | None  # journal sequence number; None for a duplicate


@dataclass(frozen=True)
class Published:
    """What the owner publishes after each batch; read by any thread, never changed."""

    snapshot: Snapshot
    serving: ServingStats  # thread-safe: predicting threads record into it
    stats: dict[str, Any]  # TransformerFusion.get_training_stats() at publication
    applied_seq: int  # last journal sequence number learned
    last_checkpoint: str


@dataclass
class _Work:
    kind: str  # "outcome", "remember", "save", "restore", "list", "stop"
    payload: Any
    deadline: float | None = None  # time.monotonic() by which it must start
    future: Future | None = None


class ModelOwner:
    def __init__(self, fusion: TransformerFusion, journal: Journal, store: CheckpointStore, *,
                 queue_size: int = 1024, checkpoint_every: int = 1000,
                 on_publish: Callable[[Published], None] | None = None,
                 on_outcome: Callable[[bool], None] | None = None):
        self._fusion = fusion
        self._journal = journal
        self._store = store
        self._queue: queue.Queue[_Work] = queue.Queue(maxsize=queue_size)
        self._checkpoint_every = checkpoint_every
        self._on_publish = on_publish or (lambda p: None)
        self._on_outcome = on_outcome or (lambda duplicate: None)
        self._applied_seq = 0
        self._since_checkpoint = 0
        self._last_checkpoint = ""
        self._accepting = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.dropped_remembers = 0
        self.published: Published | None = None
        self._replies: list[tuple[Future, Any, BaseException | None]] = []  # answered after publishing

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="model-owner", daemon=True)
        self._thread.start()

    def stop(self, *, checkpoint: bool = True, timeout: float | None = None) -> None:
        """Stop taking work, finish what is queued, save a checkpoint if anything is unsaved."""
        if self._thread is None:
            return
        self._accepting = False
        self._queue.put(_Work("stop", checkpoint))  # blocks until there is room: it must arrive
        self._thread.join(timeout)
        self._thread = None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ called by handler threads
    def submit(self, kind: str, payload: Any, deadline: float | None = None) -> Future:
        if not self._accepting:
            raise ShuttingDownError("the service is shutting down")
        if not self.ready.is_set():
            raise NotReadyError("the service is starting: loading its checkpoint and replaying its journal")
        fut: Future = Future()
        try:
            self._queue.put_nowait(_Work(kind, payload, deadline, fut))
        except queue.Full:
            raise OverloadedError(f"the model owner's queue is full ({self._queue.maxsize} items)") from None
        return fut

    def remember(self, items: Sequence[tuple[str, Event]]) -> None:
        """Keep Predict inputs for RecordOutcome by event_id; dropped (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(_Work("remember", items))
        except queue.Full:
            self.dropped_remembers += len(items)

    # ------------------------------------------------------------------ the owner thread
    def _run(self) -> None:
        try:
            self._recover()
        except BaseException as e:  # the service cannot serve without its model: say so loudly
            log.exception("model recovery failed")
            self.failed = e
            self._accepting = False
            return
        self.ready.set()
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None
            i = 0
            while i < len(batch):
                w = batch[i]
                if w.kind == "outcome":
                    j = i
                    while j < len(batch) and batch[j].kind == "outcome":
                        j += 1
                    self._outcomes(batch[i:j])
                    i = j
                    continue
                if w.kind == "stop":
                    stop = w
                else:
                    self._one(w)
                i += 1
            if self._checkpoint_every and self._since_checkpoint >= self._checkpoint_every:
                self._auto_checkpoint()
            self._publish()
            self._answer()
            if stop is not None:
                self._drain_after_stop()
                if stop.payload and self._since_checkpoint:
                    self._auto_checkpoint()
                    self._publish()
                return

    def _drain_after_stop(self) -> None:
        while True:
            try:
                w = self._queue.get_nowait()
            except queue.Empty:
                return
            if w.future is not None:
                w.future.set_exception(ShuttingDownError("the service is shutting down"))

    def _recover(self) -> None:
        info = self._store.load_newest_valid(self._fusion)
        self._applied_seq = info.applied_seq if info else 0
        self._last_checkpoint = info.name if info else ""
        replayed = 0
        for jo in self._journal.outcomes_after(self._applied_seq):
            try:
                self._fusion.learn(jo.event, jo.label)
                replayed += 1
            except FusionInputError as e:  # only if the configuration changed under the journal
                log.error("journal outcome seq=%d no longer fits the model and is skipped: %s", jo.seq, e)
            self._applied_seq = jo.seq
            self._since_checkpoint += 1
        log.info("recovered: checkpoint %s (journal seq %d), replayed %d outcomes, now at seq %d",
                 info.name if info else "none", info.applied_seq if info else 0, replayed, self._applied_seq)
        self._publish()

    def _reply(self, fut: Future | None, result: Any = None, error: BaseException | None = None) -> None:
        if fut is not None:
            self._replies.append((fut, result, error))

    def _answer(self) -> None:
        """Resolve the batch's futures, after its snapshot is published (read-your-writes)."""
        replies, self._replies = self._replies, []
        for fut, result, error in replies:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    def _publish(self) -> None:
        f = self._fusion
        self.published = Published(f.snapshot(), f.serving_stats, f.get_training_stats(),
                                   self._applied_seq, self._last_checkpoint)
        self._on_publish(self.published)

    def _outcomes(self, items: list[_Work]) -> None:
        """Validate, journal in one transaction, then learn in journal order and acknowledge."""
        now = time.monotonic()
        schema = self._fusion.schema
        live = []
        for w in items:
            if w.deadline is not None and now > w.deadline:
                self._reply(w.future, error=DeadlineExpiredError("the deadline passed while the outcome was queued"))
                continue
            event, event_id, label = w.payload
            from_predict = False
            try:
                if event is None:
                    event = self._journal.predicted_event(event_id)
                    if event is None:
                        if self._journal.has_outcome(event_id):
                            live.append((w, None, event_id, label, False))  # a duplicate after all
                            continue
                        raise UnknownEventError("event_id", f"no Predict with event_id {event_id!r} within the last "
                                                f"{self._journal.horizon_seconds:g} s; send the experts and features")
                    from_predict = True
                if len(event.experts) != schema.n_models:
                    raise FusionInputError("experts", f"expected {schema.n_models} experts, got {len(event.experts)}: "
                                           "an outcome with another expert count cannot be learned")
                r = schema.resolve(event)
                if r.expert_names is not None or r.feature_names is not None:
                    schema = replace(schema, expert_names=schema.expert_names or r.expert_names,
                                     feature_names=schema.feature_names if schema.feature_names is not None
                                     else r.feature_names)
            except FusionInputError as e:
                self._reply(w.future, error=e)
                continue
            live.append((w, event, event_id, label, from_predict))
        to_journal = [(eid or None, ev, label) for w, ev, eid, label, _ in live if ev is not None]
        try:
            seqs = iter(self._journal.append_outcomes(to_journal)) if to_journal else iter(())
        except Exception as e:
            log.exception("journal commit failed")
            for w, *_ in live:
                self._reply(w.future, error=e)
            return
        f = self._fusion
        for w, event, event_id, label, from_predict in live:
            seq = next(seqs) if event is not None else None
            if seq is None:
                self._on_outcome(True)
                self._reply(w.future, OutcomeAck(True, f.samples_trained, f.version, from_predict, None))
                continue
            try:
                f.learn(event, label)
            except Exception as e:  # validated above: a bug. The journal keeps it for the record.
                log.exception("learning journaled outcome seq=%d failed", seq)
                self._reply(w.future, error=e)
                continue
            finally:
                self._applied_seq = seq
            self._since_checkpoint += 1
            self._on_outcome(False)
            self._reply(w.future, OutcomeAck(False, f.samples_trained, f.version, from_predict, seq))

    def _one(self, w: _Work) -> None:
        try:
            if w.kind == "remember":
                self._journal.remember_predictions(w.payload)
                return
            if w.deadline is not None and time.monotonic() > w.deadline:
                raise DeadlineExpiredError("the deadline passed while the request was queued")
            if w.kind == "save":
                name = check_name(w.payload) if w.payload else f"step-{self._fusion.version}"
                info = self._store.save(self._fusion, name, self._applied_seq)
                self._last_checkpoint = info.name
                self._since_checkpoint = 0
                self._reply(w.future, [info])
            elif w.kind == "restore":
                info = self._store.load(self._fusion, check_name(w.payload))
                # Outcomes journaled after that checkpoint are undone by the restore: an automatic
                # checkpoint of the restored model, at the journal's head, makes recovery agree.
                self._applied_seq = self._journal.last_seq()
                self._auto_checkpoint()
                self._last_checkpoint = info.name
                self._reply(w.future, [info])
            elif w.kind == "list":
                self._reply(w.future, self._store.list())
            else:
                raise ValueError(f"unknown work kind {w.kind!r}")
        except Exception as e:
            if w.future is None:
                log.exception("%s failed", w.kind)
            else:
                self._reply(w.future, error=e)

    def _auto_checkpoint(self) -> None:
        try:
            info = self._store.save(self._fusion, None, self._applied_seq)
        except Exception:
            log.exception("automatic checkpoint failed; the journal keeps every outcome since the last one")
            return
        self._last_checkpoint = info.name
        self._since_checkpoint = 0
        self._journal.prune(self._applied_seq)


class _Slot:
    __slots__ = ("event", "event_id", "deadline", "done", "result")

    def __init__(self, event: Event, event_id: str, deadline: float | None):
        self.event, self.event_id, self.deadline = event, event_id, deadline
        self.done = threading.Event()
        self.result: Prediction | Exception | None = None


class Predictor:
    """Answers Predicts from the owner's published snapshot by flat combining (see module doc)."""

    def __init__(self, owner: ModelOwner, *, max_pending: int = 1024,
                 on_predictions: Callable[[Sequence[Prediction | Exception]], None] | None = None):
        self._owner = owner
        self._lock = threading.Lock()
        self._pending: deque[_Slot] = deque()
        self._max_pending = max_pending
        self._on_predictions = on_predictions or (lambda preds: None)
        self.override: Callable[[Sequence[Prediction | Exception]], list[Prediction | Exception]] | None = None

    @property
    def depth(self) -> int:
        return len(self._pending)

    def predict(self, event: Event, event_id: str = "", deadline: float | None = None) -> Prediction:
        if self._owner.published is None or not self._owner.ready.is_set():
            raise NotReadyError("the service is starting: loading its checkpoint and replaying its journal")
        if len(self._pending) >= self._max_pending:
            raise OverloadedError(f"too many Predicts waiting ({self._max_pending})")
        slot = _Slot(event, event_id, deadline)
        self._pending.append(slot)
        while not slot.done.is_set():
            if self._lock.acquire(blocking=False):
                try:
                    self._serve_pending()
                finally:
                    self._lock.release()
                # A Predict queued after our last look, whose thread found the lock taken, is
                # served on the next turn of this loop (or by its own thread).
                if self._pending:
                    continue
            else:
                slot.done.wait(0.005)
        if isinstance(slot.result, Exception):
            raise slot.result
        return slot.result

    def _serve_pending(self) -> None:
        while self._pending:
            batch: list[_Slot] = []
            now = time.monotonic()
            while self._pending and len(batch) < MAX_PREDICT_BATCH:
                s = self._pending.popleft()
                if s.deadline is not None and now > s.deadline:
                    s.result = DeadlineExpiredError("the deadline passed while the Predict was queued")
                    s.done.set()
                else:
                    batch.append(s)
            if not batch:
                continue
            pub = self._owner.published
            try:
                preds: list[Prediction | Exception] = pub.snapshot.predict([s.event for s in batch])
                if self.override is not None:
                    preds = self.override(preds)
                pub.serving.record(preds, pub.snapshot.schema.names)
                self._on_predictions(preds)
                remember = [(s.event_id, s.event) for s, p in zip(batch, preds)
                            if s.event_id and isinstance(p, Prediction)]
                if remember:
                    self._owner.remember(remember)
            except Exception as e:  # a bug: every Predict of the batch gets it, none hangs
                log.exception("batched predict failed")
                preds = [e] * len(batch)
            for s, p in zip(batch, preds):
                s.result = p
                s.done.set()
