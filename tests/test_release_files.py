"""NVIDIA's release as files (tests/data/release: the release's config.json and its tensor names,
shapes and dtypes, copied from the project's shared reference): its config.json is the 30B preset, and a model
built from it on the meta device holds exactly the released tensors once the checkpoint mapping is
applied; an index naming 24 shards is followed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from twotower.checkpoint import INDEX_NAME, check_sources, checkpoint_entries, map_sources, split_experts
from twotower.config import NemotronHConfig, preset
from twotower.model import TwoTowerForCausalLM
from twotower.shards import TensorEntry

REFERENCE = Path(__file__).resolve().parent / "data" / "release"
CONFIG = REFERENCE / "released_config.json"
KEYS = REFERENCE / "released_keys.json"
TOWERS = {"context_tower.": "context_tower.", "denoiser_tower.": "denoiser_tower."}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def released_config() -> NemotronHConfig:
    # the file writes Infinity bare, as Python's json (and transformers) do
    return NemotronHConfig.from_dict(json.loads(CONFIG.read_text()))


def released_keys() -> dict:
    return json.loads(KEYS.read_text())


def test_released_config_is_the_30b_preset_exactly():
    config = released_config()
    assert config == preset("nemotron-3-nano-30b-a3b")
    assert config.eos_token_ids == (2, 11)
    assert config.mamba_ssm_cache_dtype == "float32"
    assert config.extra["rope_theta"] == 10000  # kept (and round-tripped), never applied: no RoPE
    assert config.extra["torch_dtype"] == "bfloat16"
    assert config.time_step_limit == (0.0, float("inf"))
    assert config.num_hidden_layers == 52 and config.hybrid_override_pattern.count("E") == 23
    again = NemotronHConfig.from_dict(json.loads(config.to_json()))
    assert again == config and again.extra["rope_theta"] == 10000


def fake_entries(keys: dict, shards: int = 24) -> dict[str, TensorEntry]:
    """Header entries for the released tensors, spread over `shards` file names (no data)."""
    out = {}
    for i, (name, meta) in enumerate(sorted(keys["tensors"].items())):
        file = Path(f"model-{i % shards + 1:05d}-of-{shards:05d}.safetensors")
        shape = tuple(meta["shape"])
        dtype = DTYPES[meta["dtype"]]
        out[name] = TensorEntry(name, file, dtype, shape, 0, dtype.itemsize * int(torch.Size(shape).numel()))
    return out


def test_meta_model_has_exactly_the_released_tensors():
    keys = released_keys()
    with torch.device("meta"):
        model = TwoTowerForCausalLM(released_config())
    sources = map_sources(fake_entries(keys), TOWERS)
    check_sources(model, sources, where="released")  # no extra, none missing, same shapes, same kinds
    ours = {k: list(t.shape) for k, t in split_experts(dict(model.state_dict())).items()}
    theirs = {k: v["shape"] for k, v in keys["tensors"].items()}
    assert ours == theirs
    assert len(ours) == keys["num_tensors"] == 12544
    assert sum(t.numel() for t in model.state_dict().values()) == keys["num_parameters"] == 63_185_902_848


def test_a_misnamed_release_tensor_is_named_in_the_error():
    keys = released_keys()
    entries = fake_entries(keys)
    entries.pop("denoiser_tower.layers.5.mixer.o_proj.weight")
    with torch.device("meta"):
        model = TwoTowerForCausalLM(released_config())
    with pytest.raises(ValueError, match=r"missing tensors: denoiser_tower\.layers\.5\.mixer\.o_proj\.weight"):
        check_sources(model, map_sources(entries, TOWERS), where="released")


def test_an_index_naming_24_shards_is_followed(tmp_path):
    """A scaled copy of the release (its 52-layer pattern, tiny widths) in 24 shards and an index."""
    from safetensors.torch import save_file

    config = preset("tiny").replace(layers_block_type=released_config().layers_block_type, n_routed_experts=4)
    torch.manual_seed(0)
    model = TwoTowerForCausalLM(config)
    tensors = split_experts(dict(model.state_dict()))
    weight_map, shards = {}, [{} for _ in range(24)]
    for i, key in enumerate(sorted(tensors)):
        shards[i % 24][key] = tensors[key].contiguous()
        weight_map[key] = f"model-{i % 24 + 1:05d}-of-00024.safetensors"
    for i, shard in enumerate(shards):
        save_file(shard, str(tmp_path / f"model-{i + 1:05d}-of-00024.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.save_pretrained(tmp_path / "unused")  # only for its config.json
    (tmp_path / "config.json").write_text((tmp_path / "unused" / "config.json").read_text())
    assert len({e.file.name for e in checkpoint_entries(tmp_path).values()}) == 24
    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path)
    for key, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key
