"""The thin client against real gRPC: a port where nothing listens, and a tiny in-test server.

The tiny server registers plain handlers for titan.fusion.v1.FusionService through
`grpc.method_handlers_generic_handler`; each test scripts what its RPCs answer (a response, an
abort with a status code, a delay) and reads back what the client sent. No mocks, no titan server.
"""
from __future__ import annotations

import doctest
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import titan_fusion.client
from titan_fusion.client import (
    CheckpointInfo,
    ClientClosedError,
    DeadlineExceededError,
    FailedPreconditionError,
    FusionClient,
    FusionClientError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutcomeAck,
    PermissionDeniedError,
    Prediction,
    ResourceExhaustedError,
    ServerError,
    TransportError,
    UnauthenticatedError,
    UnavailableError,
)
from titan_fusion.client import client as client_module
from titan_fusion.client import convert, errors
from titan_fusion.client.pb import fusion_pb2 as pb

SERVICE = "titan.fusion.v1.FusionService"
BAD_PROB = "experts[1].prob_up: must be in [0, 1], got 1.5"
EXPERTS = [
    {"name": "TrendVIC", "prob_up": 0.7, "confidence": 0.9},
    {"name": "Oscillator", "prob_up": 0.4},
    {"name": "VolumeMetrix", "prob_up": 0.6, "prob_down": 0.4},
    {"name": "ML_Classifier", "prob_up": 0.5},
]
AVERAGE = (0.7 + 0.4 + 0.6 + 0.5) / 4


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # gRPC honours proxy variables; these tests only ever talk to 127.0.0.1.
    for name in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def dead_target():
    """127.0.0.1:<port> where nothing listens: the port is bound (so no one else takes it) but
    never listened on, so every connection is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# -- the tiny real server ------------------------------------------------------------------------


def respond(message):
    return lambda request, context: message


def abort(code, details=""):
    def behaviour(request, context):
        context.abort(code, details)

    return behaviour


def sleep_then(seconds, message):
    def behaviour(request, context):
        time.sleep(seconds)
        return message

    return behaviour


def in_turn(*behaviours):
    """The first call gets behaviours[0], the second behaviours[1], ...; the last one repeats."""
    remaining = list(behaviours)

    def behaviour(request, context):
        current = remaining.pop(0) if len(remaining) > 1 else remaining[0]
        return current(request, context)

    return behaviour


class TinyService:
    """What each RPC answers (`behaviour`), and every request and metadata it saw (`calls`)."""

    METHODS = {
        "Predict": (pb.PredictRequest, pb.PredictResponse),
        "RecordOutcome": (pb.RecordOutcomeRequest, pb.RecordOutcomeResponse),
        "Stats": (pb.StatsRequest, pb.StatsResponse),
        "Checkpoint": (pb.CheckpointRequest, pb.CheckpointResponse),
    }

    def __init__(self):
        self.behaviour = {name: abort(grpc.StatusCode.UNIMPLEMENTED) for name in self.METHODS}
        self.calls = defaultdict(list)
        self.metadata = []
        self.target = ""

    def handlers(self):
        def make(name, request_cls, response_cls):
            def handle(request, context):
                self.calls[name].append(request)
                self.metadata.append(dict(context.invocation_metadata()))
                return self.behaviour[name](request, context)

            return grpc.unary_unary_rpc_method_handler(
                handle,
                request_deserializer=request_cls.FromString,
                response_serializer=response_cls.SerializeToString,
            )

        return {name: make(name, *classes) for name, classes in self.METHODS.items()}


@pytest.fixture
def service():
    tiny = TinyService()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, tiny.handlers()),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tiny.target = f"127.0.0.1:{port}"
    try:
        yield tiny
    finally:
        server.stop(None)


# -- (a) no torch, no numpy: import and fall back in a clean interpreter -------------------------

_WITHOUT_TORCH = textwrap.dedent(
    """
    import importlib.abc, json, logging, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "numpy"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocked())

    warnings = []
    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    logging.getLogger("titan_fusion.client").addHandler(Collect(logging.WARNING))

    from titan_fusion.client import FusionClient

    experts = json.loads(sys.argv[2])
    with FusionClient(sys.argv[1], timeout=0.5) as fusion:
        prob_up, prob_down = fusion.forward(experts, {"close": 50000.0, "rsi": 55.0})
        fallback_count = fusion.fallback_count
    print(json.dumps({
        "prob_up": prob_up,
        "prob_down": prob_down,
        "fallback_count": fallback_count,
        "warnings": warnings,
        "loaded": sorted(m for m in sys.modules
                         if m.split(".")[0] in ("torch", "numpy") or m.startswith("titan_fusion.server")),
    }))
    """
)


def test_client_runs_without_torch_or_numpy_and_falls_back_to_the_average(dead_target):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, dead_target, json.dumps(EXPERTS)],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["prob_up"] == pytest.approx(AVERAGE)
    assert out["prob_down"] == pytest.approx(1 - AVERAGE)
    assert out["prob_up"] + out["prob_down"] == pytest.approx(1.0)
    assert out["fallback_count"] == 1
    assert len(out["warnings"]) == 1 and "local average" in out["warnings"][0]
    assert out["loaded"] == []  # neither torch nor numpy (nor the server) is in sys.modules


# -- (b) unreachable, no fallback ----------------------------------------------------------------


@pytest.mark.parametrize("call", ["forward", "predict"])
def test_unreachable_without_fallback_raises_a_transport_error(dead_target, call):
    with FusionClient(dead_target, timeout=0.5, fallback=False) as fusion:
        with pytest.raises((UnavailableError, DeadlineExceededError)) as info:
            getattr(fusion, call)(EXPERTS)
        assert fusion.fallback_count == 0
    assert isinstance(info.value, TransportError) and isinstance(info.value, FusionClientError)
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert isinstance(info.value.__cause__, grpc.RpcError)  # the original stays attached


def test_unreachable_with_fallback_serves_the_local_average(dead_target, caplog):
    with FusionClient(dead_target, timeout=0.5) as fusion:
        with caplog.at_level(logging.WARNING, logger="titan_fusion.client"):
            p = fusion.predict(EXPERTS, event_id="BTC:15m:1")
            assert fusion.forward(EXPERTS) == pytest.approx((AVERAGE, 1 - AVERAGE))
        assert fusion.fallback_count == 2
    assert p == Prediction(
        prob_up=pytest.approx(AVERAGE), prob_down=pytest.approx(1 - AVERAGE), source="average",
        reason="unavailable", attention={e["name"]: 0.25 for e in EXPERTS}, model_version=-1,
        event_id="BTC:15m:1",
    )
    assert list(p.attention) == [e["name"] for e in EXPERTS]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]


def test_outcomes_never_fall_back(dead_target):
    with FusionClient(dead_target, timeout=0.5, retries=0) as fusion:
        with pytest.raises(TransportError):
            fusion.update(EXPERTS, actual_direction="UP", event_id="BTC:15m:1")
        assert fusion.fallback_count == 0


def test_slow_service_falls_back_on_deadline(service):
    service.behaviour["Predict"] = sleep_then(0.5, pb.PredictResponse(prob_up=0.9, prob_down=0.1))
    with FusionClient(service.target, timeout=0.1) as fusion:
        assert fusion.forward(EXPERTS) == pytest.approx((AVERAGE, 1 - AVERAGE))
        assert fusion.fallback_count == 1
    with FusionClient(service.target, timeout=0.1, fallback=False) as fusion:
        with pytest.raises(DeadlineExceededError):
            fusion.forward(EXPERTS)


# -- (c) closed ----------------------------------------------------------------------------------


def test_use_after_close_raises_client_closed(service):
    service.behaviour["Predict"] = respond(pb.PredictResponse(prob_up=0.6, prob_down=0.4))
    with FusionClient(service.target) as fusion:
        assert fusion.forward(EXPERTS) == pytest.approx((0.6, 0.4))
    assert fusion.is_closed
    fusion.close()  # closing twice is fine
    calls = [
        lambda: fusion.forward(EXPERTS),  # the fallback does not answer for a closed client
        lambda: fusion.predict(EXPERTS),
        lambda: fusion.update(EXPERTS, actual_direction="UP", event_id="e1"),
        lambda: fusion.get_training_stats(),
        lambda: fusion.get_attention_weights(),
        lambda: fusion.save("ckpt"),
        lambda: fusion.load("ckpt"),
        lambda: fusion.checkpoint_list(),
        lambda: fusion.__enter__(),
    ]
    for call in calls:
        with pytest.raises(ClientClosedError) as info:
            call()
        assert isinstance(info.value, FusionClientError)
        assert info.value.code is grpc.StatusCode.CANCELLED
    assert len(service.calls["Predict"]) == 1 and fusion.fallback_count == 0


def test_close_during_a_call_raises_client_closed_not_the_fallback(service):
    service.behaviour["Predict"] = sleep_then(0.5, pb.PredictResponse(prob_up=0.6, prob_down=0.4))
    fusion = FusionClient(service.target, timeout=2.0)
    closer = threading.Timer(0.1, fusion.close)
    closer.start()
    try:
        with pytest.raises(ClientClosedError):
            fusion.forward(EXPERTS)
    finally:
        closer.join()
    assert fusion.fallback_count == 0


# -- (d) local validation ------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["SIDEWAYS", "", "U", None, 1, True])
def test_invalid_direction_raises_before_any_call(service, direction):
    with FusionClient(service.target) as fusion:
        with pytest.raises(ValueError, match="actual_direction"):
            fusion.update(EXPERTS, actual_direction=direction, event_id="e1")
        with pytest.raises(ValueError, match="actual_direction"):
            fusion.record_outcome(EXPERTS, actual_direction=direction)
    assert service.calls["RecordOutcome"] == []


@pytest.mark.parametrize("direction, expected", [("UP", pb.DIRECTION_UP), ("down", pb.DIRECTION_DOWN),
                                                 ("Up", pb.DIRECTION_UP)])
def test_direction_is_case_insensitive(service, direction, expected):
    service.behaviour["RecordOutcome"] = respond(pb.RecordOutcomeResponse(samples_trained=1))
    with FusionClient(service.target) as fusion:
        fusion.update(EXPERTS, actual_direction=direction)
    assert service.calls["RecordOutcome"][0].actual_direction == expected


def test_bad_experts_raise_before_any_call(service):
    with FusionClient(service.target) as fusion:
        with pytest.raises(ValueError, match=r"experts\[1\]\.prob_up is required"):
            fusion.forward([{"prob_up": 0.5}, {"name": "Oscillator"}])
        with pytest.raises(TypeError, match=r"experts\[0\]\.prob_up must be a number"):
            fusion.forward([{"prob_up": "high"}])
        with pytest.raises(TypeError, match="features must be a mapping"):
            fusion.forward(EXPERTS, [50000.0, 55.0])
        with pytest.raises(ValueError, match="needs the experts"):
            fusion.record_outcome(actual_direction="UP")  # neither experts nor event_id
    assert service.calls == {}


# -- (e) retries ---------------------------------------------------------------------------------


def test_outcome_without_event_id_is_not_retried(service):
    service.behaviour["RecordOutcome"] = abort(grpc.StatusCode.UNAVAILABLE, "restarting")
    with FusionClient(service.target, retries=3) as fusion:
        with pytest.raises(UnavailableError, match="restarting"):
            fusion.update(EXPERTS, actual_direction="UP")
    assert len(service.calls["RecordOutcome"]) == 1


def test_outcome_with_event_id_is_retried_retries_times_and_within_its_time_budget(service):
    """A service that answers UNAVAILABLE at once ("starting") is retried with a doubling backoff
    until (retries + 1) * timeout has passed, not `retries` times in a fraction of a second."""
    service.behaviour["RecordOutcome"] = abort(grpc.StatusCode.UNAVAILABLE, "restarting")
    with FusionClient(service.target, retries=3, timeout=0.2) as fusion:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="restarting"):
            fusion.update(EXPERTS, {"close": 50000.0}, "DOWN", event_id="BTC:15m:7")
        elapsed = time.monotonic() - started
    sent = service.calls["RecordOutcome"]
    # 0, 0.05, 0.15, 0.35, 0.75 s: one more after the three retries, while the 0.8 s allow it
    assert len(sent) == 5
    assert all(r == sent[0] for r in sent) and sent[0].event_id == "BTC:15m:7"
    assert 0.05 + 0.1 + 0.2 + 0.4 <= elapsed < 0.8 + 0.5


def test_outcome_retries_outlast_a_service_that_is_starting(service):
    started = time.monotonic()

    def starting_then_ok(request, context):
        if time.monotonic() - started < 1.0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the service is starting")
        return pb.RecordOutcomeResponse(samples_trained=7)
    service.behaviour["RecordOutcome"] = starting_then_ok
    with FusionClient(service.target, retries=3, timeout=0.5) as fusion:
        ack = fusion.record_outcome(EXPERTS, actual_direction="UP", event_id="BTC:15m:8")
    assert ack.samples_trained == 7 and ack.attempts == len(service.calls["RecordOutcome"]) > 4


def test_a_full_queue_is_raised_at_once_for_the_caller_to_keep_the_outcome(service):
    service.behaviour["RecordOutcome"] = abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the model owner's queue is full")
    with FusionClient(service.target) as fusion:
        with pytest.raises(ResourceExhaustedError):
            fusion.record_outcome(EXPERTS, actual_direction="UP", event_id="e-9")
    assert len(service.calls["RecordOutcome"]) == 1


def test_an_outcome_by_event_id_carries_the_inputs_of_a_forecast_served_locally(dead_target, service):
    """The quickstart's pattern (predict with an event_id, then record_outcome with only the event_id)
    survives a Predict that the service never saw: the client kept its inputs and sends them."""
    service.behaviour["RecordOutcome"] = respond(pb.RecordOutcomeResponse(samples_trained=1))
    with FusionClient(dead_target, timeout=0.2) as fusion:
        p = fusion.predict(EXPERTS, {"close": 50000.0}, event_id="BTC:15m:9")
        assert p.reason == "unavailable"
        fusion._stub = FusionClient(service.target)._stub  # the service is back (same client)
        fusion.record_outcome(actual_direction="UP", event_id="BTC:15m:9")
        fusion.record_outcome(actual_direction="UP", event_id="BTC:15m:10")  # never predicted here
    first, second = service.calls["RecordOutcome"]
    assert [e.prob_up for e in first.experts] == [e["prob_up"] for e in EXPERTS]
    assert dict(first.features) == {"close": 50000.0} and first.event_id == "BTC:15m:9"
    assert not second.experts and second.event_id == "BTC:15m:10"


def test_an_outcome_by_event_id_the_service_lost_is_sent_again_with_the_kept_inputs(service):
    service.behaviour["Predict"] = respond(pb.PredictResponse(prob_up=0.6, prob_down=0.4))

    def by_id_unknown(request, context):
        if not request.experts:
            context.abort(grpc.StatusCode.NOT_FOUND, f"event_id: no Predict with event_id {request.event_id!r}")
        return pb.RecordOutcomeResponse(samples_trained=2)
    service.behaviour["RecordOutcome"] = by_id_unknown
    with FusionClient(service.target) as fusion:
        fusion.predict(EXPERTS, {"rsi": 55.0}, event_id="BTC:15m:11")
        assert fusion.record_outcome(actual_direction="DOWN", event_id="BTC:15m:11").samples_trained == 2
        with pytest.raises(NotFoundError):  # nothing kept for it: the service's answer stands
            fusion.record_outcome(actual_direction="DOWN", event_id="BTC:15m:12")
    by_id, with_inputs, unknown = service.calls["RecordOutcome"]
    assert not by_id.experts and len(with_inputs.experts) == 4 and dict(with_inputs.features) == {"rsi": 55.0}
    assert not unknown.experts


def test_the_client_keeps_the_inputs_of_the_last_kept_predictions_only(dead_target, monkeypatch):
    monkeypatch.setattr(client_module, "KEPT_PREDICTIONS", 3)
    with FusionClient(dead_target, timeout=0.2) as fusion:
        for i in range(5):
            fusion.predict(EXPERTS, event_id=f"e-{i}")
        assert list(fusion._kept) == ["e-2", "e-3", "e-4"]


def test_client_side_checks_match_the_in_process_class(service):
    """What TransformerFusion refuses, the client refuses before sending: numbers as strings,
    feature names that are not str, an empty event_id; and a per-call timeout must be positive.
    The service's INVALID_ARGUMENT is a ValueError, as FusionInputError is in-process."""
    with FusionClient(service.target) as fusion:
        with pytest.raises(TypeError, match=r"experts\[0\]\.prob_up must be a number"):
            fusion.forward([{"prob_up": "0.6"}])
        with pytest.raises(TypeError, match="feature names must be str"):
            fusion.forward(EXPERTS, {1: 2.0})
        with pytest.raises(ValueError, match="event_id must be a non-empty string"):
            fusion.update(EXPERTS, actual_direction="UP", event_id="")
        for bad in (0, -1.0, True):
            with pytest.raises(ValueError, match="timeout must be a positive number"):
                fusion.predict(EXPERTS, timeout=bad)
    assert service.calls == {}
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, ServerError)


