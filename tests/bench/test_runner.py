"""The runner on a tiny random TwoTower: every field present, tokens counted honestly (prompt tokens
and post-EOS positions excluded, checked against decoding the same prompts directly), interleaved
ratios, the speculative and transformers rows."""

from __future__ import annotations

from dataclasses import replace

import pytest

import twotower.decode.run
from tests.bench.conftest import EOS, SMALL_BATCH, make_tiny_twotower
from twotower.bench.evalset import CATEGORIES
from twotower.bench.report import markdown_table
from twotower.bench.runner import (
    Setting,
    encode_prompt,
    make_batches,
    make_decoder,
    run_benchmark,
    settings_grid,
)
from twotower.decode.batch import GenerationOutput


def count_from_sequences(out, width: int) -> list[int]:
    """Generated tokens per row read off the padded sequences: up to and including the first EOS."""
    counts = []
    for row in out.sequences[:, width:].tolist():
        counts.append(row.index(EOS) + 1 if EOS in row else len(row))
    return counts


def direct(model, setting: Setting, prompts, n):
    """Decode without the runner's decoder table."""
    if setting.mode == "ar":
        return model.generate_ar(prompts, max_new_tokens=n, eos_token_id=EOS)
    return model.generate_mask_diffusion(
        prompts,
        max_new_tokens=n,
        eos_token_id=EOS,
        block_size=setting.block_size,
        steps_per_block=setting.steps_per_block,
        confidence_threshold=setting.threshold,
    )


def test_every_row_has_every_field(bench_result, small_items):
    assert [r.setting.mode for r in bench_result.rows] == ["ar", "diffusion", "diffusion"]
    assert bench_result.options["batch_sizes"] == [1, SMALL_BATCH]
    assert bench_result.environment["torch_threads"] == 1
    assert bench_result.environment["cpu_model"] and isinstance(bench_result.environment["cpu_flags"], list)
    for row in bench_result.rows:
        assert set(row.scores) == set(CATEGORIES) == set(row.diversity)
        assert all(0.0 <= s <= 100.0 for s in row.scores.values())
        assert row.mean_score == pytest.approx(sum(row.scores.values()) / 3)
        assert row.quality_retained == pytest.approx(100.0 * row.mean_score / bench_result.rows[0].mean_score)
        assert row.deterministic
        assert len(row.items) == len(small_items)
        assert row.nfe > 0 and row.tokens_per_forward == pytest.approx(row.tokens / row.nfe)
        for b in (1, SMALL_BATCH):
            t = row.throughput[b]
            assert len(t.seconds) == len(t.ratios) == 2
            assert t.tokens_per_second > 0 and t.ratio_to_ar > 0 and 0.0 <= t.agreement <= 1.0
        for item in row.items:
            assert item.details["entropy"] >= 0.0 and 0.0 <= item.details["repetition"] <= 1.0
            if item.category == "text":  # the judge's score, discounted by repetition
                assert item.score == pytest.approx(item.details["judge"] * (1 - item.details["repetition"]))
        assert row.diversity["text"]["judge"] > 0.0
    ar = bench_result.rows[0]
    assert ar.quality_retained == 100.0 and ar.tokens_per_forward == 1.0 and ar.context_forwards is None
    assert all(t.ratios == [1.0, 1.0] for t in ar.throughput.values())
    assert all(r.context_forwards > 0 for r in bench_result.rows[1:])


def test_both_eos_and_running_out_are_exercised(bench_result):
    hits = [i.hit_eos for row in bench_result.rows for i in row.items]
    assert any(hits) and not all(hits)


def test_batch_one_tokens_match_direct_decoding(bench_result, tiny_model, tokenizer, small_items):
    for row in bench_result.rows:
        total = nfe = 0
        for item, result in zip(small_items, row.items, strict=True):
            prompt = encode_prompt(tokenizer, item.prompt)
            out = direct(tiny_model, row.setting, [prompt], item.max_new_tokens)
            assert result.tokens == count_from_sequences(out, len(prompt))[0] == len(out.new_tokens[0])
            assert result.tokens <= item.max_new_tokens
            assert result.hit_eos == (EOS in out.new_tokens[0])
            assert result.completion == tokenizer.decode([t for t in out.new_tokens[0] if t != EOS])
            total += result.tokens
            nfe += out.stats["nfe"]
        assert row.tokens == row.throughput[1].tokens == total
        assert row.nfe == nfe


