"""Fixed-shape decode steps, made to be compiled with `torch.compile`: the context tower's step over
L new tokens per row (L = 1: an AR step; L = S: committing a diffusion block) and the denoiser body
over a block that reads the context state from the same fixed buffers.

The eager cached step (`NemotronHModel.forward` with a `HybridCache`) is dominated by per-operator
dispatch at small sizes: about 85% of a CPU step on the tiny preset. Compiling it does not help
while its shapes change every step (the K/V view grows) and it reads values to the host (MoE
grouping). These steps keep every shape fixed, so `torch.compile(fullgraph=True, dynamic=False)`
turns them into a handful of fused kernels:

- attention K/V live in buffers of a fixed capacity; new tokens are written at `position`, a
  tensor, and queries attend over the whole buffer under the validity mask (causal among the new
  tokens); the denoiser attends over the same buffers plus its block;
- Mamba conv and SSM states are updated in place (the denoiser only reads them as its seed);
- MoE routing is unchanged (float64 sigmoid, correction bias selects, top-k); the experts run as
  grouped GEMMs whose offsets are computed on the device (`layers/moe.py`), the same path eager,
  static and compiled, so no value ever leaves the device.

The eager paths are the plain twins; `tests/test_static_decode.py` pins them together.
Prefill stays eager (`StaticDecoder.load` copies a prefilled `HybridCache`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

from ..blocks import blocks_for
from ..cache import HybridCache
from ..context import DenoiserContext
from ..layers.mamba2 import MambaState
from .block import block_commit, rows_needing_tokens
from .sampling import RowTopK
from .spec import DECODE_STEPS, check_decode_step

__all__ = [
    "DECODE_STEPS",
    "Compiled",
    "FixedShapeDenoiser",
    "StaticDecoder",
    "check_decode_step",
    "denoiser_block_step",
    "compiler_available",
    "compiler_missing",
    "resolve_engine_step",
    "round_capacity",
]

CAPACITY_ROUNDING = 128  # capacities are rounded up so that nearby lengths share one compiled graph
RECOMPILE_LIMIT = 64  # compiled shapes (batch x new tokens x capacity) kept before Dynamo gives up recompiling


ENGINE_STEP_ENV = "TWOTOWER_ENGINE_STEP"  # what "auto" means, when set (eager, static or compiled)


def _found(env: str, defaults: tuple[str, ...]) -> bool:
    """Whether the compiler a build would use is on the PATH: only `$env`'s program when it is set
    (its first word: "ccache gcc" runs ccache), else any of `defaults`."""
    chosen = os.environ.get(env, "").split()
    return bool(shutil.which(chosen[0])) if chosen else any(shutil.which(cc) for cc in defaults)


def python_headers_found() -> bool:
    """Whether Python.h is where a build of an extension would look: the interpreter's include
    directory under its default scheme, under "posix_prefix" (torch's and Triton's second look; some
    distributions' default scheme names a directory that does not exist) or INCLUDEPY."""
    places = {sysconfig.get_paths().get("include"), sysconfig.get_config_var("INCLUDEPY")}
    if os.name == "posix":
        places.add(sysconfig.get_path("include", scheme="posix_prefix"))
    return any(place and (Path(place) / "Python.h").is_file() for place in places)


def compiler_missing(device: torch.device | str) -> str | None:
    """Why `torch.compile` cannot build kernels for `device` here, or None when it can: Triton for
    CUDA, which also needs a C compiler ($CC, else gcc or clang, as Triton picks) for its
    launchers; a C++ compiler ($CXX, else g++; clang++ on macOS, as inductor picks) on the CPU;
    Python's headers for both (both build Python extensions); "Dynamo is disabled" under
    TORCHDYNAMO_DISABLE=1; other device types are not compiled. `TWOTOWER_ENGINE_STEP=compiled`
    overrides the choice this makes for `auto`."""
    if os.environ.get("TORCHDYNAMO_DISABLE", "") not in ("", "0"):
        return "Dynamo is disabled (TORCHDYNAMO_DISABLE)"
    kind = torch.device(device).type
    if kind == "cuda":
        try:
            triton = importlib.util.find_spec("triton")
        except (ImportError, ValueError):  # a broken install, or a module without a spec
            triton = None
        if triton is None:
            return "no triton"
        if not _found("CC", ("gcc", "clang")):
            return "no C compiler ($CC, gcc, clang) for Triton's launchers"
    elif kind == "cpu":
        if not _found("CXX", ("clang++",) if sys.platform == "darwin" else ("g++",)):
            return "no C++ compiler ($CXX, g++)"
    else:
        return f"no compiled steps for {kind} devices"
    if not python_headers_found():
        return "no Python.h (the Python development headers) to build kernels against"
    return None


def recompile_limit_hit() -> type[BaseException] | tuple:
    """What Dynamo raises past the recompile limit for a `fullgraph=True` function (`compiled`); an
    empty tuple, catching nothing, on a torch release that names it otherwise: the error then
    surfaces as it is."""
    return getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())


