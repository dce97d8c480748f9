"""The outcome journal: an embedded SQLite database (WAL mode) in the data directory.

Tables
- `outcomes(seq, event_id, payload, label, recorded_at, live)`: every accepted outcome, in the
  order the model learned it. `seq` (increasing, never reused; an ignored duplicate may leave a gap) is the sequence number that
  checkpoints record as applied; `event_id` is
  unique, which is how a repeated outcome is recognised, across restarts too. An outcome is
  committed (fsynced: `synchronous=FULL`) before RecordOutcome is acknowledged; the outcomes queued
  together share one transaction. `live` is what live scoring took from the outcome's Predict, as
  decided when it was recorded: "served,fusion,average" (the three prob_up, exact decimal floats),
  or "" for nothing. Learning the outcome again after a restart scores it alike, whatever has become
  of the Predict since (past the horizon, pruned, predicted again). A journal written before the
  column existed gets it when opened: each of its rows from its Predict as it is then (within the
  horizon), as a restart used to look it up, once and for all. (One text column: four, a flag and
  three REALs, cost `append_outcomes` 3 us a row, a tenth of a bulk row's whole path.)
- `predictions(event_id, payload, predicted_at, served, fusion, average)`: the inputs of served
  Predicts that carried an event_id, so that RecordOutcome may send the event_id alone, within the
  configured horizon, and what was forecast, for live scoring (server/live.py).
- `pruned_ids(h, seq)`: the event_ids of pruned outcomes (`id_hash`, 8 bytes each; about 35 bytes a
  row on disk with its index) whose seq is within `keep_event_ids` of the newest pruned one, so
  that a duplicate is recognised long after its outcome was pruned: re-running a bulk replay of
  millions of rows learns none twice.

Retention: after each automatic checkpoint, the outcomes that the oldest automatic checkpoint
kept covers are pruned down to the last `keep_outcomes` (their event_ids go to `pruned_ids`, and
stay recognised as duplicates among its last `keep_event_ids`); predictions past the horizon, or
beyond the newest `keep_predictions`, are pruned (every PRUNE_EVERY remembered). With periodic checkpoints off (`checkpoint_every = 0`),
only the checkpoints of a graceful stop and of a restore prune. A write that fails because of the
disk (full, read-only, I/O) raises StorageError. One connection, used by the model-owner thread only.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import orjson

from .errors import StorageError
from .events import Expert
from .inference import Event

# SQLite's errors that say the disk, not the request, is at fault (extended codes included:
# SQLITE_IOERR_WRITE, SQLITE_READONLY_DBMOVED, ...)
STORAGE_ERRORS = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")


def _writes(fn: Any) -> Any:
    """A journal write: when the disk is full or read-only, or fails, it raises StorageError (the
    transaction is rolled back: nothing was written), which callers answer with UNAVAILABLE."""
    @functools.wraps(fn)
    def write(self: "Journal", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as e:
            if (getattr(e, "sqlite_errorname", None) or "").startswith(STORAGE_ERRORS):
                raise StorageError(f"the journal ({self.path}) cannot be written: {e}; nothing was written") from e
            raise
    return write


SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT UNIQUE,
    payload     TEXT NOT NULL,
    label       INTEGER NOT NULL CHECK (label IN (0, 1)),
    recorded_at REAL NOT NULL,
    live        TEXT  -- live scoring's take: "served,fusion,average" or ""; NULL only until a journal from before it is opened
);
CREATE TABLE IF NOT EXISTS predictions (
    event_id     TEXT PRIMARY KEY,
    payload      TEXT NOT NULL,
    predicted_at REAL NOT NULL,
    served       REAL,  -- prob_up served
    fusion       REAL,  -- the fusion's own prob_up (NULL while it was warming up)
    average      REAL   -- the plain average's
);
CREATE INDEX IF NOT EXISTS predictions_by_time ON predictions (predicted_at);
CREATE TABLE IF NOT EXISTS pruned_ids (
    h   INTEGER PRIMARY KEY,  -- id_hash(event_id) of a pruned outcome
    seq INTEGER NOT NULL      -- that outcome's seq
);
CREATE INDEX IF NOT EXISTS pruned_ids_by_seq ON pruned_ids (seq);
"""
# Columns added to `outcomes` since its first version: added to a journal written before them.
OUTCOME_COLUMNS_ADDED = (("live", "TEXT"),)
INSERT_OUTCOME = "INSERT OR IGNORE INTO outcomes (event_id, payload, label, recorded_at, live) VALUES (?, ?, ?, ?, ?)"
LIVE_FILLED = 1  # PRAGMA user_version from which every outcome has its live column
PRUNE_EVERY = 1024  # remembered predictions between two prunings of the predictions table
SEQ_CHECK_CHUNK = 500  # event_ids per "IN (...)" query (SQLite allows 32,766 parameters)


