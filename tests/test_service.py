"""The gRPC service end to end: a real in-process server on port 0, real channels, the real
FusionClient, real files and SQLite in tmp_path, a real HTTP scrape of /metrics.

Monkeypatching only injects faults that cannot be produced for real: an unexpected exception in
the predict path (INTERNAL) and a slow publication (to make a race deterministic). Overload and
deadlines are produced for real by holding the journal's SQLite write lock from the test.
"""
from __future__ import annotations

import json
import logging
import math
import socket
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool

from service_helpers import (FAST, NOT_SERVING, SERVICE_NAME, SERVING, Call, JournalLock, Running, config, drain, events,
                             learn, one, owner_puts, predictions, rpc_error, scrape, service, start,
                             to_pb_experts, training_state, wait_until)
from titan_fusion.client import (DeadlineExceededError, FailedPreconditionError, FusionClient, InternalError,
                                 InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError)
from titan_fusion.client.pb import fusion_pb2 as pb
from titan_fusion.server.config import FusionConfig
from titan_fusion.server.errors import FusionError, ShuttingDownError
from titan_fusion.server.fusion import TransformerFusion
from titan_fusion.server.service import status_of

__all__ = ["service"]  # the fixture, imported from service_helpers

NAMES = ["good", "noise0", "noise1", "noise2"]
PROBE = events(99, 4)  # fixed events whose predictions are compared exactly
A = pb.CheckpointRequest


def mean_of(experts: list[dict]) -> float:
    return math.fsum(x["prob_up"] for x in experts) / len(experts)


# ---------------------------------------------------------------------------------------------
# 1. The full flow
# ---------------------------------------------------------------------------------------------

def test_warm_up_serves_the_average_then_the_fusion_trains_and_serves(service: Running) -> None:
    c = service.client()
    evs = events(1, 40)
    for i, (experts, features, direction) in enumerate(evs[:FAST.min_samples]):
        p = c.predict(experts, features, event_id=f"w{i}")
        assert (p.source, p.reason, p.model_version, p.event_id) == ("average", "warming_up", 0, f"w{i}")
        assert p.prob_up == mean_of(experts) and p.prob_down == 1.0 - p.prob_up
        assert p.attention == {n: 0.25 for n in NAMES}
        ack = c.record_outcome(actual_direction=direction, event_id=f"w{i}")
        # Training starts with the min_samples-th outcome: one step per outcome from then on.
        assert (ack.duplicate, ack.samples_trained, ack.used_predict_inputs) == (False, i + 1, True)
        assert ack.model_version == (1 if i + 1 == FAST.min_samples else 0)
    s = c.stats()
    assert (s["samples_trained"], s["train_steps"], s["ready"], s["last_source"], s["last_reason"]) == \
        (20, 1, True, "average", "warming_up")

    acks = learn(c, evs[20:], "t")  # full inputs, no Predict before
    assert [a.samples_trained for a in acks] == list(range(21, 41))
    assert [a.model_version for a in acks] == list(range(2, 22))
    assert not any(a.used_predict_inputs or a.duplicate for a in acks)

    for experts, features, _ in PROBE:
        p = c.predict(experts, features)
        assert (p.source, p.reason, p.model_version) == ("fusion", None, 21)
        assert list(p.attention) == NAMES
        assert all(w > 0 for w in p.attention.values())
        assert math.fsum(p.attention.values()) == pytest.approx(1.0, abs=1e-9)
        assert 0.0 < p.prob_up < 1.0 and p.prob_down == 1.0 - p.prob_up

    s = c.get_training_stats()
    assert (s["samples_trained"], s["train_steps"], s["min_samples"], s["n_models"]) == (40, 21, 20, 4)
    assert s["expert_names"] == NAMES and s["feature_names"] == ["close", "rsi"]
    assert math.isfinite(s["train_loss"]) and s["train_loss"] > 0
    assert math.isfinite(s["val_loss"]) and s["val_loss"] > 0  # val_every=5: checked at steps 5..20
    assert s["current_lr"] == pytest.approx(FAST.learning_rate, rel=0.01)  # just past the 10-step warmup
    assert s["is_overfitting"] is False and s["early_stops"] == 0
    assert s["train_buffer_size"] + s["val_buffer_size"] == 40 and s["val_buffer_size"] > 0
    assert (s["last_source"], s["last_reason"], s["enabled"]) == ("fusion", None, True)
    assert 0.0 < s["avg_attention_entropy"] <= math.log(4) + 1e-12
    assert list(s["attention"]) == NAMES and math.fsum(s["attention"].values()) == pytest.approx(1.0)
    svc = s["service"]
    assert (svc["predictions"], svc["outcomes"], svc["duplicates"], svc["errors"], svc["queue_depth"]) == \
        (20 + len(PROBE), 40, 0, 0, 0)
    assert svc["uptime_seconds"] > 0 and svc["last_checkpoint"] == ""


def test_checkpoint_save_list_restore_gives_back_the_exact_model(service: Running) -> None:
    c = service.client()
    learn(c, events(3, 30), "a")
    steps_a = c.stats()["train_steps"]
    info_a = c.checkpoint_save("a")
    assert (info_a.name, info_a.samples_trained, info_a.train_steps) == ("a", 30, steps_a)
    assert info_a.size_bytes > 0 and info_a.created_at.endswith("+00:00")
    at_a = predictions(c, PROBE)

    more = events(4, 10)
    learn(c, more, "b")
    after_more = predictions(c, PROBE)
    assert [p[0] for p in after_more] != [p[0] for p in at_a]  # the model moved on
    assert c.checkpoint_save("b").samples_trained == 40
    assert [i.name for i in c.checkpoint_list()] == ["b", "a"]  # newest first

    info = c.checkpoint_restore("a")
    assert (info.name, info.samples_trained, info.train_steps) == ("a", 30, steps_a)
    assert predictions(c, PROBE) == at_a  # bit-identical: weights, normalization, version
    s = c.stats()
    assert (s["samples_trained"], s["train_steps"], s["service"]["last_checkpoint"]) == (30, steps_a, "a")
    names = [i.name for i in c.checkpoint_list()]
    # The restore writes an automatic checkpoint of the restored model at the journal's head
    # (so that a restart recovers the restored model); it is the newest.
    assert names[0].startswith("auto-") and names[1:] == ["b", "a"]

    # Learning continues exactly as it did from "a": the same outcomes (under new event_ids) give
    # the same model as before the restore, bit for bit (optimizer, RNGs and buffers restored too).
    acks = learn(c, more, "c")
    assert [a.samples_trained for a in acks] == list(range(31, 41)) and not any(a.duplicate for a in acks)
    assert predictions(c, PROBE) == after_more


