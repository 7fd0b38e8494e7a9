"""Cost model, part 2 (SPEC.md 5.1, issue 19): bytes and FLOPs of one forward of each NemotronH layer
kind and of a whole tower, and parameter counts (checked against the release's tensor list).

Pure arithmetic on a `NemotronHConfig` (glossary and assumptions: `twotower.bench.costmodel`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..conditioning import FREQ_DIM
from ..config import NemotronHConfig
from .costmodel_machine import FP32_BYTES, Cost, Machine, Precision

DEFAULT_CONTEXT = 0  # cached positions per row; SPEC 5.1's table is reproduced with an empty context
FORWARD_KINDS = ("ar_step", "denoise", "commit", "verify")


@dataclass(frozen=True)
class Forward:
    """One forward of one tower: `batch` rows of `tokens` new tokens over `context` cached positions.

    kind: `ar_step` (context tower, head at the last position), `denoise` (denoiser tower, adaLN,
    head on every position, states only read), `commit` (context tower, no head), `verify` (context
    tower, head on every position)."""

    kind: str
    batch: int
    tokens: int
    context: int = DEFAULT_CONTEXT

    def __post_init__(self) -> None:
        if self.kind not in FORWARD_KINDS:
            raise ValueError(f"forward kind must be one of {FORWARD_KINDS}, got {self.kind!r}")
        if self.batch < 1 or self.tokens < 1 or self.context < 0:
            raise ValueError(f"forward needs batch >= 1, tokens >= 1, context >= 0; got {self}")

    @property
    def n_tokens(self) -> int:
        return self.batch * self.tokens

    @property
    def writes_state(self) -> bool:
        return self.kind != "denoise"  # the denoiser only reads its seed; its final states are dropped

    @property
    def head_positions(self) -> int:
        return {"ar_step": self.batch, "denoise": self.n_tokens, "commit": 0, "verify": self.n_tokens}[self.kind]


DistinctExperts = Callable[[int], float]  # tokens routed through one MoE layer -> distinct experts read


def independent_distinct_experts(n_tokens: float, *, n_experts: int, top_k: int) -> float:
    """D(n) = E (1 - (1 - k/E)^n): experts touched by n tokens each choosing k of E independently."""
    if n_tokens <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** n_tokens)


def independent(config: NemotronHConfig) -> DistinctExperts:
    """The independence formula for `config`'s experts."""
    return lambda n: independent_distinct_experts(
        n, n_experts=config.n_routed_experts, top_k=config.num_experts_per_tok
    )


def measured_distinct_experts(config: NemotronHConfig, measured: Mapping[int, float]) -> DistinctExperts:
    """D(n) from measured routings: {tokens: mean distinct experts per layer}. Between measured token
    counts the measured/independent ratio is interpolated linearly; outside them the nearest ratio is
    kept; the result never exceeds E."""
    if not measured:
        raise ValueError("measured routings: need at least one (tokens, distinct experts) pair")
    base = independent(config)
    points = sorted((int(n), float(d) / base(int(n))) for n, d in measured.items())
    if any(n < 1 for n, _ in points):
        raise ValueError("measured routings: token counts must be >= 1")

    def distinct(n: int) -> float:
        if n <= 0:
            return 0.0
        return min(float(config.n_routed_experts), base(n) * _interpolate(points, n))

    return distinct


def _interpolate(points: Sequence[tuple[int, float]], x: float) -> float:
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


# ---- one layer of each kind -----------------------------------------------------------------------------
def mamba_weights(config: NemotronHConfig) -> int:
    """Parameters of one Mamba-2 mixer: in_proj, conv1d (+bias), dt_bias, A_log, D, gated norm, out_proj."""
    H, d_inner, conv_dim, heads = (
        config.hidden_size,
        config.mamba_d_inner,
        config.mamba_conv_dim,
        config.mamba_num_heads,
    )
    in_proj = H * (d_inner + conv_dim + heads) + (d_inner + conv_dim + heads) * config.use_bias
    conv = conv_dim * config.conv_kernel + conv_dim * config.use_conv_bias
    out_proj = d_inner * H + H * config.use_bias
    return in_proj + conv + 3 * heads + d_inner + out_proj