def compiler_available(device: torch.device | str) -> bool:
    """Whether `torch.compile` can build kernels for `device` (`compiler_missing` says why not)."""
    return compiler_missing(device) is None


def resolve_engine_step(engine_step: str, device: torch.device | str) -> str:
    """The engine's decode step for `engine_step` ("auto" or one of DECODE_STEPS): "auto" is
    $TWOTOWER_ENGINE_STEP when set, else "compiled" where a compiler is present for the model's
    `device` and "eager" elsewhere. Compiling costs tens of seconds once per shape (a server's or a
    batch job's first blocks) and then runs 1.2-1.3x the eager engine on the bundled model."""
    if engine_step == "auto":
        engine_step = os.environ.get(ENGINE_STEP_ENV) or ("compiled" if compiler_available(device) else "eager")
    check_decode_step(engine_step)
    return engine_step


def round_capacity(n: int) -> int:
    return -(-n // CAPACITY_ROUNDING) * CAPACITY_ROUNDING


class StaticDecoder:
    """Fixed-capacity decode state plus a fixed-shape step for a NemotronH body and its LM head
    (`model.backbone, model.lm_head`, or a TwoTower's `context_tower, context_lm_head`).

    `load(cache)` copies a prefilled cache in; then each `step(tokens)` appends one token per row,
    or `append(tokens)` L tokens per row, and returns the logits after the last (b, V) in float32.
    With `compile=True` the step is compiled once per (batch, L, capacity, dtype, device) and shared
    by every decoder of the model. `denoiser_context()` exposes the state to the denoiser.
    """

    def __init__(self, body, head, batch: int, capacity: int, *, compile: bool = False) -> None:
        self.body, self.head = body, head
        device, dtype = body.embeddings.weight.device, body.embeddings.weight.dtype
        self.batch, self.capacity = batch, capacity
        self.kinds = [layer.kind for layer in body.layers]
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(body.layers):
            if layer.kind == "full_attention":
                st = layer.mixer.empty_state(batch, capacity=capacity, device=device, dtype=dtype)
                self.kv[i] = (st.k, st.v)
            elif layer.kind == "linear_attention":
                st = layer.mixer.empty_state(batch, device=device, dtype=dtype)
                self.conv[i], self.ssm[i] = st.conv, st.ssm
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.length = 0  # mirrors `position` on the host, so no step reads the device
        self._step = Compiled(decode_step, compile=compile, what=f"this decoder ({batch} rows x {capacity} positions)")

    @torch.no_grad()
    def load(self, cache: HybridCache) -> None:
        """Take over a prefilled cache's contents (it must fit and have the same batch size)."""
        n = cache.length
        if cache.batch_size != self.batch or n >= self.capacity:
            raise ValueError(
                f"cache of {cache.batch_size} rows x {n} positions does not fit a static decoder of "
                f"{self.batch} rows x {self.capacity} positions (one position is needed per new token)"
            )
        for i, (k, v) in self.kv.items():
            ck, cv = cache.kv(i)
            k[:, :, :n] = ck
            v[:, :, :n] = cv
            k[:, :, n:] = 0
            v[:, :, n:] = 0
        for i in self.conv:
            st = cache.mamba(i)
            self.conv[i].copy_(st.conv)
            self.ssm[i].copy_(st.ssm)
        self.valid.zero_()
        self.valid[:, :n] = cache.key_valid()
        self.position.fill_(n)
        self.length = n

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b,) -> logits (b, V) of the next position; the state advances by one."""
        return self.append(tokens.reshape(self.batch, 1))

    @torch.no_grad()
    def append(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b, L) -> logits (b, V) after the last of them; the state advances by L (a
        diffusion block is committed in one such call). Compiled, one graph per L."""
        L = tokens.shape[1]
        if self.length + L > self.capacity:
            raise RuntimeError(f"static decoder is full ({self.length} + {L} > {self.capacity} positions)")
        logits = self._step(self.body, self.head, tokens, self.position, self.kv, self.conv, self.ssm, self.valid)
        self.position += L
        self.length += L
        return logits

    def denoiser_context(self) -> DenoiserContext:
        """What the denoiser sees of the past: the whole fixed-capacity buffers (views, no copies)
        under the validity mask, so its shapes never change while the decoder fills up."""
        kv = [self.kv.get(i) for i in range(len(self.kinds))]
        mamba = [MambaState(self.conv[i], self.ssm[i]) if i in self.conv else None for i in range(len(self.kinds))]
        return DenoiserContext(kv, self.valid, mamba)


