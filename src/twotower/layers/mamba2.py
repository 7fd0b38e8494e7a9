"""Mamba-2 mixer (SPEC.md section 2): in_proj -> causal depthwise conv -> selective SSM -> gated norm -> out_proj.

State flows visibly: `forward(x, state) -> (y, state)`. The mixer never writes a cache; the caller
(the context tower) decides whether the returned state is kept, and the denoiser simply drops it.

dt rule (SPEC pitfall 8): dt' = softplus(dt + dt_bias), then clamped to `config.time_step_limit`
in BOTH the chunked scan and the one-token step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronHConfig
from ..dtypes import DTYPES
from .linear import Linear
from .norm import GatedRMSNorm
from .ssd import ssd_all_states, ssd_chunked, ssd_one_chunk, ssd_step


@dataclass
class MambaState:
    """Per-layer Mamba-2 state: the last (kernel-1) pre-conv xBC vectors and the SSM state (kept in
    `config.mamba_ssm_cache_dtype`, float32 in the release; always scanned in float32)."""

    conv: torch.Tensor  # (b, conv_dim, kernel - 1)
    ssm: torch.Tensor  # (b, heads, head_dim, state_size), mamba_ssm_cache_dtype

    def clone(self) -> MambaState:
        return MambaState(self.conv.clone(), self.ssm.clone())

    def index_select(self, rows: torch.Tensor) -> MambaState:
        return MambaState(self.conv[rows], self.ssm[rows])


@dataclass
class MambaHistory:
    """The state at every position of one forward (for rolling back): the conv window (b, C, K-1+L)
    of pre-conv inputs, and the SSM state before and after each position (b, L+1, h, p, n)."""

    window: torch.Tensor
    ssm: torch.Tensor

    def state_after(self, keep: torch.Tensor) -> MambaState:
        """Per row r, the state after the first keep[r] positions of the forward (0 = before it)."""
        b, C, _ = self.window.shape
        k = self.window.shape[2] - (self.ssm.shape[1] - 1)  # kernel - 1
        keep = keep.to(self.window.device)
        idx = keep[:, None] + torch.arange(k, device=keep.device)[None]  # (b, k)
        conv = self.window.gather(2, idx[:, None, :].expand(b, C, k))
        return MambaState(conv, self.ssm[torch.arange(b, device=keep.device), keep])


SHORT_CONV = 64  # up to this many positions the causal conv is K shifted multiply-adds, not a conv1d call


def short_depthwise_conv(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv as K multiply-adds over a channels-last window: window (b, K-1+L, C),
    weight (C, K), bias (C,) -> (b, L, C) float32. Equals `F.conv1d(window.transpose(1, 2),
    weight[:, None], bias, groups=C).transpose(1, 2)` (the plain twin) with the sum accumulated in
    float32, so half-precision inputs round once, where the caller casts. Channels last, every term
    is a contiguous (L, C) slab of the window times a row of weights (no strided time slices)."""
    K = weight.shape[1]
    L = window.shape[1] - (K - 1)
    x, w = window.float(), weight.float().t()  # w (K, C)
    out = x[:, :L] * w[0]
    for k in range(1, K):
        out = out.addcmul_(x[:, k : k + L], w[k])  # autograd-safe: a product's output is not kept
    if bias is not None:
        out = out + bias.float()
    return out


