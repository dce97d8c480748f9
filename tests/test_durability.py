"""Checkpoints and the journal on disk: fallback from a corrupt checkpoint, retention bounds,
interrupted writes."""
from __future__ import annotations

import os
import time

import pytest
from prometheus_client import CollectorRegistry

from titan_fusion.client import FusionClient
from titan_fusion.server.checkpoint import MODEL_FILE
from titan_fusion.server.config import FusionConfig
from titan_fusion.server.fusion import TransformerFusion
from titan_fusion.server.inference import Event
from titan_fusion.server.journal import PRUNE_EVERY, Journal
from titan_fusion.server.service import create_server
from titan_fusion.server.settings import ServiceConfig
from titan_fusion.server.store import CheckpointStore

FAST = FusionConfig(min_samples=20, warmup_steps=10, batch_size=8, val_every=5, early_stopping_patience=10_000)


def _start(data, **kw):
    svc, port = create_server(ServiceConfig(port=0, metrics_port=-1, data_dir=str(data), fusion=FAST, **kw),
                              registry=CollectorRegistry())
    assert svc.wait_ready(30)
    return svc, FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False)


def _restarted_serves(data, samples, probe_events, probes, **kw):
    """A service started again on `data` has learned `samples` outcomes and forecasts `probes`
    for `probe_events`, bit for bit."""
    svc, client = _start(data, **kw)
    try:
        assert client.stats()["samples_trained"] == samples
        assert [client.predict(e, f).prob_up for e, f, _ in probe_events] == probes
    finally:
        client.close()
        svc.stop(grace=1)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, stream, caplog):
    data = tmp_path / "data"
    events = list(stream(41, 75))
    svc, client = _start(data, checkpoint_every=10, checkpoints_keep=3)
    for i, (e, f, d) in enumerate(events):
        client.record_outcome(e, f, actual_direction=d, event_id=f"ev-{i}")
    probes = [client.predict(e, f).prob_up for e, f, _ in stream(42, 10)]
    client.close()
    svc.stop(grace=1)  # graceful: a last automatic checkpoint at 75 outcomes
    autos = sorted(p.name for p in (data / "checkpoints").iterdir())
    assert len(autos) == 3, autos  # only the newest `checkpoints_keep` automatic ones are kept
    newest = data / "checkpoints" / autos[-1]
    (newest / MODEL_FILE).write_bytes((newest / MODEL_FILE).read_bytes()[:1000])  # truncated
    svc, client = _start(data, checkpoint_every=10, checkpoints_keep=3)
    try:
        assert any("unusable" in r.message and autos[-1] in r.message for r in caplog.records)
        stats = client.stats()
        assert stats["samples_trained"] == 75  # the previous checkpoint, then the journal replayed
        assert [client.predict(e, f).prob_up for e, f, _ in stream(42, 10)] == probes
    finally:
        client.close()
        svc.stop(grace=1)


def test_every_checkpoint_unusable_means_replaying_the_whole_journal(tmp_path, stream):
    data = tmp_path / "data"
    svc, client = _start(data, checkpoint_every=0)
    events = list(stream(43, 40))
    for i, (e, f, d) in enumerate(events):
        client.record_outcome(e, f, actual_direction=d, event_id=f"ev-{i}")
    probes = [client.predict(e, f).prob_up for e, f, _ in stream(44, 5)]
    client.close()
    svc.stop(grace=1)
    for ck in (data / "checkpoints").iterdir():
        (ck / MODEL_FILE).write_bytes(b"garbage")
    _restarted_serves(data, 40, list(stream(44, 5)), probes, checkpoint_every=0)


