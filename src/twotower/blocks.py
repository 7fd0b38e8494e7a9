"""Whole decoder layers as functions that `torch.compile` can compile once per layer kind.

The release has 52 layers, 23 of them Mamba and 23 MoE, each kind identical in structure. Compiled
as one flat graph, every layer is traced and lowered again. Marked with
`torch.compiler.nested_compile_region`, a layer kind is compiled the first time it is met and the
same code is called for every later layer of that kind with that layer's weights. Measured with
`benchmarks/compile_time.py` (the bundled model's widths, the release's 52 layers, batch 2, this
2-core CPU, cold inductor cache): the AR step, block commit and denoiser forward compiled in 377 s
flat and 87 s with regions (74 -> 29, 124 -> 21, 178 -> 37 s; 412 -> 113 s in an earlier run), with
the same outputs. The price is a call per region into its compiled code: on this CPU 2-16% slower
calls (measured interleaved on 12 layers). A captured CUDA graph should not pay it; not measured.

Hence `MODE` ($TWOTOWER_COMPILE_REGIONS): "auto" (the default) marks towers of at least
REGION_MIN_LAYERS layers (the release's, not the bundled model's 6), "on" every tower, "off" none.
It is read when a step is traced (Dynamo guards on it). In eager execution the marks do nothing.

The functions take and return tensors only (states as separate tensors, not `MambaState`; a
layer's adaLN modulation as one (b, 3, H) tensor, since a region's inputs may not alias each other),
so the compiled region has plain inputs; the fixed-shape steps copy the returned states into their
buffers outside it. Attention layers stay inline: their K/V buffers are written in place between
the projections and the attention (6 of 52 layers).
"""

from __future__ import annotations

import os

import torch

from .conditioning import split_modulation
from .layers.mamba2 import MambaState

MODE_ENV = "TWOTOWER_COMPILE_REGIONS"
REGION_MIN_LAYERS = 16  # "auto": towers at least this deep compile per layer kind
MODE = os.environ.get(MODE_ENV, "auto").strip().lower()  # "auto", "on" or "off" (read when compiling)
if MODE in ("1", "true", "yes"):
    MODE = "on"
elif MODE in ("0", "false", "no"):
    MODE = "off"
if MODE not in ("auto", "on", "off"):
    raise ValueError(f"${MODE_ENV}={MODE!r}: use auto, on or off")


def regions_for(n_layers: int) -> bool:
    """Whether a tower of `n_layers` compiles each layer kind once (`MODE`; "auto": when it has at
    least REGION_MIN_LAYERS layers)."""
    return MODE == "on" or (MODE == "auto" and n_layers >= REGION_MIN_LAYERS)


class Blocks:
    """The layer functions below, marked as compiled regions or plain (`regions_for`)."""

    def __init__(self, mark) -> None:
        for fn in (mamba_block, mamba_verify_block, ffn_block, denoiser_mamba_block):
            setattr(self, fn.__name__, mark(fn))


def blocks_for(n_layers: int) -> Blocks:
    return REGIONAL if regions_for(n_layers) else FLAT


# ---- adaLN (`mod` (b, 3, H): shift, 1 + scale, gate; `conditioning.layer_modulations`; None: none)
def mixer_input(layer, h: torch.Tensor, mod: torch.Tensor | None) -> torch.Tensor:
    """A mixer layer's input: norm(h * (1 + scale) + shift), modulated before the norm."""
    if mod is None:
        return layer.norm(h)
    shift, scale1, _ = split_modulation(mod)
    return layer.norm(torch.addcmul(shift, h, scale1))


def gated(h: torch.Tensor, y: torch.Tensor, mod: torch.Tensor | None) -> torch.Tensor:
    """The residual update: h + gate * y (h + y without adaLN)."""
    return h + y if mod is None else torch.addcmul(h, split_modulation(mod)[2], y)


# ---- the layers --------------------------------------------------------------------------------------
def mamba_block(layer, h: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor):
    """A context-tower Mamba layer over h (b, L, H) from state (conv, ssm): (h + mixer(norm(h)),
    the new conv state, the new SSM state)."""
    y, state = layer.mixer(layer.norm(h), MambaState(conv, ssm))
    return h + y, state.conv, state.ssm


def mamba_verify_block(layer, h: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor):
    """`mamba_block` keeping the state at every position (a speculative verify's rollback): also
    returns the conv window (b, C, K-1+L) and the SSM states (b, L+1, h, p, n) of `MambaHistory`."""
    record: list = []
    y, state = layer.mixer(layer.norm(h), MambaState(conv, ssm), history=record)
    return h + y, state.conv, state.ssm, record[0].window, record[0].ssm


def ffn_block(layer, h: torch.Tensor, mod: torch.Tensor | None = None) -> torch.Tensor:
    """A feed-forward layer (MoE or dense MLP): h + mixer(norm(h)); with the denoiser's adaLN the
    input is modulated after the norm and the output gated."""
    if mod is None:
        return h + layer.mixer(layer.norm(h))
    shift, scale1, gate = split_modulation(mod)
    return torch.addcmul(h, gate, layer.mixer(torch.addcmul(shift, layer.norm(h), scale1)))


def denoiser_mamba_block(layer, h, mod, conv, ssm) -> torch.Tensor:
    """A denoiser Mamba layer from the context's seed state (conv, ssm; None for none), its final
    state not computed, adaLN-modulated before the norm (`mixer_input`) and gated."""
    seed = MambaState(conv, ssm) if conv is not None else None
    return gated(h, layer.mixer(mixer_input(layer, h, mod), seed, final_state=False)[0], mod)


FLAT = Blocks(lambda fn: fn)
_mark = getattr(torch.compiler, "nested_compile_region", None)  # not in older torch: flat everywhere
REGIONAL = Blocks(_mark) if _mark is not None else FLAT
