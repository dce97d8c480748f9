"""Bulk replay: RecordOutcomeBatches (client streaming, what the client sends), RecordOutcomes and
`titan-fusion replay FILE`."""
from __future__ import annotations

import csv
import subprocess
import sys
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from titan_fusion.client import FusionClient
from titan_fusion.server.config import FusionConfig
from titan_fusion.server.fusion import TransformerFusion
from titan_fusion.server.service import create_server
from titan_fusion.server.settings import ServiceConfig

FAST = FusionConfig(min_samples=20, warmup_steps=10, batch_size=8, val_every=5, early_stopping_patience=10_000)


@pytest.fixture
def service(tmp_path):
    svc, port = create_server(ServiceConfig(port=0, metrics_port=-1, data_dir=str(tmp_path / "data"), fusion=FAST,
                                            checkpoint_every=0), registry=CollectorRegistry())
    assert svc.wait_ready(30)
    client = FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False)
    yield svc, client, port
    client.close()
    svc.stop(grace=1)


def _wait_trained(client, n, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        s = client.stats()
        if s["service"]["training_lag"] == 0 and s["samples_trained"] >= n:
            return s
        assert time.monotonic() < deadline, s["service"]
        time.sleep(0.05)


def _assert_is_the_in_process_model(client, stats, events, probe) -> None:
    """The service's model is the in-process class's after learning `events` in order: the same
    training steps, and the same prob_up for `probe` (experts, features, _), bit for bit."""
    ref = TransformerFusion(FAST, n_models=4)
    for e, f, d in events:
        ref.update(e, f, d)
    assert stats["train_steps"] == ref.version
    assert client.predict(probe[0], probe[1]).prob_up == ref.forward(probe[0], probe[1])[0]


def test_a_stream_is_journaled_learned_in_order_and_bad_rows_are_reported(service, stream):
    svc, client, _ = service
    events = list(stream(61, 1300))  # more than two chunks of 512
    rows = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"b{i}"} for i, (e, f, d) in enumerate(events)]
    rows.insert(100, {"experts": [{"prob_up": float("nan")}] * 4, "features": events[0][1],
                      "actual_direction": "UP", "event_id": "bad-nan"})
    rows.insert(700, {"experts": events[0][0], "features": events[0][1], "actual_direction": "SIDEWAYS",
                      "event_id": "bad-dir"})
    rows.append(dict(rows[5]))  # a duplicate within the stream
    result = client.record_outcomes(rows)
    assert (result.accepted, result.duplicates, result.rejected) == (1300, 1, 2)
    assert [(r["index"], r["event_id"], r["code"]) for r in result.rejections] == [
        (100, "bad-nan", "INVALID_ARGUMENT"), (700, "bad-dir", "INVALID_ARGUMENT")]
    assert "experts[0].prob_up" in result.rejections[0]["message"]
    assert "actual_direction" in result.rejections[1]["message"]
    stats = _wait_trained(client, 1300)
    assert stats["samples_trained"] == 1300 and stats["service"]["applied_sequence"] == result.journal_sequence
    # the model learned exactly the accepted rows, in stream order: as the in-process class would
    _assert_is_the_in_process_model(client, stats, events, next(stream(62, 1)))
    # a re-run is idempotent: everything is a duplicate, nothing is learned twice
    again = client.record_outcomes([r for r in rows if r["event_id"].startswith("b")])
    assert (again.accepted, again.duplicates) == (0, 1301)
    assert client.stats()["samples_trained"] == 1300


def test_single_outcomes_wait_for_a_lagging_bulk_replay_and_see_it(service, stream):
    """RecordOutcome is learned after everything journaled before it, so a Predict after its
    acknowledgement sees the bulk rows too."""
    svc, client, _ = service
    events = list(stream(63, 600))
    client.record_outcomes([{"experts": e, "features": f, "actual_direction": d, "event_id": f"r{i}"}
                            for i, (e, f, d) in enumerate(events[:599])])
    e, f, d = events[599]
    ack = client.record_outcome(e, f, actual_direction=d, event_id="last")
    assert ack.samples_trained == 600
    assert client.stats()["service"]["training_lag"] == 0
    assert client.predict(e, f).model_version == ack.model_version


