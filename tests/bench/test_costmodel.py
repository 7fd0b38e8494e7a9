"""The cost model's arithmetic, checked independently: bytes and FLOPs written out by hand for a tiny
config, parameter counts against real modules and the release's tensor list, D(n), SPEC 5.1's table,
and the CLI's table, JSON and plot; then the calibrated CPU model: its arithmetic on a given machine
description, the operator trace it charges (against the analytic weights), the microbenchmarks."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from twotower.bench import costmodel as cm
from twotower.bench import costmodel_cpu as ccpu
from twotower.bench.cpu_probes import Flusher, measure_cpu
from twotower.bench.optrace import OTHER, PartTracer
from twotower.bench.random_model import part_modules, random_twotower
from twotower.config import PATTERN_TO_TYPE, NemotronHConfig, preset
from twotower.layers.attention import Attention
from twotower.layers.mamba2 import Mamba2Mixer
from twotower.layers.moe import MoE
from twotower.model import TwoTowerForCausalLM

REPO = Path(__file__).resolve().parents[2]
RELEASE_KEYS = REPO / "tests" / "data" / "release" / "released_keys.json"
SPEC_TABLE = {  # SPEC 5.1: predicted diffusion/AR on an H100, bf16, bandwidth-bound
    1: (0.33, 0.51, 0.70),
    8: (0.65, 1.00, 1.39),
    32: (1.44, 2.22, 3.09),
    128: (1.85, 2.83, 3.93),
}


def hand_config() -> NemotronHConfig:
    """Small enough to count by hand: H 8, V 10, one M, one *, one E."""
    return NemotronHConfig(
        vocab_size=10,
        hidden_size=8,
        layers_block_type=tuple(PATTERN_TO_TYPE[c] for c in "M*E"),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        mamba_num_heads=2,
        mamba_head_dim=4,
        ssm_state_size=2,
        n_groups=1,
        conv_kernel=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=3,
        moe_shared_expert_intermediate_size=5,
        eos_token_id=2,
    )


# weights 2 bytes, router 4, SSM state 4, conv state 2, K/V 2
HAND_PRECISION = cm.Precision(weight=2, router=4, ssm_state=4, conv_state=2, kv=2)


def test_ar_step_bytes_and_flops_by_hand():
    cost = cm.forward_cost(hand_config(), cm.Forward("ar_step", batch=2, tokens=1, context=3), precision=HAND_PRECISION)
    # Mamba: in_proj 8*(8+12+2)=176, conv 12*4+12=60, dt_bias/A_log/D 6, norm 8, out_proj 64 -> 314 params
    #   = 628 B; state per row: ssm 2*4*2*4 B = 64, conv 12*3*2 B = 72; read + written, 2 rows -> 544; pre-norm 16
    assert cost.parts["mamba"].bytes == 628 + 544 + 16
    # attention: q/k/v 8*(8+4+4) + o 8*8 = 192 params = 384 B; K/V 16 B per position: read 2 rows x 3, write 2
    assert cost.parts["attention"].bytes == 384 + 2 * 3 * 16 + 2 * 16 + 16
    # MoE: gate 4*8*4 B + bias 4*4 B; D(2) = 4 (1 - 0.5^2) = 3 experts x 48 params x 2 B; shared 80 params x 2 B
    assert cost.parts["moe"].bytes == pytest.approx(128 + 16 + 3 * 96 + 160 + 16)
    assert cost.parts["head"].bytes == (10 * 8 + 8) * 2
    assert cost.parts["other"].bytes == 2 * 8 * 2  # two embedding rows
    assert cost.total.bytes == pytest.approx(2532)
    # FLOPs per token: Mamba 2*(176+64) + conv 2*12*4 + scan 5*2*4*2 = 656; attention 2*192 + 4*8*(3+1) = 512;
    # MoE 2*(4*8 + 2*48 + 80) = 416; head 2*10*8 = 160 per row
    assert cost.parts["mamba"].flops == 2 * 656
    assert cost.parts["attention"].flops == 2 * 512
    assert cost.parts["moe"].flops == 2 * 416
    assert cost.parts["head"].flops == 2 * 160
    assert cost.total.flops == 3488


def test_denoise_reads_states_only_and_pays_for_adaln():
    cost = cm.forward_cost(hand_config(), cm.Forward("denoise", batch=1, tokens=4, context=3), precision=HAND_PRECISION)
    assert cost.parts["mamba"].bytes == 628 + 136 + 16  # the seed read, nothing written back
    assert cost.parts["attention"].bytes == 384 + 3 * 16 + 16  # past K/V read, the block's own never cached
    assert cost.parts["moe"].bytes == pytest.approx(144 + 3.75 * 96 + 160 + 16)  # D(4) = 4 (1 - 0.5^4)
    # embeddings 4 rows; t_embedder 256*8+8 + 8*8+8, t_block 3*64+24 -> 2344 params; tables 3 layers x 3 x 8
    assert cost.parts["other"].bytes == 4 * 8 * 2 + (2344 + 72) * 2
    assert cost.total.bytes == pytest.approx(6980)


def test_commit_has_no_head_and_verify_has_one_per_position():
    config = hand_config()
    commit = cm.forward_cost(config, cm.Forward("commit", 2, 4), precision=HAND_PRECISION)
    verify = cm.forward_cost(config, cm.Forward("verify", 2, 4), precision=HAND_PRECISION)
    assert commit.parts["head"] == cm.Cost()
    assert verify.parts["head"].flops == 2 * 4 * 2 * 10 * 8
    assert verify.parts["mamba"] == commit.parts["mamba"]


def test_parameter_counts_match_the_modules():
    config = tiny_config("M*E-")
    assert cm.mamba_weights(config) == sum(p.numel() for p in Mamba2Mixer(config).parameters())
    assert cm.attention_weights(config) == sum(p.numel() for p in Attention(config).parameters())
    moe = MoE(config)
    assert cm.router_parameters(config) + config.n_routed_experts * cm.expert_weights(
        config
    ) + cm.shared_expert_weights(config) == sum(t.numel() for t in [*moe.parameters(), *moe.buffers()])
    with torch.device("meta"):
        model = TwoTowerForCausalLM(config)
    assert cm.twotower_parameters(config) == sum(t.numel() for t in [*model.parameters(), *model.buffers()])


def test_parameters_and_bytes_match_the_release():
    release = json.loads(RELEASE_KEYS.read_text())
    config = preset("nemotron-3-nano-30b-a3b")
    assert cm.twotower_parameters(config) == release["num_parameters"] == 63_185_902_848
    size = {"bfloat16": 2, "float32": 4}
    stored = sum(math.prod(t["shape"]) * size[t["dtype"]] for t in release["tensors"].values())
    assert cm.twotower_weight_bytes(config) == stored  # routers in float32 as stored, the rest bf16
    assert cm.gib(stored) == pytest.approx(117.7, abs=0.05)  # SPEC 5.1


def test_distinct_experts_formula():
    d = cm.independent(preset("nemotron-3-nano-30b-a3b"))
    assert d(0) == 0.0
    assert d(1) == pytest.approx(6.0)
    assert d(16) == pytest.approx(68.6, abs=0.1)  # SPEC 5.1: ~69 for a 16-token block
    assert 126.5 < d(100) < 128  # "all 128 from about n = 100"
    assert all(d(n) < d(n + 1) for n in range(1, 200))


def test_measured_distinct_experts_interpolate_the_correction():
    config = preset("nemotron-3-nano-30b-a3b")
    base = cm.independent(config)
    d = cm.measured_distinct_experts(config, {16: 60.0, 128: 120.0})
    assert d(16) == pytest.approx(60.0)
    assert d(128) == pytest.approx(120.0)
    assert d(1) == pytest.approx(base(1) * 60.0 / base(16))  # nearest ratio kept below the measurements
    mid = d(72)
    r16, r128 = 60.0 / base(16), 120.0 / base(128)
    assert mid == pytest.approx(base(72) * (r16 + (r128 - r16) * (72 - 16) / (128 - 16)))
    assert cm.measured_distinct_experts(config, {1: 12.0})(1000) == 128.0  # never above E
    with pytest.raises(ValueError, match="at least one"):
        cm.measured_distinct_experts(config, {})


def test_measured_routing_changes_the_bytes():
    config = preset("nemotron-3-nano-30b-a3b")
    fwd = cm.Forward("denoise", 1, 16)
    formula = cm.forward_cost(config, fwd).parts["moe"].bytes
    fewer = cm.forward_cost(config, fwd, distinct=lambda n: 50.0).parts["moe"].bytes
    moe_layers = config.layers_block_type.count("moe")
    assert moe_layers == 23
    per_expert = cm.expert_weights(config) * cm.BF16_BYTES
    assert formula - fewer == pytest.approx((cm.independent(config)(16) - 50.0) * per_expert * moe_layers)


@pytest.mark.parametrize("batch", sorted(SPEC_TABLE))
def test_spec_5_1_table_reproduced(batch):
    config = preset("nemotron-3-nano-30b-a3b")
    for tau, expected in zip(cm.DEFAULT_TAUS, SPEC_TABLE[batch]):
        got = cm.predict(config, machine=cm.H100, batch=batch, tau=tau, bound="bandwidth").diffusion_ratio
        assert got == pytest.approx(expected, abs=0.02), (batch, tau)


def test_ratio_identities_and_roofline():
    config = preset("nemotron-3-nano-30b-a3b")
    p = cm.predict(config, machine=cm.H200, batch=32, tau=3.3)
    S = p.block_size
    assert p.diffusion_ratio == pytest.approx(S * p.ar_step_s / (S / p.tau * p.denoise_s + p.commit_s))
    assert p.speculative_ratio == pytest.approx(
        min(S, p.tau * p.draft_steps) * p.ar_step_s / (p.draft_steps * p.denoise_s + p.verify_s)
    )
    capped = cm.predict(config, machine=cm.H200, batch=32, tau=5, draft_steps=4)  # 20 drafted, 16 at most
    assert capped.speculative_tokens_per_s == pytest.approx(32 * 16 / (4 * capped.denoise_s + capped.verify_s))
    # compute only ever adds time; at batch 1 nothing is compute-bound, at 128 the head is
    for b in (1, 128):
        fwd = cm.Forward("denoise", b, 16)
        cost = cm.forward_cost(config, fwd)
        assert cost.seconds(cm.H100) >= cost.seconds(cm.H100, bound="bandwidth")
    assert cm.forward_cost(config, cm.Forward("denoise", 1, 16)).seconds(cm.H100) == pytest.approx(
        cm.forward_cost(config, cm.Forward("denoise", 1, 16)).seconds(cm.H100, bound="bandwidth")
    )
    head = cm.forward_cost(config, cm.Forward("denoise", 128, 16)).parts["head"]
    assert cm.H100.seconds(head) == pytest.approx(head.flops / cm.H100.matmul_peak)
    # H200's extra bandwidth makes every forward faster
    p100 = cm.predict(config, machine=cm.H100, batch=32, tau=3.3)
    assert p100.ar_step_s > p.ar_step_s and p100.denoise_s > p.denoise_s


def test_bad_inputs_raise_clear_errors():
    config = preset("nemotron-3-nano-30b-a3b")
    with pytest.raises(ValueError, match="forward kind"):
        cm.Forward("prefill", 1, 1)
    with pytest.raises(ValueError, match="batch >= 1"):
        cm.Forward("ar_step", 0, 1)
    with pytest.raises(ValueError, match="tokens per denoiser forward"):
        cm.predict(config, machine=cm.H100, batch=1, tau=17)
    with pytest.raises(ValueError, match="must be > 0"):
        cm.Machine("broken", 0.0, 1.0)
    with pytest.raises(ValueError, match="bound"):
        cm.H100.seconds(cm.Cost(1, 1), bound="latency")


def test_precision_of_model_follows_the_state_dtype():
    config = preset("nemotron-3-nano-30b-a3b")
    assert cm.Precision.of_model(config, 2) == cm.Precision(weight=2, router=2, ssm_state=4, conv_state=2, kv=2)
    bf16_state = config.replace(mamba_ssm_cache_dtype="bfloat16")
    assert cm.Precision.of_model(bf16_state, 4).ssm_state == 2


def test_cli_table_json_plot(tmp_path, capsys):
    script = runpy.run_path(str(REPO / "benchmarks" / "cost_model.py"), run_name="imported")
    out_json, out_png = tmp_path / "cm.json", tmp_path / "cm.png"
    assert script["main"](["--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "diffusion / AR generated tokens/s, H100" in text and "speculative / AR" in text
    record = json.loads(out_json.read_text())
    assert len(record["predictions"]) == 2 * 4 * 3  # GPUs x batches x taus
    assert record["assumptions"] == list(cm.ASSUMPTIONS)
    assert out_png.stat().st_size > 10_000
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps({"distinct_experts": {"16": 50.0}}))
    assert script["main"](["--routing", str(routing), "--bound", "bandwidth", "--batches", "1"]) == 0
    assert "distinct experts measured" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script["main"](["--taus", "2,abc"])
    assert "comma-separated" in capsys.readouterr().err


def test_costs_add_and_scale():
    a, b = cm.Cost(10, 3), cm.Cost(5, 1)
    assert a + b == cm.Cost(15, 4)
    assert 2 * a == a * 2 == cm.Cost(20, 6)
    layers = cm.forward_cost(hand_config().replace(layers_block_type=("moe",) * 3), cm.Forward("ar_step", 1, 1))
    one = cm.layer_cost(
        hand_config(), "moe", cm.Forward("ar_step", 1, 1), cm.Precision(), cm.independent(hand_config())
    )
    assert layers.parts["moe"] == 3 * one


# ---- the calibrated CPU model --------------------------------------------------------------------
def machine(**over) -> ccpu.CpuMachine:
    fields = dict(
        name="hand",
        read_bandwidth=20e9,
        matmul_peak={"bfloat16": 1e12, "float32": 2e11},
        gemm={"bfloat16": ccpu.RowRates((1, 4, 16), (16e9, 8e9, 4e9)), "float32": ccpu.RowRates((1,), (20e9,))},
        grouped={"bfloat16": ccpu.RowRates((1, 16), (10e9, 5e9)), "float32": ccpu.RowRates((1,), (20e9,))},
        elementwise={"bfloat16": 40e9, "float32": 50e9},
        dispatch_s=2e-6,
        view_dispatch_s=1e-6,
        group_s={"bfloat16": 3e-6, "float32": 1e-6},
        empty_group_s=0.5e-6,
        first_touch=4e9,
    )
    return ccpu.CpuMachine(**{**fields, **over})


def test_row_rates_interpolate_log_log_and_hold_the_flop_rate():
    rates = ccpu.RowRates((1, 4, 16), (16e9, 8e9, 4e9))
    assert rates.seconds(1, 16e9) == pytest.approx(1.0)
    assert rates.seconds(4, 8e9) == pytest.approx(1.0)
    assert rates.seconds(2, 1e9) == pytest.approx(1e9 / (16e9 * 8e9) ** 0.5)  # halfway in log rows
    assert rates.seconds(32, 4e9) == pytest.approx(2.0)  # past the last probe: time grows with rows
    assert rates.seconds(0, 1e9) == 0.0 and rates.seconds(0.5, 16e9) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rows must increase"):
        ccpu.RowRates((4, 1), (1.0, 1.0))
    with pytest.raises(ValueError, match="as many rates"):
        ccpu.RowRates((1, 2), (1.0,))


def test_latency_and_rate_through_two_points():
    latency, rate = ccpu.latency_and_rate((1e6, 1.1e-3), (1e8, 11e-3))  # 1 ms + W / 10 GB/s
    assert latency == pytest.approx(1e-3) and rate == pytest.approx(1e10)
    assert ccpu.latency_and_rate((1e6, 5e-3), (1e8, 4e-3)) == (0.0, 1e8 / 4e-3)  # noisy: plain rate
    rates = ccpu.RowRates((1, 4), (10e9, 5e9), (1e-3, 3e-3))
    assert rates.seconds(1, 1e9) == pytest.approx(1e-3 + 0.1)
    assert rates.seconds(2, 1e9) == pytest.approx(2e-3 + 1e9 / (10e9 * 5e9) ** 0.5)
    assert rates.seconds(8, 1e9) == pytest.approx(2 * (3e-3 + 0.2))
    assert ccpu.RowRates.from_dict(rates.to_dict()) == rates
    with pytest.raises(ValueError, match="one latency"):
        ccpu.RowRates((1, 4), (1.0, 1.0), (0.0,))


def test_part_seconds_by_hand():
    m = machine()
    work = ccpu.PartWork(
        gemms=[ccpu.Gemm("bfloat16", 4, 8e6, 1e6), ccpu.Gemm("float64", 1, 2e6, 0.0)],
        grouped=[ccpu.Gemm("bfloat16", 16, 5e6, 1e9)],
        streams=[ccpu.Stream("bfloat16", 4e6), ccpu.Stream("float32", 1e3, 1e6)],
        ops=10,
        views=4,
        empty_groups=6,
        fresh_bytes=64e6,
    )
    s = ccpu.part_seconds(m, work)
    assert s.first_touch == pytest.approx(64e6 / 4e9)
    assert s.gemm == pytest.approx(8e6 / 8e9 + 2e6 / 20e9)  # float64 charged at the float32 rate
    assert s.grouped == pytest.approx(max(5e6 / 5e9, 1e9 / 1e12))
    assert s.stream == pytest.approx(4e6 / 40e9 + 1e6 / 2e11)  # the second is FLOP-bound
    assert s.dispatch == pytest.approx(10 * 2e-6 + 4 * 1e-6 + 3e-6 + 6 * 0.5e-6)
    assert s.total == pytest.approx(s.gemm + s.grouped + s.stream + s.dispatch + s.first_touch)
    assert ccpu.forward_seconds(m, {"a": work, "b": work})["total"] == pytest.approx(2 * s.total)
    assert (work + work).ops == 20 and len((work + work).grouped) == 2 and (work + work).fresh_bytes == 128e6


def test_roofline_bound_and_machine_round_trip():
    assert ccpu.roofline_bandwidth_bound(10e9, 1e9, read_bandwidth=20e9, matmul_peak=1e12) == 1.0
    # 0.5 s of bytes against 2 s of FLOPs: at most a quarter of the bandwidth is reachable
    assert ccpu.roofline_bandwidth_bound(10e9, 2e12, read_bandwidth=20e9, matmul_peak=1e12) == pytest.approx(0.25)
    m = machine()
    assert ccpu.CpuMachine.from_dict(m.to_dict()) == m
    older = {k: v for k, v in m.to_dict().items() if k != "first_touch"}  # recorded before it was probed
    assert ccpu.CpuMachine.from_dict(older).first_touch == float("inf")
    assert ccpu.CpuMachine.from_dict(machine(first_touch=float("inf")).to_dict()).first_touch == float("inf")
    with pytest.raises(ValueError, match="rates must be > 0"):
        machine(read_bandwidth=0.0)
    with pytest.raises(ValueError, match="no rate for 'int8'"):
        machine(gemm={"bfloat16": ccpu.RowRates((1,), (1.0,))}).rate({"bfloat16": 1.0}, "int8")


@torch.inference_mode()
@pytest.mark.parametrize("dense", ["mkl", "onednn"])
@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_trace_matches_the_analytic_weights(monkeypatch, cpu_kernel, dense):
    """The traced GEMMs of one AR step read exactly the weights the analytic model counts, through
    grouped_mm and through the CPU kernel (`cpu_grouped_mlp`, on as at the release's widths), with
    the dense layers through MKL or oneDNN (`layers.linear`, as on AMD CPUs)."""
    from twotower.layers import grouped
    from twotower.layers import linear as L

    if (cpu_kernel or dense == "onednn") and torch.float32 not in grouped.ONEDNN_DTYPES:
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(L, "FP32_CPU_GEMM", dense)
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(grouped, "CPU_KERNEL_MIN_WEIGHT_BYTES", 0 if cpu_kernel else 1 << 62)
    monkeypatch.setattr(grouped, "GEMV_ROWS", 0)  # a 2-token step has too few rows for the kernel otherwise
    config = tiny_config("M*E")
    model = random_twotower(config, dtype=torch.float32, device="cpu", tie_towers=True)
    cache = model.empty_cache(2, capacity=8)
    model.extend_context(torch.randint(4, config.vocab_size, (2, 4)), cache)
    ids = torch.randint(4, config.vocab_size, (2, 1))
    with PartTracer(model, part_modules(model)) as trace:
        model.context_forward(ids, cache=cache)
    parts = trace.parts
    assert set(parts) == {"mamba", "moe", "head", OTHER}
    H, f32 = config.hidden_size, 4
    in_out = cm.mamba_weights(config) - (config.mamba_conv_dim * (config.conv_kernel + 1) + 3 * config.mamba_num_heads)
    assert parts["mamba"].weight_bytes == (in_out - config.mamba_d_inner) * f32  # in_proj + out_proj
    assert parts["head"].weight_bytes == config.vocab_size * H * f32
    assert parts[OTHER].weight_bytes == cm.attention_weights(config) * f32
    moe = parts["moe"]
    touched = len(moe.grouped) // 2  # each touched expert: one up and one down group
    assert config.num_experts_per_tok <= touched <= 2 * config.num_experts_per_tok
    assert sum(g.rows for g in moe.grouped) == 2 * 2 * config.num_experts_per_tok  # 2 tokens x k, up and down
    assert moe.empty_groups == (0 if cpu_kernel else 2 * (config.n_routed_experts - touched))
    routed = touched * cm.expert_weights(config) * f32
    assert moe.weight_bytes == routed + cm.shared_expert_weights(config) * f32
    assert all(p.ops > 0 for p in parts.values()) and parts["mamba"].streams
    assert any(s.flops > 0 for s in parts[OTHER].streams)  # the fused attention's q.k and p.v
    assert any(s.flops > 0 for s in parts["moe"].streams)  # the float64 router: activations x a converted copy


@torch.inference_mode()
def test_trace_counts_fresh_large_outputs_once():
    """Outputs of at least FRESH_MMAP_BYTES in new storage count (once per storage); in-place results,
    views and small outputs do not."""
    model = torch.nn.Linear(4, 4)
    big = ccpu.FRESH_MMAP_BYTES // 4 + 1  # float32 elements: just over the threshold
    with PartTracer(model, []) as trace:
        x = torch.ones(big)  # fresh, large
        x.mul_(2)  # in place
        x.view(-1, 1)  # a view
        torch.ones(16)  # small
        torch.cat([x, x])  # fresh, twice as large
    assert trace.parts[OTHER].fresh_bytes == 3 * big * 4


def test_microbenchmarks_fill_every_field():
    cpu = measure_cpu(Flusher(4 << 20), dtypes=("float32",), quick=True, small=True)
    assert set(cpu.gemm) == set(cpu.grouped) == set(cpu.elementwise) == set(cpu.group_s) == {"float32"}
    assert cpu.read_bandwidth > 0 and cpu.matmul_peak["float32"] > 0
    assert min(cpu.gemm["float32"].bytes_per_s) > 0 and cpu.gemm["float32"].rows[0] == 1
    assert 0 < cpu.dispatch_s < 1e-3 and 0 < cpu.view_dispatch_s < 1e-3 and cpu.empty_group_s > 0
    assert cpu.first_touch > 0


def test_the_stream_read_is_the_faster_kernel():
    """The bandwidth every figure is set against comes from whichever plain read streamed faster
    on this host (an MKL GEMV reads at about half the memory's speed on some CPUs)."""
    from twotower.bench.cpu_probes import READ_KERNELS, faster_read

    assert faster_read({"sum": 2.0, "gemv": 1.0}) == "sum"
    assert faster_read({"sum": 1.0, "gemv": 2.0}) == "gemv"
    assert faster_read({"sum": 1.0, "gemv": 1.0}) == READ_KERNELS[0]
    flusher = Flusher(4 << 20, trials=2)
    assert set(flusher.trial_rates) == set(READ_KERNELS) and min(flusher.trial_rates.values()) > 0
    assert flusher.kernel == faster_read(flusher.trial_rates)
    assert flusher.read() > 0


@torch.inference_mode()
@pytest.mark.parametrize("rows", [2, 5])  # oneDNN's plain order, and the swapped one (3-16 rows)
def test_trace_counts_onednn_linears_as_weight_gemms(monkeypatch, rows):
    from twotower.layers import linear as L

    if torch.float32 not in L.ONEDNN_DTYPES:
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(L, "FP32_CPU_GEMM", "onednn")
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT_BYTES", 0)
    layer = L.Linear(32, 48, bias=False)
    with PartTracer(layer, []) as trace:
        layer(torch.randn(rows, 32))
    (gemm,) = trace.parts[OTHER].gemms
    assert (gemm.rows, gemm.weight_bytes, gemm.flops) == (rows, 32 * 48 * 4, 2.0 * rows * 32 * 48)
