"""A fixed-shape one-token decode step, made to be compiled with `torch.compile`.

The eager cached step (`NemotronHModel.forward` with a `HybridCache`) is dominated by per-operator
dispatch at small sizes: about 85% of a CPU step on the tiny preset. Compiling it does not help
while its shapes change every step (the K/V view grows) and it reads values to the host (MoE
grouping). This step keeps every shape fixed, so `torch.compile(fullgraph=True, dynamic=False)`
turns it into a handful of fused kernels:

- attention K/V live in buffers of a fixed capacity; the new token is written at `position`, a
  tensor, and the query attends over the whole buffer under the cache's validity mask;
- Mamba conv and SSM states are updated in place;
- MoE routing is unchanged (float64 sigmoid, correction bias selects, top-k), and the chosen
  experts' weights are gathered by index, so no value ever leaves the device (with more token x
  expert pairs than experts, every expert runs on every token, weighted by a dense combine matrix).

The eager cached step is the plain twin; `tests/test_static_decode.py` pins the two together.
Prefill stays eager (`StaticDecoder.load` copies a prefilled `HybridCache`).
"""

from __future__ import annotations

import warnings

import torch

from ..cache import HybridCache
from ..layers.mamba2 import MambaState
from ..layers.mlp import relu2

CAPACITY_ROUNDING = 128  # capacities are rounded up so that nearby lengths share one compiled graph
RECOMPILE_LIMIT = 64  # compiled shapes (batch x capacity) kept before Dynamo gives up on recompiling


def round_capacity(n: int) -> int:
    return -(-n // CAPACITY_ROUNDING) * CAPACITY_ROUNDING


class StaticDecoder:
    """Fixed-capacity decode state plus a one-token step for a NemotronH body and its LM head
    (`model.backbone, model.lm_head`, or a TwoTower's `context_tower, context_lm_head`).

    `load(cache)` copies a prefilled cache in; then each `step(tokens)` appends one token per row
    and returns the next-token logits (b, V) in float32. With `compile=True` the step is compiled
    once per (batch, capacity, dtype, device) and shared by every decoder of the model.
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
        self._step = compiled_step() if compile else decode_step

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
        if self.length >= self.capacity:
            raise RuntimeError(f"static decoder is full ({self.capacity} positions)")
        args = (
            self.body,
            self.head,
            tokens.reshape(self.batch, 1),
            self.position,
            self.kv,
            self.conv,
            self.ssm,
            self.valid,
        )
        try:
            logits = self._step(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # too many compiled shapes in this process: keep going, uncompiled, rather than fail
            warnings.warn(
                f"torch.compile's recompile limit is reached; this decoder ({self.batch} rows x {self.capacity} "
                "positions) runs its fixed-shape step uncompiled",
                RuntimeWarning,
                stacklevel=2,
            )
            self._step = decode_step
            logits = self._step(*args)
        self.position += 1
        self.length += 1
        return logits


def decode_step(body, head, tokens, position, kv, conv, ssm, valid) -> torch.Tensor:
    """One token per row through every layer, updating the fixed-shape state in place (not `position`).

    tokens (b, 1); position (1,) long, the slot the token goes to; kv {layer: (k, v)} with
    (b, kv_heads, capacity, d); conv {layer: (b, C, K-1)}; ssm {layer: (b, h, p, n) fp32};
    valid (b, capacity) bool. Returns logits (b, V) float32.
    """
    valid.index_fill_(1, position, True)
    mask = valid[:, None, None, :]
    h = body.embeddings(tokens)  # (b, 1, H)
    for i, layer in enumerate(body.layers):
        u = layer.norm(h)
        if layer.kind == "linear_attention":
            y = _mamba_step(layer.mixer, u, conv[i], ssm[i])
        elif layer.kind == "full_attention":
            q, k, v = layer.mixer.qkv(u)
            kbuf, vbuf = kv[i]
            kbuf.index_copy_(2, position, k)
            vbuf.index_copy_(2, position, v)
            y = layer.mixer.attend(q, kbuf, vbuf, mask)
        elif layer.kind == "moe":
            y = _moe_step(layer.mixer, u)
        else:
            y = layer.mixer(u)
        h = h + y
    return head(body.norm_f(h)[:, 0]).float()


def _mamba_step(mixer, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    """The mixer's own one-token step; its new states are written into the fixed buffers."""
    y, state = mixer(u, MambaState(conv_state, ssm_state))
    conv_state.copy_(state.conv)
    ssm_state.copy_(state.ssm)
    return y


def _moe_step(moe, u: torch.Tensor) -> torch.Tensor:
    """MoE for (b, 1, H) with no host read: gather the chosen experts' weights, or run them all."""
    x = u[:, 0]
    idx, weights = moe.gate(x)  # (b, k)
    up, down = moe.experts.up_proj, moe.experts.down_proj  # (E, I, H), (E, H, I)
    b, k = idx.shape
    if b * k <= up.shape[0]:
        hid = relu2(torch.einsum("bkih,bh->bki", up[idx], x))
        routed = torch.einsum("bkhi,bki,bk->bh", down[idx], hid, weights)
    else:
        combine = torch.zeros(b, up.shape[0], dtype=weights.dtype, device=x.device).scatter_(1, idx, weights)
        hid = relu2(torch.einsum("eih,bh->bei", up, x))
        routed = torch.einsum("ehi,bei,be->bh", down, hid, combine)
    return (routed + moe.shared_experts(x))[:, None]


_COMPILED: list = []


def compiled_step():
    """`decode_step` under `torch.compile`, wrapped once: Dynamo compiles it once per model and
    shape (batch, capacity, dtype, device) and reuses the graph for every later decoder."""
    if not _COMPILED:
        # one graph per (batch, capacity) shape: allow more than Dynamo's default of 8 (capacities
        # are rounded, so shapes stay few); past the limit `StaticDecoder.step` runs uncompiled
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        _COMPILED.append(torch.compile(decode_step, fullgraph=True, dynamic=False))
    return _COMPILED[0]


DECODE_STEPS = ("eager", "static", "compiled")


def check_decode_step(decode_step: str) -> None:
    if decode_step not in DECODE_STEPS:
        raise ValueError(f"decode_step must be one of {DECODE_STEPS}, got {decode_step!r}")


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
