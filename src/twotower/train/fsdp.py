"""The FSDP2 layout of a model: one unit (one all-gather, one reduce-scatter) per decoder layer of
each tower, one per embedding and head, and the root unit for the rest.

The towers' layer loops (the single-pass objective, `denoise_hidden`) never call a layer as a
whole: they call `layer.norm`, then the mixer whole (MoE, MLP, the denoiser's Mamba) or by its
pieces (`mixer.qkv`, `mixer.o_proj`, the context pass's Mamba `in_proj` ... `out_proj`). So a
layer's unit is a GROUP of the modules every path calls through their forward (`fully_shard([...])`,
one parameter group): it is gathered when `layer.norm` starts and freed when the last member
(`out_proj`, `o_proj`, the mixer) has run; in backward it is gathered again when the gradient
reaches that last member and reduce-scattered when it has passed `layer.norm`. What a path reads
without a forward call (a Mamba mixer's `conv1d` kernel, `dt_bias`, `A_log`, `D`: about 0.1% of a
layer) stays in the root unit, gathered for the whole step, as do the norms and the adaLN parts.

Units (`shard_units`), in the order they are sharded:
  per tower, per layer i:  `{tower}.layers.{i}` = norm + (mixer | its parametrised pieces)
  `context_tower.embeddings`, `context_lm_head` (never run in training: never gathered),
  `denoiser_tower.embeddings`, `lm_head`
  root (the LossModule): norms_f, `t_embedder`, `t_block`, `scale_shift_tables`, the Mamba scalars
The frozen context tower is sharded like the denoiser; it has no gradients and is never given to
the optimizer.

reshard_after_forward: True (free after forward, gather again in backward) for every unit except
the denoiser's last layer, its head and the root, which backward needs at once. Mixed precision:
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` under bf16 (fp32 master shards, bf16
gathers, fp32 gradient reduction). Inputs are cast to bf16 only at units whose members are whole
modules fed by the residual stream (MoE, MLP, embeddings, heads); a Mamba unit's gated norm takes an
fp32 gate, so attention and Mamba units leave their inputs to autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ShardUnit", "apply_fsdp", "layer_members", "shard_units"]


@dataclass(frozen=True)
class ShardUnit:
    """One FSDP2 unit: the modules sharded together (their parameters, one group) under `name`."""

    name: str
    modules: tuple[nn.Module, ...]
    reshard_after_forward: bool = True
    cast_inputs: bool = True

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]


def layer_members(layer: nn.Module) -> tuple[list[nn.Module], bool]:
    """The modules of one NemotronH block that every path calls through their forward, first to
    run first, and whether the unit may cast its inputs (see the module docstring)."""
    from ..layers.attention import Attention
    from ..layers.mamba2 import Mamba2Mixer

    mixer = layer.mixer
    if isinstance(mixer, Mamba2Mixer):  # conv1d, dt_bias, A_log, D are read, not called: root
        return [layer.norm, mixer.in_proj, mixer.norm, mixer.out_proj], False
    if isinstance(mixer, Attention):
        return [layer.norm, mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.o_proj], False
    return [layer.norm, mixer], True  # MoE (router, experts, shared expert) and MLP run whole


def shard_units(model: nn.Module) -> list[ShardUnit]:
    """The FSDP2 units below the root of a TwoTowerForCausalLM (or a NemotronHForCausalLM: its one
    tower is `backbone`, its head `lm_head`), in the order they are sharded."""
    from ..backbone import NemotronHModel

    towers = [(n, m) for n, m in model.named_children() if isinstance(m, NemotronHModel)]
    units: list[ShardUnit] = []
    for name, tower in towers:
        trained = any(p.requires_grad for p in tower.parameters())
        last = len(tower.layers) - 1
        for i, layer in enumerate(tower.layers):
            members, cast = layer_members(layer)
            keep = trained and i == last  # backward starts here: gathering it again at once is waste
            units.append(ShardUnit(f"{name}.layers.{i}", tuple(members), not keep, cast))
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            units.append(ShardUnit(name, (module,)))
        elif name.endswith("lm_head") and isinstance(module, nn.Linear):
            trained = module.weight.requires_grad
            units.append(ShardUnit(name, (module,), reshard_after_forward=not trained))
    return units


def _policy(bf16: bool, *, cast_inputs: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy(cast_forward_inputs=cast_inputs)
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=cast_inputs)


def apply_fsdp(root: nn.Module, *, bf16: bool) -> nn.Module:
    """`fully_shard` every unit of `root.model` (`shard_units`), then `root`; gradients are SUMMED
    over ranks (divide factor 1), as the objectives expect. Works on a model built on the meta
    device (then `to_empty` materialises each rank's shards) as on a real one."""
    from torch.distributed.fsdp import fully_shard

    sharded = []
    for unit in shard_units(root.model):
        modules = unit.modules[0] if len(unit.modules) == 1 else list(unit.modules)
        fully_shard(modules, reshard_after_forward=unit.reshard_after_forward,
                    mp_policy=_policy(bf16, cast_inputs=unit.cast_inputs))  # fmt: skip
        sharded.append(unit.modules[0])
    # the root's inputs are token ids and noise: never cast them (a bf16 mask ratio would mask other tokens)
    module = fully_shard(root, reshard_after_forward=False, mp_policy=_policy(bf16, cast_inputs=False))
    for first in [*sharded, module]:  # one FSDPModule per unit is enough: the settings are the unit's
        first.set_force_sum_reduction_for_comms(True)
        first.set_gradient_divide_factor(1.0)
    return module