def test_retry_answered_duplicate_after_a_lost_ack_is_a_success(service):
    # The first attempt is recorded but answers too late; the retry is acknowledged as a duplicate.
    late = sleep_then(0.4, pb.RecordOutcomeResponse(samples_trained=5, model_version=3))
    duplicate = respond(pb.RecordOutcomeResponse(duplicate=True, samples_trained=5, model_version=3))
    service.behaviour["RecordOutcome"] = in_turn(late, duplicate)
    with FusionClient(service.target, timeout=0.15, retries=3) as fusion:
        ack = fusion.record_outcome(EXPERTS, actual_direction="UP", event_id="BTC:15m:8")
    assert ack == OutcomeAck(duplicate=True, samples_trained=5, model_version=3,
                             used_predict_inputs=False, attempts=2)
    assert len(service.calls["RecordOutcome"]) == 2


def test_retry_reaches_a_service_that_comes_back():
    # Down at the first attempt, up 0.3 s later: the retry waits for gRPC to reconnect (its first
    # reconnect backoff is about 1 s) instead of failing at once while the channel backs off.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    tiny = TinyService()
    tiny.behaviour["RecordOutcome"] = respond(pb.RecordOutcomeResponse(samples_trained=1))
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, tiny.handlers()),))

    def come_back():
        time.sleep(0.3)
        sock.close()
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()

    reviver = threading.Thread(target=come_back)
    try:
        with FusionClient(f"127.0.0.1:{port}", timeout=2.0, retries=3) as fusion:
            reviver.start()
            ack = fusion.record_outcome(EXPERTS, actual_direction="UP", event_id="BTC:15m:10")
        assert ack.attempts >= 2 and ack.samples_trained == 1
        assert len(tiny.calls["RecordOutcome"]) == 1  # the failed attempts never reached it
    finally:
        reviver.join()
        server.stop(None)