def id_hash(event_id: str) -> int:
    """How a pruned outcome's event_id is kept for recognising duplicates: 8 bytes of BLAKE2b, as a
    signed 64-bit integer. Two of n distinct event_ids collide with a probability of about
    n^2 / 2^65 (3e-6 for ten million); a collision would take a new outcome for a duplicate."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big", signed=True)


def _pruned(cur: sqlite3.Cursor, event_ids: list[str]) -> set[str]:
    """Which of `event_ids` belong to pruned outcomes (by id_hash)."""
    out: set[str] = set()
    if not event_ids or cur.execute("SELECT 1 FROM pruned_ids LIMIT 1").fetchone() is None:
        return out  # nothing pruned yet (a fresh journal, a backtest's): no hashing
    for k in range(0, len(event_ids), SEQ_CHECK_CHUNK):
        by_hash = {id_hash(e): e for e in event_ids[k:k + SEQ_CHECK_CHUNK]}
        out.update(by_hash[h] for (h,) in cur.execute(
            f"SELECT h FROM pruned_ids WHERE h IN ({','.join('?' * len(by_hash))})", list(by_hash)))
    return out


def encode_event(ev: Event) -> str:
    """Compact JSON for an event; floats round-trip exactly (shortest repr), text is UTF-8.

    orjson, not the json module: about 1 us an event against 8 us, which was a quarter of the
    bulk path's cost per row (docs/PERFORMANCE.md). The payload is the same JSON value as
    json.dumps(..., separators=(",", ":")) wrote before (that spelled non-ASCII as \\u escapes
    and 1e-05 where orjson writes 0.00001); both decode alike, so older journals read as before.
    The values are finite (the parsers refuse NaN and infinities, which orjson would write as null).
    """
    f = ev.features
    return orjson.dumps({"e": [[x.prob_up, x.confidence, x.name] for x in ev.experts],
                         "f": f if type(f) is dict else dict(f)}).decode()


def decode_event(payload: str | bytes) -> Event:
    try:
        d = orjson.loads(payload)
    except orjson.JSONDecodeError:  # NaN or Infinity, which json.dumps wrote and orjson does not read
        d = json.loads(payload)
    return Event(tuple(Expert(prob_up=p, confidence=c, name=n) for p, c, n in d["e"]), d["f"])


class Scored(NamedTuple):
    """What live scoring (server/live.py) takes from an outcome's Predict: the prob_up it served,
    the fusion's own and the plain average's."""

    served: float
    fusion: float
    average: float


@dataclass(frozen=True)
class Predicted:
    """A served Predict: its inputs and what the service, the fusion and the average forecast."""

    event: Event
    served: float | None
    fusion: float | None
    average: float | None

    def scored(self) -> Scored | None:
        """What live scoring takes from it (nothing while the fusion did not forecast)."""
        return _took(self.served, self.fusion, self.average)


def _took(served: float | None, fusion: float | None, average: float | None) -> Scored | None:
    """What live scoring takes from a Predict: nothing while the fusion did not forecast."""
    if fusion is None or served is None or average is None:
        return None
    return Scored(served, fusion, average)


def _predicted(row: Sequence[Any], oldest: float) -> Predicted | None:
    """A predictions row (payload, predicted_at, served, fusion, average; all None for no row) as
    a Predicted, or None when there is none or it is older than `oldest` (past the horizon)."""
    payload, predicted_at, served, fusion, average = row
    if payload is None or predicted_at < oldest:
        return None
    return Predicted(decode_event(payload), served, fusion, average)


def _live_text(s: Scored | None) -> str:
    """The outcomes.live column: "served,fusion,average" (repr: the floats come back exactly) or ""."""
    return "" if s is None else f"{s.served!r},{s.fusion!r},{s.average!r}"


def _scored(live: str) -> Scored | None:
    """An outcome's live scoring, from its `live` column."""
    return Scored(*map(float, live.split(","))) if live else None


