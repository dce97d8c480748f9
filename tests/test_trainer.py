"""Training in a child process (server/trainer.py): the same model as in-process, bit for bit; a
killed trainer is restarted and rebuilt from the checkpoint and the journal; the child ends with
the service; trainer = "thread" keeps the model in the owner's thread."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service_helpers import FAST, Running, events, learn, owner_puts, predictions, start, wait_until
from titan_fusion.server import owner as owner_module
from titan_fusion.server.errors import CheckpointError, TrainerDiedError
from titan_fusion.server.fusion import TransformerFusion
from titan_fusion.server.inference import Event
from titan_fusion.server.trainer import LocalTrainer, TrainerProcess

PROBES = events(99, 6)


def _items(seed: int, n: int) -> list[tuple[Event, int]]:
    return [(Event.parse(e, f), 1 if d == "UP" else 0) for e, f, d in events(seed, n)]


def _probe(snapshot) -> np.ndarray:
    preds = snapshot.predict([Event.parse(e, f) for e, f, _ in PROBES])
    return np.array([[p.prob_up, *p.attention] for p in preds])


def _probe_one_at_a_time(snapshot) -> list[float]:
    """prob_up for each of PROBES predicted alone, as a service answers Predicts one at a time."""
    return [snapshot.predict([Event.parse(e, f)])[0].prob_up for e, f, _ in PROBES]


def _uninterrupted(evs) -> object:
    """The snapshot of the in-process class after learning `evs` in order, uninterrupted."""
    reference = TransformerFusion(FAST, n_models=4)
    for e, f, d in evs:
        reference.update(e, f, d)
    return reference.snapshot()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_the_trainer_process_trains_the_same_model_as_in_process(tmp_path: Path) -> None:
    items = _items(1, 120)
    local = LocalTrainer(TransformerFusion(FAST, n_models=4))
    remote = TrainerProcess(FAST, 4)
    try:
        assert remote.pid != os.getpid() and _alive(remote.pid)
        # in uneven chunks, one with a time slice: chunking never changes what is learned
        for lo, hi in ((0, 7), (7, 64), (64, 120)):
            a = local.learn(items[lo:hi])
            b = remote.learn(items[lo:hi])
            assert [(e, n, v) for e, n, v in a] == [(e, n, v) for e, n, v in b]
        assert remote.samples_trained == local.samples_trained == 120
        assert remote.version == local.version > 0
        assert np.array_equal(_probe(remote.snapshot()), _probe(local.snapshot()))  # bit for bit
        for key in ("train_loss", "val_loss", "train_steps", "last_grad_norm", "feature_names"):
            assert remote.stats()[key] == local.stats()[key] or (
                np.isnan(remote.stats()[key]) and np.isnan(local.stats()[key])), key
        # a checkpoint written by the child loads in-process, and the other way round
        remote.save(tmp_path / "from-child", {"note": 1})
        again = TransformerFusion(FAST, n_models=4)
        assert again.load(tmp_path / "from-child") == {"note": 1}
        assert np.array_equal(_probe(again.snapshot()), _probe(local.snapshot()))
        local.learn(items[:10])
        local.save(tmp_path / "from-thread")
        assert remote.load(tmp_path / "from-thread") == {}
        assert np.array_equal(_probe(remote.snapshot()), _probe(local.snapshot()))
        # errors cross the pipe with their type; the model is unchanged
        with pytest.raises(CheckpointError):
            remote.load(tmp_path / "missing")
        assert np.array_equal(_probe(remote.snapshot()), _probe(local.snapshot()))
        bad = remote.learn([(items[0][0], 7)])  # an invalid label: that outcome fails, nothing else
        assert isinstance(bad[0][0], ValueError) and "actual_direction" in str(bad[0][0])
    finally:
        remote.close()
    assert not _alive(remote.pid)


def test_a_time_slice_learns_a_prefix_and_at_least_one(tmp_path: Path) -> None:
    remote = TrainerProcess(FAST, 4)
    try:
        items = _items(2, 60)
        first = remote.learn(items, 0.0)  # the slice is over after the first outcome
        assert len(first) == 1 and first[0][1] == 1
        rest = remote.learn(items[1:], None)
        assert len(rest) == 59 and rest[-1][1] == 60
    finally:
        remote.close()


def test_a_dead_trainer_raises_trainer_died(tmp_path: Path) -> None:
    remote = TrainerProcess(FAST, 4)
    os.kill(remote.pid, signal.SIGKILL)
    with pytest.raises(TrainerDiedError):
        remote.learn(_items(3, 1))
    remote.close()


def test_the_service_trains_in_a_child_that_ends_with_it(tmp_path: Path) -> None:
    svc, port, registry = start(tmp_path / "data")
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        trainer = svc.owner.trainer
        assert isinstance(trainer, TrainerProcess) and trainer.pid != os.getpid() and _alive(trainer.pid)
        c = running.client()
        acks = learn(c, events(4, 30), "e")
        assert [a.samples_trained for a in acks] == list(range(1, 31))
    finally:
        running.close()
    wait_until(lambda: not _alive(trainer.pid), 10, "the trainer process to exit with the service")


def test_a_killed_trainer_is_restarted_and_the_model_is_the_same(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the trainer process mid-stream: the next outcome is still learned (by a new trainer
    rebuilt from the newest checkpoint and the journal), the model ends bit-identical to one
    that learned the same outcomes without interruption, and the attention statistics of what was
    served are kept, a Predict served while the new trainer is rebuilt included."""
    from titan_fusion.server.owner import ModelOwner

    evs = events(5, 150)
    svc, port, registry = start(tmp_path / "data", checkpoint_every=40)
    running = Running(svc, port, registry, tmp_path / "data")
    during = []
    rebuild = ModelOwner._rebuild

    def rebuild_beside_a_predict(self, upto, *, score, seconds=None):
        if not score:  # a trainer restart's rebuild: a Predict is served meanwhile
            during.extend(predictions(running.client(), PROBES[:1]))
        return rebuild(self, upto, score=score, seconds=seconds)
    monkeypatch.setattr(ModelOwner, "_rebuild", rebuild_beside_a_predict)
    try:
        c = running.client()
        learn(c, evs[:90], "k")
        predictions(c, PROBES)  # after the checkpoint at 80: their attention is not in it
        served = svc.owner.trainer.serving_stats.state()
        assert len(served["attention"]) == len(PROBES)
        first = svc.owner.trainer.pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not _alive(first), 10, "the trainer to die")
        acks = learn(c, evs[90:], "k", start_index=90)
        assert [a.samples_trained for a in acks] == list(range(91, 151))
        after = svc.owner.trainer.serving_stats.state()  # the attention served survives the restart
        assert len(during) == 1 and after["attention"][:-1] == served["attention"] and len(after["attention"]) == 7
        assert svc.owner.trainer_restarts == 1 and svc.owner.trainer.pid != first
        assert running.sample("fusion_trainer_restarts_total") == 1
        served = predictions(c, PROBES)
    finally:
        running.close()
    assert [p[0] for p in served] == _probe_one_at_a_time(_uninterrupted(evs))


