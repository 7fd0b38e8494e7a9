"""Config parsing: both layer-pattern spellings, JSON quirks, round trip, clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from twotower.config import NemotronHConfig, preset


def test_pattern_and_block_types_are_equivalent():
    a = NemotronHConfig.from_dict({"hybrid_override_pattern": "M*E-", "vocab_size": 64})
    b = NemotronHConfig.from_dict(
        {"layers_block_type": ["linear_attention", "full_attention", "moe", "mlp"], "vocab_size": 64}
    )
    assert a == b and a.hybrid_override_pattern == "M*E-" and a.num_hidden_layers == 4


def test_json_quirks_and_round_trip(tmp_path):
    raw = tiny_config().to_dict()
    raw["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    raw["rope_theta"] = 10000
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = NemotronHConfig.from_json_file(tmp_path / "config.json")
    assert cfg.time_step_limit == (0.0, float("inf"))
    assert cfg.extra["rope_theta"] == 10000
    cfg.save(tmp_path / "again.json")
    text = (tmp_path / "again.json").read_text()
    assert '"__float__": "Infinity"' in text
    assert NemotronHConfig.from_json_file(tmp_path / "again.json") == cfg


def test_released_aliases_and_eos_list():
    cfg = NemotronHConfig.from_dict(
        {"hybrid_override_pattern": "M*", "mamba_n_groups": 2, "mamba_num_heads": 4, "eos_token_id": [2, 11]}
    )
    assert cfg.n_groups == 2 and cfg.eos_token_ids == (2, 11)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"hybrid_override_pattern": "MX*"}, "hybrid_override_pattern"),
        ({"layers_block_type": ["mamba2000"]}, "layers_block_type"),
        ({"num_key_value_heads": 3}, "num_attention_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
        ({"n_groups": 5}, "n_groups"),
        ({"num_hidden_layers": 7, "hybrid_override_pattern": "M*"}, "num_hidden_layers"),
        ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
    ],
)
def test_invalid_configs_name_the_field(change, field):
    raw = tiny_config().to_dict()
    raw.pop("layers_block_type")
    raw.pop("hybrid_override_pattern")
    raw.pop("num_hidden_layers")
    raw["hybrid_override_pattern"] = "M*E-"
    raw.update(change)
    with pytest.raises(ValueError, match=field):
        NemotronHConfig.from_dict(raw)


@pytest.mark.parametrize("raw", [{}, {"num_hidden_layers": 52, "vocab_size": 64}])
def test_a_config_without_a_layer_pattern_is_refused(raw):
    """Not the dataclass's 4-layer default standing in for the model's real layers."""
    with pytest.raises(ValueError, match="no layer pattern"):
        NemotronHConfig.from_dict(raw)


def test_a_missing_head_dim_is_the_transformers_default():
    raw = {"hybrid_override_pattern": "M*E-", "vocab_size": 64, "hidden_size": 2688, "num_attention_heads": 32}
    assert NemotronHConfig.from_dict(raw).head_dim == 128  # not 2688 // 32 = 84
    transformers = pytest.importorskip("transformers")
    assert transformers.NemotronHConfig().head_dim == 128


def test_presets():
    assert preset("nemotron-3-nano-30b-a3b").mamba_conv_dim == 6144
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")
