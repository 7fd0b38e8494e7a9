"""The TwoTower model (SPEC 3): AR and mock-AR parity with the backbone, a read-only context cache,
the denoiser's block forward against a slow reference written here, adaLN, freezing and devices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests import conftest
from tests.conftest import randomise_special_params, tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.conditioning import timestep_sinusoid
from twotower.context import DenoiserContext
from twotower.decode.diffusion import DiffusionSettings, denoise_block
from twotower.layers.attention import AttentionState
from twotower.layers.mamba2 import MambaState
from twotower.model import TwoTowerForCausalLM

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33, 34]]


def make_backbone(pattern: str = "M*E-", seed: int = 0) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(tiny_config(pattern)).eval()
    randomise_special_params(model, seed=seed)
    return model


def perturbed_twotower(pattern: str = "M*E-", seed: int = 0) -> TwoTowerForCausalLM:
    return conftest.perturbed_twotower(pattern, seed=seed, sharpness=4.0)


def prefilled_cache(model: TwoTowerForCausalLM, prompts: list[list[int]], *, extra: int = 8):
    """The context cache after left-padded prompts (so key validity has padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = True
    cache = model.empty_cache(len(prompts), capacity=width + extra)
    model.extend_context(ids, cache, mask=None if bool(mask.all()) else mask)
    return cache


# ---- AR and mock-AR ------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.3, "seed": 4}])
def test_ar_mode_equals_backbone_generate(sampling):
    backbone = make_backbone()
    model = perturbed_twotower()  # perturbing the denoiser must not touch AR mode
    model.context_tower.load_state_dict(backbone.backbone.state_dict())
    model.context_lm_head.load_state_dict(backbone.lm_head.state_dict())
    ours = model.generate_ar(PROMPTS, max_new_tokens=12, **sampling)
    ref = backbone.generate(PROMPTS, max_new_tokens=12, **sampling)
    assert ours.new_tokens == ref.new_tokens
    assert torch.equal(ours.sequences, ref.sequences)
    assert len(set(map(tuple, ours.new_tokens))) > 1  # not a degenerate constant output


def test_mock_ar_equals_ar_token_for_token_batched():
    model = TwoTowerForCausalLM.from_backbone(make_backbone()).eval()
    ar = model.generate_ar(PROMPTS, max_new_tokens=10)
    mock = model.generate_mock_ar(PROMPTS, max_new_tokens=10)
    assert mock.new_tokens == ar.new_tokens
    assert torch.equal(mock.sequences, ar.sequences)
    for i, p in enumerate(PROMPTS):  # and each row alone
        assert model.generate_mock_ar([p], max_new_tokens=10).new_tokens[0] == ar.new_tokens[i]


@torch.no_grad()
def test_mock_ar_is_the_denoiser_on_the_last_token_without_time():
    """SPEC 3.4: the denoiser sees the last committed token with the cache from BEFORE it, no t."""
    model = perturbed_twotower()
    prompt = [5, 6, 7, 8]
    got = model.generate_mock_ar([prompt], max_new_tokens=5).new_tokens[0]
    seq = list(prompt)
    for _ in range(5):
        context = DenoiserContext.from_cache(prefilled_cache(model, [seq[:-1]]))
        seq.append(int(model.denoise(torch.tensor([seq[-1:]]), None, context)[0, -1].argmax()))
    assert got == seq[len(prompt) :]
    assert got != model.generate_ar([prompt], max_new_tokens=5).new_tokens[0]  # the denoiser differs


# ---- the context cache is read-only for the denoiser ---------------------------------------------
def _cache_tensors(cache) -> list[torch.Tensor]:
    out = [cache.valid.clone(), torch.tensor(cache.length)]
    for st in cache.layers:
        if isinstance(st, AttentionState):
            out += [st.k.clone(), st.v.clone()]
        elif isinstance(st, MambaState):
            out += [st.conv.clone(), st.ssm.clone()]
    return out


@torch.no_grad()
def test_context_cache_is_bitwise_unchanged_by_denoising():
    model = perturbed_twotower("M*EM*-")
    cache = prefilled_cache(model, PROMPTS[:3])
    before = _cache_tensors(cache)
    assert any(t.abs().sum() > 0 for t in before[2:])  # the cache holds real state
    context = DenoiserContext.from_cache(cache)
    g = torch.Generator().manual_seed(0)
    for t in (1.0, 0.5, 0.0, 0.25):
        block = torch.randint(4, 96, (3, 6), generator=g)
        block[:, ::2] = model.mask_token_id
        model.denoise(block, torch.full((3,), t), context)
    settings = DiffusionSettings(block_size=6, steps_per_block=6, confidence_threshold=0.5)
    denoise_block(model, context, rows=3, size=6, settings=settings, mask_id=model.mask_token_id, generator=None)
    after = _cache_tensors(cache)
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


# ---- the denoiser's block forward against a slow, obviously-correct reference --------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _ref_modulation(model, t: torch.Tensor) -> torch.Tensor:
    """(b, 3H) output of t_block, computed by hand from SPEC 3.2."""
    k = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * k / 128)
    args = t.double()[:, None] * 1000.0 * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1).float()
    mlp = model.t_embedder.mlp
    h = F.silu(emb @ mlp[0].weight.T + mlp[0].bias) @ mlp[2].weight.T + mlp[2].bias
    lin = model.t_block[1]
    return F.silu(h) @ lin.weight.T + lin.bias


