"""The request paths' fast code against the plain code it shortcuts: the same results, the same
errors, for every combination of field values that the fast paths look at."""
from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from titan_fusion.client.pb import fusion_pb2 as pb
from titan_fusion.server.errors import FusionInputError
from titan_fusion.server.events import parse_event_id, parse_expert_fields, parse_features
from titan_fusion.server.inference import Event
from titan_fusion.server.service import event_from_proto, outcome_from_proto

NAN, INF = float("nan"), float("inf")


def reference_event(experts, features) -> Event:
    """What the servicer did before its fast path: every field through the parsers."""
    rows = [(e.prob_up if e.HasField("prob_up") else None, e.prob_down if e.HasField("prob_down") else None,
             e.confidence if e.HasField("confidence") else None, e.name or None) for e in experts]
    return Event(parse_expert_fields(rows, "experts"), parse_features(dict(features)))


def outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except FusionInputError as e:
        return "error", (e.field, str(e))


def same(a, b) -> bool:
    """Results equal, NaN-free on the ok side (an accepted event never holds NaN)."""
    if a[0] != b[0]:
        return False
    if a[0] == "error":
        return a[1] == b[1]
    ea, eb = a[1], b[1]
    return ea == eb and list(ea.features) == list(eb.features)  # features in the same order too


def forecast(up=None, down=None, confidence=None, name=""):
    f = pb.ExpertForecast(name=name)
    if up is not None:
        f.prob_up = up
    if down is not None:
        f.prob_down = down
    if confidence is not None:
        f.confidence = confidence
    return f


UPS = [None, 0.0, -0.0, 1e-300, 0.3, 0.5, 1.0, 1.0000001, -0.1, 1.5, NAN, INF, -INF]
DOWNS = [None, 0.0, 0.5, 0.7, 1.0, 2.0, -0.1, NAN, INF]
CONFIDENCES = [None, 0.0, 0.7, 1.0, 1.2, -0.5, NAN, INF]
NAMES = ["", "a", "b", "x" * 128, "x" * 129]


def test_one_expert_every_combination():
    for up, down, c, name in itertools.product(UPS, DOWNS, CONFIDENCES, NAMES):
        req = pb.PredictRequest(experts=[forecast(up, down, c, name)], features={"close": 1.0})
        got = outcome(event_from_proto, req.experts, req.features)
        want = outcome(reference_event, req.experts, req.features)
        assert same(got, want), (up, down, c, name, got, want)
    # prob_down that sums with prob_up to 1 within the tolerance, and just outside it
    for up in (0.3, 0.5, 0.999, 1.0):
        for delta in (0.0, 0.0009, -0.0009, 0.0011, -0.0011):
            req = pb.PredictRequest(experts=[forecast(up, 1.0 - up + delta)])
            assert same(outcome(event_from_proto, req.experts, req.features),
                        outcome(reference_event, req.experts, req.features)), (up, delta)


def test_features_every_kind():
    cases = [{}, {"close": 1.0}, {"close": 1.0, "rsi": -3.5}, {"": 1.0}, {"y" * 128: 1.0}, {"y" * 129: 1.0},
             {"close": NAN}, {"close": INF}, {"close": -INF}, {"a": 1e308, "b": 1e308},  # finite, sum overflows
             {"a": INF, "b": -INF}, {f"f{i}": float(i) for i in range(256)}, {f"f{i}": float(i) for i in range(257)}]
    for feats in cases:
        req = pb.PredictRequest(experts=[forecast(0.5, name="a")], features=feats)
        got = outcome(event_from_proto, req.experts, req.features)
        assert same(got, outcome(reference_event, req.experts, req.features)), feats


def test_many_experts_random():
    rng = random.Random(5)
    for _ in range(3000):
        n = rng.choice([0, 1, 2, 4, 4, 4, 8, 64, 65])
        experts = [forecast(rng.choice(UPS[3:7]) if rng.random() < 0.97 else rng.choice(UPS),
                            rng.choice([None] * 8 + DOWNS), rng.choice([None] * 3 + CONFIDENCES),
                            rng.choice(["", "a", "b", "c", "d", "e"]) if rng.random() < 0.5 else f"m{k}")
                   for k in range(n)]
        feats = {k: rng.uniform(-1e6, 1e6) for k in rng.sample(["close", "rsi", "vol", "x"], rng.randint(0, 4))}
        req = pb.PredictRequest(experts=experts, features=feats)
        got = outcome(event_from_proto, req.experts, req.features)
        assert same(got, outcome(reference_event, req.experts, req.features)), req