def test_server_errors_are_not_retried(service):
    service.behaviour["RecordOutcome"] = abort(grpc.StatusCode.NOT_FOUND, "event_id 'x' unknown")
    with FusionClient(service.target, retries=3) as fusion:
        with pytest.raises(NotFoundError, match="unknown"):
            fusion.record_outcome(actual_direction="UP", event_id="x")
    assert len(service.calls["RecordOutcome"]) == 1


# -- (f) status codes ----------------------------------------------------------------------------


def test_invalid_argument_surfaces_and_is_never_masked_by_the_fallback(service):
    service.behaviour["Predict"] = abort(grpc.StatusCode.INVALID_ARGUMENT, BAD_PROB)
    with FusionClient(service.target, fallback=True) as fusion:
        with pytest.raises(InvalidArgumentError) as info:
            fusion.forward(EXPERTS)
        with pytest.raises(InvalidArgumentError):
            fusion.predict(EXPERTS)
        assert fusion.fallback_count == 0
    err = info.value
    assert err.details == BAD_PROB
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(err, ServerError) and not isinstance(err, TransportError)
    assert str(err) == f"INVALID_ARGUMENT: {BAD_PROB}"


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.ABORTED, ServerError),
        (grpc.StatusCode.UNIMPLEMENTED, ServerError),
    ],
)
def test_status_codes_map_to_the_hierarchy(service, code, cls):
    service.behaviour["Stats"] = abort(code, f"because {code.name}")
    with FusionClient(service.target) as fusion:
        with pytest.raises(cls) as info:
            fusion.get_training_stats()
    assert type(info.value) is cls
    assert info.value.code is code and info.value.details == f"because {code.name}"


