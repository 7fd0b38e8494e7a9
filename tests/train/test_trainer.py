"""The training recipe: loss falls, the context tower stays frozen bit for bit, the single-pass
layout equals the inference path, exact resume, seeded and reproducible runs, a missing or empty
held-out set. (2-process engines: test_parallel.py; checkpoints: test_checkpointing.py.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import randomise_special_params, tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.context import DenoiserContext
from twotower.model import TwoTowerForCausalLM
from twotower.train.objective import block_contexts, diffusion_loss, draw_noise, mask_blocks
from twotower.train.recipes import pretrain_backbone, train_denoiser
from twotower.train.trainer import TrainSettings, wsd_lr

REPO = Path(__file__).resolve().parents[2]


def write_packed(directory: Path, *, n_tokens: int = 6000, vocab: int = 96, seed: int = 0) -> Path:
    """A packed-token directory in the on-disk format `twotower data pack` writes (random tokens)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_tokens), ("heldout", max(n_tokens // 4, 64))):
        tokens = rng.integers(4, vocab, size=n, dtype=np.uint16)
        tokens.tofile(directory / f"{split}.bin")
        meta = {"format": "twotower.packed_tokens", "dtype": "uint16", "tokens": n, "split": split}
        (directory / f"{split}.json").write_text(json.dumps(meta))
    return directory


def twotower_model(seed: int = 0) -> TwoTowerForCausalLM:
    torch.manual_seed(seed)
    backbone = NemotronHForCausalLM(tiny_config("M*E", chunk_size=4))
    randomise_special_params(backbone, seed=seed)
    return TwoTowerForCausalLM.from_backbone(backbone, seed=seed)


SMALL = dict(global_batch=4, micro_batch=2, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=3, save_every=2)


def test_wsd_schedule_shape():
    s = TrainSettings(steps=100, lr=1.0, min_lr=0.0, warmup_steps=10, decay_fraction=0.2)
    assert wsd_lr(0, s) == pytest.approx(0.1) and wsd_lr(9, s) == 1.0 and wsd_lr(50, s) == 1.0
    assert wsd_lr(99, s) < 0.01 and wsd_lr(90, s) < 1.0


def test_single_pass_equals_block_by_block_inference():
    model = twotower_model().eval()
    with torch.no_grad():  # make the denoiser differ from the context tower, with live adaLN
        for p in model.denoiser_parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = torch.randint(4, 96, (2, 48), generator=torch.Generator().manual_seed(0))
    t, u = draw_noise(2, 48, block_size=16, seed=0, step=0)
    blocks = mask_blocks(ids, t, u, block_size=16, mask_id=model.mask_token_id)
    with torch.no_grad():
        single = model.denoise(blocks.noisy, blocks.t, block_contexts(model, ids, block_size=16))
        cache = model.empty_cache(2, capacity=48)
        for j in range(3):
            rows = torch.arange(2) * 3 + j
            step = model.denoise(blocks.noisy[rows], blocks.t[rows], DenoiserContext.from_cache(cache))
            torch.testing.assert_close(single[rows], step, rtol=1e-4, atol=1e-4)
            model.extend_context(ids[:, j * 16 : (j + 1) * 16], cache)


def test_denoiser_training_lowers_loss_and_freezes_context(tmp_path):
    data = write_packed(tmp_path / "data")
    model = twotower_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("context")}
    ids = torch.randint(4, 96, (2, 32), generator=torch.Generator().manual_seed(1))
    noise = draw_noise(2, 32, block_size=16, seed=5, step=0)
    with torch.no_grad():
        before = float(diffusion_loss(model, ids, noise, block_size=16).total)
    # overfit one fixed batch: the data has only 40 tokens, so every window is nearly the same
    write_packed(tmp_path / "one", n_tokens=40)
    settings = TrainSettings(steps=25, **{**SMALL, "save_every": 100, "eval_every": 100})
    log = train_denoiser(model, tmp_path / "one", tmp_path / "out", settings, block_size=16, progress=False)
    assert np.mean([r["loss"] for r in log[-5:]]) < 0.7 * np.mean([r["loss"] for r in log[:5]])
    for k, v in model.state_dict().items():
        if k.startswith("context"):
            assert torch.equal(v, frozen[k]), k
    with torch.no_grad():
        assert float(diffusion_loss(model, ids, noise, block_size=16).total) != before
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert data.is_dir()


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    data = write_packed(tmp_path / "data")
    settings = TrainSettings(steps=6, **SMALL)
    full = train_denoiser(twotower_model(), data, tmp_path / "a", settings, block_size=16, progress=False)
    short = TrainSettings(**{**settings.__dict__, "steps": 4})
    train_denoiser(twotower_model(), data, tmp_path / "b", short, block_size=16, progress=False)
    resumed = train_denoiser(twotower_model(), data, tmp_path / "b", settings, block_size=16, progress=False)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(6))


