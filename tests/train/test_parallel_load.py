"""Rank-local construction for FSDP2 (`rank_load.py`) on 2 CPU processes (gloo): each rank reads
only its shards from the checkpoint, from an AR backbone (adaLN from the seed) or a TwoTower, and the
sharded model equals the whole model the unsharded loader builds: same weights, same losses, same
trained weights after a few steps; the frozen tower is bf16 under bf16 compute; per-rank host memory
stays well below the whole model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import randomise_special_params, tiny_config
from tests.train.test_parallel import BASE, exported, torchrun
from tests.train.test_trainer import write_packed
from twotower.backbone import NemotronHForCausalLM
from twotower.model import TwoTowerForCausalLM
from twotower.shards import TensorReader, read_header
from twotower.train.rank_load import row_range
from twotower.train.recipes import train_denoiser
from twotower.train.trainer import Dist, TrainSettings


def write_checkpoints(root: Path, config=None) -> tuple[Path, Path]:
    """An AR backbone (float32) and a TwoTower (bf16; denoiser and adaLN moved away from the
    backbone) on disk."""
    torch.manual_seed(0)
    backbone = NemotronHForCausalLM(config or tiny_config("M*E", chunk_size=4))
    randomise_special_params(backbone, seed=0)
    backbone.save_pretrained(root / "backbone")
    model = TwoTowerForCausalLM.from_backbone(backbone, seed=0)
    with torch.no_grad():
        for p in model.denoiser_parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(root / "twotower")  # as released: bf16
    return root / "backbone", root / "twotower"


def whole_model(job: dict) -> TwoTowerForCausalLM:
    """What the CLI builds without rank-local loading: both towers, float32, on every rank."""
    if job["from_backbone"]:
        return TwoTowerForCausalLM.from_backbone_pretrained(job["path"], dtype=torch.float32, device="cpu", seed=0)
    return TwoTowerForCausalLM.from_pretrained(job["path"], dtype=torch.float32, device="cpu")


def sharded_job(job: dict) -> dict:
    """Build the model (rank-locally or whole), compare its full weights with the whole model's on
    rank 0, then train a few steps; returns the comparison and the losses."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from twotower.train.rank_load import load_sharded_twotower

    settings = TrainSettings(**{**BASE, **job["settings"]})
    result: dict = {}
    if job["rank_local"]:
        Dist.from_env()
        model = load_sharded_twotower(job["path"], from_backbone=job["from_backbone"], seed=0,
                                      settings=settings.parallel_settings, device=torch.device("cpu"))  # fmt: skip
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if int(os.environ.get("RANK", "0")) == 0:
            reference = whole_model(job).state_dict()
            full = {k.removeprefix("model."): v for k, v in full.items()}
            result["same_keys"] = sorted(full) == sorted(reference)
            bias = "e_score_correction_bias"  # the router's selection bias stays float32 (SPEC pitfall 4)
            result["dtypes"] = sorted({f"{k.split('.')[0]}:{v.dtype}" for k, v in full.items() if bias not in k})
            result["bias_dtypes"] = sorted({str(v.dtype) for k, v in full.items() if bias in k})
            # the frozen tower may be bf16: compare it with the whole model's rounded the same way
            result["max_diff"] = max(float((full[k].float() - v.to(full[k].dtype).float()).abs().max())
                                     for k, v in reference.items())  # fmt: skip
    else:
        model = whole_model(job)
    log = train_denoiser(model, job["data"], job["out"], settings, block_size=16, progress=False)
    result["losses"] = [r["loss"] for r in log]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rank_load")
    data = str(write_packed(tmp / "data"))
    backbone, twotower = write_checkpoints(tmp)
    jobs = []
    for name, path, from_backbone, bf16 in (("backbone", backbone, True, False), ("twotower", twotower, False, True)):
        for rank_local in (True, False):
            tag = f"{name}-{'local' if rank_local else 'whole'}"
            jobs.append({"name": tag, "call": "tests.train.test_parallel_load:sharded_job", "path": str(path),
                         "from_backbone": from_backbone, "rank_local": rank_local, "data": data,
                         "out": str(tmp / tag), "settings": {"steps": 2, "parallel": "fsdp", "bf16": bf16}})  # fmt: skip
    return tmp, torchrun(jobs, tmp)


