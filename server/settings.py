"""The service's configuration: a typed, frozen, validated `ServiceConfig` and where it comes from.

Sources, lowest to highest precedence (a later one overrides an earlier one, key by key):

1. the defaults below (`ServiceConfig`, `FusionConfig`);
2. a TOML file (`--config FILE`, else `$TITAN_FUSION_CONFIG`), a `[service]` table with the service
   keys and a `[fusion]` table with the model keys, plain names:

       [service]
       port = 50051
       data_dir = "var"

       [fusion]
       hidden_dim = 64
       num_heads = 4

3. environment variables: `TITAN_FUSION_<KEY>` for service keys (`TITAN_FUSION_PORT=50052`) and
   `TITAN_FUSION_FUSION_<KEY>` for model keys (`TITAN_FUSION_FUSION_HIDDEN_DIM=64`); booleans are
   true/false/1/0/yes/no/on/off, lists are comma-separated;
4. command-line flags: `--port 50052`, `--data-dir var`, `--fusion.hidden_dim 64`.

Unknown tables, keys, environment variables with the prefix, and flags are errors, as are invalid
values: each raises ConfigError naming the parameter ("service.port", "fusion.hidden_dim") and,
when it came from a file, variable or flag, that origin:

    >>> load_settings(env={}, overrides={"port": 70000})
    Traceback (most recent call last):
    ...
    titan_fusion.server.errors.ConfigError: service.port: must be in [0, 65535], got 70000 (from --port)

`describe_settings()` lists every parameter with its default and meaning (the README's table).

Secrets (`service.token`): never part of an error message, a log line, `repr()` or `to_dict()`
(which shows "********" when one is set). See docs/security.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .config import PREFIX as FUSION_PREFIX
from .config import FusionConfig, _coerce
from . import cpus
from .errors import ConfigError

try:  # stdlib from Python 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10 with the tomli backport installed
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ImportError:
        tomllib = None  # type: ignore[assignment]

SERVICE_PREFIX = "service."
ENV_PREFIX = "TITAN_FUSION_"
ENV_FUSION_PREFIX = ENV_PREFIX + "FUSION_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
CONFIG_PARAMETER = SERVICE_PREFIX + "config"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TRAINERS = ("process", "thread")
MAX_MESSAGE_BYTES_LIMIT = 2**31 - 1  # gRPC takes the limit as a signed 32-bit int


@dataclass(frozen=True)
class ServiceConfig:
    # 127.0.0.1: `make run` is reachable from this machine only. In a container, set "0.0.0.0"
    # (or "[::]" for IPv4 and IPv6) so that other hosts can reach the service.
    host: str = "127.0.0.1"
    port: int = 50051  # gRPC port; 0 picks a free port (the server reports the one it got)
    metrics_host: str = "127.0.0.1"  # Prometheus /metrics address; "0.0.0.0" in containers
    metrics_port: int = 9464  # Prometheus /metrics port; 0 picks a free port, -1 disables it
    data_dir: str = "var"  # checkpoints and the service's state live here
    queue_size: int = 1024  # bound of the model owner's queue; full -> RESOURCE_EXHAUSTED
    predict_queue_size: int = 1024  # bound of the Predict queue; full -> RESOURCE_EXHAUSTED
    max_message_bytes: int = 4 * 1024 * 1024  # largest gRPC message received or sent
    max_workers: int = 16  # gRPC handler threads
    # Bulk outcome streams served at once (each holds a handler thread while open); more are refused
    # with RESOURCE_EXHAUSTED, so that Predict and health keep threads. 0: a quarter of max_workers.
    max_bulk_streams: int = 0
    grace_seconds: float = 5.0  # on shutdown, in-flight calls get this long to finish
    # How long a Predict's inputs are kept so that RecordOutcome can name just its event_id.
    event_horizon_seconds: float = 86400.0
    n_models: int = 4  # number of experts per event
    # Where the model trains: "process" (a child process: training never holds the service's
    # interpreter lock) or "thread" (the model owner's thread).
    trainer: str = "process"
    # Which CPUs the trainer process runs on, the service's threads keeping off them (all but gRPC
    # core's own; server/cpus.py):
    # "auto" (the last CPU, with two or more), "off", or a CPU list such as "3" or "6-7".
    trainer_cpus: str = "auto"
    checkpoint_every: int = 1000  # automatic checkpoint every N learned outcomes; 0 = off
    checkpoints_keep: int = 5  # automatic checkpoints kept in data_dir; older ones are deleted
    # Journal retention: outcomes already in a checkpoint beyond this many are pruned (their
    # event_ids are recognised as duplicates for that long); remembered Predict inputs beyond this
    # many (or older than event_horizon_seconds) are pruned.
    journal_keep_outcomes: int = 100_000
    journal_keep_predictions: int = 100_000
    # The event_ids of pruned outcomes kept for recognising duplicates (8 bytes each, about 35 on
    # disk): a re-run of a bulk replay longer than journal_keep_outcomes learns none of it twice.
    journal_keep_event_ids: int = 10_000_000
    # Live shadow scoring (server/live.py): the window of scored outcomes, and the switch to the
    # plain average when the fusion's log loss exceeds the average's by more than the margin.
    live_window: int = 500
    underperform_margin: float = 0.01
    underperform_min_outcomes: int = 200
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR or CRITICAL
    # --- security (docs/security.md) ---
    # TLS on the gRPC port: PEM certificate chain and private key; both or neither (plaintext).
    # Re-read when the files change, at the next new connection: rotation needs no restart.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # PEM CA bundle: set, every client must present a certificate signed by it (mutual TLS).
    tls_client_ca_file: str = ""
    # The bearer token required on the mutating RPCs ("authorization: Bearer <token>"). A secret:
    # never logged, masked in repr() and to_dict(). Prefer the environment (TITAN_FUSION_TOKEN) or
    # token_file to a flag, which other users see in the process list. Empty: nothing is protected.
    token: str = field(default="", repr=False)
    # A file holding the token(s), one per line (several: rotation); re-read when it changes.
    token_file: str = ""
    protect_reads: bool = False  # Predict, Stats and reflection need the token too
    protect_health: bool = False  # the gRPC health service needs the token too
    fusion: FusionConfig = field(default_factory=FusionConfig)  # the model's parameters

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """{"service": {...}, "fusion": {...}} with plain names, JSON-able: the TOML file's layout."""
        service = {name: getattr(self, name) for name in SERVICE_FIELDS}
        for name in SECRET_FIELDS:  # a dump never shows a secret, only whether one is set
            service[name] = MASK if service[name] else ""
        return {"service": service, "fusion": self.fusion.to_dict()}

    def replace(self, **changes: Any) -> "ServiceConfig":
        return dataclasses.replace(self, **changes)

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port != -1

    @property
    def bulk_streams(self) -> int:
        """How many bulk outcome streams are served at once: max_bulk_streams, or with 0 a quarter of
        max_workers (at least 1)."""
        return self.max_bulk_streams or max(1, self.max_workers // 4)


# The service's own parameters, in declaration order (everything except the nested `fusion`).
# Secrets: never in an error message, a log line, repr() or to_dict() (which shows MASK instead).
SECRET_FIELDS: tuple[str, ...] = ("token",)
MASK = "********"
# Strings that may be empty (the feature is off); every other string must be non-empty.
OPTIONAL_STRING_FIELDS: tuple[str, ...] = ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "token",
                                           "token_file")
