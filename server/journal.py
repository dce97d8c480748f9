"""The outcome journal: an embedded SQLite database (WAL mode) in the data directory.

Tables
- `outcomes(seq, event_id, payload, label, recorded_at)`: every accepted outcome, in the order the
  model learned it. `seq` (increasing, never reused; an ignored duplicate may leave a gap) is the sequence number that
  checkpoints record as applied; `event_id` is
  unique, which is how a repeated outcome is recognised, across restarts too. An outcome is
  committed (fsynced: `synchronous=FULL`) before RecordOutcome is acknowledged; the outcomes queued
  together share one transaction.
- `predictions(event_id, payload, predicted_at, served, fusion, average)`: the inputs of served
  Predicts that carried an event_id, so that RecordOutcome may send the event_id alone, within the
  configured horizon, and what was forecast, for live scoring (server/live.py).

Retention: outcomes older than what the newest checkpoint covers are pruned down to the last
`keep_outcomes` (their event_ids stay recognised as duplicates for that long), predictions past the
horizon, or beyond the newest `keep_predictions`, are pruned (every PRUNE_EVERY remembered). With
automatic checkpoints off (`checkpoint_every = 0`) the journal is the only record of the outcomes
and is never pruned. One connection, used by the model-owner thread only.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import orjson

from .events import Expert
from .inference import Event

SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT UNIQUE,
    payload     TEXT NOT NULL,
    label       INTEGER NOT NULL CHECK (label IN (0, 1)),
    recorded_at REAL NOT NULL
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
"""
PRUNE_EVERY = 1024  # remembered predictions between two prunings of the predictions table
SEQ_CHECK_CHUNK = 500  # event_ids per "IN (...)" query (SQLite allows 32,766 parameters)


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


@dataclass(frozen=True)
class Predicted:
    """A served Predict: its inputs and what the service, the fusion and the average forecast."""

    event: Event
    served: float | None
    fusion: float | None
    average: float | None


def _predicted(row: Sequence[Any], oldest: float) -> Predicted | None:
    """A predictions row (payload, predicted_at, served, fusion, average; all None for no row) as
    a Predicted, or None when there is none or it is older than `oldest` (past the horizon)."""
    payload, predicted_at, served, fusion, average = row
    if payload is None or predicted_at < oldest:
        return None
    return Predicted(decode_event(payload), served, fusion, average)


@dataclass(frozen=True)
class JournaledOutcome:
    seq: int
    event_id: str | None
    event: Event
    label: int