@pytest.mark.parametrize("startup_seconds", [10.0, 0.0])
def test_a_stop_leaves_a_bulk_backlog_to_the_journal_and_the_next_start_learns_it(
        tmp_path, stream, monkeypatch, caplog, startup_seconds):
    """A stop while training trails a bulk replay does not learn the whole backlog first (hours,
    for a long history: the stop would be killed): it learns for STOP_LEARN_SECONDS, checkpoints
    what it learned, and the next start learns the rest from the journal, to the very model of a
    service that was never stopped. The next start learns for STARTUP_LEARN_SECONDS before it
    serves (at least a chunk), and the rest while serving."""
    from titan_fusion.server import owner
    from titan_fusion.server.store import CheckpointStore

    monkeypatch.setattr(owner, "STOP_LEARN_SECONDS", 0.0)  # what a backlog longer than it looks like
    events = list(stream(65, 1200))
    rows = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"s{i}"} for i, (e, f, d) in enumerate(events)]
    config = ServiceConfig(port=0, metrics_port=-1, data_dir=str(tmp_path / "data"), fusion=FAST, checkpoint_every=0)
    svc, port = create_server(config, registry=CollectorRegistry())
    assert svc.wait_ready(30)
    with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as client:
        assert client.record_outcomes(rows).accepted == 1200
    svc.stop(grace=1)
    [info] = CheckpointStore(tmp_path / "data" / "checkpoints").list()
    assert 0 < info.applied_seq < 1200 - owner.CATCH_UP_CHUNK  # what it had learned; the rest is in the journal

    monkeypatch.setattr(owner, "STARTUP_LEARN_SECONDS", startup_seconds)
    caplog.set_level("INFO", logger=owner.log.name)
    svc, port = create_server(config, registry=CollectorRegistry())
    try:
        assert svc.wait_ready(60)
        lag = svc.metrics.registry.get_sample_value("fusion_training_lag")
        left = [r.getMessage() for r in caplog.records if "left to learn" in r.getMessage()]
        if startup_seconds:
            assert not left  # a restart's backlog: learned before serving, as before
        else:  # one chunk learned before serving, the rest while serving
            assert len(left) == 1 and left[0].startswith(f"{1200 - info.applied_seq - owner.CATCH_UP_CHUNK} journaled")
            assert lag > 0  # read at once: the catch-up takes seconds
        with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as client:
            stats = _wait_trained(client, 1200)
            assert stats["samples_trained"] == 1200 and stats["service"]["applied_sequence"] == 1200
            assert svc.metrics.registry.get_sample_value("fusion_training_lag") == 0
            _assert_is_the_in_process_model(client, stats, events, next(stream(66, 1)))
    finally:
        svc.stop(grace=1)


