"""The GPU check's timing and fast modes (`benchmarks/gpu_check.py`): a clock that synchronises a
GPU, the machine probes, and for each mode (eager, a CUDA graph captured by hand, torch.compile with
and without CUDA graphs) the three forwards as callables that start from the same state."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from twotower.context import DenoiserContext
from twotower.decode.static import StaticDecoder, block_forward, decode_step

BLOCK = 16
FIRST_RANDOM_ID = 4  # ids below are special (pad, bos, eos, mask)
RECOMPILE_LIMIT = 64  # one graph per (batch, tokens) shape and mode


# ---- timing ---------------------------------------------------------------------------------------
class Clock:
    """Milliseconds of a call: CUDA events on a GPU (each call synchronised), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def ms(self, fn: Callable[[], object], *, repeats: int, before: Callable[[], None] = lambda: None) -> float:
        times = []
        for _ in range(repeats):
            before()
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)


def measure_machine(device: torch.device, *, stream_bytes: int, matmul_size: int, clock: Clock) -> dict:
    """Read bandwidth (a float32 sum) and bf16 matmul peak on `device`, medians of 10 calls."""
    buf = torch.ones(stream_bytes // 4, dtype=torch.float32, device=device)
    a = torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16)
    buf.sum(), a @ b
    read_ms = clock.ms(buf.sum, repeats=10)
    mm_ms = clock.ms(lambda: a @ b, repeats=10)
    return {"read_bandwidth": stream_bytes / (read_ms / 1e3), "matmul_peak_bf16": 2 * matmul_size**3 / (mm_ms / 1e3)}


# ---- the fast modes ---------------------------------------------------------------------------------
def capture_cuda_graph(fn: Callable[[], torch.Tensor], *, warmup: int = 3) -> Callable[[], torch.Tensor]:
    """`fn` captured in a CUDA graph (warmed up on a side stream first, as capture requires); the
    returned callable replays it and returns the graph's output tensor."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    replay.graph = graph  # keep the graph (and its memory pool) alive with the callable
    return replay


def lazy_capture(fn: Callable[[], torch.Tensor], *, warmup: int = 3) -> Callable[[], torch.Tensor]:
    """`capture_cuda_graph(fn)` at the first call, its replay from then on: each forward is captured
    when it is first timed, so a capture that fails loses that forward's row alone."""
    replay: Callable[[], torch.Tensor] | None = None

    def call() -> torch.Tensor:
        nonlocal replay
        if replay is None:
            replay = capture_cuda_graph(fn, warmup=warmup)
        return replay()

    return call


def denoise_logits(model, canvas, t, context) -> torch.Tensor:
    """The whole denoiser forward (body, norm_f, head on every position) as one function to compile."""
    return model.denoiser_logits(model.denoise_hidden(canvas, t, context))


def compile_fn(fn, *, mode: str):
    """`fn` under torch.compile for `mode` ("compile": inductor's default, or "reduce-overhead")."""
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if limit is not None and limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    kwargs = {"mode": "reduce-overhead"} if mode == "reduce-overhead" else {}
    return torch.compile(fn, fullgraph=True, dynamic=False, **kwargs)


def mark_static(decoder: StaticDecoder) -> None:
    """Tell Dynamo the decoder's buffers keep their addresses, so CUDA graphs may mutate them."""
    tensors = [t for kv in decoder.kv.values() for t in kv] + list(decoder.conv.values()) + list(decoder.ssm.values())
    for t in [*tensors, decoder.valid, decoder.position]:
        torch._dynamo.mark_static_address(t)


def prefilled_cache(model, *, batch: int, context: int, capacity: int, seed: int):
    """A context cache of `batch` rows, each holding its own `context` random tokens (rows that
    shared one past would route alike and touch fewer experts than real batches do)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(FIRST_RANDOM_ID, model.config.vocab_size, (batch, context), generator=g)
    cache = model.empty_cache(batch, capacity=capacity)
    model.extend_context(prompt.to(model.context_device), cache)
    return cache


def forward_calls(model, mode: str, *, batch: int, context: int, seed: int) -> tuple[dict, Callable[[], None]]:
    """For one mode and batch: {forward: callable} and a `before` hook that rewinds the state, so
    every call starts at the same `context` positions (outside the timed region). Eagerly the
    rewind resets the length and key mask, not the Mamba states: each call does the same work on
    whatever state the previous one left (shapes, not values, set the cost)."""
    device = model.context_device
    g = torch.Generator().manual_seed(seed + batch)
    ids = torch.randint(FIRST_RANDOM_ID, model.config.vocab_size, (batch, BLOCK), generator=g).to(device)
    t = torch.full((batch,), 0.5, device=device)
    capacity = context + BLOCK + 1
    cache = prefilled_cache(model, batch=batch, context=context, capacity=capacity, seed=seed)
    if mode == "eager":
        ctx = DenoiserContext.from_cache(cache)

        def rewind() -> None:
            cache.length = context
            cache.valid[:, context:] = False

        calls = {
            "ar_step": lambda: model.context_forward(ids[:, :1], cache=cache),
            "denoise": lambda: model.denoise(ids, t, ctx),
            "commit": lambda: model.extend_context(ids, cache),
        }
        return calls, rewind
    decoder = StaticDecoder(model.context_tower, model.context_lm_head, batch, capacity)
    decoder.load(cache)  # the cache itself is dropped on return
    ctx = decoder.denoiser_context()
    d = decoder

    # the commit is the tower alone, as eagerly (`extend_context`) and in the cost model: no head
    if mode == "cuda-graph":  # each captured when first called (`lazy_capture`)
        calls = {
            "ar_step": lazy_capture(
                lambda: decode_step(d.body, d.head, ids[:, :1], d.position, d.kv, d.conv, d.ssm, d.valid)
            ),
            "denoise": lazy_capture(lambda: denoise_logits(model, ids, t, ctx)),
            "commit": lazy_capture(lambda: block_forward(d.body, ids, d.position, d.kv, d.conv, d.ssm, d.valid)),
        }
    else:
        if mode == "reduce-overhead":
            mark_static(decoder)
        compiled_step = compile_fn(decode_step, mode=mode)
        compiled_block = compile_fn(block_forward, mode=mode)
        den = compile_fn(denoise_logits, mode=mode)
        calls = {
            "ar_step": lambda: compiled_step(d.body, d.head, ids[:, :1], d.position, d.kv, d.conv, d.ssm, d.valid),
            "denoise": lambda: den(model, ids, t, ctx),
            "commit": lambda: compiled_block(d.body, ids, d.position, d.kv, d.conv, d.ssm, d.valid),
        }
    # the fixed-shape step writes at `position` and never moves it: every call is the same step
    return calls, lambda: None
