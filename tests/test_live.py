"""Live shadow scoring: the service serves the average while the fusion underperforms it, and back."""
from __future__ import annotations

import math
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from titan_fusion.client import FusionClient
from titan_fusion.server.config import FusionConfig
from titan_fusion.server.live import LiveScorer
from titan_fusion.server.service import create_server
from titan_fusion.server.settings import ServiceConfig

FAST = FusionConfig(min_samples=20, warmup_steps=10, batch_size=8, val_every=5, early_stopping_patience=10_000)


def test_scorer_switches_with_hysteresis_and_persists():
    s = LiveScorer(window=10, margin=0.1, min_outcomes=5)
    for _ in range(4):  # the fusion is terrible, but too few outcomes to judge
        assert not s.observe(served=0.9, fusion=0.9, average=0.5, y=0)
    assert s.excess() is None and not s.underperforming
    assert s.observe(served=0.9, fusion=0.9, average=0.5, y=0)  # 5th: excess ~1.6 nats > 0.1
    assert s.underperforming and s.switches == 1
    for _ in range(10):  # equal forecasts from now on: excess falls to 0 once the window has rolled
        s.observe(served=0.5, fusion=0.6, average=0.6, y=1)
    assert not s.underperforming and s.switches == 2
    t = LiveScorer(window=10, margin=0.1, min_outcomes=5)
    t.load(s.state())
    assert t.snapshot() == s.snapshot()


def test_hysteresis_band_holds_the_average():
    s = LiveScorer(window=4, margin=0.2, min_outcomes=4)
    for _ in range(4):
        s.observe(served=0.5, fusion=0.3, average=0.5, y=1)  # excess ln(0.5/0.3) = 0.51 > 0.2
    assert s.underperforming
    for _ in range(4):
        s.observe(served=0.5, fusion=0.43, average=0.5, y=1)  # excess 0.15: above margin/2, stay
    assert s.underperforming and 0.1 < s.excess() <= 0.2
    for _ in range(4):
        s.observe(served=0.5, fusion=0.5, average=0.5, y=1)
    assert not s.underperforming


def _regime(stream, seed, n, inverted):
    """The informative stream; `inverted`: the good expert now points the wrong way."""
    for experts, feats, direction in stream(seed, n):
        if inverted:
            direction = "DOWN" if direction == "UP" else "UP"
        yield experts, feats, direction


def test_the_service_serves_the_average_while_the_fusion_underperforms_and_back(tmp_path, stream):
    svc, port = create_server(ServiceConfig(port=0, metrics_port=0, data_dir=str(tmp_path / "data"), fusion=FAST,
                                            checkpoint_every=0, live_window=60, underperform_min_outcomes=40,
                                            underperform_margin=0.02), registry=CollectorRegistry())
    assert svc.wait_ready(30)
    client = FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False)
    n = 0

    def play(events, until=None):
        nonlocal n
        for experts, feats, direction in events:
            p = client.predict(experts, feats, event_id=f"live-{n}")
            client.record_outcome(actual_direction=direction, event_id=f"live-{n}")
            n += 1
            if until is not None and until(p):
                return p
        return p

    try:
        p = play(_regime(stream, 71, 300, inverted=False))
        live = client.stats()["live"]
        assert p.source == "fusion" and not live["underperforming"]
        switches = live["switches"]  # the young fusion may have lost to the average for a while
        assert live["fusion"]["log_loss"] < live["average"]["log_loss"]  # the fusion is earning its keep
        assert live["served"]["log_loss"] == live["fusion"]["log_loss"]  # and it is what was served

        p = play(_regime(stream, 72, 400, inverted=True), until=lambda p: p.source == "average")
        assert (p.source, p.reason) == ("average", "underperforming")
        live = client.stats()["live"]
        assert live["underperforming"] and live["switches"] == switches + 1
        assert live["log_loss_excess"] > 0.02

        p = play(_regime(stream, 73, 1500, inverted=False), until=lambda p: p.source == "fusion")
        assert p.source == "fusion"
        live = client.stats()["live"]
        assert not live["underperforming"] and live["switches"] == switches + 2
        assert live["log_loss_excess"] <= 0.01

        text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("fusion_underperforming", ())] == 0.0
        assert samples[("fusion_underperforming_switches_total", ())] == switches + 2
        assert samples[("fusion_predictions_total", (("reason", "underperforming"), ("source", "average")))] >= 1
        assert math.isfinite(samples[("fusion_live_log_loss", (("source", "fusion"),))])
        assert samples[("fusion_live_window_outcomes", ())] == 60
        assert samples[("fusion_last_outcome_timestamp_seconds", ())] > 1.7e9
    finally:
        client.close()
        svc.stop(grace=1)


def test_live_scoring_replayed_after_a_crash_is_what_the_service_scored_before_it(tmp_path):
    """After a crash (no checkpoint: the journal is learned again from the start), live scoring
    takes what the running service took, as journaled with each outcome: though every Predict is
    past the horizon by then, and a bulk row that carried its inputs (history, not scored live) has
    the event_id of a Predict."""
    from service_helpers import events, start, wait_until

    data = tmp_path / "data"
    svc, port, _ = start(data, event_horizon_seconds=2.0)
    evs = events(61, 150)
    with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as c:
        for i, (e, f, d) in enumerate(evs[:30]):  # past min_samples (20): the fusion forecasts
            c.record_outcome(e, f, actual_direction=d, event_id=f"warm-{i}")
        for i, (e, f, d) in enumerate(evs[30:100]):  # Predict, then RecordOutcome by event_id: scored
            c.predict(e, f, event_id=f"live-{i}")
            c.record_outcome(actual_direction=d, event_id=f"live-{i}")
        for i, (e, f, _) in enumerate(evs[100:]):
            c.predict(e, f, event_id=f"bulk-{i}")
        result = c.record_outcomes({"experts": e, "features": f, "actual_direction": d, "event_id": f"bulk-{i}"}
                                   for i, (e, f, d) in enumerate(evs[100:]))
        assert result.accepted == 50
        wait_until(lambda: c.stats()["service"]["training_lag"] == 0, what="the bulk rows learned")
        before = c.stats()["live"]
    assert before["fusion"]["outcomes"] == before["served"]["outcomes"] == 70
    time.sleep(2.1)  # every Predict is past the horizon now
    svc.owner.stop(checkpoint=False)  # as after a crash: nothing but the journal
    svc.stop(grace=0)
    assert list((data / "checkpoints").iterdir()) == []

    svc, port, _ = start(data, event_horizon_seconds=2.0)
    try:
        with FusionClient(f"127.0.0.1:{port}", timeout=10, fallback=False) as c:
            assert c.stats()["samples_trained"] == 150
            assert repr(c.stats()["live"]) == repr(before)  # repr: NaN (no excess yet) equals NaN
    finally:
        svc.stop(grace=0)
