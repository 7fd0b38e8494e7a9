"""One DecodeSpec: one validation, one set of defaults, one mode registry, the same statistics in every mode."""

from __future__ import annotations

import inspect
from dataclasses import fields, replace

import pytest

from tests.serve.models import make_two_tower
from twotower.decode import engine, run
from twotower.decode.diffusion import generate_mask_diffusion
from twotower.decode.spec import MODES, SERVED_MODES, DecodeSpec, DecodeStats
from twotower.decode.speculative import generate_speculative
from twotower.decode.twotower import generate_ar
from twotower.workload import OptionError, Options, parse_options

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def model():
    return make_two_tower(seed=1)


def test_generate_keyword_defaults_are_the_spec_defaults():
    spec = DecodeSpec()
    names = {"max_new_tokens", "block_size", "steps_per_block", "confidence_threshold", "temperature", "draft_steps"}
    for fn in (generate_mask_diffusion, generate_speculative, generate_ar):
        params = inspect.signature(fn).parameters
        for name in names & params.keys():
            assert params[name].default == getattr(spec, name), (fn.__name__, name)
    opts = Options()  # the workloads: the same defaults, but OpenAI's max_tokens
    for name in ("block_size", "steps_per_block", "confidence_threshold", "draft_steps", "temperature", "anchor"):
        assert getattr(opts, name) == getattr(spec, name), name
    assert opts.to_spec() == replace(spec, max_new_tokens=opts.max_tokens)


def test_one_mode_registry():
    assert engine.MODES == SERVED_MODES == ("diffusion", "ar", "speculative")
    assert set(MODES) == {"diffusion", "ar", "speculative", "mock-ar"}
    assert engine.BLOCK_MODES == ("diffusion", "speculative")
    with pytest.raises(OptionError, match="mode"):
        parse_options({"mode": "mock-ar"}, Options())
    DecodeSpec(mode="mock-ar").validate()  # the library offers it


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"mode": "fast"}, "mode"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"block_size": 0}, "block_size"),
        ({"steps_per_block": 0}, "steps_per_block"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"anchor": 1}, "anchor"),
        ({"anchor": True, "mode": "ar"}, "anchor"),
        ({"draft_steps": 0}, "draft_steps"),
        ({"mode": "speculative", "block_size": 1}, "block_size"),
        ({"eos_ids": [2]}, "eos_ids"),
        ({"eos_aware_commit": "yes"}, "eos_aware_commit"),
        ({"decode_step": "fast"}, "decode_step"),
        ({"decode_step": "static", "mode": "speculative"}, "decode_step"),
    ],
)
def test_one_validation_names_the_bad_option(changes, name):
    with pytest.raises(ValueError) as err:
        DecodeSpec(**changes).validate()
    assert str(err.value).startswith(name)


def test_request_and_options_round_trip_through_the_spec():
    spec = DecodeSpec(mode="speculative", max_new_tokens=7, block_size=4, draft_steps=2, seed=3, eos_ids=(2,))
    req = engine.Request.from_spec("a", [5, 6], spec)
    assert req.spec == spec and req.prompt == (5, 6)
    with pytest.raises(ValueError, match="mode"):
        engine.Request.from_spec("b", [5], replace(spec, mode="mock-ar")).validate()


@pytest.mark.parametrize("mode", ["diffusion", "ar", "speculative", "mock-ar"])
def test_every_mode_returns_the_same_typed_statistics(model, mode):
    spec = DecodeSpec(mode=mode, max_new_tokens=6, block_size=3, steps_per_block=3)
    out = run.generate(model, PROMPTS, spec)
    stats = out.stats
    assert isinstance(stats, DecodeStats) and stats.mode == mode
    assert stats["nfe"] == stats.nfe > 0 and stats.get("nfe") == stats.nfe and "seconds" not in stats
    assert stats.generated_tokens == sum(len(t) for t in out.new_tokens) == 12
    assert {f.name for f in fields(DecodeStats)} - set(stats) <= {
        "denoiser_steps_per_row",
        "steps_per_block",
        "accepted_per_block",
        "tokens_without_round",
    }  # the mapping view keeps the former keys of each mode
    assert ("denoiser_steps_per_row" in stats) == (mode in ("diffusion", "speculative"))
    if mode == "speculative":
        assert stats["mean_accepted"] == stats.mean_accepted >= 0
        assert len(stats.accepted_per_block) == 2 and all(stats.accepted_per_block)
    if mode == "diffusion":
        assert [len(b) for b in stats.steps_per_block] == [2, 2]


def test_the_dispatch_equals_the_mode_functions(model):
    common = dict(max_new_tokens=8, block_size=4, confidence_threshold=0.7, temperature=0.8, seed=5)
    want = model.generate_mask_diffusion(PROMPTS, steps_per_block=4, anchor=True, **common)
    spec = DecodeSpec(mode="diffusion", steps_per_block=4, anchor=True, **common)
    assert run.generate(model, PROMPTS, spec).new_tokens == want.new_tokens
    want = model.generate_speculative(PROMPTS, draft_steps=2, **common)
    spec = DecodeSpec(mode="speculative", draft_steps=2, **common)
    assert run.generate(model, PROMPTS, spec).new_tokens == want.new_tokens
