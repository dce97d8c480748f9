import argparse
import dataclasses

import pytest

from titan_fusion.server.config import FusionConfig
from titan_fusion.server.errors import ConfigError
from titan_fusion.server.settings import (FUSION_HELP, SERVICE_FIELDS, SERVICE_HELP, ServiceConfig,
                                          add_arguments, describe_settings, dest_of, env_var_of, flag_of,
                                          load_settings, settings_from_args, settings_markdown)

TOML = """
[service]
port = 6000
data_dir = "state"
grace_seconds = 2

[fusion]
hidden_dim = 64
num_heads = 4
expert_names = ["a", "b", "c", "d"]
enabled = false
"""


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "fusion.toml"
    path.write_text(TOML)
    return path


def test_defaults():
    c = load_settings(env={})
    assert c == ServiceConfig()
    assert (c.host, c.port, c.metrics_host, c.metrics_port) == ("127.0.0.1", 50051, "127.0.0.1", 9464)
    assert c.data_dir == "var"
    assert (c.queue_size, c.predict_queue_size, c.max_message_bytes, c.max_workers) == (1024, 1024, 4 * 1024 * 1024, 16)
    assert (c.max_bulk_streams, c.bulk_streams) == (0, 4)  # 0: a quarter of max_workers
    assert (c.grace_seconds, c.event_horizon_seconds, c.n_models) == (5.0, 86400.0, 4)
    assert (c.checkpoint_every, c.checkpoints_keep, c.log_level) == (1000, 5, "INFO")
    assert c.fusion == FusionConfig() and c.metrics_enabled


def test_frozen_and_to_dict():
    c = ServiceConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1
    d = c.to_dict()
    assert d["service"]["port"] == 50051 and "fusion" not in d["service"]
    assert d["fusion"]["hidden_dim"] == 32


def test_toml_file_values(toml_file):
    c = load_settings(file=toml_file, env={})
    assert (c.port, c.data_dir, c.grace_seconds) == (6000, "state", 2.0)
    assert (c.fusion.hidden_dim, c.fusion.num_heads, c.fusion.enabled) == (64, 4, False)
    assert c.fusion.expert_names == ("a", "b", "c", "d")
    assert c.host == "127.0.0.1"  # untouched keys keep their defaults


def test_config_file_from_the_environment(toml_file):
    assert load_settings(env={"TITAN_FUSION_CONFIG": str(toml_file)}).port == 6000


def test_env_overrides_toml(toml_file):
    env = {"TITAN_FUSION_PORT": "7000", "TITAN_FUSION_FUSION_HIDDEN_DIM": "128",
           "TITAN_FUSION_FUSION_EXPERT_NAMES": "w, x,y,z", "TITAN_FUSION_LOG_LEVEL": "debug",
           "TITAN_FUSION_FUSION_ENABLED": "1", "OTHER_VAR": "ignored"}
    c = load_settings(file=toml_file, env=env)
    assert (c.port, c.data_dir, c.log_level) == (7000, "state", "DEBUG")
    assert (c.fusion.hidden_dim, c.fusion.num_heads, c.fusion.enabled) == (128, 4, True)
    assert c.fusion.expert_names == ("w", "x", "y", "z")


def test_flags_override_env(toml_file):
    env = {"TITAN_FUSION_PORT": "7000", "TITAN_FUSION_FUSION_HIDDEN_DIM": "128"}
    c = load_settings(file=toml_file, env=env,
                      overrides={"port": 8000, "service.data_dir": "other", "fusion.hidden_dim": "16",
                                 "max_workers": None})
    assert (c.port, c.data_dir, c.max_workers) == (8000, "other", 16)
    assert (c.fusion.hidden_dim, c.fusion.num_heads) == (16, 4)


