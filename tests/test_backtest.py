"""server/backtest.py and `titan-fusion backtest`: a tiny end-to-end run, the prequential order, the
numbers in the report against scoring computed directly, and a run through a real service."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from titan_fusion.server import backtest, scoring
from titan_fusion.server.baselines import PlainAverage
from titan_fusion.server.cli import main as cli_main
from titan_fusion.server.scenarios import make_stream

FAST = ["--fusion.min_samples", "50", "--fusion.warmup_steps", "10", "--fusion.val_every", "5"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """`titan-fusion backtest` on 2 scenarios x 1 seed x 400 events, with a fast transformer."""
    out = tmp_path_factory.mktemp("reports")
    code = cli_main(["backtest", "--scenario", "stable,broken_inverted_weak", "--seeds", "3", "--events", "400",
                     "--warmup", "100", "--quick", "--out", str(out), "--no-progress",
                     "--save-predictions", "--fusion.learning_rate", "0.003", *FAST])
    assert code == 0
    return out


def test_tiny_run_writes_json_markdown_and_plots(tiny_run):
    report = json.loads((tiny_run / "backtest.json").read_text())
    md = (tiny_run / "backtest.md").read_text()
    for name in ("stable", "broken_inverted_weak"):
        for kind in ("reliability", "rolling", "attention"):
            png = tiny_run / "plots" / f"{name}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert f"plots/{name}_{kind}.png" in md
        assert f"## {name}" in md
    assert [(r["scenario"], r["seed"], r["events"], r["scored"]) for r in report["runs"]] == [
        ("stable", 3, 400, 300), ("broken_inverted_weak", 3, 400, 300)]
    run = report["runs"][0]
    assert list(run["methods"]) == ["fusion", "average", "recal_average", "ftl", "ewa", "fixed_share", "stacking",
                                    "stacking_x"]
    fusion = run["methods"]["fusion"]
    for key in ("log_loss", "accuracy", "brier", "ece_width", "ece_mass", "ece_band95", "ece_ok", "edge_captured",
                "vs_average", "vs_best_baseline", "accuracy_vs_average"):
        assert key in fusion, key
    for key in ("mean_diff", "ci_low", "ci_high", "dm_stat", "dm_p"):
        assert key in fusion["vs_average"] and key in fusion["vs_best_baseline"]
    assert run["best_baseline"] in run["methods"] and run["best_baseline"] != "fusion"
    assert "oracle" in run
    # the overrides reached the transformer, the run's seed too
    cfg = run["fusion_info"]["config"]
    assert cfg["learning_rate"] == 0.003 and cfg["min_samples"] == 50 and cfg["seed"] == 3
    assert run["fusion_info"]["training_stats"]["samples_trained"] == 400
    assert run["fusion_sources"] == {"fusion": 300}  # ready after 50 outcomes: every scored forecast fused
    assert report["meta"]["fusion_overrides"]["learning_rate"] == "0.003"
    assert set(report["pooled"]) == {"stable", "broken_inverted_weak"}
    att = run["attention"]
    assert set(att["mean_weight"]) == {"e0", "e1", "e2", "e3"} and sum(att["mean_weight"].values()) == pytest.approx(1)
    assert 0 < att["mean_entropy"] <= np.log(4) + 1e-9
    assert "mean attention entropy" in md
    saved = np.load(tiny_run / "predictions" / "stable_seed3.npz")
    assert saved["y"].shape == (400,) and set(saved.files) >= {"y", "p_true", "fusion", "average", "stacking_x"}


def test_report_numbers_equal_scoring_computed_directly(tiny_run):
    report = json.loads((tiny_run / "backtest.json").read_text())
    run = report["runs"][0]
    s = make_stream("stable", 3, 400)
    avg, y = s.probs.mean(axis=1)[100:], s.y[100:]
    m = run["methods"]["average"]
    assert m["log_loss"] == pytest.approx(scoring.log_loss(avg, y), abs=1e-12)
    assert m["accuracy"] == pytest.approx(scoring.accuracy(avg, y), abs=1e-12)
    assert m["brier"] == pytest.approx(scoring.brier(avg, y), abs=1e-12)
    assert m["ece_mass"] == pytest.approx(scoring.ece_mass(avg, y), abs=1e-12)
    assert run["oracle"]["log_loss"] == pytest.approx(scoring.log_loss(s.p_true[100:], y), abs=1e-12)
    # edge captured and the differences follow from the log losses
    lls = {k: v["log_loss"] for k, v in run["methods"].items()}
    best = run["best_baseline"]
    assert best == min((k for k in lls if k != "fusion"), key=lls.__getitem__)
    f = run["methods"]["fusion"]
    assert f["vs_average"]["mean_diff"] == pytest.approx(lls["fusion"] - lls["average"], abs=1e-12)
    assert f["vs_best_baseline"]["mean_diff"] == pytest.approx(lls["fusion"] - lls[best], abs=1e-12)
    edge = scoring.edge_captured(lls["average"], lls["fusion"], lls[best])
    assert f["edge_captured"] == (None if edge is None else pytest.approx(edge))
    # pooled over one seed is the run itself
    assert report["pooled"]["stable"]["methods"]["average"]["log_loss"] == pytest.approx(m["log_loss"])


def test_btc_seeds_are_not_pooled_as_if_independent(tmp_path):
    # the candles are the same for every seed: pooling them would count each outcome twice
    code = backtest.main(["--scenario", "btc", "--seeds", "1,2", "--events", "300", "--warmup", "100", "--quick",
                          "--no-fusion", "--no-plots", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "backtest.json").read_text())
    assert [r["scored"] for r in report["runs"]] == [200, 200]
    pooled = report["pooled"]["btc"]
    assert pooled["n"] == 200 and pooled["seeds"] == [1] and "do not depend on the seed" in pooled["note"]
    assert "fusion" not in pooled["methods"]


def test_btc_pooled_note_gives_every_seeds_difference_of_the_fusion(tmp_path):
    """The transformer's seed moves its btc result (it can flip the sign against the average), so
    the pooled report, which stands on the first seed, names each seed's difference."""
    code = backtest.main(["--scenario", "btc", "--seeds", "1,2", "--events", "260", "--warmup", "60", "--quick",
                          "--no-plots", "--no-progress", "--out", str(tmp_path), "--fusion.min_samples", "20"])
    assert code == 0
    report = json.loads((tmp_path / "backtest.json").read_text())
    note = report["pooled"]["btc"]["note"]
    per_seed = {r["seed"]: r["methods"]["fusion"]["vs_average"]["mean_diff"] for r in report["runs"]}
    assert note.endswith("fusion Δ log loss vs average by seed: "
                         + ", ".join(f"{seed}: {d * 1e3:+.2f}e-3" for seed, d in per_seed.items()))