def test_journal_retention_holds_its_bounds(tmp_path, stream):
    j = Journal(tmp_path / "j.sqlite3", keep_outcomes=50, keep_predictions=100, horizon_seconds=3600)
    evs = [Event.parse(e, f) for e, f, _ in stream(45, 10)]
    for i in range(0, 300, 30):
        j.append_outcomes([(f"o-{k}", evs[k % 10], k % 2) for k in range(i, i + 30)])
    assert j.last_seq() == 300 and j.count_outcomes() == 300
    j.prune(applied_seq=120)  # only outcomes a checkpoint has seen may go
    assert j.count_outcomes() == 300 - 120
    j.prune(applied_seq=300)
    assert j.count_outcomes() == 50
    assert j.append_outcomes([("o-299", evs[0], 1)]) == [None]  # still a duplicate: within the window
    assert j.last_seq() == 300
    assert [o.seq for o in j.outcomes_after(0)][0] == 251
    for k in range(3 * PRUNE_EVERY):
        j.remember_predictions([(f"p-{k}", evs[k % 10])])
    assert j.count_predictions() <= 100 + PRUNE_EVERY
    j.prune_predictions()
    assert j.count_predictions() == 100
    assert j.predicted_event(f"p-{3 * PRUNE_EVERY - 1}") is not None and j.predicted_event("p-0") is None
    j.close()


def test_predictions_past_the_horizon_are_forgotten(tmp_path, stream):
    j = Journal(tmp_path / "j.sqlite3", horizon_seconds=0.2)
    ev = Event.parse(*next(stream(46, 1))[:2])
    j.remember_predictions([("old", ev)])
    assert j.predicted_event("old") == ev
    time.sleep(0.3)
    assert j.predicted_event("old") is None
    assert j.prune_predictions() == 1 and j.count_predictions() == 0
    j.close()


def test_the_journal_survives_reopening_and_keeps_its_sequence(tmp_path, stream):
    path = tmp_path / "j.sqlite3"
    ev = Event.parse(*next(stream(47, 1))[:2])
    j = Journal(path, keep_outcomes=1)
    assert j.append_outcomes([("a", ev, 1), ("b", ev, 0), ("a", ev, 0)]) == [1, 2, None]
    j.prune(applied_seq=2)
    j.close()
    j = Journal(path, keep_outcomes=1)
    [seq] = j.append_outcomes([("c", ev, 1)])
    assert j.last_seq() == seq > 2  # increasing, never reused (an ignored duplicate may leave a gap)
    assert [(o.seq, o.event_id, o.event, o.label) for o in j.outcomes_after(2)] == [(seq, "c", ev, 1)]
    j.close()


def _taken(outcomes) -> list:
    return [(o.seq, o.label, o.scored) for o in outcomes]


def test_the_backlog_comes_with_what_live_scoring_took_when_each_outcome_was_recorded(tmp_path, stream):
    """outcomes_from (a backlog's span read back) and outcomes_after give each outcome the live
    scoring journaled with it: the same after its Predict was predicted again, went past the horizon
    and was pruned."""
    from titan_fusion.server.journal import Scored

    j = Journal(tmp_path / "j.sqlite3", horizon_seconds=1.0)
    a, b = (Event.parse(*x[:2]) for x in stream(48, 2))
    took = Scored(0.4, 0.42, 0.45)
    assert j.append_outcomes([("x", a, 1), ("p", b, 0), (None, a, 1)], [None, took, None]) == [1, 2, 3]
    assert j.append_outcomes([("y", a, 0)]) == [4]  # no scoring given: none
    want = [(2, 0, took), (3, 1, None), (4, 0, None)]
    assert _taken(j.outcomes_from(2, 3)) == want
    assert _taken(j.outcomes_from(2, 2)) == want[:2] and _taken(j.outcomes_from(5, 3)) == []
    j.remember_predictions([("p", b, 0.9, 0.9, 0.9), ("x", a, 0.6, 0.7, 0.5)])  # predicted again, or late
    assert _taken(j.outcomes_from(2, 3)) == want
    assert _taken(j.outcomes_after(0)) == [(1, 1, None)] + want
    time.sleep(1.1)
    assert j.prune_predictions() == 2
    assert _taken(j.outcomes_from(2, 3)) == want
    assert _taken(j.outcomes_after(1)) == want
    j.close()


