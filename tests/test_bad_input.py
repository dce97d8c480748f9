"""Every row of docs/errors.md, sent to a real service: the documented status, the field named, and
nothing changed (training statistics, counters, the journal, the checkpoints)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import sqlite3
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from titan_fusion.client.pb import fusion_pb2 as pb
from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc
from titan_fusion.server.checkpoint import MODEL_FILE, STATE_FILE
from titan_fusion.server.config import FusionConfig
from titan_fusion.server.fusion import TransformerFusion
from titan_fusion.server.service import create_server
from titan_fusion.server.settings import ServiceConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "errors.md").read_text()
ROWS = {m.group(1): (m.group(2).strip(), m.group(3).strip(), m.group(4).strip())
        for m in re.finditer(r"^\| ([a-z0-9]+-[a-z0-9-]+) \| ([^|]+) \| [^|]+ \| ([^|]+) \| ([^|]+) \|$", DOC, re.M)}
FAST = FusionConfig(min_samples=20, warmup_steps=10, batch_size=8, val_every=5, early_stopping_patience=10_000)
NAMES = ("a", "b", "c", "d")
MAX_MESSAGE = 64 * 1024


def experts(*probs, names=NAMES, extra=None):
    """ExpertForecasts; `extra` maps an index to more fields, e.g. {0: {"prob_down": 2.0}}."""
    out = []
    for i, p in enumerate(probs):
        e = pb.ExpertForecast(name=names[i] if i < len(names) else "", prob_up=p)
        for k, v in (extra or {}).get(i, {}).items():
            setattr(e, k, v)
        out.append(e)
    return out


GOOD = experts(0.6, 0.4, 0.55, 0.5)
FEATS = {"close": 50_000.0, "rsi": 55.0}


def predict(**kw):
    return lambda stub: stub.Predict(pb.PredictRequest(**{"experts": GOOD, "features": FEATS, **kw}), timeout=10)


def outcome(**kw):
    return lambda stub: stub.RecordOutcome(pb.RecordOutcomeRequest(
        **{"experts": GOOD, "features": FEATS, "actual_direction": pb.DIRECTION_UP, **kw}), timeout=10)


def checkpoint(action, name=""):
    return lambda stub: stub.Checkpoint(pb.CheckpointRequest(action=action, name=name), timeout=10)


def no_prob_up(stub):
    e = list(GOOD)
    e[1] = pb.ExpertForecast(name="b")
    return stub.Predict(pb.PredictRequest(experts=e, features=FEATS), timeout=10)


def raw(method, payload):
    def call(stub):
        return stub._channel.unary_unary(method)(payload, timeout=10)
    return call


A = pb.CheckpointRequest
CASES = {
    "experts-empty": predict(experts=[]),
    "prob-missing": no_prob_up,
    "prob-nan": predict(experts=experts(math.nan, 0.4, 0.5, 0.5)),
    "prob-inf": predict(experts=experts(math.inf, 0.4, 0.5, 0.5)),
    "prob-neg-inf": outcome(experts=experts(0.5, 0.4, 0.5, -math.inf)),
    "prob-above-1": predict(experts=experts(0.5, 0.4, 1.5, 0.5)),
    "prob-below-0": outcome(experts=experts(-0.1, 0.4, 0.5, 0.5)),
    "prob-down-range": predict(experts=experts(0.5, 0.4, 0.5, 0.5, extra={0: {"prob_down": 2.0}})),
    "prob-sum": outcome(experts=experts(0.7, 0.4, 0.5, 0.5, extra={0: {"prob_down": 0.7}})),
    "prob-down-nan": predict(experts=experts(0.5, 0.4, 0.5, 0.5, extra={1: {"prob_down": math.nan}})),
    "confidence-range": predict(experts=experts(0.5, 0.4, 0.5, 0.5, extra={0: {"confidence": 1.2}})),
    "confidence-nan": outcome(experts=experts(0.5, 0.4, 0.5, 0.5, extra={2: {"confidence": math.nan}})),
    "names-duplicate": predict(experts=experts(0.5, 0.4, 0.5, 0.5, names=("a", "a", "c", "d"))),
    "name-too-long": predict(experts=experts(0.5, 0.4, 0.5, 0.5, names=("x" * 200, "b", "c", "d"))),
    "experts-too-many": predict(experts=experts(*[0.5] * 65, names=[f"e{i}" for i in range(65)])),
    "expert-unknown": predict(experts=experts(0.5, 0.4, 0.5, 0.5, names=("a", "b", "c", "z"))),
    "expert-unknown-outcome": outcome(experts=experts(0.5, 0.4, 0.5, 0.5, names=("a", "b", "c", "z"))),
    "experts-partly-named-out-of-order": predict(experts=experts(0.5, 0.4, 0.5, 0.5, names=("b", "", "c", "d"))),
    "experts-partly-named-unknown": outcome(experts=experts(0.5, 0.4, 0.5, 0.5, names=("", "", "z"))),
    "feature-nan": predict(features={"close": 1.0, "rsi": math.nan}),
    "feature-inf": outcome(features={"close": math.inf, "rsi": 50.0}),
    "feature-huge": outcome(features={"close": 1e200, "rsi": 50.0}),
    "feature-huge-negative": predict(features={"close": 50_000.0, "rsi": -2e15}),
    "feature-unknown": predict(features={**FEATS, "volume": 3.0}),
    "feature-missing": outcome(features={"close": 50_000.0}),
    "features-too-many": predict(features={f"f{i}": 1.0 for i in range(300)}),
    "feature-name-too-long": predict(features={"x" * 200: 1.0}),
    # the message quotes the names: capped, or grpc would answer RESOURCE_EXHAUSTED (headers > 16 KiB)
    "features-unknown-many": predict(features={**FEATS, **{f"{i:03d}" + "v" * 125: 1.0 for i in range(200)}}),
    "features-unknown-many-outcome": outcome(features={f"{i:03d}" + "v" * 125: 1.0 for i in range(200)}),
    "event-id-too-long": predict(event_id="e" * 300),
    "event-id-control": outcome(event_id="candle\n1"),
    "direction-missing": outcome(actual_direction=pb.DIRECTION_UNSPECIFIED),
    "direction-unknown": outcome(actual_direction=7),
    "outcome-no-inputs": outcome(experts=[], features={}),
    "outcome-features-only": outcome(experts=[], event_id="x"),
    "outcome-wrong-count": outcome(experts=GOOD[:3]),
    "outcome-unknown-event": outcome(experts=[], features={}, event_id="never-predicted"),
    "predict-wrong-count": predict(experts=GOOD[:3]),
    "checkpoint-no-action": checkpoint(A.ACTION_UNSPECIFIED, "x"),
    "checkpoint-slash": checkpoint(A.ACTION_SAVE, "a/b"),
    "checkpoint-dotdot": checkpoint(A.ACTION_RESTORE, ".."),
    "checkpoint-traversal": checkpoint(A.ACTION_RESTORE, "../../etc"),
    "checkpoint-absolute": checkpoint(A.ACTION_RESTORE, "/etc/passwd"),
    "checkpoint-hidden": checkpoint(A.ACTION_SAVE, ".hidden"),
    "checkpoint-too-long": checkpoint(A.ACTION_SAVE, "c" * 65),
    "checkpoint-name-huge": checkpoint(A.ACTION_RESTORE, "c" * 20000),
    # 4 UTF-8 bytes, 12 percent-encoded: a cap in characters let this header past 8 KiB
    "checkpoint-name-huge-emoji": checkpoint(A.ACTION_RESTORE, "\N{GRINNING FACE}" * 10000),
    "checkpoint-restore-unnamed": checkpoint(A.ACTION_RESTORE, ""),
    "checkpoint-list-named": checkpoint(A.ACTION_LIST, "x"),
    "checkpoint-link": checkpoint(A.ACTION_RESTORE, "escape"),
    "checkpoint-unknown": checkpoint(A.ACTION_RESTORE, "nope"),
    "checkpoint-incompatible": checkpoint(A.ACTION_RESTORE, "wide"),
    "checkpoint-corrupt": checkpoint(A.ACTION_RESTORE, "corrupt"),
    "checkpoint-pickle": checkpoint(A.ACTION_RESTORE, "pickled"),
    "message-too-large": predict(event_id="", features={f"f{i}": 1.0 for i in range(100)},
                                 experts=experts(0.5, 0.4, 0.5, 0.5, names=("a" * 40000, "b" * 40000, "c", "d"))),
    "not-protobuf": raw("/titan.fusion.v1.FusionService/Predict", b"\xff\xff\xff\xff not a protobuf"),
    "unknown-method": raw("/titan.fusion.v1.FusionService/Train", b""),
}


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def _checkpoint_fixtures(data: Path, outside: Path) -> None:
    ck = data / "checkpoints"
    wide = TransformerFusion(FAST.replace(hidden_dim=64), n_models=4)
    wide.update([{"prob_up": 0.5, "name": n} for n in NAMES], FEATS, "UP")
    wide.save(ck / "wide")
    good = TransformerFusion(FAST, n_models=4)
    good.update([{"prob_up": 0.5, "name": n} for n in NAMES], FEATS, "UP")
    good.save(ck / "corrupt")
    blob = bytearray((ck / "corrupt" / MODEL_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (ck / "corrupt" / MODEL_FILE).write_bytes(bytes(blob))
    good.save(ck / "pickled")
    payload = pickle.dumps({"net": _Exploit()})
    (ck / "pickled" / MODEL_FILE).write_bytes(payload)
    state = json.loads((ck / "pickled" / STATE_FILE).read_text())
    state["checksums"][MODEL_FILE] = hashlib.sha256(payload).hexdigest()
    (ck / "pickled" / STATE_FILE).write_text(json.dumps(state))
    good.save(outside / "elsewhere")
    os.symlink(outside / "elsewhere", ck / "escape")


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    data = tmp / "data"
    cwd = os.getcwd()
    os.chdir(tmp)  # where the pickle would write its marker
    svc, port = create_server(ServiceConfig(port=0, metrics_port=-1, data_dir=str(data), fusion=FAST,
                                            checkpoint_every=0, max_message_bytes=MAX_MESSAGE),
                              registry=CollectorRegistry())
    assert svc.wait_ready(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.FusionServiceStub(channel)
    stub._channel = channel
    for i in range(30):  # the schema is fixed (a, b, c, d; close, rsi) and the fusion serves
        stub.RecordOutcome(pb.RecordOutcomeRequest(
            experts=experts(0.3 + 0.01 * i, 0.4, 0.5, 0.6), features={"close": 50_000.0 + i, "rsi": 40.0 + i},
            actual_direction=pb.DIRECTION_UP if i % 3 else pb.DIRECTION_DOWN, event_id=f"seed-{i}"), timeout=10)
    _checkpoint_fixtures(data, tmp / "outside")
    yield stub, data, tmp
    channel.close()
    svc.stop(grace=1)
    os.chdir(cwd)


def _observable(stub, data: Path) -> dict:
    s = stub.Stats(pb.StatsRequest(), timeout=10)
    with sqlite3.connect(data / "journal.sqlite3") as db:
        journal = db.execute("SELECT COUNT(*), MAX(seq) FROM outcomes").fetchone()
    return {"training": s.training, "attention": list(s.attention), "outcomes": s.service.outcomes,
            "duplicates": s.service.duplicates, "journal": journal,
            "checkpoints": sorted(p.name for p in (data / "checkpoints").iterdir())}


def test_the_table_and_the_cases_agree():
    assert len(ROWS) >= 30
    assert set(ROWS) == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_its_status_and_changes_nothing(running, case):
    stub, data, tmp = running
    rpc, expected, names = ROWS[case]
    before = _observable(stub, data)
    if expected.startswith("OK"):
        resp = CASES[case](stub)
        assert resp.source == pb.SOURCE_AVERAGE and resp.reason == pb.FALLBACK_REASON_WRONG_EXPERT_COUNT
    else:
        with pytest.raises(grpc.RpcError) as e:
            CASES[case](stub)
        assert e.value.code().name == expected, e.value.details()
        field = re.search(r"`([^`]+)`", names)
        if field:
            assert field.group(1) in e.value.details(), e.value.details()
        if e.value.code() is grpc.StatusCode.INTERNAL and case != "not-protobuf":
            assert e.value.details() == "internal error; see the server log"
    after = _observable(stub, data)
    if expected.startswith("OK"):  # the fallback is a forecast: only the last source/reason move
        for s in (before["training"], after["training"]):
            s.ClearField("last_source")
            s.ClearField("last_reason")
    assert after == before
    assert not (tmp / "pwned-by-checkpoint").exists()
