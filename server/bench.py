"""`make bench`: what titan-fusion costs, beside the floors it cannot beat, measured in one run.

Floors, measured in the same run and on the same stack:
- in-process: the same TransformerFusion API serving the plain average (fusion.enabled = false),
  and update() before min_samples (validation and buffering, no training step);
- over gRPC: a bare echo service (Python grpcio, bytes in, bytes out, no protobuf, no model) in its
  own process, like the fusion service, and in the same server the service's Predict answered
  without a model (the same protobuf messages, an answer built once): what protobuf and a servicer
  cost before the service does anything; and the model alone (the service's request conversion,
  forecast and answer building, with nothing of the service around them): what the model costs on
  this stack, and so what the service adds to it. Latency blocks of the four alternate, so that
  drift of this noisy machine hits them alike;
- Predict p99 beside a plain CPU loop in another process (at the trainer's priority, on its CPU):
  what the trainer's CPU use alone does to Predict on this machine, next to what its training does.

Figures: in-process forward (back to back, and with 20 ms of sleep before each call, beside the
plain average the same way) and training step; Predict p50/p99 one call at a time, back to back
and spaced as a trader's decisions (20 ms of sleep before each call, as before each of the echo's
and the model alone's, in turn); Predict p99
while the service learns a bulk backlog (its trainer busy throughout: training at full rate), and
while another process records outcomes one at a time as fast as the service acknowledges them
(training at the pace of those round trips, with their RPCs on the same cores);
throughput and p99 with 1, 8 and 32 calls in flight (grpc.aio); RecordOutcome throughput; bulk
replay (acknowledged/s, and the service's learning against the in-process class, alternating in
blocks); the server's resident memory. Prints a table with ratios, writes JSON (bench-results/bench.json).
Timings are never asserted in tests; they are recorded in docs/PERFORMANCE.md.

    python -m titan_fusion.server.bench [--quick] [--out FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

ECHO_METHOD = "/titan.bench.Echo/Echo"
FORECAST_METHOD = "/titan.bench.Echo/Forecast"  # the model alone, beside the echo (serve_echo)
IDLE_S = 0.02  # "after idle" rows: sleep before each call (calls spaced as a trader's decisions)
BULK_BLOCKS = 5  # bulk replay: service and in-process baseline alternate over this many blocks


# ---------------------------------------------------------------- the floors (own process)
def serve_echo(ready_file: str) -> None:
    """The floors over gRPC, in one grpcio server (the same stack as the service):

    - the bare echo (bytes in, bytes out);
    - the service's Predict answered without a model: the same protobuf messages, parsed and
      serialized, and an answer built once (for the first request) and returned as it is;
    - the model alone (FORECAST_METHOD): the service's own request conversion, a single-event
      forecast of a TransformerFusion trained in this process on the same warm-up outcomes as the
      service (a Snapshot, as the service predicts with), and the service's answer building, with
      none of the service around it (no predictor queue, owner, metrics, interceptor or checks).
      Like the other floors it runs in this process, which is not pinned to a CPU as the service's is.

    The second minus the echo is protobuf's and a servicer's cost; the third minus the second, the
    model's own; the service's Predict minus the third, what the service adds to it."""
    import grpc

    from titan_fusion.client.client import SERVER_KEEPALIVE_OPTIONS
    from titan_fusion.client.convert import to_expert_forecasts
    from titan_fusion.client.pb import fusion_pb2 as pb
    from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc
    from titan_fusion.server.fusion import TransformerFusion
    from titan_fusion.server.inference import Prediction
    from titan_fusion.server.service import event_from_proto, prediction_to_proto
    from titan_fusion.server.settings import ServiceConfig

    class ConstantPredict(pb_grpc.FusionServiceServicer):
        answer: pb.PredictResponse | None = None

        def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
            if self.answer is None:  # what the service answers, in shape: an attention weight per expert
                n = len(request.experts)
                self.answer = pb.PredictResponse(
                    prob_up=0.5, prob_down=0.5, source=pb.SOURCE_FUSION, model_version=1, event_id=request.event_id,
                    attention=[pb.ExpertWeight(name=e.name, weight=1.0 / n) for e in request.experts])
            return self.answer

    # the service's model on the same outcomes, as the service sees them (the same request fields)
    import torch
    torch.set_num_threads(1)  # as the trainer process (server/trainer.py): the warm-up trains
    defaults = ServiceConfig()
    fusion = TransformerFusion(defaults.fusion, n_models=defaults.n_models)
    for e, f, d in warm_up_events():
        fusion.learn(event_from_proto(to_expert_forecasts(e), f), 1 if d == "UP" else 0)
    snapshot = fusion.snapshot().prepare()

    def forecast(request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        p = snapshot.predict_one(event_from_proto(request.experts, request.features), "experts")
        if not isinstance(p, Prediction) or p.source != "fusion":
            raise RuntimeError(f"the model-only floor did not forecast with the fusion: {p}")
        return prediction_to_proto(p, request.event_id)

    handler = grpc.method_handlers_generic_handler("titan.bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
        FORECAST_METHOD.rsplit("/", 1)[1]: grpc.unary_unary_rpc_method_handler(
            forecast, request_deserializer=pb.PredictRequest.FromString,
            response_serializer=pb.PredictResponse.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=list(SERVER_KEEPALIVE_OPTIONS))
    server.add_generic_rpc_handlers((handler,))
    pb_grpc.add_FusionServiceServicer_to_server(ConstantPredict(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(ready_file).write_text(json.dumps({"port": port, "pid": os.getpid()}))
    server.wait_for_termination()


def _forecast_call(channel):
    """The model-alone floor's method (FORECAST_METHOD) on a channel to serve_echo, sync or aio."""
    from titan_fusion.client.pb import fusion_pb2 as pb
    return channel.unary_unary(FORECAST_METHOD, request_serializer=pb.PredictRequest.SerializeToString,
                               response_deserializer=pb.PredictResponse.FromString)


