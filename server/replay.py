"""`titan-fusion replay FILE`: send a history of outcomes to a running service in bulk.

The file is CSV (or Parquet, when pyarrow is installed), one outcome per row, in the order the
model should learn them:

    event_id,actual_direction,expert.TrendVIC,expert.Oscillator,confidence.TrendVIC,feature.close,feature.rsi
    BTCUSDT:15m:2021-09-27T00:00Z,UP,0.61,0.48,0.9,43210.5,55.2

- `event_id`: the candle's key (recommended: a re-run is then idempotent, duplicates are skipped, as
  far back as the service's `journal_keep_outcomes`);
- `actual_direction`: UP or DOWN (also up/down, 1/0);
- `expert.<name>`: that expert's prob_up; `confidence.<name>` optional; an empty cell is missing;
- `feature.<name>`: a market feature. Other columns are ignored.

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

DIRECTIONS = {"UP": "UP", "DOWN": "DOWN", "1": "UP", "0": "DOWN"}


def parse_rows(rows: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """CSV/Parquet rows -> outcomes for FusionClient.record_outcomes(). A value that cannot be read
    as a number is sent as NaN, so that the service rejects that row by index, naming the field."""
    for row in rows:
        experts: dict[str, dict[str, Any]] = {}
        features: dict[str, float] = {}
        for key, value in row.items():
            if value is None or value == "":
                continue
            kind, _, name = str(key).partition(".")
            if kind == "expert":
                experts.setdefault(name, {"name": name})["prob_up"] = _number(value)
            elif kind == "confidence":
                experts.setdefault(name, {"name": name})["confidence"] = _number(value)
            elif kind == "feature":
                features[name] = _number(value)
        direction = str(row.get("actual_direction", "")).strip()
        yield {"event_id": str(row.get("event_id") or "") or None,
               "actual_direction": DIRECTIONS.get(direction.upper(), direction),
               "experts": [e for e in experts.values() if "prob_up" in e] or None,
               "features": features}


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_file(path: Path) -> tuple[Iterator[Mapping[str, Any]], int | None]:
    """Rows of a CSV or Parquet file, and their count when cheap to know."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("reading Parquet needs pyarrow: pip install pyarrow (or convert the file to CSV)")
        pf = pq.ParquetFile(path)
        return (row for batch in pf.iter_batches() for row in batch.to_pylist()), pf.metadata.num_rows
    with open(path, newline="") as f:
        total = max(sum(1 for _ in f) - 1, 0)
    handle = open(path, newline="")
    return iter(csv.DictReader(handle)), total


def main(target: str, path: str, *, wait: bool, timeout: float, credentials=None, token=None,
         max_message_bytes: int | None = None) -> int:
    from tqdm import tqdm

    from titan_fusion.client import FusionClient, FusionClientError
    from titan_fusion.client.client import BULK_MESSAGE_BYTES
    if max_message_bytes is None:  # the client's own default
        max_message_bytes = BULK_MESSAGE_BYTES
    rows, total = read_file(Path(path))
    started = time.monotonic()
    with FusionClient(target, timeout=timeout, credentials=credentials, token=token) as client:
        bar = tqdm(parse_rows(rows), total=total, unit="outcome", mininterval=0.5)
        try:
            result = client.record_outcomes(bar, timeout=timeout, max_message_bytes=max_message_bytes)
        except FusionClientError as e:
            print(f"\n{target}: {e}", file=sys.stderr)
            return 1
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