def decode_step(body, head, tokens, position, kv, conv, ssm, valid) -> torch.Tensor:
    """L tokens per row through every layer, updating the fixed-shape state in place (not `position`).

    tokens (b, L); position (1,) long, the slot the first token goes to; kv {layer: (k, v)} with
    (b, kv_heads, capacity, d); conv {layer: (b, C, K-1)}; ssm {layer: (b, h, p, n) fp32};
    valid (b, capacity) bool. Returns the logits after the last token, (b, V) float32.
    """
    h = _fixed_forward(body, tokens, position, kv, conv, ssm, valid)
    return head(body.norm_f(h[:, -1])).float()


def block_forward(body, tokens, position, kv, conv, ssm, valid) -> torch.Tensor:
    """`decode_step` without the head: the tokens (b, L) through every layer, the fixed-shape state
    updated in place (not `position`); the last hidden states (b, L, H). What committing a block
    costs when nothing reads its logits (the cost model's commit)."""
    return _fixed_forward(body, tokens, position, kv, conv, ssm, valid)


def verify_step(body, head, tokens, position, kv, conv, ssm, valid):
    """A speculative verify over the fixed-shape state: `decode_step`'s forward of the S drafted
    tokens per row (b, S), with the head at every position and each Mamba layer's per-position
    states kept for the rollback. Returns (logits (b, S, V) float32, {layer: (conv window (b, C,
    K-1+S), SSM states (b, S+1, h, p, n))}); the buffers hold the state after all S tokens until the
    caller rolls back (`HybridCache.rollback`). No host read of its own: it compiles with
    `fullgraph=True` (on CUDA, float32/float16 experts' GEMMs read their offsets inside torch's
    grouped_mm fallback: `layers/grouped.py`)."""
    histories: dict = {}
    h = _fixed_forward(body, tokens, position, kv, conv, ssm, valid, histories=histories)
    return head(body.norm_f(h)).float(), histories


def _fixed_forward(body, tokens, position, kv, conv, ssm, valid, *, histories: dict | None = None) -> torch.Tensor:
    """The layers of `decode_step` / `verify_step` over the fixed buffers; the last hidden states (b, L, H).
    With `histories`, each Mamba layer's (conv window, per-position SSM states) go into it."""
    L = tokens.shape[1]
    slots = position + torch.arange(L, device=position.device)  # (L,)
    valid.index_fill_(1, slots, True)
    if L == 1:  # every valid key is at or before the new token
        mask = valid[:, None, None, :]
    else:  # causal inside the new tokens
        keys = torch.arange(valid.shape[1], device=valid.device)
        mask = valid[:, None, None, :] & (keys[None, :] <= slots[:, None])[None, None]
    h = body.embeddings(tokens)  # (b, L, H)
    blocks = blocks_for(len(body.layers))  # deep towers compile each layer kind once (`twotower.blocks`)
    for i, layer in enumerate(body.layers):
        if layer.kind == "linear_attention":
            if histories is None:
                h, new_conv, new_ssm = blocks.mamba_block(layer, h, conv[i], ssm[i])
            else:  # a verify keeps every position's state, for the rollback
                h, new_conv, new_ssm, window, states = blocks.mamba_verify_block(layer, h, conv[i], ssm[i])
                histories[i] = (window, states)
            conv[i].copy_(new_conv)  # the new states written into the fixed buffers
            ssm[i].copy_(new_ssm)
        elif layer.kind == "full_attention":
            q, k, v = layer.mixer.qkv(layer.norm(h))
            kbuf, vbuf = kv[i]
            kbuf.index_copy_(2, slots, k)
            vbuf.index_copy_(2, slots, v)
            h = h + layer.mixer.attend(q, kbuf, vbuf, mask)
        else:  # MoE (grouped experts, no host read: `layers/moe.py`) or MLP
            h = blocks.ffn_block(layer, h)
    return h


def denoise_step(model, canvas: torch.Tensor, t: torch.Tensor, context: DenoiserContext) -> torch.Tensor:
    """The denoiser body over a block (`model.denoise_hidden`): nothing in it depends on values, so
    it compiles into one graph for a fixed-shape context (`StaticDecoder.denoiser_context`)."""
    return model.denoise_hidden(canvas, t, context)