class Journal:
    def __init__(self, path: str | Path, *, horizon_seconds: float = 86_400.0, keep_outcomes: int = 100_000,
                 keep_predictions: int = 100_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.horizon_seconds = horizon_seconds
        self.keep_outcomes = keep_outcomes
        self.keep_predictions = keep_predictions
        self._remembered = 0
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ outcomes
    def append_outcomes(self, items: Sequence[tuple[str | None, Event, int]]) -> list[int | None]:
        """Commit outcomes in one transaction. Returns each one's seq, or None for a duplicate
        event_id (already journaled, or earlier in the same batch)."""
        now = time.time()
        rows = [(event_id, encode_event(event), label, now) for event_id, event, label in items]
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            seqs = self._insert_many(cur, rows)
            if seqs is None:  # not what SQLite was expected to do: start again, one row at a time
                cur.execute("ROLLBACK")
                cur.execute("BEGIN IMMEDIATE")
                seqs = self._insert_each(cur, rows)
            cur.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                cur.execute("ROLLBACK")
            raise
        return seqs

    @staticmethod
    def _insert_each(cur: sqlite3.Cursor, rows: list[tuple]) -> list[int | None]:
        seqs: list[int | None] = []
        for row in rows:
            cur.execute("INSERT OR IGNORE INTO outcomes (event_id, payload, label, recorded_at) VALUES (?, ?, ?, ?)", row)
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
        cur.executemany("INSERT OR IGNORE INTO outcomes (event_id, payload, label, recorded_at) VALUES (?, ?, ?, ?)",
                        fresh)
        inserted = cur.rowcount  # summed over the rows
        row = cur.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outcomes'").fetchone()
        if inserted != len(fresh) or row is None or row[0] != seq:
            return None
        return seqs

    def has_outcome(self, event_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM outcomes WHERE event_id = ?", (event_id,)).fetchone() is not None

    def seq_of(self, event_id: str) -> int | None:
        """The seq of the outcome with this event_id, if journaled (and not pruned)."""
        row = self._db.execute("SELECT seq FROM outcomes WHERE event_id = ?", (event_id,)).fetchone()
        return None if row is None else int(row[0])

    def outcomes_after(self, seq: int) -> Iterator[JournaledOutcome]:
        """Outcomes with a sequence number above `seq`, in order: what a checkpoint has not seen."""
        for s, event_id, payload, label in self._db.execute(
                "SELECT seq, event_id, payload, label FROM outcomes WHERE seq > ? ORDER BY seq", (seq,)):
            yield JournaledOutcome(s, event_id, decode_event(payload), label)

    def backlog_after(self, seq: int) -> Iterator[tuple[int, int, Predicted | None]]:
        """(seq, label, what its Predict forecast) of the outcomes after `seq`, in order, without
        their events (a replay's backlog may be millions of rows): one query."""
        oldest = time.time() - self.horizon_seconds
        for s, label, *predicted in self._db.execute(
                "SELECT o.seq, o.label, p.payload, p.predicted_at, p.served, p.fusion, p.average "
                "FROM outcomes o LEFT JOIN predictions p ON p.event_id = o.event_id "
                "WHERE o.seq > ? ORDER BY o.seq", (seq,)):
            yield s, label, _predicted(predicted, oldest)

    def events_between(self, first: int, last: int) -> dict[int, Event]:
        """seq -> event of the outcomes with first <= seq <= last (the owner's bulk backlog)."""
        return {s: decode_event(payload) for s, payload in self._db.execute(
            "SELECT seq, payload FROM outcomes WHERE seq BETWEEN ? AND ?", (first, last))}

    def last_seq(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM outcomes").fetchone()
        if row[0] is not None:
            return int(row[0])
        # all outcomes pruned: AUTOINCREMENT still remembers the highest seq ever given
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outcomes'").fetchone()
        return int(row[0]) if row else 0

    def last_recorded_at(self) -> float:
        """Unix time the newest journaled outcome was recorded; 0 when there is none."""
        row = self._db.execute("SELECT MAX(recorded_at) FROM outcomes").fetchone()
        return float(row[0] or 0.0)

    def count_outcomes(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0])

    # ------------------------------------------------------------------ predictions
    def remember_predictions(self, items: Sequence[tuple]) -> None:
        """Keep Predicts by event_id (the latest wins): (event_id, event[, served, fusion, average]).
        Asynchronous durability is enough: a lost one only means sending the inputs again."""
        now = time.time()
        with self._db:
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
    def prune_predictions(self) -> int:
        """Drop predictions past the horizon and beyond the newest `keep_predictions`."""
        with self._db:
            n = self._db.execute("DELETE FROM predictions WHERE predicted_at < ?",
                                 (time.time() - self.horizon_seconds,)).rowcount
            n += self._db.execute("DELETE FROM predictions WHERE event_id IN (SELECT event_id FROM predictions "
                                  "ORDER BY predicted_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                                  (self.keep_predictions,)).rowcount
        return n

    def prune(self, applied_seq: int) -> tuple[int, int]:
        """Drop outcomes already in a checkpoint (seq <= `applied_seq`) beyond the newest
        `keep_outcomes`, and prune the predictions. Returns (outcomes, predictions) dropped."""
        with self._db:
            cutoff = self.last_seq() - self.keep_outcomes
            o = self._db.execute("DELETE FROM outcomes WHERE seq <= ? AND seq <= ?",
                                 (applied_seq, cutoff)).rowcount
        return o, self.prune_predictions()

    def stats(self) -> dict[str, Any]:
        return {"journal_last_seq": self.last_seq(), "journal_outcomes": self.count_outcomes(),
                "journal_predictions": self.count_predictions()}
