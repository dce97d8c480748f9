import math
import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from titan_fusion.server import fusion as fusion_module
from titan_fusion.server import inference
from titan_fusion.server.metrics import AVERAGE_REASONS, RPC_BUCKETS, SOURCE_AVERAGE, SOURCE_FUSION, Metrics


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


def value(m, name, **labels):
    return m.registry.get_sample_value(name, labels)


def test_a_fresh_registry_by_default_never_the_global_one():
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    assert a.registry is not REGISTRY and a.registry is not b.registry
    assert REGISTRY.get_sample_value("fusion_outcomes_total") is None


def test_label_values_match_the_model():
    reasons = {v for k, v in vars(inference).items() if k.startswith("REASON_")}
    assert reasons and set(AVERAGE_REASONS) == reasons
    assert (SOURCE_FUSION, SOURCE_AVERAGE) == (inference.SOURCE_FUSION, inference.SOURCE_AVERAGE)


def test_every_prediction_label_pair_exists_at_zero_before_any_prediction(metrics):
    assert value(metrics, "fusion_predictions_total", source="fusion", reason="none") == 0.0
    for reason in AVERAGE_REASONS:
        assert value(metrics, "fusion_predictions_total", source="average", reason=reason) == 0.0
    for queue in ("owner", "predict"):
        assert value(metrics, "fusion_queue_depth", queue=queue) == 0.0
    for action in ("save", "restore"):
        assert value(metrics, "fusion_checkpoints_total", action=action) == 0.0
    for method in ("Predict", "RecordOutcome", "Stats", "Checkpoint"):
        assert value(metrics, "fusion_rpc_duration_seconds_count", method=method) == 0.0
    assert value(metrics, "fusion_outcomes_total") == 0.0
    assert math.isnan(value(metrics, "fusion_train_loss"))  # no loss yet is not a loss of 0


def test_count_prediction(metrics):
    metrics.count_prediction("fusion", None)
    metrics.count_prediction("average", "warming_up", n=3)
    assert value(metrics, "fusion_predictions_total", source="fusion", reason="none") == 1.0
    assert value(metrics, "fusion_predictions_total", source="average", reason="warming_up") == 3.0
    assert value(metrics, "fusion_predictions_total", source="average", reason="disabled") == 0.0
    with pytest.raises(ValueError, match="unknown prediction"):
        metrics.count_prediction("fusion", "warming_up")


def test_count_outcome(metrics):
    metrics.count_outcome(duplicate=False)
    metrics.count_outcome(duplicate=False)
    metrics.count_outcome(duplicate=True)
    assert value(metrics, "fusion_outcomes_total") == 2.0
    assert value(metrics, "fusion_duplicates_total") == 1.0


def test_observe_training(metrics):
    metrics.observe_training({
        "train_loss": 0.69, "val_loss": math.nan, "current_lr": 0.0005, "avg_attention_entropy": 1.2,
        "is_overfitting": True, "samples_trained": 250, "train_steps": 50, "early_stops": 1, "ready": True,
        "train_buffer_size": 200, "val_buffer_size": 50, "last_source": "fusion", "expert_names": ["a"],
    })
    assert value(metrics, "fusion_train_loss") == 0.69
    assert math.isnan(value(metrics, "fusion_val_loss"))
    assert value(metrics, "fusion_learning_rate") == 0.0005
    assert value(metrics, "fusion_attention_entropy") == 1.2
    assert value(metrics, "fusion_overfitting") == 1.0
    assert value(metrics, "fusion_samples_trained") == 250.0
    assert value(metrics, "fusion_train_steps") == 50.0
    assert value(metrics, "fusion_model_version") == 50.0
    assert value(metrics, "fusion_early_stops") == 1.0
    assert value(metrics, "fusion_ready") == 1.0
    assert value(metrics, "fusion_train_buffer_size") == 200.0
    assert value(metrics, "fusion_val_buffer_size") == 50.0
    metrics.observe_training({"is_overfitting": False, "ready": False, "model_version": 7, "val_loss": None})
    assert value(metrics, "fusion_overfitting") == 0.0 and value(metrics, "fusion_ready") == 0.0
    assert value(metrics, "fusion_model_version") == 7.0
    assert math.isnan(value(metrics, "fusion_val_loss"))
    assert value(metrics, "fusion_train_loss") == 0.69  # absent keys are left alone


def test_observe_training_from_the_real_model(metrics):
    fusion = fusion_module.TransformerFusion(n_models=2, config={"fusion.min_samples": 2})
    metrics.observe_training(fusion.get_training_stats())
    metrics.observe_attention(fusion.get_attention_weights())
    assert value(metrics, "fusion_ready") == 0.0
    assert value(metrics, "fusion_attention_weight", expert="model_0") == 0.5


def test_observe_attention_replaces_the_expert_set(metrics):
    metrics.observe_attention({"model_0": 0.5, "model_1": 0.5})
    metrics.observe_attention({"rsi": 0.7, "macd": 0.3})
    assert value(metrics, "fusion_attention_weight", expert="rsi") == 0.7
    assert value(metrics, "fusion_attention_weight", expert="macd") == 0.3
    assert value(metrics, "fusion_attention_weight", expert="model_0") is None


