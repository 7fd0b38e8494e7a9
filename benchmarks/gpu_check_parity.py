"""The GPU check's parity stage (`benchmarks/gpu_check.py`): a tiny random fp32 TwoTower on the
device against itself on the CPU (logits, greedy AR and mask-diffusion tokens), and a captured CUDA
graph's AR step against the eager step."""

from __future__ import annotations

import copy

import torch
from gpu_check_modes import FIRST_RANDOM_ID, capture_cuda_graph

from twotower.bench.random_model import random_twotower
from twotower.config import preset
from twotower.context import DenoiserContext
from twotower.decode.static import StaticDecoder, decode_step

PARITY_TOL = 1e-3  # max |logit difference| / max(1, max |logit|), fp32 with TF32 off


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


@torch.inference_mode()
def parity_check(device: torch.device, *, seed: int) -> dict:
    """A tiny fp32 TwoTower on `device` against itself on the CPU, and the device's cuda-graph AR step
    against its eager step. Returns the differences and `passed`."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        config = preset("tiny")
        ref = random_twotower(config, dtype=torch.float32, device="cpu", tie_towers=False, seed=seed)
        with torch.no_grad():  # non-trivial time conditioning
            g = torch.Generator().manual_seed(seed)
            ref.t_block[1].weight.copy_(0.02 * torch.randn(ref.t_block[1].weight.shape, generator=g))
            for table in ref.scale_shift_tables:
                table.add_(0.1 * torch.randn(table.shape, generator=g))
        dev = copy.deepcopy(ref).to(device)
        g = torch.Generator().manual_seed(seed + 1)
        prompt = torch.randint(FIRST_RANDOM_ID, config.vocab_size, (2, 12), generator=g)
        block = torch.randint(FIRST_RANDOM_ID, config.vocab_size, (2, 8), generator=g)
        t = torch.tensor([0.25, 0.75])
        out: dict = {}
        out["forward_logits"] = max_rel_diff(dev.context_forward(prompt.to(device)), ref.context_forward(prompt))
        den = []
        for m, dvc in ((ref, torch.device("cpu")), (dev, device)):
            cache = m.empty_cache(2, capacity=32)
            m.extend_context(prompt.to(dvc), cache)
            den.append(m.denoise(block.to(dvc), t.to(dvc), DenoiserContext.from_cache(cache)))
        out["denoise_logits"] = max_rel_diff(den[1], den[0])
        ar = [m.generate_ar(prompt.to(dvc), max_new_tokens=8).sequences for m, dvc in ((ref, "cpu"), (dev, device))]
        out["ar_tokens_equal"] = bool(torch.equal(ar[0].cpu(), ar[1].cpu()))
        opts = dict(max_new_tokens=16, block_size=8, steps_per_block=8, confidence_threshold=0.5)
        diff = [m.generate_mask_diffusion(prompt.to(d), **opts).sequences for m, d in ((ref, "cpu"), (dev, device))]
        out["diffusion_tokens_equal"] = bool(torch.equal(diff[0].cpu(), diff[1].cpu()))
        if device.type == "cuda":
            out["cuda_graph_ar_step"] = cuda_graph_step_diff(dev, prompt.to(device))
        close = [v <= PARITY_TOL for k, v in out.items() if isinstance(v, float)]
        out["passed"] = all(close) and out["ar_tokens_equal"] and out["diffusion_tokens_equal"]
        out["tolerance"] = PARITY_TOL
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def cuda_graph_step_diff(model, prompt: torch.Tensor) -> float:
    """One AR step replayed from a captured graph against the eager step from the same state."""
    batch, n = prompt.shape
    cache = model.empty_cache(batch, capacity=n)
    model.extend_context(prompt[:, :-1], cache)
    fresh = cache.clone()
    decoder = StaticDecoder(model.context_tower, model.context_lm_head, batch, n)
    decoder.load(cache)
    d, last = decoder, prompt[:, -1:]
    replay = capture_cuda_graph(lambda: decode_step(d.body, d.head, last, d.position, d.kv, d.conv, d.ssm, d.valid))
    decoder.load(fresh)  # the warm-up calls advanced the states; the buffers keep their addresses
    got = replay().clone()
    return max_rel_diff(got, model.context_forward(last, cache=fresh)[:, -1])
