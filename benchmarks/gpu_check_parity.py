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

HEAD_GAIN = 30.0  # the parity model's heads scaled up: decisive greedy choices (see `parity_model`)
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
        ref = parity_model(config, seed=seed)
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

        def tokens(mode: str) -> Callable[[], bool]:
            def run() -> bool:
                seqs = [greedy_tokens(m, prompt.to(d), mode) for m, d in ((ref, "cpu"), (dev, device))]
                first = first_difference(seqs[0], seqs[1])
                if first is not None:  # where, to tell a near-tie from a broken kernel
                    out[f"{mode}_first_difference"] = first
                return first is None

            return run

        check("ar_tokens_equal", tokens("ar"))
        check("diffusion_tokens_equal", tokens("diffusion"))
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


def parity_model(config, *, seed: int):
    """The parity check's tiny fp32 TwoTower on the CPU: random weights, non-trivial time
    conditioning, and heads scaled by HEAD_GAIN. At the initializer's scale its logits are nearly
    uniform (a top probability of ~0.001 over 4,096 ids), so which of a block's positions is the most
    confident is decided by differences near float32 rounding, and two correct devices can decode
    different tokens: with every weight perturbed by 1e-5 (relative), 2 of 60 seeds changed the
    greedy diffusion tokens unscaled, none of 60 with the heads x30 (top probabilities 0.4-0.9)."""
    model = random_twotower(config, dtype=torch.float32, device="cpu", tie_towers=False, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.t_block[1].weight.copy_(0.02 * torch.randn(model.t_block[1].weight.shape, generator=g))
        for table in model.scale_shift_tables:
            table.add_(0.1 * torch.randn(table.shape, generator=g))
        heads = {id(h): h for h in (model.lm_head, model.context_lm_head)}  # once, if the towers share one
        for head in heads.values():
            head.weight.mul_(HEAD_GAIN)
    return model


def greedy_tokens(model, prompt: torch.Tensor, mode: str) -> torch.Tensor:
    """The parity check's greedy decode ("ar" or "diffusion") of `prompt` by `model` (on its device), returned on the CPU."""
    if mode == "ar":
        out = model.generate_ar(prompt, max_new_tokens=8)
    else:
        out = model.generate_mask_diffusion(
            prompt, max_new_tokens=16, block_size=8, steps_per_block=8, confidence_threshold=0.5
        )
    return out.sequences.cpu()


def first_difference(a: torch.Tensor, b: torch.Tensor) -> list[int] | None:
    """The first (row, position) where two (b, L) token tensors differ; None when equal."""
    if a.shape != b.shape:
        return [-1, -1]
    where = (a != b).nonzero()
    return None if where.numel() == 0 else [int(v) for v in where[0]]


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
