"""`twotower bench` end to end on a tiny saved model: table on stdout, JSON, plot, notes, user errors."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from twotower.backbone import NemotronHForCausalLM
from twotower.bench.evalset import load_evalset
from twotower.cli import main
from twotower.model import TwoTowerForCausalLM
from twotower.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--limit", "1", "--thresholds", "0.8", "--block-sizes", "8", "--batch-sizes", "2", "--repeats", "1"]


@pytest.fixture(autouse=True)
def keep_threads():
    """`--threads` changes the process-wide thread count: restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random TwoTower with a byte-level BPE tokenizer trained on the eval prompts."""
    path = tmp_path_factory.mktemp("model")
    tok = train_tokenizer(iter([i.prompt for i in load_evalset()] * 3), path, vocab_size=300)
    torch.manual_seed(0)
    backbone = NemotronHForCausalLM(tiny_config("M*E", vocab_size=tok.vocab_size)).eval()
    TwoTowerForCausalLM.from_backbone(backbone).save_pretrained(path)
    return path


def test_bench_writes_table_json_and_plot(model_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    args = ["bench", "--model", str(model_dir), *QUICK, "--no-hf", "--threads", "1", "--quiet"]
    assert main([*args, "--json", str(out_json), "--plot", str(out_png), "--speculative"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("| setting | math EM |")
    assert "| AR |" in stdout and "| diffusion γ=0.8 S=8 T=8 |" in stdout
    data = json.loads(out_json.read_text())
    assert [r["label"] for r in data["rows"]] == ["AR", "diffusion γ=0.8 S=8 T=8", "speculative γ=0.8 S=8 draft=2"]
    ar, spec = data["rows"][0], data["rows"][2]
    assert [i["completion"] for i in spec["items"]] == [i["completion"] for i in ar["items"]]  # greedy == AR
    assert spec["quality_retained"] == pytest.approx(100.0)
    assert data["options"]["items"] == {"math": 1, "code": 1, "text": 1}
    assert data["environment"]["model_path"] == str(model_dir)
    assert len(data["environment"]["evalset_sha256"]) == 64
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in stdout and not out_png.exists()
    else:
        assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_speculative_rows_skipped_with_a_note_when_unavailable(model_dir, capsys, monkeypatch):
    monkeypatch.delattr(TwoTowerForCausalLM, "generate_speculative", raising=False)
    args = ["bench", "--model", str(model_dir), *QUICK, "--categories", "math", "--no-hf", "--quiet", "--speculative"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "Note: --speculative: this model has no generate_speculative; speculative rows skipped" in stdout
    assert "speculative γ" not in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--thresholds", "1.5"], "--thresholds must lie in [0, 1]"),
        (["--batch-sizes", "0"], "--batch-sizes must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--json", "/nonexistent-dir/x.json"], "--json: the folder"),
        (["--json", "/tmp"], "--json: /tmp is a directory"),  # refused before the run, not after it
        (["--plot", "/tmp/plot.txt"], "--plot: /tmp/plot.txt needs one of the suffixes .png, .svg, .pdf"),
        (["--evalset", "/nonexistent.jsonl"], "not found"),
        (["--model", "/nonexistent-model"], "does not exist"),
        (["--speculative", "--block-sizes", "1"], "block sizes >= 2"),
    ],
)
def test_user_errors_exit_2_with_one_line(model_dir, capsys, extra, message):
    assert main(["bench", "--model", str(model_dir), "--no-hf", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_benchmarks_script_runs_the_same_command(model_dir, capsys, tmp_path):
    script = runpy.run_path(str(REPO / "benchmarks" / "bench_quality_speed.py"), run_name="imported")
    args = ["--model", str(model_dir), *QUICK, "--categories", "math", "--no-hf", "--quiet", "--threads", "1"]
    assert script["main"](args) == 0
    assert "| AR |" in capsys.readouterr().out


def test_profile_forwards_script_times_every_forward(model_dir, capsys, tmp_path):
    script = runpy.run_path(str(REPO / "benchmarks" / "profile_forwards.py"), run_name="imported")
    out = tmp_path / "profile.json"
    assert script["main"](["--model", str(model_dir), "--repeats", "1", "--context", "5", "--block-size", "4",
                           "--json", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "| ar_step |" in text and "one forward per block would give" in text
    record = json.loads(out.read_text())
    for name in ("ar_step", "denoise", "commit"):
        assert record["ms"][name]["eager"] > 0 and record["ms"][name]["compiled"] > 0
    need = record["tokens_per_forward_needed"]["eager"]
    assert need["paper_ratio"] >= need["match_ar"] > 0  # 2.42x needs at least as many tokens per forward as 1x