def test_batched_tokens_exclude_padding_after_eos(bench_result, tiny_model, tokenizer, small_items):
    batches = make_batches(small_items, SMALL_BATCH)
    assert [len(b) for b in batches] == [2, 2, 2]  # one category (one max_new_tokens) per batch
    for row in bench_result.rows:
        total = 0
        for batch in batches:
            prompts = [encode_prompt(tokenizer, i.prompt) for i in batch]
            out = direct(tiny_model, row.setting, prompts, batch[0].max_new_tokens)
            total += sum(count_from_sequences(out, max(len(p) for p in prompts)))
        assert row.throughput[SMALL_BATCH].tokens == total


def test_settings_grid():
    grid = settings_grid(thresholds=[0.9, 0.8], block_sizes=[16, 8], steps_per_block=None, draft_steps=[1, 2], hf=True)
    assert grid[0] == Setting("ar") and grid[-1] == Setting("hf-generate")
    diffusion = [s for s in grid if s.mode == "diffusion"]
    assert [(s.block_size, s.threshold, s.steps_per_block) for s in diffusion] == [
        (16, 0.9, 16),
        (16, 0.8, 16),
        (8, 0.9, 8),
        (8, 0.8, 8),
    ]
    assert len([s for s in grid if s.mode == "speculative"]) == 8
    assert settings_grid(thresholds=[0.8], block_sizes=[16], steps_per_block=4)[1].steps_per_block == 4
    assert len(settings_grid(thresholds=[0.8, 0.8], block_sizes=[16, 16])) == 2  # AR + one diffusion setting
    assert Setting("diffusion", 0.8, 16, 16).label == "diffusion γ=0.8 S=16 T=16"
    anchored = settings_grid(thresholds=[0.9, 0.8], block_sizes=[16], anchor=True)
    assert [(s.threshold, s.anchor) for s in anchored[1:]] == [(0.9, False), (0.9, True), (0.8, False), (0.8, True)]
    assert anchored[2].label == "diffusion γ=0.9 S=16 T=16, anchored"
    stepped = settings_grid(thresholds=[0.8], block_sizes=[16], diffusion_steps=["eager", "compiled"])
    assert [s.decode_step for s in stepped[1:]] == ["eager", "compiled"]
    assert stepped[2].label == "diffusion γ=0.8 S=16 T=16, compiled"


def test_anchored_row_decodes_like_anchored_diffusion(tiny_model):
    setting = Setting("diffusion", 0.8, 4, 4, anchor=True)
    decode = make_decoder(setting, tiny_model, eos_token_id=EOS)
    prompts = [[5, 6, 7], [8, 9]]
    want = tiny_model.generate_mask_diffusion(prompts, max_new_tokens=9, block_size=4, confidence_threshold=0.8,
                                              eos_token_id=EOS, anchor=True)  # fmt: skip
    assert decode(prompts, 9).new_tokens == want.new_tokens
    plain = make_decoder(Setting("diffusion", 0.8, 4, 4), tiny_model, eos_token_id=EOS)(prompts, 9)
    assert plain.new_tokens != want.new_tokens  # the anchor really reached the decoder
    static = make_decoder(replace(setting, decode_step="static"), tiny_model, eos_token_id=EOS)(prompts, 9)
    assert static.new_tokens == want.new_tokens and static.stats["settings"]["decode_step"] == "static"


def test_eos_aware_rows_are_twins_that_reach_the_decoder(tiny_model):
    grid = settings_grid(thresholds=[0.9], block_sizes=[4], steps_per_block=4, eos_aware=True)
    assert [(s.mode, s.eos_aware) for s in grid] == [("ar", False), ("diffusion", False), ("diffusion", True)]
    assert grid[2].label == "diffusion γ=0.9 S=4 T=4, EOS-aware"
    prompts = [[5, 6, 7], [8, 9]]
    got = make_decoder(grid[2], tiny_model, eos_token_id=EOS)(prompts, 9)
    want = tiny_model.generate_mask_diffusion(prompts, max_new_tokens=9, block_size=4, confidence_threshold=0.9,
                                              eos_token_id=EOS, eos_aware_commit=True)  # fmt: skip
    assert got.new_tokens == want.new_tokens and got.stats["settings"]["eos_aware_commit"] is True