def test_a_backlog_left_at_start_still_fixes_the_schema_that_new_outcomes_are_checked_against(
        tmp_path, stream, monkeypatch):
    """Expert names are fixed by the first outcome whose experts are all named. When that outcome is
    in the backlog a start leaves to learn while serving, a new outcome with other names is refused
    (and not journaled), as it would be with the backlog learned."""
    from titan_fusion.client.errors import InvalidArgumentError
    from titan_fusion.server import owner

    monkeypatch.setattr(owner, "STOP_LEARN_SECONDS", 0.0)
    monkeypatch.setattr(owner, "STARTUP_LEARN_SECONDS", 0.0)
    events = list(stream(70, 800))
    anonymous = [{"experts": [{"prob_up": x["prob_up"]} for x in e], "features": f, "actual_direction": d,
                  "event_id": f"a{i}"} for i, (e, f, d) in enumerate(events[:300])]
    named = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"n{i}"}
             for i, (e, f, d) in enumerate(events[300:])]
    config = ServiceConfig(port=0, metrics_port=-1, data_dir=str(tmp_path / "data"), fusion=FAST, checkpoint_every=0)
    svc, port = create_server(config, registry=CollectorRegistry())
    assert svc.wait_ready(30)
    with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as client:
        assert client.record_outcomes(anonymous + named).accepted == 800
    svc.stop(grace=1)
    svc, port = create_server(config, registry=CollectorRegistry())
    try:
        assert svc.wait_ready(60)
        with FusionClient(f"127.0.0.1:{port}", timeout=30, fallback=False) as client:
            e, f, d = events[0]
            other = [{"prob_up": x["prob_up"], "name": f"zz{k}"} for k, x in enumerate(e)]
            with pytest.raises(InvalidArgumentError, match="unknown expert name"):
                client.record_outcome(other, f, actual_direction=d, event_id="live-1")
            ack = client.record_outcome(e, f, actual_direction=d, event_id="live-1")  # the same id, corrected
            assert not ack.duplicate and ack.samples_trained == 801
    finally:
        svc.stop(grace=1)


def test_automatic_checkpoints_go_on_while_training_catches_up(tmp_path, stream):
    """Catching up with a bulk replay's backlog takes automatic checkpoints as it goes (after the
    slice in which checkpoint_every outcomes were learned), not only once caught up."""
    from titan_fusion.server.store import CheckpointStore

    config = ServiceConfig(port=0, metrics_port=-1, data_dir=str(tmp_path / "data"), fusion=FAST, checkpoint_every=100)
    svc, port = create_server(config, registry=CollectorRegistry())
    try:
        assert svc.wait_ready(30)
        with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as client:
            client.record_outcomes([{"experts": e, "features": f, "actual_direction": d, "event_id": f"c{i}"}
                                    for i, (e, f, d) in enumerate(stream(67, 1000))])
            _wait_trained(client, 1000)
    finally:
        svc.stop(grace=1)
    infos = CheckpointStore(tmp_path / "data" / "checkpoints").list()
    assert infos[0].applied_seq == 1000
    # one when checkpoint_every outcomes are learned and the learning slice ends: a slice (0.1 s)
    # may learn far past 100 on a fast machine, so not ten; only once caught up, it was one
    assert infos[0].generation >= 2


def test_a_duplicate_of_an_outcome_not_learned_yet_is_answered_once_it_is(service, stream):
    """A RecordOutcome whose event_id is a bulk row still in the backlog is a duplicate, answered
    (like the original would be) only once that row is learned: a Predict after it sees the row."""
    svc, client, _ = service
    events = list(stream(68, 600))
    client.record_outcomes([{"experts": e, "features": f, "actual_direction": d, "event_id": f"d{i}"}
                            for i, (e, f, d) in enumerate(events)])
    e, f, d = events[599]
    ack = client.record_outcome(e, f, actual_direction=d, event_id="d599")
    assert ack.duplicate and ack.samples_trained == 600
    assert client.predict(e, f).model_version == ack.model_version
    assert client.stats()["samples_trained"] == 600


def test_a_checkpoint_save_behind_a_backlog_is_refused_past_its_deadline_then_saves(service, stream):
    """Save learns the backlog first (a checkpoint holds every acknowledged outcome), within the
    caller's deadline: past it, UNAVAILABLE naming the lag, what was learned staying learned."""
    from titan_fusion.client.errors import UnavailableError

    svc, client, _ = service
    client.record_outcomes([{"experts": e, "features": f, "actual_direction": d, "event_id": f"k{i}"}
                            for i, (e, f, d) in enumerate(stream(69, 1500))])
    with pytest.raises(UnavailableError, match="outcomes behind the journal"):
        client.checkpoint_save("behind", timeout=1.0)
    _wait_trained(client, 1500)
    assert client.checkpoint_save("caught-up").samples_trained == 1500


