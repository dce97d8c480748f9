"""One thread owns the model; predictions read what it publishes.

    gRPC handler threads ──Predict──▶ Predictor ──reads──▶ owner.published (immutable Snapshot)
            │                           └─ inputs with an event_id ─┐
            └──RecordOutcome(s)/Checkpoint──▶ bounded queue ◀───────┘
                                              ▼
                               ModelOwner thread: journal (SQLite) ─▶ trainer.learn ─▶ trainer process
                                              └─ publishes Snapshot + stats after each batch

ModelOwner is the only code that changes the model (through its trainer, server/trainer.py: by
default a child process that holds the TransformerFusion, its torch module, optimizer and buffers),
the journal and the checkpoint store. Work reaches it through a bounded queue: a full
queue raises OverloadedError at once. It drains what is queued, commits the outcomes of the batch to
the journal in one transaction, learns them in journal order, publishes a new Published (snapshot +
statistics), and only then answers the batch: nothing is acknowledged before its commit, and a
Predict sent after a RecordOutcome's acknowledgement sees the model that includes it. A
bulk chunk (RecordOutcomes, RecordOutcomeBatches) is acknowledged once journaled; while a bulk stream arrives and no
caller waits for an outcome, the owner journals first (waiting briefly for the next chunk rather
than training between chunks) and training catches up from the backlog after it. The backlog holds
a bulk stream's rows as spans of the journal (a few objects, however many rows), read back a chunk
at a time as they are learned.

If the trainer process dies, the owner starts a new one and rebuilds the model from the newest
checkpoint and the journal; if it dies MAX_RESTARTS_IN_A_ROW + 1 times without learning anything,
the owner stops: waiting callers get an error, `failed` is set and the service reports NOT_SERVING.

Predictor answers Predicts without the owner: the first caller to find it idle becomes the leader
and computes, with the newest published snapshot, every Predict queued at that moment (its own
included; each through the compiled single-event forward); the others wait for it. A lone Predict
is computed in its own handler thread, with no hand-off. Training never blocks a Predict
(with the trainer process it does not even share the interpreter).

On start, the owner loads the newest valid checkpoint, replays the journal's outcomes after it
through the same learn() as live outcomes (training is event-driven and deterministic, so the model
is the one an uninterrupted service would have; live scoring takes what was journaled with each
outcome, so the served source is that service's too), and only then reports ready; after
STARTUP_LEARN_SECONDS, what is left (a bulk replay's backlog) is learned while serving, as it would
have been without the restart.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import (DeadlineExpiredError, FusionInputError, NotReadyError, OverloadedError,
                     ShuttingDownError, StorageError, UnknownEventError)
from .events import plain_average
from .inference import (REASON_UNDERPERFORMING, SOURCE_FUSION, Event, Prediction, Schema, ServingStats, Snapshot,
                        average_prediction)
from .journal import Journal, Scored
from .live import LiveScorer
from .store import AUTO_PREFIX, CheckpointInfo, CheckpointStore, check_name
from .trainer import LocalTrainer, TrainerDiedError, TrainerProcess

log = logging.getLogger("titan_fusion.server.owner")
MAX_BATCH = 256  # work items taken from the queue at once
MAX_PREDICT_BATCH = 256
LEARN_SLICE_SECONDS = 0.005  # learning between two batches of work while more work waits
# Learning between two publications while nothing else waits (work submitted meanwhile cuts it
# short: Trainer.interrupt). Each slice costs the trainer a turnaround through the owner: with
# 0.1 s, the service learned a bulk backlog at 0.85-0.86x of the in-process class, 0.5 s 0.89-0.95x.
CATCH_UP_SLICE_SECONDS = 0.5
# While catching up with no caller waiting, a fresh snapshot at most this often: each costs the
# trainer its fold and a transfer, and every 0.1 s that was 5-9% of a bulk replay's catch-up here.
SNAPSHOT_EVERY_SECONDS = 0.5
CATCH_UP_CHUNK = 256  # outcomes handed to the trainer at once, at most
MAX_RESTARTS_IN_A_ROW = 3  # trainer deaths at the same journal seq before the owner gives up
BULK_QUIET_SECONDS = 0.05  # a bulk stream counts as arriving until this long after its last chunk
# At shutdown, learning what is journaled and not learned yet takes at most this long: a live
# service's last few outcomes, not a bulk replay's backlog (hours of training at worst), which stays
# in the journal for the next start. With the 5 s grace and the checkpoint, a stop fits docker's 10 s.
STOP_LEARN_SECONDS = 3.0
# At start, the journal after the newest checkpoint is learned before the service reports ready for
# this long at most (a restart's few outcomes: served as they were before it). A longer backlog, a
# bulk replay's, is learned while serving, as it would have been without the restart.
STARTUP_LEARN_SECONDS = 10.0
# A checkpoint save holds every outcome acknowledged before it, so it learns the backlog first:
# within the caller's deadline, or this long without one; past that it is refused (UNAVAILABLE),
# what was learned meanwhile staying learned, rather than holding the owner for a bulk replay's hours.
CHECKPOINT_LEARN_SECONDS = 60.0
Trainer = LocalTrainer | TrainerProcess


@dataclass(frozen=True)
class OutcomeAck:
    duplicate: bool
    samples_trained: int
    model_version: int
    used_predict_inputs: bool
    seq: int | None  # journal sequence number; None for a duplicate


@dataclass
class BulkStream:
    """What the chunks of one RecordOutcomes stream share: once one of them fails (a journal
    error, a full disk, its deadline), the later ones are refused too, so that a re-run journals
    the missing rows in their place rather than after rows that came later in the file."""

    failed: BaseException | None = None


@dataclass(frozen=True)
class BulkAck:
    """A RecordOutcomes chunk: per row ("accepted", (index, seq)), ("duplicate", (index, event_id))
    or ("rejected", (index, event_id, FusionInputError))."""

    results: list[tuple[str, Any]]
    journal_seq: int


@dataclass(frozen=True)
class _Duplicate:
    from_predict: bool


@dataclass(slots=True)
class _Pending:
    seq: int
    event: Event
    label: int
    future: Future | None  # a RecordOutcome waiting for this outcome to be learned
    from_predict: bool
    scored: Scored | None  # what live scoring takes from its Predict (journaled with it)


@dataclass(slots=True)
class _Span:
    """Journaled outcomes that nobody waits for, held as a place in the journal: its next `count`
    outcomes from seq `first` on (seq `last` the newest)."""

    first: int
    last: int
    count: int


class Backlog:
    """The outcomes journaled and not learned yet, in seq order (the owner thread's alone).

    An outcome whose caller waits for it (RecordOutcome) is held as it came: its event, its future.
    The rows that nobody waits for (a bulk replay's, a restart's backlog) are held as spans of the
    journal and read back from it (event, label, live scoring's take) a chunk at a time, when they
    are learned: a replay's backlog of millions of rows costs a few objects, where a _Pending per
    row cost 120 bytes (120 MB a million rows).
    """

    def __init__(self, journal: Journal):
        self._journal = journal
        self._items: deque[_Pending | _Span] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, p: _Pending) -> None:
        self._items.append(p)
        self._len += 1

    def add_journaled(self, first: int, last: int, count: int) -> None:
        """`count` journaled outcomes, seqs `first` to `last`, after every outcome added so far."""
        if count:
            tail = self._items[-1] if self._items else None
            if type(tail) is _Span:
                tail.last, tail.count = last, tail.count + count
            else:
                self._items.append(_Span(first, last, count))
            self._len += count

    @property
    def last_seq(self) -> int:
        tail = self._items[-1]
        return tail.seq if type(tail) is _Pending else tail.last

    def head(self, n: int) -> list[_Pending]:
        """The first `n` outcomes (fewer if there are fewer), spans read back from the journal."""
        out: list[_Pending] = []
        for item in self._items:
            if len(out) >= n:
                break
            if type(item) is _Pending:
                out.append(item)
                continue
            k = min(item.count, n - len(out))
            rows = self._journal.outcomes_from(item.first, k)
            if len(rows) != k or rows[-1].seq > item.last:  # the journal lost rows under the owner: a bug
                raise RuntimeError(f"the backlog's next {k} outcomes from seq {item.first} to {item.last} are "
                                   f"not in the journal (it has {len(rows)}, up to seq {rows[-1].seq if rows else None})")
            out.extend(_Pending(o.seq, o.event, o.label, None, False, o.scored) for o in rows)
        return out

    def drop(self, p: _Pending) -> None:
        """Remove the first outcome, `p` (from head())."""
        item = self._items[0]
        if type(item) is _Pending or item.count == 1:
            self._items.popleft()
        else:
            item.first, item.count = p.seq + 1, item.count - 1
        self._len -= 1

    def held(self) -> list[_Pending]:
        """The outcomes held in memory: the ones with a caller waiting."""
        return [p for p in self._items if type(p) is _Pending]

    def clear(self) -> None:
        self._items.clear()
        self._len = 0


@dataclass(frozen=True)
class Published:
    """What the owner publishes after each batch; read by any thread, never changed."""

    snapshot: Snapshot
    serving: ServingStats  # thread-safe: predicting threads record into it
    stats: dict[str, Any]  # TransformerFusion.get_training_stats() at publication
    applied_seq: int  # last journal sequence number learned
    journal_seq: int  # last journal sequence number committed
    training_lag: int  # outcomes journaled but not learned yet
    last_checkpoint: str
    live: dict[str, Any]  # LiveScorer.snapshot()
    last_outcome_time: float  # unix time the newest outcome was journaled; 0 when the journal has none


@dataclass
class _Work:
    kind: str  # "outcome", "bulk", "remember", "save", "restore", "list", "stop"
    payload: Any
    deadline: float | None = None  # time.monotonic() by which it must start
    future: Future | None = None


class ModelOwner:
    def __init__(self, new_trainer: Callable[[], Trainer], journal: Journal, store: CheckpointStore, *,
                 queue_size: int = 1024, checkpoint_every: int = 1000,
                 on_publish: Callable[[Published], None] | None = None,
                 on_outcome: Callable[[bool], None] | None = None, scorer: LiveScorer | None = None,
                 on_checkpoint: Callable[[str, bool], None] | None = None,
                 on_trainer_restart: Callable[[], None] | None = None,
                 on_fail: Callable[[BaseException], None] | None = None):
        """`new_trainer` makes the trainer that holds the model (server/trainer.py): called by the
        owner thread when it starts, and again if a trainer process dies (then `on_trainer_restart`).
        `on_fail` hears of a failure that stops the owner (a bug, or a trainer that keeps dying)."""
        self._new_trainer = new_trainer
        self._on_trainer_restart = on_trainer_restart or (lambda: None)
        self._on_fail = on_fail or (lambda e: None)
        self._restarts_in_a_row = 0  # trainer restarts since applied_seq last advanced
        self._restarted_at = -1  # applied_seq at the last restart
        self._trainer: Trainer | None = None
        self.trainer_restarts = 0
        self._snapshot_at = 0.0  # time.monotonic() of the last snapshot asked of the trainer
        self._learn_seconds = 0.002  # moving average of the time to learn one outcome (sizes the chunks)
        self._waiters = 0  # RecordOutcome callers waiting for an outcome in the backlog to be learned
        # Duplicates of outcomes still in the backlog: (seq of the original, future, from_predict),
        # answered once the original is learned (read-your-writes, as for the original).
        self._dup_waits: list[tuple[int, Future, bool]] = []
        self._bulk_at = 0.0  # time.monotonic() of the last bulk chunk committed
        self._scorer = scorer or LiveScorer()
        self._last_outcome_time = 0.0
        self._journal = journal
        self._store = store
        self._queue: queue.Queue[_Work] = queue.Queue(maxsize=queue_size)
        self._checkpoint_every = checkpoint_every
        self._on_publish = on_publish or (lambda p: None)
        self._on_outcome = on_outcome or (lambda duplicate: None)
        self._on_checkpoint = on_checkpoint or (lambda action, ok: None)  # ("save"|"restore", succeeded)
        self._applied_seq = 0  # last journal seq the model has learned
        self._journal_seq = 0  # last journal seq committed
        self._schema_ahead = None  # the schema as of the journal's head (validation); set by recovery
        self._backlog = Backlog(journal)  # journaled, not yet learned, in seq order
        self._since_checkpoint = 0
        self._last_checkpoint = ""
        self._accepting = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.published: Published | None = None
        self._replies: list[tuple[Future, Any, BaseException | None]] = []  # answered after publishing
        self._taken: list[_Work] = []  # the batch the owner thread is working through
        self._closed = False  # the owner thread has exited: nothing queued from now on is taken

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="model-owner", daemon=True)
        self._thread.start()

    def stop(self, *, checkpoint: bool = True, timeout: float | None = None) -> None:
        """Stop taking work, learn what is journaled, save a checkpoint if anything is unsaved."""
        if self._thread is None:
            return
        self._accepting = False
        while self._thread.is_alive():  # it must arrive; a failed owner thread takes nothing
            try:
                self._queue.put(_Work("stop", checkpoint), timeout=0.1)
                self._interrupt_learning()
                break
            except queue.Full:
                continue
        self._thread.join(timeout)
        self._thread = None

    @property
    def trainer(self) -> Trainer | None:
        """What holds the model (None until the owner thread has started it)."""
        return self._trainer

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ called by handler threads
    def submit(self, kind: str, payload: Any, deadline: float | None = None, *, block: bool = False) -> Future:
        """Queue work for the owner. Full queue: OverloadedError at once, or with `block`, wait for
        room until the deadline (a bulk stream's back-pressure)."""
        if self.failed is not None:
            raise NotReadyError(f"the model owner failed and the service cannot learn: {self.failed}")
        if not self._accepting:
            raise ShuttingDownError("the service is shutting down")
        if not self.ready.is_set():
            raise NotReadyError("the service is starting: loading its checkpoint and replaying its journal")
        fut: Future = Future()
        try:
            if block:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._queue.put(_Work(kind, payload, deadline, fut), timeout=timeout)
            else:
                self._queue.put_nowait(_Work(kind, payload, deadline, fut))
        except queue.Full:
            raise OverloadedError(f"the model owner's queue is full ({self._queue.maxsize} items)") from None
        if self._closed:  # the owner thread exited (stopped or failed) after the checks above
            self._refuse_queued(self.failed or ShuttingDownError("the service is shutting down"))
        self._interrupt_learning()
        return fut

    def _interrupt_learning(self) -> None:
        """Cut a catch-up slice short: work is queued (Predicts' remembered inputs do not cut it)."""
        t = self._trainer
        if t is not None:
            t.interrupt()

    def remember(self, items: Sequence[tuple]) -> bool:
        """Keep Predicts with an event_id (inputs and forecasts) for RecordOutcome by event_id and
        live scoring. False when the queue is full: those Predicts must then be refused, since a
        later RecordOutcome by their event_id could not find them."""
        if not self._accepting:
            return False
        try:
            self._queue.put_nowait(_Work("remember", items))
        except queue.Full:
            return False
        return True

    # ------------------------------------------------------------------ the owner thread
    def _run(self) -> None:
        try:
            self._recover()
        except BaseException as e:  # the service cannot serve without its model: say so loudly
            log.exception("model recovery failed")
            self.failed = e
            self._accepting = False
            if self._trainer is not None:
                self._trainer.close()
            return
        self.ready.set()
        try:
            self._serve()
        except BaseException as e:  # a bug, or a trainer that cannot be restarted: fail loudly, hang nobody
            log.exception("the model owner failed")
            self.failed = e
            self._accepting = False
            self.ready.clear()
            self._fail_everything(e)
            self._on_fail(e)
        finally:
            self._closed = True  # then the queue is emptied once more: see submit()
            try:
                self._refuse_queued(self.failed or ShuttingDownError("the service is shutting down"))
            finally:
                self._trainer.close()

    def _refuse_queued(self, e: BaseException) -> None:
        """Answer everything queued with `e` (the owner thread takes nothing any more). Called by
        the owner thread as it exits and by a handler thread that queued work just then: each item
        is taken from the queue once, by one of them."""
        while True:
            try:
                w = self._queue.get_nowait()
            except queue.Empty:
                return
            _refuse(w.future, e)

    def _fail_everything(self, e: BaseException) -> None:
        for fut, _, _ in self._replies:
            _refuse(fut, e)
        self._replies = []
        for w in self._taken:  # the rest of the batch the failure interrupted
            _refuse(w.future, e)
        self._taken = []
        for p in self._backlog.held():
            _refuse(p.future, e)
        for _, fut, _ in self._dup_waits:
            _refuse(fut, e)
        self._backlog.clear()
        self._dup_waits.clear()
        self._waiters = 0
        # what is queued: by _run's last drain, which also takes what arrives after this

    def _serve(self) -> None:
        while True:
            # Wait for work when there is nothing to learn, or (briefly) while a bulk stream arrives.
            streaming = self._streaming()
            batch = self._taken = self._take(block=not self._backlog or (streaming and not self._waiters),
                                             timeout=BULK_QUIET_SECONDS if self._backlog else None)
            stop = None
            i = 0
            while i < len(batch):
                w = batch[i]
                if w.kind == "outcome":  # consecutive outcomes share one journal transaction
                    j = i
                    while j < len(batch) and batch[j].kind == "outcome":
                        j += 1
                    self._commit_outcomes(batch[i:j])
                    i = j
                    continue
                if w.kind == "stop":
                    stop = w
                elif w.kind == "bulk":
                    self._commit_bulk(w)
                else:
                    self._one(w)
                i += 1
            # Learn what is journaled, in slices, publishing between them: a short one when more
            # work waits or a bulk stream is arriving (commits stay quick), a longer one when idle
            # (catching up with a bulk replay). While bulk chunks wait and no caller waits for its
            # outcome, journal first: a bulk replay is acknowledged at the journal's pace and
            # training catches up after it.
            streaming = self._streaming()
            if stop is None and (self._waiters or not streaming):
                # answers ready (a save's refusal, say) go out after the slice: a short one then
                self._learn_backlog(LEARN_SLICE_SECONDS if streaming or not self._queue.empty() or self._replies
                                    else CATCH_UP_SLICE_SECONDS, interruptible=True)
            # also while catching up with a backlog: a crash then re-learns about checkpoint_every
            # outcomes (plus the last slice), not everything since the catch-up began
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

    def _streaming(self) -> bool:
        """A bulk stream is arriving: a chunk waits in the queue or one was committed just now."""
        if time.monotonic() - self._bulk_at < BULK_QUIET_SECONDS:
            return True
        with self._queue.mutex:
            return any(w.kind == "bulk" for w in self._queue.queue)

    def _take(self, block: bool, timeout: float | None = None) -> list[_Work]:
        """What is queued now, waiting (up to `timeout`) for the first item if `block`."""
        if self._trainer is not None:  # what is submitted from now on interrupts the next catch-up slice
            self._trainer.clear_interrupt()
        batch: list[_Work] = []
        if block:
            try:
                batch.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                return batch
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _drain_after_stop(self) -> None:
        """Learn the journal's backlog for up to STOP_LEARN_SECONDS, then answer what is left: the
        server has stopped, so no caller is waiting any more."""
        self._learn_backlog(STOP_LEARN_SECONDS)
        if self._backlog:
            log.warning("stopping with %d journaled outcomes not learned yet; the next start learns them "
                        "from the journal", len(self._backlog))
            left = ShuttingDownError("the service is shutting down; the outcome is journaled and the next start learns it")
            for p in self._backlog.held():
                self._reply(p.future, error=left)
            for _, fut, _ in self._dup_waits:
                self._reply(fut, error=left)
            self._backlog.clear()
            self._dup_waits.clear()
            self._waiters = 0
        while True:
            try:
                w = self._queue.get_nowait()
            except queue.Empty:
                break
            if w.future is not None:
                self._reply(w.future, error=ShuttingDownError("the service is shutting down"))
        self._answer()

    def _recover(self) -> None:
        """Load the newest checkpoint and learn the journal after it (for at most
        STARTUP_LEARN_SECONDS; the rest while serving). A trainer that dies meanwhile (an OOM kill,
        say) is replaced and the recovery starts over, as a restart while serving would; the same
        bound on deaths in a row applies."""
        from . import onekernel
        onekernel.warm()  # the compiled single-event forward, before SERVING (docs/operations.md)
        deaths = 0
        while True:
            try:
                self._trainer = self._new_trainer()
                self._trainer.warm_up()
                info, replayed = self._rebuild(None, score=True, seconds=STARTUP_LEARN_SECONDS)
                break
            except TrainerDiedError as e:
                deaths += 1
                if self._trainer is not None:
                    self._trainer.close()
                    self._trainer = None
                if deaths > MAX_RESTARTS_IN_A_ROW:
                    raise TrainerDiedError(f"the trainer died {deaths} times while the model was recovered: {e}") from e
                log.error("%s; the trainer died while the model was recovered: starting a new one and "
                          "recovering again", e)
                self.trainer_restarts += 1
                self._on_trainer_restart()
        self._since_checkpoint += replayed
        if self._journal.last_seq() < self._applied_seq:
            # A journal that ends before the checkpoint (restored from a backup older than the
            # checkpoints, or replaced): new outcomes must be numbered after what the checkpoint
            # covers, or a later recovery would skip them as learned.
            log.warning("the journal ends at seq %d, before checkpoint %s (seq %d): it was restored from an "
                        "older backup or replaced; the outcomes in between are in the model but not in the "
                        "journal (their event_ids are not recognised as duplicates); new outcomes are "
                        "numbered from %d", self._journal.last_seq(), info.name if info else "none",
                        self._applied_seq, self._applied_seq + 1)
            self._journal.advance_seq(self._applied_seq)
        self._journal_seq = max(self._applied_seq, self._journal.last_seq())
        # What the time did not allow is learned while serving: a span of the journal, like a bulk
        # replay's rows (read back with what live scoring took from their Predicts).
        self._backlog.add_journaled(self._applied_seq + 1, self._journal_seq,
                                    self._journal.count_outcomes(after=self._applied_seq))
        if not self._backlog:
            self._applied_seq = self._journal_seq
        self._last_outcome_time = self._journal.last_recorded_at()  # so "no outcomes for N hours" survives restarts
        self._schema_ahead = self._schema_after_backlog()
        log.info("recovered: checkpoint %s (journal seq %d), replayed %d outcomes, now at seq %d",
                 info.name if info else "none", info.applied_seq if info else 0, replayed, self._applied_seq)
        if self._backlog:
            log.warning("%d journaled outcomes (after seq %d, up to %d) are left to learn after %.0f s of recovery: the "
                        "service serves meanwhile and learns them as it would a bulk replay (Stats: training_lag)",
                        len(self._backlog), self._applied_seq, self._backlog.last_seq, STARTUP_LEARN_SECONDS)
        self._publish()

    def _schema_after_backlog(self) -> Schema:
        """The schema as of the journal's head: the model's, and what the outcomes still to learn
        fix (expert names are fixed by the first outcome whose experts are all named, which may be
        in the backlog). New outcomes are validated against it."""
        schema = self._trainer.schema
        if self._backlog and (schema.expert_names is None or schema.feature_names is None):
            for jo in self._journal.outcomes_after(self._applied_seq):
                try:
                    _, _, names, features = schema.check(jo.event, "experts")
                except FusionInputError:  # learning will say so (the configuration changed under the journal)
                    continue
                schema = schema.fixing(names, features)
                if schema.expert_names is not None and schema.feature_names is not None:
                    break
        return schema

    def _rebuild(self, upto: int | None, *, score: bool,
                 seconds: float | None = None) -> tuple[CheckpointInfo | None, int]:
        """Load the newest valid checkpoint into the trainer and learn the journal's outcomes after
        it, up to seq `upto` (None: all), or for about `seconds` (at least one chunk); with `score`,
        the live scorer starts from the checkpoint's state and scores them too. Sets applied_seq;
        returns (checkpoint, outcomes replayed)."""
        started = time.monotonic()
        info = self._store.load_newest_valid(self._trainer)
        self._applied_seq = info.applied_seq if info else 0
        self._last_checkpoint = info.name if info else ""
        if score:
            self._scorer.load(info.extra.get("live") if info else None)
        replayed = 0
        chunk: list = []
        for jo in self._journal.outcomes_after(self._applied_seq):
            if upto is not None and jo.seq > upto:
                break
            chunk.append(jo)
            if len(chunk) >= CATCH_UP_CHUNK:
                replayed += self._replay(chunk, score)
                chunk = []
                if seconds is not None and time.monotonic() - started > seconds:
                    return info, replayed
        replayed += self._replay(chunk, score)
        return info, replayed

    def _replay(self, outcomes: list, score: bool) -> int:
        if not outcomes:
            return 0
        results = self._trainer.learn([(jo.event, jo.label) for jo in outcomes], None)
        for jo, (err, _, _) in zip(outcomes, results):
            if isinstance(err, FusionInputError):  # only if the configuration changed under the journal
                log.error("journal outcome seq=%d no longer fits the model and is skipped: %s", jo.seq, err)
            elif err is not None:
                raise err
            elif score:
                self._score(jo.scored, jo.label)
            self._applied_seq = jo.seq
        return len(outcomes)

    def _restart_trainer(self, why: BaseException) -> None:
        """The trainer process died: start a new one and rebuild the model it had (the newest
        checkpoint plus the journal up to applied_seq: training is deterministic, so it is the same
        model). Outcomes journaled but not learned yet stay queued for learning. A new trainer that
        dies while it starts or rebuilds counts as one more death in a row, and is replaced too."""
        if self._applied_seq != self._restarted_at:
            self._restarts_in_a_row = 0
        self._restarted_at = applied = self._applied_seq
        served = self._trainer.serving_stats  # Predicts record into it until the next publication
        while True:
            self._restarts_in_a_row += 1
            if self._restarts_in_a_row > MAX_RESTARTS_IN_A_ROW:  # the same outcome kills it: stop, loudly
                raise TrainerDiedError(f"the trainer died {MAX_RESTARTS_IN_A_ROW + 1} times at journal seq "
                                       f"{applied} without learning anything: {why}")
            log.error("%s; starting a new trainer and rebuilding the model from the newest checkpoint and the journal", why)
            self._trainer.close()
            try:
                self._trainer = self._new_trainer()
                self.trainer_restarts += 1
                self._on_trainer_restart()
                info, replayed = self._rebuild(applied, score=False)
                break
            except TrainerDiedError as e:  # the new one died too (an OOM kill, say): next attempt
                why = e
            finally:
                self._applied_seq = applied
        # what was served, before the restart and during the rebuild (the checkpoint has older
        # statistics); published at once, so that Predicts record into the new trainer's from now on
        self._trainer.serving_stats.load(served.state())
        self._publish()
        log.info("trainer restarted: checkpoint %s, replayed %d outcomes up to seq %d",
                 info.name if info else "none", replayed, applied)

    def _publish(self) -> None:
        t = self._trainer
        self.published = Published(t.snapshot().prepare(), t.serving_stats, t.stats(), self._applied_seq,
                                   self._journal_seq, len(self._backlog), self._last_checkpoint,
                                   self._scorer.snapshot(), self._last_outcome_time)
        self._on_publish(self.published)

    def _reply(self, fut: Future | None, result: Any = None, error: BaseException | None = None) -> None:
        if fut is not None:
            self._replies.append((fut, result, error))

    def _answer(self) -> None:
        """Resolve the batch's futures, after its snapshot is published (read-your-writes)."""
        replies, self._replies = self._replies, []
        t = self._trainer
        for fut, result, error in replies:
            if error is not None:
                fut.set_exception(error)
            else:
                if isinstance(result, _Duplicate):  # it reports the model as it now stands
                    result = OutcomeAck(True, t.samples_trained, t.version, result.from_predict, None)
                fut.set_result(result)

    # ------------------------------------------------------------------ outcomes
    def _validate(self, event: Event | None, event_id: str, validated: set[str], bulk: bool = False,
                  checked: dict | None = None) -> tuple[Event | None, bool, Scored | None]:
        """Resolve an outcome's inputs (from an earlier Predict if it has none) and check them
        against the schema as of the journal's head. Returns (event, from_predict, what live scoring
        takes from the Predict with this event_id, if any); event None means a duplicate known only
        by its event_id. Raises FusionInputError.

        `validated`: the event_ids validated so far for the same journal transaction (this one's is
        added); an id seen again there is a duplicate.

        `checked` (a bulk chunk's): the expert names and feature names already found to fit, each
        with the schema they fit. The check depends on those names and the schema only, so rows
        that repeat them (a replay's rows all do) are not checked again while the schema stands."""
        from_predict = False
        # A bulk row that carries its inputs is history, not a Predict this service served: no lookup.
        predicted = self._journal.predicted(event_id) if event_id and (event is None or not bulk) else None
        if event is None:
            if predicted is None:
                if self._journal.has_outcome(event_id):
                    return None, False, None
                raise UnknownEventError("event_id", f"no Predict with event_id {event_id!r} within the last "
                                        f"{self._journal.horizon_seconds:g} s; send the experts and features")
            event = predicted.event
            from_predict = True
        scored = predicted.scored() if predicted is not None else None
        schema = self._schema_ahead
        if len(event.experts) != schema.n_models:
            raise FusionInputError("experts", f"expected {schema.n_models} experts, got {len(event.experts)}: "
                                   "an outcome with another expert count cannot be learned")
        if checked is not None:
            key = (tuple([e.name for e in event.experts]), tuple(event.features))
            if checked.get(key) is schema:
                if event_id:
                    validated.add(event_id)
                return event, from_predict, scored
        _, _, new_names, new_features = schema.check(event, "experts")
        if new_names is not None or new_features is not None:
            # (rare: names fixed for the first time) a duplicate is not journaled, so it fixes
            # nothing: of an outcome journaled before, or of one earlier in this transaction
            if not (event_id and (event_id in validated or self._journal.has_outcome(event_id))):
                self._schema_ahead = schema.fixing(new_names, new_features)
        elif checked is not None:
            checked[key] = schema
        if event_id:
            validated.add(event_id)
        return event, from_predict, scored

    def _journal_rows(self, rows: list[tuple[Event | None, str, int, Scored | None]]) -> list[int | None] | Exception:
        """Commit the rows that have inputs in one transaction, each with what live scoring takes
        from its Predict; seq per row (None = duplicate)."""
        to_journal = [(eid or None, ev, label) for ev, eid, label, _ in rows if ev is not None]
        scored = [s for ev, _, _, s in rows if ev is not None]
        try:
            seqs = iter(self._journal.append_outcomes(to_journal, scored)) if to_journal else iter(())
        except Exception as e:
            log.exception("journal commit failed")
            return e
        out = [next(seqs) if ev is not None else None for ev, _, _, _ in rows]
        journaled = [s for s in out if s is not None]
        if journaled:
            self._journal_seq = max(self._journal_seq, journaled[-1])
            self._last_outcome_time = time.time()  # recorded, not learned: a catch-up is no outcome
        return out

    def _commit_outcomes(self, items: list[_Work]) -> None:
        """RecordOutcome: validate, journal in one transaction, queue for learning. Each is
        answered once learned and published; a duplicate at once (with the rest of the batch)."""
        now = time.monotonic()
        schema_before = self._schema_ahead  # what validation fixed stands only if the rows are journaled
        validated: set[str] = set()
        live: list[tuple[_Work, Event | None, str, int, bool, Scored | None]] = []
        for w in items:
            if w.deadline is not None and now > w.deadline:
                self._reply(w.future, error=DeadlineExpiredError("the deadline passed while the outcome was queued"))
                continue
            event, event_id, label = w.payload
            try:
                event, from_predict, scored = self._validate(event, event_id, validated)
            except FusionInputError as e:
                self._reply(w.future, error=e)
                continue
            live.append((w, event, event_id, label, from_predict, scored))
        seqs = self._journal_rows([(ev, eid, label, scored) for _, ev, eid, label, _, scored in live])
        if isinstance(seqs, Exception):
            self._schema_ahead = schema_before
            for w, *_ in live:
                self._reply(w.future, error=seqs)
            return
        for (w, event, event_id, label, from_predict, scored), seq in zip(live, seqs):
            if seq is None:
                self._on_outcome(True)
                original = self._journal.seq_of(event_id) if self._backlog and w.future is not None else None
                if original is not None and original > self._applied_seq:  # not learned yet: wait for it
                    self._dup_waits.append((original, w.future, from_predict))
                    self._waiters += 1
                else:
                    self._reply(w.future, _Duplicate(from_predict))
            else:
                self._backlog.add(_Pending(seq, event, label, w.future, from_predict, scored))
                self._waiters += w.future is not None

    def _commit_bulk(self, w: _Work) -> None:
        """RecordOutcomes chunk: convert, validate, journal in one transaction, answer at once
        (before learning: bulk replay lets training trail the journal).

        The payload is (rows, convert, stream): rows [(index, row as received)], convert(row) ->
        ((event, event_id, label), "", None), or (None, event_id, FusionInputError) for a row
        that is refused, and the stream's BulkStream. Converting here rather than on the handler
        thread lets that thread receive the stream's next rows meanwhile."""
        chunk, convert, stream = w.payload
        if stream.failed is not None:
            w.future.set_exception(stream.failed)
            return

        def fail(e: BaseException) -> None:
            stream.failed = e
            w.future.set_exception(e)
        if w.deadline is not None and time.monotonic() > w.deadline:
            fail(DeadlineExpiredError("the deadline passed while the chunk was queued"))
            return
        results: list[tuple[str, Any]] = []
        rows = []
        checked: dict = {}
        validate = self._validate
        schema_before = self._schema_ahead  # what validation fixed stands only if the rows are journaled
        validated: set[str] = set()
        try:
            for index, raw in chunk:
                outcome, bad_id, error = convert(raw)
                if error is not None:
                    results.append(("rejected", (index, bad_id, error)))
                    continue
                event, event_id, label = outcome
                try:
                    event, _, scored = validate(event, event_id, validated, True, checked)
                except FusionInputError as e:
                    results.append(("rejected", (index, event_id, e)))
                    continue
                rows.append((index, event, event_id, label, scored))
        except Exception as e:  # a bug: the stream fails (INTERNAL), the owner carries on
            log.exception("converting a RecordOutcomes chunk failed")
            self._schema_ahead = schema_before
            fail(e)
            return
        seqs = self._journal_rows([(ev, eid, label, scored) for _, ev, eid, label, scored in rows])
        if isinstance(seqs, Exception):
            self._schema_ahead = schema_before
            fail(seqs)
            return
        journaled = []
        for (index, event, event_id, label, scored), seq in zip(rows, seqs):
            if seq is None:
                self._on_outcome(True)
                results.append(("duplicate", (index, event_id)))
            else:
                journaled.append(seq)
                results.append(("accepted", (index, seq)))
        if journaled:  # the journal holds them: learned from it, with nothing of theirs in memory
            self._backlog.add_journaled(journaled[0], journaled[-1], len(journaled))
        self._bulk_at = time.monotonic()
        w.future.set_result(BulkAck(results, self._journal_seq))

    def _learn_backlog(self, slice_seconds: float | None, *, interruptible: bool = False) -> None:
        """Learn journaled outcomes in seq order: all of them, or for about `slice_seconds`, or (if
        `interruptible`: a catch-up slice, not a save's, a stop's or a start's learning) until work
        is submitted (Trainer.interrupt)."""
        started = time.monotonic()
        while self._backlog:
            left = None if slice_seconds is None else max(0.0, slice_seconds - (time.monotonic() - started))
            # About as many outcomes as the slice has time for: the rest would cross the pipe for nothing.
            chunk = CATCH_UP_CHUNK if left is None else max(1, min(CATCH_UP_CHUNK, int(left / self._learn_seconds) + 1))
            batch = self._backlog.head(chunk)
            # A caller waiting for its outcome needs the snapshot that includes it (read-your-writes);
            # a bulk backlog only needs one now and then.
            last = batch[-1].seq
            fresh = (any(p.future is not None for p in batch) or any(seq <= last for seq, _, _ in self._dup_waits)
                     or time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY_SECONDS)
            try:
                t0 = time.monotonic()
                results = self._trainer.learn([(p.event, p.label) for p in batch], left, snapshot=fresh,
                                              interruptible=interruptible)
                self._learn_seconds = 0.8 * self._learn_seconds + 0.2 * (time.monotonic() - t0) / max(1, len(results))
                if fresh:
                    self._snapshot_at = time.monotonic()
            except TrainerDiedError as e:
                self._restart_trainer(e)  # the batch stays pending: learned by the new trainer
                continue
            for p, (err, samples, version) in zip(batch, results):
                self._backlog.drop(p)
                self._waiters -= p.future is not None
                if err is not None:  # validated at commit: a bug. The journal keeps the outcome.
                    log.error("learning journaled outcome seq=%d failed: %s: %s", p.seq, type(err).__name__, err)
                    self._reply(p.future, error=err)
                else:
                    self._score(p.scored, p.label)
                    self._on_outcome(False)
                    self._reply(p.future, OutcomeAck(False, samples, version, p.from_predict, p.seq))
                self._applied_seq = p.seq
                self._since_checkpoint += 1
            if self._dup_waits:
                self._answer_duplicates()
            if slice_seconds is not None and (time.monotonic() - started > slice_seconds
                                              or interruptible and self._trainer.interrupted):
                break
        if not self._backlog and self._trainer.stale:  # caught up: publish the model as it now stands
            try:
                self._trainer.refresh()
            except TrainerDiedError as e:
                self._restart_trainer(e)
            self._snapshot_at = time.monotonic()

    def _answer_duplicates(self, everything: bool = False) -> None:
        """Answer the duplicates whose original is learned now (or all of them), as duplicates."""
        waiting = []
        for seq, fut, from_predict in self._dup_waits:
            if everything or seq <= self._applied_seq:
                self._reply(fut, _Duplicate(from_predict))
                self._waiters -= 1
            else:
                waiting.append((seq, fut, from_predict))
        self._dup_waits = waiting

    def _score(self, scored: Scored | None, label: int) -> None:
        """Live shadow scoring of a predicted event (see server/live.py)."""
        if scored is not None:
            self._scorer.observe(scored.served, scored.fusion, scored.average, label)

    # ------------------------------------------------------------------ checkpoints
    def _one(self, w: _Work) -> None:
        if w.kind in ("save", "restore"):
            try:
                self._checkpoint_action(w)
            except Exception as e:
                self._on_checkpoint(w.kind, False)
                self._reply(w.future, error=e)
                if isinstance(e, TrainerDiedError):
                    self._restart_trainer(e)
            else:
                self._on_checkpoint(w.kind, True)
            return
        try:
            if w.kind == "remember":
                self._journal.remember_predictions(w.payload)
                return
            if w.deadline is not None and time.monotonic() > w.deadline:
                raise DeadlineExpiredError("the deadline passed while the request was queued")
            if w.kind == "list":
                self._reply(w.future, self._store.list())
            else:
                raise ValueError(f"unknown work kind {w.kind!r}")
        except Exception as e:
            if w.future is None:
                log.exception("%s failed", w.kind)
            else:
                self._reply(w.future, error=e)

    def _checkpoint_action(self, w: _Work) -> None:
        """Checkpoint save or restore; raises on failure (counted by the caller)."""
        if w.deadline is not None and time.monotonic() > w.deadline:
            raise DeadlineExpiredError("the deadline passed while the request was queued")
        if w.kind == "save":
            name = check_name(w.payload, saving=True) if w.payload else None
            # a checkpoint holds every outcome acknowledged before it: the backlog is learned first
            # (keeping a fifth of the time left, at least 0.25 s, for the refusal to reach the caller)
            left = None if w.deadline is None else w.deadline - time.monotonic()
            self._learn_backlog(CHECKPOINT_LEARN_SECONDS if left is None else max(0.0, left - max(0.2 * left, 0.25)))
            if self._backlog:
                raise NotReadyError(
                    f"training is {len(self._backlog)} outcomes behind the journal (a bulk replay being learned; "
                    "Stats: service.training_lag), and a checkpoint holds every acknowledged outcome: save "
                    "once the lag is 0 (what was learned meanwhile stays learned)")
            info = self._store.save(self._trainer, name or f"step-{self._trainer.version}", self._applied_seq,
                                    {"live": self._scorer.state()})
            self._last_checkpoint = info.name
            self._since_checkpoint = 0
            self._reply(w.future, [info])
        else:  # restore
            name = check_name(w.payload)
            served, scorer_before = self._trainer.serving_stats.state(), self._scorer.state()
            info = self._store.load(self._trainer, name)
            self._scorer.load(info.extra.get("live"))
            # Outcomes journaled after that checkpoint (learned or not) are undone by the
            # restore: an automatic checkpoint of the restored model at the journal's head
            # makes a later recovery (and a trainer's rebuild) agree. Until it is written nothing
            # else changes; if it cannot be, the restore is undone and refused: acknowledged, a
            # crash would silently bring back the model from before it.
            head = max(self._journal_seq, self._journal.last_seq())
            existing = {i.name for i in self._store.list()}
            try:
                self._store.save(self._trainer, None, head, {"live": self._scorer.state()})
            except Exception as e:
                self._on_checkpoint("save", False)
                # A save that failed after its rename (the directory's fsync, say, or a trainer that
                # died then) left the restored model as the newest checkpoint: what a rebuild or a
                # restart would load. It goes.
                for leftover in [i.name for i in self._store.list() if i.name not in existing]:
                    if not self._store.discard(leftover):
                        log.error("checkpoint %s of an undone restore could not be deleted: delete it before "
                                  "the service restarts, or it will load the restored model", leftover)
                self._scorer.load(scorer_before)
                self._trainer.serving_stats.load(served)
                if not isinstance(e, TrainerDiedError):  # (a dead trainer: the caller replaces and rebuilds it)
                    applied = self._applied_seq
                    try:  # the model from before the restore, as a new trainer would rebuild it
                        self._rebuild(applied, score=False)
                    finally:
                        self._applied_seq = applied
                    self._trainer.serving_stats.load(served)
                    self._publish()
                if isinstance(e, StorageError):
                    raise StorageError(f"restoring {name!r} takes a checkpoint of the restored model, and {e}; "
                                       "the restore is undone: the model is the one from before it") from e
                raise
            self._on_checkpoint("save", True)
            undone = self._backlog.held()
            self._backlog.clear()
            self._answer_duplicates(everything=True)
            self._waiters = 0
            for p in undone:
                self._reply(p.future, OutcomeAck(False, self._trainer.samples_trained, self._trainer.version,
                                                 p.from_predict, p.seq))
            self._applied_seq = self._journal_seq = head
            self._schema_ahead = self._trainer.schema
            self._since_checkpoint = 0
            self._prune_journal()
            self._last_checkpoint = info.name
            self._reply(w.future, [info])

    def _auto_checkpoint(self) -> None:
        try:
            info = self._store.save(self._trainer, None, self._applied_seq, {"live": self._scorer.state()})
        except TrainerDiedError as e:
            self._on_checkpoint("save", False)
            self._restart_trainer(e)
            return
        except Exception:
            log.exception("automatic checkpoint failed; the journal keeps every outcome since the last one")
            self._on_checkpoint("save", False)
            return
        self._on_checkpoint("save", True)
        self._last_checkpoint = info.name
        self._since_checkpoint = 0
        self._prune_journal()

    def _prune_journal(self) -> None:
        """Prune the journal (server/journal.py Journal.prune) down to what the oldest automatic
        checkpoint kept covers: a recovery that finds the newer ones unusable falls back to it and
        learns the journal after it, which must still be there."""
        oldest = min((i.applied_seq for i in self._store.list() if i.name.startswith(AUTO_PREFIX)),
                     default=self._applied_seq)
        try:
            self._journal.prune(min(oldest, self._applied_seq))
        except Exception:  # noqa: BLE001 - pruning waits for the next checkpoint
            log.exception("pruning the journal failed; it is tried again after the next checkpoint")


def _refuse(fut: Future | None, e: BaseException) -> None:
    """Fail `fut` with `e` unless it is answered already."""
    if fut is not None:
        try:
            fut.set_exception(e)
        except InvalidStateError:  # answered (by the owner, or by another thread refusing it)
            pass


class _Slot:
    """A queued Predict. `done` is a lock held until the result is in: the waiting thread blocks on
    acquiring it, the thread that computed the result releases it (cheaper than a threading.Event)."""

    __slots__ = ("event", "event_id", "deadline", "done", "result")

    def __init__(self, event: Event, event_id: str, deadline: float | None):
        self.event, self.event_id, self.deadline = event, event_id, deadline
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Prediction | Exception | None = None

    def finish(self, result: Prediction | Exception) -> None:
        self.result = result
        self.done.release()


class Predictor:
    """Answers Predicts from the owner's published snapshot by flat combining (see module doc).

    A Predict that finds nothing queued and nobody computing is computed at once in its own thread,
    without a slot. Otherwise it queues a slot, and whichever thread holds the lock computes every
    queued slot in batches. A thread that releases the lock looks at the queue once more after
    releasing it: a Predict queued while the lock was held is then served by it, or by its own
    thread, whose attempt to take the lock comes after its queueing and so after that release.
    """

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
        owner = self._owner
        if owner.published is None or not owner.ready.is_set():
            if owner.failed is not None:
                raise NotReadyError(f"the model owner failed and the service cannot predict: {owner.failed}")
            raise NotReadyError("the service is starting: loading its checkpoint and replaying its journal")
        lock = self._lock
        if not self._pending and lock.acquire(False):  # alone: compute here, no slot, no hand-off
            try:
                if deadline is not None and time.monotonic() > deadline:
                    result: Prediction | Exception = DeadlineExpiredError(
                        "the deadline passed while the Predict was queued")
                else:
                    [result] = self._compute([event], [event_id])
            finally:
                lock.release()
            if self._pending:  # queued while we computed
                self._help()
        else:
            if len(self._pending) >= self._max_pending:
                raise OverloadedError(f"too many Predicts waiting ({self._max_pending})")
            slot = _Slot(event, event_id, deadline)
            self._pending.append(slot)
            done = slot.done
            while True:
                if lock.acquire(False):
                    try:
                        self._serve_pending()
                    finally:
                        lock.release()
                    if self._pending:
                        self._help()
                # Served (by us or by the thread holding the lock); else that thread will look at
                # the queue again after releasing the lock, or we take it on the next turn.
                if done.acquire(timeout=0.005):
                    break
            result = slot.result
        if isinstance(result, Exception):
            raise result
        return result

    def _help(self) -> None:
        """Serve what is queued while nobody else does."""
        lock = self._lock
        while self._pending and lock.acquire(False):
            try:
                self._serve_pending()
            finally:
                lock.release()

    def _serve_pending(self) -> None:
        pending = self._pending
        while pending:
            batch: list[_Slot] = []
            now = time.monotonic()
            while pending and len(batch) < MAX_PREDICT_BATCH:
                s = pending.popleft()
                if s.deadline is not None and now > s.deadline:
                    s.finish(DeadlineExpiredError("the deadline passed while the Predict was queued"))
                else:
                    batch.append(s)
            if batch:
                for s, p in zip(batch, self._compute([s.event for s in batch], [s.event_id for s in batch])):
                    s.finish(p)

    def _compute(self, events: list[Event], event_ids: list[str]) -> list[Prediction | Exception]:
        """The events' forecasts with the newest published snapshot; never raises."""
        pub = self._owner.published
        try:
            preds: list[Prediction | Exception] = pub.snapshot.predict(events, "experts")
            if self.override is not None:
                preds = self.override(preds)
            fused = preds  # what the fusion said, for the attention statistics
            underperforming = pub.live["underperforming"]
            remember = []
            for i, p in enumerate(preds):
                if not isinstance(p, Prediction):
                    continue
                fusion = p.prob_up if p.source == SOURCE_FUSION else None
                if fusion is not None and underperforming:
                    if fused is preds:
                        preds = list(preds)
                    preds[i] = p = average_prediction(events[i], REASON_UNDERPERFORMING, p.model_version)
                if event_ids[i]:
                    ev = events[i]
                    remember.append((event_ids[i], ev, p.prob_up, fusion, plain_average(ev.experts)))
            # attention: served or not; the last source and reason: what was served
            pub.serving.record(fused, pub.snapshot.schema.names, served=None if fused is preds else preds)
            if remember and not self._owner.remember(remember):
                refused = OverloadedError("the model owner's queue is full: the inputs of a Predict with an "
                                          "event_id cannot be kept; retry, or predict without event_id")
                preds = [refused if isinstance(p, Prediction) and eid else p for eid, p in zip(event_ids, preds)]
        except Exception as e:  # a bug: every Predict of the batch gets it, none hangs
            log.exception("predict failed")
            preds = [e] * len(events)
        try:  # every computation, failed ones too (the batch-size histogram counts each once)
            self._on_predictions(preds)
        except Exception:  # metrics are not worth a served forecast
            log.exception("recording predictions failed")
        return preds