def test_trainer_thread_keeps_the_model_in_the_owner_thread(tmp_path: Path) -> None:
    evs = events(6, 60)
    out = {}
    for mode in ("thread", "process"):
        svc, port, registry = start(tmp_path / mode, trainer=mode)
        running = Running(svc, port, registry, tmp_path / mode)
        try:
            assert isinstance(svc.owner.trainer, LocalTrainer if mode == "thread" else TrainerProcess)
            c = running.client()
            learn(c, evs, "t")
            out[mode] = (predictions(c, PROBES), c.stats()["samples_trained"])
        finally:
            running.close()
    assert out["thread"] == out["process"]
    assert out["thread"][1] == 60


def test_a_script_without_a_main_guard_can_start_a_trainer(tmp_path: Path) -> None:
    """multiprocessing would re-run the caller's unguarded script in the child (and refuse to start
    a process from there); the trainer never imports the caller's __main__."""
    import subprocess
    import sys
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from titan_fusion.server.config import FusionConfig\n"
        "from titan_fusion.server.inference import Event\n"
        "from titan_fusion.server.trainer import TrainerProcess\n"
        "print('top level ran', flush=True)\n"
        "t = TrainerProcess(FusionConfig(min_samples=1), 2)\n"
        "print(t.learn([(Event.parse([{'prob_up': 0.6}, {'prob_up': 0.7}], {'x': 1.0}), 1)])[0][1:], flush=True)\n"
        "t.close()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["top level ran", "(1, 1)"]