def test_replay_command_sends_a_csv_file(service, stream, tmp_path):
    svc, client, port = service
    path = tmp_path / "history.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["event_id", "actual_direction", "expert.good", "expert.noise0", "expert.noise1",
                    "expert.noise2", "feature.close", "feature.rsi", "comment"])
        for i, (e, f, d) in enumerate(stream(64, 200)):
            w.writerow([f"csv-{i}", d] + [x["prob_up"] for x in e] + [f["close"], f["rsi"], "ignored"])
        w.writerow(["csv-bad", "UP", "0.5", "0.5", "oops", "0.5", "1", "1", ""])
    cmd = [sys.executable, "-m", "titan_fusion.server.cli", "replay", str(path), "--target", f"127.0.0.1:{port}", "--wait"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr  # 2: some rows were rejected
    assert "journaled 200 outcomes (0 duplicates, 1 rejected)" in out.stdout
    assert "row 200 (csv-bad): INVALID_ARGUMENT: experts[2].prob_up" in out.stdout
    assert client.stats()["samples_trained"] == 200
    out = subprocess.run(cmd + ["--max-message-bytes", "1000"], capture_output=True, text=True, timeout=120)
    assert "journaled 0 outcomes (200 duplicates, 1 rejected)" in out.stdout  # a few rows a message: the same


def test_replay_reads_headers_as_spreadsheets_write_them_so_a_rerun_is_idempotent(service, stream, tmp_path):
    """Excel's "CSV UTF-8" starts with a byte order mark; column names in another case or with
    spaces are the same columns. Missing the event_id column would make every re-run learn the
    whole file again; a file without one is sent with a warning."""
    _, client, port = service
    path = tmp_path / "excel.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as fh:
        w = csv.writer(fh)
        w.writerow([" Event_ID", "Actual_Direction ", "Expert.good", "EXPERT.noise0", "expert.noise1",
                    "expert.noise2", "Feature.close", "feature.rsi"])
        for i, (e, f, d) in enumerate(stream(68, 60)):
            w.writerow([f"x-{i}", d.lower()] + [x["prob_up"] for x in e] + [f["close"], f["rsi"]])
    cmd = [sys.executable, "-m", "titan_fusion.server.cli", "replay", str(path), "--target", f"127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "journaled 60 outcomes (0 duplicates, 0 rejected)" in out.stdout, out
    assert "warning" not in out.stderr
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "journaled 0 outcomes (60 duplicates, 0 rejected)" in out.stdout, out
    s = _wait_trained(client, 60)
    assert s["samples_trained"] == 60 and client.stats()["attention"].keys() == {"good", "noise0", "noise1", "noise2"}
    bare = tmp_path / "no-ids.csv"
    bare.write_text("actual_direction,expert.good,expert.noise0,expert.noise1,expert.noise2,feature.close,feature.rsi\n"
                    "UP,0.6,0.5,0.5,0.5,100,50\n")
    out = subprocess.run(cmd[:4] + [str(bare)] + cmd[5:], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "has no event_id column" in out.stderr, out


def test_replay_parses_parquet_values_as_they_come():
    """pyarrow hands over typed values: an integer event_id (0 included), directions as 1.0/0.0 or
    booleans, NaN for a missing confidence."""
    from titan_fusion.server.replay import parse_rows
    rows = [{"event_id": 0, "actual_direction": 1.0, "expert.a": 0.6, "confidence.a": float("nan"), "expert.b": 0.4},
            {"event_id": 7, "actual_direction": False, "expert.a": 0.3, "confidence.a": 0.9, "expert.b": None}]
    assert list(parse_rows(rows)) == [
        {"event_id": "0", "actual_direction": "UP", "experts": [{"name": "a", "prob_up": 0.6}, {"name": "b", "prob_up": 0.4}],
         "features": {}},
        {"event_id": "7", "actual_direction": "DOWN", "experts": [{"name": "a", "prob_up": 0.3, "confidence": 0.9}],
         "features": {}}]


def test_record_outcomes_cuts_messages_by_rows_and_by_size(service, stream, monkeypatch):
    """Rows travel rows_per_message to a message, fewer when the next row would take a message past
    max_message_bytes (a row too big for it goes alone); the answer is the same however they are
    cut, indices counting rows."""
    svc, client, _ = service
    sent: list[int] = []
    sizes: list[int] = []
    invoke = client._invoke

    def spy(method, batches, timeout, **kw):
        batches = list(batches)
        sent.extend(len(b.outcomes) for b in batches)
        sizes.extend(b.ByteSize() for b in batches)
        return invoke(method, iter(batches), timeout, **kw)

    monkeypatch.setattr(client, "_invoke", spy)
    events = list(stream(65, 40))
    rows = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"cut{i:02d}"}
            for i, (e, f, d) in enumerate(events)]
    rows[20]["actual_direction"] = "SIDEWAYS"
    result = client.record_outcomes(rows, rows_per_message=7)
    assert sent == [7] * 5 + [5]
    assert (result.accepted, result.rejected) == (39, 1) and result.rejections[0]["index"] == 20
    # a byte budget of about three rows: three to a message, never over it; a big row goes alone
    budget = 3 * (len(pb_row(rows[0]).SerializeToString()) + 6)
    rows[30] = {**rows[30], "features": {**rows[30]["features"], **{f"f{k}": 1.0 for k in range(40)}}}
    sent.clear()
    sizes.clear()
    again = client.record_outcomes(rows, max_message_bytes=budget)
    assert sent == [3] * 10 + [1, 3, 3, 3] and max(sizes[:10] + sizes[11:]) <= budget < sizes[10]
    assert (again.accepted, again.duplicates, again.rejected) == (0, 38, 2)
    assert [r["index"] for r in again.rejections] == [20, 30]  # the big row: an unknown feature


def pb_row(item):
    from titan_fusion.client.convert import to_expert_forecasts
    from titan_fusion.client.pb import fusion_pb2 as pb
    return pb.RecordOutcomeRequest(experts=to_expert_forecasts(item["experts"]), features=item["features"],
                                   event_id=item["event_id"], actual_direction=pb.DIRECTION_UP)


def test_record_outcomes_sends_the_rows_before_one_it_cannot_convert_then_raises(service, stream):
    svc, client, _ = service
    rows = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"conv{i}"}
            for i, (e, f, d) in enumerate(stream(66, 600))]
    rows[550]["event_id"] = 550  # not a str: the client refuses it
    with pytest.raises(TypeError) as err:
        client.record_outcomes(rows)
    assert "550 rows accepted before it are journaled" in "".join(getattr(err.value, "__notes__", []))
    assert client.stats()["service"]["journal_sequence"] == 550


