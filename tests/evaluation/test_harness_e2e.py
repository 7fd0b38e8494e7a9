"""lm-evaluation-harness end to end, offline, on the local tasks in tests/evaluation/tasks: a
generation task in diffusion and AR mode and a multiple-choice task through loglikelihood. Every
score is recomputed here from the model's own outputs: loglikelihoods from a plain context-tower
forward, generations from our `generate_*` calls one prompt at a time."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from tests.evaluation.conftest import TASKS_DIR  # noqa: E402
from twotower import cli  # noqa: E402
from twotower.cli import eval as eval_cli  # noqa: E402
from twotower.evaluation import harness  # noqa: E402,F401  (registers the model name "twotower")
from twotower.loading import bundled_model_path, load_for_inference  # noqa: E402

DIFFUSION = dict(block_size=4, steps_per_block=4, confidence_threshold=0.9)
ARITH, CHOICE = "twotower_arith", "twotower_choice"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- independent recomputation ------------------------------------------------------------------------
@torch.no_grad()
def own_loglikelihood(loaded, context: str, continuation: str) -> float:
    """log p(continuation | BOS + context) from one unpadded context-tower forward."""
    tok, model = loaded.tokenizer, loaded.model
    ctx, cont = [tok.bos_id, *tok.encode(context)], tok.encode(continuation)
    logits = model.context_forward(torch.tensor([ctx + cont]))[0, :-1]
    logprobs = torch.log_softmax(logits, dim=-1)[-len(cont) :]
    return float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum())


def own_generation(loaded, mode: str, prompt: str, max_new_tokens: int, until: list[str], options: dict):
    """(text cut at the first stop string, generation stats) for one prompt, without the harness."""
    tok, model = loaded.tokenizer, loaded.model
    ids = [[tok.bos_id, *tok.encode(prompt)]]
    fn = {"diffusion": model.generate_mask_diffusion, "ar": model.generate_ar}[mode]
    eos = sorted({tok.eos_id, *model.config.eos_token_ids})
    out = fn(ids, max_new_tokens=max_new_tokens, eos_token_id=eos, **options)
    text = tok.decode([t for t in out.new_tokens[0] if t not in eos])
    for stop in until:
        if stop in text:
            text = text[: text.index(stop)]
    return text, out


def check_choice_samples(loaded, samples: list[dict], result: dict) -> None:
    """Each choice's logged loglikelihood equals ours; acc and acc_norm follow from them."""
    accs, norms = [], []
    for s in samples:
        choices = s["doc"]["choices"]
        assert [a[1] for a in s["arguments"]] == [" " + c for c in choices]
        logged = [r[0][0] for r in s["resps"]]
        ours = [own_loglikelihood(loaded, *args) for args in s["arguments"]]
        np.testing.assert_allclose(logged, ours, atol=1e-4)
        accs.append(float(np.argmax(ours) == s["doc"]["label"]))
        lengths = [len(" " + c) for c in choices]
        norms.append(float(np.argmax(np.array(ours) / lengths) == s["doc"]["label"]))
    assert result["acc,none"] == pytest.approx(np.mean(accs))
    assert result["acc_norm,none"] == pytest.approx(np.mean(norms))


def check_arith_samples(loaded, samples: list[dict], result: dict, mode: str, options: dict) -> list:
    """Each logged generation equals our own decoding of the same prompt; exact_match follows."""
    outs, matches = [], []
    for s in samples:
        ((prompt, gen_kwargs),) = s["arguments"]
        text, out = own_generation(loaded, mode, prompt, gen_kwargs["max_gen_toks"], gen_kwargs["until"], options)
        assert s["resps"] == [[text]]
        assert s["filtered_resps"] == [text.strip()]
        matches.append(float(text.strip() == s["target"]))
        outs.append(out)
    assert result["exact_match,strict"] == pytest.approx(np.mean(matches))
    return outs


