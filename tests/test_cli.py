"""`twotower generate` / `score` end to end on a model directory written to disk."""

from __future__ import annotations

import json

import pytest
import torch

from tests.serve.models import save_model_dir
from twotower.cli import main
from twotower.loading import load_for_inference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("model"))


def _json_run(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["diffusion", "ar", "mock-ar", "speculative"])
def test_generate_json_matches_the_library(model_dir, capsys, mode):
    out = _json_run(capsys, "generate", "the quick", "--model", str(model_dir), "--mode", mode,
                    "--max-new-tokens", "12", "--json", "--block-size", "4")  # fmt: skip
    loaded = load_for_inference(str(model_dir))
    tok = loaded.tokenizer
    ids = [tok.bos_id, *tok.encode("the quick")]
    fn = {"diffusion": loaded.model.generate_mask_diffusion, "ar": loaded.model.generate_ar,
          "mock-ar": loaded.model.generate_mock_ar, "speculative": loaded.model.generate_speculative}[mode]  # fmt: skip
    extra = {"block_size": 4} if mode in ("diffusion", "speculative") else {}
    ref = fn([ids], max_new_tokens=12, eos_token_id=tok.eos_id, seed=0, **extra)
    assert out["completion"] == tok.decode([t for t in ref.new_tokens[0] if t != tok.eos_id])
    assert out["tokens"] == len(ref.new_tokens[0]) and out["mode"] == mode and out["nfe"] >= 1


def test_speculative_cli_equals_ar(model_dir, capsys):
    ar = _json_run(capsys, "generate", "Line 3", "--model", str(model_dir), "--mode", "ar", "--json")
    spec = _json_run(capsys, "generate", "Line 3", "--model", str(model_dir), "--mode", "speculative",
                     "--draft-steps", "2", "--block-size", "6", "--json")  # fmt: skip
    assert spec["completion"] == ar["completion"]


def test_static_decode_step_cli_equals_eager(model_dir, capsys):
    eager = _json_run(capsys, "generate", "Line 3", "--model", str(model_dir), "--mode", "ar", "--json")
    static = _json_run(capsys, "generate", "Line 3", "--model", str(model_dir), "--mode", "ar",
                       "--decode-step", "static", "--json")  # fmt: skip
    assert static["completion"] == eager["completion"] and static["tokens"] == eager["tokens"]


def test_anchored_diffusion_cli_matches_the_library(model_dir, capsys):
    out = _json_run(capsys, "generate", "the quick", "--model", str(model_dir), "--anchor",
                    "--max-new-tokens", "12", "--block-size", "4", "--json")  # fmt: skip
    loaded = load_for_inference(str(model_dir))
    tok = loaded.tokenizer
    ref = loaded.model.generate_mask_diffusion(
        [[tok.bos_id, *tok.encode("the quick")]], max_new_tokens=12, block_size=4, eos_token_id=tok.eos_id, anchor=True
    )
    assert out["completion"] == tok.decode([t for t in ref.new_tokens[0] if t != tok.eos_id])
    assert out["nfe"] == ref.stats["nfe"]
    static = _json_run(capsys, "generate", "the quick", "--model", str(model_dir), "--anchor", "--decode-step",
                       "static", "--max-new-tokens", "12", "--block-size", "4", "--json")  # fmt: skip
    assert static["completion"] == out["completion"]


