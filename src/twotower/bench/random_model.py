"""Random-weight TwoTowers at real widths (issue 19): what `benchmarks/real_shape.py` and
`benchmarks/gpu_check.py` time, and the hooks both use (routing recorder, the parts' modules)."""

from __future__ import annotations

import statistics

import torch

from ..config import PATTERN_TO_TYPE, NemotronHConfig, preset
from ..model import TwoTowerForCausalLM
from ..stream_load import materialize

RELEASE_PRESET = "nemotron-3-nano-30b-a3b"
PART_OF_KIND = {"linear_attention": "mamba", "moe": "moe"}  # hooked parts; the rest is `attention+other`


@torch.no_grad()
def fill_random_(model: torch.nn.Module, *, seed: int, std: float) -> None:
    """Small random values everywhere, and the values that must be sane where they must: Mamba's
    A_log = log(1..h), D = 1 and dt_bias with softplus(dt_bias) in [1e-3, 1e-1]; norms 1; biases
    and the router's correction bias 0; adaLN tables and t_block as a fresh TwoTower (SPEC 3.2)."""
    devices = {p.device for p in model.parameters()}
    gens = {d: torch.Generator(device=d).manual_seed(seed) for d in devices}
    cpu_gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        g = gens[p.device]
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)))
        elif name.endswith(".D") or name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.fill_(1.0)
        elif name.endswith("dt_bias"):
            u = torch.rand(p.shape, generator=cpu_gen)  # seeded: the same routing on every run
            dt = torch.exp(u * (-2.3 + 6.9) - 6.9)  # 1e-3 .. 1e-1, log-uniform
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=g)
    for _, b in model.named_buffers():
        b.zero_()
    model.reset_adaln()


def random_twotower(
    config: NemotronHConfig, *, dtype: torch.dtype, device: str | torch.device, tie_towers: bool, seed: int = 0
) -> TwoTowerForCausalLM:
    """A TwoTower of `config` with random weights, allocated once, directly in `dtype` on `device`
    (built on the meta device, materialised, filled). `tie_towers=True`: the denoiser and its head
    share the context tower's tensors, and the embeddings share the head's matrix (the same shapes,
    hence the same costs, in well under half the memory)."""
    with torch.device("meta"):
        model = TwoTowerForCausalLM(config)
    if tie_towers:
        model.denoiser_tower = model.context_tower
        model.lm_head = model.context_lm_head
    materialize(model, dtype=dtype, device_of=lambda _key: torch.device(device))
    if tie_towers:
        model.context_tower.embeddings.weight = model.context_lm_head.weight
    fill_random_(model, seed=seed, std=config.initializer_range)
    return model.eval()


def real_shape_config(pattern: str, *, preset_name: str = RELEASE_PRESET) -> NemotronHConfig:
    """The preset's widths with the layers of `pattern` (e.g. `M*E`)."""
    unknown = sorted(set(pattern) - set(PATTERN_TO_TYPE))
    if unknown or not pattern:
        raise ValueError(f"layer pattern {pattern!r}: use the characters {sorted(PATTERN_TO_TYPE)}")
    return preset(preset_name).replace(layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in pattern))


def towers(model: TwoTowerForCausalLM) -> list[torch.nn.Module]:
    """The model's distinct towers (one when they are tied)."""
    return list({id(t): t for t in (model.context_tower, model.denoiser_tower)}.values())


def part_modules(model: TwoTowerForCausalLM) -> list[tuple[torch.nn.Module, str]]:
    """(module, part) for every Mamba mixer (`mamba`), MoE layer (`moe`) and head (`head`) of
    `model`; what runs outside them is the `attention+other` part."""
    out = [
        (layer.mixer, PART_OF_KIND[layer.kind])
        for tower in towers(model)
        for layer in tower.layers
        if layer.kind in PART_OF_KIND
    ]
    heads = {id(h): h for h in (model.context_lm_head, model.lm_head)}.values()
    return out + [(h, "head") for h in heads]


class RoutingRecorder:
    """A forward hook on every MoE router of `model` that records how many distinct experts each call
    chose (reading the ids synchronises a GPU: record on untimed calls there)."""

    def __init__(self, model: TwoTowerForCausalLM) -> None:
        self.distinct: list[int] = []
        self._handles = [
            layer.mixer.gate.register_forward_hook(self._record)
            for tower in towers(model)
            for layer in tower.layers
            if layer.kind == "moe"
        ]

    def _record(self, _mod, _args, out) -> None:
        idx = out[0] if isinstance(out, tuple) else out
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point():
            raise RuntimeError("the MoE router no longer returns expert ids first: update RoutingRecorder")
        self.distinct.append(int(idx.unique().numel()))

    def mean(self) -> float:
        return statistics.mean(self.distinct) if self.distinct else 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