class Mamba2Mixer(nn.Module):
    """Selective SSM mixer. Parameter names match the checkpoint keys (`in_proj`, `conv1d`, `dt_bias`, ...)."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.ssm_dtype = DTYPES[config.mamba_ssm_cache_dtype]  # the SSM state's kept dtype (fp32 in the release)
        self.d_inner = config.mamba_d_inner
        self.conv_dim = config.mamba_conv_dim
        self.kernel = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.dt_limit = config.time_step_limit
        self.in_proj = Linear(config.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=config.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = Linear(self.d_inner, config.hidden_size, bias=config.use_bias)
        self._init_ssm(config)

    @torch.no_grad()
    def _init_ssm(self, config: NemotronHConfig) -> None:
        """Mamba-2's standard init (A = 1..H, D = 1, dt log-uniform in [dt_min, dt_max])."""
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(self.num_heads) * (hi - lo) + lo).clamp(min=config.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def empty_state(self, batch: int, *, device: torch.device, dtype: torch.dtype) -> MambaState:
        """A zero state, allocated by the layer that owns it."""
        conv = torch.zeros(batch, self.conv_dim, self.kernel - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.num_heads, self.head_dim, self.state_size, device=device, dtype=self.ssm_dtype)
        return MambaState(conv, ssm)

    # ---- pieces ---------------------------------------------------------------------------------
    def _conv(self, xbc: torch.Tensor, conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv over time. xbc (b, L, C) -> (silu(conv) (b, L, C), the whole input
        window (b, C, K-1+L): its last K-1 columns are the new conv state)."""
        b, L, _ = xbc.shape
        if conv_state is None:
            conv_state = xbc.new_zeros(b, self.conv_dim, self.kernel - 1)
        w = self.conv1d.weight
        if 1 < L <= SHORT_CONV:  # a block: K shifted multiply-adds, channels last, beat a conv1d call
            window = torch.cat([conv_state.to(xbc.dtype).transpose(1, 2), xbc], dim=1)  # (b, K-1+L, C)
            out = short_depthwise_conv(window.to(w.dtype), w[:, 0], self.conv1d.bias)  # (b, L, C)
            return F.silu(out).to(xbc.dtype), window.transpose(1, 2)
        xt = xbc.transpose(1, 2)  # (b, C, L)
        window = torch.cat([conv_state.to(xt.dtype), xt], dim=-1)  # (b, C, K-1+L)
        # Every path sums in float32 and applies silu before the one rounding to the model dtype, as
        # the block path (and the release's CUDA conv kernel) does, so steps and blocks agree.
        bias = self.conv1d.bias.float() if self.conv1d.bias is not None else None
        if L == 1:  # decode step: a multiply-sum is ~10x cheaper than a conv1d call for one position
            out = (window.float() * w[:, 0].float()).sum(-1, keepdim=True)
            out = out + bias[:, None] if bias is not None else out
        else:
            out = F.conv1d(window.float(), w.float(), bias, groups=self.conv_dim)  # (b, C, L)
        return F.silu(out).transpose(1, 2).to(xbc.dtype), window

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit == (0.0, float("inf")):  # the released limit: softplus is already > 0
            return dt
        return dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])

    # ---- forward --------------------------------------------------------------------------------
    def forward(
        self,
        hidden: torch.Tensor,
        state: MambaState | None = None,
        *,
        mask: torch.Tensor | None = None,
        history: list | None = None,
        final_state: bool = True,
    ) -> tuple[torch.Tensor, MambaState | None]:
        """Mix a sequence, starting from `state` (zeros when None).

        hidden (b, L, hidden_size); mask (b, L) bool, False at padding: padding contributes nothing
        (its input is zeroed and its dt' is 0, so the SSM state passes through unchanged).
        Returns y (b, L, hidden_size) and the state after the last position. When a list is given
        as `history`, a MambaHistory (the state after every position) is appended to it.
        `final_state=False`: the caller discards the returned state (the denoiser): None is returned,
        and a block scan does not compute it (a one-token step still does, on its way to y).
        """
        b, L, _ = hidden.shape
        if mask is not None:
            hidden = hidden * mask[..., None].to(hidden.dtype)
        z, xbc, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        xbc, conv_window = self._conv(xbc, state.conv if state is not None else None)
        conv_state = conv_window[:, :, -(self.kernel - 1) :]
        dt = self._dt(dt)  # (b, L, h)
        if mask is not None:
            xbc = xbc * mask[..., None].to(xbc.dtype)
            dt = dt * mask[..., None]
        x, B, C = xbc.split([self.d_inner, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1)
        x = x.reshape(b, L, self.num_heads, self.head_dim)
        B = B.reshape(b, L, self.n_groups, self.state_size)
        C = C.reshape(b, L, self.n_groups, self.state_size)
        A = -torch.exp(self.A_log.float())
        ssm0 = state.ssm.float() if state is not None else None  # kept in ssm_dtype, scanned in fp32
        if L == 1 and ssm0 is not None and history is None:
            y, ssm = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm0)  # groups broadcast, no copies
            y = y[:, None]
        elif L <= self.chunk_size and history is None:  # a block: one chunk, groups never copied to heads
            y, ssm = ssd_one_chunk(x, dt, A, B, C, state=ssm0, final=final_state)
        else:
            heads_per_group = self.num_heads // self.n_groups
            B = B.repeat_interleave(heads_per_group, dim=2)
            C = C.repeat_interleave(heads_per_group, dim=2)
            y, ssm = ssd_chunked(x, dt, A, B, C, chunk_size=self.chunk_size, state=ssm0, final=final_state)
        if history is not None:
            start = ssm0 if ssm0 is not None else x.new_zeros(b, self.num_heads, self.head_dim, self.state_size)
            states = ssd_all_states(x, dt, A, B, state=ssm0)
            history.append(MambaHistory(conv_window, torch.cat([start.float()[:, None], states], 1)))
        y = y + x.float() * self.D.float()[:, None]
        y = self.norm(y.reshape(b, L, self.d_inner), z.float())
        if not final_state:
            return self.out_proj(y.to(hidden.dtype)), None
        # Returned states must not keep larger tensors alive: the conv state is a slice of the whole
        # (K-1+L)-column window, and a multi-chunk scan's final state a view of every chunk's state.
        # Copy only those (a one-chunk scan, e.g. a 16-token block, already returns a fresh state).
        if L > 1:  # a fresh, contiguous (b, C, K-1) copy, whatever the window's layout
            conv_state = conv_state.clone(memory_format=torch.contiguous_format)
        # (Under torch.compile the fixed-shape steps write their states into buffers: no views survive.)
        if not torch.compiler.is_compiling() and ssm.untyped_storage().nbytes() > ssm.nbytes:
            ssm = ssm.clone()
        return self.out_proj(y.to(hidden.dtype)), MambaState(conv_state, ssm.to(self.ssm_dtype))
