"""Model FLOPs per trained token (flops.py) against a hand count for a tiny config, peak FLOP/s and
MFU, and the trainer's throughput log (tokens/s, step time, MFU)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import tiny_config
from tests.train.test_trainer import twotower_model, write_packed
from twotower.backbone import NemotronHForCausalLM
from twotower.train.flops import (
    active_parameters,
    ar_train_flops,
    context_layers,
    denoiser_train_flops,
    gpu_hours,
    measure_matmul_flops,
    mfu,
    peak_flops,
)
from twotower.train.recipes import train_denoiser
from twotower.train.trainer import TrainSettings

# tiny_config("M*E-"): H 48, V 96; Mamba h 6 x p 8 (d_inner 48), g 2, n 8, conv 80 x K 4, chunk 8;
# attention 4 heads (2 kv) of 16; MLP 64; MoE 6 experts of 24, k 2, shared 40.
MAMBA = 48 * (48 + 80 + 6) + 80 * 4 + 48 * 48  # in_proj 6432 + conv 320 + out_proj 2304 = 9056
ATTENTION = 48 * 64 + 2 * 48 * 32 + 64 * 48  # q 3072 + k, v 3072 + o 3072 = 9216
MLP = 2 * 48 * 64  # 6144
MOE = 48 * 6 + 2 * 2 * 48 * 24 + 2 * 48 * 40  # router 288 + 2 experts 4608 + shared 3840 = 8736
HEAD = 48 * 96  # 4608
ADALN = 256 * 48 + 48 * 48 + 3 * 48 * 48  # t_embedder 12288 + 2304, t_block 6912 = 21504


def test_active_parameters_hand_count():
    counts = active_parameters(tiny_config(), head=True, adaln=True)
    assert (counts.mamba, counts.attention, counts.mlp, counts.moe, counts.head) == (9056, 9216, 6144, 8736, 4608)
    assert counts.adaln_per_block == ADALN == 21504
    assert counts.per_token(block_size=16) == 37760 + 21504 / 16
    assert active_parameters(tiny_config(), head=False, layers=2).per_token() == MAMBA + ATTENTION


def test_active_parameters_match_the_model_modules():
    """The formula counts the weights the model really has (routed experts scaled by k / E)."""
    config = tiny_config()
    model = NemotronHForCausalLM(config)
    total = 0.0
    for name, p in model.named_parameters():
        if "embeddings" in name or p.dim() < 2:
            continue  # lookups, norms, biases, SSM scalars: no matmul
        share = config.num_experts_per_tok / config.n_routed_experts if ".experts." in name else 1.0
        total += p.numel() * share
    assert total == active_parameters(config).per_token()


def test_denoiser_training_flops_hand_count():
    config = tiny_config()  # M * E -: the context pass runs M and * only
    assert context_layers(config) == 2
    flops = denoiser_train_flops(config, seq_len=32, block_size=16)
    den_attention = 4 * 4 * 16 * (32 + 16) / 2  # a d, (L + S) / 2 keys per query: 6144
    den_scan = (8 + 1) * (2 * 8 + 48) + 4 * 48 * 8  # Q = min(8, 16) = 8: 576 + 1536 = 2112
    assert flops.trained.matmul == 2 * (MAMBA + ATTENTION + MLP + MOE + HEAD + ADALN / 16)  # 78208
    assert (flops.trained.attention, flops.trained.scan) == (den_attention, den_scan)
    ctx_attention = 4 * 4 * 16 * (32 + 1) / 2  # causal: 4224
    ctx_scan = (16 + 1) * (2 * 8 + 48) + 4 * 48 * 8  # the context scans in S-chunks: 2624
    assert flops.frozen.matmul == 2 * (MAMBA + ATTENTION)  # no head, no layers after the last M/*
    assert (flops.frozen.attention, flops.frozen.scan) == (ctx_attention, ctx_scan)
    assert flops.per_token == 3 * (78208 + 6144 + 2112) + (36544 + 4224 + 2624) == 302784


def test_ar_training_flops_hand_count():
    flops = ar_train_flops(tiny_config(), seq_len=32)
    assert flops.frozen is None
    assert flops.per_token == 3 * (2 * 37760 + 4 * 4 * 16 * 33 / 2 + 2112) == 245568


def test_peak_and_mfu():
    cpu = peak_flops("cpu", bf16=False)
    assert cpu.flops is None and "MFU omitted" in cpu.note
    given = peak_flops("cpu", bf16=True, tflops=2.5)
    assert given.flops == 2.5e12 and "given" in given.note
    with pytest.raises(ValueError, match="> 0"):
        peak_flops("cpu", bf16=False, tflops=0)
    assert mfu(flops_per_token=1e9, tokens_per_s=400.0, peak=1e12, devices=2) == pytest.approx(0.2)
    # 1e9 FLOPs/token x 1e12 tokens at 50% of 1e15 FLOP/s = 2e6 s = 555.6 device-hours
    assert gpu_hours(flops_per_token=1e9, tokens=1e12, peak=1e15, utilisation=0.5) == pytest.approx(2e6 / 3600)
    assert measure_matmul_flops("cpu", size=128, repeats=2) > 1e6


def test_trainer_logs_throughput_and_mfu(tmp_path, caplog):
    data = write_packed(tmp_path / "data")
    base = dict(global_batch=4, micro_batch=2, seq_len=32, lr=1e-3, warmup_steps=1, eval_every=10, save_every=10)
    with caplog.at_level(logging.INFO, logger="twotower.train"):
        log = train_denoiser(twotower_model(), data, tmp_path / "a", TrainSettings(steps=3, peak_tflops=0.5, **base),
                             block_size=16, progress=False)  # fmt: skip
    flops = denoiser_train_flops(tiny_config("M*E", chunk_size=4), seq_len=32, block_size=16).per_token
    for r in log:
        assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_time_s"])
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 0.5e12)
    assert "peak 0.5 TFLOP/s (given)" in caplog.text and "throughput" in caplog.text and "MFU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="twotower.train"):
        log = train_denoiser(twotower_model(), data, tmp_path / "b", TrainSettings(steps=2, **base), block_size=16,
                             progress=False)  # fmt: skip
    assert all("mfu" not in r and r["step_time_s"] > 0 for r in log)
    assert "MFU omitted" in caplog.text


def test_throughput_of_the_bundled_preset_is_measurable():
    """The bundled preset's FLOPs per token at the recipe's shape (seq 256, S 16) are about 8 x its
    active parameters: the figure the README's MFU is computed from."""
    from twotower.config import preset

    config = preset("tiny")
    flops = denoiser_train_flops(config, seq_len=256, block_size=16)
    active = active_parameters(config).per_token()
    assert 8 * active * 0.9 < flops.per_token < 8 * active * 1.6
    assert torch.isfinite(torch.tensor(flops.per_token))
