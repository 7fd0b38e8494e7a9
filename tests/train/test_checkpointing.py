"""Training checkpoints: safetensors shards plus a JSON state (no pickle anywhere), exact resume on 1
and on 2 processes, a checkpoint written by FSDP2 on N processes resumes on another number, a crash
at any point of a save leaves the previous checkpoint in charge, damage is a clear error."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.distributed.checkpoint.api import CheckpointException

from tests.train.test_parallel import run_job, torchrun
from tests.train.test_trainer import twotower_model, write_packed
from twotower.model import TwoTowerForCausalLM
from twotower.train import checkpointing
from twotower.train.checkpointing import CHECKPOINTS_DIR, STATE_NAME, latest_checkpoint, read_state
from twotower.train.recipes import train_denoiser
from twotower.train.trainer import TrainSettings

REPO = Path(__file__).resolve().parents[2]
# no LR decay: a run stopped after 4 of 6 steps then resumed is the same run as 6 uninterrupted steps
RUN = dict(global_batch=4, micro_batch=2, seq_len=32, lr=3e-3, warmup_steps=2, decay_fraction=0.0, eval_every=3,
           eval_batches=2, save_every=2)  # fmt: skip


def settings(steps: int, **changes) -> TrainSettings:
    return TrainSettings(**{**RUN, "steps": steps, **changes})


def train(data: Path, out: Path, steps: int, **changes) -> list[float]:
    log = train_denoiser(twotower_model(), data, out, settings(steps, **changes), block_size=16, progress=False)
    return [r["loss"] for r in log]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_packed(tmp_path_factory.mktemp("ckpt") / "data")


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> list[float]:
    return train(data, tmp_path_factory.mktemp("full") / "out", 6)


def test_checkpoint_is_safetensors_shards_and_json(data, tmp_path):
    train(data, tmp_path, 4)
    root = tmp_path / CHECKPOINTS_DIR
    assert (root / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    step = latest_checkpoint(tmp_path)
    files = sorted(p.name for p in step.iterdir())
    assert files == ["shard-00001-model-00001-of-00001.safetensors", STATE_NAME]
    with safe_open(step / files[0], framework="pt") as f:
        keys = set(f.keys())
    assert "model.model.denoiser_tower.embeddings.weight" in keys and "model.model.t_embedder.mlp.0.weight" in keys
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg_sq") for k in keys)
    # the frozen context tower is rebuilt from its source: only its buffers (router biases) are kept
    context_buffers = {f"model.model.{n}" for n, _ in twotower_model().named_buffers() if n.startswith("context")}
    assert {k for k in keys if k.startswith("model.model.context")} == context_buffers
    state = json.loads((step / STATE_NAME).read_text())
    assert state["step"] == 4 and len(state["log"]) == 4 and state["settings"]["seed"] == 0
    train(data, tmp_path, 6, keep_checkpoints=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000006"]


def test_resume_reads_no_pickle(data, tmp_path, uninterrupted, monkeypatch):
    train(data, tmp_path, 4)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    assert train(data, tmp_path, 6) == uninterrupted


def test_no_pickle_loading_in_the_repository():
    pattern = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|FileSystemReader")
    offenders = []
    for path in [*REPO.joinpath("src").rglob("*.py"), *REPO.joinpath("scripts").rglob("*.py")]:
        offenders += [f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                      if pattern.search(line)]  # fmt: skip
    assert offenders == []


class Crash(RuntimeError):
    pass


def _crash_at_step_4(monkeypatch, where: str) -> None:
    """Make the save of step 4 die at `where`: while writing tensors, writing the JSON state, renaming
    the directory, or updating the `latest` pointer."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    if where == "tensors":
        original = HuggingFaceStorageWriter.write_data

        def write_data(self, plan, planner):
            if "step-00000004" in str(self.path):
                raise Crash(where)
            return original(self, plan, planner)

        monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", write_data)
    elif where in ("state", "pointer"):
        original = checkpointing._write_atomically
        target = STATE_NAME if where == "state" else "latest"

        def write(path: Path, text: str) -> None:
            if path.name == target and ("00000004" in str(path) or "00000004" in text):
                raise Crash(where)
            original(path, text)

        monkeypatch.setattr(checkpointing, "_write_atomically", write)
    else:
        original_commit = checkpointing.commit_directory

        def commit(tmp: Path, final: Path) -> None:
            if final.name == "step-00000004":
                raise Crash(where)
            original_commit(tmp, final)

        monkeypatch.setattr(checkpointing, "commit_directory", commit)