def warm_up_events() -> list:
    """The outcomes the service learns before Predict is measured (past min_samples: the fusion
    serves); the model-only floor learns the same ones."""
    from titan_fusion.server.synthetic import informative_stream
    return list(informative_stream(3, 400))


# ---------------------------------------------------------------- a plain CPU load (own process)
def cpu_load(seconds: float) -> None:
    """A pure-Python loop at the trainer process's priority (server/trainer.py lower_priority) and
    on the trainer's CPU (trainer_cpus "auto": the last one): what the trainer's CPU use alone
    does to Predict on this machine, without its training."""
    from titan_fusion.server import cpus
    from titan_fusion.server.trainer import lower_priority
    lower_priority()
    split = cpus.split(cpus.AUTO, cpus.available())
    if split is not None:
        os.sched_setaffinity(0, split.trainer)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(range(1000))


# ---------------------------------------------------------------- outcome load (own process)
def outcome_load(target: str, seconds: float, seed: int) -> None:
    """Record outcomes back to back for `seconds`: the service trains at full rate."""
    from titan_fusion.client import FusionClient
    from titan_fusion.server.synthetic import informative_stream
    n = 0
    deadline = time.monotonic() + seconds
    with FusionClient(target, timeout=10) as client:
        for i, (experts, feats, direction) in enumerate(informative_stream(seed, 10**9)):
            if time.monotonic() > deadline:
                break
            client.record_outcome(experts, feats, actual_direction=direction, event_id=f"load-{seed}-{i}")
            n += 1
    print(json.dumps({"outcomes": n, "seconds": seconds}))


# ---------------------------------------------------------------- helpers
def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"n": len(s), "p50_us": q(0.50) * 1e6, "p99_us": q(0.99) * 1e6, "mean_us": statistics.fmean(s) * 1e6}