def test_a_restored_model_is_what_a_restart_recovers(service: Running) -> None:
    c = service.client()
    learn(c, events(3, 25), "a")
    c.checkpoint_save("a")
    at_a, state_a = predictions(c, PROBE), training_state(c)
    learn(c, events(4, 10), "b")
    c.checkpoint_restore("a")
    c.close()
    service.svc.stop(grace=0)  # outcomes b0..b9 stay in the journal, after "a"
    svc, port, _ = start(service.data_dir)
    try:
        with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as c2:
            assert training_state(c2) == state_a  # not "a" plus a replay of b0..b9
            assert predictions(c2, PROBE) == at_a
    finally:
        svc.stop(grace=0)


# ---------------------------------------------------------------------------------------------
# 2. Duplicates, also across a restart
# ---------------------------------------------------------------------------------------------

def test_a_duplicate_event_id_is_acknowledged_and_not_learned_twice(service: Running, tmp_path: Path) -> None:
    c = service.client()
    evs = events(2, 25)
    learn(c, evs, "d")
    (e0, f0, d0), (e1, f1, _) = evs[0], evs[1]
    dup = c.record_outcome(e0, f0, actual_direction=d0, event_id="d0")
    assert (dup.duplicate, dup.samples_trained, dup.used_predict_inputs) == (True, 25, False)
    # Another direction or other inputs under a known event_id: still the same candle, a duplicate.
    dup = c.record_outcome(e1, f1, actual_direction="DOWN" if d0 == "UP" else "UP", event_id="d0")
    assert (dup.duplicate, dup.samples_trained) == (True, 25)
    dup = c.record_outcome(actual_direction=d0, event_id="d3")  # event_id alone: known outcome
    assert (dup.duplicate, dup.samples_trained) == (True, 25)
    s = c.stats()
    assert (s["samples_trained"], s["service"]["outcomes"], s["service"]["duplicates"]) == (25, 25, 3)
    assert service.sample("fusion_duplicates_total") == 3
    assert service.sample("fusion_outcomes_total") == 25
    steps = s["train_steps"]
    c.close()

    # Restart on the same directory, and remove every checkpoint: the model is rebuilt from the
    # journal alone, which still knows every event_id.
    service.svc.stop(grace=0)
    for ckpt in (service.data_dir / "checkpoints").iterdir():
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    svc2, port2, registry2 = start(service.data_dir)
    try:
        with FusionClient(f"127.0.0.1:{port2}", timeout=10, fallback=False) as c2:
            s = c2.stats()
            assert (s["samples_trained"], s["train_steps"]) == (25, steps)
            for i in (0, 7, 24):
                e, f, d = evs[i]
                ack = c2.record_outcome(e, f, actual_direction=d, event_id=f"d{i}")
                assert (ack.duplicate, ack.samples_trained) == (True, 25)
            ack = c2.record_outcome(e0, f0, actual_direction=d0, event_id="fresh")
            assert (ack.duplicate, ack.samples_trained) == (False, 26)
        assert registry2.get_sample_value("fusion_duplicates_total") == 3
        assert registry2.get_sample_value("fusion_outcomes_total") == 1
    finally:
        svc2.stop(grace=0)


def test_a_duplicate_fixes_no_schema(service: Running) -> None:
    """Expert names are fixed by the first learned outcome whose experts are all named. A
    duplicate is not learned, so its names fix nothing: outcomes with other names still fit."""
    c = service.client()
    evs = events(3, 6)
    unnamed = [([{"prob_up": x["prob_up"]} for x in e], f, d) for e, f, d in evs]
    learn(c, unnamed[:3], "u")  # no expert names yet
    e, f, d = evs[3]
    renamed = [{**x, "name": f"other{i}"} for i, x in enumerate(e)]
    dup = c.record_outcome(renamed, f, actual_direction=d, event_id="u0")
    assert dup.duplicate
    acks = learn(c, evs[3:], "n", start_index=3)  # named good, noise0..2: they fix the names
    assert [a.samples_trained for a in acks] == [4, 5, 6]
    with pytest.raises(InvalidArgumentError, match="other0"):  # and other names no longer fit
        c.record_outcome(renamed, f, actual_direction=d, event_id="n-other")


def test_a_duplicate_within_one_bulk_chunk_fixes_no_schema(service: Running) -> None:
    """The same, when the original is earlier in the same journal transaction (a bulk chunk): it
    is not journaled yet when the duplicate is checked."""
    c = service.client()
    evs = events(3, 6)
    e, f, d = evs[0]
    rows = [{"experts": [{"prob_up": x["prob_up"]} for x in e], "features": f, "actual_direction": d, "event_id": "b0"},
            {"experts": [{**x, "name": f"other{i}"} for i, x in enumerate(e)], "features": f, "actual_direction": d,
             "event_id": "b0"}]
    result = c.record_outcomes(rows)
    assert (result.accepted, result.duplicates, result.rejected) == (1, 1, 0)
    drain(c)
    acks = learn(c, evs[1:], "n", start_index=1)  # named good, noise0..2: they fix the names
    assert [a.samples_trained for a in acks] == [2, 3, 4, 5, 6]


