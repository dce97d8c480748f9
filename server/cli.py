"""`titan-fusion`: run the service and talk to it.

    titan-fusion serve [--port P] [--metrics-port M] [--data-dir D] [--config FILE] [--fusion.<name> V ...]
    titan-fusion health [--target HOST:PORT]       exit 0 when SERVING (for container health checks)
    titan-fusion stats  [--target HOST:PORT]       training statistics and counters, as JSON
    titan-fusion demo   [--target HOST:PORT] [--events N] [--seed S]
                                                   stream synthetic experts and outcomes through a
                                                   running service; fused vs average accuracy
    titan-fusion backtest [--scenario S|all] [--seeds 1,2] [--events N] [--out DIR] [--target HOST:PORT]
                          [--fusion.<name> V ...]
                                                   prequential evaluation of the fusion against
                                                   baselines (server/backtest.py; --help for more)
    titan-fusion replay FILE [--target HOST:PORT] [--wait] [--max-message-bytes N]
                                                   bulk-send a history of outcomes (CSV or Parquet;
                                                   the layout is in server/replay.py)

health, stats, demo and replay also take --tls or --ca FILE [--cert FILE --key FILE]
[--tls-server-name NAME] [--token-file FILE]: TLS, mutual TLS and the bearer token (docs/security.md).

Only `serve` and `backtest` import torch. `stats` needs grpcio and protobuf alone (the client-only
install); `health` needs grpcio-health-checking, `demo` and `replay` tqdm, and `backtest` numpy and
matplotlib too: the server extra, which a command that lacks it names in one line. `backtest` has
its own parser (server/backtest.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time

DEFAULT_TARGET = "localhost:50051"


def _serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .errors import ConfigError, FusionError
    from .settings import settings_from_args
    try:
        config = settings_from_args(ns)
    except ConfigError as e:
        parser.error(str(e))
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .service import create_server
    try:
        service, port = create_server(config, freeze_gc=True)  # this process is the service's alone
    except FusionError as e:
        logging.getLogger("titan_fusion.server").error("%s", e)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ready_written = False
    while not stop.wait(0.2):
        if service.owner.failed is not None:
            logging.getLogger("titan_fusion.server").error("the model could not be recovered; exiting")
            service.stop(0)
            return 1
        if ns.ready_file and not ready_written and service.serving:
            tmp = ns.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"port": port, "metrics_port": service.metrics_port, "pid": os.getpid()}, f)
            os.replace(tmp, ns.ready_file)
            ready_written = True
    service.stop()
    return 0


TOKEN_ENV, TOKEN_FILE_ENV = "TITAN_FUSION_TOKEN", "TITAN_FUSION_TOKEN_FILE"


def client_security(ns: argparse.Namespace) -> tuple[object | None, str | None, list[tuple[str, str]]]:
    """(credentials, token, channel options) from the connection flags of health/stats/demo:
    --ca/--cert/--key/--tls/--tls-server-name and --token-file (else $TITAN_FUSION_TOKEN, else the
    first line of $TITAN_FUSION_TOKEN_FILE). Needs grpc only (no torch). Raises SystemExit(2) with
    a message for unusable flags or files; the token itself is never printed."""
    credentials, options = None, []
    if ns.ca or ns.cert or ns.key or ns.tls or ns.tls_server_name:
        from titan_fusion.client.client import tls_credentials
        try:
            credentials = tls_credentials(ns.ca, ns.cert, ns.key)
        except (OSError, ValueError) as e:
            raise SystemExit(f"titan-fusion {ns.command}: TLS files: {e}") from None
        if ns.tls_server_name:
            options.append(("grpc.ssl_target_name_override", ns.tls_server_name))
    token_file = ns.token_file or (None if os.environ.get(TOKEN_ENV) else os.environ.get(TOKEN_FILE_ENV) or None)
    token = os.environ.get(TOKEN_ENV) or None
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as e:
            raise SystemExit(f"titan-fusion {ns.command}: --token-file {token_file}: {e.strerror or e}") from None
        if not lines:
            raise SystemExit(f"titan-fusion {ns.command}: --token-file {token_file}: holds no token")
        token = lines[0]
    return credentials, token, options


def _health(ns: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    credentials, token, options = client_security(ns)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    channel = (grpc.secure_channel(ns.target, credentials, options=options) if credentials is not None
               else grpc.insecure_channel(ns.target))
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=ns.service),
                                                            timeout=ns.timeout, metadata=metadata)
        except grpc.RpcError as e:
            print(f"{ns.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{ns.target}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def _stats(ns: argparse.Namespace) -> int:
    from titan_fusion.client import FusionClient, FusionClientError
    credentials, token, options = client_security(ns)
    with FusionClient(ns.target, timeout=ns.timeout, credentials=credentials, token=token, options=options) as client:
        try:
            stats = client.stats()
        except FusionClientError as e:
            print(f"{ns.target}: {e}", file=sys.stderr)
            return 1
    from titan_fusion.client.convert import json_finite  # null for NaN/infinity ("no value yet"): strict JSON
    print(json.dumps(json_finite(stats), indent=2, sort_keys=True, default=str, allow_nan=False))
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from titan_fusion.client import FusionClient, FusionClientError

    from .synthetic import informative_stream
    run = f"demo-{int(time.time())}"
    # Scored from the end of the warm-up on, whatever served: the fusion, or the average while
    # live scoring found the fusion underperforming. Leaving those out would score the fusion on
    # the stretches it did well only.
    hits = avg = scored = by_fusion = 0
    loss_served = loss_avg = 0.0
    credentials, token, options = client_security(ns)
    with FusionClient(ns.target, timeout=ns.timeout, fallback=False, credentials=credentials, token=token,
                      options=options) as client:
        bar = tqdm(informative_stream(ns.seed, ns.events), total=ns.events, unit="event", mininterval=0.5)
        try:
            for i, (experts, features, direction) in enumerate(bar):
                event_id = f"{run}:{i}"
                p = client.predict(experts, features, event_id=event_id)
                mean = sum(e["prob_up"] for e in experts) / len(experts)
                up = direction == "UP"
                if p.reason != "warming_up":
                    scored += 1
                    by_fusion += p.source == "fusion"
                    hits += (p.prob_up > 0.5) == up
                    avg += (mean > 0.5) == up
                    loss_served -= math.log(max(p.prob_up if up else p.prob_down, 1e-12))
                    loss_avg -= math.log(max(mean if up else 1.0 - mean, 1e-12))
                    bar.set_postfix_str(f"served {hits / scored:.3f} vs average {avg / scored:.3f} "
                                        f"over {scored}", refresh=False)
                else:
                    bar.set_postfix_str(f"{p.source} ({p.reason})", refresh=False)
                client.record_outcome(actual_direction=direction, event_id=event_id)
        except FusionClientError as e:
            print(f"\n{ns.target}: {e}", file=sys.stderr)
            return 1
    if scored:
        print(f"forecasts after the warm-up: {scored} ({by_fusion} by the fusion, {scored - by_fusion} by the average "
              f"while the fusion underperformed or was disabled); accuracy served {hits / scored:.3f}, plain average "
              f"{avg / scored:.3f}; log loss served {loss_served / scored:.4f}, plain average {loss_avg / scored:.4f}")
    else:
        print("the service is still warming up (fewer than min_samples outcomes): send more events")
    return 0


def _replay(ns: argparse.Namespace) -> int:
    from .replay import main as replay
    credentials, token, options = client_security(ns)
    if options:  # replay.main takes no channel options
        raise SystemExit("titan-fusion replay: --tls-server-name is not supported; dial a name the certificate holds")
    if ns.max_message_bytes is not None and ns.max_message_bytes < 1:
        raise SystemExit(f"titan-fusion replay: --max-message-bytes must be >= 1, got {ns.max_message_bytes}")
    return replay(ns.target, ns.file, wait=ns.wait, timeout=ns.timeout, credentials=credentials, token=token,
                  max_message_bytes=ns.max_message_bytes)


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """TLS and token flags of the client commands (docs/security.md)."""
    g = p.add_argument_group("security", "TLS and the bearer token (docs/security.md)")
    g.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA roots (implied by --ca)")
    g.add_argument("--ca", metavar="FILE", help="PEM CA bundle that signed the service's certificate (implies TLS)")
    g.add_argument("--cert", metavar="FILE", help="this client's PEM certificate, for mutual TLS (with --key)")
    g.add_argument("--key", metavar="FILE", help="this client's PEM private key, for mutual TLS (with --cert)")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="name expected in the service's certificate when it differs from the target's host")
    g.add_argument("--token-file", metavar="FILE",
                   help=f"file whose first line is the bearer token (default: ${TOKEN_ENV}, else the file "
                        f"${TOKEN_FILE_ENV} names)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titan-fusion", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the gRPC service",
                           description="Run the service. Configuration: defaults < TOML file < "
                                       "environment (TITAN_FUSION_*) < these flags.")
    from .settings import add_arguments
    add_arguments(serve)
    serve.add_argument("--ready-file", metavar="PATH",
                       help="write {port, metrics_port, pid} as JSON here once the service is SERVING")
    for name, help_ in (("health", "exit 0 if the service is SERVING"),
                        ("stats", "print the service's statistics as JSON"),
                        ("demo", "stream synthetic events through a running service"),
                        ("replay", "bulk-send a history of outcomes from a CSV or Parquet file")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--target", default=DEFAULT_TARGET, help=f"HOST:PORT of the service (default {DEFAULT_TARGET})")
        if name == "replay":  # one call streams the whole file
            p.add_argument("--timeout", type=float, default=3600.0,
                           help="deadline of the whole stream (and of each Stats call of --wait), "
                                "seconds (default 3600)")
        else:
            p.add_argument("--timeout", type=float, default=2.0, help="deadline of each call, seconds (default 2)")
        add_connection_arguments(p)
        if name == "health":
            p.add_argument("--service", default="", help="service name to check (default: the server as a whole)")
        if name == "replay":
            p.add_argument("file", help="CSV (or Parquet) of outcomes; columns: event_id, actual_direction, "
                                        "expert.<name>, confidence.<name>, feature.<name>")
            p.add_argument("--wait", action="store_true", help="wait until training has caught up with the journal")
            p.add_argument("--max-message-bytes", type=int, default=None, metavar="N",
                           help="largest message to send (default 262144): at most the server's "
                                "service.max_message_bytes")
        if name == "demo":
            p.add_argument("--events", type=int, default=3000, help="events to stream (default 3000)")
            p.add_argument("--seed", type=int, default=0, help="seed of the synthetic stream (default 0)")
    # Listed here for --help; main() hands its arguments to server/backtest.py before parsing.
    sub.add_parser("backtest", add_help=False, help="prequential evaluation of the fusion against baselines "
                                                    "(titan-fusion backtest --help)")
    return parser


# Top-level modules of the `server` extra (pyproject.toml): a client-only install lacks them.
SERVER_EXTRA_MODULES = frozenset({"torch", "numpy", "numba", "orjson", "prometheus_client", "grpc_health",
                                  "grpc_reflection", "grpc_status", "tqdm", "matplotlib"})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args[:1] == ["backtest"]:
            from .backtest import main as backtest_main
            return backtest_main(args[1:])
        parser = build_parser()
        ns = parser.parse_args(argv)
        if ns.command == "serve":
            return _serve(ns, parser)
        return {"health": _health, "stats": _stats, "demo": _demo, "replay": _replay}[ns.command](ns)
    except ModuleNotFoundError as e:  # a client-only install (pip install titan-fusion): say what to add
        if e.name not in SERVER_EXTRA_MODULES:  # a submodule missing is a broken install: the traceback
            raise
        command = args[0] if args else "titan-fusion"
        raise SystemExit(f"titan-fusion {command}: needs {e.name}, which comes with the server extra: "
                         "pip install 'titan-fusion[server]'") from e


if __name__ == "__main__":
    sys.exit(main())