def _spawn(args: list[str], ready_file: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode() if proc.poll() is not None else "timeout"
            proc.kill()
            raise RuntimeError(f"{args[:4]} did not start: {err[-2000:]}")
        time.sleep(0.05)
    return proc, json.loads(ready_file.read_text())


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` and all its descendants (the service's trainer process and
    the fork server it comes from), MiB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, ()))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total if total else float("nan")


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "grpcio": grpc.__version__, "platform": platform.platform()}


# ---------------------------------------------------------------- in-process
def bench_in_process(quick: bool) -> dict:
    import torch
    torch.set_num_threads(1)
    from titan_fusion.server.fusion import TransformerFusion
    from titan_fusion.server.synthetic import informative_stream
    events = list(informative_stream(7, 3000))
    fusion = TransformerFusion(n_models=4)
    for e, f, d in events[:400]:
        fusion.update(e, f, d)
    average = TransformerFusion(n_models=4, config={"enabled": False})
    experts, feats, _ = events[401]
    n = 2000 if quick else 10000
    fusion.forward(experts, feats)
    res = {"forward": percentiles(_sequential(lambda: fusion.forward(experts, feats), n)),
           "forward_average_floor": percentiles(_sequential(lambda: average.forward(experts, feats), n))}
    # the same with IDLE_S of sleep before each call: the same work after an idle pause
    spaced = _spaced({"forward": lambda: fusion.forward(experts, feats),
                      "forward_average_floor": lambda: average.forward(experts, feats)},
                     100 if quick else 400, IDLE_S)
    res.update({f"{k}_after_idle": percentiles(v) for k, v in spaced.items()})
    # a training step of batch 32, as update() runs it
    steps = 300 if quick else 1500
    res["train_step_batch32"] = percentiles(_sequential(fusion._step, steps))
    # update() with its training step (early stopping off, so that every update trains), against
    # update() before min_samples (validation and buffering, no step): the floor
    busy = TransformerFusion(n_models=4, config={"early_stopping_patience": 10**9})
    for e, f, d in events[:400]:
        busy.update(e, f, d)
    it = iter(events[400:])
    res["update_with_step"] = percentiles(_sequential(lambda: busy.update(*next(it)), min(steps, 2000)))
    cold = TransformerFusion(n_models=4, config={"min_samples": 10**9})
    it2 = iter(events)
    res["update_no_training_floor"] = percentiles(_sequential(lambda: cold.update(*next(it2)), min(steps, 2000)))
    return res


# ---------------------------------------------------------------- over gRPC
def _sequential(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def _spaced(calls: dict, n: int, idle: float) -> dict[str, list[float]]:
    """Latencies of each of `calls` (name -> call), one at a time with `idle` seconds of sleep before
    each call, in turn, n rounds: a trader's regime (one call per decision, the processes idle
    between). Taking turns shares drift."""
    out: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(n):
        for k, call in calls.items():
            time.sleep(idle)
            t = time.perf_counter()
            call()
            out[k].append(time.perf_counter() - t)
    return out


def _sequential_for(call, seconds: float) -> list[float]:
    """Latencies of `call`, one at a time, for about `seconds`."""
    out: list[float] = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        out += _sequential(call, 200)
    return out


def _predicts_beside(call, bench_args: list[str], seconds: float) -> tuple[list[float], str]:
    """Latencies of `call`, one at a time, while `python -m titan_fusion.server.bench *bench_args
    --seconds S` runs in another process (from 1 s after its start to 1 s before its end); and
    what that process printed. Raises if it failed: the figures would not be what they say."""
    proc = subprocess.Popen([sys.executable, "-m", "titan_fusion.server.bench", *bench_args, "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    lat = _sequential_for(call, seconds - 2.0)
    out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"bench {' '.join(bench_args)} failed: {err[-2000:]}")
    return lat, out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (all its threads, not its children), in
    seconds; NaN where /proc cannot tell (not Linux, or the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (ticks)


async def _in_flight(make_call, concurrency: int, seconds: float, server_pid: int) -> dict:
    """Throughput and latency with `concurrency` calls in flight for `seconds`, and the CPU time the
    server process (`server_pid`) spent meanwhile, per call and in CPUs kept busy, and the CPUs this
    (the client's) process kept busy."""
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker():
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await make_call()
            lat.append(time.perf_counter() - t)
    cpu0, mine0, t0 = cpu_seconds(server_pid), cpu_seconds(os.getpid()), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu, mine = cpu_seconds(server_pid) - cpu0, cpu_seconds(os.getpid()) - mine0
    return {"concurrency": concurrency, "calls_per_s": len(lat) / elapsed, **percentiles(lat),
            "server_cpu_us_per_call": cpu / len(lat) * 1e6, "server_cpus_busy": cpu / elapsed,
            "client_cpus_busy": mine / elapsed}


def bench_grpc(quick: bool, tmp: Path) -> dict:
    import grpc

    from titan_fusion.client.client import CHANNEL_OPTIONS
    from titan_fusion.client.convert import to_expert_forecasts
    from titan_fusion.client.pb import fusion_pb2 as pb
    from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc
    from titan_fusion.server.synthetic import informative_stream

    py = sys.executable
    echo_proc, echo = _spawn([py, "-m", "titan_fusion.server.bench", "--echo-server", str(tmp / "echo.json")],
                             tmp / "echo.json")
    fusion_proc, fus = _spawn([py, "-m", "titan_fusion.server.cli", "serve", "--port", "0", "--metrics-port", "-1",
                               "--data-dir", str(tmp / "data"), "--ready-file", str(tmp / "fusion.json"),
                               "--log-level", "WARNING", "--checkpoint-every", "0"], tmp / "fusion.json")
    res: dict = {}
    try:
        target = f"127.0.0.1:{fus['port']}"
        echo_target = f"127.0.0.1:{echo['port']}"
        channel = grpc.insecure_channel(target, options=list(CHANNEL_OPTIONS))
        echo_channel = grpc.insecure_channel(echo_target, options=list(CHANNEL_OPTIONS))
        stub = pb_grpc.FusionServiceStub(channel)
        echo_call = echo_channel.unary_unary(ECHO_METHOD)
        const_stub = pb_grpc.FusionServiceStub(echo_channel)  # Predict without a model (serve_echo)
        model_call = _forecast_call(echo_channel)  # the model alone (serve_echo)
        events = list(informative_stream(3, 1500))

        def to_req(e, f):
            return pb.PredictRequest(experts=to_expert_forecasts(e), features=f)
        for i, (e, f, d) in enumerate(warm_up_events()):  # past min_samples: the fusion serves
            stub.RecordOutcome(pb.RecordOutcomeRequest(
                experts=to_req(e, f).experts, features=f, event_id=f"warm-{i}",
                actual_direction=pb.DIRECTION_UP if d == "UP" else pb.DIRECTION_DOWN), timeout=10)
        req = to_req(*events[500][:2])
        served, alone = stub.Predict(req, timeout=5), model_call(req, timeout=5)
        assert served.source == pb.SOURCE_FUSION
        assert abs(served.prob_up - alone.prob_up) < 1e-6, (served.prob_up, alone.prob_up)  # the same model
        payload = req.SerializeToString()
        for _ in range(300):  # warm every path
            echo_call(payload, timeout=5)
            const_stub.Predict(req, timeout=5)
            model_call(req, timeout=5)
            stub.Predict(req, timeout=5)
        blocks, per_block = (4, 500) if quick else (10, 1000)
        echo_lat: list[float] = []
        const_lat: list[float] = []
        model_lat: list[float] = []
        pred_lat: list[float] = []
        for _ in range(blocks):
            echo_lat += _sequential(lambda: echo_call(payload, timeout=5), per_block)
            const_lat += _sequential(lambda: const_stub.Predict(req, timeout=5), per_block)
            model_lat += _sequential(lambda: model_call(req, timeout=5), per_block)
            pred_lat += _sequential(lambda: stub.Predict(req, timeout=5), per_block)
        res["echo_sequential"] = percentiles(echo_lat)
        res["constant_predict_sequential"] = percentiles(const_lat)
        res["model_only_sequential"] = percentiles(model_lat)
        res["predict_sequential"] = percentiles(pred_lat)
        # one call per decision: IDLE_S of sleep before each call (the trader's regime)
        spaced = _spaced({"echo": lambda: echo_call(payload, timeout=5),
                          "model_only": lambda: model_call(req, timeout=5),
                          "predict": lambda: stub.Predict(req, timeout=5)}, 60 if quick else 300, IDLE_S)
        res.update({f"{k}_after_idle": percentiles(v) for k, v in spaced.items()})

        # Predict while another process records outcomes at full rate (training on every outcome)
        load_seconds = 6 if quick else 15
        predict = lambda: stub.Predict(req, timeout=5)  # noqa: E731
        busy, out = _predicts_beside(predict, ["--outcome-load", target], load_seconds)
        load_stats = json.loads(out.strip().splitlines()[-1])
        idle_again = _sequential(predict, len(busy))
        res["predict_while_training"] = percentiles(busy)
        res["predict_idle_after"] = percentiles(idle_again)
        res["record_outcome_sequential_per_s"] = load_stats["outcomes"] / load_stats["seconds"]
        # the same while a plain CPU loop runs in another process instead (at the trainer's
        # priority, on its CPU): what the trainer's CPU use alone does to Predict p99 here
        beside_loop, _ = _predicts_beside(predict, ["--cpu-load"], load_seconds)
        res["predict_beside_cpu_loop"] = percentiles(beside_loop)

        # throughput with calls in flight (grpc.aio), echo and Predict alternately
        seconds = 2.0 if quick else 4.0

        echo_pid, service_pid = echo["pid"], fus["pid"]

        async def flights():
            out = {}
            ach = grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))
            ech = grpc.aio.insecure_channel(echo_target, options=list(CHANNEL_OPTIONS))
            astub = pb_grpc.FusionServiceStub(ach)
            aecho = ech.unary_unary(ECHO_METHOD)
            aconst = pb_grpc.FusionServiceStub(ech)
            amodel = _forecast_call(ech)
            for c in (1, 8, 32):
                out[f"echo_inflight_{c}"] = await _in_flight(lambda: aecho(payload, timeout=10), c, seconds, echo_pid)
                if c == 32:
                    out[f"constant_predict_inflight_{c}"] = await _in_flight(
                        lambda: aconst.Predict(req, timeout=10), c, seconds, echo_pid)
                    out[f"model_only_inflight_{c}"] = await _in_flight(
                        lambda: amodel(req, timeout=10), c, seconds, echo_pid)
                out[f"predict_inflight_{c}"] = await _in_flight(
                    lambda: astub.Predict(req, timeout=10), c, seconds, service_pid)
            # RecordOutcome with 8 in flight: group commits
            counter = iter(range(10**9))
            ev = events[600]

            def outcome():
                i = next(counter)
                return astub.RecordOutcome(pb.RecordOutcomeRequest(
                    experts=to_req(*ev[:2]).experts, features=ev[1], event_id=f"tp-{i}",
                    actual_direction=pb.DIRECTION_UP), timeout=30)
            out["record_outcome_inflight_8"] = await _in_flight(outcome, 8, seconds, service_pid)
            await ach.close()
            await ech.close()
            return out
        res.update(asyncio.run(flights()))

        # memory: resident size after 10,000 Predicts and after many more (32 in flight)
        async def many(n: int) -> None:
            ach = grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))
            astub = pb_grpc.FusionServiceStub(ach)
            left = [n]

            async def worker():
                while left[0] > 0:
                    left[0] -= 1
                    await astub.Predict(req, timeout=10)
            await asyncio.gather(*(worker() for _ in range(32)))
            await ach.close()
        n_total = 40_000 if quick else 200_000
        asyncio.run(many(10_000))
        rss_10k = rss_mib(fus["pid"])
        asyncio.run(many(n_total - 10_000))
        res["server_rss_mib"] = {"after_10000_predicts": rss_10k, f"after_{n_total}_predicts": rss_mib(fus["pid"])}

        channel.close()
        echo_channel.close()
    finally:
        for p in (echo_proc, fusion_proc):
            _stop(p)
    # bulk replay: RecordOutcomeBatches journaled and acknowledged, then training catching up; on
    # its own service, with the services above stopped
    res["bulk_replay"] = bench_bulk(tmp, quick)
    return res


def bench_bulk(tmp: Path, quick: bool) -> dict:
    """On a fresh service, after the same 400 warm-up outcomes as an in-process TransformerFusion:
    N outcomes in BULK_BLOCKS blocks. Each block is streamed in RecordOutcomeBatches (timed until
    acknowledged: journaled) and learned by the service (timed until its model has learned them),
    then learned by the in-process class, which has the same history, so the same schedule (early
    stopping pauses alike). Service and baseline alternate block by block, so that this VM's drift
    hits both alike; the rates are over all blocks. Then the same rows under new event_ids through
    RecordOutcomes, one per message: acknowledged/s."""
    import grpc
    import torch
    from titan_fusion.client.client import BULK_ROWS_PER_MESSAGE, CHANNEL_OPTIONS
    from titan_fusion.client.convert import to_expert_forecasts
    from titan_fusion.client.pb import fusion_pb2 as pb
    from titan_fusion.client.pb import fusion_pb2_grpc as pb_grpc
    from titan_fusion.server.fusion import TransformerFusion
    from titan_fusion.server.synthetic import informative_stream
    n = 3_000 if quick else 10_000
    warm = warm_up_events()
    events = list(informative_stream(23, n))

    # messages built before the clock starts, BULK_ROWS_PER_MESSAGE rows to a batch
    def rows(evs, prefix):
        return [pb.RecordOutcomeRequest(
            experts=to_expert_forecasts(e), features=f,
            event_id=f"{prefix}-{i}", actual_direction=pb.DIRECTION_UP if d == "UP" else pb.DIRECTION_DOWN)
            for i, (e, f, d) in enumerate(evs)]

    def batches(rs):
        return [pb.RecordOutcomeBatch(outcomes=rs[i:i + BULK_ROWS_PER_MESSAGE])
                for i in range(0, len(rs), BULK_ROWS_PER_MESSAGE)]
    bulk_rows = rows(events, "bulk")
    size = -(-n // BULK_BLOCKS)
    blocks = [(events[i:i + size], batches(bulk_rows[i:i + size])) for i in range(0, n, size)]

    torch.set_num_threads(1)
    local = TransformerFusion(n_models=4)
    for e, feats, d in warm:
        local.update(e, feats, d)
    steps0 = local.version
    proc, info = _spawn([sys.executable, "-m", "titan_fusion.server.cli", "serve", "--port", "0", "--metrics-port", "-1",
                         "--data-dir", str(tmp / "bulk-data"), "--ready-file", str(tmp / "bulk.json"),
                         "--log-level", "WARNING", "--checkpoint-every", "0"], tmp / "bulk.json")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{info['port']}", options=list(CHANNEL_OPTIONS))
        stub = pb_grpc.FusionServiceStub(channel)
        warm_ack = stub.RecordOutcomeBatches(iter(batches(rows(warm, "warm"))), timeout=600)
        _wait_applied(stub, warm_ack.journal_sequence)
        service_steps0 = stub.Stats(pb.StatsRequest(), timeout=10).training.train_steps
        acked = learned = in_process = 0.0
        for evs, reqs in blocks:
            t0 = time.perf_counter()
            resp = stub.RecordOutcomeBatches(iter(reqs), timeout=600)
            acked += time.perf_counter() - t0
            assert resp.accepted == len(evs), resp
            _wait_applied(stub, resp.journal_sequence)
            learned += time.perf_counter() - t0
            t1 = time.perf_counter()
            for e, feats, d in evs:
                local.update(e, feats, d)
            in_process += time.perf_counter() - t1
        service_steps = stub.Stats(pb.StatsRequest(), timeout=10).training.train_steps - service_steps0
        # the same rows once more (new event_ids), one per message: what batching saves
        singles = rows(events, "rows")
        t0 = time.perf_counter()
        single = stub.RecordOutcomes(iter(singles), timeout=600)
        one_per_message = single.accepted / (time.perf_counter() - t0)
        _wait_applied(stub, single.journal_sequence)
        while_training = _predict_while_catching_up(stub, n / learned, batches, rows, quick)
        channel.close()
    finally:
        _stop(proc)
    return {"outcomes": n, "blocks": len(blocks), "acked_per_s": n / acked, "trained_per_s": n / learned,
            "train_steps": service_steps, "one_row_per_message_acked_per_s": one_per_message,
            "in_process_trained_per_s": n / in_process, "in_process_train_steps": local.version - steps0,
            "training_speed_ratio": in_process / learned, **while_training}


def _predict_while_catching_up(stub, trained_per_s: float, batches, rows, quick: bool) -> dict:
    """Predict latency one call at a time on an idle service, then while it learns a bulk backlog,
    which keeps its trainer busy all along (training at full rate, with no RPC load beside it):
    sized from the service's measured learning rate to outlast the measurement, which checks that
    the backlog was still there at its end."""
    from titan_fusion.client.convert import to_expert_forecasts
    from titan_fusion.client.pb import fusion_pb2 as pb
    from titan_fusion.server.synthetic import informative_stream
    experts, feats, _ = next(iter(informative_stream(31, 1)))
    req = pb.PredictRequest(experts=to_expert_forecasts(experts), features=feats)
    predict = lambda: stub.Predict(req, timeout=5)  # noqa: E731
    seconds = 4.0 if quick else 10.0
    _sequential(predict, 300)  # warm
    idle = _sequential_for(predict, seconds)
    backlog = rows(list(informative_stream(29, int(trained_per_s * (seconds + 2) * 2))), "backlog")
    ack = stub.RecordOutcomeBatches(iter(batches(backlog)), timeout=600)
    time.sleep(0.5)  # the stream's own work is done: from here the service only trains and serves
    applied0 = stub.Stats(pb.StatsRequest(), timeout=10).service.applied_sequence
    t0 = time.monotonic()
    busy = _sequential_for(predict, seconds)
    elapsed = time.monotonic() - t0
    applied1 = stub.Stats(pb.StatsRequest(), timeout=10).service.applied_sequence
    if applied1 >= ack.journal_sequence:
        raise RuntimeError("the backlog was learned before the measurement ended: the trainer was not busy "
                           "throughout, so the figure would not be what it says")
    return {"predict_idle": percentiles(idle), "predict_while_catching_up": percentiles(busy),
            "catch_up_learned_per_s": (applied1 - applied0) / elapsed,
            "catch_up_lag_left": ack.journal_sequence - applied1}


POLL_FLOOR_SECONDS = 0.02  # _wait_applied: at most this late in seeing the service caught up
ASSUMED_MAX_LEARN_RATE = 2000.0  # outcomes/s; well above what the service learns here (~300-400)


def _wait_applied(stub, seq: int) -> None:
    """Until the service's model has learned every outcome up to journal seq `seq`.

    Each Stats poll costs CPU on this machine's two cores, which the trainer shares (a poll every
    20 ms throughout is a few per cent of a core). So it sleeps as long as the outcomes left would
    take at ASSUMED_MAX_LEARN_RATE (at most 0.5 s), which cannot carry it past the end by more than
    POLL_FLOOR_SECONDS while the service learns slower than that."""
    from titan_fusion.client.pb import fusion_pb2 as pb
    while True:
        left = seq - stub.Stats(pb.StatsRequest(), timeout=10).service.applied_sequence
        if left <= 0:
            return
        time.sleep(min(0.5, max(POLL_FLOOR_SECONDS, left / ASSUMED_MAX_LEARN_RATE)))


def table(r: dict) -> str:
    ip, g = r["in_process"], r["grpc"]
    idle_ms = f"{IDLE_S * 1e3:g} ms"
    rows = [
        ("in-process forward, one event, median", ip["forward"]["p50_us"], ip["forward_average_floor"]["p50_us"],
         "same API serving the plain average", "< 150 us (core); < 100 us (perf)"),
        (f"in-process forward, one event, median, {idle_ms} idle before each call",
         ip["forward_after_idle"]["p50_us"], ip["forward"]["p50_us"], "the same, back to back (above)", ""),
        (f"in-process plain average, median, {idle_ms} idle before each call", ip["forward_average_floor_after_idle"]["p50_us"],
         ip["forward_average_floor"]["p50_us"], "the same, back to back (above)", ""),
        ("in-process training step, batch 32, median", ip["train_step_batch32"]["p50_us"], None, "", "< 2.5 ms (core); < 2 ms (perf)"),
        ("in-process update() with its step, median", ip["update_with_step"]["p50_us"],
         ip["update_no_training_floor"]["p50_us"], "update() without training", ""),
        ("Predict p50, one at a time", g["predict_sequential"]["p50_us"], g["echo_sequential"]["p50_us"], "echo p50", "<= 1.3x"),
        ("Predict p99, one at a time", g["predict_sequential"]["p99_us"], g["echo_sequential"]["p99_us"], "echo p99", "<= 1.5x"),
        ("constant-answer Predict p50 (no model), one at a time", g["constant_predict_sequential"]["p50_us"],
         g["echo_sequential"]["p50_us"], "echo p50", ""),
        ("constant-answer Predict p99 (no model), one at a time", g["constant_predict_sequential"]["p99_us"],
         g["echo_sequential"]["p99_us"], "echo p99", ""),
        ("the model alone p50 (the service's conversion and forecast, nothing around them), one at a time",
         g["model_only_sequential"]["p50_us"], g["echo_sequential"]["p50_us"], "echo p50", ""),
        ("the model alone p99, one at a time", g["model_only_sequential"]["p99_us"], g["echo_sequential"]["p99_us"],
         "echo p99", ""),
        ("Predict p50 against the model alone: what the service adds", g["predict_sequential"]["p50_us"],
         g["model_only_sequential"]["p50_us"], "the model alone p50", ""),
        (f"Predict p50, one call per decision ({idle_ms} idle before each call)", g["predict_after_idle"]["p50_us"],
         g["echo_after_idle"]["p50_us"], "echo p50, the same spacing", ""),
        ("Predict p99, one call per decision", g["predict_after_idle"]["p99_us"], g["echo_after_idle"]["p99_us"],
         "echo p99, the same spacing", ""),
        ("the model alone p50, one call per decision", g["model_only_after_idle"]["p50_us"],
         g["echo_after_idle"]["p50_us"], "echo p50, the same spacing", ""),
        ("Predict p99 while training at full rate (a bulk backlog, trainer busy throughout)",
         g["bulk_replay"]["predict_while_catching_up"]["p99_us"], g["bulk_replay"]["predict_idle"]["p99_us"],
         "idle Predict p99 (same service, same run)", "<= 1.5x"),
        ("Predict p50 while training at full rate (a bulk backlog)",
         g["bulk_replay"]["predict_while_catching_up"]["p50_us"], g["bulk_replay"]["predict_idle"]["p50_us"],
         "idle Predict p50 (same service, same run)", ""),
        ("backlog learned meanwhile (outcomes/s)", g["bulk_replay"]["catch_up_learned_per_s"],
         g["bulk_replay"]["trained_per_s"], "the same service learning without Predicts", ""),
        ("Predict p99 while another process records outcomes one at a time", g["predict_while_training"]["p99_us"],
         g["predict_idle_after"]["p99_us"], "idle Predict p99 (same run)", ""),
        ("Predict p99 beside a plain CPU loop (another process, the trainer's priority), no training",
         g["predict_beside_cpu_loop"]["p99_us"], g["predict_idle_after"]["p99_us"], "idle Predict p99 (same run)", ""),
    ]
    for c in (1, 8, 32):
        rows.append((f"Predict throughput, {c} in flight (calls/s)", g[f"predict_inflight_{c}"]["calls_per_s"],
                     g[f"echo_inflight_{c}"]["calls_per_s"], "echo calls/s", ">= 0.8x at 32" if c == 32 else ""))
        if c == 1:
            rows.append(("server CPU per call, 1 in flight: Predict (the service's process)",
                         g["predict_inflight_1"]["server_cpu_us_per_call"], g["echo_inflight_1"]["server_cpu_us_per_call"],
                         "the echo server's CPU per call", ""))
        if c == 32:
            rows.append(("constant-answer Predict throughput, 32 in flight (calls/s)",
                         g["constant_predict_inflight_32"]["calls_per_s"], g["echo_inflight_32"]["calls_per_s"],
                         "echo calls/s", ""))
            rows.append(("the model alone, throughput 32 in flight (calls/s)",
                         g["model_only_inflight_32"]["calls_per_s"], g["echo_inflight_32"]["calls_per_s"],
                         "echo calls/s", ""))
            echo_cpu = g["echo_inflight_32"]["server_cpu_us_per_call"]
            for key, what in (("predict", "Predict (the service's process)"), ("constant_predict", "constant-answer Predict"),
                              ("model_only", "the model alone")):
                rows.append((f"server CPU per call, 32 in flight: {what}", g[f"{key}_inflight_32"]["server_cpu_us_per_call"],
                             echo_cpu, "the echo server's CPU per call", ""))
            rows.append(("CPUs kept busy, 32 in flight: the service's process, Predict (cores)",
                         g["predict_inflight_32"]["server_cpus_busy"], g["echo_inflight_32"]["server_cpus_busy"],
                         "the echo server's", ""))
            rows.append(("CPUs kept busy, 32 in flight: the bench's client, Predict (cores)",
                         g["predict_inflight_32"]["client_cpus_busy"], g["echo_inflight_32"]["client_cpus_busy"],
                         "the same client, echo", ""))
        rows.append((f"Predict p99, {c} in flight", g[f"predict_inflight_{c}"]["p99_us"],
                     g[f"echo_inflight_{c}"]["p99_us"], "echo p99", ""))
    rows.append(("RecordOutcome, one at a time (outcomes/s)", g["record_outcome_sequential_per_s"], None, "", ""))
    rows.append(("RecordOutcome, 8 in flight (outcomes/s)", g["record_outcome_inflight_8"]["calls_per_s"], None, "", ""))
    b = g["bulk_replay"]
    rows.append((f"bulk replay: {b['outcomes']:,} outcomes journaled + acknowledged (outcomes/s)", b["acked_per_s"],
                 None, "", ">= 20,000/s"))
    rows.append(("bulk replay, one row per message (RecordOutcomes), acknowledged (outcomes/s)",
                 b["one_row_per_message_acked_per_s"], None, "", ""))
    rows.append(("bulk replay: learned by the service (outcomes/s)", b["trained_per_s"], b["in_process_trained_per_s"],
                 f"in-process update(), same events and history, {b['blocks']} blocks alternating", ">= 0.9x"))
    mem = list(g["server_rss_mib"].values())
    keys = list(g["server_rss_mib"])
    rows.append((f"server RSS, with its trainer process (MiB) {keys[1].replace('_', ' ')} vs {keys[0].replace('_', ' ')}", mem[1], mem[0],
                 "RSS after 10,000 Predicts", "<= 1.05x"))
    lines = ["| measurement | value | floor / baseline | ratio | baseline is | target |", "|---|---:|---:|---:|---|---|"]
    for name, v, base, what, target in rows:
        ratio = f"{v / base:.2f}x" if base else ""
        unit = "" if "calls/s" in name or "outcomes/s" in name or "MiB" in name or "(cores)" in name else " us"
        if "(cores)" in name:
            fmt = lambda x: f"{x:.2f}"  # noqa: E731
        else:
            fmt = (lambda x: f"{x:,.0f}{unit}") if x_is_big(v) else (lambda x: f"{x:.1f}{unit}")
        lines.append(f"| {name} | {fmt(v)} | {fmt(base) if base else ''} | {ratio} | {what} | {target} |")
    return "\n".join(lines)


def x_is_big(v: float) -> bool:
    return v >= 100


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    ap.add_argument("--out", default="bench-results/bench.json", help="JSON results file")
    ap.add_argument("--echo-server", metavar="READY_FILE", help=argparse.SUPPRESS)
    ap.add_argument("--outcome-load", metavar="TARGET", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-load", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.echo_server:
        serve_echo(ns.echo_server)
        return 0
    if ns.outcome_load:
        outcome_load(ns.outcome_load, ns.seconds, seed=11)
        return 0
    if ns.cpu_load:
        cpu_load(ns.seconds)
        return 0
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="titan-bench-") as tmp:
        results = {"machine": machine(), "in_process": bench_in_process(ns.quick), "grpc": bench_grpc(ns.quick, Path(tmp))}
    results["seconds"] = time.time() - started
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\n{results['machine']}\nJSON: {out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