@dataclass(frozen=True)
class JournaledOutcome:
    seq: int
    event_id: str | None
    event: Event
    label: int
    scored: Scored | None  # what live scoring took from its Predict when it was recorded


class Journal:
    def __init__(self, path: str | Path, *, horizon_seconds: float = 86_400.0, keep_outcomes: int = 100_000,
                 keep_predictions: int = 100_000, keep_event_ids: int = 10_000_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.horizon_seconds = horizon_seconds
        self.keep_outcomes = keep_outcomes
        self.keep_event_ids = keep_event_ids
        self.keep_predictions = keep_predictions
        self._remembered = 0
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(outcomes)")}
        for name, kind in OUTCOME_COLUMNS_ADDED:  # a journal written by an earlier version
            if name not in have:
                self._db.execute(f"ALTER TABLE outcomes ADD COLUMN {name} {kind}")
        if self._db.execute("PRAGMA user_version").fetchone()[0] < LIVE_FILLED:
            self._fill_live()

    def _fill_live(self) -> None:
        """Give the rows journaled before the live column (NULL) what live scoring takes from their
        Predict now (nothing past the horizon or without one), in one transaction that also marks
        the journal as done (`PRAGMA user_version`): later opens skip the scan."""
        oldest = time.time() - self.horizon_seconds
        rows = self._db.execute(
            "SELECT o.seq, p.predicted_at, p.served, p.fusion, p.average FROM outcomes o "
            "LEFT JOIN predictions p ON p.event_id = o.event_id WHERE o.live IS NULL").fetchall()
        fill = []
        for seq, predicted_at, served, fusion, average in rows:
            took = None if predicted_at is None or predicted_at < oldest else _took(served, fusion, average)
            fill.append((_live_text(took), seq))
        with self._transaction():
            self._db.executemany("UPDATE outcomes SET live = ? WHERE seq = ?", fill)
            self._db.execute(f"PRAGMA user_version = {LIVE_FILLED}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction around the statements inside (the connection autocommits otherwise: an
        executemany would commit, and sync, each row on its own)."""
        db = self._db
        if db.in_transaction:  # left open by a ROLLBACK that failed: else every write would fail
            db.execute("ROLLBACK")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a COMMIT that failed (disk full) leaves it open too
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:  # never over the error being handled; the next write tries again
                    pass
            raise

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ outcomes
    @_writes
    def append_outcomes(self, items: Sequence[tuple[str | None, Event, int]],
                        scored: Sequence[Scored | None] | None = None) -> list[int | None]:
        """Commit outcomes (event_id, event, label) in one transaction, with what live scoring took
        from each one's Predict (`scored`, item by item; None: nothing, for all of them when
        omitted). Returns each one's seq, or None for a duplicate event_id (already journaled, or
        earlier in the same batch)."""
        now = time.time()
        if scored is None:
            rows = [(event_id, encode_event(event), label, now, "") for event_id, event, label in items]
        else:
            rows = [(event_id, encode_event(event), label, now, _live_text(s))
                    for (event_id, event, label), s in zip(items, scored)]
        cur = self._db.cursor()
        with self._transaction():
            seqs = self._insert_many(cur, rows)
            if seqs is None:  # not what SQLite was expected to do: start again, one row at a time
                cur.execute("ROLLBACK")
                cur.execute("BEGIN IMMEDIATE")
                seqs = self._insert_each(cur, rows)
        return seqs

    @staticmethod
    def _insert_each(cur: sqlite3.Cursor, rows: list[tuple]) -> list[int | None]:
        seqs: list[int | None] = []
        for row in rows:
            if row[0] is not None and _pruned(cur, [row[0]]):
                seqs.append(None)
                continue
            cur.execute(INSERT_OUTCOME, row)
            seqs.append(cur.lastrowid if cur.rowcount == 1 else None)
        return seqs

    @staticmethod
    def _insert_many(cur: sqlite3.Cursor, rows: list[tuple]) -> list[int | None] | None:
        """The rows in one executemany: the duplicates are found first (one indexed query per
        SEQ_CHECK_CHUNK event_ids), and the others get consecutive seqs from the AUTOINCREMENT
        counter (this connection is the only writer, inside BEGIN IMMEDIATE). None if the counter
        did not move as expected (nothing is then to be committed)."""
        ids = [r[0] for r in rows if r[0] is not None]
        seen: set[str] = set()
        for k in range(0, len(ids), SEQ_CHECK_CHUNK):
            part = ids[k:k + SEQ_CHECK_CHUNK]
            seen.update(e for (e,) in cur.execute(
                f"SELECT event_id FROM outcomes WHERE event_id IN ({','.join('?' * len(part))})", part))
        seen.update(_pruned(cur, [e for e in ids if e not in seen]))
        fresh = []
        seqs: list[int | None] = []
        row = cur.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outcomes'").fetchone()
        top = cur.execute("SELECT MAX(seq) FROM outcomes").fetchone()[0]
        seq = max(row[0] if row else 0, top or 0)
        for r in rows:
            event_id = r[0]
            if event_id is not None:
                if event_id in seen:
                    seqs.append(None)
                    continue
                seen.add(event_id)
            seq += 1
            seqs.append(seq)
            fresh.append(r)
        if not fresh:
            return seqs
        cur.executemany(INSERT_OUTCOME, fresh)
        inserted = cur.rowcount  # summed over the rows
        row = cur.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outcomes'").fetchone()
        if inserted != len(fresh) or row is None or row[0] != seq:
            return None
        return seqs

    def has_outcome(self, event_id: str) -> bool:
        """Whether an outcome with this event_id was journaled (its row kept, or pruned and its
        event_id among the last keep_event_ids)."""
        return self.seq_of(event_id) is not None

    def seq_of(self, event_id: str) -> int | None:
        """The seq of the outcome with this event_id, if journaled (its row kept, or pruned and
        its event_id kept)."""
        row = self._db.execute("SELECT seq FROM outcomes WHERE event_id = ?", (event_id,)).fetchone()
        if row is None:
            row = self._db.execute("SELECT seq FROM pruned_ids WHERE h = ?", (id_hash(event_id),)).fetchone()
        return None if row is None else int(row[0])

    def outcomes_after(self, seq: int) -> Iterator[JournaledOutcome]:
        """Outcomes with a sequence number above `seq`, in order: what a checkpoint has not seen."""
        return self._outcomes("o.seq > ?", seq)

    def outcomes_from(self, seq: int, limit: int) -> list[JournaledOutcome]:
        """The first `limit` outcomes with a sequence number from `seq` on, in order: a slice of a
        backlog being learned (the owner's Backlog reads its spans back with it)."""
        return list(self._outcomes("o.seq >= ?", seq, limit))

    def _outcomes(self, where: str, seq: int, limit: int = -1) -> Iterator[JournaledOutcome]:
        for s, event_id, payload, label, live in self._db.execute(
                f"SELECT o.seq, o.event_id, o.payload, o.label, o.live FROM outcomes o "
                f"WHERE {where} ORDER BY o.seq LIMIT ?", (seq, limit)):  # LIMIT -1: no limit
            yield JournaledOutcome(s, event_id, decode_event(payload), label, _scored(live))

    def last_seq(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM outcomes").fetchone()
        if row[0] is not None:
            return int(row[0])
        # all outcomes pruned: AUTOINCREMENT still remembers the highest seq ever given
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outcomes'").fetchone()
        return int(row[0]) if row else 0

    @_writes
    def advance_seq(self, seq: int) -> None:
        """Number the outcomes journaled from now on after `seq` (a checkpoint's applied_seq): a
        journal that ends before the checkpoint (restored from an older backup, or replaced) would
        otherwise give new outcomes seqs that the checkpoint already covers, and a recovery would
        skip them."""
        with self._transaction():
            if self._db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outcomes' AND seq < ?",
                                (seq, seq)).rowcount == 0 and self.last_seq() < seq:
                self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outcomes', ?)", (seq,))

    def last_recorded_at(self) -> float:
        """Unix time the newest journaled outcome was recorded; 0 when there is none."""
        row = self._db.execute("SELECT MAX(recorded_at) FROM outcomes").fetchone()
        return float(row[0] or 0.0)

    def count_outcomes(self, after: int = 0) -> int:
        """How many outcomes are journaled with a sequence number above `after`."""
        return int(self._db.execute("SELECT COUNT(*) FROM outcomes WHERE seq > ?", (after,)).fetchone()[0])

    # ------------------------------------------------------------------ predictions
    @_writes
    def remember_predictions(self, items: Sequence[tuple]) -> None:
        """Keep Predicts by event_id (the latest wins): (event_id, event[, served, fusion, average]).
        Asynchronous durability is enough: a lost one only means sending the inputs again."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO predictions (event_id, payload, predicted_at, served, fusion, average) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(it[0], encode_event(it[1]), now, *(tuple(it[2:5]) + (None,) * (5 - len(it)))) for it in items])
        self._remembered += len(items)
        if self._remembered >= PRUNE_EVERY:
            self._remembered = 0
            self.prune_predictions()

    def predicted(self, event_id: str) -> Predicted | None:
        """The Predict that carried this event_id, if within the horizon."""
        row = self._db.execute("SELECT payload, predicted_at, served, fusion, average FROM predictions "
                               "WHERE event_id = ?", (event_id,)).fetchone()
        return None if row is None else _predicted(row, time.time() - self.horizon_seconds)

    def predicted_event(self, event_id: str) -> Event | None:
        """The inputs of the Predict that carried this event_id, if within the horizon."""
        p = self.predicted(event_id)
        return None if p is None else p.event

    def count_predictions(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    # ------------------------------------------------------------------ retention
    @_writes
    def prune_predictions(self) -> int:
        """Drop predictions past the horizon and beyond the newest `keep_predictions`."""
        with self._transaction():
            n = self._db.execute("DELETE FROM predictions WHERE predicted_at < ?",
                                 (time.time() - self.horizon_seconds,)).rowcount
            n += self._db.execute("DELETE FROM predictions WHERE event_id IN (SELECT event_id FROM predictions "
                                  "ORDER BY predicted_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                                  (self.keep_predictions,)).rowcount
        return n

    @_writes
    def prune(self, applied_seq: int) -> tuple[int, int]:
        """Drop outcomes already in a checkpoint (seq <= `applied_seq`) beyond the newest
        `keep_outcomes`, keeping their event_ids (the newest `keep_event_ids` of all pruned), and
        prune the predictions. Returns (outcomes, predictions) dropped."""
        with self._transaction():
            upto = min(applied_seq, self.last_seq() - self.keep_outcomes)
            if self.keep_event_ids > 0:
                self._db.executemany("INSERT OR IGNORE INTO pruned_ids (h, seq) VALUES (?, ?)", (
                    (id_hash(e), seq) for e, seq in self._db.execute(
                        "SELECT event_id, seq FROM outcomes WHERE seq <= ? AND seq > ? AND event_id IS NOT NULL",
                        (upto, upto - self.keep_event_ids)).fetchall()))
            o = self._db.execute("DELETE FROM outcomes WHERE seq <= ?", (upto,)).rowcount
            # the event_ids of the last keep_event_ids seqs pruned (an index range, not a count)
            self._db.execute("DELETE FROM pruned_ids WHERE seq <= ?", (upto - self.keep_event_ids,))
        return o, self.prune_predictions()

    def stats(self) -> dict[str, Any]:
        return {"journal_last_seq": self.last_seq(), "journal_outcomes": self.count_outcomes(),
                "journal_predictions": self.count_predictions()}