def _ref_mamba(mixer, config, u: torch.Tensor, conv0: torch.Tensor, ssm0: torch.Tensor) -> torch.Tensor:
    """One row: u (S, H), seed conv state (C, K-1) and SSM state (heads, head_dim, n) -> (S, H)."""
    nh, hd, n, ng = config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size, config.n_groups
    d_inner, K = nh * hd, config.conv_kernel
    zxbcdt = u @ mixer.in_proj.weight.T
    z, xbc, dt_raw = zxbcdt[:, :d_inner], zxbcdt[:, d_inner:-nh], zxbcdt[:, -nh:]
    history = [conv0[:, j] for j in range(K - 1)]  # the last K-1 pre-conv xBC vectors, oldest first
    w = mixer.conv1d.weight[:, 0, :]  # (C, K): w[:, K-1] multiplies the current token
    A = -torch.exp(mixer.A_log)
    state = ssm0.clone()
    ys = []
    for s in range(u.shape[0]):
        history.append(xbc[s])
        window = history[-K:]
        conv = sum(w[:, j] * window[j] for j in range(K)) + mixer.conv1d.bias
        conv = F.silu(conv)
        x = conv[:d_inner].view(nh, hd)
        B = conv[d_inner : d_inner + ng * n].view(ng, n)
        C = conv[d_inner + ng * n :].view(ng, n)
        dt = F.softplus(dt_raw[s] + mixer.dt_bias)
        y = torch.empty(nh, hd)
        for h in range(nh):
            grp = h // (nh // ng)
            state[h] = torch.exp(dt[h] * A[h]) * state[h] + dt[h] * torch.outer(x[h], B[grp])
            y[h] = state[h] @ C[grp] + mixer.D[h] * x[h]
        gated = (y.reshape(d_inner) * F.silu(z[s])).view(ng, d_inner // ng)
        normed = (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + config.layer_norm_epsilon)).reshape(-1)
        ys.append((normed * mixer.norm.weight) @ mixer.out_proj.weight.T)
    return torch.stack(ys)


def _ref_attention(mixer, config, u, past_k, past_v, past_valid) -> torch.Tensor:
    """One row: u (S, H); past K/V (kv_heads, T, d) with validity (T,). Bidirectional in the block."""
    nh, nkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = (u @ mixer.q_proj.weight.T).view(-1, nh, d)
    k = torch.cat([past_k.transpose(0, 1), (u @ mixer.k_proj.weight.T).view(-1, nkv, d)])  # (T+S, kv, d)
    v = torch.cat([past_v.transpose(0, 1), (u @ mixer.v_proj.weight.T).view(-1, nkv, d)])
    valid = torch.cat([past_valid, torch.ones(u.shape[0], dtype=torch.bool)])
    out = torch.empty(u.shape[0], nh, d)
    for h in range(nh):
        kv = h // (nh // nkv)  # GQA: query head h reads kv head h // group
        scores = (q[:, h] @ k[:, kv].T) / math.sqrt(d)  # (S, T+S)
        weights = torch.softmax(scores.masked_fill(~valid[None], float("-inf")), dim=-1)
        out[:, h] = weights @ v[:, kv]
    return out.reshape(u.shape[0], nh * d) @ mixer.o_proj.weight.T


