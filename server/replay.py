"""`titan-fusion replay FILE`: send a history of outcomes to a running service in bulk.

The file is CSV (or Parquet, when pyarrow is installed), one outcome per row, in the order the
model should learn them:

    event_id,actual_direction,expert.TrendVIC,expert.Oscillator,confidence.TrendVIC,feature.close,feature.rsi
    BTCUSDT:15m:2021-09-27T00:00Z,UP,0.61,0.48,0.9,43210.5,55.2

- `event_id`: the candle's key (recommended: a re-run is then idempotent, duplicates are skipped, as
  far back as the service's `journal_keep_outcomes` plus `journal_keep_event_ids`: 10,100,000
  outcomes by default);
- `actual_direction`: UP or DOWN (also up/down, 1/0; in Parquet also 1.0/0.0 and true/false);
- `expert.<name>`: that expert's prob_up; `confidence.<name>` optional; an empty cell (or a null,
  or in Parquet a NaN confidence) is missing;
- `feature.<name>`: a market feature. Other columns are ignored.

Column names are matched without regard to case or surrounding spaces, and a UTF-8 byte order mark
(Excel's "CSV UTF-8") is skipped; the names after `expert.`, `confidence.` and `feature.` keep their
case. A file without an `event_id` column is sent (each row learned once more on every re-run), with
a warning. The first outcome the service learns fixes its feature names: a first row with an empty
feature cell fixes them without that feature, and later rows that have it are then refused.

Rows stream over one RecordOutcomeBatches call, many to a message, journaled with RecordOutcome's guarantees; training may
trail the journal and the command waits for it with `--wait`. Needs grpcio, protobuf and tqdm only.

    >>> rows = parse_rows([{"event_id": "c1", "actual_direction": "up", "expert.a": "0.6",
    ...                     "expert.b": "0.4", "feature.rsi": "55"}])
    >>> next(rows)
    {'event_id': 'c1', 'actual_direction': 'UP', 'experts': [{'name': 'a', 'prob_up': 0.6}, {'name': 'b', 'prob_up': 0.4}], 'features': {'rsi': 55.0}}
"""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

DIRECTIONS = {"UP": "UP", "DOWN": "DOWN", "1": "UP", "0": "DOWN", "1.0": "UP", "0.0": "DOWN",
              "TRUE": "UP", "FALSE": "DOWN"}
KINDS = ("expert", "confidence", "feature")


def column(key: Any) -> tuple[str, str]:
    """A header cell -> (kind, name): ("event_id", ""), ("expert", "TrendVIC"), ... The kind is
    matched without regard to case, spaces or a byte order mark; the name keeps its case.

    >>> column("\ufeff Event_ID "), column("Expert.TrendVIC"), column("misc")
    (('event_id', ''), ('expert', 'TrendVIC'), ('misc', ''))
    """
    text = str(key).lstrip("\ufeff").strip()
    kind, dot, name = text.partition(".")
    kind = kind.strip().lower()
    if dot and kind in KINDS:
        return kind, name.strip()
    return text.lower(), ""