def test_compiled_ar_row_decodes_exactly_like_ar(tiny_model):
    grid = settings_grid(thresholds=[0.8], block_sizes=[16], ar_compiled=True)
    assert grid[:2] == [Setting("ar"), Setting("ar-compiled")]
    assert grid[1].label == "AR, compiled decode step"
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    compiled = make_decoder(grid[1], tiny_model, eos_token_id=EOS)(prompts, 12)
    assert compiled.new_tokens == direct(tiny_model, Setting("ar"), prompts, 12).new_tokens


def test_bad_grids_are_refused(tiny_model, tokenizer, small_items):
    with pytest.raises(ValueError, match="exactly one AR"):
        run_benchmark(tiny_model, tokenizer, small_items, settings=[Setting("diffusion", 0.8, 8, 8)])
    with pytest.raises(ValueError, match="repeats"):
        run_benchmark(tiny_model, tokenizer, small_items, settings=[Setting("ar")], repeats=0)
    with pytest.raises(ValueError, match="unknown decoding mode"):
        make_decoder(Setting("beam"), tiny_model, eos_token_id=EOS)
    with pytest.raises(ValueError, match="hf_model"):
        make_decoder(Setting("hf-generate"), tiny_model, eos_token_id=EOS)


def test_speculative_rows_go_through_the_one_dispatch(tokenizer, small_items, monkeypatch):
    model = make_tiny_twotower()
    calls = []

    def generate_speculative(m, prompts, *, max_new_tokens, block_size, draft_steps, confidence_threshold, **kw):
        assert m is model
        calls.append((block_size, draft_steps, confidence_threshold, kw["temperature"], kw["eos_token_id"]))
        out = model.generate_ar(prompts, max_new_tokens=max_new_tokens, eos_token_id=kw["eos_token_id"])
        stats = {"nfe": 3, "context_forwards": 2, "accepted_per_block": [[2, 4]] * len(prompts)}
        return GenerationOutput(out.sequences, out.prompt_lengths, out.new_tokens, stats)

    monkeypatch.setattr(twotower.decode.run, "generate_speculative", generate_speculative)
    items = small_items[::2]  # one item per category
    settings = settings_grid(thresholds=[0.8], block_sizes=[8], draft_steps=[2])
    settings = [s for s in settings if s.mode != "diffusion"]
    result = run_benchmark(model, tokenizer, items, settings=settings, batch_sizes=[1], repeats=1)
    spec = result.row("speculative", draft_steps=2)
    assert calls[0] == (8, 2, 0.8, 0.0, [EOS])
    assert spec.quality_retained == 100.0 and spec.scores == result.rows[0].scores
    assert spec.nfe == 3 * len(items) and spec.context_forwards == 2 * len(items)
    assert spec.extra["accepted_per_block"] == 3.0


def test_transformers_generate_row_matches_our_ar(tiny_model, tokenizer, small_items):
    pytest.importorskip("transformers")
    from twotower.bench.baseline import load_hf_baseline

    items = [i for i in small_items if i.category != "code"]
    hf = load_hf_baseline(tiny_model)
    settings = [Setting("ar"), Setting("hf-generate")]
    result = run_benchmark(tiny_model, tokenizer, items, settings=settings, batch_sizes=[2], repeats=1, hf_model=hf)
    ours, theirs = result.rows
    assert [i.completion for i in theirs.items] == [i.completion for i in ours.items]
    assert [i.tokens for i in theirs.items] == [i.tokens for i in ours.items]
    assert theirs.quality_retained == pytest.approx(100.0)
    assert theirs.throughput[2].tokens == ours.throughput[2].tokens


def test_anchored_one_token_blocks_have_no_forwards_and_equal_ar(tiny_model, tokenizer, small_items):
    """Anchored S=1 is AR decoding: no denoiser forward (tokens per forward is undefined, not 0)."""
    settings = [Setting("ar"), Setting("diffusion", 0.8, 1, 1, anchor=True)]
    result = run_benchmark(tiny_model, tokenizer, small_items, settings=settings, batch_sizes=(1,), repeats=1)
    ar, anchored = result.rows
    assert anchored.nfe == 0 and anchored.tokens_per_forward is None
    assert [i.completion for i in anchored.items] == [i.completion for i in ar.items]
    assert anchored.quality_retained == 100.0
    assert "| diffusion γ=0.8 S=1 T=1, anchored |" in markdown_table(result)
