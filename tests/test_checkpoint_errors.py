"""Damaged or odd checkpoints get a CheckpointError naming the file or tensor (never a raw
exception, never a silently different model), and a save replaces a directory whole."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from twotower import checkpoint
from twotower.backbone import NemotronHForCausalLM
from twotower.checkpoint import CheckpointError
from twotower.train.checkpointing import TrainerState


def _saved(tmp_path, model, **kwargs):
    path = tmp_path / "ckpt"
    model.save_pretrained(path, **kwargs)
    return path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}  # None: the key removed
    (path / "config.json").write_text(json.dumps(cfg))


def test_unreadable_json_files_name_the_file(tmp_path, tiny_model):
    path = _saved(tmp_path, tiny_model)
    (path / "config.json").write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match=r"config\.json: not UTF-8"):
        NemotronHForCausalLM.from_pretrained(path)
    (path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        NemotronHForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    "changes",
    [
        {"hybrid_override_pattern": 52, "layers_block_type": None},
        {"layers_block_type": [["mamba"]], "hybrid_override_pattern": None},
        {"num_attention_heads": 0, "head_dim": None},
    ],
)
def test_config_values_of_the_wrong_type_are_a_clear_error(tmp_path, tiny_model, changes):
    path = _saved(tmp_path, tiny_model)
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=r"config\.json: "):
        NemotronHForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("bad", [["model-1.safetensors"], 3, "../outside.safetensors", "/abs/x.safetensors", ""])
def test_index_entries_must_be_file_names_in_the_directory(tmp_path, tiny_model, bad):
    path = _saved(tmp_path, tiny_model, max_shard_bytes=20_000)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = bad
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name in the checkpoint directory"):
        NemotronHForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    "rename",
    [
        lambda k: k.replace("model.", "backbone.", 1),  # the same tensor under both prefixes
        lambda k: k.replace(".embeddings.", ".embedding."),  # both spellings of the embeddings
    ],
)
def test_a_tensor_stored_under_two_names_is_refused(tmp_path, tiny_model, rename):
    path = _saved(tmp_path, tiny_model)
    tensors = load_file(str(path / "model.safetensors"))
    key = next(k for k in tensors if rename(k) != k)
    tensors[rename(key)] = tensors[key].clone()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="stored twice"):
        NemotronHForCausalLM.from_pretrained(path)


def test_fused_and_per_expert_copies_of_one_weight_are_refused(tmp_path, tiny_model):
    path = _saved(tmp_path, tiny_model)
    tensors = load_file(str(path / "model.safetensors"))
    fused = next(k for k in tensors if k.endswith(".experts.up_proj"))
    for e in range(tensors[fused].shape[0]):
        tensors[f"{fused[: -len('.up_proj')]}.{e}.up_proj.weight"] = tensors[fused][e].clone()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="stored twice: fused"):
        NemotronHForCausalLM.from_pretrained(path)


def test_auto_dtype_in_config_keeps_the_stored_dtype(tmp_path, tiny_model):
    path = _saved(tmp_path, tiny_model.to(torch.bfloat16))
    _edit_config(path, torch_dtype="auto")
    loaded = NemotronHForCausalLM.from_pretrained(path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16  # not float32's default


def test_eight_bit_floats_alone_do_not_become_the_model_dtype():
    """Stored fp8 weights (most of the bytes) do not make the model fp8; config.json still decides."""
    fp8 = SimpleNamespace(dtype=torch.float8_e4m3fn, nbytes=100)
    bf16 = SimpleNamespace(dtype=torch.bfloat16, nbytes=10)
    assert checkpoint.stored_dtype({}, {"a": fp8, "b": bf16}) == torch.bfloat16
    assert checkpoint.stored_dtype({}, {"a": fp8}) == torch.bfloat16
    assert checkpoint.stored_dtype({"torch_dtype": "float16"}, {"a": fp8}) == torch.float16


def test_a_failed_save_leaves_the_old_checkpoint_whole(tmp_path, tiny_model, monkeypatch):
    path = _saved(tmp_path, tiny_model, max_shard_bytes=20_000)
    (path / "tokenizer.json").write_text("{}")  # not part of the checkpoint: kept by later saves
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    writes = []

    def crash_after_one_shard(tensors, where, **kwargs):
        writes.append(where)
        (where / "model-00001-of-00009.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_tensors", crash_after_one_shard)
    with pytest.raises(OSError, match="disk full"):
        tiny_model.save_pretrained(path)
    assert writes and writes[0] != path  # the save wrote elsewhere, never into the checkpoint
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind
    monkeypatch.undo()
    tiny_model.save_pretrained(path)  # one file now: the shards and the index are gone, the tokenizer kept
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    NemotronHForCausalLM.from_pretrained(path)


def test_saving_onto_a_file_is_refused(tmp_path, tiny_model):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        tiny_model.save_pretrained(target)
    assert target.read_text() == "x"


@pytest.mark.parametrize(
    "change, message",
    [({"step": None}, "no step"), ({"step": "7"}, "step = '7'"), ({"step": -1}, "step = -1"), ({"log": {}}, "log")],
)
def test_a_damaged_trainer_state_names_its_file(tmp_path, change, message):
    record = {"format": "twotower.train_checkpoint", "version": 1, "step": 3, "log": [], "settings": {},
              "world_size": 1, "mode": "single"}  # fmt: skip
    good = TrainerState.from_json(json.dumps(record), where=tmp_path / "s.json")
    assert good.step == 3
    for key, value in change.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    with pytest.raises(ValueError, match=message) as err:
        TrainerState.from_json(json.dumps(record), where=tmp_path / "s.json")
    assert "s.json" in str(err.value)