def test_a_journal_from_before_the_live_column_is_migrated_and_its_rows_look_their_predicts_up(
        tmp_path, stream):
    """Rows journaled before the live-scoring column existed get it when the journal is opened, from
    their Predict as it is then (within the horizon), as a restart looked it up before the column,
    and keep it; rows journaled after the migration carry their own."""
    import sqlite3

    from titan_fusion.server.journal import Scored, encode_event

    path = tmp_path / "j.sqlite3"
    a, b = (Event.parse(*x[:2]) for x in stream(49, 2))
    now = time.time()
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE outcomes (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE, payload TEXT NOT NULL,
                               label INTEGER NOT NULL CHECK (label IN (0, 1)), recorded_at REAL NOT NULL);
        CREATE TABLE predictions (event_id TEXT PRIMARY KEY, payload TEXT NOT NULL, predicted_at REAL NOT NULL,
                                  served REAL, fusion REAL, average REAL);""")
    db.executemany("INSERT INTO outcomes (event_id, payload, label, recorded_at) VALUES (?, ?, ?, ?)",
                   [("p", encode_event(b), 0, now), ("old", encode_event(a), 1, now), (None, encode_event(a), 1, now),
                    ("warming", encode_event(a), 0, now)])
    db.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?)",
                   [("p", encode_event(b), now, 0.4, 0.42, 0.45), ("old", encode_event(a), now - 60, 0.6, 0.7, 0.5),
                    ("warming", encode_event(a), now, 0.5, None, 0.5)])
    db.commit()
    db.close()
    j = Journal(path, horizon_seconds=30.0)
    assert "live" in {row[1] for row in j._db.execute("PRAGMA table_info(outcomes)")}
    assert j.append_outcomes([("new", a, 1)], [Scored(0.1, 0.2, 0.3)]) == [5]
    want = [(1, 0, Scored(0.4, 0.42, 0.45)), (2, 1, None), (3, 1, None), (4, 0, None), (5, 1, Scored(0.1, 0.2, 0.3))]
    assert _taken(j.outcomes_from(1, 5)) == want
    assert _taken(j.outcomes_after(0)) == want
    assert j._db.execute("SELECT COUNT(*) FROM outcomes WHERE live IS NULL").fetchone()[0] == 0
    j.remember_predictions([("p", b, 0.9, 0.9, 0.9), ("old", a, 0.6, 0.7, 0.5)])  # predicted again later
    assert _taken(j.outcomes_from(1, 5)) == want  # what the rows took when the journal was opened
    # as a migration by an earlier version left it (the column, its rows NULL, the journal not marked)
    j._db.execute("UPDATE outcomes SET live = NULL WHERE seq = 2")
    j._db.execute("PRAGMA user_version = 0")
    j.close()
    j = Journal(path, horizon_seconds=30.0)  # reopening: only a row without the column gets it, from its Predict now
    assert _taken(j.outcomes_from(1, 5)) == want[:1] + [(2, 1, Scored(0.6, 0.7, 0.5))] + want[2:]
    j.close()


def test_an_interrupted_checkpoint_write_is_cleaned_up_or_rolled_back(tmp_path, stream):
    root = tmp_path / "checkpoints"
    f = TransformerFusion(FAST, n_models=4)
    f.update(*next(stream(48, 1)))
    store = CheckpointStore(root)
    store.save(f, "kept", applied_seq=1)
    # a crash between "move the old one aside" and "rename the new one in" ...
    os.rename(root / "kept", root / ".kept.old-abc123")
    # ... and a crash before the rename of another write
    (root / ".auto-00000009.tmp-xyz").mkdir()
    store = CheckpointStore(root)
    assert sorted(p.name for p in root.iterdir()) == ["kept"]
    assert store.load(TransformerFusion(FAST, n_models=4), "kept").samples_trained == 1


def test_a_predict_after_an_acknowledged_outcome_sees_it(tmp_path, stream):
    """Read-your-writes: the owner publishes the new model before it acknowledges the outcome."""
    svc, client = _start(tmp_path / "data", checkpoint_every=0)
    try:
        for i, (e, f, d) in enumerate(stream(49, 80)):
            ack = client.record_outcome(e, f, actual_direction=d, event_id=f"ev-{i}")
            p = client.predict(e, f)
            assert p.model_version == ack.model_version, (i, p.model_version, ack.model_version)
        assert p.source == "fusion" and ack.model_version > 0
    finally:
        client.close()
        svc.stop(grace=1)


def test_the_backlog_holds_rows_nobody_waits_for_as_spans_of_the_journal(tmp_path, stream):
    """The owner's Backlog: outcomes a caller waits for are held with their future; bulk rows as
    spans of the journal, read back (event, label, live scoring's take) in seq order when learned.
    However many bulk chunks arrive, consecutive ones make one span."""
    from concurrent.futures import Future

    from titan_fusion.server.journal import Scored
    from titan_fusion.server.owner import Backlog, _Pending

    j = Journal(tmp_path / "j.sqlite3")
    evs = [Event.parse(e, f) for e, f, _ in stream(50, 8)]
    took = Scored(0.4, 0.42, 0.45)
    assert j.append_outcomes([(f"a{k}", evs[k], k % 2) for k in range(3)], [None, took, None]) == [1, 2, 3]
    b = Backlog(j)
    assert not b and b.head(5) == []
    b.add_journaled(2, 3, 2)  # a restart's backlog after seq 1
    waiting = _Pending(4, evs[3], 1, Future(), False, None)
    assert j.append_outcomes([("w", evs[3], 1)]) == [4]
    b.add(waiting)
    for k in range(4, 8):  # bulk chunks, one row each
        assert j.append_outcomes([(f"a{k}", evs[k], k % 2)]) == [k + 1]
        b.add_journaled(k + 1, k + 1, 1)
    assert len(b) == 7 and len(b._items) == 3 and b.last_seq == 8
    assert b.held() == [waiting]
    head = b.head(10)
    assert [(p.seq, p.event, p.label, p.scored, p.future) for p in head] == (
        [(2, evs[1], 1, took, None), (3, evs[2], 0, None, None), (4, evs[3], 1, None, waiting.future)]
        + [(k + 1, evs[k], k % 2, None, None) for k in range(4, 8)])
    assert [p.seq for p in b.head(3)] == [2, 3, 4]
    for p in head[:2]:
        b.drop(p)
    assert len(b) == 5 and [p.seq for p in b.head(2)] == [4, 5]
    b.drop(head[2])
    b.drop(head[3])
    assert [p.seq for p in b.head(10)] == [6, 7, 8] and b.held() == []
    b.clear()
    assert len(b) == 0 and b.head(1) == []
    j.close()


def test_remembering_predictions_is_one_transaction_a_call(tmp_path, stream):
    """The journal's connection autocommits: without a transaction around it, remembering a batch
    of Predicts committed (and synced) each row on its own, on the model owner's thread."""
    j = Journal(tmp_path / "j.sqlite3", keep_predictions=10)
    evs = [Event.parse(e, f) for e, f, _ in stream(51, 30)]
    statements = []
    j._db.set_trace_callback(statements.append)
    j.remember_predictions([(f"p{i}", ev, 0.5, 0.6, 0.55) for i, ev in enumerate(evs)])
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
    assert len(statements) == 2 + len(evs) and "BEGIN IMMEDIATE" not in statements[1:]
    statements.clear()
    assert j.prune_predictions() == 20 and j.count_predictions() == 10
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-2:] == ["COMMIT", "SELECT COUNT(*) FROM predictions"]
    j.close()