_COMPILED: dict = {}


def compiled(fn):
    """`fn` under `torch.compile(fullgraph=True, dynamic=False)`, wrapped once per function: Dynamo
    compiles it once per model and shape and reuses the graph for every later call."""
    if fn not in _COMPILED:
        # one graph per shape: allow more than Dynamo's default of 8 (capacities are rounded, so
        # shapes stay few); past the limit the callers run uncompiled
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


class Compiled:
    """`fn` compiled (shared graphs, see `compiled`) or plain; past Dynamo's recompile limit it warns
    and goes on with the plain `fn` rather than fail."""

    def __init__(self, fn, *, compile: bool, what: str) -> None:
        self.plain, self.what = fn, what
        self.fn = compiled(fn) if compile else fn

    def __call__(self, *args, **kwargs):
        try:
            return self.fn(*args, **kwargs)
        except recompile_limit_hit():
            warnings.warn(
                f"torch.compile's recompile limit is reached; {self.what} runs its fixed-shape step uncompiled",
                RuntimeWarning,
                stacklevel=2,
            )
            self.fn = self.plain
            return self.fn(*args, **kwargs)


class FixedShapeDenoiser:
    """`model.denoise` for `denoise_block` over a `StaticDecoder.denoiser_context`: the body runs as
    the fixed-shape `denoise_step`, compiled or not; the head then runs eagerly on the `logits_for`
    positions only (a selection whose size depends on values, so it stays out of the graph)."""

    def __init__(self, model, *, compile: bool) -> None:
        self.model = model
        self._body = Compiled(denoise_step, compile=compile, what="the denoiser")

    def __call__(self, canvas, t, context, *, logits_for=None) -> torch.Tensor:
        return self.model.denoiser_logits(self._body(self.model, canvas, t, context), logits_for)


def fixed_shape_steps(eager_step, body, head, *, max_new_tokens: int, compile: bool):
    """A step function for `decode_ar`: the prompt (several tokens) goes through `eager_step`, which
    fills the cache; then a `StaticDecoder` takes the cache over and runs every one-token step."""
    decoder: StaticDecoder | None = None

    def step(ids: torch.Tensor, cache: HybridCache, mask: torch.Tensor | None) -> torch.Tensor:
        nonlocal decoder
        if decoder is None:
            logits = eager_step(ids, cache, mask)
            capacity = round_capacity(cache.length + max_new_tokens)
            decoder = StaticDecoder(body, head, cache.batch_size, capacity, compile=compile)
            decoder.load(cache)
            return logits
        return decoder.step(ids[:, -1])

    return step


def denoiser_block_step(
    model,
    canvas: torch.Tensor,
    masked: torch.Tensor,
    context: DenoiserContext,
    noise: torch.Tensor | None,
    eos_ids: torch.Tensor | None,
    step: int | torch.Tensor,
    *,
    steps: int | torch.Tensor,
    threshold: float | torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | RowTopK | None,
    mask_id: int,
    eos_aware: bool | torch.Tensor = False,
    sampled: bool | None = None,
):
    """One whole diffusion step with no host read: t = masked fraction, the denoiser body and head over
    every position (no value-dependent selection), then `block.block_commit` (prediction, confidence,
    commit rule, EOS bookkeeping). canvas/masked (b, S); `context` fixed-shape
    (`StaticDecoder.denoiser_context`); noise (b, S, V) Gumbel noise drawn on the device by each row's
    generator (temperature > 0); `step` the 0-based step (a tensor: one compiled graph for every step);
    `steps`, `threshold`, `temperature` likewise may be 0-d tensors, with `sampled` given (one graph
    for every value: a server's clients choose them per request).
    Compiles with `fullgraph=True` (tests/decode/test_compiled_step.py).
    Returns block_commit's (canvas, masked, committed, live) and the rows still live after it (b,)
    bool: a masked position left before their first committed EOS (the loop's next host read)."""
    t = masked.sum(-1).float() / canvas.shape[1]
    logits = model.denoiser_logits(model.denoise_hidden(canvas, t, context))
    canvas, masked, committed, live = block_commit(
        logits, canvas, masked, step=step, steps=steps, threshold=threshold, temperature=temperature, top_k=top_k,
        mask_id=mask_id, eos_ids=eos_ids, eos_aware=eos_aware, noise=noise, sampled=sampled,
    )  # fmt: skip
    return canvas, masked, committed, live, rows_needing_tokens(canvas, masked, eos_ids)