@pytest.mark.parametrize("event_id", ["", "e-1", "x" * 256, "x" * 257, "a\nb", "tab\there", "é"])
def test_outcome_event_id_as_the_parser_says(event_id):
    req = pb.RecordOutcomeRequest(experts=[forecast(0.6, name="a")], event_id=event_id,
                                  actual_direction=pb.DIRECTION_UP)
    got = outcome(outcome_from_proto, req)
    want = outcome(parse_event_id, event_id)
    assert got[0] == want[0] and (got[1] == want[1] if got[0] == "error" else got[1][1] == event_id)


def test_outcome_rows():
    up = pb.DIRECTION_UP
    ok = outcome(outcome_from_proto, pb.RecordOutcomeRequest(experts=[forecast(0.6, name="a")], features={"c": 2.0},
                                                             event_id="e", actual_direction=pb.DIRECTION_DOWN))
    assert ok[0] == "ok" and ok[1][1:] == ("e", 0) and ok[1][0].features == {"c": 2.0}
    assert outcome(outcome_from_proto, pb.RecordOutcomeRequest(event_id="e", actual_direction=up)) == ("ok", (None, "e", 1))
    for req, field in [(pb.RecordOutcomeRequest(actual_direction=up), "experts"),
                       (pb.RecordOutcomeRequest(features={"c": 1.0}, event_id="e", actual_direction=up), "experts"),
                       (pb.RecordOutcomeRequest(experts=[forecast(0.5)]), "actual_direction"),
                       (pb.RecordOutcomeRequest(experts=[forecast(0.5)], actual_direction=7), "actual_direction"),
                       (pb.RecordOutcomeRequest(experts=[forecast(NAN)], actual_direction=up), "experts[0].prob_up")]:
        got = outcome(outcome_from_proto, req)
        assert got[0] == "error" and got[1][0] == field, (req, got)
    assert not math.isnan(ok[1][0].experts[0].prob_up)


# ---------------------------------------------------------------- Predictor: lone and concurrent Predicts

def test_concurrent_predicts_each_get_their_own_answer(tmp_path):
    """Many threads predicting at once, batched by whichever holds the lock (a slow override
    makes them queue): each gets the forecast of its own event, none waits forever, and Predicts
    with an event_id are kept for RecordOutcome."""
    import threading
    import time

    from service_helpers import events, start

    svc, port, registry = start(tmp_path / "data")
    try:
        from titan_fusion.client import FusionClient
        with FusionClient(f"127.0.0.1:{port}", timeout=30, fallback=False) as client:
            client.record_outcomes([{"experts": e, "features": f, "actual_direction": d, "event_id": f"w{i}"}
                                    for i, (e, f, d) in enumerate(events(3, 60))])
            deadline = time.monotonic() + 30
            while client.stats()["samples_trained"] < 60:  # the bulk ack comes before the learning
                assert time.monotonic() < deadline
                time.sleep(0.02)
        from titan_fusion.server.inference import Event as Ev
        evs = [Ev.parse(e, f) for e, f, _ in events(9, 64)]
        pub = svc.owner.published
        want = [pub.snapshot.predict([ev], "experts")[0] for ev in evs]
        batches = []

        def slow(preds):
            batches.append(len(preds))
            time.sleep(0.002)
            return preds
        svc.predictor.override = slow
        got: dict[int, object] = {}
        start_line = threading.Barrier(16)

        def worker(k):
            start_line.wait()
            for i in range(k, len(evs), 16):
                got[i] = svc.predictor.predict(evs[i], f"p{i}" if i % 2 else "", time.monotonic() + 30)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert sum(batches) == len(evs) and sorted(got) == list(range(len(evs)))
        # the batch-size histogram saw each computation once, with its size; some were batched
        assert max(batches) > 1
        assert registry.get_sample_value("fusion_predict_batch_size_count") == len(batches)
        assert registry.get_sample_value("fusion_predict_batch_size_sum") == len(evs)
        for le in (1, 2, 4, 8, 16):
            assert registry.get_sample_value("fusion_predict_batch_size_bucket", {"le": f"{le}.0"}) == \
                sum(b <= le for b in batches)
        for i, p in got.items():
            assert p.prob_up == pytest.approx(want[i].prob_up, abs=1e-12) and p.attention == pytest.approx(want[i].attention)
        assert svc.predictor.depth == 0
        svc.predictor.override = None
        # a lone Predict whose deadline has passed is not computed
        from titan_fusion.server.errors import DeadlineExpiredError
        with pytest.raises(DeadlineExpiredError):
            svc.predictor.predict(evs[0], "", time.monotonic() - 1)
        # the Predicts with an event_id were kept: RecordOutcome by event_id alone finds them
        with FusionClient(f"127.0.0.1:{port}", timeout=30, fallback=False) as client:
            ack = client.record_outcome(event_id="p1", actual_direction="UP")
            assert ack.used_predict_inputs and not ack.duplicate
    finally:
        svc.stop(grace=1)


