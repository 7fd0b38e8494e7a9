"""Runs the benchmark grid: AR and each decoding setting on the same prompts, greedy.

1. Warm-up: every setting decodes the first batch of each category once, untimed; settings that
   compile (compiled AR, compiled diffusion) decode the whole eval set once, so that every graph
   (one per batch size and capacity) is compiled before timing starts.
2. Timing, per batch size: `repeats` rounds; a round runs every setting once over the whole eval set
   (settings in an order rotated by one each round, so none always runs first). A setting's figure is
   the median over rounds of (generated tokens / seconds); its throughput ratio is the median over
   rounds of (its tokens/s / AR's tokens/s in the same round).
3. Quality: the batch-1 outputs of the first round, scored by `metrics`; quality retained =
   mean category score / AR's mean category score (the paper's definition).

Counting, everywhere: a row's generated tokens are its `new_tokens` (its EOS included when it
generated one); prompt tokens and whatever a decoder computed after EOS never count. Seconds are
wall-clock around each decoding call (the prompt's prefill included), summed over the eval set.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..decode.batch import normalise_eos
from ..decode.run import generate
from ..decode.spec import DecodeSpec
from . import metrics
from .baseline import hf_generate
from .evalset import CATEGORIES, EvalItem
from .host import cpu_flags, cpu_model

Decoder = Callable[[list[list[int]], int], object]  # (prompt id lists, max_new_tokens) -> GenerationOutput
MODES = ("ar", "ar-compiled", "diffusion", "speculative", "hf-generate")
PAPER_POINT = {"quality_retained": 98.7, "throughput_ratio": 2.42, "threshold": 0.8, "block_size": 16}


@dataclass(frozen=True)
class Setting:
    """One decoding configuration. Diffusion and speculative use threshold and block_size;
    diffusion also steps_per_block (T) and anchor (each block's first token from the AR head),
    speculative draft_steps."""

    mode: str
    threshold: float | None = None
    block_size: int | None = None
    steps_per_block: int | None = None
    draft_steps: int | None = None
    anchor: bool = False
    decode_step: str = "eager"  # diffusion: "eager", "static" or "compiled" (generate_mask_diffusion)
    eos_aware: bool = False  # diffusion: EOS-aware commits (positions after a committed EOS leave the ranking)

    def spec(self, max_new_tokens: int, eos_token_id) -> DecodeSpec:
        """The greedy `DecodeSpec` of this setting (AR-compiled: AR with the compiled step)."""
        common = dict(max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=normalise_eos(eos_token_id))
        if self.mode in ("ar", "ar-compiled"):
            return DecodeSpec(mode="ar", decode_step="compiled" if self.mode == "ar-compiled" else "eager", **common)
        block = dict(block_size=self.block_size, confidence_threshold=self.threshold)
        if self.mode == "speculative":
            return DecodeSpec(mode="speculative", draft_steps=self.draft_steps, **block, **common)
        return DecodeSpec(
            mode="diffusion", steps_per_block=self.steps_per_block, anchor=self.anchor, decode_step=self.decode_step,
            eos_aware_commit=self.eos_aware, **block, **common,
        )  # fmt: skip

    @property
    def compiles(self) -> bool:
        return self.mode == "ar-compiled" or self.decode_step == "compiled"

    @property
    def label(self) -> str:
        if self.mode == "ar":
            return "AR"
        if self.mode == "ar-compiled":
            return "AR, compiled decode step"
        if self.mode == "hf-generate":
            return "transformers generate (AR weights)"
        if self.mode == "diffusion":
            anchored = ", anchored" if self.anchor else ""
            eos_aware = ", EOS-aware" if self.eos_aware else ""
            step = "" if self.decode_step == "eager" else f", {self.decode_step}"
            return f"diffusion γ={self.threshold:g} S={self.block_size} T={self.steps_per_block}{anchored}{eos_aware}{step}"
        return f"speculative γ={self.threshold:g} S={self.block_size} draft={self.draft_steps}"


def settings_grid(
    *,
    thresholds: Sequence[float],
    block_sizes: Sequence[int],
    steps_per_block: int | None = None,
    draft_steps: Sequence[int] = (),
    hf: bool = False,
    ar_compiled: bool = False,
    anchor: bool = False,
    diffusion_steps: Sequence[str] = ("eager",),
    eos_aware: bool = False,
) -> list[Setting]:
    """AR first, then diffusion for each (block size, threshold, decode step in `diffusion_steps`)
    (with `anchor`, each followed by its anchored twin; with `eos_aware`, by its EOS-aware twin), speculative for each (block size,
    threshold, draft steps), then the transformers baseline. T defaults to S. Repeated values are
    run once."""
    grid = [Setting("ar")] + ([Setting("ar-compiled")] if ar_compiled else [])
    for s in block_sizes:
        for g in thresholds:
            for step in diffusion_steps:
                grid.append(Setting("diffusion", g, s, steps_per_block or s, decode_step=step))
                if anchor:
                    grid.append(Setting("diffusion", g, s, steps_per_block or s, anchor=True, decode_step=step))
                if eos_aware:
                    grid.append(Setting("diffusion", g, s, steps_per_block or s, decode_step=step, eos_aware=True))
    for s in block_sizes:
        grid += [Setting("speculative", g, s, draft_steps=d) for g in thresholds for d in draft_steps]
    if hf:
        grid.append(Setting("hf-generate"))
    return list(dict.fromkeys(grid))


# ---- results -----------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    id: str
    category: str
    completion: str
    tokens: int  # generated tokens, EOS included
    hit_eos: bool
    score: float | None  # [0, 100]; None only for an empty completion of a text item
    details: dict = field(default_factory=dict)  # parsed answer / judge log-probability, entropy, repetition


@dataclass
class Throughput:
    batch_size: int
    tokens: int  # generated tokens over the eval set (first round)
    seconds: list[float]  # per round
    tokens_per_second: float  # median over rounds
    ratios: list[float]  # per round: this setting's tokens/s over AR's
    ratio_to_ar: float  # median of ratios
    agreement: float  # share of items whose output equals the batch-1 output


@dataclass
class SettingResult:
    setting: Setting
    scores: dict[str, float]  # per category, [0, 100]
    mean_score: float
    quality_retained: float | None  # percent of AR's mean score; None when AR scores 0
    diversity: dict[str, dict[str, float]]  # per category: mean entropy (bits), repetition; text: judge J
    tokens: int  # batch 1, whole eval set
    nfe: int  # batch 1: AR forwards, or denoiser forwards (diffusion, speculative)
    tokens_per_forward: float | None  # None when no forward ran (anchored S=1: every token is the AR head's)
    context_forwards: int | None
    throughput: dict[int, Throughput]
    deterministic: bool  # batch-1 outputs identical in every round
    items: list[ItemResult]
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.setting.label


@dataclass
class BenchResult:
    rows: list[SettingResult]
    options: dict
    environment: dict
    notes: list[str] = field(default_factory=list)

    def row(self, mode: str, **match) -> SettingResult | None:
        for r in self.rows:
            if r.setting.mode == mode and all(getattr(r.setting, k) == v for k, v in match.items()):
                return r
        return None


@dataclass
class _Round:
    outputs: dict[str, list[int]]  # item id -> generated tokens
    seconds: float
    nfe: int
    context_forwards: int
    accepted: list[float]


# ---- decoders ----------------------------------------------------------------------------------------
def make_decoder(setting: Setting, model, *, eos_token_id, hf_model=None) -> Decoder:
    """A function (prompt id lists, max_new_tokens) -> GenerationOutput for one setting, greedy."""
    if setting.mode in ("ar", "ar-compiled", "diffusion", "speculative"):
        return lambda p, n: generate(model, p, setting.spec(n, eos_token_id))
    if setting.mode == "hf-generate":
        if hf_model is None:
            raise ValueError("the hf-generate setting needs the transformers model (hf_model)")
        pad = model.config.pad_token_id
        return lambda p, n: hf_generate(hf_model, p, max_new_tokens=n, eos_token_id=eos_token_id, pad_token_id=pad)
    raise ValueError(f"unknown decoding mode {setting.mode!r}; choose from {MODES}")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """BOS + the prompt's tokens: how every training document starts."""
    ids = tokenizer.encode(text)
    return [tokenizer.bos_id, *ids] if tokenizer.bos_id is not None else ids


def make_batches(items: Sequence[EvalItem], batch_size: int) -> list[list[EvalItem]]:
    """Consecutive items of one category (one max_new_tokens), at most `batch_size` per batch."""
    batches: list[list[EvalItem]] = []
    for category in CATEGORIES:
        group = [i for i in items if i.category == category]
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    return batches


# ---- running ------------------------------------------------------------------------------------------
def _run_round(decode: Decoder, batches: list[list[EvalItem]], prompts: dict[str, list[int]]) -> _Round:
    outputs, seconds, nfe, ctx, accepted = {}, 0.0, 0, 0, []
    for batch in batches:
        ids = [prompts[item.id] for item in batch]
        start = time.perf_counter()
        out = decode(ids, max(item.max_new_tokens for item in batch))
        seconds += time.perf_counter() - start
        for item, row in zip(batch, out.new_tokens, strict=True):
            outputs[item.id] = list(row)
        nfe += int(out.stats.get("nfe", 0))
        ctx += int(out.stats.get("context_forwards", 0))
        accepted += [float(a) for a in _flat(out.stats.get("accepted_per_block", []))]
    return _Round(outputs, seconds, nfe, ctx, accepted)


def _flat(values) -> list:
    return [v for x in values for v in (_flat(x) if isinstance(x, (list, tuple)) else [x])]


def _rotated(seq: list, k: int) -> list:
    k %= max(len(seq), 1)
    return seq[k:] + seq[:k]


@torch.inference_mode()
def run_benchmark(
    model,
    tokenizer,
    items: Sequence[EvalItem],
    *,
    settings: Sequence[Setting],
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 3,
    hf_model=None,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time and score every setting (see the module docstring). `settings` must hold one AR setting;
    batch size 1 is always run (quality is scored on it)."""
    settings = list(settings)
    if [s.mode for s in settings].count("ar") != 1:
        raise ValueError("the settings must include exactly one AR setting (the reference)")
    if repeats < 1 or any(b < 1 for b in batch_sizes):
        raise ValueError("repeats and batch sizes must be >= 1")
    if not items:
        raise ValueError("no eval items")
    batch_sizes = sorted({1, *batch_sizes})
    eos = list(model.config.eos_token_ids)  # the one EOS set (twotower.loading.resolve_special_ids)
    decoders = {s: make_decoder(s, model, eos_token_id=eos, hf_model=hf_model) for s in settings}
    prompts = {item.id: encode_prompt(tokenizer, item.prompt) for item in items}
    say = log or (lambda _msg: None)

    rounds: dict[tuple[Setting, int], list[_Round]] = {(s, b): [] for s in settings for b in batch_sizes}
    for b in batch_sizes:
        batches = make_batches(items, b)
        warm = list({x[0].category: x for x in reversed(batches)}.values())  # first batch of each category
        for s in settings:  # a compiling setting sees every shape once (one graph per batch and capacity)
            _run_round(decoders[s], batches if s.compiles else warm, prompts)
        for r in range(repeats):
            for s in _rotated(settings, r):
                rec = _run_round(decoders[s], batches, prompts)
                rounds[(s, b)].append(rec)
                tokens = sum(len(t) for t in rec.outputs.values())
                say(f"batch {b} round {r + 1}/{repeats}: {s.label}: {tokens / rec.seconds:.1f} tokens/s")

    ar = settings[[s.mode for s in settings].index("ar")]
    rows = [_summarise(s, rounds, ar, model, tokenizer, items, prompts, batch_sizes) for s in settings]
    ar_mean = rows[settings.index(ar)].mean_score
    for row in rows:
        row.quality_retained = 100.0 * row.mean_score / ar_mean if ar_mean > 0 else None
    options = {
        "batch_sizes": batch_sizes,
        "repeats": repeats,
        "settings": [s.__dict__ for s in settings],
        "items": {c: sum(i.category == c for i in items) for c in CATEGORIES},
        "greedy": True,
    }
    return BenchResult(rows, options, environment=describe_environment(model), notes=_notes(model, settings))


def describe_environment(model) -> dict:
    """What the timings depend on: versions, threads, device, dtype, model size, machine load."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(model.context_device),
        "dtype": str(model.context_lm_head.weight.dtype).removeprefix("torch."),
        "context_parameters": count(model.context_tower) + count(model.context_lm_head),
        "denoiser_parameters": sum(p.numel() for p in model.denoiser_parameters()),
        "trained_block_size": model.trained_block_size,
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _notes(model, settings: Sequence[Setting]) -> list[str]:
    trained = model.trained_block_size
    too_big = sorted({s.block_size for s in settings if trained and s.block_size and s.block_size > trained})
    if too_big:
        return [
            f"block sizes {too_big} exceed the trained block size {trained}: quality is expected to collapse (SPEC 4)"
        ]
    return []


def _summarise(setting, rounds, ar, model, tokenizer, items, prompts, batch_sizes) -> SettingResult:
    first = rounds[(setting, 1)][0]
    scored = [score_item(item, first.outputs[item.id], model, tokenizer, prompts[item.id]) for item in items]
    scores, diversity = {}, {}
    for c in CATEGORIES:
        group = [x for x in scored if x.category == c]
        if group:
            scores[c] = statistics.fmean(x.score or 0.0 for x in group)
            keys = ("entropy", "repetition", "judge") if c == "text" else ("entropy", "repetition")
            diversity[c] = {k: statistics.fmean(x.details[k] or 0.0 for x in group) for k in keys}
    tokens = sum(len(t) for t in first.outputs.values())
    throughput = {b: _throughput(rounds[(setting, b)], rounds[(ar, b)], first, b) for b in batch_sizes}
    extra = {"accepted_per_block": statistics.fmean(first.accepted)} if first.accepted else {}
    return SettingResult(
        setting=setting,
        scores=scores,
        mean_score=statistics.fmean(scores.values()),
        quality_retained=None,
        diversity=diversity,
        tokens=tokens,
        nfe=first.nfe,
        tokens_per_forward=tokens / first.nfe if first.nfe else None,
        context_forwards=first.context_forwards if setting.mode in ("diffusion", "speculative") else None,
        throughput=throughput,
        deterministic=all(r.outputs == first.outputs for r in rounds[(setting, 1)]),
        items=scored,
        extra=extra,
    )


def _throughput(mine: list[_Round], ar: list[_Round], reference: _Round, batch_size: int) -> Throughput:
    def tps(rec: _Round) -> float:
        return sum(len(t) for t in rec.outputs.values()) / rec.seconds

    ratios = [tps(m) / tps(a) for m, a in zip(mine, ar, strict=True)]
    same = sum(mine[0].outputs[k] == reference.outputs[k] for k in reference.outputs)
    return Throughput(
        batch_size=batch_size,
        tokens=sum(len(t) for t in mine[0].outputs.values()),
        seconds=[r.seconds for r in mine],
        tokens_per_second=statistics.median(tps(r) for r in mine),
        ratios=ratios,
        ratio_to_ar=statistics.median(ratios),
        agreement=same / len(reference.outputs),
    )


def score_item(item: EvalItem, tokens: list[int], model, tokenizer, prompt_ids: list[int]) -> ItemResult:
    """Score one completion (token ids, EOS included if generated) by its category's metric."""
    eos_ids = set(model.config.eos_token_ids)
    hit_eos = bool(tokens) and tokens[-1] in eos_ids
    body = tokens[:-1] if hit_eos else tokens
    text = tokenizer.decode(body)
    details = {"entropy": metrics.unigram_entropy(body), "repetition": metrics.repetition_rate(body)}
    if item.category == "math":
        details["parsed_answer"] = metrics.parse_math_answer(text)
        score = metrics.math_score(text, item.answer)
    elif item.category == "code":
        ran_out = not hit_eos and len(tokens) >= item.max_new_tokens
        score = metrics.code_score(item.prompt, text, ran_out=ran_out)
    else:
        logprobs = metrics.judge_logprobs(model, prompt_ids, tokens)
        details["judge_mean_logprob"] = statistics.fmean(logprobs) if logprobs else None
        details["judge"] = metrics.judge_score(logprobs)
        score = metrics.text_score(logprobs, body)
    return ItemResult(item.id, item.category, text, len(tokens), hit_eos, score, details)
