"""trainer_cpus (server/cpus.py): the trainer process on its own CPU, the service's threads off it (all
but gRPC core's own)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from titan_fusion.server import cpus
from titan_fusion.server.errors import ConfigError
from titan_fusion.server.service import cpu_split
from titan_fusion.server.settings import ServiceConfig

from service_helpers import config, start

F = frozenset


@pytest.mark.parametrize("text, expected", [("3", {3}), ("6-7", {6, 7}), ("2,5", {2, 5}), ("0-2, 5", {0, 1, 2, 5}),
                                            ("4-4", {4})])
def test_cpu_lists_parse(text: str, expected: set[int]) -> None:
    assert cpus.parse_cpu_list(text) == expected


@pytest.mark.parametrize("text, message", [("x", "'x' is not a CPU number or range"), ("3-1", "runs backwards"),
                                           ("1,", "'' is not a CPU number"), ("-1", "'-1' is not"),
                                           ("1-", "'1-' is not"), ("Auto", "'Auto' is not")])
def test_a_bad_setting_is_refused_naming_it(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"service\.trainer_cpus: .*" + message):
        ServiceConfig(trainer_cpus=text)


def test_auto_gives_the_trainer_the_last_cpu_and_the_service_the_rest() -> None:
    assert cpus.split("auto", F({0, 1})) == cpus.Split(service=F({0}), trainer=F({1}))
    assert cpus.split("auto", F({0, 2, 7})) == cpus.Split(service=F({0, 2}), trainer=F({7}))
    assert cpus.split("auto", F({5})) is None  # one CPU: nothing to split
    assert cpus.split("off", F({0, 1})) is None
    assert cpus.split("auto", None) is None  # no CPU affinity on this platform


def test_an_explicit_list_is_honoured_or_refused() -> None:
    assert cpus.split("2-3", F(range(4))) == cpus.Split(service=F({0, 1}), trainer=F({2, 3}))
    with pytest.raises(ValueError, match=r"CPUs 3,9 are not available to the service \(it may use 0,1,2\)"):
        cpus.split("3,9", F({0, 1, 2}))
    with pytest.raises(ValueError, match=r"would leave the service no CPU \(it may use 0,1\)"):
        cpus.split("0-1", F({0, 1}))


def test_a_thread_trainer_pins_nothing(tmp_path: Path) -> None:
    assert cpu_split(config(tmp_path, trainer="thread", trainer_cpus="0")) is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two CPUs")
def test_the_trainer_has_its_cpu_at_idle_priority_the_service_keeps_off_it_and_gives_cpus_back(
        tmp_path: Path) -> None:
    mine = F(os.sched_getaffinity(0))
    before = cpus.affinities()
    svc, port, _ = start(tmp_path, trainer_cpus="auto")
    try:
        assert svc.cpu_split == cpus.Split(service=mine - {max(mine)}, trainer=F({max(mine)}))
        pid = svc.owner.trainer.pid
        status = Path(f"/proc/{pid}/status").read_text()
        assert status.split("Cpus_allowed_list:")[1].split()[0] == str(max(mine))
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE  # server/trainer.py lower_priority
        # every thread of the service's process, those started by the service included, keeps off
        # the trainer's CPU, except gRPC core's own threads (recognised by name), which may use all
        during = cpus.affinities()
        assert set(during) - set(before), "the service started threads"
        grpc_threads = {tid for tid in during if cpus.thread_name(tid).startswith(cpus.GRPC_THREADS)}
        # a gRPC release that renames its threads fails here (the placement would silently stop)
        assert "event_engine" in {cpus.thread_name(tid) for tid in grpc_threads}, during
        assert {during[tid] for tid in grpc_threads} == {mine}, during
        assert {during[tid] for tid in set(during) - grpc_threads} == {mine - {max(mine)}}, during
        assert {t.native_id for t in threading.enumerate()}.isdisjoint(grpc_threads)
        # and it serves: a thread started now inherits the service's CPUs
        seen: list[frozenset[int]] = []
        t = threading.Thread(target=lambda: seen.append(F(os.sched_getaffinity(0))))
        t.start()
        t.join()
        assert seen == [mine - {max(mine)}]
    finally:
        svc.stop()
    after = cpus.affinities()
    assert all(after[tid] == cpus_before for tid, cpus_before in before.items() if tid in after), (before, after)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs CPU affinity")
def test_cpus_the_machine_lacks_are_a_config_error_that_leaves_the_data_dir_free(tmp_path: Path) -> None:
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match=rf"service\.trainer_cpus: CPUs {missing} are not available to the service"):
        start(tmp_path, trainer_cpus=str(missing))
    svc, _, _ = start(tmp_path, trainer_cpus="off", trainer="thread")  # the data dir lock was released
    try:
        assert svc.cpu_split is None
        assert svc.owner.trainer.samples_trained == 0
    finally:
        svc.stop()