def test_an_outcome_the_journal_did_not_keep_fixes_no_schema(service: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names fixed while validating outcomes whose journal commit then failed are undone with it."""
    from titan_fusion.server.owner import ModelOwner
    c = service.client()
    evs = events(3, 6)
    learn(c, [([{"prob_up": x["prob_up"]} for x in e], f, d) for e, f, d in evs[:3]], "u")  # no expert names yet
    journal_rows, fail = ModelOwner._journal_rows, [True]

    def fails_once(self, rows):
        if fail:
            fail.clear()
            return RuntimeError("test: the journal commit failed")
        return journal_rows(self, rows)
    monkeypatch.setattr(ModelOwner, "_journal_rows", fails_once)
    e, f, d = evs[3]
    with pytest.raises(InternalError):  # its details stay in the server log
        c.record_outcome([{**x, "name": f"other{i}"} for i, x in enumerate(e)], f, actual_direction=d, event_id="lost")
    acks = learn(c, evs[3:], "n", start_index=3)  # named good, noise0..2: they fix the names
    assert [a.samples_trained for a in acks] == [4, 5, 6]


# ---------------------------------------------------------------------------------------------
# 3. RecordOutcome by event_id alone
# ---------------------------------------------------------------------------------------------

def test_record_outcome_by_event_id_uses_the_predict_inputs(service: Running) -> None:
    c = service.client()
    evs = events(5, 24)
    for i, (e, f, d) in enumerate(evs):
        c.predict(e, f, event_id=f"p{i}")
        ack = c.record_outcome(actual_direction=d, event_id=f"p{i}")
        assert (ack.duplicate, ack.used_predict_inputs, ack.samples_trained) == (False, True, i + 1)
    assert c.stats()["samples_trained"] == 24

    # Learning by event_id is learning the Predict's inputs: a twin service fed the full inputs
    # under other ids ends with the bit-identical model.
    twin_svc, twin_port, _ = start(service.data_dir.parent / "twin")
    try:
        with FusionClient(f"127.0.0.1:{twin_port}", timeout=10, fallback=False) as twin:
            learn(twin, evs, "full")
            assert predictions(twin, PROBE) == predictions(c, PROBE)
    finally:
        twin_svc.stop(grace=0)

    before = training_state(c)
    err = rpc_error(service.stub().RecordOutcome,
                    pb.RecordOutcomeRequest(event_id="never-predicted", actual_direction=pb.DIRECTION_UP), timeout=10)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details().startswith("event_id:") and "never-predicted" in err.details()
    with pytest.raises(NotFoundError):
        c.record_outcome(actual_direction="UP", event_id="never-predicted-either")
    assert training_state(c) == before
    assert service.sample("fusion_rpc_errors_total", {"method": "RecordOutcome", "code": "NOT_FOUND"}) == 2


# ---------------------------------------------------------------------------------------------
# 4. Every error code
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One service with a fixed schema (25 outcomes learned), shared by the INVALID_ARGUMENT cases:
    each case checks that it changed nothing."""
    data = tmp_path_factory.mktemp("trained") / "data"
    svc, port, registry = start(data)
    running = Running(svc, port, registry, data)
    c = running.client()
    learn(c, events(6, 25), "k")
    try:
        yield running
    finally:
        running.close()


GOOD = events(7, 1)[0]
GOOD_EXPERTS = to_pb_experts(GOOD[0])
GOOD_FEATURES = GOOD[1]


def _experts(**first: object) -> list[pb.ExpertForecast]:
    return [pb.ExpertForecast(**first)] + GOOD_EXPERTS[1:]


UP = pb.DIRECTION_UP
INVALID = [
    # (id, method, request, the field the message must start with)
    ("predict-nan", "Predict", pb.PredictRequest(experts=_experts(name="good", prob_up=math.nan),
                                                 features=GOOD_FEATURES), "experts[0].prob_up"),
    ("predict-1.5", "Predict", pb.PredictRequest(experts=_experts(name="good", prob_up=1.5),
                                                 features=GOOD_FEATURES), "experts[0].prob_up"),
    ("predict-missing-prob", "Predict", pb.PredictRequest(experts=_experts(name="good"), features=GOOD_FEATURES),
     "experts[0].prob_up"),
    ("predict-prob-sum", "Predict", pb.PredictRequest(experts=_experts(name="good", prob_up=0.6, prob_down=0.6),
                                                      features=GOOD_FEATURES), "experts[0].prob_down"),
    ("predict-confidence", "Predict", pb.PredictRequest(experts=_experts(name="good", prob_up=0.6, confidence=-1),
                                                        features=GOOD_FEATURES), "experts[0].confidence"),
    ("predict-duplicate-names", "Predict",
     pb.PredictRequest(experts=[GOOD_EXPERTS[0], pb.ExpertForecast(name="good", prob_up=0.5)] + GOOD_EXPERTS[2:],
                       features=GOOD_FEATURES), "experts[1].name"),
    ("predict-no-experts", "Predict", pb.PredictRequest(features=GOOD_FEATURES), "experts"),
    ("predict-unknown-feature", "Predict",
     pb.PredictRequest(experts=GOOD_EXPERTS, features={**GOOD_FEATURES, "volume": 1.0}), "features"),
    ("predict-missing-feature", "Predict", pb.PredictRequest(experts=GOOD_EXPERTS, features={"close": 1.0}),
     "features"),
    ("predict-nan-feature", "Predict",
     pb.PredictRequest(experts=GOOD_EXPERTS, features={**GOOD_FEATURES, "rsi": math.inf}), "features.rsi"),
    ("predict-long-event-id", "Predict",
     pb.PredictRequest(experts=GOOD_EXPERTS, features=GOOD_FEATURES, event_id="x" * 257), "event_id"),
    ("predict-unprintable-event-id", "Predict",
     pb.PredictRequest(experts=GOOD_EXPERTS, features=GOOD_FEATURES, event_id="a\nb"), "event_id"),
    ("record-nan", "RecordOutcome", pb.RecordOutcomeRequest(
        experts=_experts(name="good", prob_up=math.nan), features=GOOD_FEATURES, actual_direction=UP),
     "experts[0].prob_up"),
    ("record-direction-unspecified", "RecordOutcome",
     pb.RecordOutcomeRequest(experts=GOOD_EXPERTS, features=GOOD_FEATURES, event_id="new-1"), "actual_direction"),
    ("record-direction-unknown-number", "RecordOutcome",
     pb.RecordOutcomeRequest(experts=GOOD_EXPERTS, features=GOOD_FEATURES, actual_direction=7), "actual_direction"),
    ("record-nothing", "RecordOutcome", pb.RecordOutcomeRequest(actual_direction=UP), "experts"),
    ("record-features-only", "RecordOutcome",
     pb.RecordOutcomeRequest(features=GOOD_FEATURES, event_id="new-2", actual_direction=UP), "experts"),
    ("record-3-experts", "RecordOutcome",
     pb.RecordOutcomeRequest(experts=GOOD_EXPERTS[:3], features=GOOD_FEATURES, event_id="new-3",
                             actual_direction=UP), "experts"),
    ("record-5-experts", "RecordOutcome",
     pb.RecordOutcomeRequest(experts=GOOD_EXPERTS + [pb.ExpertForecast(name="extra", prob_up=0.5)],
                             features=GOOD_FEATURES, actual_direction=UP), "experts"),
    ("record-unknown-feature", "RecordOutcome",
     pb.RecordOutcomeRequest(experts=GOOD_EXPERTS, features={**GOOD_FEATURES, "volume": 1.0}, actual_direction=UP),
     "features"),
    ("record-long-event-id", "RecordOutcome",
     pb.RecordOutcomeRequest(experts=GOOD_EXPERTS, features=GOOD_FEATURES, event_id="x" * 257, actual_direction=UP),
     "event_id"),
    ("checkpoint-no-action", "Checkpoint", A(name="a"), "action"),
    ("list-with-name", "Checkpoint", A(action=A.ACTION_LIST, name="a"), "name"),
    ("save-dotdot", "Checkpoint", A(action=A.ACTION_SAVE, name="../x"), "name"),
    ("save-hidden", "Checkpoint", A(action=A.ACTION_SAVE, name=".hidden"), "name"),
    ("save-too-long", "Checkpoint", A(action=A.ACTION_SAVE, name="x" * 65), "name"),
] + [(f"restore-{n or 'empty'}", "Checkpoint", A(action=A.ACTION_RESTORE, name=n), "name")
     for n in ("../x", "a/b", "/etc", ".hidden", "", "..", "a b", "x" * 65)]


@pytest.mark.parametrize("method, request_, field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_argument_names_the_field_and_changes_nothing(trained: Running, method: str, request_, field: str):
    c = trained.client()
    before = training_state(c)
    checkpoints_before = sorted(p.name for p in (trained.data_dir / "checkpoints").iterdir())
    errors_before = trained.sample("fusion_rpc_errors_total", {"method": method, "code": "INVALID_ARGUMENT"}) or 0
    err = rpc_error(getattr(trained.stub(), method), request_, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(field + ":"), err.details()
    assert training_state(c) == before
    assert sorted(p.name for p in (trained.data_dir / "checkpoints").iterdir()) == checkpoints_before
    assert not (trained.data_dir / "x").exists() and not (trained.data_dir.parent / "x").exists()
    errors = trained.sample("fusion_rpc_errors_total", {"method": method, "code": "INVALID_ARGUMENT"})
    assert errors == errors_before + 1


def test_the_client_raises_invalid_argument_with_the_servers_field(trained: Running) -> None:
    c = trained.client()
    bad = [dict(x) for x in GOOD[0]]
    bad[2]["prob_up"] = 1.5
    with pytest.raises(InvalidArgumentError) as info:
        c.predict(bad, GOOD_FEATURES)
    assert info.value.details == "experts[2].prob_up: must be in [0, 1], got 1.5"
    with pytest.raises(InvalidArgumentError) as info:
        c.record_outcome(bad, GOOD_FEATURES, actual_direction="UP", event_id="bad-1")
    assert info.value.details.startswith("experts[2].prob_up:")
    # The refused event_id was not spent: the same id with good inputs is learned.
    before = c.stats()["samples_trained"]
    ack = c.record_outcome(GOOD[0], GOOD_FEATURES, actual_direction="UP", event_id="bad-1")
    assert (ack.duplicate, ack.samples_trained) == (False, before + 1)


def test_a_predict_with_another_expert_count_falls_back_to_the_average(trained: Running) -> None:
    c = trained.client()
    p = c.predict(GOOD[0][:3], GOOD_FEATURES)
    assert (p.source, p.reason) == ("average", "wrong_expert_count")
    assert p.prob_up == mean_of(GOOD[0][:3]) and list(p.attention) == NAMES[:3]


@pytest.mark.parametrize("method", ["Predict", "RecordOutcome"])
def test_an_unknown_expert_name_is_refused_naming_experts(trained: Running, method: str) -> None:
    experts = _experts(name="stranger", prob_up=0.5)
    request_ = (pb.PredictRequest(experts=experts, features=GOOD_FEATURES) if method == "Predict" else
                pb.RecordOutcomeRequest(experts=experts, features=GOOD_FEATURES, actual_direction=UP))
    err = rpc_error(getattr(trained.stub(), method), request_, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stranger" in err.details()
    assert err.details().startswith("experts"), err.details()


def test_not_found_for_an_unknown_checkpoint(trained: Running) -> None:
    c = trained.client()
    before = training_state(c)
    err = rpc_error(trained.stub().Checkpoint, A(action=A.ACTION_RESTORE, name="no-such-checkpoint"), timeout=10)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'no-such-checkpoint'" in err.details()
    with pytest.raises(NotFoundError):
        c.checkpoint_restore("no-such-checkpoint")
    assert training_state(c) == before
    assert not (trained.data_dir / "checkpoints" / "no-such-checkpoint").exists()


def _incompatible_checkpoint(path: Path) -> None:
    """A real checkpoint of another architecture: hidden_dim 64 instead of 32."""
    big = TransformerFusion(FusionConfig(hidden_dim=64, num_heads=4, min_samples=4, batch_size=4, warmup_steps=2),
                            n_models=4)
    for e, f, d in events(8, 6):
        big.update(e, f, d)
    assert big.version > 0
    big.save(path)


def test_restoring_an_incompatible_checkpoint_is_a_failed_precondition(service: Running) -> None:
    c = service.client()
    learn(c, events(9, 25), "i")
    before, state = predictions(c, PROBE), training_state(c)
    _incompatible_checkpoint(service.data_dir / "checkpoints" / "big")  # written while the service runs
    err = rpc_error(service.stub().Checkpoint, A(action=A.ACTION_RESTORE, name="big"), timeout=10)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "hidden_dim" in err.details() and "64" in err.details()
    with pytest.raises(FailedPreconditionError):
        c.checkpoint_restore("big")
    assert predictions(c, PROBE) == before
    assert training_state(c) == state
    assert c.stats()["service"]["last_checkpoint"] == ""
    assert service.sample("fusion_checkpoints_total", {"action": "restore"}) == 0
    assert service.sample("fusion_rpc_errors_total", {"method": "Checkpoint", "code": "FAILED_PRECONDITION"}) == 2
    # It still learns.
    assert c.record_outcome(*PROBE[0][:2], actual_direction="UP", event_id="after").samples_trained == 26


def test_a_failed_restore_is_counted_in_checkpoint_errors(service: Running) -> None:
    c = service.client()
    learn(c, events(9, 5), "i")
    _incompatible_checkpoint(service.data_dir / "checkpoints" / "big")
    with pytest.raises(FailedPreconditionError):
        c.checkpoint_restore("big")
    assert service.sample("fusion_checkpoint_errors_total", {"action": "restore"}) == 1


def test_resource_exhausted_for_a_message_over_max_message_bytes(tmp_path: Path) -> None:
    svc, port, registry = start(tmp_path / "data", max_message_bytes=1024)
    try:
        with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as c:
            experts = [dict(x) for x in GOOD[0]]
            with pytest.raises(ResourceExhaustedError) as info:
                c.predict([{**experts[0], "name": "x" * 5000}] + experts[1:], GOOD_FEATURES)
            assert "larger than max" in info.value.details
            with pytest.raises(ResourceExhaustedError):
                c.predict(experts, {f"feature_{i:03d}": float(i) for i in range(200)})
            with pytest.raises(ResourceExhaustedError):
                c.record_outcome([{**experts[0], "name": "x" * 5000}] + experts[1:], GOOD_FEATURES,
                                 actual_direction="UP", event_id="big")
            # Nothing reached the model; an ordinary request is served.
            s = c.stats()
            assert (s["samples_trained"], s["service"]["predictions"], s["feature_names"]) == (0, 0, [])
            assert c.predict(experts, GOOD_FEATURES).source == "average"
            assert c.record_outcome(experts, GOOD_FEATURES, actual_direction="UP", event_id="big").duplicate is False
    finally:
        svc.stop(grace=0)


def test_resource_exhausted_when_the_owner_queue_is_full(tmp_path: Path) -> None:
    svc, port, registry = start(tmp_path / "data", queue_size=2)
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        c = running.client(retries=0)
        learn(c, events(10, 3), "q")
        evs = events(11, 4)

        def send(i: int):
            e, f, d = evs[i]
            return lambda: c.record_outcome(e, f, actual_direction=d, event_id=f"x{i}")

        with JournalLock(running.data_dir) as lock:
            puts = owner_puts(svc)
            first = Call(send(0))  # the owner takes it and waits for the journal
            wait_until(lambda: owner_puts(svc) == puts + 1 and svc.owner.queue_depth == 0, what="the owner to take it")
            queued = [Call(send(1))]
            wait_until(lambda: svc.owner.queue_depth == 1, what="one queued")
            queued.append(Call(send(2)))
            wait_until(lambda: svc.owner.queue_depth == 2, what="two queued")
            with pytest.raises(ResourceExhaustedError) as info:
                send(3)()
            assert "queue is full" in info.value.details and "2" in info.value.details
            assert c.stats()["service"]["queue_depth"] == 2
            assert first.is_alive() and all(q.is_alive() for q in queued)
            lock.release()
        acks = [call.outcome() for call in [first, *queued]]
        assert [(a.duplicate, a.samples_trained) for a in acks] == [(False, 4), (False, 5), (False, 6)]
        assert c.stats()["samples_trained"] == 6
        assert running.sample("fusion_rpc_errors_total", {"method": "RecordOutcome", "code": "RESOURCE_EXHAUSTED"}) == 1
        # The refused outcome was not journaled: sending it again learns it.
        ack = send(3)()
        assert (ack.duplicate, ack.samples_trained) == (False, 7)
    finally:
        running.close()


def test_deadline_exceeded_after_the_owner_started_the_outcome_it_is_learned_once(tmp_path: Path) -> None:
    """The deadline passes while the owner is already committing the outcome: the caller gets
    DEADLINE_EXCEEDED, the outcome is learned (exactly once), and a retry is a duplicate."""
    svc, port, registry = start(tmp_path / "data")
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        c = running.client(retries=0)
        learn(c, events(12, 3), "s")
        e, f, d = events(13, 1)[0]
        with JournalLock(running.data_dir) as lock:
            puts = owner_puts(svc)
            with pytest.raises(DeadlineExceededError):
                c.record_outcome(e, f, actual_direction=d, event_id="late", timeout=0.2)
            # The premise: the owner took it (before its deadline) and waits for the journal.
            assert owner_puts(svc) == puts + 1 and svc.owner.queue_depth == 0
            assert c.stats()["samples_trained"] == 3
            lock.release()
        drain(c)  # nobody waits for the abandoned outcome's answer: wait for the owner to finish it
        assert c.stats()["samples_trained"] == 4
        retry = c.record_outcome(e, f, actual_direction=d, event_id="late")
        assert (retry.duplicate, retry.samples_trained) == (True, 4)
        assert running.sample("fusion_rpc_errors_total", {"method": "RecordOutcome", "code": "DEADLINE_EXCEEDED"}) == 1
    finally:
        running.close()


def test_deadline_exceeded_while_queued_the_outcome_is_not_learned(tmp_path: Path) -> None:
    """Work whose deadline passed before the owner started it is not done."""
    svc, port, registry = start(tmp_path / "data")
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        c = running.client(retries=0)
        learn(c, events(12, 3), "s")
        (e1, f1, d1), (e2, f2, d2) = events(14, 2)
        with JournalLock(running.data_dir) as lock:
            puts = owner_puts(svc)
            blocker = Call(lambda: c.record_outcome(e1, f1, actual_direction=d1, event_id="blocker"))
            wait_until(lambda: owner_puts(svc) == puts + 1 and svc.owner.queue_depth == 0, what="the owner to take it")
            with pytest.raises(DeadlineExceededError):
                c.record_outcome(e2, f2, actual_direction=d2, event_id="queued", timeout=0.2)
            assert svc.owner.queue_depth == 1  # still queued behind the blocked commit
            lock.release()
        assert blocker.outcome().samples_trained == 4
        drain(c)  # the owner has taken (and dropped) the expired outcome
        assert c.stats()["samples_trained"] == 4  # "queued" was dropped, not learned
        ack = c.record_outcome(e2, f2, actual_direction=d2, event_id="queued")
        assert (ack.duplicate, ack.samples_trained) == (False, 5)  # and not journaled either
    finally:
        running.close()


def test_internal_error_hides_the_exception_text(service: Running, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    c = service.client()

    def boom(preds):
        raise RuntimeError("secret: the database password is hunter2")

    monkeypatch.setattr(service.svc.predictor, "override", boom)  # fault injection
    caplog.set_level(logging.ERROR, logger="titan_fusion")
    err = rpc_error(service.stub().Predict, pb.PredictRequest(experts=GOOD_EXPERTS, features=GOOD_FEATURES),
                    timeout=10)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error; see the server log"
    with pytest.raises(InternalError) as info:
        c.predict(GOOD[0], GOOD_FEATURES)
    assert "secret" not in info.value.details and "hunter2" not in str(info.value)
    assert any("hunter2" in (r.exc_text or "") or (r.exc_info and "hunter2" in str(r.exc_info[1]))
               for r in caplog.records)  # the trace goes to the log
    assert service.sample("fusion_rpc_errors_total", {"method": "Predict", "code": "INTERNAL"}) == 2
    assert service.sample("fusion_predict_batch_size_count") == 2  # failed computations count too
    monkeypatch.setattr(service.svc.predictor, "override", None)
    assert c.predict(GOOD[0], GOOD_FEATURES).reason == "warming_up"  # the service survived
    s = c.stats()["service"]
    assert (s["errors"], s["predictions"]) == (2, 1)


def test_unavailable_once_stopped(service: Running) -> None:
    c = service.client()
    fallback = service.client(fallback=True, timeout=2)
    assert c.predict(GOOD[0], GOOD_FEATURES).source == "average"
    service.svc.stop(grace=0)
    with pytest.raises(UnavailableError):
        c.predict(GOOD[0], GOOD_FEATURES)
    with pytest.raises(UnavailableError):
        c.stats()
    p = fallback.predict(GOOD[0], GOOD_FEATURES, event_id="e")
    assert (p.source, p.reason, p.model_version, p.prob_up) == ("average", "unavailable", -1, mean_of(GOOD[0]))
    with pytest.raises(ShuttingDownError) as info:
        service.svc.owner.submit("list", "")
    assert status_of(info.value) is grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------------------
# 5. Health
# ---------------------------------------------------------------------------------------------

def test_health_is_not_serving_while_recovering_then_serving_and_the_replay_rebuilds_the_model(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    svc, port, _ = start(data)
    with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as c:
        learn(c, events(15, 200), "r")
        before, state = predictions(c, PROBE), training_state(c)
    svc.owner.stop(checkpoint=False)  # as after a crash: nothing but the journal
    svc.stop(grace=0)
    assert list((data / "checkpoints").iterdir()) == []

    svc, port, registry = start(data, ready=False)  # replays 200 outcomes
    running = Running(svc, port, registry, data)
    try:
        health = running.health()
        statuses = [health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status]
        assert statuses == [NOT_SERVING]
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == NOT_SERVING
        stub = running.stub()
        for call, req in ((stub.Predict, pb.PredictRequest(experts=GOOD_EXPERTS, features=GOOD_FEATURES)),
                          (stub.Stats, pb.StatsRequest()),
                          (stub.RecordOutcome, pb.RecordOutcomeRequest(experts=GOOD_EXPERTS, features=GOOD_FEATURES,
                                                                       actual_direction=UP, event_id="early"))):
            err = rpc_error(call, req, timeout=10)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "starting" in err.details()
        assert not svc.owner.ready.is_set(), "the recovery ended too early for this test"
        while statuses[-1] != SERVING:
            statuses.append(health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status)
            time.sleep(0.01)
        assert set(statuses[:-1]) == {NOT_SERVING}
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        c = running.client()
        assert training_state(c) == state
        assert predictions(c, PROBE) == before  # the replay rebuilt the very same model
        ack = c.record_outcome(GOOD[0], GOOD_FEATURES, actual_direction="UP", event_id="early")
        assert (ack.duplicate, ack.samples_trained) == (False, 201)  # the refused one was not journaled
    finally:
        running.close()


def test_an_owner_that_fails_while_the_service_gets_ready_keeps_it_not_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """freeze_gc: the start-up collection runs between the owner's readiness and SERVING; an owner
    that fails in that window (reported NOT_SERVING by _owner_failed) must not be covered by a
    SERVING set after it."""
    from titan_fusion.server import service as service_module
    from titan_fusion.server.service import FusionService
    svc = FusionService(config(tmp_path / "data"), registry=CollectorRegistry(), freeze_gc=True)

    def owner_fails_meanwhile() -> int:
        e = RuntimeError("the owner failed during the start-up collection")
        svc.owner.failed = e
        svc._owner_failed(e)
        return 0
    monkeypatch.setattr(service_module, "freeze_start_up", owner_fails_meanwhile)
    svc.start()
    running = Running(svc, svc.port, CollectorRegistry(), tmp_path / "data")
    try:
        assert not svc.wait_ready(5) and not svc.serving
        health = running.health()
        for name in ("", SERVICE_NAME):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == NOT_SERVING
    finally:
        running.close()


def test_health_turns_not_serving_when_the_stop_begins(service: Running) -> None:
    health = service.health()
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=20)
    updates = iter(watch)
    assert next(updates).status == SERVING
    stopper = Call(lambda: service.svc.stop(grace=5))
    assert next(updates).status == NOT_SERVING
    watch.cancel()  # the last call in flight: the stop need not wait for its grace period
    stopper.outcome()
    with pytest.raises(grpc.RpcError) as info:
        service.health().Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------------------
# 6. Reflection
# ---------------------------------------------------------------------------------------------

def test_reflection_lists_and_describes_the_service(service: Running) -> None:
    ch = grpc.insecure_channel(service.target)
    service.channels.append(ch)
    db = ProtoReflectionDescriptorDatabase(ch)
    services = set(db.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    desc = DescriptorPool(db).FindServiceByName(SERVICE_NAME)
    names = [m.name for m in desc.methods]
    assert names == [m.name for m in pb.DESCRIPTOR.services_by_name["FusionService"].methods]  # the contract
    assert {"Predict", "RecordOutcome", "Stats", "Checkpoint"} <= set(names)
    assert desc.methods_by_name["Predict"].input_type.fields_by_name["event_id"].number == 3


# ---------------------------------------------------------------------------------------------
# 7. Metrics, scraped over HTTP
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def scraped_service(tmp_path: Path) -> Iterator[Running]:
    svc, port, registry = start(tmp_path / "data", metrics_port=0)
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        yield running
    finally:
        running.close()


def test_metrics_endpoint_reports_the_traffic(scraped_service: Running) -> None:
    service = scraped_service
    c = service.client()
    evs = events(16, 25)
    for i, (e, f, d) in enumerate(evs):
        c.predict(e, f, event_id=f"m{i}")
        c.record_outcome(actual_direction=d, event_id=f"m{i}")
    c.record_outcome(actual_direction=evs[0][2], event_id="m0")  # 2 duplicates
    c.record_outcome(*evs[1][:2], actual_direction=evs[1][2], event_id="m1")
    with pytest.raises(InvalidArgumentError):
        c.predict([{"name": "good", "prob_up": math.nan}] + evs[0][0][1:], evs[0][1])
    c.record_outcome(*evs[2][:2], actual_direction=evs[2][2], event_id="m-last")  # the last publication
    stats = c.stats()
    assert service.svc.metrics_port
    m = scrape(service.svc.metrics_port)

    assert one(m, "fusion_outcomes_total") == 26 == stats["service"]["outcomes"]
    assert one(m, "fusion_duplicates_total") == 2 == stats["service"]["duplicates"]
    assert one(m, "fusion_predictions_total", source="average", reason="warming_up") == 20
    assert one(m, "fusion_predictions_total", source="fusion", reason="none") == 5
    for reason in ("disabled", "wrong_expert_count", "underperforming"):
        assert one(m, "fusion_predictions_total", source="average", reason=reason) == 0
    assert one(m, "fusion_samples_trained") == 26 == stats["samples_trained"]
    assert one(m, "fusion_train_steps") == 7 == stats["train_steps"] == one(m, "fusion_model_version")
    assert one(m, "fusion_train_loss") == pytest.approx(stats["train_loss"], rel=1e-12)
    assert one(m, "fusion_val_loss") == pytest.approx(stats["val_loss"], rel=1e-12)
    assert math.isfinite(stats["train_loss"]) and math.isfinite(stats["val_loss"])
    assert one(m, "fusion_learning_rate") == pytest.approx(stats["current_lr"], rel=1e-12)
    assert one(m, "fusion_attention_entropy") == pytest.approx(stats["avg_attention_entropy"], rel=1e-12)
    assert one(m, "fusion_attention_entropy") < math.log(4)  # 5 fused forecasts, not uniform
    weights = {n: one(m, "fusion_attention_weight", expert=n) for n in NAMES}
    assert len(m["fusion_attention_weight"]) == 4
    assert weights == pytest.approx(stats["attention"], rel=1e-12)
    assert math.fsum(weights.values()) == pytest.approx(1.0)
    assert one(m, "fusion_overfitting") == 0 and one(m, "fusion_ready") == 1
    assert one(m, "fusion_queue_depth", queue="owner") == 0
    assert one(m, "fusion_queue_depth", queue="predict") == 0
    # Every RPC that reached a handler is timed, errors included.
    assert one(m, "fusion_rpc_duration_seconds_count", method="Predict") == 26
    assert one(m, "fusion_rpc_duration_seconds_count", method="RecordOutcome") == 28
    assert one(m, "fusion_rpc_duration_seconds_count", method="Checkpoint") == 0
    assert one(m, "fusion_rpc_duration_seconds_count", method="Stats") == 1
    assert one(m, "fusion_rpc_duration_seconds_bucket", method="Predict", le="+Inf") == 26
    # 25 Predicts reached the predictor one at a time: each computed alone, a batch of 1 (the invalid
    # one was refused before it)
    assert one(m, "fusion_predict_batch_size_count") == 25 == one(m, "fusion_predict_batch_size_sum")
    assert one(m, "fusion_predict_batch_size_bucket", le="1.0") == 25
    assert one(m, "fusion_rpc_duration_seconds_sum", method="RecordOutcome") > 0
    assert one(m, "fusion_rpc_errors_total", method="Predict", code="INVALID_ARGUMENT") == 1
    assert [labels for labels, v in m["fusion_rpc_errors_total"] if v] == [{"method": "Predict", "code": "INVALID_ARGUMENT"}]
    assert stats["service"]["errors"] == 1


# ---------------------------------------------------------------------------------------------
# 8. Concurrency
# ---------------------------------------------------------------------------------------------

def test_sixteen_threads_predicting_and_recording_learn_each_event_once(service: Running) -> None:
    threads, per_thread = 16, 30
    import threading
    barrier = threading.Barrier(threads)

    def trader(k: int):
        c = FusionClient(service.target, timeout=30, fallback=False)
        acks, dups = [], 0
        try:
            barrier.wait(30)
            for i, (e, f, d) in enumerate(events(100 + k, per_thread)):
                eid = f"t{k}:{i}"
                p = c.predict(e, f, event_id=eid)
                assert p.event_id == eid and p.source in ("average", "fusion")
                ack = c.record_outcome(actual_direction=d, event_id=eid)
                assert not ack.duplicate and ack.used_predict_inputs
                acks.append(ack.samples_trained)
                if i % 10 == 9:  # a retry of an answered outcome
                    again = c.record_outcome(actual_direction=d, event_id=eid)
                    assert again.duplicate
                    dups += 1
                if i % 20 == 0:  # a retry with the full inputs
                    again = c.record_outcome(e, f, actual_direction=d, event_id=eid)
                    assert again.duplicate and not again.used_predict_inputs
                    dups += 1
        finally:
            c.close()
        return acks, dups

    calls = [Call(lambda k=k: trader(k)) for k in range(threads)]
    results = [call.outcome(timeout=120) for call in calls]
    total = threads * per_thread
    acked = sorted(n for acks, _ in results for n in acks)
    assert acked == list(range(1, total + 1))  # one model owner: each outcome learned once, in turn
    dups = sum(d for _, d in results)
    assert dups == threads * (3 + 2)  # i = 9, 19, 29 and i = 0, 20
    c = service.client()
    s = c.stats()
    assert s["samples_trained"] == total
    assert s["train_steps"] == total - FAST.min_samples + 1
    assert (s["service"]["outcomes"], s["service"]["duplicates"], s["service"]["predictions"],
            s["service"]["errors"]) == (total, dups, total, 0)
    assert service.sample("fusion_outcomes_total") == total
    assert service.sample("fusion_duplicates_total") == dups
    served = sum(sample.value for family in service.registry.collect() if family.name == "fusion_predictions"
                 for sample in family.samples if sample.name == "fusion_predictions_total")
    assert served == total  # whatever served them (fusion, warm-up, live scoring's fallback)


# ---------------------------------------------------------------------------------------------
# 9. Graceful shutdown
# ---------------------------------------------------------------------------------------------

def test_graceful_shutdown_saves_a_checkpoint_that_the_next_start_resumes(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    svc, port, _ = start(data)
    with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as c:
        learn(c, events(17, 30), "g")
        before, state = predictions(c, PROBE), training_state(c)
    svc.stop(grace=1)

    [ckpt] = list((data / "checkpoints").iterdir())
    assert ckpt.name.startswith("auto-")
    saved = json.loads((ckpt / "fusion_state.json").read_text())
    assert saved["counters"]["outcomes"] == 30 and saved["counters"]["steps"] == state["train_steps"]
    assert saved["extra"]["applied_seq"] == 30

    caplog.set_level(logging.INFO, logger="titan_fusion.server.owner")
    svc, port, _ = start(data)
    try:
        assert any("replayed 0 outcomes" in r.getMessage() for r in caplog.records)  # all from the checkpoint
        with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as c:
            assert training_state(c) == state
            assert c.stats()["service"]["last_checkpoint"] == ckpt.name
            assert predictions(c, PROBE) == before
    finally:
        svc.stop(grace=0)


def test_one_service_per_data_directory(service: Running) -> None:
    with pytest.raises(FusionError, match="another titan-fusion service"):
        start(service.data_dir)


# ---------------------------------------------------------------------------------------------
# Read-your-writes, and regressions of bugs found by these tests
# ---------------------------------------------------------------------------------------------

def _slow_publication(svc, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the owner's publication of a batch takes 0.3 s (a big model, a busy host)."""
    publish = svc.owner._publish

    def slow() -> None:
        time.sleep(0.3)
        publish()

    monkeypatch.setattr(svc.owner, "_publish", slow)


def test_stats_right_after_an_outcome_include_it(service: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner answers a batch only after publishing its model (read-your-writes): even when the
    publication is slow, a Stats sent after the acknowledgement counts the outcome. (Before
    3e8971a it answered first; about 1 Stats in 4 then missed the outcome it followed.)"""
    c = service.client()
    learn(c, events(18, 3), "p")
    _slow_publication(service.svc, monkeypatch)
    e, f, d = events(19, 1)[0]
    ack = c.record_outcome(e, f, actual_direction=d, event_id="now")
    assert ack.samples_trained == 4
    assert c.stats()["samples_trained"] == 4
    p = c.predict(e, f)
    assert p.model_version == ack.model_version


def test_predict_right_after_a_restore_uses_the_restored_model(service: Running,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-your-writes for a restore: the answer comes after the restored model is published."""
    c = service.client()
    learn(c, events(20, 25), "r")
    c.checkpoint_save("a")
    at_a = predictions(c, PROBE)
    learn(c, events(21, 5), "s")
    assert predictions(c, PROBE) != at_a
    _slow_publication(service.svc, monkeypatch)
    c.checkpoint_restore("a")
    assert predictions(c, PROBE) == at_a


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("which", ["port", "metrics_port"])
def test_a_failed_start_releases_the_data_directory(tmp_path: Path, which: str) -> None:
    busy = _busy_port()
    try:
        with pytest.raises(Exception):
            start(tmp_path / "data", **{which: busy.getsockname()[1]})
    finally:
        busy.close()
    svc, _, _ = start(tmp_path / "data")  # raises FusionError "another titan-fusion service ..."
    svc.stop(grace=0)


def test_a_predict_answered_under_overload_can_be_recorded_by_its_event_id(tmp_path: Path) -> None:
    svc, port, registry = start(tmp_path / "data", queue_size=2)
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        c = running.client(retries=0)
        learn(c, events(10, 3), "q")
        evs = events(11, 4)
        with JournalLock(running.data_dir) as lock:
            puts = owner_puts(svc)
            calls = [Call(lambda: c.record_outcome(*evs[0][:2], actual_direction="UP", event_id="x0"))]
            wait_until(lambda: owner_puts(svc) == puts + 1 and svc.owner.queue_depth == 0, what="the owner to take it")
            for i in (1, 2):
                calls.append(Call(lambda i=i: c.record_outcome(*evs[i][:2], actual_direction="UP", event_id=f"x{i}")))
                wait_until(lambda i=i: svc.owner.queue_depth == i, what=f"{i} queued")
            try:
                c.predict(*evs[3][:2], event_id="remember-me")
            except ResourceExhaustedError:
                refused = True  # acceptable: the caller knows it must send the inputs
            else:
                refused = False
            lock.release()
        for call in calls:
            call.outcome()
        if not refused:
            ack = c.record_outcome(actual_direction="UP", event_id="remember-me")
            assert (ack.duplicate, ack.used_predict_inputs, ack.samples_trained) == (False, True, 7)
    finally:
        running.close()


def test_a_named_checkpoint_is_never_deleted_by_automatic_retention(tmp_path: Path) -> None:
    svc, port, registry = start(tmp_path / "data", checkpoint_every=5, checkpoints_keep=1)
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        c = running.client()
        learn(c, events(22, 3), "n")
        try:
            c.checkpoint_save("auto-mine")
        except InvalidArgumentError as e:  # acceptable: the prefix is reserved
            assert e.details.startswith("name:")
            return
        learn(c, events(23, 12), "m")  # automatic checkpoints at 5, 10 and 15 outcomes, keeping 1
        names = [i.name for i in c.checkpoint_list()]
        assert "auto-mine" in names, names
    finally:
        running.close()
