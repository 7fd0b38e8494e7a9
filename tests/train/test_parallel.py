"""DDP and FSDP2 on 2 CPU processes (gloo) give the single-process update: the same losses and the
same weights after a few steps, with gradient accumulation, held-out evaluation and the frozen
context tower sharded; bf16 mixed precision and activation checkpointing run; ranks that built
different weights are refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.train.test_trainer import twotower_model, write_packed
from twotower.train.fsdp import shard_units
from twotower.train.parallel import Dist, ParallelSettings, apply_activation_checkpointing, parallelize
from twotower.train.recipes import train_denoiser
from twotower.train.trainer import TrainSettings

REPO = Path(__file__).resolve().parents[2]
BASE = dict(global_batch=4, micro_batch=1, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=3, eval_batches=2,
            save_every=100)  # fmt: skip

WORKER = r"""
import json, sys, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from tests.train.test_parallel import run_jobs
run_jobs(json.loads(open(sys.argv[1]).read()))
"""


def run_job(job: dict) -> dict:
    """One training job (see `run_jobs`); returns its losses and held-out losses, or its error.
    A job with `call: "module:function"` runs that function on the job instead."""
    import importlib

    import torch.distributed as dist

    if "call" in job:
        module, _, name = job["call"].partition(":")
        return getattr(importlib.import_module(module), name)(job)
    out = Path(job["out"])
    if job.get("copy_from"):  # start from a copy of another run's directory (rank 0 copies)
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.copytree(job["copy_from"], out)
        if dist.is_initialized():
            dist.barrier()
    settings = TrainSettings(**{**BASE, **job.get("settings", {})})
    model = twotower_model()
    if job.get("seed_by_rank"):  # a run that forgot to seed its new parameters
        model.init_adaln(seed=int(os.environ.get("RANK", "0")))
    try:
        log = train_denoiser(model, job["data"], out, settings, block_size=16, progress=False)
    except ValueError as err:
        return {"error": str(err)}
    return {"losses": [r["loss"] for r in log], "heldout": [r["heldout_loss"] for r in log if "heldout_loss" in r]}


def run_jobs(jobs: list[dict]) -> None:
    """Run `jobs` in order in this process (all ranks alike); rank 0 prints one RESULT line each."""
    for job in jobs:
        result = run_job(job)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT", json.dumps({"name": job["name"], **result}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(jobs: list[dict], tmp: Path, *, nproc: int = 2) -> dict[str, dict]:
    """Run `jobs` under `torchrun --nproc_per_node=nproc` (gloo, 127.0.0.1); results by job name."""
    script, spec = tmp / "worker.py", tmp / f"jobs-{jobs[0]['name']}.json"
    script.write_text(WORKER.format(repo=str(REPO)))
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(spec)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(x.split(" ", 1)[1]) for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return {r["name"]: r for r in lines}


def exported(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((out / "model").glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process runs (one torchrun launch) and their single-process references."""
    tmp = tmp_path_factory.mktemp("parallel")
    data = str(write_packed(tmp / "data"))
    steps3 = {"steps": 3}
    jobs = [
        {"name": "ddp", "out": str(tmp / "ddp"), "data": data, "settings": {**steps3, "parallel": "ddp"}},
        {"name": "fsdp", "out": str(tmp / "fsdp"), "data": data, "settings": {**steps3, "parallel": "fsdp"}},
        {"name": "fsdp_bf16", "out": str(tmp / "fsdp_bf16"), "data": data,
         "settings": {**steps3, "parallel": "fsdp", "bf16": True, "activation_checkpointing": True}},
        {"name": "unseeded", "out": str(tmp / "unseeded"), "data": data, "settings": {**steps3, "parallel": "fsdp"},
         "seed_by_rank": True},
        {"name": "units", "call": "tests.train.test_parallel:unit_facts", "settings": {"parallel": "fsdp"}},
        {"name": "ar_fsdp", "call": "tests.train.test_parallel:ar_job", "out": str(tmp / "ar_fsdp"), "data": data,
         "settings": {"steps": 2, "parallel": "fsdp"}},
        {"name": "sigterm", "call": "tests.train.test_trainer_guards:signal_job", "out": str(tmp / "sigterm")},
    ]  # fmt: skip
    results = torchrun(jobs, tmp)
    torch.set_num_threads(1)
    results["one"] = run_job({"name": "one", "out": str(tmp / "one"), "data": data, "settings": steps3})
    results["ar_one"] = ar_job({"out": str(tmp / "ar_one"), "data": data, "settings": {"steps": 2}})
    bf16 = {**steps3, "bf16": True}
    results["one_bf16"] = run_job({"name": "one_bf16", "out": str(tmp / "one_bf16"), "data": data, "settings": bf16})
    return tmp, results


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_give_the_single_process_update(runs, engine):
    tmp, results = runs
    one, two = results["one"], results[engine]
    assert len(two["losses"]) == 3 and len(two["heldout"]) == 1
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)
    np.testing.assert_allclose(two["heldout"], one["heldout"], rtol=1e-6)
    reference, weights = exported(tmp / "one"), exported(tmp / engine)
    assert weights.keys() == reference.keys()
    moved = 0
    # One process sums 4 accumulated micro-batches, two all-reduce 2 + 2: the gradients differ in
    # rounding, and AdamW divides by sqrt(v), so a weight with small gradients moves by up to ~1e-3
    # of lr (3e-3) of rounding (2.3e-6 measured). A wrong reduction moves weights by about lr.
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=5e-6, msg=name)
        moved += not torch.equal(value, exported_initial()[name])
    assert moved > len(reference) // 3  # the steps changed the trained weights (so the check can fail)