def test_resuming_on_other_data_is_refused(tmp_path):
    data = write_packed(tmp_path / "data")
    settings = TrainSettings(steps=2, **SMALL)
    train_denoiser(twotower_model(), data, tmp_path / "run", settings, block_size=16, progress=False)
    other = write_packed(tmp_path / "other", seed=1)
    longer = TrainSettings(**{**settings.__dict__, "steps": 4})
    with pytest.raises(ValueError, match="written for other training data"):
        train_denoiser(twotower_model(), other, tmp_path / "run", longer, block_size=16, progress=False)
    moved = tmp_path / "moved"
    data.rename(moved)  # the same data elsewhere: resumes
    log = train_denoiser(twotower_model(), moved, tmp_path / "run", longer, block_size=16, progress=False)
    assert [r["step"] for r in log] == [0, 1, 2, 3]


def test_backbone_pretraining_lowers_heldout_loss(tmp_path):
    write_packed(tmp_path / "one", n_tokens=40)
    torch.manual_seed(0)
    settings = TrainSettings(steps=20, **{**SMALL, "eval_every": 10, "save_every": 20})
    log = pretrain_backbone(
        tiny_config("M*E", chunk_size=4), tmp_path / "one", tmp_path / "out", settings, progress=False
    )
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    reloaded = NemotronHForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert reloaded.config.num_hidden_layers == 3


def test_train_commands_end_to_end(tmp_path):
    """`twotower train backbone` then `twotower train denoiser --backbone` on packed data; each exports a
    loadable model directory; bad option combinations are one-line errors."""
    from twotower.cli import main

    data = write_packed(tmp_path / "data")
    tiny_config("M*E", chunk_size=4).save(tmp_path / "config.json")
    common = ["--data", str(data), "--steps", "2", "--batch-size", "2", "--micro-batch", "1", "--seq-len", "32",
              "--eval-every", "2", "--save-every", "2", "--warmup-steps", "1"]  # fmt: skip
    assert (
        main(["train", "backbone", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "ar"), *common])
        == 0
    )
    backbone = NemotronHForCausalLM.from_pretrained(tmp_path / "ar" / "model")
    assert main(["train", "denoiser", "--backbone", str(tmp_path / "ar" / "model"), "--out", str(tmp_path / "dn"),
                 "--block-size", "16", *common]) == 0  # fmt: skip
    model = TwoTowerForCausalLM.from_pretrained(tmp_path / "dn" / "model")
    assert model.trained_block_size == 16
    for k, v in backbone.backbone.state_dict().items():  # the context tower is the AR model, unchanged
        assert torch.equal(model.context_tower.state_dict()[k], v), k
    assert main(["train", "denoiser", "--out", str(tmp_path / "x"), *common]) == 2
    assert main(["train", "denoiser", "--backbone", str(tmp_path / "ar" / "model"), "--out", str(tmp_path / "cur"),
                 "--block-size", "16", "--curriculum", "32:1", *common]) == 0  # fmt: skip
    assert TwoTowerForCausalLM.from_pretrained(tmp_path / "cur" / "model").trained_block_size == 16
    assert main(["train", "denoiser", "--backbone", str(tmp_path / "ar" / "model"), "--out", str(tmp_path / "x"),
                 "--curriculum", "32-1", *common]) == 2  # fmt: skip
    assert main(["train", "denoiser", "--backbone", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), *common]) == 2


def test_block_size_curriculum_runs_its_phases_then_the_final_size(tmp_path):
    from twotower.train.recipes import block_size_schedule

    at = block_size_schedule(16, [(32, 2), (8, 1)])
    assert [at(s) for s in range(5)] == [32, 32, 8, 16, 16]
    data = write_packed(tmp_path / "data")
    settings = TrainSettings(steps=4, **SMALL)
    cur = train_denoiser(twotower_model(), data, tmp_path / "c", settings, block_size=16, curriculum=[(32, 2)],
                         progress=False)  # fmt: skip
    big = train_denoiser(twotower_model(), data, tmp_path / "b", TrainSettings(**{**settings.__dict__, "steps": 2}),
                         block_size=32, progress=False)  # fmt: skip
    plain = train_denoiser(twotower_model(), data, tmp_path / "p", settings, block_size=16, progress=False)
    assert [r["loss"] for r in cur[:2]] == [r["loss"] for r in big]  # phase 1: exactly a 32-block run
    assert cur[2]["loss"] != plain[2]["loss"]  # phase 2 starts from other weights, on 16-blocks
    assert TwoTowerForCausalLM.from_pretrained(tmp_path / "c" / "model").trained_block_size == 16
    with pytest.raises(ValueError, match="multiple of block size 24"):
        train_denoiser(twotower_model(), data, tmp_path / "x", settings, block_size=16, curriculum=[(24, 2)])
    with pytest.raises(ValueError, match="curriculum phase"):
        block_size_schedule(16, [(32, 0)])
    with pytest.raises(ValueError, match="leave none"):
        train_denoiser(twotower_model(), data, tmp_path / "y", settings, block_size=16, curriculum=[(32, 4)])


