"""benchmarks/huge_pages.py runs end to end on small settings (checking that both copies compute the
same before timing them); benchmarks/compile_time.py rejects bad options (a run compiles for
minutes; tests/test_blocks.py covers what it measures)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from twotower import hugepages

REPO = Path(__file__).resolve().parents[2]


def _script(name: str) -> dict:
    return runpy.run_path(str(REPO / "benchmarks" / name), run_name="imported")


@pytest.mark.skipif(not hugepages.enabled(), reason="this kernel has no transparent huge pages")
def test_huge_pages_benchmark_times_both_copies_of_the_small_model(tmp_path, capsys):
    out = tmp_path / "hp.json"
    assert (
        _script("huge_pages.py")["main"](["--threads", "1", "--rounds", "1", "--repeats", "1", "--json", str(out)]) == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"].split(", ")[1] for r in rows] == ["denoise", "commit"]
    assert all(r["small_pages_ms"] > 0 and r["huge_pages_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert "| 12.6M model, denoise, batch 1 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [(["--pattern", "MXE"], "layer letters"), (["--settings", "fast"], "unknown"), (["--batch", "0"], "at least 1")],
)
def test_compile_time_benchmark_rejects_bad_options(args, message):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compile_time.py"), *args], capture_output=True, text=True
    )
    assert done.returncode == 2 and message in done.stderr
