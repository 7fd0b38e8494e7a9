"""Bad arguments to the decoding API get a ValueError saying what is wrong, before any cache is
sized and without harming other requests in a shared batch."""

from __future__ import annotations

import pytest
import torch

from tests.serve.models import make_two_tower
from twotower.decode.diffusion import generate_mask_diffusion
from twotower.decode.request import Request
from twotower.decode.scheduler import Scheduler
from twotower.decode.speculative import generate_speculative
from twotower.decode.twotower import generate_ar


@pytest.fixture(scope="module")
def model():
    return make_two_tower(seed=1)


GENERATORS = [generate_mask_diffusion, generate_speculative, generate_ar]


@pytest.mark.parametrize("generate", GENERATORS)
@pytest.mark.parametrize("bad", [[[5, 6, 10_000]], [[-3, 5]], torch.tensor([[5, 99_999]])])
def test_token_ids_outside_the_vocabulary_are_refused(model, generate, bad):
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {model.config.vocab_size}\)"):
        generate(model, bad, max_new_tokens=4)


@pytest.mark.parametrize("generate", GENERATORS)
def test_a_flat_list_is_not_a_batch(model, generate):
    with pytest.raises(ValueError, match=r"wrap a single prompt as \[\[\.\.\.\]\]"):
        generate(model, [5, 6, 7], max_new_tokens=4)


@pytest.mark.parametrize("max_new_tokens", [-3, 4.0, True])
def test_a_bad_budget_is_refused_before_a_cache_is_sized(model, tiny_model, max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer"):
        generate_ar(model, [[5, 6]], max_new_tokens=max_new_tokens)
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer"):
        tiny_model.generate([[5, 6]], max_new_tokens=max_new_tokens)  # the NemotronH backbone's own


def test_a_request_with_bad_ids_is_refused_and_the_batch_goes_on(model):
    scheduler = Scheduler(model, max_batch_size=4)
    good = Request("good", [5, 6, 7], max_new_tokens=8)
    scheduler.submit(good)
    with pytest.raises(ValueError, match="token id 10000 is outside the vocabulary"):
        scheduler.submit(Request("bad", [5, 10_000], max_new_tokens=8))
    events = []
    while not scheduler.idle:
        events += scheduler.step()
    alone = generate_mask_diffusion(model, [[5, 6, 7]], max_new_tokens=8).new_tokens[0]
    assert [t for e in events if e.request_id == "good" for t in e.tokens] == alone


def test_the_block_size_warning_names_the_caller_and_only_real_blocks(model, monkeypatch):
    import warnings

    monkeypatch.setitem(model.config.extra, "block_size", 4)
    with pytest.warns(UserWarning, match="block_size 8 exceeds the trained block size 4") as caught:
        generate_mask_diffusion(model, [[5, 6]], max_new_tokens=8, block_size=8)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3 new tokens: the one block it decodes is 3 long, not 8
        generate_mask_diffusion(model, [[5, 6]], max_new_tokens=3, block_size=8)


@pytest.mark.parametrize("generate", GENERATORS)
@pytest.mark.parametrize("eos", [10_000, -1])
def test_eos_ids_outside_the_vocabulary_are_refused(model, generate, eos):
    with pytest.raises(ValueError, match=f"EOS id {eos} is outside the vocabulary"):
        generate(model, [[5, 6]], max_new_tokens=4, eos_token_id=eos)
    with pytest.raises(ValueError, match=f"EOS id {eos} is outside the vocabulary"):
        Scheduler(model).submit(Request("r", [5, 6], max_new_tokens=4, eos_ids=(eos,)))