# ---------------------------------------------------------------- journal: outcomes in one executemany

def test_journal_batches_match_row_by_row_inserts(tmp_path):
    """append_outcomes (duplicates found first, one executemany) journals what inserting row by
    row journals: the same duplicates (within a batch and across batches), the same rows in the
    same order, rows without an event_id, across pruning that leaves the table empty and a reopen.
    Seqs increase and are never reused; row by row, an ignored duplicate may leave a gap in them,
    the batch leaves none."""
    import json
    import sqlite3

    from titan_fusion.server.journal import Journal, encode_event
    from titan_fusion.server.events import Expert

    def reference_append(db, items):
        seqs = []
        for event_id, event, label in items:
            cur = db.execute("INSERT OR IGNORE INTO outcomes (event_id, payload, label, recorded_at) VALUES (?, ?, ?, 0)",
                             (event_id, encode_event(event), label))
            seqs.append(cur.lastrowid if cur.rowcount == 1 else None)
        db.commit()
        return seqs

    rng = random.Random(11)
    j = Journal(tmp_path / "j.sqlite3", keep_outcomes=5)
    ref = sqlite3.connect(tmp_path / "ref.sqlite3")
    ref.executescript("CREATE TABLE outcomes (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE, "
                      "payload TEXT NOT NULL, label INTEGER NOT NULL, recorded_at REAL NOT NULL);")
    last = 0
    for batch in range(40):
        items = []
        for _ in range(rng.choice([0, 1, 3, 40, 700])):
            ev = Event((Expert(rng.random(), rng.choice([None, 0.5]), rng.choice([None, "a", "é"])),),
                       {"close": rng.uniform(-5, 5)})
            items.append((rng.choice([None, f"e{rng.randrange(1500)}"]), ev, rng.randrange(2)))
        got = j.append_outcomes(items)
        want = reference_append(ref, items)
        assert [s is None for s in got] == [s is None for s in want], batch
        fresh = [s for s in got if s is not None]
        assert fresh == sorted(set(fresh)) and all(s > last for s in fresh), batch
        last = max(fresh, default=last)
        assert j.last_seq() == last
        if batch % 7 == 6:  # prune everything: the next seqs come from the AUTOINCREMENT counter
            with j._db:
                j._db.execute("DELETE FROM outcomes")
            ref.execute("DELETE FROM outcomes")
            ref.commit()
        if batch == 20:
            j.close()
            j = Journal(tmp_path / "j.sqlite3", keep_outcomes=5)
    mine = j._db.execute("SELECT event_id, payload, label FROM outcomes ORDER BY seq").fetchall()
    assert mine and mine == ref.execute("SELECT event_id, payload, label FROM outcomes ORDER BY seq").fetchall()
    assert all(json.loads(p) for _, p, _ in mine)
    j.close()


def test_journal_payload_is_the_json_value_json_dumps_wrote():
    """The journal's payload (orjson) is the same JSON value as json.dumps's, which journals
    written before wrote: each decodes to the same event, exactly."""
    from titan_fusion.server.events import Expert
    from titan_fusion.server.journal import decode_event, encode_event
    ev = Event((Expert(0.25, None, "a\"b\\c\n"), Expert(1e-300, 0.5, "é☃"), Expert(0.5, 0.0, None),
                Expert(1e-05, 5e-324, "tiny")),
               {"close": 50000.123456789, "ünïcode": -0.0, "x": 1e300, "third": 1 / 3})
    value = {"e": [[x.prob_up, x.confidence, x.name] for x in ev.experts], "f": dict(ev.features)}
    old = json.dumps(value, separators=(",", ":"))  # what journals written before hold
    new = encode_event(ev)
    assert json.loads(new) == value
    assert decode_event(new) == ev and decode_event(old) == ev
    assert math.copysign(1.0, decode_event(new).features["ünïcode"]) == -1.0  # -0.0 kept
    # json.dumps wrote NaN and Infinity (which orjson does not read); the parsers refuse them now
    assert math.isnan(decode_event('{"e":[[0.5,null,"a"]],"f":{"x":NaN,"y":Infinity}}').features["x"])


def test_journal_falls_back_to_row_by_row(tmp_path, monkeypatch):
    """If the AUTOINCREMENT counter ever did not move as the batch expects, nothing of the batch
    is kept and the rows are inserted one at a time."""
    from titan_fusion.server.events import Expert
    from titan_fusion.server.journal import Journal
    ev = Event((Expert(0.5),), {})
    j = Journal(tmp_path / "j.sqlite3")
    assert j.append_outcomes([("a", ev, 1), (None, ev, 0)]) == [1, 2]
    real = Journal._insert_many

    def wrong(cur, rows):
        real(cur, rows)  # inserted, then reported as unexpected: must be rolled back
        return None
    monkeypatch.setattr(Journal, "_insert_many", staticmethod(wrong))
    b, a2, b2, last = j.append_outcomes([("b", ev, 1), ("a", ev, 0), ("b", ev, 0), (None, ev, 1)])
    assert (b, a2, b2) == (3, None, None) and last > 3  # row by row, ignored duplicates may leave gaps
    assert [(o.seq, o.event_id, o.label) for o in j.outcomes_after(0)] == [(1, "a", 1), (2, None, 0), (3, "b", 1),
                                                                           (last, None, 1)]
    j.close()


