"""The `ray` extra is optional: the core package and the CLI never import Ray, and `--engine ray`
without it is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=None)


def test_the_core_package_and_the_cli_do_not_import_ray(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": "the"}) + "\n")
    code = f"""
import sys
import twotower, twotower.cli, twotower.cli.batch, twotower.batch_job, twotower.integrations
import twotower.cli.batch_ray, twotower.integrations.ray_files, twotower.integrations.ray
from twotower.cli import main
assert main(["batch", "--input", {str(src)!r}, "--output", {str(tmp_path / "out.jsonl")!r},
             "--max-new-tokens", "2", "--no-progress"]) == 0
print("ray imported:", "ray" in sys.modules)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ray imported: False" in result.stdout
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 1


def test_engine_ray_without_the_extra_is_a_clear_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"id": 1, "prompt": "the"}) + "\n")
    code = f"""
import sys
sys.modules["ray"] = None  # as if it were not installed: `import ray` fails
from twotower.cli import main
sys.exit(main(["batch", "--engine", "ray", "--input", {str(tmp_path / "in")!r}, "--output", {str(tmp_path / "out")!r}]))
"""
    result = run_python(code)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --engine ray needs ray: pip install 'twotower[ray]'" in result.stderr
    assert "Traceback" not in result.stderr