@pytest.mark.parametrize("kwargs, parameter, fragment", [
    ({"overrides": {"port": 70000}}, "service.port", "must be in [0, 65535], got 70000 (from --port)"),
    ({"env": {"TITAN_FUSION_PORT": "70000"}}, "service.port", "(from TITAN_FUSION_PORT)"),
    ({"env": {"TITAN_FUSION_PORT": "http"}}, "service.port", "expected an integer, got 'http'"),
    ({"overrides": {"metrics_port": -2}}, "service.metrics_port", "[-1, 65535]"),
    ({"overrides": {"metrics_port": 50051}}, "service.metrics_port", "must differ from service.port"),
    ({"overrides": {"queue_size": 0}}, "service.queue_size", ">= 1"),
    ({"overrides": {"predict_queue_size": 0}}, "service.predict_queue_size", ">= 1"),
    ({"overrides": {"max_message_bytes": 2**31}}, "service.max_message_bytes", "must be in"),
    ({"overrides": {"max_workers": 0}}, "service.max_workers", ">= 1"),
    ({"overrides": {"max_bulk_streams": 16}}, "service.max_bulk_streams", "[1, max_workers - 1 = 15]"),
    ({"overrides": {"max_bulk_streams": -1}}, "service.max_bulk_streams", "got -1"),
    ({"overrides": {"grace_seconds": -1}}, "service.grace_seconds", ">= 0"),
    ({"overrides": {"grace_seconds": "inf"}}, "service.grace_seconds", "finite"),
    ({"overrides": {"event_horizon_seconds": 0}}, "service.event_horizon_seconds", "> 0"),
    ({"overrides": {"n_models": 0}}, "service.n_models", ">= 1"),
    ({"overrides": {"checkpoint_every": -1}}, "service.checkpoint_every", ">= 0"),
    ({"overrides": {"checkpoints_keep": 0}}, "service.checkpoints_keep", ">= 1"),
    ({"overrides": {"log_level": "LOUD"}}, "service.log_level", "must be one of"),
    ({"overrides": {"host": ""}}, "service.host", "non-empty"),
    ({"overrides": {"fusion.hidden_dim": 30, "fusion.num_heads": 4}}, "fusion.hidden_dim",
     "30 is not divisible by num_heads=4 (from --fusion.hidden_dim)"),
    ({"env": {"TITAN_FUSION_FUSION_DROPOUT": "1.5"}}, "fusion.dropout", "(from TITAN_FUSION_FUSION_DROPOUT)"),
    ({"overrides": {"fusion.expert_names": "a,b"}}, "fusion.expert_names", "service.n_models=4"),
    ({"overrides": {"portt": 1}}, "service.portt", "unknown parameter"),
    ({"overrides": {"fusion.hidden_dims": 1}}, "fusion.hidden_dims", "unknown parameter"),
    ({"env": {"TITAN_FUSION_PROT": "1"}}, "TITAN_FUSION_PROT", "unknown environment variable"),
    ({"env": {"TITAN_FUSION_FUSION_HIDDEN_DIMS": "1"}}, "TITAN_FUSION_FUSION_HIDDEN_DIMS",
     "unknown environment variable"),
    ({"env": {"TITAN_FUSION_FUSION": "1"}}, "TITAN_FUSION_FUSION", "unknown environment variable"),
    ({"file": "/no/such/fusion.toml"}, "service.config", "no such file"),
    ({"env": {"TITAN_FUSION_CONFIG": "/no/such/fusion.toml"}}, "service.config", "no such file"),
])
def test_each_bad_value_is_named(kwargs, parameter, fragment):
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as e:
        load_settings(**kwargs)
    assert e.value.parameter == parameter
    assert str(e.value).startswith(parameter + ": ")
    assert fragment in str(e.value)


def test_the_brief_example_message():
    with pytest.raises(ConfigError, match=r"^service\.port: must be in \[0, 65535\], got 70000"):
        ServiceConfig(port=70000)