# ---- the tiny checkpoint ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusion_tasks(tmp_path_factory, tiny_loaded):
    """A copy of the local tasks whose arithmetic targets are, for every other question, the answer
    our own diffusion decoding gives: so exact_match must come out as a known non-zero number."""
    folder = tmp_path_factory.mktemp("tasks") / "tasks"
    shutil.copytree(TASKS_DIR, folder)
    docs = read_jsonl(folder / "arith.jsonl")
    for doc in docs[::2]:
        text, _ = own_generation(tiny_loaded, "diffusion", f"Q: {doc['question']} = ?\nA:", 8, ["\n"], DIFFUSION)
        doc["answer"] = text.strip()
    (folder / "arith.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return folder, docs


def test_diffusion_generation_and_multiple_choice_end_to_end(tiny_checkpoint, tiny_loaded, diffusion_tasks):
    folder, docs = diffusion_tasks
    lm = get_model("twotower").create_from_arg_string(
        f"pretrained={tiny_checkpoint},mode=diffusion,block_size=4,steps_per_block=4,confidence_threshold=0.9",
        {"batch_size": 3, "device": "cpu"},
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[ARITH, CHOICE],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = results["samples"]
    assert len(samples[ARITH]) == len(docs) and len(samples[CHOICE]) == 5
    outs = check_arith_samples(tiny_loaded, samples[ARITH], results["results"][ARITH], "diffusion", DIFFUSION)
    assert results["results"][ARITH]["exact_match,strict"] >= 0.5  # the planted targets are matched
    check_choice_samples(tiny_loaded, samples[CHOICE], results["results"][CHOICE])
    # Speed statistics are the sums of what each generation reported.
    speed = lm.speed.as_dict()
    assert speed["requests"] == len(docs)
    assert speed["generated_tokens"] == sum(len(o.new_tokens[0]) for o in outs)
    assert speed["row_forwards"] == sum(o.stats["denoiser_steps_per_row"][0] for o in outs)
    assert speed["tokens_per_forward"] > 1.0
    assert results["config"]["twotower"]["mode"] == "diffusion"


@pytest.mark.parametrize("engine", [[], ["--engine", "--engine-step", "eager"]], ids=["batched", "engine"])
def test_ar_mode_end_to_end_through_the_cli(tiny_checkpoint, tiny_loaded, tmp_path, monkeypatch, capsys, engine):
    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [eval_cli.register])
    monkeypatch.setattr(cli, "_register_extras", lambda: None)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_checkpoint), "--tasks", f"{ARITH},{CHOICE}", "--mode", "ar"]
    argv += ["--include-path", str(TASKS_DIR), "--no-builtin-tasks", "--batch-size", "4"]
    argv += ["--log-samples", "--json", str(out), *engine]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert ARITH in printed and CHOICE in printed and "tokens/forward" in printed
    report = json.loads(out.read_text())
    check_arith_samples(tiny_loaded, report["samples"][ARITH], report["results"][ARITH], "ar", {})
    check_choice_samples(tiny_loaded, report["samples"][CHOICE], report["results"][CHOICE])
    assert report["speed"]["mode"] == "ar" and report["speed"]["requests"] == 6
    assert report["speed"]["tokens_per_forward"] == 1.0
    assert report["config"]["twotower"]["engine"] == bool(engine)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "no_such_task", "--include-path", str(TASKS_DIR), "--no-builtin-tasks"], "unknown task"),
        (["--tasks", ARITH, "--include-path", "/nonexistent/tasks"], "is not a directory"),
        (["--tasks", ARITH, "--no-builtin-tasks"], "needs at least one --include-path"),
        (["--tasks", ARITH, "--include-path", str(TASKS_DIR), "--no-builtin-tasks", "--batch-size", "0"], "batch_size"),
        (
            ["--tasks", ARITH, "--include-path", str(TASKS_DIR), "--no-builtin-tasks", "--json", "/tmp"],
            "is a directory",
        ),
    ],
)
def test_cli_user_errors_are_one_line(tiny_checkpoint, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [eval_cli.register])
    monkeypatch.setattr(cli, "_register_extras", lambda: None)
    assert cli.main(["eval", "--model", str(tiny_checkpoint), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


# ---- the bundled model --------------------------------------------------------------------------------
BUNDLED_REASON = f"the bundled model is not built yet ({bundled_model_path()}/config.json is missing)"


@pytest.mark.skipif(not (bundled_model_path() / "config.json").is_file(), reason=BUNDLED_REASON)
@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_bundled_model_end_to_end(mode):
    loaded = load_for_inference(None)
    options = DIFFUSION if mode == "diffusion" else {}
    lm = get_model("twotower").create_from_arg_obj({"mode": mode, **options}, {"batch_size": 2})
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[ARITH, CHOICE],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        limit=3,
        log_samples=True,
        bootstrap_iters=0,
    )
    check_arith_samples(loaded, results["samples"][ARITH], results["results"][ARITH], mode, options)
    check_choice_samples(loaded, results["samples"][CHOICE], results["results"][CHOICE])
    assert lm.speed.requests == 3
