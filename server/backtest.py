"""`titan-fusion backtest`: does the fusion earn its keep? A prequential evaluation against baselines.

    titan-fusion backtest --scenario all --seeds 1,2                       # the full evaluation
    titan-fusion backtest --scenario switching --seeds 1 --events 5000     # one scenario
    titan-fusion backtest --scenario stable --fusion.learning_rate 0.003   # an ablation
    titan-fusion backtest --scenario stable --target localhost:50051       # through a running service

Prequential (Dawid): for each event in time order, every method predicts, then every prediction is
scored, then every method learns the outcome. No method sees an outcome before predicting it and
nothing is shuffled. The first `--warmup` events (500) are learned but not scored.

Methods, on the same stream:
- `fusion`: the transformer (TransformerFusion, in-process, FusionConfig defaults plus
  --fusion.<param> overrides; its seed is the run's seed unless --fusion.seed is given); with
  --target HOST:PORT, `service` instead: Predict with an event_id, then RecordOutcome by that
  event_id (ids "<run prefix>:<scenario>:<seed>:<t>", the prefix unique per run). One service is one
  model: runs of several scenarios or seeds through it continue training the same model, so give
  it a fresh data directory per scenario for a clean measurement;
- the baselines of server/baselines.py (average, recal_average, ftl, ewa, fixed_share, stacking,
  stacking_x);
- for synthetic scenarios the `oracle` row: the true probabilities (a floor, not a method).

Output in --out (default reports/): backtest.json (every metric of every method per scenario and
seed, and pooled over seeds; the fusion's training statistics and mean attention), backtest.md (one
table per scenario, pooled over seeds) and plots/<scenario>_{reliability,rolling,attention}.png;
with --save-predictions, predictions/<scenario>_seed<S>.npz (y, p_true and every method's forecasts). Comparisons are on per-step log losses:
diff = loss(method) - loss(reference), negative = the method is better, with a 95% moving-block
bootstrap interval and a Diebold-Mariano p-value (server/scoring.py says exactly how). The "best
baseline" is the baseline with the lowest log loss on that data, chosen after the fact, which
favours it: beating it is a high bar.

Runtime: the transformer costs ~5 ms per event here (4 ms learning, 0.6 ms predicting), the
baselines ~0.1 ms together, scoring a few seconds per run. `--jobs N` runs (scenario, seed) pairs in
N processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from titan_fusion.client.convert import json_finite

from . import scoring
from .baselines import all_baselines
from .scenarios import DEFAULT_EVENTS, SCENARIOS, Stream, make_stream

FUSION_METHODS = ("fusion", "service")  # the methods under test; every other one is a baseline
REFERENCE = "average"
DEFAULT_WARMUP = 500
QUICK_EVENTS = 3000
QUICK_WARMUP = 300
ROLLING_WINDOW = 1000


# ---------------------------------------------------------------------------------- adapters
def _experts(names: Sequence[str], probs: Sequence[float]) -> list[dict[str, Any]]:
    return [{"name": n, "prob_up": p} for n, p in zip(names, probs)]


class TransformerFuser:
    """TransformerFusion behind the baselines' interface (experts named e0..e3). torch is imported
    here, not at module level, and set to one thread (bit-reproducible, as in the service)."""

    name = "fusion"

    def __init__(self, config: Any = None, n_experts: int = 4, expert_names: Sequence[str] | None = None):
        import torch

        from .fusion import TransformerFusion
        torch.set_num_threads(1)
        self.model = TransformerFusion(config, n_models=n_experts)
        self.expert_names = tuple(expert_names or (f"e{i}" for i in range(n_experts)))
        self.last_attention: dict[str, float] | None = None
        self.last_source: str | None = None

    def predict_proba_one(self, probs: Sequence[float], features: Mapping[str, float] | None = None) -> float:
        pred = self.model.predict(_experts(self.expert_names, probs), features)
        self.last_attention, self.last_source = pred.attention, _source(pred.source, pred.reason)
        return pred.prob_up

    def learn_one(self, probs: Sequence[float], features: Mapping[str, float] | None, y: int) -> None:
        self.model.update(_experts(self.expert_names, probs), features, "UP" if y else "DOWN")

    def info(self) -> dict[str, Any]:
        return {"training_stats": {k: json_finite(v) for k, v in self.model.get_training_stats().items()},
                "config": self.model.config.to_dict()}


class ServiceFuser:
    """A running titan-fusion service behind the baselines' interface: Predict with an event_id,
    then RecordOutcome by that event_id (the service keeps the inputs of the Predict)."""

    name = "service"

    def __init__(self, target: str, prefix: str, n_experts: int = 4, expert_names: Sequence[str] | None = None,
                 timeout: float = 10.0):
        from titan_fusion.client import FusionClient
        self.client = FusionClient(target, timeout=timeout, fallback=False)
        self.prefix = prefix
        self.expert_names = tuple(expert_names or (f"e{i}" for i in range(n_experts)))
        self._t = -1
        self.last_attention: dict[str, float] | None = None
        self.last_source: str | None = None

    def predict_proba_one(self, probs: Sequence[float], features: Mapping[str, float] | None = None) -> float:
        self._t += 1
        pred = self.client.predict(_experts(self.expert_names, probs), features, event_id=f"{self.prefix}:{self._t}")
        self.last_attention, self.last_source = dict(pred.attention), _source(pred.source, pred.reason)
        return pred.prob_up

    def learn_one(self, probs: Sequence[float], features: Mapping[str, float] | None, y: int) -> None:
        self.client.record_outcome(actual_direction="UP" if y else "DOWN", event_id=f"{self.prefix}:{self._t}")

    def info(self) -> dict[str, Any]:
        try:
            stats = self.client.stats()
        except Exception as e:  # the evaluation stands without it
            stats = {"error": str(e)}
        return {"training_stats": {k: json_finite(v) for k, v in stats.items()}, "target": self.client.target}

    def close(self) -> None:
        self.client.close()


def _source(source: str, reason: str | None) -> str:
    return source if not reason else f"{source}:{reason}"


# ---------------------------------------------------------------------------------- the loop
@dataclass
class RunResult:
    """Everything one prequential pass produced: every method's forecast at every step."""

    scenario: str
    seed: int
    description: str
    warmup: int
    y: np.ndarray  # (T,)
    preds: dict[str, np.ndarray]  # method -> (T,) forecast prob_up
    p_true: np.ndarray | None
    expert_names: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    attention_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    attention: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (k, n_experts)
    sources: dict[str, int] = field(default_factory=dict)  # scored steps by what served the fusion
    seconds: dict[str, float] = field(default_factory=dict)  # predict + learn time per method
    info: dict[str, Any] = field(default_factory=dict)  # the fusion's training stats and config


