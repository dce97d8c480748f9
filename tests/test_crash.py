"""No acknowledged outcome is lost, and crash recovery is bit-identical to no crash.

A client streams outcomes with event_ids, retrying each until it is acknowledged. Meanwhile the
real `titan-fusion serve` process is killed with SIGKILL at random moments (mid-commit, mid-step,
mid-checkpoint: wherever it happens to be) and restarted on the same data directory. At the end the
service must have learned every distinct event exactly once, and its weights and predictions must
equal, bit for bit, those of a service that was never killed and of the in-process class fed the
same events.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from titan_fusion.client import FusionClient, TransportError
from titan_fusion.server.config import FusionConfig
from titan_fusion.server.fusion import TransformerFusion
from titan_fusion.server.synthetic import informative_stream

N_EVENTS = 600
KILLS = 4
# Small enough to train from the 40th outcome, with early stopping firing and resuming on the way,
# and automatic checkpoints every 97 outcomes: recovery crosses all of that state.
MODEL = {"min_samples": 40, "warmup_steps": 20, "batch_size": 16, "val_every": 5,
         "early_stopping_patience": 4, "early_stopping_resume": 5}
EVENTS = list(informative_stream(5, N_EVENTS))
PROBES = list(informative_stream(99, 20))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`titan-fusion serve` in a subprocess on a fixed port and data directory."""

    def __init__(self, data_dir: Path, port: int):
        self.data_dir, self.port = data_dir, port
        self.ready_file = data_dir.parent / f"ready-{port}.json"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        flags = [a for k, v in MODEL.items() for a in (f"--fusion.{k}", str(v))]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "titan_fusion.server.cli", "serve", "--port", str(self.port),
             "--metrics-port", "-1", "--data-dir", str(self.data_dir), "--ready-file", str(self.ready_file),
             "--checkpoint-every", "97", "--log-level", "WARNING", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.02)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def _stream(target: str, stop_after: float = 120.0) -> None:
    """Send every event, retrying each one until the service acknowledges it."""
    deadline = time.monotonic() + stop_after
    with FusionClient(target, timeout=2.0, retries=0) as client:
        for i, (experts, features, direction) in enumerate(EVENTS):
            while True:
                assert time.monotonic() < deadline, f"event {i} never acknowledged"
                try:
                    client.record_outcome(experts, features, actual_direction=direction, event_id=f"crash:{i}")
                    break
                except TransportError:
                    time.sleep(0.02)


def _final_state(server: Server) -> tuple[dict, list[float], TransformerFusion]:
    """Stats, probe predictions, and the model as the service holds it (through a checkpoint)."""
    with FusionClient(f"127.0.0.1:{server.port}", timeout=10) as client:
        stats = client.stats()
        probes = [client.predict(e, f).prob_up for e, f, _ in PROBES]
        client.checkpoint_save("final")
    model = TransformerFusion(FusionConfig.from_mapping(MODEL), n_models=4)
    model.load(server.data_dir / "checkpoints" / "final")
    return stats, probes, model


def _assert_same_model(a: TransformerFusion, b: TransformerFusion) -> None:
    for (name, x), (_, y) in zip(a._net.state_dict().items(), b._net.state_dict().items()):
        assert torch.equal(x, y), f"weights differ at {name}"
    sa, sb = a._opt.state_dict()["state"], b._opt.state_dict()["state"]
    assert all(torch.equal(sa[k][m], sb[k][m]) for k in sa for m in sa[k])


def test_sigkill_at_random_points_loses_nothing_and_recovers_bit_identically(tmp_path):
    # The service that is killed.
    victim = Server(tmp_path / "victim", _free_port())
    victim.start()
    kills = []
    streaming = threading.Event()
    streaming.set()

    def killer():
        rng = random.Random(2026)
        while len(kills) < KILLS and streaming.is_set():
            time.sleep(rng.uniform(0.2, 0.7))
            if not streaming.is_set():
                break
            victim.kill()
            kills.append(time.monotonic())
            victim.start()

    k = threading.Thread(target=killer)
    k.start()
    try:
        _stream(f"127.0.0.1:{victim.port}")
    finally:
        streaming.clear()
        k.join()
    assert len(kills) >= 3, f"only {len(kills)} kills happened during the stream"
    stats, probes, model = _final_state(victim)
    assert victim.stop() == 0
    assert stats["samples_trained"] == N_EVENTS  # every distinct event, exactly once

    # A service that was never killed, given the same events.
    calm = Server(tmp_path / "calm", _free_port())
    calm.start()
    _stream(f"127.0.0.1:{calm.port}")
    calm_stats, calm_probes, calm_model = _final_state(calm)
    assert calm.stop() == 0

    # And the in-process class, fed the same events in the same order.
    ref = TransformerFusion(FusionConfig.from_mapping(MODEL), n_models=4)
    for experts, features, direction in EVENTS:
        ref.update(experts, features, direction)

    assert calm_stats["samples_trained"] == N_EVENTS
    assert stats["train_steps"] == calm_stats["train_steps"] == ref.version
    assert stats["early_stops"] >= 1  # early stopping's state crossed the crashes too
    _assert_same_model(model, calm_model)
    _assert_same_model(model, ref)
    assert probes == calm_probes == [ref.forward(e, f)[0] for e, f, _ in PROBES]
