"""benchmarks/fp32_cpu_gemm.py on the tiny preset: both libraries run every case, agree, and the
JSON records them; the library choice is restored afterwards."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from twotower.layers import linear as L

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(torch.float32 not in L.ONEDNN_DTYPES, reason="no float32 oneDNN linear")


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(REPO / "benchmarks" / "fp32_cpu_gemm.py"), run_name="imported")


def test_cli_json(script, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT_BYTES", 0)  # the tiny preset's weights are small
    before = L.FP32_CPU_GEMM
    out = tmp_path / "gemm.json"
    argv = ["--preset", "tiny", "--rows", "1,5", "--repeats", "1", "--flush-mib", "4", "--json", str(out)]
    assert script["main"](argv) == 0
    assert L.FP32_CPU_GEMM == before
    text = capsys.readouterr().out
    assert text.startswith("host: ") and "| mamba in_proj | 1 |" in text
    record = json.loads(out.read_text())
    names = {r["weight"].split(" (")[0] for r in record["rows"]}
    assert names == {*script["dense_weights"](script["real_shape_config"]("M*E", preset_name="tiny")), "routed experts"}
    assert {r["rows"] for r in record["rows"]} == {1, 5}
    for r in record["rows"]:
        assert r["mkl_ms"] > 0 and r["onednn_ms"] > 0 and r["max_relative_difference"] <= 1e-4
        assert r["speedup"] == pytest.approx(r["mkl_ms"] / r["onednn_ms"])
    assert record["host"]["cpu_model"] and record["default"] == before


@pytest.mark.parametrize("argv, message", [(["--rows", "1,x"], "comma-separated"), (["--rows", "0"], ">= 1")])
def test_bad_options(script, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        script["main"](argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