@pytest.mark.parametrize("text, parameter, fragment", [
    ("[fusion]\nhidden_dims = 64\n", "fusion.hidden_dims", "unknown parameter"),
    ("[service]\nportt = 1\n", "service.portt", "unknown parameter"),
    ("[server]\nport = 1\n", "server", "unknown table"),
    ("port = 1\n", "port", "under [service]"),
    ("service = 3\n", "service", "must be a table"),
    ("[service]\nport = 70000\n", "service.port", "got 70000 (from "),
    ("[service]\nport = \"x\"\n", "service.port", "expected an integer"),
    ("[fusion]\nhidden_dim = 30\nnum_heads = 4\n", "fusion.hidden_dim", "not divisible"),
    ("[service\n", "service.config", "invalid TOML"),
])
def test_bad_toml_is_named(tmp_path, text, parameter, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(file=path, env={})
    assert e.value.parameter == parameter
    assert fragment in str(e.value)


def test_config_file_must_be_a_file(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        load_settings(file=tmp_path, env={})


def test_fusion_given_as_a_mapping_is_converted():
    assert ServiceConfig(fusion={"fusion.hidden_dim": 64, "num_heads": 4}).fusion.hidden_dim == 64


def _parser():
    parser = argparse.ArgumentParser(prog="titan-fusion")
    add_arguments(parser)
    return parser


def test_argparse_round_trip(toml_file):
    ns = _parser().parse_args([
        "--config", str(toml_file), "--port", "0", "--metrics-port", "-1", "--data-dir", "d",
        "--grace-seconds", "0.5", "--log-level", "warning", "--fusion.hidden_dim", "8",
        "--fusion.num_heads", "2", "--fusion.enabled", "true", "--fusion.feature_names", "close,rsi",
    ])
    assert ns.port == 0 and getattr(ns, "fusion.hidden_dim") == 8 and ns.max_workers is None
    c = settings_from_args(ns, env={"TITAN_FUSION_MAX_WORKERS": "4", "TITAN_FUSION_PORT": "9"})
    assert (c.port, c.metrics_port, c.metrics_enabled, c.data_dir) == (0, -1, False, "d")
    assert (c.grace_seconds, c.log_level, c.max_workers) == (0.5, "WARNING", 4)
    assert (c.fusion.hidden_dim, c.fusion.num_heads, c.fusion.enabled) == (8, 2, True)
    assert c.fusion.feature_names == ("close", "rsi")
    assert c.fusion.expert_names == ("a", "b", "c", "d")  # from the file


def test_no_flags_gives_the_defaults():
    assert settings_from_args(_parser().parse_args([]), env={}) == ServiceConfig()


def test_every_parameter_has_a_flag():
    ns = _parser().parse_args([])
    for name, _, _ in describe_settings():
        assert getattr(ns, dest_of(name)) is None, name
    assert ns.config is None


def test_a_malformed_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--port", "http"])
    assert e.value.code == 2
    assert "--port: expected an integer, got 'http'" in capsys.readouterr().err


def test_help_shows_defaults():
    text = " ".join(_parser().format_help().split())
    assert "(default: 50051; env TITAN_FUSION_PORT)" in text
    assert "--fusion.hidden_dim" in text and "TITAN_FUSION_FUSION_HIDDEN_DIM" in text


def test_every_field_has_help():
    assert set(SERVICE_HELP) == set(SERVICE_FIELDS)
    assert set(FUSION_HELP) == {f.name for f in dataclasses.fields(FusionConfig)}
    assert all(text.strip() for text in [*SERVICE_HELP.values(), *FUSION_HELP.values()])


def test_describe_settings_covers_every_parameter():
    rows = describe_settings()
    names = [r[0] for r in rows]
    assert names == ([f"service.{n}" for n in SERVICE_FIELDS]
                     + [f"fusion.{f.name}" for f in dataclasses.fields(FusionConfig)])
    assert dict((r[0], r[1]) for r in rows)["service.host"] == '"127.0.0.1"'
    assert dict((r[0], r[1]) for r in rows)["fusion.enabled"] == "true"
    assert dict((r[0], r[1]) for r in rows)["fusion.expert_names"] == "[]"
    assert settings_markdown().count("\n") == len(rows) + 1


def test_names_of_flags_and_variables():
    assert flag_of("service.data_dir") == "--data-dir"
    assert flag_of("fusion.hidden_dim") == "--fusion.hidden_dim"
    assert env_var_of("service.data_dir") == "TITAN_FUSION_DATA_DIR"
    assert env_var_of("fusion.hidden_dim") == "TITAN_FUSION_FUSION_HIDDEN_DIM"