def test_show_steps_renders_the_unmasking(model_dir, capsys):
    assert main(["generate", "fox", "--model", str(model_dir), "--max-new-tokens", "8", "--block-size", "4",
                 "--show-steps", "--threshold", "1.0"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("block")]
    assert len(lines) == 8  # threshold 1.0: one token per step, 2 blocks of 4
    assert lines[0].count("░") == 3 and "░" not in lines[3]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["generate", "x", "--model", "/definitely/missing"], "does not exist"),
        (["generate", "x", "--block-size", "0"], "--block-size must be"),
        (["generate", "x", "--mode", "ar", "--show-steps"], "show-steps"),
        (["generate", "x", "--threshold", "2"], "--threshold must be in"),
        (
            ["generate", "x", "--mode", "speculative", "--decode-step", "compiled"],
            "--decode-step 'compiled' is not implemented for mode speculative",
        ),
        (["generate", "x", "--mode", "ar", "--anchor"], "--anchor applies to mode diffusion only"),
        # options are checked before the model loads: the bad option is named, not the bad path
        (["generate", "x", "--model", "/definitely/missing", "--block-size", "0"], "--block-size must be"),
        (["generate", "x", "--device", "gpu"], "device 'gpu' is not a device name"),
        (["generate", "x", "--denoiser-device", "auto"], "--denoiser-device auto is not a choice"),
        (["generate", "x", "--device", "cpu:notanumber"], "is not a device name"),
    ],
)
def test_user_errors_exit_2_with_one_line(model_dir, capsys, argv, msg):
    if "--model" not in argv:
        argv = [*argv, "--model", str(model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA devices")
@pytest.mark.parametrize("option", ["--device", "--denoiser-device"])
def test_a_device_this_machine_lacks_is_one_line(model_dir, capsys, option):
    assert main(["generate", "x", option, "cuda:3", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: device 'cuda:3': this machine (or torch build) has no cuda device"]


def test_running_out_of_memory_is_one_line(model_dir, capsys, monkeypatch):
    from twotower.decode import run

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 384 GB")

    monkeypatch.setattr(run, "generate", allocate)
    assert main(["generate", "x", "--model", str(model_dir)]) == 2
    assert capsys.readouterr().err.startswith("error: out of memory: [enforce fail")
    monkeypatch.setattr(run, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError keeps its traceback
        main(["generate", "x", "--model", str(model_dir)])


def test_score_jsonl(model_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    bad = ['not json', '{"ids": []}', '{"ids": "156"}', '{"ids": [1, true]}', '{"ids": [1, 99999]}',
           '{"text": "a \\ud800"}']  # fmt: skip
    src.write_text("\n".join(['{"id": "a", "text": "the lazy dog"}', *bad, '{"ids": [1, 5, 6]}']) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["score", str(src), "--output", str(out), "--model", str(model_dir)]) == 1  # bad lines
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == ["a", None]  # a bad line stops only itself
    loaded = load_for_inference(str(model_dir))
    ids = [loaded.tokenizer.bos_id, *loaded.tokenizer.encode("the lazy dog")]
    assert rows[0]["logprobs"] == pytest.approx(loaded.model.score([ids])[0], abs=1e-6)
    err = capsys.readouterr().err
    for number, message in zip(range(2, 8), ["line 2", "at least one token", "list of integers",
                                              "list of integers", "outside the vocabulary", "surrogate"]):  # fmt: skip
        assert f"line {number}: " in err and message in err


def test_every_command_stops_at_any_id_of_the_configs_eos_list(model_dir, tmp_path, capsys):
    """config.json's EOS list (NVIDIA's has 2 and 11) is the one set: here it names the model's own
    first greedy token, so generate and batch both stop after one token."""
    import shutil

    loaded = load_for_inference(str(model_dir))
    tok = loaded.tokenizer
    ids = [tok.bos_id, *tok.encode("the quick")]
    first = loaded.model.generate_ar([ids], max_new_tokens=1).new_tokens[0][0]
    assert first != tok.eos_id
    custom = shutil.copytree(model_dir, tmp_path / "eos")
    config = json.loads((custom / "config.json").read_text())
    config["eos_token_id"] = [tok.eos_id, first]
    (custom / "config.json").write_text(json.dumps(config))
    out = _json_run(capsys, "generate", "the quick", "--model", str(custom), "--mode", "ar", "--json")
    assert out["tokens"] == 1 and out["completion"] == ""
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "the quick", "mode": "ar"}) + "\n")
    assert main(["batch", "--model", str(custom), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")]) == 0
    record = json.loads((tmp_path / "o.jsonl").read_text())
    assert record["completion_tokens"] == 0 and record["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "x"],
        ["score", "in.jsonl"],
        ["batch", "--input", "a", "--output", "b"],
        ["serve"],
        ["bench"],
        ["eval", "--tasks", "t"],
    ],
)
def test_every_loading_command_takes_the_model_options(argv):
    """--dtype auto by default (never a forced float32), --device, --denoiser-device, --quantize."""
    from twotower.cli import _register_extras, build_parser

    _register_extras()
    parser = build_parser()
    default = parser.parse_args(argv)
    assert (default.dtype, default.device, default.denoiser_device, default.quantize) == ("auto", "cpu", None, "none")
    args = parser.parse_args(
        [*argv, "--dtype", "bfloat16", "--device", "auto", "--denoiser-device", "cpu", "--quantize", "int8-experts"]
    )
    assert (args.dtype, args.device, args.denoiser_device, args.quantize) == ("bfloat16", "auto", "cpu", "int8-experts")


def test_generate_in_bfloat16(model_dir, capsys):
    out = _json_run(capsys, "generate", "the quick", "--model", str(model_dir), "--mode", "ar", "--json",
                    "--dtype", "bfloat16", "--max-new-tokens", "6")  # fmt: skip
    assert out["tokens"] == 6
    with pytest.raises(SystemExit):  # argparse refuses a dtype it does not know, with the choices
        main(["generate", "x", "--model", str(model_dir), "--dtype", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_a_verb_whose_extra_is_missing_is_disabled_with_a_clear_message(monkeypatch, capsys):
    """A verb module that cannot import a third-party package leaves a stand-in verb: the other verbs
    work, and that one prints what is missing and exits 2."""
    import importlib

    import twotower.cli as cli

    real = importlib.import_module

    def import_module(name, *args):
        if name == "twotower.cli.serve":
            raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")
        return real(name, *args)

    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [])
    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    assert cli.main(["serve", "--port", "0"]) == 2
    assert "error: twotower serve is unavailable: fastapi is not installed (pip install 'twotower[serve]')" in (
        capsys.readouterr().err
    )
    assert cli.build_parser().parse_args(["info", "--preset", "tiny"]).command == "info"