def test_observe_rpc(metrics):
    metrics.observe_rpc("Predict", 0.0003, None)
    metrics.observe_rpc("Predict", 0.002, "OK")
    metrics.observe_rpc("RecordOutcome", 0.5, "INVALID_ARGUMENT")

    class StatusCode:  # like grpc.StatusCode members
        name = "RESOURCE_EXHAUSTED"
    metrics.observe_rpc("RecordOutcome", 0.0001, StatusCode())
    assert value(metrics, "fusion_rpc_duration_seconds_count", method="Predict") == 2.0
    assert value(metrics, "fusion_rpc_duration_seconds_sum", method="Predict") == pytest.approx(0.0023)
    assert value(metrics, "fusion_rpc_duration_seconds_bucket", method="Predict", le="0.0005") == 1.0
    assert value(metrics, "fusion_rpc_duration_seconds_bucket", method="Predict", le="+Inf") == 2.0
    assert value(metrics, "fusion_rpc_errors_total", method="Predict", code="OK") is None
    assert value(metrics, "fusion_rpc_errors_total", method="RecordOutcome", code="INVALID_ARGUMENT") == 1.0
    assert value(metrics, "fusion_rpc_errors_total", method="RecordOutcome", code="RESOURCE_EXHAUSTED") == 1.0
    with pytest.raises(ValueError, match="unknown method"):
        metrics.observe_rpc("Nope", 0.1, None)


def test_buckets_resolve_sub_millisecond_calls():
    assert RPC_BUCKETS[0] <= 0.0001 and sum(b < 0.001 for b in RPC_BUCKETS) >= 4


def test_custom_methods():
    m = Metrics(CollectorRegistry(), methods=("Predict",))
    m.observe_rpc("Predict", 0.001)
    assert set(m.rpc_duration) == {"Predict"}


def test_queue_depth_and_checkpoints(metrics):
    depth = {"owner": 17, "predict": 3}
    metrics.watch_queue_depth("owner", lambda: depth["owner"])
    metrics.watch_queue_depth("predict", lambda: depth["predict"])
    assert value(metrics, "fusion_queue_depth", queue="owner") == 17.0
    assert value(metrics, "fusion_queue_depth", queue="predict") == 3.0
    depth["owner"] = 5  # read at each scrape, not when last set
    assert value(metrics, "fusion_queue_depth", queue="owner") == 5.0
    metrics.count_checkpoint("save")
    metrics.count_checkpoint("save")
    metrics.count_checkpoint("restore")
    metrics.count_checkpoint("save", ok=False)
    assert value(metrics, "fusion_checkpoints_total", action="save") == 2.0
    assert value(metrics, "fusion_checkpoints_total", action="restore") == 1.0
    assert value(metrics, "fusion_checkpoint_errors_total", action="save") == 1.0
    with pytest.raises(ValueError):
        metrics.watch_queue_depth("other", lambda: 1)
    with pytest.raises(ValueError):
        metrics.count_checkpoint("delete")


def test_a_real_http_scrape(metrics):
    metrics.observe_training({"train_loss": 0.5})
    metrics.observe_rpc("Predict", 0.0004)
    server, port = metrics.start_http_server(0)
    try:
        assert port > 0
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            text = response.read().decode()
    finally:
        metrics.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["fusion_train_loss"].samples[0].value == 0.5
    histogram = families["fusion_rpc_duration_seconds"]
    assert histogram.type == "histogram"
    count = [s for s in histogram.samples if s.name == "fusion_rpc_duration_seconds_count"
             and s.labels == {"method": "Predict"}]
    assert count[0].value == 1.0
    assert families["fusion_predictions"].type == "counter"  # the parser strips _total from family names
    metrics.stop()  # idempotent


def test_stop_frees_the_port_for_a_restart(metrics):
    _, port = metrics.start_http_server(0)
    with pytest.raises(RuntimeError):
        metrics.start_http_server(0)
    metrics.stop()
    _, port2 = metrics.start_http_server(port)
    assert port2 == port
    metrics.stop()


def test_the_batch_size_buckets_reach_the_largest_batch():
    from titan_fusion.server.metrics import BATCH_BUCKETS
    from titan_fusion.server.owner import MAX_PREDICT_BATCH
    assert BATCH_BUCKETS[-1] == MAX_PREDICT_BATCH


def test_error_series_exist_at_zero_for_every_status_the_service_answers(metrics):
    """increase() cannot see the first error of a series that appears with it: for a trader's few
    calls an hour that error matters (FusionHighErrorRatio), so each method's series of every
    status the service answers with exists from the start."""
    from titan_fusion.server.metrics import ERROR_CODES
    from titan_fusion.server.service import STATUS_OF
    assert {code.name for _, code in STATUS_OF} | {"INTERNAL", "UNAUTHENTICATED", "PERMISSION_DENIED"} <= set(ERROR_CODES)
    for method in ("Predict", "RecordOutcome", "RecordOutcomeBatches", "Checkpoint"):
        for code in ERROR_CODES:
            assert value(metrics, "fusion_rpc_errors_total", method=method, code=code) == 0.0