def run_prequential(stream: Stream, fusers: Sequence[Any], *, warmup: int = DEFAULT_WARMUP,
                    attention_every: int | None = None,
                    progress: Callable[[int], None] | None = None) -> RunResult:
    """Predict, then learn, event by event, for every fuser on the same stream.

    At step t every fuser's predict_proba_one(probs_t, features_t) is called (and stored) before
    any learn_one(probs_t, features_t, y_t). `progress(k)` is called with the number of events done
    since its last call. Attention weights (of fusers with `last_attention`) are recorded every
    `attention_every` steps (default: about 500 points over the stream)."""
    n = len(stream)
    if not 0 <= warmup < n:
        raise ValueError(f"warmup must be in [0, {n}) for {n} events, got {warmup}")
    names = [f.name for f in fusers]
    if len(set(names)) != len(names):
        raise ValueError(f"fuser names must be unique, got {names}")
    every = attention_every or max(1, n // 500)
    P = np.empty((n, len(fusers)))
    secs = [0.0] * len(fusers)
    att_fuser = next((f for f in fusers if hasattr(f, "last_attention")), None)
    att_steps: list[int] = []
    att_rows: list[list[float]] = []
    sources: dict[str, int] = {}
    clock = time.perf_counter
    pending = 0
    for t, (probs, feats, y) in enumerate(stream.events()):
        for j, f in enumerate(fusers):
            t0 = clock()
            P[t, j] = f.predict_proba_one(probs, feats)
            secs[j] += clock() - t0
        if att_fuser is not None:
            if t >= warmup and att_fuser.last_source is not None:
                sources[att_fuser.last_source] = sources.get(att_fuser.last_source, 0) + 1
            if t % every == 0 and att_fuser.last_attention:
                att_steps.append(t)
                att_rows.append([att_fuser.last_attention.get(e, math.nan) for e in stream.expert_names])
        for j, f in enumerate(fusers):
            t0 = clock()
            f.learn_one(probs, feats, y)
            secs[j] += clock() - t0
        pending += 1
        if progress is not None and pending >= 100:
            progress(pending)
            pending = 0
    if progress is not None and pending:
        progress(pending)
    if not np.all((P >= 0.0) & (P <= 1.0)):
        bad = [names[j] for j in range(len(fusers)) if not np.all((P[:, j] >= 0) & (P[:, j] <= 1))]
        raise ValueError(f"forecasts outside [0, 1] (or NaN) from {bad}")
    info = {}
    if att_fuser is not None and hasattr(att_fuser, "info"):
        info = att_fuser.info()
    return RunResult(stream.name, stream.seed, stream.description, warmup, stream.y.copy(),
                     {name: P[:, j].copy() for j, name in enumerate(names)}, stream.p_true,
                     tuple(stream.expert_names), dict(stream.meta),
                     np.array(att_steps, dtype=np.int64),
                     np.array(att_rows) if att_rows else np.zeros((0, stream.n_experts)),
                     sources, dict(zip(names, secs)), info)


# ---------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class EvalOptions:
    boot_draws: int = scoring.BOOT_DRAWS
    band_draws: int = scoring.BAND_DRAWS
    seed: int = 0


def evaluate(y: np.ndarray, preds: Mapping[str, np.ndarray], *, p_true: np.ndarray | None = None,
             options: EvalOptions = EvalOptions()) -> dict[str, Any]:
    """Every metric of every method on the scored outcomes y, the comparisons against the plain
    average and against the best baseline (lowest log loss among the non-fusion methods), and the
    edge captured."""
    y = np.asarray(y)
    methods = list(preds)
    baselines = [m for m in methods if m not in FUSION_METHODS]
    loss = {m: scoring.log_loss_per_step(preds[m], y) for m in methods}
    hits = {m: scoring.correct_per_step(preds[m], y) for m in methods}
    out: dict[str, Any] = {"n": int(y.size), "methods": {}}
    ll = {m: float(loss[m].mean()) for m in methods}
    best = min(baselines, key=ll.__getitem__) if baselines else None
    out["best_baseline"] = best
    opts = dict(draws=options.boot_draws, seed=options.seed)
    for m in methods:
        r = scoring.summary(preds[m], y, band_draws=options.band_draws, seed=options.seed)
        if REFERENCE in ll and best is not None:
            r["edge_captured"] = scoring.edge_captured(ll[REFERENCE], ll[m], ll[best])
        if REFERENCE in ll and m != REFERENCE:
            r["vs_average"] = scoring.compare(loss[m], loss[REFERENCE], **opts)
            mean, lo, hi = scoring.block_bootstrap_ci(hits[m] - hits[REFERENCE], draws=options.boot_draws,
                                                      seed=options.seed)
            r["accuracy_vs_average"] = {"mean_diff": mean, "ci_low": lo, "ci_high": hi}
        if best is not None and m != best:
            r["vs_best_baseline"] = scoring.compare(loss[m], loss[best], **opts)
        out["methods"][m] = r
    if p_true is not None:
        p_true = np.asarray(p_true)
        out["oracle"] = {"log_loss": scoring.log_loss(p_true, y), "accuracy": scoring.accuracy(p_true, y),
                         "brier": scoring.brier(p_true, y), "ece_mass": scoring.ece_mass(p_true, y)}
    return out


# ---------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class RunSpec:
    scenario: str
    seed: int
    events: int | None
    warmup: int
    fusion_overrides: tuple[tuple[str, Any], ...] = ()
    target: str | None = None
    prefix: str = ""
    data: str | None = None
    with_fusion: bool = True


def fusion_config(overrides: Mapping[str, Any], seed: int) -> Any:
    """FusionConfig: defaults, the run's seed, then the --fusion.<param> overrides."""
    from .config import FusionConfig
    values = {"seed": seed, **dict(overrides)}
    return FusionConfig.from_mapping(values)


def build_fusers(spec: RunSpec, stream: Stream) -> list[Any]:
    fusers: list[Any] = []
    if spec.target:
        fusers.append(ServiceFuser(spec.target, f"{spec.prefix}:{spec.scenario}:{spec.seed}", stream.n_experts,
                                   stream.expert_names))
    elif spec.with_fusion:
        fusers.append(TransformerFuser(fusion_config(dict(spec.fusion_overrides), spec.seed), stream.n_experts,
                                       stream.expert_names))
    return fusers + all_baselines(stream.n_experts)


def run_one(spec: RunSpec, progress: Callable[[int], None] | None = None,
            extra_fusers: Sequence[Any] = ()) -> RunResult:
    stream = make_stream(spec.scenario, spec.seed, spec.events, data=spec.data)
    fusers = build_fusers(spec, stream) + list(extra_fusers)
    t0 = time.perf_counter()
    try:
        result = run_prequential(stream, fusers, warmup=spec.warmup, progress=progress)
    finally:
        for f in fusers:
            if hasattr(f, "close"):
                f.close()
    result.meta["wall_seconds"] = time.perf_counter() - t0
    return result


def _worker(spec: RunSpec, queue: Any) -> RunResult:
    return run_one(spec, progress=queue.put)


# ---------------------------------------------------------------------------------- reports
def run_report(r: RunResult, options: EvalOptions) -> dict[str, Any]:
    s = slice(r.warmup, None)
    ev = evaluate(r.y[s], {m: p[s] for m, p in r.preds.items()},
                  p_true=None if r.p_true is None else r.p_true[s], options=options)
    n_events = int(r.y.size)
    return {"scenario": r.scenario, "seed": r.seed, "description": r.description, "events": n_events,
            "warmup": r.warmup, "scored": n_events - r.warmup, "meta": r.meta, "fusion_sources": r.sources,
            "seconds": r.seconds,
            "ms_per_event": {m: 1e3 * v / max(1, n_events) for m, v in r.seconds.items()},
            "fusion_info": r.info, "attention": attention_summary(r), **ev}


def attention_summary(r: RunResult) -> dict[str, Any] | None:
    """The fusion's mean attention per expert and mean entropy -sum w ln w (SPEC: above 1.0; ln 4 =
    1.386 is uniform) over the recorded forecasts of the scored events; None without attention."""
    keep = r.attention_steps >= r.warmup
    if not r.attention.size or not keep.any():
        return None
    w = r.attention[keep]
    entropy = -(w * np.log(np.clip(w, 1e-300, None))).sum(axis=1)
    return {"mean_weight": dict(zip(r.expert_names, w.mean(axis=0).tolist())),
            "mean_entropy": float(entropy.mean()), "recorded": int(keep.sum())}


def pooled_report(runs: Sequence[RunResult], options: EvalOptions) -> dict[str, Any]:
    """The scored outcomes of every seed of one scenario, concatenated. When the data do not depend
    on the seed (btc: the same candles; only the transformer's seed changes), concatenating would
    count every outcome once per seed and make the intervals too narrow: the first seed stands for
    the scenario, the others are in the per-seed results."""
    note = None
    if len(runs) > 1 and runs[0].meta.get("seed_independent"):
        # The transformer's seed still moves its result, and can flip the sign against the average:
        # each seed's difference is in the note, so that the first seed is not taken for all of them.
        spread = "; ".join(
            f"{m} Δ log loss vs average by seed: " + ", ".join(
                f"{r.seed}: {_seed_diff(r, m) * 1e3:+.2f}e-3" for r in runs)
            for m in FUSION_METHODS if m in runs[0].preds and "average" in runs[0].preds)
        note = (f"the data do not depend on the seed: seed {runs[0].seed} only (the others: per-seed results)"
                + (f"; {spread}" if spread else ""))
        runs = runs[:1]
    y = np.concatenate([r.y[r.warmup:] for r in runs])
    methods = list(runs[0].preds)
    preds = {m: np.concatenate([r.preds[m][r.warmup:] for r in runs]) for m in methods}
    p_true = None
    if all(r.p_true is not None for r in runs):
        p_true = np.concatenate([r.p_true[r.warmup:] for r in runs])
    ev = evaluate(y, preds, p_true=p_true, options=options)
    return {"scenario": runs[0].scenario, "seeds": [r.seed for r in runs], "description": runs[0].description,
            "note": note, **ev}


def _seed_diff(r: RunResult, method: str) -> float:
    """Mean per-step log loss of `method` minus the plain average's, on one run's scored outcomes."""
    y = r.y[r.warmup:]
    return float(np.mean(scoring.log_loss_per_step(r.preds[method][r.warmup:], y)
                         - scoring.log_loss_per_step(r.preds["average"][r.warmup:], y)))


def _f(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _diff(c: Mapping[str, Any] | None, scale: float = 1e3, nd: int = 2) -> tuple[str, str]:
    """'-1.23 [-2.01, -0.40]' in units of 1/scale, and the DM p-value."""
    if not c:
        return "—", "—"
    s = f"{c['mean_diff'] * scale:+.{nd}f} [{c['ci_low'] * scale:+.{nd}f}, {c['ci_high'] * scale:+.{nd}f}]"
    p = c.get("dm_p")
    return s, ("—" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001"))


def markdown_table(ev: Mapping[str, Any]) -> list[str]:
    best = ev.get("best_baseline")
    lines = ["| method | log loss | accuracy | Brier | ECE width | ECE mass | calibrated band 95% | edge captured "
             "| Δ log loss vs average (10⁻³) [95% CI] | DM p | Δ log loss vs best baseline (10⁻³) [95% CI] | DM p "
             "| Δ accuracy vs average (pts) [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in ev["methods"].items():
        label = f"**{m}**" if m in FUSION_METHODS else (f"{m} (best baseline)" if m == best else m)
        va, pa = _diff(r.get("vs_average"))
        vb, pb = _diff(r.get("vs_best_baseline"))
        acc = r.get("accuracy_vs_average")
        acc_s = (f"{acc['mean_diff'] * 100:+.2f} [{acc['ci_low'] * 100:+.2f}, {acc['ci_high'] * 100:+.2f}]"
                 if acc else "—")
        ece_mark = "" if r["ece_ok"] else " ✗"
        lines.append(f"| {label} | {_f(r['log_loss'])} | {_f(r['accuracy'] * 100, 2)}% | {_f(r['brier'])} "
                     f"| {_f(r['ece_width'] * 100, 2)}% | {_f(r['ece_mass'] * 100, 2)}%{ece_mark} "
                     f"| {_f(r['ece_band95'] * 100, 2)}% | {_f(r.get('edge_captured'), 2)} | {va} | {pa} "
                     f"| {vb} | {pb} | {acc_s} |")
    if "oracle" in ev:
        o = ev["oracle"]
        lines.append(f"| *oracle (true p)* | {_f(o['log_loss'])} | {_f(o['accuracy'] * 100, 2)}% | {_f(o['brier'])} "
                     f"| | {_f(o['ece_mass'] * 100, 2)}% | | | | | | | |")
    return lines


def markdown_report(report: Mapping[str, Any]) -> str:
    meta = report["meta"]
    out = ["# Backtest: does the fusion earn its keep?", "",
           f"`{meta['command']}`  ", f"{meta['started']}, {meta['wall_seconds']:.0f} s, git {meta.get('git') or '?'}; "
           f"warmup {meta['warmup']} events (learned, not scored); seeds {', '.join(map(str, meta['seeds']))}.", "",
           "Prequential: every method predicts each event before any learns its outcome. Pooled over seeds. "
           "Δ = loss(method) − loss(reference), negative = the method is better, in 10⁻³ nats, with a 95% "
           "moving-block bootstrap interval; DM p: Diebold-Mariano test (Newey-West variance), two-sided. "
           "Edge captured = (LL_avg − LL_method) / (LL_avg − LL_best baseline); n/a when no baseline beats "
           "the average. ECE in 15 bins; the calibrated band is the 95th percentile of the equal-mass ECE of a "
           "calibrated forecaster making the same forecasts (✗: ECE mass fails SPEC §4: ≥ 2% on ≥ 20,000 "
           "outcomes, or above the band on fewer). The best baseline is picked after the fact on the same data.",
           ""]
    if meta.get("fusion_overrides"):
        out += [f"Fusion overrides: `{json.dumps(meta['fusion_overrides'])}`", ""]
    out += ["## Summary", "",
            "| scenario | scored | fusion LL | Δ vs average (10⁻³) [CI] | DM p | best baseline | Δ vs best (10⁻³) [CI] "
            "| DM p | edge captured | Δ accuracy vs average (pts) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, ev in report["pooled"].items():
        fm = next((m for m in FUSION_METHODS if m in ev["methods"]), None)
        if fm is None:
            continue
        r = ev["methods"][fm]
        va, pa = _diff(r.get("vs_average"))
        vb, pb = _diff(r.get("vs_best_baseline"))
        acc = r.get("accuracy_vs_average")
        out.append(f"| {name} | {ev['n']} | {_f(r['log_loss'])} | {va} | {pa} | {ev['best_baseline']} | {vb} | {pb} "
                   f"| {_f(r.get('edge_captured'), 2)} | {acc['mean_diff'] * 100:+.2f} |")
    out.append("")
    for name, ev in report["pooled"].items():
        runs = [r for r in report["runs"] if r["scenario"] == name]
        out += [f"## {name}", "", f"{ev['description']}. {ev['n']} scored outcomes "
                f"(seeds {', '.join(str(s) for s in ev['seeds'])}{'; ' + ev['note'] if ev.get('note') else ''}).", ""]
        out += markdown_table(ev)
        out += ["", "Per seed (log loss):", "",
                "| seed | scored | " + " | ".join(runs[0]["methods"]) + " | best baseline | fusion served |",
                "|---|---|" + "---|" * len(runs[0]["methods"]) + "---|---|"]
        for r in runs:
            served = r.get("fusion_sources") or {}
            tot = sum(served.values())
            fus = served.get("fusion", 0)
            out.append(f"| {r['seed']} | {r['scored']} | " + " | ".join(_f(m["log_loss"]) for m in r["methods"].values())
                       + f" | {r['best_baseline']} | {f'{100 * fus / tot:.1f}%' if tot else 'n/a'} |")
        for r in runs:
            st = (r.get("fusion_info") or {}).get("training_stats") or {}
            att = r.get("attention")
            if st or att:
                out += ["", f"Seed {r['seed']}, the fusion at the end: train loss {_f(st.get('train_loss'))}, "
                            f"val loss {_f(st.get('val_loss'))}, early stops {st.get('early_stops', 'n/a')}"
                            + (f"; mean attention entropy {_f(att['mean_entropy'], 3)} (SPEC: > 1.0), weights "
                               + ", ".join(f"{k} {v:.2f}" for k, v in att["mean_weight"].items()) if att else "")
                            + "."]
        plots = report.get("plots", {}).get(name, {})
        if plots:
            out += [""] + [f"![{k}]({v})" for k, v in plots.items()]
        out.append("")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------- plots
def _rolling_mean(x: np.ndarray, w: int) -> np.ndarray:
    cs = np.concatenate(([0.0], np.cumsum(x)))
    return (cs[w:] - cs[:-w]) / w


def make_plots(runs: Sequence[RunResult], pooled: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """Reliability diagram (pooled over seeds), rolling log loss and accuracy (first seed),
    attention over time (first seed). Returns {kind: path relative to out_dir's parent}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    name = runs[0].scenario
    paths: dict[str, str] = {}
    fm = next((m for m in FUSION_METHODS if m in runs[0].preds), None)
    best = pooled["best_baseline"]
    shown = [m for m in (fm, REFERENCE, best) if m is not None]
    shown = list(dict.fromkeys(shown))

    # reliability diagram: equal-mass bins, over the seeds of the pooled report
    pooled_runs = [r for r in runs if r.seed in pooled["seeds"]]
    y = np.concatenate([r.y[r.warmup:] for r in pooled_runs])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = 1.0, 0.0
    for m in shown:
        p = np.concatenate([r.preds[m][r.warmup:] for r in pooled_runs])
        rel = scoring.reliability(p, y, mass=True)
        ece = pooled["methods"][m]["ece_mass"]
        ax.plot(rel["mean_p"], rel["freq_up"], "o-", ms=4, label=f"{m} (ECE {100 * ece:.2f}%)")
        lo, hi = min(lo, *rel["mean_p"], *rel["freq_up"]), max(hi, *rel["mean_p"], *rel["freq_up"])
    pad = 0.05 * max(hi - lo, 0.02)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k:", lw=1, label="calibrated")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("forecast prob_up (mean in bin)")
    ax.set_ylabel("observed frequency of UP")
    ax.set_title(f"{name}: reliability, 15 equal-mass bins")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / f"{name}_reliability.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths["reliability"] = f"{out_dir.name}/{p.name}"

    # rolling log loss (relative to the average) and accuracy, first seed
    r = runs[0]
    n = r.y.size
    w = max(10, min(ROLLING_WINDOW, n // 5))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ref = scoring.log_loss_per_step(r.preds[REFERENCE], r.y)
    ref_roll = _rolling_mean(ref, w)
    x = np.arange(w - 1, n)
    for m, p in r.preds.items():
        style = dict(lw=2.0, color="k") if m in FUSION_METHODS else dict(lw=1.0)
        a1.plot(x, 1e3 * (_rolling_mean(scoring.log_loss_per_step(p, r.y), w) - ref_roll), label=m, **style)
        a2.plot(x, 100 * _rolling_mean(scoring.correct_per_step(p, r.y), w), label=m, **style)
    if r.p_true is not None:
        a1.plot(x, 1e3 * (_rolling_mean(scoring.log_loss_per_step(r.p_true, r.y), w) - ref_roll), "k:", lw=1,
                label="oracle")
        a2.plot(x, 100 * _rolling_mean(scoring.correct_per_step(r.p_true, r.y), w), "k:", lw=1, label="oracle")
    for a in (a1, a2):
        a.axvline(r.warmup, color="grey", lw=0.8, ls="--")
        _mark_switches(a, r)
    a1.axhline(0.0, color="grey", lw=0.8)
    a1.set_ylabel(f"log loss − average's (10⁻³ nats)\nrolling {w}")
    a2.set_ylabel(f"accuracy % (rolling {w})")
    a2.set_xlabel("event")
    a1.set_title(f"{name}, seed {r.seed}: prequential scores (below 0 = better than the average)")
    a1.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    p = out_dir / f"{name}_rolling.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths["rolling"] = f"{out_dir.name}/{p.name}"

    if r.attention.size:
        fig, ax = plt.subplots(figsize=(10, 3.8))
        for i, e in enumerate(r.expert_names):
            ax.plot(r.attention_steps, r.attention[:, i], lw=1.2, label=e)
        ax.axhline(1.0 / len(r.expert_names), color="grey", lw=0.8, ls=":")
        ax.axvline(r.warmup, color="grey", lw=0.8, ls="--")
        _mark_switches(ax, r)
        ax.set_ylim(0, 1)
        ax.set_xlabel("event")
        ax.set_ylabel("attention weight")
        ax.set_title(f"{name}, seed {r.seed}: the fusion's attention over the experts")
        ax.legend(fontsize=8, ncol=len(r.expert_names))
        fig.tight_layout()
        p = out_dir / f"{name}_attention.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths["attention"] = f"{out_dir.name}/{p.name}"
    return paths


def _mark_switches(ax: Any, r: RunResult) -> None:
    period = r.meta.get("period")
    if period:
        for s in range(period, r.y.size, period):
            ax.axvline(s, color="red", lw=0.6, alpha=0.4)


# ---------------------------------------------------------------------------------- the command
def _fusion_fields() -> list[str]:
    from .config import FusionConfig
    return [f.name for f in dataclasses.fields(FusionConfig)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titan-fusion backtest", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="all",
                   help=f"a scenario, a comma-separated list, or 'all' (default): {', '.join(SCENARIOS)}")
    p.add_argument("--seeds", default="1", help="comma-separated seeds (default 1), e.g. 1,2")
    p.add_argument("--events", type=int, default=None,
                   help=f"events per run (default {DEFAULT_EVENTS} for synthetic scenarios, every candle for btc; "
                        f"--quick: {QUICK_EVENTS})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"first events learned but not scored (default {DEFAULT_WARMUP}; --quick: {QUICK_WARMUP})")
    p.add_argument("--out", default="reports", help="output directory (default reports/)")
    p.add_argument("--target", default=None, metavar="HOST:PORT",
                   help="evaluate a running service instead of the in-process transformer")
    p.add_argument("--no-fusion", action="store_true", help="baselines only (no transformer)")
    p.add_argument("--data", default=None, help="the BTC-USD-15-MIN.csv candle file (default: the repository's data/)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"a fast check: {QUICK_EVENTS} events, warmup {QUICK_WARMUP}, 100 bootstrap and 50 band draws")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--save-predictions", action="store_true",
                   help="also write every method's forecast at every step: predictions/<scenario>_seed<S>.npz")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("transformer overrides", "any FusionConfig parameter, e.g. --fusion.learning_rate 0.003")
    for name in _fusion_fields():
        g.add_argument(f"--fusion.{name}", dest=f"fusion.{name}", default=None, metavar="V", help=argparse.SUPPRESS)
    return p


def _scenarios(arg: str) -> list[str]:
    names = list(SCENARIOS) if arg == "all" else [s.strip() for s in arg.split(",") if s.strip()]
    bad = [s for s in names if s not in SCENARIOS]
    if bad or not names:
        raise ValueError(f"unknown scenario(s) {', '.join(bad) or arg!r}; known: all, {', '.join(SCENARIOS)}")
    return names


def _git() -> str | None:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        scenarios = _scenarios(ns.scenario)
        seeds = [int(s) for s in ns.seeds.split(",") if s.strip()]
    except ValueError as e:
        parser.error(str(e))
    if not seeds:
        parser.error("--seeds: give at least one seed")
    overrides = {name: getattr(ns, f"fusion.{name}") for name in _fusion_fields()
                 if getattr(ns, f"fusion.{name}") is not None}
    from .errors import ConfigError
    try:
        fusion_config(overrides, seeds[0])
    except ConfigError as e:
        parser.error(str(e))
    if ns.target and ns.jobs > 1:
        parser.error("--target: one service is one model; runs through it must be sequential (--jobs 1)")
    if ns.jobs < 1:
        parser.error("--jobs must be >= 1")
    events = ns.events if ns.events is not None else (QUICK_EVENTS if ns.quick else None)
    warmup = ns.warmup if ns.warmup is not None else (QUICK_WARMUP if ns.quick else DEFAULT_WARMUP)
    options = EvalOptions(boot_draws=100 if ns.quick else scoring.BOOT_DRAWS,
                          band_draws=50 if ns.quick else scoring.BAND_DRAWS)
    prefix = f"bt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    specs = [RunSpec(s, seed, events, warmup, tuple(sorted(overrides.items())), ns.target, prefix, ns.data,
                     not ns.no_fusion) for s in scenarios for seed in seeds]
    # sizes for the progress bar (btc's length is known only from the file)
    sizes = []
    for sp in specs:
        if sp.scenario == "btc":
            try:
                sizes.append(len(make_stream("btc", sp.seed, sp.events, data=sp.data)))
            except FileNotFoundError as e:
                parser.error(str(e))
        else:
            sizes.append(sp.events or DEFAULT_EVENTS)
    for sp, n in zip(specs, sizes):
        if not 0 <= sp.warmup < n:
            parser.error(f"--warmup {sp.warmup} leaves nothing to score in {sp.scenario} ({n} events)")

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    results = _run_all(specs, sum(sizes), ns.jobs, not ns.no_progress)
    if results is None:
        return 1

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_json = [run_report(r, options) for r in results]
    if ns.save_predictions:
        (out / "predictions").mkdir(exist_ok=True)
        for r in results:
            arrays = {"y": r.y, **({"p_true": r.p_true} if r.p_true is not None else {}), **r.preds}
            np.savez_compressed(out / "predictions" / f"{r.scenario}_seed{r.seed}.npz", **arrays)
    pooled: dict[str, Any] = {}
    plots: dict[str, dict[str, str]] = {}
    for name in scenarios:
        rs = [r for r in results if r.scenario == name]
        pooled[name] = pooled_report(rs, options)
        if not ns.no_plots:
            plots[name] = make_plots(rs, pooled[name], out / "plots")
    cmd = "titan-fusion backtest " + " ".join(sys.argv[1:] if argv is None else list(argv))
    report = {
        "meta": {"command": cmd.strip(), "started": started, "wall_seconds": time.perf_counter() - t0,
                 "git": _git(), "scenarios": scenarios, "seeds": seeds, "events": events, "warmup": warmup,
                 "target": ns.target, "fusion_overrides": overrides, "quick": ns.quick,
                 "boot_draws": options.boot_draws, "band_draws": options.band_draws,
                 "conventions": "diff = loss(method) - loss(reference), negative = method better; see server/scoring.py"},
        "runs": runs_json, "pooled": pooled, "plots": plots,
    }
    report = json_finite(report)
    (out / "backtest.json").write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    (out / "backtest.md").write_text(markdown_report(report))
    print(_console_summary(report))
    print(f"wrote {out / 'backtest.json'}, {out / 'backtest.md'}" + ("" if ns.no_plots else f", {out / 'plots'}/"))
    return 0


def _run_all(specs: Sequence[RunSpec], total: int, jobs: int, show: bool) -> list[RunResult] | None:
    from tqdm import tqdm
    bar = tqdm(total=total, unit="event", mininterval=0.5, disable=not show, smoothing=0.05)
    try:
        if jobs == 1:
            results = []
            for sp in specs:
                bar.set_postfix_str(f"{sp.scenario} seed {sp.seed}", refresh=False)
                try:
                    results.append(run_one(sp, progress=bar.update))
                except Exception as e:
                    from titan_fusion.client import FusionClientError
                    if isinstance(e, FusionClientError):
                        bar.close()
                        print(f"{sp.scenario} seed {sp.seed}: {sp.target}: {e}", file=sys.stderr)
                        return None
                    raise
            return results
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            queue = manager.Queue()
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futures = [pool.submit(_worker, sp, queue) for sp in specs]
                while not all(f.done() for f in futures):
                    _drain(queue, bar, timeout=0.5)
                _drain(queue, bar, timeout=0.0)
                return [f.result() for f in futures]
    finally:
        bar.close()


def _drain(queue: Any, bar: Any, timeout: float) -> None:
    import queue as q
    try:
        bar.update(queue.get(timeout=timeout) if timeout else queue.get_nowait())
        while True:
            bar.update(queue.get_nowait())
    except q.Empty:
        pass


def _console_summary(report: Mapping[str, Any]) -> str:
    lines = [f"{'scenario':22s} {'fusion LL':>9s} {'avg LL':>8s} {'best baseline':>24s} {'Δ vs avg':>9s} "
             f"{'Δ vs best':>9s} {'edge':>6s}"]
    for name, ev in report["pooled"].items():
        fm = next((m for m in FUSION_METHODS if m in ev["methods"]), None)
        best = ev["best_baseline"]
        m = ev["methods"]
        if fm is None:
            lines.append(f"{name:22s} {'':>9s} {_f(m[REFERENCE]['log_loss']):>8s} "
                         f"{best + ' ' + _f(m[best]['log_loss']):>24s}")
            continue
        r = m[fm]
        lines.append(f"{name:22s} {_f(r['log_loss']):>9s} {_f(m[REFERENCE]['log_loss']):>8s} "
                     f"{best + ' ' + _f(m[best]['log_loss']):>24s} "
                     f"{1e3 * r['vs_average']['mean_diff']:+9.2f} {1e3 * r['vs_best_baseline']['mean_diff']:+9.2f} "
                     f"{_f(r.get('edge_captured'), 2):>6s}")
    lines.append("(Δ in 10⁻³ nats of log loss; negative = the fusion is better)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
