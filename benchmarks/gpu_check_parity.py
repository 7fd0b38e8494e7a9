"""The GPU check's parity stage (`benchmarks/gpu_check.py`): a tiny random fp32 TwoTower on the
device against itself on the CPU (logits, greedy AR and mask-diffusion tokens), and each of the
three forwards the 30B run captures (the AR step, the denoiser forward, the block commit) replayed
from a CUDA graph of a tiny bf16 TwoTower against its eager forward: a capture that fails shows
here in seconds, before the full-size run. Each check is recorded on its own (a failing one leaves
`<name>_error`)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from gpu_check_modes import BLOCK, FIRST_RANDOM_ID, capture_cuda_graph, denoise_logits

from twotower.bench.random_model import random_twotower
from twotower.config import preset
from twotower.context import DenoiserContext
from twotower.decode.static import StaticDecoder, block_forward, decode_step

PARITY_TOL = 1e-3  # max |logit difference| / max(1, max |logit|), fp32 with TF32 off
GRAPH_TOL = 2e-2  # the same, bf16: a replayed graph against the eager step on the device


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

        def check(key: str, fn) -> None:  # each check on its own: one failure keeps the others' results
            try:
                out[key] = fn()
            except Exception as err:
                out[f"{key}_error"] = f"{type(err).__name__}: {err}"

        check(
            "forward_logits", lambda: max_rel_diff(dev.context_forward(prompt.to(device)), ref.context_forward(prompt))
        )

        def denoise() -> float:
            den = []
            for m, dvc in ((ref, torch.device("cpu")), (dev, device)):
                cache = m.empty_cache(2, capacity=32)
                m.extend_context(prompt.to(dvc), cache)
                den.append(m.denoise(block.to(dvc), t.to(dvc), DenoiserContext.from_cache(cache)))
            return max_rel_diff(den[1], den[0])

        check("denoise_logits", denoise)

        def ar() -> bool:
            seqs = [m.generate_ar(prompt.to(d), max_new_tokens=8).sequences for m, d in ((ref, "cpu"), (dev, device))]
            return bool(torch.equal(seqs[0].cpu(), seqs[1].cpu()))

        def diffusion() -> bool:
            opts = dict(max_new_tokens=16, block_size=8, steps_per_block=8, confidence_threshold=0.5)
            seqs = [m.generate_mask_diffusion(prompt.to(d), **opts).sequences for m, d in ((ref, "cpu"), (dev, device))]
            return bool(torch.equal(seqs[0].cpu(), seqs[1].cpu()))

        check("ar_tokens_equal", ar)
        check("diffusion_tokens_equal", diffusion)
        if device.type == "cuda":
            # in bf16: float32 grouped_mm on CUDA takes a fallback that reads the group offsets on the
            # host, which a graph capture refuses (the 30B run is bf16 too)
            bf16 = random_twotower(config, dtype=torch.bfloat16, device=device, tie_towers=False, seed=seed)
            p, b = prompt.to(device), block.to(device)
            check("cuda_graph_ar_step_bf16", lambda: cuda_graph_step_diff(bf16, p))
            check("cuda_graph_denoise_bf16", lambda: cuda_graph_denoise_diff(bf16, p, b, t.to(device)))
            check("cuda_graph_commit_bf16", lambda: cuda_graph_commit_diff(bf16, p, b))
        close = [out.get(k, float("inf")) <= PARITY_TOL for k in ("forward_logits", "denoise_logits")]
        graph_ok = device.type != "cuda" or all(out.get(k, float("inf")) <= GRAPH_TOL for k in GRAPH_CHECKS)
        equal = out.get("ar_tokens_equal") is True and out.get("diffusion_tokens_equal") is True
        out["passed"] = all(close) and equal and graph_ok
        out["tolerance"] = PARITY_TOL
        out["graph_tolerance"] = GRAPH_TOL
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


GRAPH_CHECKS = ("cuda_graph_ar_step_bf16", "cuda_graph_denoise_bf16", "cuda_graph_commit_bf16")
Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def _prefilled(model, tokens: torch.Tensor, *, room: int, capacity: int) -> tuple:
    """A cache of `tokens` with `room` free positions, a copy of it, and a `StaticDecoder` of
    `capacity` positions loaded from it: the state every graph check starts from."""
    cache = model.empty_cache(tokens.shape[0], capacity=tokens.shape[1] + room)
    model.extend_context(tokens, cache)
    fresh = cache.clone()
    decoder = StaticDecoder(model.context_tower, model.context_lm_head, tokens.shape[0], capacity)
    decoder.load(cache)
    return cache, fresh, decoder


def cuda_graph_step_diff(model, prompt: torch.Tensor, *, capture: Capture = capture_cuda_graph) -> float:
    """One AR step replayed from a captured graph against the eager step from the same state.
    (`capture` is the CUDA-graph capture; the tests give a stand-in that calls the function.)"""
    _, fresh, d = _prefilled(model, prompt[:, :-1], room=1, capacity=prompt.shape[1])
    last = prompt[:, -1:]
    replay = capture(lambda: decode_step(d.body, d.head, last, d.position, d.kv, d.conv, d.ssm, d.valid))
    d.load(fresh)  # the warm-up calls advanced the states; the buffers keep their addresses
    got = replay().clone()
    return max_rel_diff(got, model.context_forward(last, cache=fresh)[:, -1])


def cuda_graph_denoise_diff(
    model, prompt: torch.Tensor, block: torch.Tensor, t: torch.Tensor, *, capture: Capture = capture_cuda_graph
) -> float:
    """The whole denoiser forward (body, norm_f, head on every position) over a fixed-shape context,
    replayed from a captured graph, against the eager `denoise` over the same prefilled cache."""
    cache, _, d = _prefilled(model, prompt, room=0, capacity=prompt.shape[1] + BLOCK + 1)
    context = d.denoiser_context()
    replay = capture(lambda: denoise_logits(model, block, t, context))  # reads the state, writes none
    got = replay().clone()
    return max_rel_diff(got, model.denoise(block, t, DenoiserContext.from_cache(cache)))


def cuda_graph_commit_diff(
    model, prompt: torch.Tensor, block: torch.Tensor, *, capture: Capture = capture_cuda_graph
) -> float:
    """A block commit (the context tower over a block, the fixed-shape state updated in place)
    replayed from a captured graph, against the eager tower over the block from the same state."""
    _, fresh, d = _prefilled(model, prompt, room=block.shape[1], capacity=prompt.shape[1] + BLOCK + 1)
    replay = capture(lambda: block_forward(d.body, block, d.position, d.kv, d.conv, d.ssm, d.valid))
    d.load(fresh)  # the warm-up calls advanced the states; the buffers keep their addresses
    got = d.body.norm_f(replay()).clone()
    return max_rel_diff(got, model.context_tower(block, cache=fresh))