def test_every_error_class_is_in_the_tree_of_the_docstring():
    public = [getattr(errors, name) for name in errors.__all__ if name != "from_rpc_error"]
    for cls in public:
        assert issubclass(cls, errors.FusionClientError)
        assert cls.__name__ in errors.__doc__
    transport = {c for c in public if issubclass(c, TransportError)}
    assert transport == {TransportError, UnavailableError, DeadlineExceededError}


# -- conversions through the wire ----------------------------------------------------------------


def test_predict_sends_the_experts_and_returns_a_prediction(service):
    service.behaviour["Predict"] = respond(pb.PredictResponse(
        prob_up=0.62, prob_down=0.38, source=pb.SOURCE_FUSION, model_version=42, event_id="e9",
        attention=[pb.ExpertWeight(name=n, weight=w) for n, w in
                   [("TrendVIC", 0.4), ("Oscillator", 0.1), ("VolumeMetrix", 0.3), ("ML_Classifier", 0.2)]],
    ))

    class ModelOutput:  # the original's expert output: model_name, not name
        def __init__(self, model_name, prob_up):
            self.model_name, self.prob_up = model_name, prob_up

    outputs = [ModelOutput(e["name"], e["prob_up"]) for e in EXPERTS]
    with FusionClient(service.target, token="s3cret") as fusion:
        p = fusion.predict(outputs, {"close": 50000, "rsi": 55.5}, event_id="e9")
    assert p == Prediction(prob_up=0.62, prob_down=0.38, source="fusion", reason=None,
                           attention={"TrendVIC": 0.4, "Oscillator": 0.1, "VolumeMetrix": 0.3,
                                      "ML_Classifier": 0.2}, model_version=42, event_id="e9")
    assert list(p.attention) == [e["name"] for e in EXPERTS]
    [request] = service.calls["Predict"]
    assert [f.name for f in request.experts] == [e["name"] for e in EXPERTS]
    assert not any(f.HasField("prob_down") or f.HasField("confidence") for f in request.experts)
    assert dict(request.features) == {"close": 50000.0, "rsi": 55.5} and request.event_id == "e9"
    assert service.metadata[0]["authorization"] == "Bearer s3cret"


