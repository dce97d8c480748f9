"""A real Prometheus (Debian's `prometheus` binary) scraping a real running service, on loopback:
the service's series arrive through Prometheus's HTTP query API, the shipped alert rules load and
evaluate, and every query of the Grafana dashboard is valid PromQL on that server.

`make test` installs the binary (`make ops-tools`); under CI a missing binary fails the test.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service_helpers import events, start, wait_until
from titan_fusion.client import FusionClient
from titan_fusion.server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "titan-fusion.json"
# Grafana's variables, as Grafana would fill them in, so that Prometheus can run the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("prometheus is not installed (`make test` installs it: make ops-tools)")
        pytest.skip("prometheus is not installed: make ops-tools (apt-get install prometheus)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exported(name: str) -> bool:
    registry = CollectorRegistry()
    Metrics(registry)
    return any(f.name == name for f in registry.collect())


@pytest.fixture(scope="module")
def fed_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A service with /metrics on a free port, fed until it trains and the fusion serves."""
    svc, port, registry = start(tmp_path_factory.mktemp("fed") / "data", metrics_port=0)
    client = FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False)
    sources = []
    try:
        for i, (experts, features, direction) in enumerate(events(11, 120)):
            p = client.predict(experts, features, event_id=f"prom:{i}")
            sources.append(p.source)
            client.record_outcome(actual_direction=direction, event_id=f"prom:{i}")
        wait_until(lambda: registry.get_sample_value("fusion_samples_trained") == 120, what="the 120 outcomes")
        yield SimpleNamespace(svc=svc, metrics_port=svc.metrics_port, registry=registry, sources=sources)
    finally:
        client.close()
        svc.stop(grace=0)


@pytest.fixture(scope="module")
def prometheus(fed_service: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = prometheus_binary()
    d = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "titan-fusion",
                            "static_configs": [{"targets": [f"127.0.0.1:{fed_service.metrics_port}"]}]}],
    }
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(d / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=d)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (d / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                    return r.status == 200
            except (urllib.error.URLError, ConnectionError):
                return False
        wait_until(ready, timeout=30, what="Prometheus to be ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def api(url: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}" + (f"?{query}" if query else ""), timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def query(url: str, expr: str) -> list[dict]:
    return api(url, "query", query=expr)["result"]


def scraped(url: str, expr: str, timeout: float = 20.0) -> list[dict]:
    """The series of `expr` once Prometheus has scraped them (fails, never hangs)."""
    found: list[dict] = []

    def has() -> bool:
        found[:] = query(url, expr)
        return bool(found)

    wait_until(has, timeout=timeout, what=f"Prometheus to return {expr}")
    return found


def test_the_service_trained_and_the_fusion_serves(fed_service: SimpleNamespace) -> None:
    assert fed_service.sources[0] == "average" and fed_service.sources[-1] == "fusion"


def test_prometheus_scrapes_training_attention_and_serving_series(prometheus: str, fed_service: SimpleNamespace) -> None:
    (up,) = scraped(prometheus, 'up{job="titan-fusion"} == 1')
    assert up["metric"]["instance"] == f"127.0.0.1:{fed_service.metrics_port}"
    (loss,) = scraped(prometheus, "fusion_train_loss")
    assert math.isfinite(float(loss["value"][1])) and float(loss["value"][1]) > 0
    assert float(loss["value"][1]) == pytest.approx(fed_service.registry.get_sample_value("fusion_train_loss"))
    (entropy,) = scraped(prometheus, "fusion_attention_entropy")
    assert 0 < float(entropy["value"][1]) <= math.log(4) + 1e-9
    weights = scraped(prometheus, "fusion_attention_weight")
    assert {w["metric"]["expert"] for w in weights} == {"good", "noise0", "noise1", "noise2"}
    assert sum(float(w["value"][1]) for w in weights) == pytest.approx(1.0)
    (served,) = scraped(prometheus, 'fusion_predictions_total{source="fusion"} > 0')
    assert float(served["value"][1]) >= 1


def test_prometheus_scrapes_the_live_accuracy(prometheus: str) -> None:
    if not exported("fusion_live_accuracy"):
        # TODO(lead): server/metrics.py does not export fusion_live_accuracy yet; once it does,
        # this test checks the live scores through Prometheus.
        pytest.fail("server/metrics.py does not export fusion_live_accuracy (the live-scoring metrics)")
    series = {s["metric"]["source"]: float(s["value"][1]) for s in scraped(prometheus, "fusion_live_accuracy")}
    assert {"fusion", "average", "served"} <= set(series)
    assert all(0.0 <= v <= 1.0 for v in series.values() if not math.isnan(v))


def test_prometheus_loads_and_evaluates_the_shipped_alert_rules(prometheus: str) -> None:
    expected = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}

    def evaluated() -> bool:
        groups = api(prometheus, "rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return bool(rules) and all(r.get("lastEvaluation", "").startswith("2") and
                                   not r["lastEvaluation"].startswith("0001") for r in rules)

    wait_until(evaluated, timeout=20, what="the alert rules to be evaluated")
    rules = {r["name"]: r for g in api(prometheus, "rules")["groups"] for r in g["rules"]}
    assert set(rules) == expected
    assert all(r["health"] == "ok" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}
    # A healthy, freshly fed service raises none of them.
    firing = [a["labels"]["alertname"] for a in api(prometheus, "alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


def test_every_dashboard_query_is_valid_promql(prometheus: str) -> None:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs
    scraped(prometheus, "fusion_train_loss")
    empty = []
    for expr in exprs:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        if not query(prometheus, expr):  # api() asserts the query parsed and ran
            empty.append(expr)
    # Queries of series the service has not yet produced may be empty; the core ones are not.
    for name in ("fusion_train_loss", "fusion_attention_weight", "fusion_queue_depth"):
        assert not any(name in e for e in empty), (name, empty)