def test_a_chunk_that_fails_fails_the_rest_of_its_stream_so_a_rerun_keeps_the_file_order(service, stream, monkeypatch):
    """The second chunk's journal commit fails (an I/O error, say) while the next chunks of the
    stream are queued behind it: none of them is journaled, so the re-run journals the missing
    rows in file order."""
    import sqlite3

    from titan_fusion.client import FusionClientError
    from titan_fusion.server.journal import Journal
    from titan_fusion.server.service import BULK_CHUNK
    svc, client, _ = service
    append = Journal.append_outcomes
    calls = []

    def failing_once(self, *args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            time.sleep(0.5)  # the handler queues the stream's next chunks meanwhile
            raise sqlite3.OperationalError("disk I/O error")
        return append(self, *args, **kwargs)
    monkeypatch.setattr(Journal, "append_outcomes", failing_once)
    rows = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"ord-{i}"}
            for i, (e, f, d) in enumerate(stream(69, 5 * BULK_CHUNK))]
    with pytest.raises(FusionClientError):
        client.record_outcomes(rows, timeout=60)
    assert [o.event_id for o in svc.journal.outcomes_after(0)] == [f"ord-{i}" for i in range(BULK_CHUNK)]
    monkeypatch.setattr(Journal, "append_outcomes", append)
    result = client.record_outcomes(rows, timeout=60)
    assert (result.accepted, result.duplicates) == (4 * BULK_CHUNK, BULK_CHUNK)
    assert [o.event_id for o in svc.journal.outcomes_after(0)] == [f"ord-{i}" for i in range(5 * BULK_CHUNK)]