def test_predict_keeps_the_optional_fields_it_is_given(service):
    service.behaviour["Predict"] = respond(pb.PredictResponse(
        prob_up=0.55, prob_down=0.45, source=pb.SOURCE_AVERAGE,
        reason=pb.FALLBACK_REASON_WARMING_UP))
    with FusionClient(service.target) as fusion:
        p = fusion.predict(EXPERTS)
    assert (p.source, p.reason, p.event_id) == ("average", "warming_up", None)
    experts = service.calls["Predict"][0].experts
    assert experts[0].HasField("confidence") and experts[0].confidence == 0.9
    assert experts[2].HasField("prob_down") and experts[2].prob_down == 0.4
    assert not experts[1].HasField("prob_down") and not experts[1].HasField("confidence")
    assert "authorization" not in service.metadata[0]


def test_training_stats_and_attention_weights(service):
    service.behaviour["Stats"] = respond(pb.StatsResponse(
        training=pb.TrainingStats(
            samples_trained=1152, train_steps=900, train_loss=0.6107, val_loss=0.6009,
            current_lr=0.00036, is_overfitting=False, avg_attention_entropy=1.38, ready=True,
            last_source=pb.SOURCE_FUSION, expert_names=["TrendVIC", "Oscillator"]),
        attention=[pb.ExpertWeight(name="TrendVIC", weight=0.55),
                   pb.ExpertWeight(name="Oscillator", weight=0.45)],
        service=pb.ServiceStats(predictions=10, outcomes=9, uptime_seconds=3.5),
    ))
    with FusionClient(service.target) as fusion:
        stats = fusion.get_training_stats()
        weights = fusion.get_attention_weights()
    assert {k: stats[k] for k in ("samples_trained", "train_loss", "val_loss", "current_lr",
                                  "is_overfitting", "avg_attention_entropy")} == {
        "samples_trained": 1152, "train_loss": 0.6107, "val_loss": 0.6009, "current_lr": 0.00036,
        "is_overfitting": False, "avg_attention_entropy": 1.38}
    training_fields = [f.name for f in pb.TrainingStats.DESCRIPTOR.fields]
    assert list(stats) == [*training_fields, "attention", "service", "live"]
    assert (stats["last_source"], stats["last_reason"]) == ("fusion", None)
    assert stats["expert_names"] == ["TrendVIC", "Oscillator"]
    assert set(stats["service"]) == {f.name for f in pb.ServiceStats.DESCRIPTOR.fields}
    assert stats["service"]["predictions"] == 10 and stats["service"]["uptime_seconds"] == 3.5
    assert weights == {"TrendVIC": 0.55, "Oscillator": 0.45}


