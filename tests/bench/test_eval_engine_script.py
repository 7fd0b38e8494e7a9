"""benchmarks/eval_engine.py on the bundled model at a tiny size: both variants run, texts agree."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[2]


def test_eval_engine_benchmark_runs_both_variants(tmp_path, capsys):
    script = runpy.run_path(str(REPO / "benchmarks" / "eval_engine.py"), run_name="imported")
    out = tmp_path / "e.json"
    argv = ["--requests", "4", "--batch-size", "2", "--max-gen-toks", "8", "--repeats", "1", "--json", str(out)]
    assert script["main"](argv) == 0
    report = json.loads(out.read_text())
    assert report["texts_equal"] == 4
    assert set(report["figures"]) == {"batched", "engine"}
    assert report["figures"]["engine"]["generated_tokens"] <= report["figures"]["batched"]["generated_tokens"]
    assert "texts equal: 4/4" in capsys.readouterr().out
    assert script["main"](["--requests", "0"]) == 2