def test_a_duplicate_sent_right_after_a_bulk_stream_is_answered_as_one(service, stream):
    """Within BULK_QUIET_SECONDS of a bulk chunk the owner skips its learning slice; a duplicate
    answered then was once sent out unconverted (INTERNAL)."""
    _, client, _ = service
    rows = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"quiet{i}"}
            for i, (e, f, d) in enumerate(stream(70, 30))]
    for _ in range(3):
        client.record_outcomes(rows)
        ack = client.record_outcome(rows[0]["experts"], rows[0]["features"], actual_direction="UP", event_id="quiet0")
        assert ack.duplicate


def test_record_outcomes_without_a_timeout_has_no_deadline(service, stream):
    """timeout=None: the stream may take longer than the client's per-call default (0.3 s here)."""
    _, _, port = service

    def slowly():
        for i, (e, f, d) in enumerate(stream(67, 3)):
            time.sleep(0.4)
            yield {"experts": e, "features": f, "actual_direction": d, "event_id": f"slow{i}"}
    with FusionClient(f"127.0.0.1:{port}", timeout=0.3, fallback=False) as quick:
        assert quick.record_outcomes(slowly(), timeout=None).accepted == 3


def test_record_outcomes_against_a_server_without_the_batched_stream_says_so(tmp_path):
    """A real gRPC server that does not implement RecordOutcomeBatches (as an older service)."""
    from concurrent import futures

    import grpc

    from titan_fusion.client.errors import ServerError
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as client:
            with pytest.raises(ServerError, match="does not implement RecordOutcomeBatches") as err:
                client.record_outcomes([{"experts": [{"prob_up": 0.6}], "actual_direction": "UP"}])
            assert err.value.code is grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)


def test_catching_up_with_a_backlog_is_not_an_outcome_for_the_no_outcomes_gauge(service, stream):
    """fusion_last_outcome_timestamp_seconds is when the newest outcome was journaled: learning a
    backlog afterwards (for hours, after a long replay or a restart) does not move it, so the
    FusionNoOutcomes alert still sees a trader that stopped reporting."""
    svc, client, _ = service
    events = list(stream(67, 1300))
    started = time.time()
    client.record_outcomes([{"experts": e, "features": f, "actual_direction": d, "event_id": f"g{i}"}
                            for i, (e, f, d) in enumerate(events)])
    acknowledged = time.time()
    assert client.stats()["service"]["training_lag"] > 0  # training trails the acknowledgement
    _wait_trained(client, 1300)
    gauge = svc.metrics.registry.get_sample_value("fusion_last_outcome_timestamp_seconds")
    assert started <= gauge <= acknowledged


def _raw_stream_rows(events, prefix):
    from titan_fusion.client.pb import fusion_pb2 as pb
    return [pb_row({"experts": e, "features": f, "event_id": f"{prefix}{i}"}) for i, (e, f, _) in enumerate(events)]


