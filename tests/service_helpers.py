"""Helpers for the service tests: a real in-process server on port 0 with a fast model, real
clients, real files, and small tools to look at what it did (registry samples, a scrape).

Import what you need (`from service_helpers import ...`); `service` is a pytest fixture.
"""
from __future__ import annotations

import sqlite3
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from titan_fusion.client import FusionClient
from titan_fusion.client.convert import to_expert_forecasts
from titan_fusion.client.pb import fusion_pb2 as pb
from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc
from titan_fusion.server.config import FusionConfig
from titan_fusion.server.service import FusionService, create_server
from titan_fusion.server.settings import ServiceConfig
from titan_fusion.server.synthetic import informative_stream

# Trains after 20 outcomes, small batches: a few dozen outcomes exercise the whole model.
FAST = FusionConfig(min_samples=20, warmup_steps=10, batch_size=8, val_every=5, early_stopping_patience=10_000)
SERVICE_NAME = "titan.fusion.v1.FusionService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Event = tuple[list[dict], dict, str]


def events(seed: int, n: int) -> list[Event]:
    """n deterministic (experts, features, direction) events: "good" + three noise experts."""
    return list(informative_stream(seed, n))


def config(data_dir: Path, **changes: Any) -> ServiceConfig:
    # No /metrics endpoint unless a test scrapes it (metrics_port=0): stopping its HTTP server
    # costs up to 0.5 s (socketserver's poll interval). The registry is there either way.
    values: dict[str, Any] = dict(port=0, metrics_port=-1, data_dir=str(data_dir), fusion=FAST, checkpoint_every=0)
    values.update(changes)
    return ServiceConfig(**values)


def start(data_dir: Path, *, ready: bool = True, **changes: Any) -> tuple[FusionService, int, CollectorRegistry]:
    """Start a real service on data_dir (port 0) with its own registry."""
    registry = CollectorRegistry()
    svc, port = create_server(config(data_dir, **changes), registry=registry)
    if ready:
        assert svc.wait_ready(30), f"the service did not recover: {svc.owner.failed!r}"
    return svc, port, registry


@dataclass
class Running:
    """A running service and what a test talks to it with."""

    svc: FusionService
    port: int
    registry: CollectorRegistry
    data_dir: Path
    clients: list[FusionClient] = field(default_factory=list)
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> FusionClient:
        kwargs.setdefault("timeout", 10)
        kwargs.setdefault("fallback", False)
        c = FusionClient(self.target, **kwargs)
        self.clients.append(c)
        return c

    def stub(self) -> pb_grpc.FusionServiceStub:
        """A raw stub, for requests that FusionClient refuses to send (it validates some fields)."""
        ch = grpc.insecure_channel(self.target)
        self.channels.append(ch)
        return pb_grpc.FusionServiceStub(ch)

    def health(self) -> health_pb2_grpc.HealthStub:
        ch = grpc.insecure_channel(self.target)
        self.channels.append(ch)
        return health_pb2_grpc.HealthStub(ch)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for ch in self.channels:
            ch.close()
        self.svc.stop(grace=0)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Running]:
    svc, port, registry = start(tmp_path / "data")
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        yield running
    finally:
        running.close()


def drain(client: FusionClient) -> None:
    """Wait until the model owner has done all the work queued before this call, including work
    whose caller stopped waiting (DEADLINE_EXCEEDED): a Checkpoint LIST joins the same FIFO queue,
    and the owner answers it only after that work is done and published."""
    client.checkpoint_list()


def learn(client: FusionClient, evs: list[Event], prefix: str, start_index: int = 0) -> list[Any]:
    """RecordOutcome with the full inputs for each event, event_id f"{prefix}{i}"."""
    return [client.record_outcome(e, f, actual_direction=d, event_id=f"{prefix}{start_index + i}")
            for i, (e, f, d) in enumerate(evs)]


def predictions(client: FusionClient, evs: list[Event]) -> list[tuple[float, tuple[tuple[str, float], ...], int]]:
    """(prob_up, attention, model_version) per event, for exact comparisons."""
    out = []
    for e, f, _ in evs:
        p = client.predict(e, f)
        out.append((p.prob_up, tuple(p.attention.items()), p.model_version))
    return out


def training_state(client: FusionClient) -> dict[str, Any]:
    """The Stats fields that a refused request must not change."""
    s = client.stats()
    return {k: s[k] for k in ("samples_trained", "train_steps", "train_buffer_size", "val_buffer_size")}


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    """Call a raw stub method; return the RpcError it must raise."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"{fn} did not fail")


def to_pb_experts(experts: list[dict]) -> list[pb.ExpertForecast]:
    return to_expert_forecasts(experts)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll until condition() is true; a test fails (never hangs) if it never becomes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def owner_puts(svc: FusionService) -> int:
    """Work items ever put on the model owner's queue (queue.Queue counts them: the owner never
    calls task_done). With queue_depth this tells "queued" from "taken by the owner"."""
    return svc.owner._queue.unfinished_tasks


class JournalLock:
    """Hold the journal's write lock from a second, real SQLite connection (BEGIN EXCLUSIVE), so
    that the model owner's next commit waits (sqlite's busy timeout is 5 s: release before that)."""

    def __init__(self, data_dir: Path):
        self._db = sqlite3.connect(data_dir / "journal.sqlite3", isolation_level=None, timeout=5)
        self._db.execute("BEGIN EXCLUSIVE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self._db.execute("ROLLBACK")
            self.held = False
        self._db.close()

    def __enter__(self) -> "JournalLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Call(threading.Thread):
    """Run fn() in a thread; .result or .error afterwards."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(daemon=True)
        self._fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def outcome(self, timeout: float = 20.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET http://127.0.0.1:<port>/metrics; sample name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """The value of the one sample `name` whose labels include `labels`."""
    found = [v for ls, v in samples.get(name, []) if all(ls.get(k) == val for k, val in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples in {samples.get(name)}"
    return found[0]