# ---------------------------------------------------------------- bulk rows against single outcomes

def test_a_bulk_stream_journals_and_refuses_what_single_outcomes_would(tmp_path):
    """The same rows, streamed in one RecordOutcomes to one service, in one RecordOutcomeBatches
    (batches of uneven sizes, one empty) to another, and sent one RecordOutcome at a time to a
    third: the same rows accepted, duplicated and refused (same status, same message, the same row
    index across batches), and the same journal. The rows mix everything the bulk path shortcuts: repeated expert and
    feature names (checked once per chunk), reordered and unnamed experts, unknown and missing
    names, the wrong expert count, bad values, duplicates within the stream."""
    import grpc

    from service_helpers import events, start
    from titan_fusion.client.convert import to_expert_forecasts
    from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc

    def req(experts, features, event_id, direction="UP"):
        return pb.RecordOutcomeRequest(experts=to_expert_forecasts(experts), features=features, event_id=event_id,
                                       actual_direction=pb.DIRECTION_UP if direction == "UP" else pb.DIRECTION_DOWN)

    evs = events(21, 80)
    rows = [req(e, f, f"r{i}", d) for i, (e, f, d) in enumerate(evs[:30])]
    e, f, _ = evs[30]
    rows += [req(e, {**f, "volume": 1.0}, "unknown-feature"), req(e[::-1], f, "reordered"),
             req([{**x, "name": "z" if k == 2 else x["name"]} for k, x in enumerate(e)], f, "unknown-expert"),
             req(e, {"close": f["close"]}, "missing-feature"), req([{"prob_up": x["prob_up"]} for x in e], f, "unnamed"),
             req(e[:3], f, "three"), req([{**e[0], "prob_up": float("nan")}] + e[1:], f, "nan"), rows[3],
             req(e, f, ""), req(e, f, ""), req(e[::-1], {"rsi": f["rsi"], "close": f["close"]}, "both-reordered")]
    rows += [req(e, f, f"s{i}", d) for i, (e, f, d) in enumerate(evs[31:])] + [rows[40]]

    cuts = [0, 7, 7, 31, 33, 60, len(rows)]  # batches of 7, 0, 24, 2, 27 and the rest
    batches = [pb.RecordOutcomeBatch(outcomes=rows[i:j]) for i, j in zip(cuts, cuts[1:])]
    a, a_port, _ = start(tmp_path / "a")
    b, b_port, _ = start(tmp_path / "b")
    c, c_port, _ = start(tmp_path / "c")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{a_port}") as ca, grpc.insecure_channel(f"127.0.0.1:{b_port}") as cb, \
                grpc.insecure_channel(f"127.0.0.1:{c_port}") as cc:
            bulk = pb_grpc.FusionServiceStub(ca).RecordOutcomes(iter(rows), timeout=60)
            batched = pb_grpc.FusionServiceStub(cc).RecordOutcomeBatches(iter(batches), timeout=60)
            one = pb_grpc.FusionServiceStub(cb)
            single = {}
            for i, r in enumerate(rows):
                try:
                    single[i] = "duplicate" if one.RecordOutcome(r, timeout=60).duplicate else "accepted"
                except grpc.RpcError as err:
                    single[i] = (err.code().name, err.details())
        refused = {r.index: (r.code, r.message) for r in bulk.rejected_outcomes}
        assert refused == {i: s for i, s in single.items() if isinstance(s, tuple)}
        assert sorted(refused) == [30, 32, 33, 35, 36] and "unknown expert name(s) 'z'" in refused[32][1]
        assert bulk.duplicates == sum(s == "duplicate" for s in single.values()) == 2
        assert bulk.accepted == sum(s == "accepted" for s in single.values())
        assert batched == bulk
        def journal(svc):  # payloads as JSON values: a proto map's order is not part of the message
            rows = svc.journal._db.execute("SELECT event_id, payload, label FROM outcomes ORDER BY seq")
            return [(event_id, json.loads(payload), label) for event_id, payload, label in rows]
        assert journal(a) == journal(b) == journal(c)
    finally:
        a.stop(grace=1)
        b.stop(grace=1)
        c.stop(grace=1)