# ---------------------------------------------------------------------------------------------
# A disk that cannot be written, a journal older than the checkpoints, retention and fallback
# ---------------------------------------------------------------------------------------------

def test_the_journal_numbers_new_outcomes_after_an_advanced_seq(tmp_path, stream):
    ev = Event.parse(*next(stream(48, 1))[:2])
    empty = Journal(tmp_path / "empty.sqlite3")
    empty.advance_seq(10)  # nothing journaled yet
    assert empty.last_seq() == 10 and empty.append_outcomes([("a", ev, 1)]) == [11]
    empty.close()
    j = Journal(tmp_path / "j.sqlite3")
    assert j.append_outcomes([("a", ev, 1), ("b", ev, 0)]) == [1, 2]
    j.advance_seq(40)
    j.advance_seq(5)  # never backwards
    assert j.append_outcomes([("c", ev, 1), ("a", ev, 0)]) == [41, None]
    j.close()


def test_a_full_disk_refuses_outcomes_with_unavailable_and_a_retry_learns_them_once(tmp_path, stream):
    """A real SQLITE_FULL (the journal's page count capped where it stands): the outcomes are not
    journaled, the caller gets UNAVAILABLE saying why, the model is unchanged and Predict answers;
    once there is room again the same rows are learned, once."""
    from titan_fusion.client import UnavailableError
    data = tmp_path / "data"
    svc, client = _start(data, checkpoint_every=0)
    try:
        for i, (e, f, d) in enumerate(stream(49, 25)):
            client.record_outcome(e, f, actual_direction=d, event_id=f"ev-{i}")
        before = client.stats()
        probe = [client.predict(e, f).prob_up for e, f, _ in stream(50, 3)]
        client.checkpoint_list()  # the owner is idle: the test thread may use its connection
        db = svc.journal._db
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        rows = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"bulk-{i}"}
                for i, (e, f, d) in enumerate(stream(51, 300))]
        with pytest.raises(UnavailableError) as info:
            client.record_outcomes(rows, timeout=30)
        assert "cannot be written" in str(info.value) and "full" in str(info.value)
        assert [client.predict(e, f).prob_up for e, f, _ in stream(50, 3)] == probe
        after = client.stats()
        assert (after["samples_trained"], after["service"]["journal_sequence"]) == (
            before["samples_trained"], before["service"]["journal_sequence"])
        db.execute("PRAGMA max_page_count = 1073741823")
        assert client.record_outcomes(rows, timeout=30).accepted == 300
        assert client.record_outcomes(rows, timeout=30).duplicates == 300
    finally:
        client.close()
        svc.stop(grace=1)