_INITIAL: dict = {}


def exported_initial() -> dict[str, torch.Tensor]:
    """The state dict of the untrained model, in the exported naming (per-expert tensors)."""
    if not _INITIAL:
        from twotower.checkpoint import split_experts

        _INITIAL.update(split_experts(dict(twotower_model().state_dict())))
    return _INITIAL


def test_fsdp_keeps_the_context_tower_frozen(runs):
    tmp, _ = runs
    for engine in ("fsdp", "fsdp_bf16"):
        weights, initial = exported(tmp / engine), exported_initial()
        for name, value in initial.items():
            if name.startswith("context"):
                assert torch.equal(weights[name], value), (engine, name)


def test_fsdp_bf16_mixed_precision_trains_with_float32_master_weights(runs):
    tmp, results = runs
    bf16, reference = results["fsdp_bf16"], results["one_bf16"]
    assert all(np.isfinite(bf16["losses"]))
    # bf16 compute differs between the sharded and the autocast path only by rounding
    np.testing.assert_allclose(bf16["losses"], reference["losses"], rtol=5e-3)
    np.testing.assert_allclose(bf16["losses"], results["one"]["losses"], rtol=2e-2)
    weights = exported(tmp / "fsdp_bf16")
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_ranks_that_built_different_weights_are_refused(runs):
    _, results = runs
    assert "t_embedder" in results["unseeded"]["error"] and "differs between ranks" in results["unseeded"]["error"]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_saved_step(runs):
    """SIGTERM reaches rank 0 only (during step 2): the ranks agree through the per-step flag, so
    both finish step 2, save step 3 once and stop; neither hangs in a collective."""
    _, results = runs
    got = results["sigterm"]
    assert got["ranks"] == [{"stopped": 3, "signum": 15}, {"stopped": 3, "signum": 15}]
    assert got["saved_step"] == 3


def ar_job(job: dict) -> dict:
    """AR pretraining of a tiny NemotronH (the same layout: one unit per layer, embeddings, head)."""
    from tests.conftest import tiny_config
    from twotower.train.recipes import pretrain_backbone

    settings = TrainSettings(**{**BASE, **job["settings"]})
    log = pretrain_backbone(tiny_config("M*E-", chunk_size=4), job["data"], job["out"], settings, progress=False)
    return {"losses": [r["loss"] for r in log]}