MIN_TOKEN_LENGTH = 16
TOKEN_RULE = f"must be at least {MIN_TOKEN_LENGTH} printable characters without spaces (the value is not shown)"


def token_ok(token: str) -> bool:
    """What every accepted bearer token must be, from `token` or a line of `token_file`: a
    placeholder such as "x" or "changeme" must never become a credential."""
    return len(token) >= MIN_TOKEN_LENGTH and token.isprintable() and " " not in token


SERVICE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ServiceConfig) if f.name != "fusion")
_SERVICE_TYPES = {f.name: f.type for f in fields(ServiceConfig) if f.name != "fusion"}
_FUSION_TYPES = {f.name: f.type for f in fields(FusionConfig)}

SERVICE_HELP: dict[str, str] = {
    "host": "gRPC bind address; 127.0.0.1 is this machine only, set 0.0.0.0 (or [::]) in containers",
    "port": "gRPC port; 0 picks a free port",
    "metrics_host": "Prometheus /metrics bind address; set 0.0.0.0 (or ::) in containers",
    "metrics_port": "Prometheus /metrics port; 0 picks a free port, -1 disables the endpoint",
    "data_dir": "directory of checkpoints and service state",
    "queue_size": "bound of the model owner's queue; when full, calls get RESOURCE_EXHAUSTED",
    "predict_queue_size": "bound of the Predict queue; when full, calls get RESOURCE_EXHAUSTED",
    "max_message_bytes": "largest gRPC message received or sent, in bytes",
    "max_workers": "gRPC handler threads",
    "max_bulk_streams": "bulk outcome streams (RecordOutcomes, RecordOutcomeBatches) served at once, each holding a "
                        "handler thread; more get RESOURCE_EXHAUSTED, so that Predict and health keep threads. 0: a "
                        "quarter of max_workers, at least 1 (4 with the default 16; with max_workers 1, a stream takes the one thread)",
    "grace_seconds": "shutdown grace: in-flight calls get this long to finish",
    "event_horizon_seconds": "how long Predict inputs are kept for RecordOutcome by event_id",
    "n_models": "number of experts per event",
    "trainer": "where the model trains: \"process\" (a child process, so training never stalls Predicts) or "
               "\"thread\" (the model owner's thread)",
    "trainer_cpus": "CPUs of the trainer process, which the service's threads keep off (gRPC core's own C++ "
                    "threads may use every CPU): \"auto\" (the last CPU when there are two or more), \"off\", or a "
                    "CPU list such as \"3\", \"6-7\" or \"2,5\"",
    "checkpoint_every": "automatic checkpoint every N learned outcomes; 0 turns it off",
    "checkpoints_keep": "automatic checkpoints kept in data_dir; older ones are deleted",
    "journal_keep_outcomes": "journaled outcomes kept once checkpointed; pruned at each automatic checkpoint",
    "journal_keep_event_ids": "event_ids of pruned outcomes kept (about 35 bytes each on disk): duplicates are "
                              "recognised as far back as journal_keep_outcomes plus these; 0 keeps none",
    "live_window": "live scoring: outcomes of predicted events in the rolling window (fusion vs plain average)",
    "underperform_margin": "serve the plain average while the fusion's rolling log loss exceeds the average's by "
                           "more than this many nats (back to the fusion at half of it)",
    "underperform_min_outcomes": "scored outcomes needed in the window before the service may switch",
    "journal_keep_predictions": "Predict inputs kept for RecordOutcome by event_id (also bounded by "
                                "event_horizon_seconds)",
    "log_level": "DEBUG, INFO, WARNING, ERROR or CRITICAL",
    "tls_cert_file": "PEM certificate chain for TLS on the gRPC port (with tls_key_file); empty: plaintext. "
                     "Re-read when it changes (rotation without restart)",
    "tls_key_file": "PEM private key of tls_cert_file",
    "tls_client_ca_file": "PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS); "
                          "needs tls_cert_file",
    "token": "bearer token required on RecordOutcome, the bulk streams and Checkpoint (\"authorization: Bearer "
             f"<token>\"), at least {MIN_TOKEN_LENGTH} characters; a secret, never logged: prefer the environment "
             "variable or token_file to the flag. Empty (and no token_file): every RPC is open",
    "token_file": "file holding the bearer token(s), one per line (several during a rotation); re-read when it "
                  "changes. Exclusive with token",
    "protect_reads": "true: Predict, Stats and reflection need the token too",
    "protect_health": "true: the gRPC health service needs the token too",
}

