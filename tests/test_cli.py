"""The `titan-fusion` command, run for real in subprocesses: serve, health, stats, demo, signals,
and configuration errors refused at start-up."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from service_helpers import events, learn, one, scrape, wait_until
from titan_fusion.client import FusionClient

SCRIPT = Path(sys.executable).parent / "titan-fusion"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "titan_fusion.server.cli"]
FAST_FLAGS = ["--fusion.min_samples", "20", "--fusion.warmup_steps", "10", "--fusion.batch_size", "8",
              "--fusion.val_every", "5"]
FLAGS = ["--port", "--metrics-port", "--data-dir", "--config", "--fusion.hidden_dim"]


def clean_env() -> dict[str, str]:
    """The environment without any TITAN_FUSION_* setting of the caller's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TITAN_FUSION_")}


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env())


class Server:
    """A `titan-fusion serve` process on ports 0, its ready file read."""

    def __init__(self, tmp: Path, *extra: str):
        self.data_dir = tmp / "data"
        self.ready_file = tmp / "ready.json"
        self.log = tmp / "serve.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [*COMMAND, "serve", "--port", "0", "--metrics-port", "0", "--data-dir", str(self.data_dir),
                 "--ready-file", str(self.ready_file), "--grace-seconds", "2", *FAST_FLAGS, *extra],
                stdout=log, stderr=subprocess.STDOUT, env=clean_env())
        wait_until(lambda: self.ready_file.exists() or self.proc.poll() is not None, timeout=60,
                   what="the ready file")
        assert self.proc.poll() is None, self.log.read_text()
        ready = json.loads(self.ready_file.read_text())
        assert set(ready) == {"port", "metrics_port", "pid"} and ready["pid"] == self.proc.pid
        self.port, self.metrics_port = ready["port"], ready["metrics_port"]
        assert self.port > 0 and self.metrics_port > 0 and self.port != self.metrics_port
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("cli"))
    try:
        yield s
    finally:
        s.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------

def test_help_lists_the_commands() -> None:
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for command in ("serve", "health", "stats", "demo"):
        assert command in r.stdout


def test_serve_help_names_every_setting_flag() -> None:
    r = run("serve", "--help")
    assert r.returncode == 0, r.stderr
    for flag in FLAGS + ["--ready-file", "--fusion.num_heads", "--queue-size", "--max-message-bytes"]:
        assert flag in r.stdout, flag
    assert "TITAN_FUSION_PORT" in r.stdout and "TITAN_FUSION_FUSION_HIDDEN_DIM" in r.stdout


@pytest.mark.parametrize("command", ["health", "stats", "demo"])
def test_client_commands_help(command: str) -> None:
    r = run(command, "--help")
    assert r.returncode == 0 and "--target" in r.stdout and "--timeout" in r.stdout


def test_health_prints_serving(server: Server) -> None:
    r = run("health", "--target", server.target)
    assert (r.returncode, r.stdout.strip()) == (0, f"{server.target}: SERVING"), r.stderr
    r = run("health", "--target", server.target, "--service", "titan.fusion.v1.FusionService")
    assert r.returncode == 0 and "SERVING" in r.stdout
    r = run("health", "--target", server.target, "--service", "no.such.Service")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_the_served_process_freezes_its_start_up_objects_out_of_the_collectors_passes(server: Server) -> None:
    # server/trainer.py freeze_start_up: a full collection then walks only objects made since start
    wait_until(lambda: "start-up objects frozen" in server.log.read_text(), timeout=10, what="the freeze")
    frozen = re.search(r"(\d+) start-up objects frozen", server.log.read_text())
    assert frozen and int(frozen.group(1)) > 10_000, server.log.read_text()


def test_events_through_the_served_service_show_in_stats_and_metrics(server: Server) -> None:
    with FusionClient(server.target, timeout=10, fallback=False) as c:
        before = c.stats()["samples_trained"]
        acks = learn(c, events(31, 25), "cli-")
        assert [a.samples_trained for a in acks] == list(range(before + 1, before + 26))
    r = run("stats", "--target", server.target)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))  # no NaN/Infinity
    assert stats["samples_trained"] == before + 25 and stats["service"]["outcomes"] >= 25
    assert stats["expert_names"] == ["good", "noise0", "noise1", "noise2"]
    m = scrape(server.metrics_port)
    assert one(m, "fusion_samples_trained") == before + 25