def parse_rows(rows: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """CSV/Parquet rows -> outcomes for FusionClient.record_outcomes(). A value that cannot be read
    as a number is sent as NaN, so that the service rejects that row by index, naming the field."""
    columns: dict[Any, tuple[str, str]] = {}
    for row in rows:
        experts: dict[str, dict[str, Any]] = {}
        features: dict[str, float] = {}
        event_id: Any = None
        direction: Any = None
        for key, value in row.items():
            if key not in columns:
                columns[key] = column(key)
            kind, name = columns[key]
            if value is None or value == "":
                continue
            if kind == "expert":
                experts.setdefault(name, {"name": name})["prob_up"] = _number(value)
            elif kind == "confidence":
                if not (isinstance(value, float) and value != value):  # Parquet's NaN: missing
                    experts.setdefault(name, {"name": name})["confidence"] = _number(value)
            elif kind == "feature":
                features[name] = _number(value)
            elif kind == "event_id":
                event_id = str(value)
            elif kind == "actual_direction":
                direction = value
        yield {"event_id": event_id or None,
               "actual_direction": _direction(direction),
               "experts": [e for e in experts.values() if "prob_up" in e] or None,
               "features": features}


def _direction(value: Any) -> str:
    """UP/DOWN and their spellings; anything else as it was, for the service to refuse by name."""
    text = "" if value is None else str(value).strip()
    return DIRECTIONS.get(text.upper(), text)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_file(path: Path) -> tuple[Iterator[Mapping[str, Any]], int | None, list[str]]:
    """Rows of a CSV or Parquet file, their count when cheap to know, and the column names."""
    try:
        return _read_file(path)
    except OSError as e:  # a missing or unreadable file: one line, not a traceback
        raise SystemExit(f"{path}: {e.strerror or e}") from None


def _read_file(path: Path) -> tuple[Iterator[Mapping[str, Any]], int | None, list[str]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("reading Parquet needs pyarrow: pip install pyarrow (or convert the file to CSV)")
        pf = pq.ParquetFile(path)
        return ((row for batch in pf.iter_batches() for row in batch.to_pylist()), pf.metadata.num_rows,
                list(pf.schema_arrow.names))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            total = sum(1 for _ in csv.reader(f)) - 1  # records, not lines (a quoted field may span lines)
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path} is not UTF-8 text ({e}); save it as CSV UTF-8") from None
    reader = csv.DictReader(open(path, newline="", encoding="utf-8-sig"))
    return iter(reader), max(total, 0), list(reader.fieldnames or [])


def main(target: str, path: str, *, wait: bool, timeout: float, credentials=None, token=None,
         max_message_bytes: int | None = None) -> int:
    from tqdm import tqdm

    from titan_fusion.client import FusionClient, FusionClientError
    from titan_fusion.client.client import BULK_MESSAGE_BYTES
    if max_message_bytes is None:  # the client's own default
        max_message_bytes = BULK_MESSAGE_BYTES
    rows, total, names = read_file(Path(path))
    kinds = {column(c)[0] for c in names}
    if "event_id" not in kinds:
        print(f"warning: {path} has no event_id column: the service cannot tell its rows from earlier ones, so "
              "running this file again learns every row again", file=sys.stderr)
    started = time.monotonic()
    with FusionClient(target, timeout=timeout, credentials=credentials, token=token) as client:
        bar = tqdm(parse_rows(rows), total=total, unit="outcome", mininterval=0.5)
        try:
            result = client.record_outcomes(bar, timeout=timeout, max_message_bytes=max_message_bytes)
        except FusionClientError as e:
            print(f"\n{target}: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            bar.close()
            print(f"\ninterrupted after reading {bar.n:,} rows: the service journals what it received in whole "
                  "chunks (Stats: journal_sequence); run the same file again to send the rest (rows with an "
                  "event_id already journaled are skipped as duplicates)", file=sys.stderr)
            return 130
        finally:
            bar.close()
        sent = time.monotonic() - started
        print(f"journaled {result.accepted:,} outcomes ({result.duplicates:,} duplicates, {result.rejected:,} rejected) "
              f"in {sent:.1f} s: {result.accepted / max(sent, 1e-9):,.0f}/s; journal at seq {result.journal_sequence}")
        for r in result.rejections[:20]:
            print(f"  row {r['index']} ({r['event_id'] or 'no event_id'}): {r['code']}: {r['message']}")
        if wait:  # until the model has learned up to the last row journaled
            applied = client.stats()["service"]["applied_sequence"]
            start = applied
            with tqdm(total=max(result.journal_sequence - applied, 0), unit="outcome", desc="training",
                      mininterval=0.5) as train_bar:
                while applied < result.journal_sequence:
                    time.sleep(0.2)
                    applied = client.stats()["service"]["applied_sequence"]
                    train_bar.update(min(applied, result.journal_sequence) - start - train_bar.n)
            print(f"trained: {client.stats()['samples_trained']:,} outcomes learned, "
                  f"{time.monotonic() - started:.1f} s in all")
    return 0 if result.rejected == 0 else 2