def mamba_cost(config: NemotronHConfig, fwd: Forward, precision: Precision) -> Cost:
    """One Mamba-2 mixer: its weights once, each row's conv and SSM state read (and written back
    unless denoising); FLOPs of the projections, the conv and the recurrent scan (per token and
    head: decay and B x outer product 3 p n, readout C . state 2 p n)."""
    H, d_inner, conv_dim = config.hidden_size, config.mamba_d_inner, config.mamba_conv_dim
    heads, p, n_state = config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size
    state = heads * p * n_state * precision.ssm_state + conv_dim * (config.conv_kernel - 1) * precision.conv_state
    moves = (1 + fwd.writes_state) * fwd.batch * state
    proj = H * (d_inner + conv_dim + heads) + d_inner * H
    per_token = 2 * proj + 2 * conv_dim * config.conv_kernel + 5 * heads * p * n_state
    return Cost(mamba_weights(config) * precision.weight + moves, fwd.n_tokens * per_token)


def attention_weights(config: NemotronHConfig) -> int:
    """Parameters of one attention mixer: q, k, v, o projections (+ biases)."""
    H, q, kv = (
        config.hidden_size,
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    return H * (q + 2 * kv) + q * H + (q + 2 * kv + H) * config.attention_bias


def attention_cost(config: NemotronHConfig, fwd: Forward, precision: Precision) -> Cost:
    """One attention mixer: its weights, the cached K/V of `context` positions per row read, the new
    K/V written by the context tower; FLOPs of the projections and of q.k and p.v over every key a
    query may see (all cached positions plus the whole block: an upper bound for causal forwards)."""
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    kv_row = 2 * kv * precision.kv  # K and V of one position
    moves = fwd.batch * fwd.context * kv_row + fwd.writes_state * fwd.n_tokens * kv_row
    keys = fwd.context + fwd.tokens
    flops = fwd.n_tokens * (2 * attention_weights(config) + 4 * q * keys)
    return Cost(attention_weights(config) * precision.weight + moves, flops)


def expert_weights(config: NemotronHConfig) -> int:
    """Parameters of one routed expert (up and down projections, not gated)."""
    return 2 * config.moe_intermediate_size * config.hidden_size


def shared_expert_weights(config: NemotronHConfig) -> int:
    return 2 * config.moe_shared_expert_intermediate_size * config.hidden_size


def moe_cost(config: NemotronHConfig, fwd: Forward, precision: Precision, distinct: DistinctExperts) -> Cost:
    """One MoE layer: the router (gate weights and correction bias), the D(n) distinct experts its n
    tokens chose, the shared expert; FLOPs of the router, k experts per token and the shared expert."""
    E, H = config.n_routed_experts, config.hidden_size
    router = E * H * precision.router + E * FP32_BYTES
    experts = distinct(fwd.n_tokens) * expert_weights(config) * precision.weight
    shared = shared_expert_weights(config) * precision.weight
    per_token = 2 * (E * H + config.num_experts_per_tok * expert_weights(config) + shared_expert_weights(config))
    return Cost(router + experts + shared, fwd.n_tokens * per_token)


def mlp_cost(config: NemotronHConfig, fwd: Forward, precision: Precision) -> Cost:
    """One dense relu^2 MLP (`-` layers)."""
    weights = 2 * config.intermediate_size * config.hidden_size
    return Cost(weights * precision.weight, fwd.n_tokens * 2 * weights)


def norm_cost(config: NemotronHConfig, precision: Precision) -> Cost:
    """A layer's pre-norm weight (its FLOPs are negligible)."""
    return Cost(config.hidden_size * precision.weight, 0.0)


def embedding_cost(config: NemotronHConfig, fwd: Forward, precision: Precision) -> Cost:
    """The embedding rows of the forward's tokens."""
    return Cost(fwd.n_tokens * config.hidden_size * precision.weight, 0.0)


def head_cost(config: NemotronHConfig, fwd: Forward, precision: Precision) -> Cost:
    """`norm_f` and the LM head over `fwd.head_positions` positions (nothing when there are none)."""
    positions = fwd.head_positions
    if positions == 0:
        return Cost()
    weights = config.vocab_size * config.hidden_size + config.hidden_size
    return Cost(weights * precision.weight, positions * 2 * config.vocab_size * config.hidden_size)


def adaln_weights(config: NemotronHConfig) -> int:
    """t_embedder (Linear 256->H, Linear H->H) and t_block (Linear H->3H), with biases; the per-layer
    tables are counted in `adaln_cost`."""
    H = config.hidden_size
    return FREQ_DIM * H + H + H * H + H + 3 * H * H + 3 * H


def adaln_cost(config: NemotronHConfig, fwd: Forward, precision: Precision) -> Cost:
    """The denoiser's time conditioning: one t per row, plus every layer's (3, H) table."""
    tables = config.num_hidden_layers * 3 * config.hidden_size
    return Cost((adaln_weights(config) + tables) * precision.weight, fwd.batch * 2 * adaln_weights(config))


LAYER_KIND_NAMES = {"linear_attention": "mamba", "full_attention": "attention", "moe": "moe", "mlp": "mlp"}


def layer_cost(
    config: NemotronHConfig, kind: str, fwd: Forward, precision: Precision, distinct: DistinctExperts
) -> Cost:
    """One layer of `kind` (a `layers_block_type` name): its pre-norm and its mixer."""
    if kind == "linear_attention":
        mixer = mamba_cost(config, fwd, precision)
    elif kind == "full_attention":
        mixer = attention_cost(config, fwd, precision)
    elif kind == "moe":
        mixer = moe_cost(config, fwd, precision, distinct)
    elif kind == "mlp":
        mixer = mlp_cost(config, fwd, precision)
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    return norm_cost(config, precision) + mixer


# ---- one forward of a tower -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ForwardCost:
    """A forward's cost by part: `mamba`, `attention`, `moe`, `mlp` (all layers of the kind, norms
    included), `head`, `other` (embeddings, final norm's neighbours, adaLN)."""

    forward: Forward
    parts: dict[str, Cost] = field(default_factory=dict)

    @property
    def total(self) -> Cost:
        out = Cost()
        for c in self.parts.values():
            out = out + c
        return out

    def seconds(self, machine: Machine, *, bound: str = "roofline") -> float:
        """Time of the forward: the parts run one after the other, each bound by bytes or FLOPs."""
        return sum(machine.seconds(c, bound=bound) for c in self.parts.values())


def forward_cost(
    config: NemotronHConfig,
    fwd: Forward,
    *,
    precision: Precision | None = None,
    distinct: DistinctExperts | None = None,
) -> ForwardCost:
    """Bytes and FLOPs of one tower forward over every layer of `config`, by part."""
    precision = precision or Precision()
    distinct = distinct or independent(config)
    parts: dict[str, Cost] = {}
    for kind in config.layers_block_type:
        name = LAYER_KIND_NAMES[kind]
        parts[name] = parts.get(name, Cost()) + layer_cost(config, kind, fwd, precision, distinct)
    parts["head"] = head_cost(config, fwd, precision)
    other = embedding_cost(config, fwd, precision)
    if fwd.kind == "denoise":
        other = other + adaln_cost(config, fwd, precision)
    parts["other"] = other
    return ForwardCost(fwd, parts)


# ---- parameters (checked against the release's tensor list) ---------------------------------------------
def tower_parameters(config: NemotronHConfig) -> int:
    """Parameters of one NemotronH body (embeddings, layers, norm_f), without its head."""
    total = config.vocab_size * config.hidden_size + config.hidden_size
    for kind in config.layers_block_type:
        total += config.hidden_size  # the layer's pre-norm
        if kind == "linear_attention":
            total += mamba_weights(config)
        elif kind == "full_attention":
            total += attention_weights(config)
        elif kind == "moe":
            total += router_parameters(config) + config.n_routed_experts * expert_weights(config)
            total += shared_expert_weights(config)
        else:
            total += 2 * config.intermediate_size * config.hidden_size
    return total


def router_parameters(config: NemotronHConfig) -> int:
    """The gate of one MoE layer: weights (E, H) and the correction bias (E,), both fp32 in the release."""
    return config.n_routed_experts * (config.hidden_size + 1)


def twotower_weight_bytes(config: NemotronHConfig, precision: Precision | None = None) -> int:
    """Bytes of a whole TwoTower checkpoint: routers at `precision.router`, all else at `precision.weight`."""
    precision = precision or Precision()
    routers = 2 * router_parameters(config) * sum(kind == "moe" for kind in config.layers_block_type)
    return (twotower_parameters(config) - routers) * precision.weight + routers * precision.router


def twotower_parameters(config: NemotronHConfig) -> int:
    """Parameters of a whole TwoTower checkpoint: two bodies, two heads, adaLN and its tables."""
    head = config.vocab_size * config.hidden_size
    tables = config.num_hidden_layers * 3 * config.hidden_size
    return 2 * tower_parameters(config) + 2 * head + adaln_weights(config) + tables
