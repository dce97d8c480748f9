import dataclasses

import pytest

from titan_fusion.server import ConfigError, FusionConfig

ORIGINAL_DEFAULTS = {
    "enabled": True, "hidden_dim": 32, "num_heads": 2, "dropout": 0.2, "learning_rate": 0.001,
    "l2_lambda": 0.01, "warmup_steps": 100, "min_samples": 200, "val_split": 0.2,
    "gradient_clip": 1.0, "early_stopping_patience": 50, "early_stopping_delta": 0.001,
}


def test_the_twelve_original_parameters_keep_their_names_and_defaults():
    c = FusionConfig()
    assert {k: getattr(c, k) for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS


def test_dotted_and_plain_names_are_accepted():
    c = FusionConfig.from_mapping({"fusion.hidden_dim": 64, "num_heads": 4, "fusion.enabled": "false"})
    assert (c.hidden_dim, c.num_heads, c.enabled) == (64, 4, False)


def test_an_object_with_get_like_the_original_config_store():
    class Store(dict):
        pass
    assert FusionConfig.coerce(Store({"fusion.dropout": 0.1})).dropout == 0.1

    class Getter:
        def get(self, key, default=None):
            return {"fusion.min_samples": 7}.get(key, default)
    assert FusionConfig.coerce(Getter()).min_samples == 7


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FusionConfig().hidden_dim = 3


@pytest.mark.parametrize("values, parameter", [
    ({"hidden_dim": 30, "num_heads": 4}, "fusion.hidden_dim"),
    ({"dropout": 1.0}, "fusion.dropout"),
    ({"dropout": -0.1}, "fusion.dropout"),
    ({"learning_rate": 0}, "fusion.learning_rate"),
    ({"l2_lambda": -1}, "fusion.l2_lambda"),
    ({"warmup_steps": -1}, "fusion.warmup_steps"),
    ({"min_samples": 0}, "fusion.min_samples"),
    ({"val_split": 1.0}, "fusion.val_split"),
    ({"gradient_clip": 0}, "fusion.gradient_clip"),
    ({"early_stopping_patience": 0}, "fusion.early_stopping_patience"),
    ({"early_stopping_delta": -0.5}, "fusion.early_stopping_delta"),
    ({"lr_floor_ratio": 0.0}, "fusion.lr_floor_ratio"),
    ({"batch_size": 0}, "fusion.batch_size"),
    ({"missing_features": "zero"}, "fusion.missing_features"),
    ({"expert_names": ["a", "a"]}, "fusion.expert_names"),
    ({"hidden_dim": "wide"}, "fusion.hidden_dim"),
    ({"hidden_dim": 32.5}, "fusion.hidden_dim"),
    ({"enabled": "maybe"}, "fusion.enabled"),
    ({"learning_rate": float("nan")}, "fusion.learning_rate"),
    ({"fusion.no_such_thing": 1}, "fusion.no_such_thing"),
])
def test_bad_values_are_refused_naming_the_parameter(values, parameter):
    with pytest.raises(ConfigError) as e:
        FusionConfig.from_mapping(values)
    assert e.value.parameter == parameter
    assert str(e.value).startswith(parameter)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="hidden_dim.*not divisible by num_heads=3"):
        FusionConfig(hidden_dim=32, num_heads=3)