def test_the_service_process_never_imports_torch(tmp_path: Path) -> None:
    """With the trainer in its child process (the default), the service process predicts with
    numpy and leaves torch to the child: Predict, RecordOutcome, a bulk replay, Stats and
    checkpoints save, list and restore, all without importing it (torch cost the service process
    about 1.4 s to start and 180 MiB resident). The trainer, for its part, never loads numba."""
    import subprocess
    import sys
    script = tmp_path / "service.py"
    script.write_text(f"""
import sys
from prometheus_client import CollectorRegistry
from titan_fusion.client import FusionClient
from titan_fusion.server.config import FusionConfig
from titan_fusion.server.service import create_server
from titan_fusion.server.settings import ServiceConfig
from titan_fusion.server.synthetic import informative_stream
svc, port = create_server(ServiceConfig(port=0, metrics_port=-1, data_dir={str(tmp_path / "data")!r},
                                        fusion=FusionConfig(min_samples=20)), registry=CollectorRegistry())
assert svc.wait_ready(60)
kernel = sys.modules.get("titan_fusion.server.onekernel")
warm_at_start = kernel is not None and kernel._warm and len(kernel.forward.signatures) == 1  # before any outcome
c = FusionClient(f"127.0.0.1:{{port}}", timeout=30, fallback=False)
events = list(informative_stream(7, 90))
for i, (e, f, d) in enumerate(events[:60]):
    c.predict(e, f, event_id=f"e{{i}}")
    c.record_outcome(actual_direction=d, event_id=f"e{{i}}")
c.record_outcomes([dict(experts=e, features=f, actual_direction=d, event_id=f"b{{i}}") for i, (e, f, d) in enumerate(events[60:])])
saved = c.checkpoint_save("kept")
assert saved.samples_trained == 90 and [i.name for i in c.checkpoint_list()].count("kept") == 1
c.record_outcome(events[0][0], events[0][1], actual_direction=events[0][2], event_id="after")
c.checkpoint_restore("kept")
trainer_maps = open(f"/proc/{{svc.owner.trainer.pid}}/maps").read()
from titan_fusion.server import onekernel
print(c.predict(*events[0][:2]).source, c.stats()["samples_trained"], "torch" in sys.modules,
      "numba" in sys.modules, "llvmlite" in trainer_maps or "numba" in trainer_maps,
      len(onekernel.forward.signatures), warm_at_start, flush=True)
c.close()
svc.stop(grace=1)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    # and the compiled forward (numba, ~140 MiB) is the service process's alone: the trainer folds
    # the snapshots it sends with numpy; the snapshots it sends run the signature compiled at start,
    # which happened before SERVING, with no model ready yet
    assert out.stdout.split() == ["fusion", "90", "False", "True", "False", "1", "True"]


def _dying_trainers(monkeypatch: pytest.MonkeyPatch, dies) -> list[LocalTrainer]:
    """The service's trainers from now on: in-process ones whose learn() raises TrainerDiedError
    (as a dead trainer process's would) when `dies(nth, trainer)` says so, nth counting the
    trainers made from 0. Returns the trainers made, in order."""
    from titan_fusion.server import service as service_module
    made: list[LocalTrainer] = []

    class Dying(LocalTrainer):
        def learn(self, items, slice_seconds=None, *, snapshot=True, interruptible=False):
            nth = made.index(self)
            if items and dies(nth, self):
                raise TrainerDiedError(f"test: trainer {nth} died")
            return super().learn(items, slice_seconds, snapshot=snapshot, interruptible=interruptible)

    def new(config, split=None):
        made.append(Dying(TransformerFusion(config.fusion, n_models=config.n_models)))
        return made[-1]
    monkeypatch.setattr(service_module, "new_trainer", new)
    return made


def test_a_trainer_that_keeps_dying_stops_the_owner_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarts are bounded: when the same outcome kills every new trainer, the owner gives up,
    the waiting caller gets UNAVAILABLE, health turns NOT_SERVING, and stop() does not hang."""
    from grpc_health.v1 import health_pb2

    from service_helpers import NOT_SERVING, SERVICE_NAME
    from titan_fusion.client.errors import UnavailableError
    _dying_trainers(monkeypatch, lambda nth, t: t.fusion.samples_trained >= 25)  # that outcome kills every one
    svc, port, registry = start(tmp_path / "data")
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        c = running.client(retries=0)  # (a retry would only meet the failed owner again)
        evs = events(7, 27)
        learn(c, evs[:25], "d")
        with pytest.raises(UnavailableError, match="died 4 times"):
            c.record_outcome(*evs[25][:2], actual_direction=evs[25][2], event_id="d25")
        assert svc.owner.failed is not None and svc.owner.trainer_restarts == 3
        assert running.sample("fusion_trainer_restarts_total") == 3
        status = running.health().Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status
        assert status == NOT_SERVING
        with pytest.raises(UnavailableError, match="model owner failed"):
            c.record_outcome(*evs[26][:2], actual_direction=evs[26][2], event_id="d26")
        with pytest.raises(UnavailableError, match="model owner failed"):
            c.predict(*evs[26][:2])
    finally:
        t0 = time.monotonic()
        running.close()
        assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_an_interrupt_ends_a_sliced_learn_after_its_current_outcome_until_cleared(kind: str) -> None:
    """The owner's catch-up slices are long (0.5 s); work submitted meanwhile interrupts them."""
    import threading
    trainer = TrainerProcess(FAST, 4) if kind == "process" else LocalTrainer(TransformerFusion(FAST, n_models=4))
    try:
        items = _items(5, 3000)
        threading.Timer(0.2, trainer.interrupt).start()
        t0 = time.monotonic()
        first = trainer.learn(items, slice_seconds=60.0, interruptible=True)
        assert 0 < len(first) < len(items) and time.monotonic() - t0 < 10
        assert trainer.interrupted
        n = len(first)
        assert len(trainer.learn(items[n:], slice_seconds=60.0, interruptible=True)) == 1  # still interrupted
        assert len(trainer.learn(items[n + 1:n + 50], slice_seconds=None, interruptible=True)) == 49  # unsliced: all
        assert len(trainer.learn(items[n + 50:n + 60], slice_seconds=60.0)) == 10  # not interruptible: all
        assert trainer.interrupted  # and the flag stays for the owner's next catch-up slice
        trainer.clear_interrupt()
        assert not trainer.interrupted
        assert len(trainer.learn(items[n + 60:n + 70], slice_seconds=60.0, interruptible=True)) == 10
        assert trainer.samples_trained == n + 70
    finally:
        trainer.close()


def test_a_new_trainer_that_dies_while_rebuilding_is_replaced_too(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer dies; its replacement dies while it rebuilds the model (replaying the journal:
    an OOM kill, say). That is one more death in a row, not the owner's end: a third trainer
    rebuilds the model, the outcome that was waiting is learned, and the service keeps serving."""
    from grpc_health.v1 import health_pb2

    from service_helpers import SERVICE_NAME, SERVING
    made = _dying_trainers(monkeypatch, lambda nth, t: nth == 0 and t.fusion.samples_trained >= 25 or nth == 1)
    svc, port, registry = start(tmp_path / "data")
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        c = running.client()
        evs = events(7, 27)
        learn(c, evs[:25], "d")
        acks = learn(c, evs[25:], "d", start_index=25)  # trainer 0 dies, then trainer 1 while rebuilding
        assert [a.samples_trained for a in acks] == [26, 27]
        assert len(made) == 3 and svc.owner.failed is None
        assert svc.owner.trainer_restarts == 2 and running.sample("fusion_trainer_restarts_total") == 2
        assert running.health().Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == SERVING
    finally:
        running.close()
    assert np.array_equal(_probe(made[2].snapshot()), _probe(_uninterrupted(evs)))  # the rebuilt model


def test_a_failing_owner_answers_the_rest_of_its_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the owner fails partway through a batch of work (here: committing an outcome raises,
    as a bug or a journal read would), the work after it in that batch is answered with the
    failure, not left waiting: a caller without a deadline would wait for ever."""
    import threading

    from titan_fusion.server.owner import ModelOwner
    gate, inside = threading.Event(), threading.Event()
    one = ModelOwner._one

    def held_list(self, w):  # the first listing holds the owner while more work queues behind it
        if w.kind == "list" and not gate.is_set():
            inside.set()
            gate.wait(10)
        return one(self, w)

    def broken_commit(self, batch):
        raise RuntimeError("test: the journal broke")
    monkeypatch.setattr(ModelOwner, "_one", held_list)
    monkeypatch.setattr(ModelOwner, "_commit_outcomes", broken_commit)
    svc, port, registry = start(tmp_path / "data")
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        owner = svc.owner
        first = owner.submit("list", None)
        assert inside.wait(10)
        outcome = owner.submit("outcome", None)  # one batch: this outcome, then a listing
        after = owner.submit("list", None)
        gate.set()
        assert first.result(10) == []
        with pytest.raises(RuntimeError, match="journal broke"):
            outcome.result(10)
        with pytest.raises(RuntimeError, match="journal broke"):
            after.result(10)
        assert owner.failed is not None
    finally:
        running.close()


def _with_a_stopped_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, learned: list[Event], prefix: str,
                            timeout: float) -> tuple[Any, Running, Any, int]:
    """A service that learned `learned` (event_ids prefix + index), then its trainer stopped
    (SIGSTOP), the watchdog set to `timeout` s: (the service, Running, a client, the stopped pid)."""
    from titan_fusion.server import trainer as trainer_module
    svc, port, registry = start(tmp_path / "data")
    running = Running(svc, port, registry, tmp_path / "data")
    try:
        c = running.client(timeout=60)
        learn(c, learned, prefix)
        monkeypatch.setattr(trainer_module, "CALL_TIMEOUT_SECONDS", timeout)
        first = svc.owner.trainer.pid
        os.kill(first, signal.SIGSTOP)
    except BaseException:
        running.close()
        raise
    return svc, running, c, first


def test_a_stopped_trainer_is_killed_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A trainer that answers nothing (here: SIGSTOP) is killed after CALL_TIMEOUT_SECONDS and
    replaced; the outcomes that were waiting are learned, and the model is the uninterrupted one.
    (A short timeout could also catch a replacement that a busy host starves; a second restart
    changes nothing of what is checked.)"""
    evs = events(8, 30)
    svc, running, c, first = _with_a_stopped_trainer(tmp_path, monkeypatch, evs[:25], "s", 3.0)
    try:
        acks = learn(c, evs[25:], "s", start_index=25)
        assert [a.samples_trained for a in acks] == list(range(26, 31))
        assert svc.owner.trainer_restarts >= 1 and svc.owner.trainer.pid != first
        assert "the trainer process answered nothing for 3 s (stopped or wedged); killed" in caplog.text
        wait_until(lambda: not _alive(first), 10, "the stopped trainer to be killed")
        served = predictions(c, PROBES)
    finally:
        running.close()
    assert [p[0] for p in served] == _probe_one_at_a_time(_uninterrupted(evs))


def test_the_queue_depth_gauge_is_live_while_the_owner_is_stuck(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fusion_queue_depth{queue="owner"} reads the queue at each scrape: with the trainer stopped
    (the owner waits on it), the outcomes queued behind show, as Stats' queue_depth does. It was
    set only when the owner published, so it read 0 exactly when FusionQueueBacklog mattered."""
    import threading

    evs = events(9, 25)
    # the watchdog far away: the trainer is let go (SIGCONT) once the gauge was seen, so that
    # nothing races the senders' arrival on a slow host
    svc, running, c, stopped = _with_a_stopped_trainer(tmp_path, monkeypatch, evs[:20], "q", 120.0)
    try:
        assert running.sample("fusion_queue_depth", {"queue": "owner"}) == 0  # nothing queued yet
        senders = [threading.Thread(target=learn, args=(running.client(timeout=60), [ev], "q", 20 + i))
                   for i, ev in enumerate(evs[20:])]
        # the first one alone, until the owner took it (and waits on the stopped trainer): senders
        # arriving together would be drained in one batch and never show as queued
        puts = owner_puts(svc)
        senders[0].start()
        wait_until(lambda: owner_puts(svc) > puts and svc.owner.queue_depth == 0, 30, "the owner to take the first")
        for t in senders[1:]:
            t.start()
        wait_until(lambda: running.sample("fusion_queue_depth", {"queue": "owner"}) >= 3, 30,
                   "the gauge to show the outcomes queued behind the stuck one")
        assert c.stats()["service"]["queue_depth"] >= 3
        os.kill(stopped, signal.SIGCONT)
        for t in senders:
            t.join(30)
        assert running.sample("fusion_queue_depth", {"queue": "owner"}) == 0
        assert c.stats()["samples_trained"] == 25
        assert svc.owner.trainer.pid == stopped  # the same trainer went on: no watchdog restart
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
        running.close()


@pytest.mark.parametrize("deaths", [1, 4])
def test_a_trainer_that_dies_during_recovery_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        deaths: int) -> None:
    """A trainer killed while the journal is replayed at start (an OOM kill, say) is replaced and
    the recovery starts over: the service serves the model it had, and counts the restart. Deaths
    in a row are bounded as while serving: the fourth stops the owner loudly (NOT_SERVING), with
    what killed them."""
    import shutil
    data = tmp_path / "data"
    svc, port, registry = start(data)
    running = Running(svc, port, registry, data)
    try:
        c = running.client()
        learn(c, events(7, 30), "r")
        before = predictions(c, events(8, 3))
    finally:
        running.close()
    shutil.rmtree(data / "checkpoints")  # the stop's checkpoint: the model comes from the journal alone
    monkeypatch.setattr(owner_module, "STARTUP_LEARN_SECONDS", 600.0)  # the whole journal before SERVING, however slow
    made = _dying_trainers(monkeypatch, lambda nth, t: nth < deaths)  # the first `deaths` trainers die at once
    svc, port, registry = start(data, ready=False)
    running = Running(svc, port, registry, data)
    try:
        if deaths <= 3:
            assert svc.wait_ready(30), f"the service did not recover: {svc.owner.failed!r}"
            assert len(made) == deaths + 1 and svc.owner.trainer is made[-1]
            assert svc.owner.trainer_restarts == deaths and running.sample("fusion_trainer_restarts_total") == deaths
            c = running.client()
            assert c.stats()["samples_trained"] == 30
            assert predictions(c, events(8, 3)) == before  # the same model, bit for bit
        else:
            wait_until(lambda: svc.owner.failed is not None, 30, "the owner to give up")
            assert "died 4 times while the model was recovered" in str(svc.owner.failed)
            assert len(made) == 4 and not svc.owner.ready.is_set()
    finally:
        running.close()


def test_a_recovery_started_over_scores_each_outcome_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer dies after the first chunk of the journal's replay, with no checkpoint to start
    from: the recovery starts over, and live scoring ends as it was before the restart, each
    outcome scored once (not the first chunk's twice)."""
    import shutil

    from titan_fusion.server.owner import CATCH_UP_CHUNK
    data = tmp_path / "data"
    n = CATCH_UP_CHUNK + 40
    svc, port, registry = start(data)
    running = Running(svc, port, registry, data)
    try:
        c = running.client()
        for i, (e, f, d) in enumerate(events(9, n)):
            c.predict(e, f, event_id=f"s{i}")  # scored: its outcome's Predict served it
            c.record_outcome(actual_direction=d, event_id=f"s{i}")
        live = c.stats()["live"]
        assert live["served"]["outcomes"] > CATCH_UP_CHUNK // 2
    finally:
        running.close()
    shutil.rmtree(data / "checkpoints")  # recovery replays the whole journal, scoring it
    monkeypatch.setattr(owner_module, "STARTUP_LEARN_SECONDS", 600.0)  # the whole journal before SERVING, however slow
    made = _dying_trainers(monkeypatch, lambda nth, t: nth == 0 and t.fusion.samples_trained >= CATCH_UP_CHUNK)
    svc, port, registry = start(data)
    running = Running(svc, port, registry, data)
    try:
        assert len(made) == 2 and svc.owner.trainer_restarts == 1
        assert running.client().stats()["live"] == live
    finally:
        running.close()