class Recorder:
    """A fuser that logs every call, so the test can see the order; it predicts the average."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def predict_proba_one(self, probs, features=None):
        self.log.append(("predict", self.name, len([e for e in self.log if e[0] == "learn" and e[1] == self.name])))
        return sum(probs) / len(probs)

    def learn_one(self, probs, features, y):
        self.log.append(("learn", self.name, y))


def test_prequential_order_predict_before_learn():
    stream = make_stream("switching", 1, 50)
    log: list = []
    result = backtest.run_prequential(stream, [Recorder("a", log), Recorder("b", log)], warmup=10)
    # per event: both predict (having learned t outcomes), then both learn outcome t
    expected = []
    for t, y in enumerate(stream.y.tolist()):
        expected += [("predict", "a", t), ("predict", "b", t), ("learn", "a", y), ("learn", "b", y)]
    assert log == expected
    assert np.array_equal(result.preds["a"], stream.probs.mean(axis=1))
    assert result.warmup == 10 and np.array_equal(result.y, stream.y)


def test_a_fuser_that_peeks_is_not_possible_but_one_that_learns_is_rewarded():
    # the fusers see y only in learn_one: a "cheat" that predicts the last outcome it learned scores as a
    # lag-1 forecaster, not as an oracle
    class LastOutcome:
        name = "last"
        last = 0.5

        def predict_proba_one(self, probs, features=None):
            return self.last

        def learn_one(self, probs, features, y):
            self.last = 0.99 if y else 0.01

    stream = make_stream("stable", 2, 2000)
    r = backtest.run_prequential(stream, [LastOutcome(), PlainAverage()], warmup=0)
    assert scoring.accuracy(r.preds["last"], r.y) < 0.56  # outcomes are independent: no better than chance


def test_evaluate_picks_the_best_baseline_and_computes_the_edge():
    rng = np.random.default_rng(0)
    p_true = rng.uniform(0.3, 0.7, 3000)
    y = (rng.random(3000) < p_true).astype(int)
    preds = {"fusion": np.clip(p_true + 0.05 * rng.standard_normal(3000), 0, 1),
             "average": np.full(3000, 0.5), "good": p_true.copy(), "bad": 1 - p_true}
    ev = backtest.evaluate(y, preds, p_true=p_true, options=backtest.EvalOptions(boot_draws=50, band_draws=20))
    assert ev["best_baseline"] == "good"
    assert ev["methods"]["good"]["edge_captured"] == pytest.approx(1.0)
    assert ev["methods"]["average"]["edge_captured"] == pytest.approx(0.0)
    assert 0 < ev["methods"]["fusion"]["edge_captured"] < 1
    assert ev["methods"]["bad"]["vs_average"]["dm_p"] < 1e-6 and ev["methods"]["bad"]["vs_average"]["mean_diff"] > 0
    assert "vs_best_baseline" not in ev["methods"]["good"] and "vs_average" not in ev["methods"]["average"]
    assert ev["oracle"]["log_loss"] == pytest.approx(ev["methods"]["good"]["log_loss"])


def test_bad_arguments_are_refused(tmp_path, capsys):
    for args, msg in ((["--scenario", "nope"], "unknown scenario"),
                      (["--fusion.hidden_dim", "33"], "fusion.hidden_dim"),
                      (["--scenario", "stable", "--events", "100", "--warmup", "100"], "nothing to score"),
                      (["--target", "localhost:1", "--jobs", "2"], "sequential")):
        with pytest.raises(SystemExit) as e:
            backtest.main([*args, "--out", str(tmp_path)])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_cli_lists_backtest_in_help(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "backtest" in capsys.readouterr().out


def test_through_a_running_service(tmp_path):
    """--target: Predict with an event_id, then RecordOutcome by that event_id, against a real server."""
    from prometheus_client import CollectorRegistry

    from titan_fusion.server.config import FusionConfig
    from titan_fusion.server.service import create_server
    from titan_fusion.server.settings import ServiceConfig
    fast = FusionConfig(min_samples=20, warmup_steps=10, batch_size=8, val_every=5)
    svc, port = create_server(ServiceConfig(port=0, metrics_port=-1, data_dir=str(tmp_path / "data"), fusion=fast,
                                            checkpoint_every=0), registry=CollectorRegistry())
    try:
        assert svc.wait_ready(30)
        out = tmp_path / "reports"
        code = backtest.main(["--scenario", "volatility", "--seeds", "1", "--events", "150", "--warmup", "50",
                              "--quick", "--no-progress", "--no-plots", "--target", f"127.0.0.1:{port}",
                              "--out", str(out)])
        assert code == 0
        run = json.loads((out / "backtest.json").read_text())["runs"][0]
        assert "service" in run["methods"] and "fusion" not in run["methods"]
        assert run["fusion_info"]["training_stats"]["samples_trained"] == 150  # every outcome, once
        assert sum(run["fusion_sources"].values()) == 100 and run["fusion_sources"].get("fusion", 0) > 0
    finally:
        svc.stop(0)
