"""The memory plan's arithmetic, pinned to what the library builds and allocates (meta-device models,
real caches) and to the release's tensor list; the 30B facts of SPEC 5.1; device parsing and the
device_map="auto" rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import perturbed_twotower, tiny_config
from twotower import device_plan as dp
from twotower import memory_plan as mp
from twotower.backbone import NemotronHModel
from twotower.config import NemotronHConfig, preset
from twotower.context import DenoiserContext
from twotower.loading import bundled_model_path
from twotower.model import TwoTowerForCausalLM

REFERENCE = Path(__file__).resolve().parent / "data" / "release"  # the release's files, copied into the repo
NANO = "nemotron-3-nano-30b-a3b"
MiB = 2**20


def part_of(name: str, kinds: tuple[str, ...]) -> tuple[str, str]:
    """(tower, part) of a TwoTower parameter name, by the checkpoint's naming (SPEC 3.1)."""
    tower = "context" if name.startswith(("context_tower.", "context_lm_head.")) else "denoiser"
    if name.startswith(("t_embedder.", "t_block.", "scale_shift_tables.")):
        return tower, "adaln"
    if "lm_head" in name:
        return tower, "heads"
    if ".embeddings." in name:
        return tower, "embeddings"
    if name.endswith("norm_f.weight") or (".norm." in name and ".mixer." not in name):
        return tower, "norms"
    if ".shared_experts." in name:
        return tower, "shared_experts"
    if ".experts." in name:
        return tower, "routed_experts"
    if ".gate." in name:
        return tower, "router_bias" if name.endswith("e_score_correction_bias") else "router"
    layer = int(name.split(".layers.")[1].split(".")[0])
    return tower, {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp"}[kinds[layer]]


def counts_of_model(config: NemotronHConfig) -> dict[str, dict[str, int]]:
    with torch.device("meta"):
        model = TwoTowerForCausalLM(config)
    out = {"context": {}, "denoiser": {}}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        tower, part = part_of(name, config.layers_block_type)
        out[tower][part] = out[tower].get(part, 0) + t.numel()
    return out


CONFIGS = {
    "tiny preset": lambda: preset("tiny"),
    "30B preset": lambda: preset(NANO),
    "every bias and a dense MLP": lambda: tiny_config(
        "M*E-M", attention_bias=True, mlp_bias=True, use_bias=True, use_conv_bias=False
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_counts_per_part_equal_a_meta_model(name):
    config = CONFIGS[name]()
    built = counts_of_model(config)
    counts = mp.count_parameters(config)
    for tower in ("context", "denoiser"):
        mine = {k: v for k, v in mp._record(getattr(counts, tower)).items() if v}
        assert mine == built[tower], tower
    with torch.device("meta"):
        model = TwoTowerForCausalLM(config)
    assert counts.total.parameters == sum(p.numel() for p in model.parameters())
    assert counts.total.router_bias == sum(b.numel() for b in model.buffers())


def test_counts_equal_the_released_tensor_list():
    released = json.loads((REFERENCE / "released_keys.json").read_text())
    config = NemotronHConfig.from_dict(json.loads((REFERENCE / "released_config.json").read_text()))
    counts = mp.count_parameters(config)
    assert counts.total.tensors == released["num_parameters"] == 63_185_902_848
    assert counts == mp.count_parameters(preset(NANO))
    per_tower = {"context": 0, "denoiser": 0}
    for name, entry in released["tensors"].items():
        per_tower["context" if name.startswith(("context_tower.", "context_lm_head.")) else "denoiser"] += math.prod(
            entry["shape"]
        )
    assert per_tower == {"context": counts.context.tensors, "denoiser": counts.denoiser.tensors}


def test_30b_weight_facts():
    config = preset(NANO)
    counts = mp.count_parameters(config).total
    bf16 = mp.tower_bytes(config, dtype=torch.bfloat16)
    assert round(counts.tensors / 1e9, 2) == 63.19
    assert bf16.total / mp.GiB == pytest.approx(117.7, abs=0.05)  # SPEC 5.1
    assert mp.tower_bytes(config, dtype=torch.float32).total / mp.GiB == pytest.approx(235.4, abs=0.05)
    assert bf16.context / mp.GiB == pytest.approx(58.8, abs=0.1)  # "~59 GB per GPU across two GPUs"
    assert counts.routed_experts / counts.parameters == pytest.approx(0.93, abs=0.005)  # "experts are 93%"
    # SPEC's "~63 GiB" is int8 ROUTED experts only (63.0 GiB); quantising the shared experts too saves
    # another 0.85 GiB: 62.2 GiB for both towers.
    int8 = mp.tower_bytes(config, dtype=torch.bfloat16, quantize="int8-experts")
    assert int8.total / mp.GiB == pytest.approx(62.22, abs=0.01)


def test_weight_bytes_equal_a_loaded_model():
    """The bundled model loaded in bf16: every parameter and buffer's bytes (router bias kept fp32)."""
    model = TwoTowerForCausalLM.from_pretrained(bundled_model_path(), dtype=torch.bfloat16)
    planned = mp.tower_bytes(model.config, dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert planned.total == sum(t.nbytes for t in tensors)
    assert planned.context == sum(
        t.nbytes for t in [*model.context_tower.state_dict().values(), model.context_lm_head.weight]
    )


def test_int8_expert_bytes_from_the_weights_shapes():
    """One byte per expert weight + one float32 scale per output channel (biases kept in the model
    dtype), computed here from the meta model's expert tensors."""
    config = tiny_config("ME*E", mlp_bias=True)
    with torch.device("meta"):
        tower = NemotronHModel(config)
    expect = 0
    for name, p in tower.named_parameters():
        if ".experts." in name:  # fused (E, out, in)
            expect += p.numel() + p.numel() // p.shape[-1] * 4
        elif ".shared_experts." in name:
            expect += p.numel() * 2 if name.endswith("bias") else p.numel() + p.shape[0] * 4
    assert mp.expert_bytes(config, dtype=torch.bfloat16, quantize="int8-experts") == expect
    counts = mp.tower_counts(config, denoiser=False)
    assert mp.expert_bytes(config, dtype=torch.float16) == counts.experts * 2
    with pytest.raises(ValueError, match="int4"):
        mp.expert_bytes(config, dtype=torch.float16, quantize="int4")


@pytest.mark.parametrize("ssm_dtype", ["float32", "bfloat16"])
def test_cache_bytes_equal_an_allocated_cache(ssm_dtype):
    config = tiny_config("M*EM*", mamba_ssm_cache_dtype=ssm_dtype)
    body = NemotronHModel(config).to(torch.bfloat16)
    batch, length = 3, 37
    cache = body.empty_cache(batch, capacity=length)
    states = [t for st in cache.layers if st is not None for t in vars(st).values()]
    allocated = sum(t.nbytes for t in states) + cache.valid.nbytes
    assert allocated == batch * mp.cache_bytes(config, dtype=torch.bfloat16).per_sequence(length)


def test_30b_cache_facts():
    """SPEC 5.1: ~6 MiB of K/V per 1k tokens; "Mamba state ~23 MiB (bf16; 46 MiB fp32)" is the SSM
    state alone: the release keeps it in fp32 (46.0 MiB) and the conv state adds 0.8 MiB."""
    config = preset(NANO)
    cache = mp.cache_bytes(config, dtype=torch.bfloat16)
    assert cache.kv_per_token * 1024 == 6 * MiB
    assert mp.ssm_cache_dtype(config) == torch.float32
    assert cache.ssm_state == 46 * MiB
    assert cache.conv_state / MiB == pytest.approx(0.81, abs=0.01)
    assert cache.mamba_state / MiB == pytest.approx(46.8, abs=0.01)
    bf16_state = mp.cache_bytes(config.replace(mamba_ssm_cache_dtype="bfloat16"), dtype=torch.bfloat16)
    assert bf16_state.ssm_state == 23 * MiB


@pytest.mark.parametrize("ssm_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("length", [5, 8, 19, 40])
def test_retained_workspace_is_what_a_prefill_leaves_alive(length, ssm_dtype):
    """`workspace.retained` (zero): after a prefill the Mamba states hold exactly their nominal
    bytes, not views that keep the whole conv window and the chunk-boundary SSM states alive."""
    config = tiny_config("M*M", mamba_ssm_cache_dtype=ssm_dtype)
    torch.manual_seed(0)
    body = NemotronHModel(config).eval()
    batch = 2
    cache = body.empty_cache(batch, capacity=length)
    with torch.no_grad():
        body(torch.randint(0, config.vocab_size, (batch, length)), cache=cache)
    mamba = [st for st in cache.layers if st is not None and hasattr(st, "ssm")]
    held = sum(st.conv.untyped_storage().nbytes() + st.ssm.untyped_storage().nbytes() for st in mamba)
    nominal = mp.cache_bytes(config, dtype=torch.float32).mamba_state * batch
    workspace = mp.workspace_bytes(config, dtype=torch.float32, max_len=length, block_size=4)
    assert held - nominal == batch * workspace.retained == 0


def test_denoiser_copies_equal_what_the_context_view_moves():
    """When the towers are split, `DenoiserContext.to` copies the past K/V and Mamba states of every
    row, and the [past ; block] buffers add a K/V copy: the plan's `copies` for the denoiser device."""
    config = tiny_config("M*EM*")
    torch.manual_seed(0)
    model = TwoTowerForCausalLM(config).eval()
    batch, length, block = 2, 11, 4
    cache = model.empty_cache(batch, capacity=length)
    with torch.no_grad():
        model.extend_context(torch.randint(0, config.vocab_size, (batch, length)), cache)
    moved = DenoiserContext.from_cache(cache).to(torch.device("meta"))
    copied = (
        sum(t.nbytes for kv in moved.kv if kv for t in kv)
        + sum(t.nbytes for s in moved.mamba if s for t in (s.conv, s.ssm))
        + moved.key_valid.nbytes
    )
    with torch.no_grad():
        joined = 0
        for i, kv in enumerate(moved.kv):
            if kv is not None:
                k = torch.zeros(batch, config.num_key_value_heads, block, config.head_dim, device="meta")
                joined += sum(t.nbytes for t in moved.keys_values(i, k, k))
    common = dict(dtype="float32", batch=batch, max_len=length, block_size=block)
    device = dp.DeviceSpec("cuda:1", 2**40)
    assert dp.device_use(config, device, holds=dp.DENOISER, **common).copies * batch == copied + joined
    assert dp.device_use(config, device, holds=dp.BOTH, **common).copies * batch == joined  # no `.to` copy
    assert dp.device_use(config, device, holds=dp.CONTEXT, **common).copies == 0


# ---- devices ----------------------------------------------------------------------------------------------
def test_parse_devices():
    specs = dp.parse_devices("cuda:1=141GB, h200 ,cpu=1.5TiB,h100-80gb,mps=512MiB")
    assert [s.name for s in specs] == ["cuda:1", "cuda:0", "cpu", "cuda:2", "mps"]
    assert [s.capacity for s in specs] == [
        141 * 10**9,
        dp.KNOWN_GPUS["h200"],
        int(1.5 * 2**40),
        dp.KNOWN_GPUS["h100-80gb"],
        512 * MiB,
    ]
    assert dp.parse_devices("cuda:3=a100-80gb")[0].capacity == dp.KNOWN_GPUS["a100-80gb"]
    assert 139 * mp.GiB < dp.KNOWN_GPUS["h200"] < 140 * mp.GiB


@pytest.mark.parametrize(
    "text, message",
    [
        ("cuda:0=80", "unit"),
        ("cuda:0=80XB", "unit"),
        ("cpu", "NAME=SIZE"),
        ("b200", "NAME=SIZE"),
        ("cuda:0=1GB,cuda:0=2GB", "twice"),
        ("not a device=1GB", "torch device"),
        ("", "NAME=SIZE"),
        ("cpu=80GB,cpu:0=80GB", "names a device twice: cpu"),  # one device under two names
        ("cuda=80GB,cuda:0=80GB", "names a device twice: cuda:0"),
        ("cuda:0=0GB", "capacity above 0"),
        ("meta=1TB", "meta device holds no memory"),
    ],
)
def test_parse_devices_errors(text, message):
    with pytest.raises(ValueError, match=message):
        dp.parse_devices(text)


# ---- placement --------------------------------------------------------------------------------------------
def plan30(devices, *, batch=1, max_len=4096, quantize="none"):
    return dp.plan_device_map(
        preset(NANO), dtype="bfloat16", devices=devices, batch=batch, max_len=max_len, quantize=quantize
    )


def test_30b_fits_one_h200_with_about_20_gib_for_state():
    p = plan30("h200")
    assert p.fits and not p.split and p.context_device == p.denoiser_device == "cuda:0"
    (use,) = p.uses
    assert use.holds == dp.BOTH
    assert 20 * mp.GiB < use.left_for_state < 22 * mp.GiB  # after the weights and the 1 GiB reserve
    assert 0 < use.headroom < use.left_for_state
    assert use.needed == use.reserve + use.weights + use.router_copies + use.batch * use.per_row


def test_router_copies_are_what_a_frozen_model_keeps():
    """`router_copy_bytes` per tower == the float64 router weights a frozen model holds after a
    forward (`TopkRouter.weight64`); at 30B 2 x 23 layers x 128 x 2688 x 8 bytes (~121 MiB), counted
    by the device plan for the towers each device holds."""
    from twotower.layers.moe import TopkRouter

    model = perturbed_twotower("M*EME").requires_grad_(False)
    cache = model.empty_cache(1, capacity=24)
    with torch.no_grad():
        model.extend_context(torch.tensor([[5, 6, 7, 8]]), cache)
        model.denoise(torch.tensor([[9, 10, 11, 12]]), torch.tensor([0.5]), DenoiserContext.from_cache(cache))
    kept = {"context": 0, "denoiser": 0}
    for name, module in model.named_modules():
        if isinstance(module, TopkRouter):
            assert module._weight64 is not None, name
            kept["context" if name.startswith("context_tower.") else "denoiser"] += module._weight64[2].nbytes
    routers = mp.router_copy_bytes(model.config)
    assert kept["context"] > 0 and (routers.context, routers.denoiser) == (kept["context"], kept["denoiser"])
    config = preset(NANO)
    assert mp.router_copy_bytes(config).total == 2 * 23 * 128 * 2688 * 8
    (both,) = plan30("h200").uses
    assert both.router_copies == mp.router_copy_bytes(config).total and both.fixed == both.needed - both.per_row
    ctx, den = plan30("h100-80gb,h100-80gb").uses
    assert (ctx.router_copies, den.router_copies) == (mp.router_copy_bytes(config).context,) * 2


def test_30b_on_80gb_h100s_needs_two_or_int8_experts():
    alone = plan30("h100-80gb")
    assert not alone.fits and alone.context_device is None
    assert "second device" in alone.reason and "79.1 GiB" in alone.reason
    two = plan30("h100-80gb,h100-80gb")
    assert two.fits and two.split and (two.context_device, two.denoiser_device) == ("cuda:0", "cuda:1")
    ctx, den = two.uses
    assert (ctx.holds, den.holds) == (dp.CONTEXT, dp.DENOISER)
    assert ctx.cache > 0 and den.cache == 0 and den.copies > 0
    int8 = plan30("h100-80gb", quantize="int8-experts")
    assert int8.fits and not int8.split


def test_auto_keeps_the_order_given_and_says_why_nothing_fits():
    p = plan30("cuda:0=40GB,cuda:1=h200")
    assert p.fits and p.context_device == "cuda:1"
    nothing = plan30("cuda:0=40GB,cuda:1=40GB")
    assert not nothing.fits and "no two devices" in nothing.reason and len(nothing.uses) == 2
    with pytest.raises(ValueError, match="at least one device"):
        dp.plan_device_map(preset("tiny"), dtype="float32", devices=(), batch=1, max_len=8)
    with pytest.raises(ValueError, match="batch"):
        plan30("h200", batch=0)


def test_max_batch_is_the_largest_batch_that_fits():
    use = plan30("h200").uses[0]
    assert plan30("h200", batch=use.max_batch).fits
    assert not plan30("h200", batch=use.max_batch + 1).uses[0].fits
    assert not plan30("h200", batch=use.max_batch + 1).split  # a pair is only tried with two devices


def test_memory_plan_report_is_json_serialisable():
    plan = dp.memory_plan(preset("tiny"), dtype="float32", max_len=64)
    data = json.loads(json.dumps(plan.as_dict()))
    assert [w["dtype"] for w in data["weights"]] == ["float32", "bfloat16", "float16", "float32", "float32"]
    assert [w["quantize"] for w in data["weights"][-2:]] == ["int8-experts", "fp8-experts"]
    assert set(data["placements"]) == {f"2 x {gpu}" for gpu in dp.KNOWN_GPUS}
    assert data["parameters"]["total"]["parameters"] == mp.count_parameters(preset("tiny")).total.parameters


def test_int8_experts_count_the_copy_one_forward_makes():
    """`int8_grouped_linear` gathers the touched experts' int8 rows and converts them: at 30B, all 128
    experts of one projection, 1 + 2 bytes per weight in bf16 (~1.78 GiB), nothing without int8."""
    import torch

    config = preset("nemotron-3-nano-30b-a3b")
    per_weight = config.n_routed_experts * config.moe_intermediate_size * config.hidden_size
    assert dp.expert_copy_bytes(config, dtype=torch.bfloat16, quantize="int8-experts") == 3 * per_weight
    assert dp.expert_copy_bytes(config, dtype=torch.float16, quantize="int8-experts") == 5 * per_weight
    assert dp.expert_copy_bytes(config, dtype=torch.bfloat16, quantize="none") == 0
    assert 1.7 * mp.GiB < 3 * per_weight < 1.8 * mp.GiB
    base = dp.device_use(config, dp.DeviceSpec("cuda:0", 80 * 10**9), holds=dp.BOTH, dtype="bfloat16", batch=1,
                         max_len=512, quantize="int8-experts")  # fmt: skip
    assert base.expert_copies == 3 * per_weight and base.needed > base.reserve + base.weights + base.per_row
