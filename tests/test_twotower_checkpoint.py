"""TwoTower checkpoints in the released layout (SPEC 3.1): round trip, the `embedding.` alias and
shards, and a clear CheckpointError for every way a directory can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import perturbed_twotower, tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.checkpoint import INDEX_NAME, WEIGHTS_NAME, CheckpointError, read_tensors, write_tensors
from twotower.model import TwoTowerForCausalLM

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]
GEN = dict(max_new_tokens=8, block_size=4, steps_per_block=4, confidence_threshold=0.5)


def make_model(seed: int = 0) -> TwoTowerForCausalLM:
    """A denoiser that differs from the context tower and non-trivial adaLN, so a load that dropped
    or re-initialised any part would show."""
    return perturbed_twotower(seed=seed)


@pytest.fixture(scope="module")
def model() -> TwoTowerForCausalLM:
    return make_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("released")
    model.save_pretrained(path)
    return path


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k  # nothing re-initialised (SPEC pitfall 7)


# ---- round trip --------------------------------------------------------------------------------------
def test_saved_directory_uses_the_released_layout(model, saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["NemotronHTwoTowerForCausalLM"]
    assert config["hybrid_override_pattern"] == "M*E-"
    keys = set(load_file(str(saved / WEIGHTS_NAME)))
    E = model.config.n_routed_experts
    for tower in ("context_tower", "denoiser_tower"):
        for e in range(E):
            assert f"{tower}.layers.2.mixer.experts.{e}.up_proj.weight" in keys
            assert f"{tower}.layers.2.mixer.experts.{e}.down_proj.weight" in keys
        assert f"{tower}.layers.2.mixer.experts.up_proj" not in keys  # no fused tensors
        assert f"{tower}.embeddings.weight" in keys
    for k in ("context_lm_head.weight", "lm_head.weight", "t_embedder.mlp.0.weight", "t_block.1.bias"):
        assert k in keys
    assert {f"scale_shift_tables.{i}" for i in range(4)} <= keys
    assert not any(k.startswith(("model.", "backbone.")) for k in keys)
    up = load_file(str(saved / WEIGHTS_NAME))["denoiser_tower.layers.2.mixer.experts.1.up_proj.weight"]
    assert torch.equal(up, model.denoiser_tower.layers[2].mixer.experts.up_proj[1])


def test_round_trip_gives_identical_state_and_generation(model, saved):
    loaded = TwoTowerForCausalLM.from_pretrained(saved).eval()
    assert_same_state(model, loaded)
    assert loaded.generate_mask_diffusion(PROMPTS, **GEN).new_tokens == (
        model.generate_mask_diffusion(PROMPTS, **GEN).new_tokens
    )
    assert loaded.generate_ar(PROMPTS, max_new_tokens=6).new_tokens == (
        model.generate_ar(PROMPTS, max_new_tokens=6).new_tokens
    )
    assert not any(p.requires_grad for p in loaded.context_tower.parameters())
    assert all(p.requires_grad for p in loaded.denoiser_parameters())


def test_sharded_save_loads_back(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_bytes=30_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert_same_state(model, TwoTowerForCausalLM.from_pretrained(tmp_path))


def test_embedding_alias_in_sharded_files_loads(model, saved, tmp_path):
    tensors = {k.replace(".embeddings.", ".embedding."): v for k, v in read_tensors(saved).items()}
    assert "denoiser_tower.embedding.weight" in tensors
    write_tensors(tensors, tmp_path, max_shard_bytes=20_000)
    shutil.copy(saved / "config.json", tmp_path / "config.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path)
    assert_same_state(model, loaded)


def test_dtype_option_keeps_the_router_bias_fp32(saved):
    loaded = TwoTowerForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.scale_shift_tables[0].dtype == torch.bfloat16
    assert loaded.denoiser_tower.layers[2].mixer.gate.e_score_correction_bias.dtype == torch.float32


# ---- clear errors ------------------------------------------------------------------------------------
def test_corrupt_safetensors_file(saved, tmp_path):
    bad = copy_dir(saved, tmp_path / "bad")
    data = (bad / WEIGHTS_NAME).read_bytes()
    (bad / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])  # truncated mid-tensor
    with pytest.raises(CheckpointError, match="truncated file"):
        TwoTowerForCausalLM.from_pretrained(bad)
    (bad / WEIGHTS_NAME).write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors file"):
        TwoTowerForCausalLM.from_pretrained(bad)


def _rewrite(path, edit) -> None:
    tensors = load_file(str(path / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))


def test_missing_tensor(saved, tmp_path):
    bad = copy_dir(saved, tmp_path / "bad")
    _rewrite(bad, lambda t: t.pop("t_block.1.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: t_block\.1\.weight"):
        TwoTowerForCausalLM.from_pretrained(bad)


def test_missing_expert(saved, tmp_path):
    bad = copy_dir(saved, tmp_path / "bad")
    _rewrite(bad, lambda t: t.pop("denoiser_tower.layers.2.mixer.experts.1.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"per-expert up_proj weights missing for experts \[1\]"):
        TwoTowerForCausalLM.from_pretrained(bad)


def test_config_that_does_not_match_the_tensors(saved, tmp_path):
    bad = copy_dir(saved, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["moe_intermediate_size"] = 32  # the file's experts are 24 wide
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config") as err:
        TwoTowerForCausalLM.from_pretrained(bad)
    msg = str(err.value)
    assert "mis-shaped tensors" in msg
    assert "context_tower.layers.2.mixer.experts.up_proj (6, 24, 48) vs model (6, 32, 48)" in msg


def test_ar_backbone_directory_is_refused_with_a_hint(tmp_path):
    torch.manual_seed(0)
    NemotronHForCausalLM(tiny_config("M*E-")).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as err:
        TwoTowerForCausalLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "architectures=['NemotronHForCausalLM'], not NemotronHTwoTowerForCausalLM" in msg
    assert "TwoTowerForCausalLM.from_backbone_pretrained" in msg
    # the same hint when config.json names no architecture: the tensor names give it away
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"holds an AR backbone .* TwoTowerForCausalLM\.from_backbone_pretrained"):
        TwoTowerForCausalLM.from_pretrained(tmp_path)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        TwoTowerForCausalLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        TwoTowerForCausalLM.from_pretrained(tmp_path)