@pytest.mark.parametrize("heldout", ["empty", "missing"])
def test_no_heldout_set_trains_without_evaluation_and_says_so(tmp_path, caplog, heldout):
    data = write_packed(tmp_path / "data")
    if heldout == "empty":  # what `data pack --holdout-percent 0` writes
        (data / "heldout.bin").write_bytes(b"")
        meta = json.loads((data / "heldout.json").read_text())
        (data / "heldout.json").write_text(json.dumps({**meta, "tokens": 0}))
    else:
        (data / "heldout.bin").unlink()
    settings = TrainSettings(steps=3, **{**SMALL, "eval_every": 1})
    with caplog.at_level(logging.WARNING, logger="twotower.train"):
        log = train_denoiser(twotower_model(), data, tmp_path / "out", settings, block_size=16, progress=False)
    assert len(log) == 3 and not any("heldout_loss" in r for r in log)
    assert "training without evaluation" in caplog.text
    assert caplog.records[0].message.endswith("training without evaluation")  # said before the first step


def test_same_seed_same_run_and_every_new_parameter_comes_from_the_seed(tmp_path):
    """`from_backbone_pretrained(path, seed=...)`, as `train denoiser --backbone` builds its model:
    the same seed gives the same t_embedder and the same losses; another seed other ones."""
    data = write_packed(tmp_path / "data")
    torch.manual_seed(0)
    backbone = NemotronHForCausalLM(tiny_config("M*E", chunk_size=4))
    randomise_special_params(backbone, seed=0)
    backbone.save_pretrained(tmp_path / "ar")
    settings = TrainSettings(steps=3, **{**SMALL, "save_every": 100, "eval_every": 100})

    def run(seed: int, out: str) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(1000 + seed)  # the global RNG must not matter
        model = TwoTowerForCausalLM.from_backbone_pretrained(tmp_path / "ar", dtype=torch.float32, seed=seed)
        first = model.t_embedder.mlp[0].weight.detach().clone()
        s = TrainSettings(**{**settings.__dict__, "seed": seed})
        log = train_denoiser(model, data, tmp_path / out, s, block_size=16, progress=False)
        return [r["loss"] for r in log], first

    (a, wa), (b, wb), (c, wc) = run(3, "a"), run(3, "b"), run(4, "c")
    assert a == b and torch.equal(wa, wb)
    assert not torch.equal(wa, wc) and a != c


def test_train_command_options(tmp_path):
    from twotower.cli import main

    data = write_packed(tmp_path / "data")
    tiny_config("M*E", chunk_size=4).save(tmp_path / "config.json")
    common = ["--data", str(data), "--steps", "2", "--batch-size", "2", "--micro-batch", "1", "--seq-len", "32",
              "--eval-every", "2", "--save-every", "1", "--warmup-steps", "1", "--keep-checkpoints", "1"]  # fmt: skip
    assert main(["train", "backbone", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "ar"),
                 "--fsdp", "--peak-tflops", "measure", *common]) == 0  # fmt: skip
    assert [p.name for p in (tmp_path / "ar" / "checkpoints").iterdir()] in (
        ["latest", "step-00000002"],
        ["step-00000002", "latest"],
    )
    assert "mfu" in json.loads((tmp_path / "ar" / "log.jsonl").read_text().splitlines()[-1])
    assert main(["train", "denoiser", "--backbone", str(tmp_path / "ar" / "model"), "--out", str(tmp_path / "dn"),
                 "--parallel", "ddp", "--activation-checkpointing", "--peak-tflops", "2", *common]) == 0  # fmt: skip
    assert main(["train", "denoiser", "--backbone", str(tmp_path / "ar" / "model"), "--out", str(tmp_path / "x"),
                 "--peak-tflops", "fast", *common]) == 2  # fmt: skip