def test_ar_pretraining_under_fsdp_gives_the_single_process_update(runs):
    _, results = runs
    np.testing.assert_allclose(results["ar_fsdp"]["losses"], results["ar_one"]["losses"], rtol=1e-6)
    assert results["ar_fsdp"]["losses"][1] != results["ar_fsdp"]["losses"][0]


def unit_facts(job: dict) -> dict:
    """The FSDP2 structure of the sharded tiny model (run in each of 2 processes): which modules are
    FSDPModules, whether each layer's members share one unit, and what one unit's gather unshards."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    settings = TrainSettings(**{**BASE, **job["settings"]})
    dist_info = Dist.from_env()
    model = twotower_model()
    engine = parallelize(model, model.denoiser_parameters(), dist_info=dist_info, settings=settings.parallel_settings)
    facts: dict = {"layers": {}, "trained_context": [n for n in engine.names if n.startswith("context")]}
    for tower in ("context_tower", "denoiser_tower"):
        for i, layer in enumerate(getattr(model, tower).layers):
            members = [layer.norm, *(m for m in layer.mixer.modules() if isinstance(m, FSDPModule))]
            state = fully_shard.state(layer.norm)
            layer.norm.unshard()  # one unit: gathering the norm's unit gathers the whole layer
            gathered = {n for n, p in model.named_parameters() if not isinstance(p, DTensor)}
            layer.norm.reshard()
            facts["layers"][f"{tower}.layers.{i}"] = {
                "kind": layer.kind,
                "norm_is_unit": isinstance(layer.norm, FSDPModule),
                "one_state": all(fully_shard.state(m) is state for m in members),
                "inner_linear_units": sorted(
                    n
                    for n, m in layer.mixer.named_modules()
                    if isinstance(m, nn.Linear) and isinstance(m, FSDPModule) and fully_shard.state(m) is not state
                ),  # fmt: skip
                "gathered": sorted(gathered),
            }
    return facts


def test_each_decoder_layer_is_one_fsdp_unit(runs):
    _, results = runs
    facts = results["units"]
    assert facts["trained_context"] == []  # the sharded context tower is never given to the optimizer
    kinds = set()
    for name, layer in facts["layers"].items():
        kinds.add(layer["kind"])
        assert layer["norm_is_unit"] and layer["one_state"] and layer["inner_linear_units"] == [], name
        # the norm's gather brings every parameter of the layer (the Mamba scalars live in the root)
        assert layer["gathered"] and all(n.startswith(name + ".") for n in layer["gathered"]), name
        scalars = (".conv1d.", ".dt_bias", ".A_log", ".D")
        expected = {n for n, _ in twotower_model().named_parameters() if n.startswith(name + ".")}
        assert set(layer["gathered"]) == {n for n in expected if not any(k in n for k in scalars)}, name
    assert kinds == {"linear_attention", "full_attention", "moe"}


def test_engine_choice():
    assert ParallelSettings().resolve(1) == "none" and ParallelSettings().resolve(2) == "ddp"
    assert ParallelSettings("fsdp").resolve(4) == "fsdp" and ParallelSettings("fsdp").resolve(1) == "none"
    with pytest.raises(ValueError, match="parallel mode"):
        ParallelSettings("zero3").resolve(2)
    with pytest.raises(ValueError, match="parallel mode"):
        TrainSettings(parallel="tp").validate(1)


def test_shard_units_hold_the_weights_and_every_member_is_called():
    """One unit per decoder layer of each tower (plus embeddings and heads), holding nearly all
    parameters; in a training step every member of every used unit runs through its own forward
    (or the engine could not gather it), and the layer's norm runs first."""
    from twotower.train.objective import diffusion_loss, draw_noise

    model = twotower_model()
    units = shard_units(model)
    n_layers = len(model.config.layers_block_type)
    names = [u.name for u in units]
    assert names[: 2 * n_layers] == [f"{t}.layers.{i}" for t in ("context_tower", "denoiser_tower")
                                     for i in range(n_layers)]  # fmt: skip
    assert set(names[2 * n_layers :]) == {"context_tower.embeddings", "context_lm_head",
                                          "denoiser_tower.embeddings", "lm_head"}  # fmt: skip
    in_units = {id(p) for u in units for p in u.parameters()}
    root = {n for n, p in model.named_parameters() if id(p) not in in_units}
    # the root keeps what no path calls through a forward (Mamba scalars and conv kernel), norm_f, adaLN
    kept = (".conv1d.", ".dt_bias", ".A_log", ".D", ".norm_f.", "t_embedder.", "t_block.", "scale_shift_tables.")
    assert root and all(any(k in n for k in kept) for n in root), sorted(root)
    assert not any(".layers." in n and ".mixer." not in n for n in root)  # every layer norm is in its unit
    calls: list[tuple[int, nn.Module]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _a, i=i: calls.append((i, mod)))
             for i, u in enumerate(units) for m in u.modules]  # fmt: skip
    ids = torch.randint(4, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    diffusion_loss(model, ids, draw_noise(2, 32, block_size=16, seed=0, step=0), block_size=16).total.backward()
    for h in hooks:
        h.remove()
    for i, unit in enumerate(units):
        seen = [mod for j, mod in calls if j == i]
        if not seen:
            continue
        assert seen[0] is unit.modules[0], unit.name  # the unit is gathered when its first member runs
        assert {id(m) for m in seen} == {id(m) for m in unit.modules}, unit.name
    unused = sorted(u.name for i, u in enumerate(units) if i not in {j for j, _ in calls})
    # what a step never needs: the context tower's head and its layers after the last attention/Mamba one
    assert unused == ["context_lm_head", "context_tower.layers.2"]


def test_activation_checkpointing_keeps_gradients_and_saves_memory():
    from twotower.train.objective import diffusion_loss, draw_noise

    ids = torch.randint(4, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    noise = draw_noise(2, 32, block_size=16, seed=0, step=0)
    results = []
    for checkpointed in (False, True):
        model = twotower_model()
        if checkpointed:
            assert apply_activation_checkpointing(model) == 2  # the denoiser's M and E mixers
        saved: list[int] = []

        def keep(t: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = diffusion_loss(model, ids, noise, block_size=16).total
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads, sum(saved)))
    (loss0, grads0, saved0), (loss1, grads1, saved1) = results
    assert loss0 == loss1 and grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7)
    assert saved1 < 0.8 * saved0


def test_parallelize_names_the_trained_parameters():
    model = twotower_model()
    engine = parallelize(model, model.denoiser_parameters(), dist_info=Dist(), settings=ParallelSettings())
    assert engine.mode == "none" and len(engine.params) == len(model.denoiser_parameters())
    assert not any(n.startswith("context") for n in engine.names)
    with pytest.raises(ValueError, match="not in the model"):
        parallelize(model, [torch.nn.Parameter(torch.zeros(2))], dist_info=Dist(), settings=ParallelSettings())


def test_train_denoiser_single_process_fsdp_request_is_the_plain_update(tmp_path):
    data = write_packed(tmp_path / "data")
    settings = TrainSettings(**{**BASE, "steps": 2})
    plain = train_denoiser(twotower_model(), data, tmp_path / "a", settings, block_size=16, progress=False)
    fsdp = TrainSettings(**{**BASE, "steps": 2, "parallel": "fsdp"})
    asked = train_denoiser(twotower_model(), data, tmp_path / "b", fsdp, block_size=16, progress=False)
    assert [r["loss"] for r in asked] == [r["loss"] for r in plain]
