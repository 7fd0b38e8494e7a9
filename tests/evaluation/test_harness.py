"""The harness adapter on its own: model_args parsing, exact loglikelihoods (trailing spaces, rolling
windows), generate_until (stop strings, token budgets, request order, every mode) and speed stats."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from twotower.evaluation.harness import TwoTowerLM  # noqa: E402

DIFFUSION = dict(mode="diffusion", block_size=4, steps_per_block=4, confidence_threshold=0.9)


def instance(request_type: str, args: tuple, idx: int = 0) -> Instance:
    return Instance(request_type=request_type, doc={}, arguments=args, idx=idx)


@torch.no_grad()
def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    logits = model.context_forward(torch.tensor([context + continuation]))[0, :-1]
    logprobs = torch.log_softmax(logits, dim=-1)[-len(continuation) :]
    return float(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum())


def test_model_args_string_through_the_registry(tiny_checkpoint):
    cls = get_model("twotower")
    assert cls is TwoTowerLM
    lm = cls.create_from_arg_string(
        f"pretrained={tiny_checkpoint},mode=ar,block_size=8,steps_per_block=4,confidence_threshold=0.8,"
        "temperature=0.5,max_gen_toks=7,max_length=64,dtype=float32,denoiser_device=cpu,anchor=False",
        {"batch_size": "2", "max_batch_size": None, "device": "cpu"},
    )
    s = lm.settings
    assert (s.mode, s.block_size, s.steps_per_block, s.confidence_threshold) == ("ar", 8, 4, 0.8)
    assert (s.temperature, s.max_gen_toks, s.batch_size, lm.max_length) == (0.5, 7, 2, 64)
    assert lm.get_model_info()["twotower"]["mode"] == "ar"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "beam"}, "mode must be one of"),
        ({"batch_size": "auto"}, "no 'auto'"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"confidence_threshold": 1.5}, "confidence_threshold must be in"),
        ({"temperature": -1.0}, r"temperature must be 0 \(greedy\) or a finite number >= 1e-06"),
        ({"max_gen_toks": 0}, "max_gen_toks must be a positive integer"),
        ({"max_length": 1}, "max_length must be an integer >= 2"),
        ({"mode": "ar", "anchor": True}, "anchor applies to mode diffusion only"),
        ({"anchor": "yes"}, "anchor must be true or false"),
        ({"mode": "speculative", "block_size": 1}, "block_size must be at least 2 for speculative"),
        ({"mode": "speculative", "draft_steps": 0}, "draft_steps must be a positive integer"),
        ({"engine": "no"}, "engine must be true or false"),  # a non-empty string would turn it on
    ],
)
def test_bad_model_args_raise_clear_errors(tiny_loaded, options, message):
    with pytest.raises(ValueError, match=message):
        TwoTowerLM.from_loaded(tiny_loaded, **options)


def test_loglikelihood_is_exact_and_moves_trailing_spaces(tiny_loaded):
    lm = TwoTowerLM.from_loaded(tiny_loaded, batch_size=2)
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    requests = [("Question: What colour is the sky?\nAnswer:", " blue"), ("Answer: ", "four"), ("", "Q: 2 + 3")]
    got = lm.loglikelihood([instance("loglikelihood", r, i) for i, r in enumerate(requests)])
    expected_pairs = [
        ("Question: What colour is the sky?\nAnswer:", " blue"),
        ("Answer:", " four"),  # the trailing space went to the continuation
        ("", "Q: 2 + 3"),  # empty context: conditioned on BOS alone
    ]
    for (context, continuation), (lp, greedy) in zip(expected_pairs, got):
        ctx, cont = [tok.bos_id, *tok.encode(context)], tok.encode(continuation)
        assert lp == pytest.approx(direct_logprob(model, ctx, cont), abs=1e-4)
        assert isinstance(greedy, bool)


def test_loglikelihood_rolling_windows_cover_every_token_once(tiny_loaded):
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    text = "Q: 2 + 3 = ?\nA: 5\nQ: 10 + 15 = ?\nA: 25\nQuestion: What colour is the sky on a clear day?"
    tokens = tok.encode(text)
    assert len(tokens) > 20
    # No window needed: the whole string after BOS.
    (full,) = TwoTowerLM.from_loaded(tiny_loaded).loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    assert full == pytest.approx(direct_logprob(model, [tok.bos_id], tokens), abs=1e-4)
    # max_length 8: disjoint windows, each scored with a plain forward over its own input.
    lm = TwoTowerLM.from_loaded(tiny_loaded, max_length=8, batch_size=3)
    (windowed,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    windows = list(map(make_disjoint_window, get_rolling_token_windows(tokens, tok.bos_id, 8, 1)))
    assert sum(len(cont) for _, cont in windows) == len(tokens)
    assert len(windows) > 2
    assert windowed == pytest.approx(sum(direct_logprob(model, c, t) for c, t in windows), abs=1e-3)
    assert windowed != pytest.approx(full, abs=1e-3)


def own_generation(loaded, mode: str, prompt: str, max_new_tokens: int, **options) -> list[int]:
    tok, model = loaded.tokenizer, loaded.model
    fn = {"diffusion": model.generate_mask_diffusion, "ar": model.generate_ar, "mock-ar": model.generate_mock_ar}[mode]
    if mode == "diffusion":
        options = {k: v for k, v in {**DIFFUSION, **options}.items() if k != "mode"}
    out = fn([[tok.bos_id, *tok.encode(prompt)]], max_new_tokens=max_new_tokens, eos_token_id=[tok.eos_id], **options)
    return out.new_tokens[0]


def text_of(loaded, tokens: list[int]) -> str:
    return loaded.tokenizer.decode([t for t in tokens if t != loaded.tokenizer.eos_id])


@pytest.mark.parametrize("mode", ["diffusion", "ar", "mock-ar"])
def test_generate_until_matches_our_decoding_cut_at_stop_strings(tiny_loaded, mode):
    options = DIFFUSION if mode == "diffusion" else {"mode": mode}
    lm = TwoTowerLM.from_loaded(tiny_loaded, batch_size=4, **options)
    prompts = ["Q: 2 + 3 = ?\nA:", "Question: How many legs does a cat have?\nAnswer:", "Q: 10 +"]
    free = [text_of(tiny_loaded, own_generation(tiny_loaded, mode, p, 10)) for p in prompts]
    assert all(free), "the tiny model should produce some text"
    stop = free[1][2:4]  # a stop string that occurs in the second output
    requests = [
        (prompts[0], {"until": [], "max_gen_toks": 10}),
        (prompts[1], {"until": ["\x00never", stop], "max_gen_toks": 10}),
        (prompts[2], {"until": "\x00never", "max_gen_toks": 10}),
        (prompts[0], {"until": [], "max_gen_toks": 3}),
    ]
    got = lm.generate_until([instance("generate_until", r, i) for i, r in enumerate(requests)])
    short = text_of(tiny_loaded, own_generation(tiny_loaded, mode, prompts[0], 3))
    assert got == [free[0], free[1][: free[1].find(stop)], free[2], short]
    speed = lm.speed.as_dict()
    assert speed["requests"] == 4 and speed["mode"] == mode
    assert speed["generated_tokens"] > 0 and speed["nfe"] > 0 and speed["seconds"] > 0
    if mode == "diffusion":
        assert speed["tokens_per_forward"] > 1.0  # several tokens committed per denoiser step
    else:
        assert speed["tokens_per_forward"] == 1.0


@pytest.mark.parametrize("mode", ["diffusion", "ar", "speculative"])
def test_engine_generation_gives_the_batched_texts_and_stops_rows_at_stop_strings(tiny_loaded, mode):
    """engine=true: the same greedy texts as the batched path (stop strings cut alike), more
    requests than rows (continuous batching), and a row whose stop string came stops generating."""
    options = {"diffusion": DIFFUSION, "ar": {"mode": "ar"}}.get(mode, dict(mode="speculative", block_size=4))
    prompts = ["Q: 2 + 3 = ?\nA:", "Question: How many legs does a cat have?\nAnswer:", "Q: 10 +"]
    free = [text_of(tiny_loaded, own_generation(tiny_loaded, "ar" if mode == "speculative" else mode, p, 24))
            for p in prompts]  # fmt: skip
    stop = free[1][2:4]
    requests = [
        (prompts[0], {"until": [], "max_gen_toks": 24}),
        (prompts[1], {"until": ["\x00never", stop], "max_gen_toks": 24}),
        (prompts[2], {"until": "\x00never", "max_gen_toks": 24}),
        (prompts[0], {"until": [], "max_gen_toks": 3}),
        (prompts[1], {"until": [stop], "max_gen_toks": 24}),
    ]
    batched = TwoTowerLM.from_loaded(tiny_loaded, batch_size=2, **options)
    engine = TwoTowerLM.from_loaded(tiny_loaded, batch_size=2, engine=True, engine_step="eager", **options)
    items = [instance("generate_until", r, i) for i, r in enumerate(requests)]
    want = batched.generate_until(items)
    got = engine.generate_until(items)
    assert got == want
    assert got[1] == got[4] == free[1][: free[1].find(stop)]
    speed, before = engine.speed.as_dict(), batched.speed.as_dict()
    assert speed["requests"] == 5 and speed["nfe"] > 0 and speed["seconds"] > 0
    # the two rows with a stop string early in their text stop generating there: fewer tokens
    assert speed["generated_tokens"] < before["generated_tokens"]
    assert engine._scheduler.idle and engine._scheduler.active == 0


def test_engine_texts_equal_the_batched_ones_with_tricky_stop_strings(tiny_loaded):
    """An empty stop string is ignored (it would cut every text to nothing); of overlapping stop
    strings the earliest occurrence wins on both paths, even when a later-ending one starts first."""
    prompt = "Question: How many legs does a cat have?\nAnswer:"
    free = text_of(tiny_loaded, own_generation(tiny_loaded, "diffusion", prompt, 24))
    late, early = free[3:9], free[5:7]  # "early" completes first, "late" begins first and ends later
    requests = [
        (prompt, {"until": ["", "\x00never"], "max_gen_toks": 24}),
        (prompt, {"until": [early, late], "max_gen_toks": 24}),
        (prompt, {"until": [""], "max_gen_toks": 24}),
    ]
    items = [instance("generate_until", r, i) for i, r in enumerate(requests)]
    want = TwoTowerLM.from_loaded(tiny_loaded, batch_size=2, **DIFFUSION).generate_until(items)
    got = TwoTowerLM.from_loaded(tiny_loaded, batch_size=2, engine=True, engine_step="eager", **DIFFUSION)
    assert got.generate_until(items) == want == [free, free[:3], free]


def test_stop_string_rules():
    from twotower.stops import cut_at_stop, first_stop, settled

    assert first_stop("abcde", ["cd", "bcde", ""]) == 1 and first_stop("abc", ["x"]) is None
    assert cut_at_stop("abcde", ["cd", "bcde"]) == "a" and cut_at_stop("abc", []) == "abc"
    assert not settled("abcd", ["cd", "bcde"], 2)  # "bcd" may still become "bcde", which begins earlier
    assert settled("abcdx", ["cd", "bcde"], 2)
    assert settled("abcd", ["cd"], 2)


def test_engine_rejects_modes_it_does_not_serve(tiny_loaded):
    with pytest.raises(ValueError, match="engine=true serves the modes"):
        TwoTowerLM.from_loaded(tiny_loaded, mode="mock-ar", engine=True)
    with pytest.raises(ValueError, match="engine_step must be auto or one of"):
        TwoTowerLM.from_loaded(tiny_loaded, engine=True, engine_step="fast")


def test_engine_failure_mid_run_leaves_a_usable_adapter(tiny_loaded, monkeypatch):
    lm = TwoTowerLM.from_loaded(tiny_loaded, **DIFFUSION, batch_size=2, engine=True, engine_step="eager")
    items = [instance("generate_until", ("Q: 2 + 3 = ?\nA:", {"until": [], "max_gen_toks": 8}), i) for i in range(3)]
    want = lm.generate_until(items)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm.cache_hook, "add_partial", interrupted)  # stop right after the first row ends
    with pytest.raises(KeyboardInterrupt):
        lm.generate_until(items)
    monkeypatch.undo()
    assert lm.generate_until(items) == want  # no "already queued" ids from the interrupted run


def test_engine_warm_up_leaves_no_trace(tiny_loaded):
    lm = TwoTowerLM.from_loaded(tiny_loaded, **DIFFUSION, batch_size=2, engine=True, engine_step="eager")
    lm.warm_up()
    assert lm.speed.requests == 0 and lm._scheduler.idle and lm._scheduler.stats.denoiser_forwards == 0


def test_speculative_generation_through_the_adapter_is_the_ar_models(tiny_loaded):
    """`mode=speculative` (offered by `twotower eval --mode`) runs self-speculative decoding: greedy,
    exactly the AR model's text, with the drafts' denoiser forwards counted."""
    lm = TwoTowerLM.from_loaded(tiny_loaded, mode="speculative", block_size=4, draft_steps=2, batch_size=2)
    prompts = ["Q: 2 + 3 = ?\nA:", "Question: How many legs does a cat have?\nAnswer:"]
    got = lm.generate_until(
        [instance("generate_until", (p, {"until": [], "max_gen_toks": 10}), i) for i, p in enumerate(prompts)]
    )
    assert got == [text_of(tiny_loaded, own_generation(tiny_loaded, "ar", p, 10)) for p in prompts]
    speed = lm.speed.as_dict()
    assert speed["mode"] == "speculative" and speed["nfe"] > 0


def test_anchored_generation_through_the_adapter(tiny_loaded):
    lm = TwoTowerLM.from_loaded(tiny_loaded, **DIFFUSION, anchor=True)
    prompt = "Q: 2 + 3 = ?\nA:"
    got = lm.generate_until([instance("generate_until", (prompt, {"until": [], "max_gen_toks": 10}), 0)])
    want = text_of(tiny_loaded, own_generation(tiny_loaded, "diffusion", prompt, 10, anchor=True))
    assert got == [want] and lm.settings.anchor
    assert want != text_of(tiny_loaded, own_generation(tiny_loaded, "diffusion", prompt, 10))


def test_temperature_follows_the_task_unless_set(tiny_loaded):
    lm = TwoTowerLM.from_loaded(tiny_loaded, mode="ar")
    greedy = lm._gen_request(0, "Q:", {"do_sample": False, "temperature": 0.7})
    sampled = lm._gen_request(0, "Q:", {"do_sample": True, "temperature": 0.7})
    assert (greedy.temperature, sampled.temperature) == (0.0, 0.7)
    fixed = TwoTowerLM.from_loaded(tiny_loaded, mode="ar", temperature=0.1)
    assert fixed._gen_request(0, "Q:", {"do_sample": False}).temperature == 0.1


def test_long_prompts_keep_bos_and_their_end(tiny_loaded):
    lm = TwoTowerLM.from_loaded(tiny_loaded, mode="ar", max_length=12)
    request = lm._gen_request(0, "Q: 2 + 3 = ?\nA: 5\nQ: 10 + 15 = ?\nA: 25\nQ: 7 - 4 = ?\nA:", {"max_gen_toks": 4})
    full = lm._context_ids("Q: 2 + 3 = ?\nA: 5\nQ: 10 + 15 = ?\nA: 25\nQ: 7 - 4 = ?\nA:")
    assert request.prompt == [full[0], *full[-7:]]
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        lm._gen_request(0, "Q:", {"max_gen_toks": 12})


def test_max_gen_toks_cap_bounds_every_budget(tiny_loaded):
    lm = TwoTowerLM.from_loaded(tiny_loaded, mode="ar", max_gen_toks=40, max_gen_toks_cap=5)
    assert lm._gen_request(0, "Q:", {"max_gen_toks": 50}).max_gen_toks == 5
    assert lm._gen_request(0, "Q:", {}).max_gen_toks == 5  # the fallback budget too
    assert lm._gen_request(0, "Q:", {"max_gen_toks": 3}).max_gen_toks == 3  # a smaller budget stays
    with pytest.raises(ValueError, match="max_gen_toks_cap must be a positive integer"):
        TwoTowerLM.from_loaded(tiny_loaded, mode="ar", max_gen_toks_cap=0)


def test_warm_up_is_neither_counted_nor_moves_the_sampling_seeds(tiny_loaded):
    """A sampled generation after warm_up equals the same generation without it."""
    options = dict(DIFFUSION, temperature=1.0, seed=3)
    request = [instance("generate_until", ("Q: 2 + 3 = ?\nA:", {"until": [], "max_gen_toks": 8}), 0)]
    cold = TwoTowerLM.from_loaded(tiny_loaded, **options)
    want = cold.generate_until(request)
    warm = TwoTowerLM.from_loaded(tiny_loaded, **options)
    warm.warm_up()
    assert warm.speed.as_dict() == TwoTowerLM.from_loaded(tiny_loaded, **options).speed.as_dict()
    assert warm.generate_until(request) == want
    assert warm.speed.requests == cold.speed.requests == 1


def test_speed_since_is_the_difference():
    from dataclasses import replace

    from twotower.evaluation.harness import SpeedStats

    total = SpeedStats("diffusion", requests=5, generated_tokens=50, nfe=20, row_forwards=25, seconds=2.5)
    earlier = replace(total, requests=2, generated_tokens=10, nfe=8, row_forwards=10, seconds=1.0)
    delta = total.since(earlier)
    assert (delta.requests, delta.generated_tokens, delta.nfe, delta.row_forwards) == (3, 40, 12, 15)
    assert delta.seconds == pytest.approx(1.5) and delta.tokens_per_forward == pytest.approx(40 / 15)


@pytest.mark.parametrize(
    "gen_kwargs, message",
    [
        ({"until": 5}, "until must be a string or a list of strings"),
        ({"until": [1]}, "until must be a string or a list of strings"),
        ({"max_gen_toks": "abc"}, "max_gen_toks must be a positive integer"),
        ({"max_gen_toks": 2.7}, "max_gen_toks must be a positive integer"),
        ({"max_gen_toks": 0}, "max_gen_toks must be a positive integer"),
    ],
)
def test_bad_generation_requests_are_clear_errors_before_decoding(tiny_loaded, gen_kwargs, message):
    lm = TwoTowerLM.from_loaded(tiny_loaded, **DIFFUSION)
    with pytest.raises(ValueError, match=f"request 0: {message}"):
        lm.generate_until([instance("generate_until", ("Q: 1 + 1 = ?\nA:", gen_kwargs), 0)])