def test_save_load_and_list_checkpoints(service):
    def checkpoint(request, context):
        if request.action == pb.CheckpointRequest.ACTION_LIST:
            names = ["b", "a"]
        else:
            names = [request.name or "step-900"]
        return pb.CheckpointResponse(checkpoints=[
            pb.CheckpointInfo(name=n, samples_trained=1152, train_steps=900,
                              created_at="2026-11-28T17:00:00Z", size_bytes=1024) for n in names])

    service.behaviour["Checkpoint"] = checkpoint
    with FusionClient(service.target) as fusion:
        saved = fusion.save("before-fomc")
        default = fusion.checkpoint_save()
        loaded = fusion.load("before-fomc")
        listed = fusion.checkpoint_list()
    assert saved == CheckpointInfo("before-fomc", 1152, 900, "2026-11-28T17:00:00Z", 1024)
    assert default.name == "step-900" and loaded.name == "before-fomc"
    assert [c.name for c in listed] == ["b", "a"]
    sent = [(r.action, r.name) for r in service.calls["Checkpoint"]]
    assert sent == [(pb.CheckpointRequest.ACTION_SAVE, "before-fomc"),
                    (pb.CheckpointRequest.ACTION_SAVE, ""),
                    (pb.CheckpointRequest.ACTION_RESTORE, "before-fomc"),
                    (pb.CheckpointRequest.ACTION_LIST, "")]


