"""`make soak`: mixed Predict / RecordOutcome load on a real server process for a while.

Each of `--clients` async clients loops: Predict with an event_id, then RecordOutcome by that
event_id alone (every tenth by full inputs, every twentieth a deliberate duplicate). Reports
requests served, errors by status code, and the server's resident memory after the warm-up and at
the end (target: growth under 5% over 10 minutes; zero errors but deliberate overload).

    python -m titan_fusion.server.soak [--seconds 600] [--clients 8] [--warmup 60]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc

from titan_fusion.client.client import CHANNEL_OPTIONS
from titan_fusion.client.convert import to_expert_forecasts
from titan_fusion.client.pb import fusion_pb2 as pb
from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc

from .bench import _spawn, rss_mib
from .synthetic import informative_stream


def _request(experts, features, event_id=""):
    return pb.PredictRequest(experts=to_expert_forecasts(experts), features=features, event_id=event_id)


async def _client(stub, k: int, stop_at: float, counts: collections.Counter, errors: collections.Counter) -> None:
    for i, (experts, features, direction) in enumerate(informative_stream(1000 + k, 10**9)):
        if time.monotonic() > stop_at:
            return
        event_id = f"soak-{k}-{i}"
        d = pb.DIRECTION_UP if direction == "UP" else pb.DIRECTION_DOWN
        try:
            await stub.Predict(_request(experts, features, event_id), timeout=10)
            counts["Predict"] += 1
            if i % 10 == 0:
                req = _request(experts, features)
                outcome = pb.RecordOutcomeRequest(experts=req.experts, features=features, event_id=event_id,
                                                  actual_direction=d)
            else:
                outcome = pb.RecordOutcomeRequest(event_id=event_id, actual_direction=d)
            await stub.RecordOutcome(outcome, timeout=10)
            counts["RecordOutcome"] += 1
            if i % 20 == 0:
                ack = await stub.RecordOutcome(outcome, timeout=10)
                counts["duplicate acknowledged" if ack.duplicate else "DUPLICATE TRAINED"] += 1
        except grpc.aio.AioRpcError as e:
            errors[e.code().name] += 1


async def _run(target: str, clients: int, seconds: float, warmup: float, pid: int) -> dict:
    channel = grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))
    stub = pb_grpc.FusionServiceStub(channel)
    counts: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    started = time.monotonic()
    stop_at = started + seconds
    tasks = [asyncio.create_task(_client(stub, k, stop_at, counts, errors)) for k in range(clients)]
    await asyncio.sleep(min(warmup, seconds / 2))
    rss_warm = rss_mib(pid)
    samples = [(round(time.monotonic() - started), rss_warm)]
    while any(not t.done() for t in tasks):
        await asyncio.sleep(min(30.0, max(1.0, seconds / 20)))
        samples.append((round(time.monotonic() - started), rss_mib(pid)))
        print(f"  t={samples[-1][0]:>5}s  served {sum(counts.values()):>9,}  errors {dict(errors)}  "
              f"rss {samples[-1][1]:.1f} MiB", flush=True)
    await asyncio.gather(*tasks)
    stats = await stub.Stats(pb.StatsRequest(), timeout=10)
    await channel.close()
    rss_end = rss_mib(pid)
    return {"seconds": seconds, "clients": clients, "served": dict(counts), "errors": dict(errors),
            "rss_mib_after_warmup": rss_warm, "rss_mib_end": rss_end,
            "rss_growth_pct": 100.0 * (rss_end - rss_warm) / rss_warm, "rss_samples": samples,
            "samples_trained": stats.training.samples_trained}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="how long to load the server (default 600)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the baseline RSS (default 60)")
    ap.add_argument("--out", default="bench-results/soak.json")
    ns = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="titan-soak-") as tmp:
        proc, info = _spawn([sys.executable, "-m", "titan_fusion.server.cli", "serve", "--port", "0",
                             "--metrics-port", "0", "--data-dir", str(Path(tmp) / "data"),
                             "--ready-file", str(Path(tmp) / "ready.json"), "--log-level", "WARNING"],
                            Path(tmp) / "ready.json")
        try:
            print(f"soak: {ns.clients} clients for {ns.seconds:.0f} s against pid {info['pid']}")
            result = asyncio.run(_run(f"127.0.0.1:{info['port']}", ns.clients, ns.seconds, ns.warmup, info["pid"]))
        finally:
            proc.terminate()
            proc.wait(30)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=2))
    ok = not result["errors"] and "DUPLICATE TRAINED" not in result["served"]
    print(f"{'OK' if ok else 'FAILED'}: RSS {result['rss_mib_after_warmup']:.1f} -> {result['rss_mib_end']:.1f} MiB "
          f"({result['rss_growth_pct']:+.2f}%), errors {result['errors'] or 'none'}; JSON: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