@pytest.mark.parametrize("source", ["backbone", "twotower"])
def test_rank_local_model_equals_the_whole_model(runs, source):
    tmp, results = runs
    local, whole = results[f"{source}-local"], results[f"{source}-whole"]
    assert local["same_keys"] and local["max_diff"] == 0.0
    context = "bfloat16" if source == "twotower" else "float32"  # a bf16 file and bf16 compute
    assert local["dtypes"] == sorted({f"context_lm_head:torch.{context}", f"context_tower:torch.{context}",
                                      "denoiser_tower:torch.float32", "lm_head:torch.float32",
                                      "scale_shift_tables:torch.float32", "t_block:torch.float32",
                                      "t_embedder:torch.float32"})  # fmt: skip
    assert local["bias_dtypes"] == ["torch.float32"]
    np.testing.assert_allclose(local["losses"], whole["losses"], rtol=1e-6)
    trained, reference = exported(tmp / f"{source}-local"), exported(tmp / f"{source}-whole")
    assert trained.keys() == reference.keys()
    for name, value in reference.items():
        if name.startswith("context"):  # frozen: the file's values, bit for bit
            assert torch.equal(trained[name].float(), value.float()), name
        else:
            torch.testing.assert_close(trained[name], value, rtol=0, atol=2e-6, msg=name)


def test_row_range_reads_only_those_rows(tmp_path):
    from safetensors.torch import save_file

    x = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    save_file({"x": x}, str(tmp_path / "a.safetensors"))
    entry = read_header(tmp_path / "a.safetensors")["x"]
    with TensorReader() as reader:
        assert torch.equal(reader.read(row_range(entry, 4, 7)), x[4:7])
        assert reader.read(row_range(entry, 7, 7)).shape == (0, 3)
        out = torch.empty(2, 3, dtype=torch.bfloat16)
        reader.read_into(row_range(entry, 1, 3), out)
        assert torch.equal(out, x[1:3].to(torch.bfloat16))
    with pytest.raises(ValueError, match="rows"):
        row_range(entry, 3, 8)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux peak-RSS counters")
def test_rank_local_construction_peaks_well_below_the_whole_model(tmp_path):
    """benchmarks/train_load_memory.py on 2 ranks (a ~735 MiB float32 TwoTower): each rank's peak
    while building is its half of the shards plus code, against more than the whole model before."""
    import json
    import subprocess
    import sys

    from tests.train.test_parallel import REPO

    out = tmp_path / "memory.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_load_memory.py"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    whole = figures["whole_fp32_mib"]
    for row in figures["rows"]:
        if row["method"] == "whole":
            assert row["peak_mib"] > whole, row  # every rank held the whole model once
        else:
            assert row["peak_mib"] < 0.7 * whole and abs(row["shard_mib"] - whole / 2) < 0.01 * whole, row


def test_torchrun_cli_trains_from_a_backbone_and_continues_a_twotower(runs):
    """`torchrun --nproc-per-node 2 -m twotower.cli train denoiser --fsdp` from an AR checkpoint, then
    from the TwoTower it exported: both build rank-locally and export a loadable model whose
    context tower is the backbone's, unchanged."""
    import json
    import subprocess
    import sys

    from tests.train.test_parallel import REPO, free_port

    tmp, _ = runs
    common = ["--data", str(tmp / "data"), "--batch-size", "2", "--micro-batch", "1", "--seq-len",
              "32", "--eval-every", "2", "--save-every", "2", "--warmup-steps", "1", "--block-size", "16", "--fsdp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}

    def train(name: str, *source: str, steps: int = 2) -> list[dict]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "twotower.cli", "train", "denoiser", *source,
               "--out", str(tmp / name), *common, "--steps", str(steps)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in (tmp / name / "log.jsonl").read_text().splitlines()]

    first = train("cli-bb", "--backbone", str(tmp / "backbone"))
    assert [r["step"] for r in first] == [0, 1] and all(np.isfinite(r["loss"]) for r in first)
    resumed = train("cli-bb", "--backbone", str(tmp / "backbone"), steps=3)  # resumes the sharded run
    assert [r["step"] for r in resumed] == [0, 1, 2] and resumed[:2] == first
    assert [r["step"] for r in train("cli-tt", "--twotower", str(tmp / "cli-bb" / "model"))] == [0, 1]
    backbone = NemotronHForCausalLM.from_pretrained(tmp / "backbone")
    model = TwoTowerForCausalLM.from_pretrained(tmp / "cli-tt" / "model")
    for k, v in backbone.backbone.state_dict().items():
        assert torch.equal(model.context_tower.state_dict()[k], v), k