@pytest.mark.parametrize("where", ["tensors", "state", "rename", "pointer"])
def test_a_crash_mid_save_resumes_from_the_previous_checkpoint(data, tmp_path, uninterrupted, monkeypatch, where):
    with monkeypatch.context() as patch:
        _crash_at_step_4(patch, where)
        with pytest.raises((Crash, CheckpointException)):  # DCP wraps what a rank raised while writing
            train(data, tmp_path, 6)
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert read_state(latest_checkpoint(tmp_path)).step == 2
    assert train(data, tmp_path, 6) == uninterrupted
    root = tmp_path / CHECKPOINTS_DIR
    assert not list(root.glob(".*")) and (root / "latest").read_text().strip() == "step-00000006"


def test_a_damaged_checkpoint_is_a_clear_error(data, tmp_path):
    train(data, tmp_path, 2)
    shard = next(latest_checkpoint(tmp_path).glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cannot resume from"):
        train(data, tmp_path, 4)
    (tmp_path / CHECKPOINTS_DIR / "latest").write_text("step-00000099\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train(data, tmp_path, 4)


def test_resume_refuses_another_data_stream(data, tmp_path):
    train(data, tmp_path, 2)
    with pytest.raises(ValueError, match="seed=0, this run has 1"):
        train(data, tmp_path, 4, seed=1)
    with pytest.raises(ValueError, match="global_batch"):
        train(data, tmp_path, 4, global_batch=8)


@pytest.fixture(scope="module")
def two_process_runs(data, tmp_path_factory):
    """One torchrun launch: FSDP2 uninterrupted, FSDP2 interrupted at step 4 (a copy of its step-4
    checkpoint is kept) and resumed, and FSDP2 resuming a 1-process checkpoint."""
    tmp = tmp_path_factory.mktemp("ckpt2")
    torch.set_num_threads(1)
    run_job({"name": "one4", "out": str(tmp / "one4"), "data": str(data), "settings": {**RUN, "steps": 4}})
    fsdp = {**RUN, "parallel": "fsdp"}
    jobs = [
        {"name": "full", "out": str(tmp / "full"), "settings": {**fsdp, "steps": 6}},
        {"name": "part", "out": str(tmp / "part"), "settings": {**fsdp, "steps": 4}},
        {"name": "copy", "out": str(tmp / "part4"), "copy_from": str(tmp / "part"), "settings": {**fsdp, "steps": 4}},
        {"name": "resumed", "out": str(tmp / "part"), "settings": {**fsdp, "steps": 6}},
        {"name": "from_one", "out": str(tmp / "from_one"), "copy_from": str(tmp / "one4"),
         "settings": {**fsdp, "steps": 6}},
    ]  # fmt: skip
    results = torchrun([{**job, "data": str(data)} for job in jobs], tmp)
    return tmp, results


def test_two_process_resume_is_exact(two_process_runs):
    _, results = two_process_runs
    assert len(results["full"]["losses"]) == 6
    assert results["resumed"]["losses"] == results["full"]["losses"]
    assert results["resumed"]["losses"][:4] == results["part"]["losses"]


def test_fsdp_checkpoint_resumes_on_one_process(two_process_runs, data, uninterrupted):
    tmp, results = two_process_runs
    step = latest_checkpoint(tmp / "part4")
    state = read_state(step)
    assert (state.step, state.world_size, state.mode) == (4, 2, "fsdp")
    shards = sorted(step.glob("*.safetensors"))
    assert len(shards) == 2  # each rank wrote its own part
    key = "model.model.denoiser_tower.embeddings.weight"
    rows = []
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            rows.append(f.get_slice(key).get_shape()[0])
    assert rows == [48, 48]  # the 96-row embedding, half in each shard
    resumed = train(data, tmp / "part4", 6)
    assert resumed[:4] == results["part"]["losses"]
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-6)


def test_one_process_checkpoint_resumes_on_two(two_process_runs, uninterrupted):
    tmp, results = two_process_runs
    np.testing.assert_allclose(results["from_one"]["losses"], uninterrupted, rtol=1e-6)
    assert read_state(latest_checkpoint(tmp / "from_one")).world_size == 2


def test_fsdp_export_is_a_released_layout_model(two_process_runs):
    tmp, _ = two_process_runs
    model = TwoTowerForCausalLM.from_pretrained(tmp / "full" / "model")
    assert model.trained_block_size == 16
    reference = twotower_model()
    for name, value in reference.state_dict().items():
        if name.startswith("context"):
            assert torch.equal(model.state_dict()[name], value), name
    shutil.rmtree(tmp / "full" / "model")
