"""The request paths' fast code against the plain code it shortcuts: the same results, the same
errors, for every combination of field values that the fast paths look at."""
from __future__ import annotations

import itertools
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

    svc, port, _ = start(tmp_path / "data")
    try:
        from titan_fusion.client import FusionClient
        with FusionClient(f"127.0.0.1:{port}", timeout=30, fallback=False) as client:
            client.record_outcomes([{"experts": e, "features": f, "actual_direction": d, "event_id": f"w{i}"}
                                    for i, (e, f, d) in enumerate(events(3, 60))])
            deadline = time.monotonic() + 30
            while client.stats()["service"]["training_lag"]:
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
