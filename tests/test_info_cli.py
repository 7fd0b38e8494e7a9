"""`twotower info` end to end through `twotower.cli.main`: the 30B facts, config-only reading, the
auto dtype, JSON and text output, and one `error:` line per bad option."""

from __future__ import annotations

import json
import shutil

import pytest

import twotower.cli as cli
from twotower import memory_plan as mp
from twotower.cli.info import register
from twotower.loading import bundled_model_path

NANO = "nemotron-3-nano-30b-a3b"


@pytest.fixture(autouse=True)
def info_command():
    """Works before and after `twotower.cli.info` is in cli's own list of extra commands."""
    cli._register_extras()
    if not any(getattr(r, "__module__", None) == register.__module__ for r in cli.EXTRA_COMMANDS):
        cli.EXTRA_COMMANDS.append(register)
        yield
        cli.EXTRA_COMMANDS.remove(register)
    else:
        yield


def run_json(capsys, *argv) -> dict:
    assert cli.main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_30b_facts_in_json(capsys):
    out = run_json(capsys, "--preset", NANO, "--dtype", "bfloat16")
    assert out["parameters"]["total"]["tensors"] == 63_185_902_848
    bf16 = next(w for w in out["weights"] if w["dtype"] == "bfloat16" and w["quantize"] == "none")
    assert bf16["total"] / mp.GiB == pytest.approx(117.7, abs=0.05)
    int8 = next(w for w in out["weights"] if w["quantize"] == "int8-experts")
    assert int8["dtype"] == "bfloat16" and int8["total"] / mp.GiB == pytest.approx(62.2, abs=0.05)
    assert out["cache"]["kv_per_token"] * 1024 == 6 * 2**20
    assert out["router_copies"]["total"] == 2 * 23 * 128 * 2688 * 8  # float64, kept by frozen routers
    assert out["cache"]["ssm_dtype"] == "float32" and out["cache"]["ssm_state"] == 46 * 2**20
    devices = {d["device"]: d for d in out["devices"]}
    assert devices["h200"]["fits"] and 20 * mp.GiB < devices["h200"]["left_for_state"] < 22 * mp.GiB
    assert not devices["h100-80gb"]["fits"]
    h100s = out["placements"]["2 x h100-80gb"]
    assert (
        h100s["fits"] and h100s["split"] and (h100s["context_device"], h100s["denoiser_device"]) == ("cuda:0", "cuda:1")
    )
    assert not out["placements"]["2 x h200"]["split"]


def test_int8_experts_fit_one_h100(capsys):
    out = run_json(
        capsys, "--preset", NANO, "--dtype", "bfloat16", "--quantize", "int8-experts", "--devices", "h100-80gb"
    )
    assert out["placements"]["auto"]["fits"] and not out["placements"]["auto"]["split"]
    assert [d["device"] for d in out["devices"]] == ["cuda:0"]


def test_text_report_shows_the_figures(capsys):
    assert cli.main(["info", "--preset", NANO, "--dtype", "bf16", "--devices", "cuda:0=h200,cuda:1=80GB"]) == 0
    text = capsys.readouterr().out
    assert "63.19B" in text and "117.69 GiB" in text and "62.22 GiB" in text
    assert "+ float64 router copies (frozen)   60.38 MiB   60.38 MiB  120.75 MiB" in text
    assert "K/V per 1024 tokens" in text and "6.00 MiB" in text and "46.00 MiB" in text
    assert "both towers fit on cuda:0" in text
    for section in ("parameters", "weights", "cache per sequence", "workspace", 'placement (device_map="auto")'):
        assert section in text


def test_reads_config_json_only_and_auto_dtype(tmp_path, capsys):
    config = json.loads((bundled_model_path() / "config.json").read_text())
    shutil.copy(bundled_model_path() / "config.json", tmp_path / "config.json")  # no weights next to it
    assert run_json(capsys, "--model", str(tmp_path))["dtype"] == "float32"
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    out = run_json(capsys, "--model", str(tmp_path))
    assert out["dtype"] == "bfloat16" and out["dtype_source"].startswith("auto")
    assert run_json(capsys, "--model", str(tmp_path), "--dtype", "float16")["dtype"] == "float16"


def test_default_is_the_bundled_model(capsys):
    out = run_json(capsys)
    assert out["model"].startswith("twotower-tiny") and out["layers"]["moe"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "fp8"], "dtype"),
        (["--quantize", "int4"], "--quantize"),
        (["--batch", "x"], "--batch"),
        (["--max-len", "0"], "--max-len"),
        (["--devices", "cuda:0=80"], "unit"),
        (["--preset", "nope"], "preset"),
        (["--model", "/no/such/dir"], "does not exist"),
        (["--model", ".", "--preset", "tiny"], "not both"),
    ],
)
def test_bad_options_give_one_error_line(capsys, argv, message):
    assert cli.main(["info", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert captured.out == ""


def test_bad_torch_dtype_in_config(tmp_path, capsys):
    config = json.loads((bundled_model_path() / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float64"}))
    assert cli.main(["info", "--model", str(tmp_path)]) == 2
    assert "torch_dtype" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["info", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for needle in ("config.json", "--devices", "GiB = 2^30", "h200", "reserve", "device_map"):
        assert needle in text


@pytest.mark.parametrize("named", [None, "auto"])
def test_auto_dtype_follows_the_loader_when_the_config_names_none(capsys, tmp_path, named):
    """A bf16 checkpoint whose config.json has no torch_dtype (or "auto"): auto plans bf16, as the
    loader loads it."""
    import torch

    from tests.conftest import tiny_config
    from twotower.model import TwoTowerForCausalLM

    TwoTowerForCausalLM(tiny_config("M*E")).to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["torch_dtype"]
    if named is not None:
        config["torch_dtype"] = named
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run_json(capsys, "--model", str(tmp_path))
    assert out["dtype"] == "bfloat16" and "stored" in out["dtype_source"]
    assert TwoTowerForCausalLM.from_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("value", ["abc", 2.7, 0, -4])
def test_a_bad_block_size_in_the_config_names_it(tmp_path, capsys, value):
    config = json.loads((bundled_model_path() / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "block_size": value}))
    assert cli.main(["info", "--model", str(tmp_path)]) == 2
    assert f"config.json: block_size must be a positive integer, got {value!r}" in capsys.readouterr().err