# One line per FusionConfig field, from the comments in server/config.py.
FUSION_HELP: dict[str, str] = {
    "enabled": "false: always serve the plain average of the experts (training goes on)",
    "hidden_dim": "width of every token; must be divisible by num_heads",
    "num_heads": "attention heads; must divide hidden_dim",
    "dropout": "dropout on attention weights, the feed-forward output and the pooled vector",
    "learning_rate": "peak AdamW learning rate, reached at the end of warmup",
    "l2_lambda": "AdamW weight decay, on weight matrices and embeddings only",
    "warmup_steps": "linear learning-rate warmup from 0 over this many training steps",
    "min_samples": "outcomes learned before the fusion serves and training starts",
    "val_split": "share of outcomes held out for validation",
    "gradient_clip": "max global gradient norm",
    "early_stopping_patience": "validation checks (one every val_every steps) without a val-loss improvement before early stopping",
    "early_stopping_delta": "smallest val-loss decrease that counts as an improvement",
    "expert_names": "names of the experts, in order; empty: the first event whose experts are all "
                    "named fixes them (until then model_0, model_1, ...)",
    "feature_names": "names of the market features; empty: the first learned outcome fixes them (none if it has none)",
    "missing_features": "an event lacking a known feature: reject it, or impute the running mean",
    "train_buffer_size": "FIFO capacity of the training buffer, in outcomes",
    "val_buffer_size": "FIFO capacity of the validation buffer, in outcomes",
    "batch_size": "mini-batch size of each training step",
    "steps_per_outcome": "training steps run for each learned outcome, once ready",
    "val_every": "training steps between validation-loss checks",
    "decay_steps": "length of the cosine learning-rate decay after warmup, in training steps",
    "lr_floor_ratio": "the cosine decays to learning_rate times this, never to 0",
    "early_stopping_resume": "after early stopping, training resumes once this many fresh validation "
                             "outcomes arrived",
    "attention_window": "fused forecasts averaged by get_attention_weights()",
    "feature_norm_window": "feature normalization: running mean/variance until this many outcomes, "
                           "then an exponential moving average with this horizon",
    "seed": "seeds weights, dropout, batch sampling and the validation split",
    "skill_bias": "each expert's recent skill (a discounted EWA forecaster's log weights) biases the pooling attention",
    "skill_eta": "learning rate of the skill forecaster, on log loss",
    "skill_halflife": "half-life of the skill forecaster's memory, in outcomes",
    "classic_tokens": "classic online aggregators' forecasts (Fixed Share, stacking, recalibrated average) as extra tokens",
    "expert_identity": "a learned identity embedding per expert position (off: trust from content and skill only)",
    "ema_decay": "serve an exponential moving average of the weights with this decay per step (0: the raw weights)",
    "logit_pool": "output = attention-weighted sum of per-expert calibrated logits + a learned correction",
}


