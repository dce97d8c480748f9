"""examples/ensemble.py, the integration a trader copies: through a real service, against a
service that refuses (a real gRPC server answering errors) and with no service at all, its loop
keeps going, says what served each decision, and keeps the outcomes it could not deliver."""
from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from service_helpers import Running, start
from test_client import SERVICE, TinyService, abort
from titan_fusion.client import FusionClient

ROOT = Path(__file__).resolve().parent.parent


def _example():
    spec = importlib.util.spec_from_file_location("ensemble_example", ROOT / "examples" / "ensemble.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example()
CANDLES = EXAMPLE.load_candles(EXAMPLE.DATA)[:33 + 40]


def _trade(ensemble, candles=CANDLES) -> list[tuple[str, float | None, str]]:
    decisions = []
    for t in range(33, len(candles)):
        history, closed = candles[:t], candles[t]
        event_id = f"{EXAMPLE.SYMBOL}:{closed.time}"
        action, prob_up, served, outputs, features = ensemble.decide(history, event_id)
        decisions.append((action, prob_up, served))
        direction = "UP" if closed.close > history[-1].close else "DOWN"
        ensemble.record_outcome(outputs, features, direction, event_id=event_id)
    return decisions


def test_the_candles_are_in_time_order_once_each_in_utc():
    every = EXAMPLE.load_candles(EXAMPLE.DATA)
    assert len(every) == 8686 and all(a.time < b.time for a, b in zip(every, every[1:]))
    assert every[0].time == "2021-09-27T13:45:00+00:00"


def test_through_a_real_service_every_outcome_is_delivered(tmp_path):
    svc, port, registry = start(tmp_path / "data", fusion={"min_samples": 20, "warmup_steps": 5})
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        ensemble = EXAMPLE.Ensemble(FusionClient(running.target, timeout=10, retries=0))
        decisions = _trade(ensemble)
        assert not ensemble.pending and sum(ensemble.served.values()) == 40
        assert set(ensemble.served) <= {"fusion", "average/warming_up"} and ensemble.served["fusion"] > 0
        assert all(p is not None for _, p, _ in decisions)
        stats = running.client().stats()
        assert stats["samples_trained"] == 40
        # live scoring pairs each outcome with the forecast served for its candle (the same
        # event_id): every outcome whose Predict the fusion served was scored
        assert stats["live"]["served"]["outcomes"] == stats["live"]["fusion"]["outcomes"] == ensemble.served["fusion"]
        again = EXAMPLE.Ensemble(FusionClient(running.target, timeout=10, retries=0))
        _trade(again)  # the same candles again: the same event_ids, recorded once
        assert running.client().stats()["samples_trained"] == 40
    finally:
        running.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION])
def test_a_service_that_refuses_never_stops_the_loop_and_outcomes_are_kept(code):
    tiny = TinyService()
    tiny.behaviour["Predict"] = abort(code)
    tiny.behaviour["RecordOutcome"] = abort(code)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, tiny.handlers()),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        ensemble = EXAMPLE.Ensemble(FusionClient(f"127.0.0.1:{port}", timeout=5, retries=0))
        decisions = _trade(ensemble, CANDLES[:33 + 5])
    finally:
        server.stop(None)
    assert decisions == [("HOLD", None, "none")] * 5  # no forecast: no trade
    assert len(ensemble.pending) == 5  # kept, to be sent again
    assert len(tiny.calls["RecordOutcome"]) == 5  # one try a candle: the oldest first, then wait


def test_without_a_service_it_trades_on_the_local_average_and_says_so():
    ensemble = EXAMPLE.Ensemble(FusionClient("127.0.0.1:1", timeout=0.5, retries=0))
    decisions = _trade(ensemble, CANDLES[:33 + 5])
    assert {served for _, _, served in decisions} == {"average/unavailable"}
    assert dict(ensemble.served) == {"average/unavailable": 5} and len(ensemble.pending) == 5