def _ref_moe(mixer, config, u: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(u)
    for s in range(u.shape[0]):
        scores = torch.sigmoid(u[s].double() @ mixer.gate.weight.double().T)
        chosen = torch.topk(scores + mixer.gate.e_score_correction_bias.double(), config.num_experts_per_tok).indices
        weights = scores[chosen] / scores[chosen].sum() * config.routed_scaling_factor
        for e, wgt in zip(chosen.tolist(), weights.float()):
            hidden = F.relu(mixer.experts.up_proj[e] @ u[s]).square()
            out[s] += wgt * (mixer.experts.down_proj[e] @ hidden)
    shared = mixer.shared_experts
    return out + F.relu(u @ shared.up_proj.weight.T).square() @ shared.down_proj.weight.T


def reference_denoise(model, block_ids, t, cache) -> torch.Tensor:
    """SPEC 3.3, one row and one token at a time."""
    config, tower = model.config, model.denoiser_tower
    eps = config.layer_norm_epsilon
    mods = _ref_modulation(model, t).view(-1, 3, config.hidden_size)
    rows = []
    for r in range(block_ids.shape[0]):
        h = tower.embeddings.weight[block_ids[r]]
        for i, layer in enumerate(tower.layers):
            shift, scale, gate = model.scale_shift_tables[i] + mods[r]
            if layer.kind in ("linear_attention", "full_attention"):
                u = _rms(h * (1 + scale) + shift, layer.norm.weight, eps)  # modulate, then norm
            else:
                u = _rms(h, layer.norm.weight, eps) * (1 + scale) + shift  # norm, then modulate
            if layer.kind == "linear_attention":
                st = cache.layers[i]
                y = _ref_mamba(layer.mixer, config, u, st.conv[r], st.ssm[r])
            elif layer.kind == "full_attention":
                st = cache.layers[i]
                L = cache.length
                y = _ref_attention(layer.mixer, config, u, st.k[r, :, :L], st.v[r, :, :L], cache.valid[r, :L])
            elif layer.kind == "moe":
                y = _ref_moe(layer.mixer, config, u)
            else:
                y = F.relu(u @ layer.mixer.up_proj.weight.T).square() @ layer.mixer.down_proj.weight.T
            h = h + gate * y
        rows.append(_rms(h, tower.norm_f.weight, eps) @ model.lm_head.weight.T)
    return torch.stack(rows)


@torch.no_grad()
def test_denoise_matches_naive_reference():
    model = perturbed_twotower("M*EM-*E")
    assert model.config.time_step_limit == (0.0, math.inf)  # the reference applies no dt clamp
    cache = prefilled_cache(model, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [40, 41, 42]])
    block = torch.randint(4, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    block[0, [1, 3]] = model.mask_token_id
    block[1, :4] = model.mask_token_id
    t = torch.tensor([0.4, 0.8])
    ours = model.denoise(block, t, DenoiserContext.from_cache(cache))
    ref = reference_denoise(model, block, t, cache)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # Non-vacuous: t changes the output, and the Mamba seed matters.
    other_t = model.denoise(block, torch.tensor([0.9, 0.1]), DenoiserContext.from_cache(cache))
    assert (other_t - ours).abs().max() > 1e-2
    fresh = prefilled_cache(model, [[77], [78]])
    assert (model.denoise(block, t, DenoiserContext.from_cache(fresh)) - ours).abs().max() > 1e-2


# ---- adaLN ---------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("t", [None, 0.0, 0.3, 1.0])
def test_from_backbone_denoiser_equals_backbone_without_attention(t):
    """With no attention layer the block forward is causal, so any block size must match."""
    backbone = make_backbone("ME-M")
    model = TwoTowerForCausalLM.from_backbone(backbone).eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    block = torch.tensor([[11, 3, 13, 3, 15]])
    cache = prefilled_cache(model, prompt.tolist())
    t_row = None if t is None else torch.tensor([t])
    got = model.denoise(block, t_row, DenoiserContext.from_cache(cache))
    want = backbone(torch.cat([prompt, block], 1)).logits[:, prompt.shape[1] :]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the seeded block scan (5 tokens < chunk_size 8, SPEC pitfall 1) equals one-token steps
    for j in range(block.shape[1]):
        cache = prefilled_cache(model, torch.cat([prompt, block[:, :j]], 1).tolist())
        one = model.denoise(block[:, j : j + 1], t_row, DenoiserContext.from_cache(cache))
        torch.testing.assert_close(one[:, 0], got[:, j], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("t", [0.0, 0.6, 1.0])
def test_from_backbone_denoiser_equals_backbone_token_by_token(t):
    """With attention, a one-token block at each position equals the causal backbone there."""
    backbone = make_backbone("M*E-*")
    model = TwoTowerForCausalLM.from_backbone(backbone).eval()
    seq = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    want = backbone(seq).logits
    for j in range(3, seq.shape[1]):
        cache = prefilled_cache(model, seq[:, :j].tolist())
        got = model.denoise(seq[:, j : j + 1], torch.tensor([t]), DenoiserContext.from_cache(cache))
        torch.testing.assert_close(got[:, 0], want[:, j], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_in_block_attention_is_bidirectional():
    block = torch.tensor([[11, 12, 13, 14]])
    changed = block.clone()
    changed[0, -1] = 50
    for pattern, sees_future in (("M*E", True), ("ME-", False)):
        model = TwoTowerForCausalLM.from_backbone(make_backbone(pattern)).eval()
        context = DenoiserContext.from_cache(prefilled_cache(model, [[5, 6, 7]]))
        a = model.denoise(block, torch.tensor([0.5]), context)[0, 0]
        b = model.denoise(changed, torch.tensor([0.5]), context)[0, 0]
        assert bool((a - b).abs().max() > 1e-4) == sees_future, pattern


def test_timestep_sinusoid_cosine_first_then_sine():
    t = torch.tensor([0.001, 0.25])  # t*1000 = 1 and 250
    emb = timestep_sinusoid(t)
    assert emb.shape == (2, 256)
    f1 = math.exp(-math.log(10000.0) / 128)
    f100 = math.exp(-math.log(10000.0) * 100 / 128)
    expected = {
        (0, 0): math.cos(1.0),
        (0, 128): math.sin(1.0),
        (0, 1): math.cos(f1),
        (0, 129): math.sin(f1),
        (1, 0): math.cos(250.0),
        (1, 128): math.sin(250.0),
        (1, 100): math.cos(250.0 * f100),
        (1, 228): math.sin(250.0 * f100),
    }
    for (r, c), value in expected.items():
        assert emb[r, c].item() == pytest.approx(value, abs=1e-4), (r, c)
    assert torch.equal(timestep_sinusoid(torch.zeros(1)), torch.cat([torch.ones(1, 128), torch.zeros(1, 128)], 1))


def test_from_backbone_adaln_is_identity_init():
    model = TwoTowerForCausalLM.from_backbone(make_backbone())
    assert torch.equal(model.t_block[1].weight, torch.zeros_like(model.t_block[1].weight))
    assert torch.equal(model.t_block[1].bias, torch.zeros_like(model.t_block[1].bias))
    for table in model.scale_shift_tables:
        assert torch.equal(table, torch.tensor([0.0, 0.0, 1.0])[:, None].expand(3, model.config.hidden_size))


# ---- freezing and devices ------------------------------------------------------------------------
def test_context_tower_is_frozen_and_denoiser_trains():
    frozen_backbone = make_backbone().requires_grad_(False)  # the denoiser must train even so
    for model in (TwoTowerForCausalLM(tiny_config()), TwoTowerForCausalLM.from_backbone(frozen_backbone)):
        frozen = [*model.context_tower.parameters(), *model.context_lm_head.parameters()]
        assert frozen and not any(p.requires_grad for p in frozen)
        trained = model.denoiser_parameters()
        assert trained and all(p.requires_grad for p in trained)
        frozen_ids = {id(p) for p in frozen}
        assert not any(id(p) in frozen_ids for p in trained)
        # every parameter is in exactly one of the two sets
        assert len(frozen) + len(trained) == len(list(model.parameters()))
        named = dict(model.named_parameters())
        assert any(n.startswith("scale_shift_tables") for n in named)
        trained_ids = {id(p) for p in trained}
        assert all(id(named[n]) in trained_ids for n in named if n.startswith(("t_block", "t_embedder", "lm_head")))


def test_place_towers_on_cpu_keeps_generation():
    model = perturbed_twotower()
    before = model.generate_mask_diffusion(PROMPTS, max_new_tokens=8, block_size=4, confidence_threshold=0.3)
    before_ar = model.generate_ar(PROMPTS, max_new_tokens=6)
    cpu = torch.device("cpu")
    assert model.place_towers_on_devices(cpu, cpu) is model
    assert model.context_device == cpu and model.denoiser_device == cpu
    after = model.generate_mask_diffusion(PROMPTS, max_new_tokens=8, block_size=4, confidence_threshold=0.3)
    assert after.new_tokens == before.new_tokens
    assert model.generate_ar(PROMPTS, max_new_tokens=6).new_tokens == before_ar.new_tokens
    assert model.generate_mock_ar(PROMPTS, max_new_tokens=6).stats["nfe"] == 6
