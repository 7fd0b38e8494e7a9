"""benchmarks/real_checkpoint.py at tiny widths: the same path as the real-width run (released layout,
per-expert keys, bf16, shards with an index, a load in a fresh process, the three modes)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

from twotower.checkpoint import INDEX_NAME

REPO = Path(__file__).resolve().parents[2]


def test_real_checkpoint_script_end_to_end(tmp_path, capsys):
    script = runpy.run_path(str(REPO / "benchmarks" / "real_checkpoint.py"), run_name="imported")
    out = tmp_path / "ckpt"
    argv = ["--tiny", "--shard-gb", "0.002", "--new-tokens", "3", "--threads", "1", "--out", str(out), "--keep"]
    assert script["main"]([*argv, "--json", str(tmp_path / "facts.json")]) == 0
    facts = json.loads((tmp_path / "facts.json").read_text())
    index = json.loads((out / INDEX_NAME).read_text())
    assert facts["write"]["shards"] == len(set(index["weight_map"].values())) > 2
    assert any(".experts.0.up_proj.weight" in key for key in index["weight_map"])  # the released layout
    load = facts["load"]
    assert load["dtype"] == "bfloat16" and load["ssm_state_dtype"] == "float32"  # auto: as stored
    assert load["model_bytes"] == facts["write"]["bytes"]
    assert load["peak_rss"] >= load["rss_before_load"] > 0
    for mode in ("ar", "diffusion", "speculative"):
        assert len(load["generate"][mode]["tokens"]) == 3 and load["generate"][mode]["nfe"] >= 1
    assert "the load added" in capsys.readouterr().out