def test_bulk_streams_beyond_max_bulk_streams_are_refused_and_predict_and_health_keep_threads(tmp_path, stream):
    """Each open bulk stream holds a handler thread: with max_bulk_streams open (idle, as a replay
    stalled on a slow file), Predict, Stats and health are still answered, and one more stream is
    refused at once with RESOURCE_EXHAUSTED naming the setting; the open ones then finish as usual."""
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc
    svc, port = create_server(ServiceConfig(port=0, metrics_port=-1, data_dir=str(tmp_path / "data"), fusion=FAST,
                                            checkpoint_every=0, max_workers=4, max_bulk_streams=2),
                              registry=CollectorRegistry())
    assert svc.wait_ready(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.FusionServiceStub(channel)
    rows = _raw_stream_rows(stream(68, 30), "held")
    release = threading.Event()
    sent = [threading.Event(), threading.Event()]

    def held(k):
        yield rows[k]
        sent[k].set()
        release.wait(30)

    try:
        calls = [stub.RecordOutcomes.future(held(k), timeout=30) for k in range(2)]
        assert all(e.wait(10) for e in sent)
        time.sleep(0.2)  # both streams are in their handlers
        with FusionClient(f"127.0.0.1:{port}", timeout=5, fallback=False) as client:
            assert client.stats()["service"]["journal_sequence"] == 0
            assert client.predict(*next(stream(69, 1))[:2]).source == "average"
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                stub.RecordOutcomes(iter(rows[2:3]), timeout=10)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "service.max_bulk_streams" in refused.value.details()
            assert time.monotonic() - started < 5
            release.set()
            assert [c.result(timeout=10).accepted for c in calls] == [1, 1]
            assert stub.RecordOutcomes(iter(rows[2:3]), timeout=10).accepted == 1  # a thread is free again
    finally:
        release.set()
        channel.close()
        svc.stop(grace=1)


def test_a_bulk_answer_lists_rejections_within_the_message_limit(tmp_path, stream):
    """Every rejected row is counted, but the listed ones (each message cut to 500 characters) stop
    within a quarter of max_message_bytes: the answer always fits, and the rows accepted before
    are acknowledged rather than lost behind a RESOURCE_EXHAUSTED."""
    svc, port = create_server(ServiceConfig(port=0, metrics_port=-1, data_dir=str(tmp_path / "data"), fusion=FAST,
                                            checkpoint_every=0, max_message_bytes=16 * 1024),
                              registry=CollectorRegistry())
    assert svc.wait_ready(30)
    try:
        with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as client:
            events = list(stream(70, 90))
            rows = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"lim{i}"}
                    for i, (e, f, d) in enumerate(events)]
            for r in rows[30:]:  # 60 rows with 8 unknown features of long names each
                r["features"] = {**r["features"], **{f"{k}" + "u" * 100: 1.0 for k in range(8)}}
            result = client.record_outcomes(rows, max_message_bytes=8 * 1024)
            assert (result.accepted, result.rejected) == (30, 60)
            assert 0 < len(result.rejections) < 60
            assert all(len(r["message"]) <= 500 and r["code"] == "INVALID_ARGUMENT" for r in result.rejections)
            assert [r["index"] for r in result.rejections] == list(range(30, 30 + len(result.rejections)))
            assert client.stats()["service"]["outcomes"] == 30
    finally:
        svc.stop(grace=1)


def test_a_stream_that_ends_early_counts_in_stats_what_it_journaled(service, stream):
    """A client that cancels its stream: the chunks handed to the owner are journaled and learned,
    and Stats' outcome count says so (it was counted only at the stream's end)."""
    import threading

    import grpc

    from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc
    svc, client, port = service
    rows = _raw_stream_rows(stream(71, 1100), "gone")
    hold = threading.Event()

    def rows_then_wait():
        yield from rows
        hold.wait(30)

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.FusionServiceStub(channel).RecordOutcomes.future(rows_then_wait(), timeout=30)
        deadline = time.monotonic() + 20
        while client.stats()["service"]["journal_sequence"] < 1024:  # two chunks of 512 handed over
            assert time.monotonic() < deadline
            time.sleep(0.05)
        call.cancel()
        hold.set()
    deadline = time.monotonic() + 20
    while (s := client.stats()["service"])["outcomes"] != s["journal_sequence"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    # The last 76 rows (a chunk being gathered) are dropped when the handler sees the cancel. grpc's
    # server may instead end the request iterator as if the client had closed the stream, when it
    # learns of the end of the messages before the cancel (grpc/_server.py _receive_message: the
    # stream is then _CLOSED, not _CANCELLED): then they were a complete stream to the service.
    # Either way, Stats counts what was journaled.
    assert s["journal_sequence"] in (1024, 1100), s
    assert s["outcomes"] == s["journal_sequence"]