def test_event_id_only_outcome_uses_the_predict_inputs(service):
    service.behaviour["RecordOutcome"] = respond(pb.RecordOutcomeResponse(
        samples_trained=201, model_version=1, used_predict_inputs=True))
    with FusionClient(service.target) as fusion:
        ack = fusion.record_outcome(actual_direction="down", event_id="BTC:15m:9")
    assert ack == OutcomeAck(False, 201, 1, True, attempts=1)
    [request] = service.calls["RecordOutcome"]
    assert len(request.experts) == 0 and request.actual_direction == pb.DIRECTION_DOWN


# -- options and docs ----------------------------------------------------------------------------


def test_channel_options_and_the_keepalive_agreement():
    client_opts = dict(client_module.KEEPALIVE_OPTIONS)
    server_opts = dict(client_module.SERVER_KEEPALIVE_OPTIONS)
    assert client_opts == {"grpc.keepalive_time_ms": 30000, "grpc.keepalive_timeout_ms": 10000,
                           "grpc.keepalive_permit_without_calls": 1,
                           "grpc.http2.max_pings_without_data": 0}
    # The server must accept the client's pings, even without calls in flight.
    assert server_opts["grpc.keepalive_permit_without_calls"] == 1
    assert (server_opts["grpc.http2.min_ping_interval_without_data_ms"]
            <= client_opts["grpc.keepalive_time_ms"])
    merged = dict(client_module._merge_options(client_module.CHANNEL_OPTIONS,
                                               {"grpc.keepalive_time_ms": 60000}))
    assert merged["grpc.keepalive_time_ms"] == 60000
    assert merged["grpc.max_receive_message_length"] == 4 * 1024 * 1024


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="timeout"):
        FusionClient(timeout=0)
    with pytest.raises(ValueError, match="retries"):
        FusionClient(retries=-1)
    with pytest.raises(TypeError):
        FusionClient("localhost:50051", 1.0)  # options are keyword-only


@pytest.mark.parametrize("module", [titan_fusion.client, client_module, convert, errors],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_client_package_imports_nothing_from_the_server():
    client_dir = Path(client_module.__file__).parent
    for path in client_dir.glob("*.py"):
        text = path.read_text()
        for banned in ("titan_fusion.server", "import torch", "import numpy"):
            assert banned not in text, f"{path.name} mentions {banned}"
