"""STTSConfig: the spec's defaults, validation of every field, and (de)serialisation."""

import json
import math
import warnings

import pytest

from stts_adapter.config import CONFIG_NAME, STTSConfig
from stts_adapter.errors import AdapterLoadError, STTSConfigError


# --------------------------------------------------------------------------------------------- defaults
def test_defaults_match_the_spec():
    config = STTSConfig()
    assert config.prune_ratio == 0.5
    assert config.prune_layer == 3
    assert config.method == "scorer"
    assert config.aux_loss_weight == 0.5
    assert config.aux_loss == "bce"  # ours; the paper's "mse" saturates (see the README's method section)
    assert config.scorer_input_norm is True and config.score_gate is False
    assert config.bias_min == pytest.approx(math.exp(-2), rel=1e-12)
    assert math.log(config.bias_min) == pytest.approx(-2.0, abs=1e-12)
    assert config.keep_first_frame is True
    assert config.detach_aux_target is True
    assert config.train_base_model is False


def test_error_types():
    assert issubclass(STTSConfigError, ValueError)
    assert issubclass(AdapterLoadError, ValueError)


# --------------------------------------------------------------------------------------------- validation
INVALID = [
    ("prune_ratio", -0.1),
    ("prune_ratio", 1.0),
    ("prune_ratio", 1),
    ("prune_ratio", float("nan")),
    ("prune_ratio", float("inf")),
    ("prune_ratio", "0.5"),
    ("prune_ratio", True),
    ("prune_ratio", None),
    ("prune_layer", -1),
    ("prune_layer", 1.5),
    ("prune_layer", 3.0),
    ("prune_layer", True),
    ("method", "tome"),
    ("method", "Scorer"),
    ("bias_min", 0),
    ("bias_min", 0.0),
    ("bias_min", -0.5),
    ("bias_min", 1.5),
    ("bias_min", float("nan")),
    ("aux_loss_weight", -1),
    ("aux_loss", "l2"),
    ("aux_loss", None),
    ("aux_loss_weight", float("inf")),
    ("logit_penalty_weight", -0.01),
    ("seed", 2**64),
    ("seed", 2**63),
    ("seed", -1),
    ("bias_min", 1e-46),
    ("bias_min", 9e-7),
    ("scorer_hidden_size", 10**6),
    ("scorer_num_heads", 5000),
    ("logit_penalty_weight", float("nan")),
    ("logit_penalty_margin", -1.0),
    ("logit_penalty_margin", float("nan")),
    ("scorer_hidden_size", 0),
    ("scorer_hidden_size", -8),
    ("scorer_hidden_size", 16.0),
    ("scorer_num_heads", 0),
    ("keep_first_frame", "yes"),
    ("keep_first_frame", 1),
    ("detach_aux_target", "no"),
    ("train_base_model", 0),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_raises_config_error_naming_field_and_value(name, value):
    with pytest.raises(STTSConfigError) as info:
        STTSConfig(**{name: value})
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert name in message
    assert repr(value) in message or str(value) in message


@pytest.mark.parametrize(("name", "value"), INVALID[:4])
def test_invalid_value_is_caught_as_plain_value_error(name, value):
    with pytest.raises(ValueError):
        STTSConfig(**{name: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prune_ratio": 0.0},
        {"prune_ratio": 0},
        {"prune_ratio": 0.999},
        {"prune_layer": 0},
        {"method": "random"},
        {"method": "similarity"},
        {"bias_min": 1.0},
        {"bias_min": 1e-6},
        {"aux_loss_weight": 0},
        {"scorer_hidden_size": 1, "scorer_num_heads": 1},
        {"keep_first_frame": False, "detach_aux_target": False, "train_base_model": True},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    config = STTSConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


def test_validate_rechecks_after_mutation():
    config = STTSConfig()
    config.prune_ratio = 1.5
    with pytest.raises(STTSConfigError, match="prune_ratio"):
        config.validate()


# --------------------------------------------------------------------------------------------- (de)serialisation
NON_DEFAULT = dict(
    prune_ratio=0.75,
    prune_layer=5,
    method="similarity",
    aux_loss_weight=0.25,
    aux_loss="mse",
    logit_penalty_weight=0.01,
    logit_penalty_margin=6.0,
    key_bias=False,
    score_gate=True,
    llm_key_bias_weight=0.5,
    scorer_input_norm=False,
    bias_min=0.2,
    keep_first_frame=False,
    scorer_hidden_size=32,
    scorer_num_heads=2,
    detach_aux_target=False,
    train_base_model=True,
    seed=7,
    architecture="qwen2_5_vl",
    base_model_class="Qwen2_5_VLForConditionalGeneration",
    base_model_name_or_path="some/model",
    vision_hidden_size=64,
    num_vision_blocks=5,
    patches_per_unit=4,
    stts_adapter_version="0.1.0",
    weights_sha256="0" * 64,
)


def test_to_dict_holds_every_field_and_is_json_serialisable():
    config = STTSConfig(**NON_DEFAULT)
    values = config.to_dict()
    assert values == NON_DEFAULT
    assert json.loads(json.dumps(values)) == NON_DEFAULT


def test_to_dict_from_dict_round_trip():
    config = STTSConfig(**NON_DEFAULT)
    again = STTSConfig.from_dict(config.to_dict())
    assert again == config
    assert again is not config
    assert STTSConfig.from_dict(STTSConfig().to_dict()) == STTSConfig()


def test_from_dict_uses_defaults_for_missing_keys():
    config = STTSConfig.from_dict({"prune_ratio": 0.3})
    assert config.prune_ratio == 0.3
    assert config.prune_layer == 3
    assert config.method == "scorer"


def test_a_config_saved_before_an_option_existed_keeps_the_behaviour_it_was_trained_with():
    """stts_adapter 0.1.0 wrote neither `aux_loss` (its loss was the paper's MSE) nor `scorer_input_norm` (its scorer
    read the raw residual stream); a fresh config gets the new defaults."""
    saved = {k: v for k, v in STTSConfig().to_dict().items() if k not in ("aux_loss", "scorer_input_norm")}
    old = STTSConfig.from_dict({**saved, "stts_adapter_version": "0.1.0"})
    assert old.aux_loss == "mse" and old.scorer_input_norm is False
    new = STTSConfig.from_dict(saved)
    assert new.aux_loss == "bce" and new.scorer_input_norm is True
    explicit = STTSConfig.from_dict({**saved, "stts_adapter_version": "0.1.0", "aux_loss": "bce"})
    assert explicit.aux_loss == "bce"


def test_from_dict_validates():
    with pytest.raises(STTSConfigError, match="prune_layer"):
        STTSConfig.from_dict({"prune_layer": -1})


def test_from_dict_rejects_non_dict():
    with pytest.raises(STTSConfigError):
        STTSConfig.from_dict([0.5, 3])


def test_save_pretrained_from_json_file_round_trip(tmp_path):
    config = STTSConfig(**NON_DEFAULT)
    directory = tmp_path / "nested" / "adapter"  # created if missing
    config.save_pretrained(directory)
    path = directory / CONFIG_NAME
    assert CONFIG_NAME == "stts_config.json"
    assert path.is_file()
    assert json.loads(path.read_text(encoding="utf-8")) == NON_DEFAULT
    assert STTSConfig.from_json_file(path) == config
    assert STTSConfig.from_json_file(str(path)) == config


def test_save_pretrained_round_trips_defaults_exactly(tmp_path):
    STTSConfig().save_pretrained(tmp_path)
    loaded = STTSConfig.from_json_file(tmp_path / CONFIG_NAME)
    assert loaded == STTSConfig()
    assert loaded.bias_min == math.exp(-2)  # a float survives JSON exactly


def test_unknown_keys_warn_and_are_ignored():
    values = {**STTSConfig(prune_ratio=0.25).to_dict(), "future_knob": 3, "another_new_field": "x"}
    with pytest.warns(UserWarning, match="future_knob") as record:
        config = STTSConfig.from_dict(values)
    assert any("another_new_field" in str(w.message) for w in record)
    assert config == STTSConfig(prune_ratio=0.25)
    assert not hasattr(config, "future_knob")


def test_unknown_keys_in_a_saved_file_warn_and_are_ignored(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({"prune_layer": 2, "future_knob": True}), encoding="utf-8")
    with pytest.warns(UserWarning, match="future_knob"):
        config = STTSConfig.from_json_file(path)
    assert config == STTSConfig(prune_layer=2)


def test_known_keys_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        STTSConfig.from_dict(STTSConfig().to_dict())


@pytest.mark.parametrize(
    "content",
    [b"this is not json {", b'{"prune_ratio": 0.5,', b"", b"\xff\xfe\x00garbage\x80"],
    ids=["text", "truncated", "empty", "binary"],
)
def test_non_json_file_raises_adapter_load_error(tmp_path, content):
    path = tmp_path / CONFIG_NAME
    path.write_bytes(content)
    with pytest.raises(AdapterLoadError, match="not valid JSON") as info:
        STTSConfig.from_json_file(path)
    assert str(path) in str(info.value)


def test_valid_json_with_invalid_value_raises_a_load_error_naming_file_and_field(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({"method": "tome"}), encoding="utf-8")
    with pytest.raises(AdapterLoadError, match="tome") as raised:
        STTSConfig.from_json_file(path)
    assert str(path) in str(raised.value) and "method" in str(raised.value)
    assert isinstance(raised.value.__cause__, STTSConfigError)