# --- validation ---------------------------------------------------------------------------------

def _validate(c: ServiceConfig) -> None:
    def need(cond: bool, param: str, msg: str) -> None:
        if not cond:
            raise ConfigError(SERVICE_PREFIX + param, msg)

    for name in SERVICE_FIELDS:
        v, t = getattr(c, name), _SERVICE_TYPES[name]
        if t == "int":
            need(isinstance(v, int) and not isinstance(v, bool), name, f"expected an integer, got {v!r}")
        elif t == "float":
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                 name, f"expected a finite number, got {v!r}")
        elif t == "bool":
            need(isinstance(v, bool), name, f"expected true or false, got {v!r}")
        elif t == "str" and name in SECRET_FIELDS:  # never echo a secret
            need(isinstance(v, str) and v.strip() == v, name,
                 "expected a string without surrounding spaces or newlines (the value is not shown)")
        elif t == "str":
            need(isinstance(v, str) and v.strip() == v and (v != "" or name in OPTIONAL_STRING_FIELDS), name,
                 f"expected a non-empty string without surrounding spaces, got {v!r}")

    need(0 <= c.port <= 65535, "port", f"must be in [0, 65535], got {c.port}")
    need(-1 <= c.metrics_port <= 65535, "metrics_port", f"must be in [-1, 65535] (-1 = off), got {c.metrics_port}")
    need(c.port == 0 or c.metrics_port != c.port, "metrics_port",
         f"must differ from service.port, both are {c.port}")
    need(c.queue_size >= 1, "queue_size", f"must be >= 1, got {c.queue_size}")
    need(c.predict_queue_size >= 1, "predict_queue_size", f"must be >= 1, got {c.predict_queue_size}")
    need(1024 <= c.max_message_bytes <= MAX_MESSAGE_BYTES_LIMIT, "max_message_bytes",
         f"must be in [1024, {MAX_MESSAGE_BYTES_LIMIT}], got {c.max_message_bytes}")
    need(c.max_workers >= 1, "max_workers", f"must be >= 1, got {c.max_workers}")
    need(c.max_bulk_streams == 0 or 1 <= c.max_bulk_streams < c.max_workers, "max_bulk_streams",
         f"must be 0 (a quarter of max_workers) or in [1, max_workers - 1 = {c.max_workers - 1}] (a handler thread "
         f"stays for Predict and health), got {c.max_bulk_streams}")
    need(c.grace_seconds >= 0.0, "grace_seconds", f"must be >= 0, got {c.grace_seconds}")
    need(c.event_horizon_seconds > 0.0, "event_horizon_seconds", f"must be > 0, got {c.event_horizon_seconds}")
    need(c.n_models >= 1, "n_models", f"must be >= 1, got {c.n_models}")
    need(c.trainer in TRAINERS, "trainer", f"must be one of {', '.join(TRAINERS)}, got {c.trainer!r}")
    try:
        cpus.check(c.trainer_cpus)
    except ValueError as e:
        need(False, "trainer_cpus", str(e))
    need(c.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0 (0 = off), got {c.checkpoint_every}")
    need(c.checkpoints_keep >= 1, "checkpoints_keep", f"must be >= 1, got {c.checkpoints_keep}")
    need(c.live_window >= 1, "live_window", f"must be >= 1, got {c.live_window}")
    need(c.underperform_margin >= 0.0, "underperform_margin", f"must be >= 0, got {c.underperform_margin}")
    need(1 <= c.underperform_min_outcomes <= c.live_window, "underperform_min_outcomes",
         f"must be in [1, live_window={c.live_window}], got {c.underperform_min_outcomes}")
    need(c.journal_keep_outcomes >= 1, "journal_keep_outcomes", f"must be >= 1, got {c.journal_keep_outcomes}")
    need(c.journal_keep_event_ids >= 0, "journal_keep_event_ids", f"must be >= 0, got {c.journal_keep_event_ids}")
    need(c.journal_keep_predictions >= 1, "journal_keep_predictions",
         f"must be >= 1, got {c.journal_keep_predictions}")
    need(c.log_level.upper() in LOG_LEVELS, "log_level",
         f"must be one of {', '.join(LOG_LEVELS)}, got {c.log_level!r}")
    object.__setattr__(c, "log_level", c.log_level.upper())
    need(bool(c.tls_cert_file) == bool(c.tls_key_file), "tls_key_file" if c.tls_cert_file else "tls_cert_file",
         "tls_cert_file and tls_key_file go together: set both (TLS) or neither (plaintext)")
    need(not c.tls_client_ca_file or bool(c.tls_cert_file), "tls_client_ca_file",
         "mutual TLS needs TLS: set tls_cert_file and tls_key_file too")
    need(not (c.token and c.token_file), "token", "set token or token_file, not both")
    need(not c.token or token_ok(c.token), "token", TOKEN_RULE)
    for flag in ("protect_reads", "protect_health"):
        need(not getattr(c, flag) or bool(c.token or c.token_file), flag,
             "protects nothing without a token: set token (TITAN_FUSION_TOKEN) or token_file")

    if not isinstance(c.fusion, FusionConfig):
        # A mapping of fusion parameters (dotted or plain names) is accepted and converted.
        object.__setattr__(c, "fusion", FusionConfig.coerce(c.fusion))
    if c.fusion.expert_names and len(c.fusion.expert_names) != c.n_models:
        raise ConfigError(FUSION_PREFIX + "expert_names",
                          f"names {len(c.fusion.expert_names)} experts, but service.n_models={c.n_models}")


# --- loading ------------------------------------------------------------------------------------

# Collected values: parameter name ("service.port", "fusion.hidden_dim") -> (value, origin).
_Values = dict[str, tuple[Any, str]]


def load_settings(*, file: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> ServiceConfig:
    """Defaults < TOML `file` < environment `env` < `overrides` (the command-line flags).

    file: the TOML file; None: $TITAN_FUSION_CONFIG if set and non-empty, else no file.
    env: the environment (None: os.environ); TITAN_FUSION_* variables are read.
    overrides: "port" or "service.port" for service keys, "fusion.hidden_dim" for model keys;
        values may be typed or strings; None values are skipped (flag not given).
    """
    env = os.environ if env is None else env
    values: _Values = {}
    if file is None:
        file = env.get(CONFIG_ENV) or None
    if file is not None:
        _read_toml(Path(file), values)
    _read_env(env, values)
    _read_overrides(overrides or {}, values)
    return _build(values)


def _read_toml(path: Path, values: _Values) -> None:
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError(CONFIG_PARAMETER, f"{path}: reading TOML needs Python 3.11+ or the tomli package")
    if not path.exists():
        raise ConfigError(CONFIG_PARAMETER, f"{path}: no such file")
    if not path.is_file():
        raise ConfigError(CONFIG_PARAMETER, f"{path}: not a file")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(CONFIG_PARAMETER, f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(CONFIG_PARAMETER, f"{path}: {e.strerror or e}") from None
    for table, content in data.items():
        if table not in ("service", "fusion"):
            if isinstance(content, dict):
                raise ConfigError(table, f"unknown table in {path} (known: [service], [fusion])")
            raise ConfigError(table, f"unknown top-level key in {path}: service keys go under [service], "
                                     "model keys under [fusion]")
        if not isinstance(content, dict):
            raise ConfigError(table, f"must be a table ([{table}]) in {path}")
        for key, value in content.items():
            _put(values, f"{table}.{key}", value, str(path))


def _read_env(env: Mapping[str, str], values: _Values) -> None:
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        if var.startswith(ENV_FUSION_PREFIX):
            name = FUSION_PREFIX + var[len(ENV_FUSION_PREFIX):].lower()
        else:
            name = SERVICE_PREFIX + var[len(ENV_PREFIX):].lower()
        if _types_of(name) is None:
            raise ConfigError(var, f"unknown environment variable: {name} is not a parameter "
                                   f"(service keys: {ENV_PREFIX}<KEY>, model keys: {ENV_FUSION_PREFIX}<KEY>)")
        _put(values, name, env[var], var)


def _read_overrides(overrides: Mapping[str, Any], values: _Values) -> None:
    for key, value in overrides.items():
        if value is None:
            continue
        if not isinstance(key, str):
            raise ConfigError(repr(key), "parameter names are strings")
        name = key if key.startswith((SERVICE_PREFIX, FUSION_PREFIX)) else SERVICE_PREFIX + key
        _put(values, name, value, flag_of(name))


def _types_of(name: str) -> Any:
    """The declared type of a "service.x" or "fusion.x" parameter, None if there is no such one."""
    if name.startswith(SERVICE_PREFIX):
        return _SERVICE_TYPES.get(name[len(SERVICE_PREFIX):])
    if name.startswith(FUSION_PREFIX):
        return _FUSION_TYPES.get(name[len(FUSION_PREFIX):])
    return None


def _put(values: _Values, name: str, raw: Any, origin: str) -> None:
    t = _types_of(name)
    if t is None:
        known = SERVICE_FIELDS if name.startswith(SERVICE_PREFIX) else tuple(_FUSION_TYPES)
        raise ConfigError(name, f"unknown parameter (from {origin}; known: {', '.join(known)})")
    try:
        values[name] = (_coerce(name, raw, t), origin)
    except ConfigError as e:
        if name[len(SERVICE_PREFIX):] in SECRET_FIELDS and name.startswith(SERVICE_PREFIX):
            e = ConfigError(name, "expected a string (the value is not shown)")
        raise _with_origin(e, origin) from None


def _with_origin(e: ConfigError, origin: str | None) -> ConfigError:
    if origin is None:
        return e
    message = str(e)[len(e.parameter) + 2:]
    return ConfigError(e.parameter, f"{message} (from {origin})")


def _build(values: _Values) -> ServiceConfig:
    fusion = {k[len(FUSION_PREFIX):]: v for k, (v, _) in values.items() if k.startswith(FUSION_PREFIX)}
    service = {k[len(SERVICE_PREFIX):]: v for k, (v, _) in values.items() if k.startswith(SERVICE_PREFIX)}
    try:
        return ServiceConfig(**service, fusion=FusionConfig(**fusion))
    except ConfigError as e:
        raise _with_origin(e, values.get(e.parameter, (None, None))[1]) from None


# --- command line -------------------------------------------------------------------------------

def flag_of(name: str) -> str:
    """The flag of a parameter: "service.data_dir" -> "--data-dir", "fusion.hidden_dim" -> "--fusion.hidden_dim"."""
    if name.startswith(SERVICE_PREFIX):
        return "--" + name[len(SERVICE_PREFIX):].replace("_", "-")
    return "--" + name


def dest_of(name: str) -> str:
    """The argparse dest of a parameter's flag: "service.port" -> "port" (ns.port),
    "fusion.hidden_dim" -> "fusion.hidden_dim" (getattr(ns, "fusion.hidden_dim"))."""
    return name[len(SERVICE_PREFIX):] if name.startswith(SERVICE_PREFIX) else name


def env_var_of(name: str) -> str:
    """The environment variable of a parameter: "service.port" -> "TITAN_FUSION_PORT",
    "fusion.hidden_dim" -> "TITAN_FUSION_FUSION_HIDDEN_DIM"."""
    if name.startswith(SERVICE_PREFIX):
        return ENV_PREFIX + name[len(SERVICE_PREFIX):].upper()
    return ENV_FUSION_PREFIX + name[len(FUSION_PREFIX):].upper()


def _arg_type(name: str, type_name: Any):
    def convert(text: str) -> Any:
        try:
            return _coerce(name, text, type_name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)[len(e.parameter) + 2:]) from None
    convert.__name__ = str(type_name)  # argparse names it in "invalid <type> value" messages
    return convert


def _metavar(name: str, type_name: Any) -> str:
    if type_name == "bool":
        return "{true,false}"
    if str(type_name).startswith("tuple"):
        return "NAME,..."
    if type_name in ("int", "float"):
        return "N" if type_name == "int" else "X"
    return name.rsplit(".", 1)[-1].upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config, a flag per service parameter (--port, --data-dir, ...) and one per model
    parameter (--fusion.hidden_dim, ...). Every flag defaults to None: not given."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"TOML file with [service] and [fusion] tables (default: ${CONFIG_ENV}, else none)")
    service = parser.add_argument_group("service", "overrides $TITAN_FUSION_<KEY> and the config file")
    fusion = parser.add_argument_group("fusion model", "overrides $TITAN_FUSION_FUSION_<KEY> and the config file")
    for name, default, description in describe_settings():
        group = service if name.startswith(SERVICE_PREFIX) else fusion
        t = _types_of(name)
        help_text = f"{description} (default: {default}; env {env_var_of(name)})".replace("%", "%%")
        group.add_argument(flag_of(name), dest=dest_of(name), default=None, type=_arg_type(name, t),
                           metavar=_metavar(name, t), help=help_text)


def settings_from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServiceConfig:
    """The ServiceConfig from parsed flags (add_arguments), the environment and the config file.
    env: None means os.environ."""
    overrides = {name: getattr(ns, dest_of(name), None) for name, _, _ in describe_settings()}
    return load_settings(file=getattr(ns, "config", None), env=env, overrides=overrides)


# --- documentation ------------------------------------------------------------------------------

def format_default(value: Any) -> str:
    """A default as TOML writes it: true, 32, 0.001, "127.0.0.1", []."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_default(v) for v in value) + "]"
    return repr(value)


def describe_settings() -> list[tuple[str, str, str]]:
    """(parameter, default, meaning) for every parameter: service.* then fusion.*, in declaration order."""
    service_defaults, fusion_defaults = ServiceConfig(), FusionConfig()
    rows = [(SERVICE_PREFIX + n, format_default(getattr(service_defaults, n)), SERVICE_HELP[n])
            for n in SERVICE_FIELDS]
    rows += [(FUSION_PREFIX + n, format_default(getattr(fusion_defaults, n)), FUSION_HELP[n])
             for n in _FUSION_TYPES]
    return rows


def settings_markdown() -> str:
    """The README's configuration table, generated from describe_settings()."""
    lines = ["| Parameter | Flag | Environment variable | Default | Meaning |",
             "|---|---|---|---|---|"]
    for name, default, description in describe_settings():
        lines.append(f"| `{name}` | `{flag_of(name)}` | `{env_var_of(name)}` | `{default}` | {description} |")
    return "\n".join(lines)
