"""Loading every known key layout, sharding, and clear errors for bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from twotower.backbone import NemotronHForCausalLM
from twotower.checkpoint import CheckpointError, split_experts


def _logits(model, seed=0):
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _write_layout(model, path, *, prefix, per_expert, embedding_alias):
    path.mkdir()
    tensors = {}
    for k, t in model.state_dict().items():
        if k.startswith("backbone."):
            k = prefix + k[len("backbone.") :]
        if embedding_alias:
            k = k.replace(".embeddings.", ".embedding.")
        tensors[k] = t.clone()
    if per_expert:
        tensors = split_experts(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    model.config.save(path / "config.json")


@pytest.mark.parametrize("prefix", ["backbone.", "model."])
@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("embedding_alias", [False, True])
def test_all_key_layouts_load(tmp_path, tiny_model, prefix, per_expert, embedding_alias):
    _write_layout(tiny_model, tmp_path / "ckpt", prefix=prefix, per_expert=per_expert, embedding_alias=embedding_alias)
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(_logits(loaded), _logits(tiny_model), rtol=0, atol=1e-6)


def test_sharded_round_trip_preserves_every_tensor(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(sorted(tiny_model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k  # nothing re-initialised (e.g. dt_bias, A_log)


def test_dtype_and_device_options(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    m = NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.backbone.layers[2].mixer.gate.e_score_correction_bias.dtype == torch.float32


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors.pop("model.layers.0.mixer.dt_bias")
    tensors["model.layers.0.mixer.bogus"] = torch.zeros(2)
    tensors["lm_head.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        NemotronHForCausalLM.from_pretrained(tmp_path)
    text = str(err.value)
    assert "backbone.layers.0.mixer.dt_bias" in text and "bogus" in text and "lm_head.weight (3, 3)" in text


def test_corrupt_and_missing_files(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="not a directory"):
        NemotronHForCausalLM.from_pretrained(tmp_path / "nowhere")
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        NemotronHForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        NemotronHForCausalLM.from_pretrained(tmp_path)


def test_config_mismatch_fails(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        NemotronHForCausalLM.from_pretrained(tmp_path)