def test_demo_streams_events_and_reports_accuracy(server: Server) -> None:
    with FusionClient(server.target, timeout=10) as c:
        before = c.stats()["samples_trained"]
    r = run("demo", "--target", server.target, "--events", "300", "--seed", "3", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "accuracy served" in r.stdout and "plain average" in r.stdout and "by the fusion" in r.stdout
    with FusionClient(server.target, timeout=10) as c:
        assert c.stats()["samples_trained"] == before + 300


def test_a_second_server_on_the_same_data_directory_is_refused(server: Server) -> None:
    r = run("serve", "--port", "0", "--metrics-port", "-1", "--data-dir", str(server.data_dir), timeout=60)
    assert r.returncode == 1
    assert "another titan-fusion service is using the data directory" in r.stderr
    assert "Traceback" not in r.stderr
    assert run("health", "--target", server.target).returncode == 0  # the first one is unharmed


def test_a_data_directory_that_cannot_be_one_is_named_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    r = run("serve", "--port", "0", "--metrics-port", "-1", "--data-dir", str(tmp_path / "a-file"), timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"service.data_dir: {tmp_path / 'a-file'}: cannot use it as the data directory" in r.stderr


def test_sigterm_stops_cleanly_with_a_checkpoint(tmp_path: Path) -> None:
    s = Server(tmp_path)
    try:
        with FusionClient(s.target, timeout=10, fallback=False) as c:
            learn(c, events(32, 30), "t")
        rc = s.stop()  # waits at most 20 s
        assert rc == 0, s.log.read_text()
    finally:
        s.kill()
    checkpoints = [p for p in (s.data_dir / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "fusion_state.json").read_text())
    assert state["counters"]["outcomes"] == 30
    log = s.log.read_text()
    assert "Traceback" not in log and "stopped" in log
    r = run("health", "--target", s.target, "--timeout", "2")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr


def test_health_against_a_dead_port_exits_1() -> None:
    target = f"127.0.0.1:{free_port()}"
    r = run("health", "--target", target, "--timeout", "1")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"{target}: UNAVAILABLE")
    r = run("stats", "--target", target, "--timeout", "1")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr


# ---------------------------------------------------------------------------------------------
# Configuration refused at start-up, naming the parameter

def test_an_invalid_flag_combination_is_refused_naming_the_parameter(tmp_path: Path) -> None:
    r = run("serve", "--port", "0", "--metrics-port", "-1", "--data-dir", str(tmp_path / "d"),
            "--fusion.hidden_dim", "30", "--fusion.num_heads", "4")
    assert r.returncode == 2
    assert "fusion.hidden_dim" in r.stderr and "--fusion.hidden_dim" in r.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was created


@pytest.mark.parametrize("toml, parameter", [
    ("[fusion]\nhidden_dimm = 64\n", "fusion.hidden_dimm"),
    ("[service]\nportt = 1\n", "service.portt"),
    ("[fusion]\nhidden_dim = 30\nnum_heads = 4\n", "fusion.hidden_dim"),
    ("[service]\nport = 70000\n", "service.port"),
    ("[servise]\nport = 1\n", "servise"),
])
def test_a_bad_config_file_is_refused_naming_the_parameter(tmp_path: Path, toml: str, parameter: str) -> None:
    path = tmp_path / "titan.toml"
    path.write_text(toml)
    r = run("serve", "--config", str(path), "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2, r.stderr
    assert parameter in r.stderr
    assert not (tmp_path / "d").exists()


def test_a_bad_environment_variable_is_refused_naming_it(tmp_path: Path) -> None:
    env = dict(clean_env(), TITAN_FUSION_FUSION_HIDDEN_DIM="30", TITAN_FUSION_FUSION_NUM_HEADS="4")
    r = run("serve", "--data-dir", str(tmp_path / "d"), env=env)
    assert r.returncode == 2 and "fusion.hidden_dim" in r.stderr and "TITAN_FUSION_FUSION_HIDDEN_DIM" in r.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_busy_port_is_refused_with_one_clear_line(tmp_path: Path, flag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        ports = {"--port": "0", "--metrics-port": "0", flag: port}
        r = run("serve", "--data-dir", str(tmp_path / "d"), *[x for kv in ports.items() for x in kv])
    assert r.returncode == 1
    assert port in r.stderr
    assert "Traceback" not in r.stderr


def test_stats_json_has_null_where_a_value_is_not_finite() -> None:
    """`titan-fusion stats` prints JSON that strict parsers (jq, JavaScript) read: a loss before
    training starts (NaN) or the best validation loss before any (infinity) is null."""
    from titan_fusion.client.convert import json_finite
    stats = {"train_loss": float("nan"), "best_val_loss": float("inf"), "samples_trained": 0,
             "history": [{"val_loss": float("-inf")}], "attention": {"a": 0.5}}
    assert json.loads(json.dumps(json_finite(stats), allow_nan=False)) == {
        "train_loss": None, "best_val_loss": None, "samples_trained": 0, "history": [{"val_loss": None}],
        "attention": {"a": 0.5}}


def test_replay_of_a_missing_file_says_so_in_one_line(tmp_path: Path) -> None:
    r = run("replay", str(tmp_path / "nope.csv"), "--target", "127.0.0.1:1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"{tmp_path / 'nope.csv'}: No such file or directory"


_CLIENT_ONLY = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):  # what `pip install titan-fusion` (no server extra) lacks
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "numpy", "numba", "tqdm", "grpc_health", "prometheus_client", "orjson"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocked())
from titan_fusion.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command, needs", [("stats", None), ("health", "grpc_health"), ("demo", "tqdm")])
def test_on_a_client_only_install_a_command_works_or_names_the_extra_it_needs(tmp_path: Path, command: str,
                                                                               needs: str | None) -> None:
    """`pip install titan-fusion` installs the `titan-fusion` script with grpcio and protobuf alone:
    `stats` works there against a real service (strict JSON needs no numpy); a command that needs
    the server extra says so in one line instead of a traceback."""
    from service_helpers import start
    svc, port, _ = start(tmp_path / "data")
    try:
        r = subprocess.run([sys.executable, "-c", _CLIENT_ONLY, command, "--target", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60, env=clean_env())
    finally:
        svc.stop(grace=0)
    assert "Traceback" not in r.stderr, r.stderr
    if needs is None:
        assert r.returncode == 0, r.stderr
        stats = json.loads(r.stdout)
        assert stats["samples_trained"] == 0 and stats["train_loss"] is None  # NaN before training: null
    else:
        assert r.returncode == 1
        assert r.stderr.strip() == (f"titan-fusion {command}: needs {needs}, which comes with the server extra: "
                                    "pip install 'titan-fusion[server]'")
