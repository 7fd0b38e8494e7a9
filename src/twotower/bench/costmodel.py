"""Cost model (SPEC.md section 5.1, issue 19): bytes and FLOPs of one forward of each NemotronH layer
kind, and the diffusion/AR and speculative/AR throughput ratios they imply on a roofline machine.

Pure arithmetic on a `NemotronHConfig`: no tensors, no I/O. Glossary: H hidden, V vocabulary,
E routed experts, k experts per token, I expert width, Is shared-expert width, b rows, L new tokens
per row, n = b * L tokens in the forward, T cached (clean) positions per row, S block size,
tau generated tokens per denoiser forward, D(n) distinct experts one MoE layer reads for n tokens.

Assumptions (also in `ASSUMPTIONS`, printed by `benchmarks/cost_model.py`):
1. Each part of a forward (all layers of one kind, the head, the rest) costs its roofline time,
   max(bytes moved / read bandwidth, FLOPs / matmul peak), and the parts add up. Decode is mostly
   bandwidth-bound, so this is mostly the bytes; no launch or host overhead (graph-captured).
   `bound="bandwidth"` drops the FLOP term (SPEC 5.1's table, "bandwidth-bound").
2. Bytes moved = every weight the forward touches, read once (an MoE layer reads only the D(n)
   experts its tokens chose), plus the per-row state: the Mamba conv and SSM states read (and
   written back by the context tower), the cached K/V read, new K/V written. Activations and logits
   are not counted (they are small next to the weights up to a few thousand tokens per forward).
3. D(n) = E (1 - (1 - k/E)^n) for independent routing, or measured routings when given.
4. One diffusion block of S tokens costs S / tau denoiser forwards (S tokens each) plus one commit
   (the context tower over the S tokens, no head); one AR token costs one AR step (1 token + head).
   One speculative round costs `draft_steps` denoiser forwards plus one verify (the context tower
   and its head over S tokens) and yields min(S, tau * draft_steps) tokens.
5. The towers run one after the other (no overlap between them), on identical devices.
"""

from __future__ import annotations

from .costmodel_layers import (
    DEFAULT_CONTEXT,
    FORWARD_KINDS,
    LAYER_KIND_NAMES,
    DistinctExperts,
    Forward,
    ForwardCost,
    adaln_cost,
    adaln_weights,
    attention_cost,
    attention_weights,
    embedding_cost,
    expert_weights,
    forward_cost,
    head_cost,
    independent,
    independent_distinct_experts,
    layer_cost,
    mamba_cost,
    mamba_weights,
    measured_distinct_experts,
    mlp_cost,
    moe_cost,
    norm_cost,
    router_parameters,
    shared_expert_weights,
    tower_parameters,
    twotower_parameters,
    twotower_weight_bytes,
)
from .costmodel_machine import (
    BF16_BYTES,
    BOUNDS,
    FP32_BYTES,
    GPUS,
    H100,
    H200,
    STATE_DTYPE_BYTES,
    Cost,
    Machine,
    Precision,
    gib,
)
from .costmodel_ratios import (
    ASSUMPTIONS,
    DEFAULT_BATCHES,
    DEFAULT_DRAFT_STEPS,
    DEFAULT_TAUS,
    PAPER_RATIO,
    Prediction,
    predict,
    prediction_grid,
)

__all__ = [
    "ASSUMPTIONS",
    "BF16_BYTES",
    "BOUNDS",
    "DEFAULT_BATCHES",
    "DEFAULT_CONTEXT",
    "DEFAULT_DRAFT_STEPS",
    "DEFAULT_TAUS",
    "FORWARD_KINDS",
    "FP32_BYTES",
    "GPUS",
    "H100",
    "H200",
    "LAYER_KIND_NAMES",
    "PAPER_RATIO",
    "STATE_DTYPE_BYTES",
    "Cost",
    "DistinctExperts",
    "Forward",
    "ForwardCost",
    "Machine",
    "Precision",
    "Prediction",
    "adaln_cost",
    "adaln_weights",
    "attention_cost",
    "attention_weights",
    "embedding_cost",
    "expert_weights",
    "forward_cost",
    "gib",
    "head_cost",
    "independent",
    "independent_distinct_experts",
    "layer_cost",
    "mamba_cost",
    "mamba_weights",
    "measured_distinct_experts",
    "mlp_cost",
    "moe_cost",
    "norm_cost",
    "predict",
    "prediction_grid",
    "router_parameters",
    "shared_expert_weights",
    "tower_parameters",
    "twotower_parameters",
    "twotower_weight_bytes",
]