@pytest.mark.parametrize("fails", ["before_writing", "after_writing"])
def test_a_restore_whose_checkpoint_cannot_be_written_is_undone_and_refused(tmp_path, stream, monkeypatch, fails):
    """Acknowledged, such a restore would be silently undone by the next recovery (which starts
    from the newest checkpoint, from before it): it is refused, and the model stays as it was.
    A save that fails after its checkpoint is in place (the directory's fsync) leaves nothing
    behind either: a rebuild or a restart would load the restored model from it."""
    import errno

    import grpc

    from titan_fusion.client.pb import fusion_pb2 as pb
    from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc
    from titan_fusion.server.trainer import TrainerProcess
    data = tmp_path / "data"
    svc, client = _start(data, checkpoint_every=0)
    events = list(stream(52, 40))
    probes = list(stream(53, 5))
    try:
        for i, (e, f, d) in enumerate(events[:25]):
            client.record_outcome(e, f, actual_direction=d, event_id=f"a-{i}")
        client.checkpoint_save("a")
        at_a = [client.predict(e, f).prob_up for e, f, _ in probes]
        for i, (e, f, d) in enumerate(events[25:]):
            client.record_outcome(e, f, actual_direction=d, event_id=f"b-{i}")
        before, state = [client.predict(e, f).prob_up for e, f, _ in probes], client.stats()
        save = TrainerProcess.save

        def disk_full(self, path, extra=None):
            if fails == "after_writing":
                save(self, path, extra)
                raise OSError(errno.EIO, "Input/output error (No space left to sync)", str(path.parent))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        names = sorted(p.name for p in (data / "checkpoints").iterdir())
        monkeypatch.setattr(TrainerProcess, "save", disk_full)
        with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            stub = pb_grpc.FusionServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.Checkpoint(pb.CheckpointRequest(action=pb.CheckpointRequest.ACTION_RESTORE, name="a"), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "restore is undone" in info.value.details() and "No space left" in info.value.details()
        assert [client.predict(e, f).prob_up for e, f, _ in probes] == before
        assert sorted(p.name for p in (data / "checkpoints").iterdir()) == names
        now = client.stats()
        assert {k: now[k] for k in ("samples_trained", "train_steps")} == {k: state[k] for k in ("samples_trained", "train_steps")}
        assert client.record_outcome(*events[30][:2], actual_direction=events[30][2], event_id="b-5").duplicate
        monkeypatch.setattr(TrainerProcess, "save", save)
        assert client.checkpoint_restore("a", timeout=30).samples_trained == 25
        assert [client.predict(e, f).prob_up for e, f, _ in probes] == at_a
    finally:
        client.close()
        svc.stop(grace=1)


def test_a_journal_older_than_the_checkpoints_numbers_new_outcomes_after_them(tmp_path, stream, caplog):
    """A journal restored from a backup taken before the checkpoints: new outcomes get seqs past
    what the newest checkpoint covers, so that a crash afterwards does not skip them."""
    import sqlite3
    data = tmp_path / "data"
    events = list(stream(54, 75))
    probes = list(stream(55, 5))
    svc, client = _start(data, checkpoint_every=0)
    for i, (e, f, d) in enumerate(events[:40]):
        client.record_outcome(e, f, actual_direction=d, event_id=f"ev-{i}")
    client.checkpoint_list()
    backup = sqlite3.connect(tmp_path / "backup.sqlite3")
    with sqlite3.connect(data / "journal.sqlite3") as live:
        live.backup(backup)
    backup.close()
    for i, (e, f, d) in enumerate(events[40:60], start=40):
        client.record_outcome(e, f, actual_direction=d, event_id=f"ev-{i}")
    client.close()
    svc.stop(grace=1)  # a checkpoint at seq 60
    for suffix in ("", "-wal", "-shm"):
        (data / f"journal.sqlite3{suffix}").unlink(missing_ok=True)
    (tmp_path / "backup.sqlite3").rename(data / "journal.sqlite3")  # ends at seq 40

    svc, client = _start(data, checkpoint_every=0)
    assert any("the journal ends at seq 40" in r.message for r in caplog.records)
    for i, (e, f, d) in enumerate(events[60:], start=60):
        assert not client.record_outcome(e, f, actual_direction=d, event_id=f"ev-{i}").duplicate
    assert client.stats()["samples_trained"] == 75
    served = [client.predict(e, f).prob_up for e, f, _ in probes]
    client.close()
    svc.owner.stop(checkpoint=False)  # as after a crash: the checkpoint at 60 and the journal
    svc.stop(grace=0)

    svc, client = _start(data, checkpoint_every=0)
    try:
        assert client.stats()["samples_trained"] == 75  # not 60: outcomes 61-75 were replayed
        assert [client.predict(e, f).prob_up for e, f, _ in probes] == served
        e, f, d = events[70]
        assert client.record_outcome(e, f, actual_direction=d, event_id="ev-70").duplicate
    finally:
        client.close()
        svc.stop(grace=1)


def test_retention_keeps_what_a_fallback_to_the_oldest_automatic_checkpoint_needs(tmp_path, stream):
    data = tmp_path / "data"
    events = list(stream(56, 60))
    svc, client = _start(data, checkpoint_every=20, checkpoints_keep=3, journal_keep_outcomes=5)
    for i, (e, f, d) in enumerate(events):
        client.record_outcome(e, f, actual_direction=d, event_id=f"ev-{i}")
    probes = [client.predict(e, f).prob_up for e, f, _ in stream(57, 5)]
    client.close()
    svc.stop(grace=1)
    autos = sorted(p.name for p in (data / "checkpoints").iterdir())
    assert len(autos) == 3, autos  # at 20, 40 and 60 outcomes
    for name in autos[1:]:  # the two newest unusable: back to the one at 20
        (data / "checkpoints" / name / MODEL_FILE).write_bytes(b"garbage")
    _restarted_serves(data, 60, list(stream(57, 5)), probes, checkpoint_every=20, checkpoints_keep=3,
                      journal_keep_outcomes=5)


def test_pruned_outcomes_stay_duplicates_as_long_as_their_event_ids_are_kept(tmp_path, stream):
    evs = [Event.parse(e, f) for e, f, _ in stream(58, 10)]
    j = Journal(tmp_path / "j.sqlite3", keep_outcomes=50, keep_event_ids=100)
    for i in range(0, 300, 30):
        j.append_outcomes([(f"o-{k}", evs[k % 10], k % 2) for k in range(i, i + 30)])
    j.append_outcomes([(None, evs[0], 1)])  # without an event_id: nothing to keep
    j.prune(applied_seq=301)
    assert j.count_outcomes() == 50  # o-251..o-299 and the one without an id
    # o-0..o-250 pruned (seq 1..251), the ids of the newest 100 of them kept: o-151..o-250
    assert (j.has_outcome("o-200"), j.seq_of("o-200"), j.has_outcome("o-151")) == (True, 201, True)
    assert (j.has_outcome("o-150"), j.seq_of("o-150")) == (False, None)
    assert j._db.execute("SELECT COUNT(*) FROM pruned_ids").fetchone()[0] == 100
    # one transaction of old and new ids, the old ones in both the kept rows and the kept ids
    seqs = j.append_outcomes([(f"o-{k}", evs[0], 1) for k in (0, 150, 151, 250, 299)] + [("new", evs[1], 0)])
    assert seqs == [302, 303, None, None, None, 304]
    j.close()
    j = Journal(tmp_path / "j.sqlite3", keep_outcomes=50, keep_event_ids=100)  # kept across a restart
    assert j.append_outcomes([("o-180", evs[0], 1)]) == [None]
    j.close()
    none = Journal(tmp_path / "none.sqlite3", keep_outcomes=50, keep_event_ids=0)
    none.append_outcomes([(f"o-{k}", evs[0], 1) for k in range(100)])
    none.prune(applied_seq=100)
    assert none._db.execute("SELECT COUNT(*) FROM pruned_ids").fetchone()[0] == 0
    assert none.append_outcomes([("o-0", evs[0], 1), ("o-99", evs[0], 1)]) == [101, None]
    none.close()


def test_a_bulk_replay_run_again_learns_nothing_twice_long_after_its_rows_were_pruned(tmp_path, stream):
    """The scenario of a backtest re-run after an interruption: its file is longer than the
    journal keeps rows (journal_keep_outcomes), and every row is still recognised."""
    data = tmp_path / "data"
    rows = [{"experts": e, "features": f, "actual_direction": d, "event_id": f"bt-{i}"}
            for i, (e, f, d) in enumerate(stream(59, 300))]
    svc, client = _start(data, checkpoint_every=50, checkpoints_keep=1, journal_keep_outcomes=10)
    try:
        assert client.record_outcomes(rows).accepted == 300
        deadline = time.monotonic() + 60
        while client.stats()["samples_trained"] < 300:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        client.close()
        svc.stop(grace=1)
    assert Journal(data / "journal.sqlite3").count_outcomes() <= 60  # pruned
    svc, client = _start(data, checkpoint_every=50, checkpoints_keep=1, journal_keep_outcomes=10)
    try:
        result = client.record_outcomes(rows)
        assert (result.accepted, result.duplicates) == (0, 300)
        assert client.stats()["samples_trained"] == 300
        e, f, d = stream(59, 1).__next__()
        assert client.record_outcome(e, f, actual_direction=d, event_id="bt-0").duplicate
    finally:
        client.close()
        svc.stop(grace=1)
