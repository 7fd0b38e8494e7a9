"""Typed, frozen configuration for NemotronH backbones (SPEC.md section 2), read from and written to config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dtypes import DTYPES

# One character per layer in `hybrid_override_pattern`, and the `layers_block_type` name it stands for.
PATTERN_TO_TYPE = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
TYPE_TO_PATTERN = {v: k for k, v in PATTERN_TO_TYPE.items()}
# Older spellings of layer kinds seen in some configs.
_LEGACY_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}

# Config keys that older files spell differently (HF accepts these aliases too).
_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_conv_bias": "use_conv_bias",
    "num_local_experts": "n_routed_experts",
}


def _decode_json_quirks(value: Any) -> Any:
    """Turn `{"__float__": "Infinity"}`-style encodings (found in real config.json files) into floats."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode_json_quirks(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_json_quirks(v) for v in value]
    return value


def _encode_json_float(value: float) -> Any:
    """JSON has no Infinity/NaN; write them the way real configs do."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": str(value).replace("inf", "Infinity").replace("nan", "NaN")}
    return value


@dataclass(frozen=True)
class NemotronHConfig:
    """Architecture of one NemotronH body plus its LM head. Field names follow HF `NemotronHConfig`."""

    vocab_size: int = 131072
    hidden_size: int = 2688
    layers_block_type: tuple[str, ...] = ("linear_attention", "moe", "full_attention", "mlp")
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    # mamba-2
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    mamba_ssm_cache_dtype: str = "float32"  # dtype the SSM state is KEPT in; the scan always runs in fp32
    # dense MLP and MoE
    intermediate_size: int = 4096
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    # misc
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | tuple[int, ...] = 2
    pad_token_id: int = 0
    # keys we do not interpret (rope_theta, torch_dtype, ...) kept so a save round-trips them
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers_block_type", tuple(self.layers_block_type))
        object.__setattr__(self, "time_step_limit", tuple(float(x) for x in self.time_step_limit))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ---- derived values -------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_block_type)

    @property
    def hybrid_override_pattern(self) -> str:
        return "".join(TYPE_TO_PATTERN[t] for t in self.layers_block_type)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return tuple(eos) if isinstance(eos, tuple) else (eos,)

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        bad = [t for t in self.layers_block_type if t not in TYPE_TO_PATTERN]
        if bad:
            raise ValueError(
                f"layers_block_type: unknown layer kinds {sorted(set(bad))}; use {sorted(TYPE_TO_PATTERN)}"
            )
        if not self.layers_block_type:
            raise ValueError("layers_block_type: a model needs at least one layer")
        positive = (
            "vocab_size hidden_size num_attention_heads num_key_value_heads head_dim mamba_num_heads "
            "mamba_head_dim ssm_state_size n_groups conv_kernel chunk_size intermediate_size "
            "n_routed_experts num_experts_per_tok moe_intermediate_size n_group topk_group"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.mamba_num_heads % self.n_groups:
            raise ValueError(f"n_groups ({self.n_groups}) must divide mamba_num_heads ({self.mamba_num_heads})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError(f"n_group ({self.n_group}) / topk_group ({self.topk_group}) do not fit the experts")
        if self.mlp_hidden_act != "relu2":
            raise ValueError(f"mlp_hidden_act: only 'relu2' is supported, got {self.mlp_hidden_act!r}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon: must be > 0, got {self.layer_norm_epsilon}")
        if self.mamba_ssm_cache_dtype not in DTYPES:
            raise ValueError(f"mamba_ssm_cache_dtype: {self.mamba_ssm_cache_dtype!r} is not one of {', '.join(DTYPES)}")
        lo, hi = self.time_step_limit
        if not lo <= hi:
            raise ValueError(f"time_step_limit: lower bound {lo} exceeds upper bound {hi}")
        for name in ("bos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}: {getattr(self, name)} is outside the vocabulary of {self.vocab_size}")
        for eos in self.eos_token_ids:
            if not 0 <= eos < self.vocab_size:
                raise ValueError(f"eos_token_id: {eos} is outside the vocabulary of {self.vocab_size}")

    # ---- dict / JSON ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NemotronHConfig:
        """Build from a config.json dict: accepts `hybrid_override_pattern` or `layers_block_type`."""
        data = _decode_json_quirks(dict(raw))
        for old, new in _ALIASES.items():
            if old in data:
                data.setdefault(new, data.pop(old))
        pattern = data.pop("hybrid_override_pattern", None)
        types = data.pop("layers_block_type", None)
        if types is None and pattern is not None:
            unknown = sorted(set(pattern) - set(PATTERN_TO_TYPE))
            if unknown:
                raise ValueError(
                    f"hybrid_override_pattern: unknown characters {unknown}; use {sorted(PATTERN_TO_TYPE)}"
                )
            types = [PATTERN_TO_TYPE[c] for c in pattern]
        if types is not None:
            if not isinstance(types, (list, tuple)):
                raise ValueError(f"layers_block_type: must be a list of strings, got {type(types).__name__}")
            data["layers_block_type"] = tuple(_LEGACY_TYPES.get(t, t) for t in types)
        if types is None:  # the default pattern would silently stand for a model's real layers
            raise ValueError("no layer pattern: config.json needs hybrid_override_pattern or layers_block_type")
        n_layers = data.pop("num_hidden_layers", None)
        if n_layers is not None and n_layers != len(data["layers_block_type"]):
            raise ValueError(
                f"num_hidden_layers ({n_layers}) disagrees with the layer pattern "
                f"({len(data['layers_block_type'])} layers)"
            )
        # a missing head_dim is the class default (128), as in `transformers`' NemotronHConfig: not
        # hidden_size / heads (84 at the release's widths, whose q_proj is 4096 = 32 x 128 wide)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        extra = {k: v for k, v in data.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except TypeError as err:  # a wrongly typed value that the dataclass cannot take
            raise ValueError(f"invalid config: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that both this library and HF `transformers` read."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["hybrid_override_pattern"] = self.hybrid_override_pattern
        out["num_hidden_layers"] = self.num_hidden_layers
        out.setdefault("model_type", "nemotron_h")
        out.setdefault("architectures", ["NemotronHForCausalLM"])
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> NemotronHConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(raw)

    def to_json(self) -> str:
        """config.json text; non-finite floats written as `{"__float__": "Infinity"}` like `transformers`."""
        data = self.to_dict()
        data["time_step_limit"] = [_encode_json_float(x) for x in self.time_step_limit]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def replace(self, **changes: Any) -> NemotronHConfig:
        return dataclasses.replace(self, **changes)


# ---- presets --------------------------------------------------------------------------------------
def _tiny() -> NemotronHConfig:
    """The bundled model's backbone: all three layer kinds (Mamba-2, attention, MoE with a shared
    expert), ~3.8M parameters, small enough to train on a 2-core laptop CPU."""
    return NemotronHConfig(
        vocab_size=4096,
        hidden_size=192,
        layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in "M*EM*E"),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        mamba_num_heads=6,
        mamba_head_dim=64,
        ssm_state_size=32,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
        intermediate_size=384,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=192,
        moe_shared_expert_intermediate_size=384,
        routed_scaling_factor=1.0,
        eos_token_id=2,
    )


def _nano_30b() -> NemotronHConfig:
    return NemotronHConfig(
        layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"),
        intermediate_size=1856,  # unused (no dense `-` layers) but what the released config.json says
        eos_token_id=(2, 11),
        extra={"torch_dtype": "bfloat16", "rope_theta": 10000},  # as the release's config.json (rope unused)
    )


PRESETS = {"tiny": _tiny, "nemotron-3-nano-30b-a3b": _nano_30b}


def preset(name: str) -> NemotronHConfig:
    """A named architecture; exact names only."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
