"""benchmarks/gpu_check.sh in its CPU form (`--device cpu --tiny`): it runs end to end through the
shell script, writes one JSON with the expected structure, positive figures, and a passed parity
check; and the pieces a GPU run relies on behave (memory sizing, the report surviving errors)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
from pathlib import Path

import pytest
import torch

from twotower.config import preset

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), "--repeats", "2", "--warmup", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_structure_and_parity(cpu_run):
    assert cpu_run["finished"] is True
    assert cpu_run["errors"] == []
    assert {"settings", "environment", "parity", "machine", "model", "timings", "predictions", "ratios"} <= set(cpu_run)
    parity = cpu_run["parity"]
    assert parity["passed"] is True
    assert parity["ar_tokens_equal"] and parity["diffusion_tokens_equal"]
    assert parity["forward_logits"] <= parity["tolerance"] and parity["denoise_logits"] <= parity["tolerance"]
    assert cpu_run["model"]["towers"] == 2  # no device memory limit on the CPU


def test_timings_cover_every_forward_and_batch(cpu_run):
    timed = [r for r in cpu_run["timings"] if "ms" in r]
    assert {(r["forward"], r["batch"]) for r in timed} == {
        (f, b) for f in ("ar_step", "denoise", "commit") for b in (1, 4)
    }
    assert all(r["mode"] == "eager" and r["ms"] > 0 and r["warmup_s"] > 0 for r in timed)
    config = preset("tiny")
    k, E = config.num_experts_per_tok, config.n_routed_experts
    assert all(k <= r["distinct_experts"] <= E for r in timed)


def test_machine_predictions_and_ratios_are_positive(cpu_run):
    assert cpu_run["machine"]["read_bandwidth"] > 0 and cpu_run["machine"]["matmul_peak_bf16"] > 0
    assert len(cpu_run["predictions"]) == 6
    for p in cpu_run["predictions"]:
        assert p["gbytes"] > 0 and p["tflops"] > 0 and p["predicted_ms"]["measured"] > 0
    assert {(r["batch"], r["tau"]) for r in cpu_run["ratios"]} == {(b, t) for b in (1, 4) for t in (2.0, 3.3, 5.0)}
    assert all(r["measured_ratio"] > 0 and r["predicted_ratio"]["measured"] > 0 for r in cpu_run["ratios"])


@pytest.fixture(scope="module")
def gpu_check():
    return runpy.run_path(str(REPO / "benchmarks" / "gpu_check.py"), run_name="imported")


def test_workspace_grows_with_batch_and_one_tower_is_half(gpu_check):
    config = preset("nemotron-3-nano-30b-a3b")
    small = gpu_check["workspace_bytes"](config, batch=1, capacity=145)
    large = gpu_check["workspace_bytes"](config, batch=128, capacity=145)
    assert large > small > gpu_check["SLACK_BYTES"]
    both = gpu_check["model_bytes"](config, tie_towers=False, dtype=torch.bfloat16)
    one = gpu_check["model_bytes"](config, tie_towers=True, dtype=torch.bfloat16)
    assert 117 < both / 2**30 < 118.5  # SPEC 5.1: 117.7 GiB in bf16
    assert 0.49 < one / both < 0.51


def test_on_an_h200_graph_modes_tie_the_towers_so_batch_128_fits(gpu_check):
    """139.5 GiB free: both towers (117.7 GiB) fit next to batch 128's eager need (19.4 GiB) but not
    next to its CUDA-graph need (32.8 GiB), which would then skip the graph rows for memory."""
    config = preset("nemotron-3-nano-30b-a3b")
    both = gpu_check["model_bytes"](config, tie_towers=False, dtype=torch.bfloat16)
    free = int(139.5 * 2**30)
    eager = gpu_check["batch_need"](config, batch=128, capacity=145, graph_pools=False)
    graphs = gpu_check["batch_need"](config, batch=128, capacity=145, graph_pools=True)
    assert graphs == 2 * eager - gpu_check["SLACK_BYTES"]
    tie = gpu_check["tie_towers"]
    assert not tie("auto", both=both, need=eager, free=free)
    assert tie("auto", both=both, need=graphs, free=free)
    assert tie("one", both=both, need=0, free=None) and not tie("both", both=both, need=graphs, free=free)
    assert not tie("auto", both=both, need=graphs, free=None)  # no free figure (the CPU): both towers


def test_report_keeps_errors_and_stays_valid_json(gpu_check, tmp_path):
    report = gpu_check["Report"](tmp_path / "sub" / "r.json", {"device": "cpu"})
    try:
        raise RuntimeError("capture failed")
    except RuntimeError as err:
        report.error("cuda-graph batch 1", err)
    report.save()
    data = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert data["errors"][0]["stage"] == "cuda-graph batch 1"
    assert "RuntimeError: capture failed" in data["errors"][0]["error"]


def test_cuda_without_a_gpu_is_a_clear_error(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gpu_check["main"](["--device", "cuda"])
    assert "no CUDA device here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check["main"](["--device", "cpu", "--modes", "eager,warp"])
    assert "--modes: unknown ['warp']" in capsys.readouterr().err


def test_script_runs_without_safetensors(tmp_path):
    """On a machine without safetensors the script puts a stand-in on the path (nothing here reads or
    writes a checkpoint), so `import twotower` still works."""
    broken = tmp_path / "site" / "safetensors"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('no safetensors here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "safetensors not installed; using a stand-in" in proc.stderr
    assert "--device" in proc.stdout


def test_environment_checks_on_the_cpu(gpu_check, monkeypatch):
    """On the CPU nothing needs Triton and no device memory is tracked: no skips from either check;
    a missing part of the toolchain is reported as `static.compiler_missing` names it."""
    from twotower.decode import static

    cpu = torch.device("cpu")
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    monkeypatch.setattr(static, "python_headers_found", lambda: True)
    monkeypatch.setattr(static, "_found", lambda env, defaults: True)
    assert gpu_check["environment"](cpu)["compile_toolchain"] == "ok"
    monkeypatch.setattr(static, "python_headers_found", lambda: False)
    assert "Python.h" in gpu_check["environment"](cpu)["compile_toolchain"]
    monkeypatch.setattr(static, "python_headers_found", lambda: True)
    model = torch.nn.Linear(2, 2)
    model.context_device, model.config = cpu, preset("tiny")
    assert gpu_check["memory_shortfall"](model, batch=128, context=128, graph_pools=True) is None


def test_the_compiled_mode_runs_in_the_cpu_form(tmp_path):
    """The `compile` rows (torch.compile of the fixed-shape steps) on the tiny model: every forward
    timed, no error; the CUDA-only modes are recorded as skipped, not failed."""
    out = tmp_path / "g.json"
    argv = ["--device", "cpu", "--tiny", "--modes", "compile,cuda-graph", "--compiled-batches", "1"]
    argv += ["--repeats", "1", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(
        ["bash", str(SCRIPT), *argv], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["errors"] == [] and "running" not in report
    rows = [t for t in report["timings"] if t.get("mode") == "compile"]
    assert [r["forward"] for r in rows] == ["ar_step", "denoise", "commit"] and all(r["ms"] > 0 for r in rows)
    assert {"mode": "cuda-graph", "skipped": "needs a CUDA device"} in report["timings"]


@torch.inference_mode()
def test_the_graph_parity_checks_compare_like_with_like(gpu_check):
    """The three captured-forward checks (AR step, denoiser forward, block commit) with a stand-in
    for the CUDA-graph capture that calls the function: on the CPU the fixed-shape forward equals the
    eager one, so what a GPU run reports is the capture's own difference; and a replay that returns
    something else is caught."""
    import gpu_check_parity as parity  # next to gpu_check.py, on the path the fixture set

    from twotower.bench.random_model import random_twotower

    model = random_twotower(preset("tiny"), dtype=torch.float32, device="cpu", tie_towers=False, seed=0)
    g = torch.Generator().manual_seed(1)
    prompt, block = torch.randint(4, 96, (2, 12), generator=g), torch.randint(4, 96, (2, 8), generator=g)
    t = torch.tensor([0.25, 0.75])
    checks = {
        "ar_step": lambda capture: parity.cuda_graph_step_diff(model, prompt, capture=capture),
        "denoise": lambda capture: parity.cuda_graph_denoise_diff(model, prompt, block, t, capture=capture),
        "commit": lambda capture: parity.cuda_graph_commit_diff(model, prompt, block, capture=capture),
    }
    for name, diff in checks.items():
        assert diff(lambda fn: fn) < 1e-5, name
        assert diff(lambda fn: lambda: torch.zeros_like(fn()) + 3.0) > parity.GRAPH_TOL, name


@torch.inference_mode()
def test_the_parity_model_is_decisive(gpu_check):
    """Another correct device rounds differently; the parity model's greedy tokens must not hang on
    that. With every weight perturbed by 1e-5 (relative, well above float32 kernels' differences),
    the model the check builds (seed 0, as gpu_check.py runs it) decodes the same AR and diffusion
    tokens; a changed head is seen, with where the tokens first differ."""
    import copy

    import gpu_check_parity as parity
    from gpu_check_modes import FIRST_RANDOM_ID

    config = preset("tiny")
    ref = parity.parity_model(config, seed=0)
    prompt = torch.randint(FIRST_RANDOM_ID, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    want = {mode: parity.greedy_tokens(ref, prompt, mode) for mode in ("ar", "diffusion")}
    for draw in range(2):
        g = torch.Generator().manual_seed(100 + draw)
        other = copy.deepcopy(ref)
        for w in other.parameters():
            w.mul_(1 + 1e-5 * torch.randn(w.shape, generator=g))
        for mode, tokens in want.items():
            assert parity.first_difference(parity.greedy_tokens(other, prompt, mode), tokens) is None, (mode, draw)
    broken = copy.deepcopy(ref)
    broken.context_lm_head.weight.copy_(broken.context_lm_head.weight.roll(1, dims=0))
    first = parity.first_difference(parity.greedy_tokens(broken, prompt, "ar"), want["ar"])
    assert first is not None and first[1] >= prompt.shape[1]  # the prompt itself is never changed


def test_first_difference(gpu_check):
    import gpu_check_parity as parity

    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert parity.first_difference(a, a.clone()) is None
    assert parity.first_difference(a, torch.tensor([[1, 2, 3], [4, 0, 0]])) == [1, 1]
    assert parity.first_difference(a, a[:, :2]) == [-1, -1]


def test_a_failing_forward_loses_its_own_row_only(gpu_check):
    """A forward that raises (as a failed capture or compile would) becomes a row with its error;
    the batch's other forwards are still timed."""
    import time

    from twotower.bench.random_model import random_twotower

    model = random_twotower(preset("tiny"), dtype=torch.float32, device="cpu", tie_towers=False, seed=0)

    def broken(*_args, **_kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    model.denoise = broken
    rows = list(
        gpu_check["time_mode_batch"](
            model, "eager", batch=1, context=8, repeats=1, warmup=1, clock=gpu_check["Clock"](torch.device("cpu")),
            seed=0, deadline=time.monotonic() + 60,
        )
    )  # fmt: skip
    by_forward = {r["forward"]: r for r in rows}
    assert by_forward["denoise"]["error"] == "RuntimeError: operation not permitted when stream is capturing"
    assert by_forward["ar_step"]["ms"] > 0 and by_forward["commit"]["ms"] > 0


def test_rows_stop_starting_before_the_shell_s_hard_stop(tmp_path):
    """gpu_check.sh tells the script when it will kill it: with a hard stop 16 s after the shell's
    start, rows stop starting 15 s before it, so every timing row is skipped for time (and the
    run still ends cleanly, its JSON whole)."""
    out = tmp_path / "g.json"
    env = dict(os.environ, GPU_CHECK_HARD_LIMIT_S="16", OMP_NUM_THREADS="1")
    argv = ["--device", "cpu", "--tiny", "--out", str(out), "--repeats", "1", "--warmup", "1"]
    proc = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["finished"] is True and report["timings"]
    assert all("time budget" in row.get("skipped", "") for row in report["timings"])
