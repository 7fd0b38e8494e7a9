"""lm-evaluation-harness adapter for TwoTower checkpoints, registered as model `twotower`.

- `loglikelihood` / `loglikelihood_rolling`: exact, through the frozen context tower (`scoring`), in
  every mode: the decoding mode changes how text is generated, not what the checkpoint's AR
  likelihood of a string is.
- `generate_until`: batched generation in the chosen decoding mode (`diffusion`, `ar`, `speculative`,
  `mock-ar`; one `DecodeSpec` through `decode.run.generate`, the library's one dispatch), cut at the
  first stop string (after generation: the batched loops stop at EOS or the budget). With
  `engine=true` the requests run on the continuous-batching engine instead (`continuous`): a row
  stops at its first stop string and the next request takes its place. Speed statistics (NFE,
  tokens per forward, tokens/s) accumulate in `speed` across calls.

Text handling: every context starts with the tokenizer's BOS token (documents were trained as
`bos ... eos`); trailing spaces of a context move to the front of its continuation, and context and
continuation are encoded separately, so the continuation's tokens are exactly the ones scored.

    lm_eval.simple_evaluate(model="twotower",
                            model_args="pretrained=PATH,mode=diffusion,confidence_threshold=0.8", ...)
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import lm_eval.models  # noqa: F401  (registers the harness's own models first; see `get_model`)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..decode.engine import EngineStats, Request
from ..decode.run import generate
from ..decode.sampling import check_sampling_options
from ..decode.scheduler import Scheduler
from ..decode.spec import DEFAULT_DRAFT_STEPS
from ..dtypes import resolve_dtype
from ..stops import cut_at_stop
from .continuous import Generated, Job, generate_continuously
from .scoring import score_continuations
from .settings import DEFAULT_MAX_GEN_TOKS, MODES, EvalSettings, SpeedStats, parse_batch_size

__all__ = ["MODEL_NAME", "MODES", "EvalSettings", "SpeedStats", "TwoTowerLM", "parse_batch_size", "register"]

log = logging.getLogger(__name__)

MODEL_NAME = "twotower"
DEFAULT_MAX_LENGTH = 4096  # used when the config names no max_position_embeddings


# ---- the adapter ------------------------------------------------------------------------------------
def _load(pretrained: str | None, *, device: str | None, denoiser_device: str | None, dtype, quantize: str):
    """Model + tokenizer; each tower is streamed straight onto its own device."""
    from ..loading import load_for_inference

    return load_for_inference(
        pretrained, device=device or "cpu", denoiser_device=denoiser_device, dtype=dtype, quantize=quantize
    )


@dataclass
class _GenRequest:
    index: int
    prompt: list[int]
    until: tuple[str, ...]
    max_gen_toks: int
    temperature: float
    context: str = field(repr=False, default="")
    gen_kwargs: dict = field(repr=False, default_factory=dict)


class TwoTowerLM(LM):
    """A TwoTower checkpoint behind the harness's three request types (see the module docstring).

    model_args: pretrained (checkpoint dir; default the bundled twotower-tiny), mode, block_size,
    steps_per_block, confidence_threshold, temperature, top_k, max_gen_toks (when a task sets none),
    max_gen_toks_cap (every task's budget at most this), max_length,
    batch_size, device, denoiser_device (towers on two devices), dtype (auto|float32|bfloat16|float16; auto = as stored), quantize (none|int8-experts),
    seed, anchor (diffusion: each block's first token from the context tower), draft_steps
    (speculative), eos_aware_commit (diffusion), engine (generate_until on the continuous-batching
    engine: rows stop at their stop strings), engine_step (its steps: auto|eager|static|compiled).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        mode: str = "diffusion",
        block_size: int = 16,
        steps_per_block: int = 16,
        confidence_threshold: float = 0.9,
        temperature: float | None = None,
        top_k: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_gen_toks_cap: int | None = None,
        max_length: int | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        denoiser_device: str | None = None,
        dtype: str | torch.dtype = "auto",
        quantize: str = "none",
        seed: int = 0,
        anchor: bool = False,
        draft_steps: int = DEFAULT_DRAFT_STEPS,
        eos_aware_commit: bool = False,
        engine: bool = False,
        engine_step: str = "auto",
        max_batch_size: int | None = None,  # passed by simple_evaluate; unused
        loaded=None,
    ) -> None:
        super().__init__()
        self.settings = EvalSettings(
            mode=mode,
            block_size=block_size,
            steps_per_block=steps_per_block,
            confidence_threshold=confidence_threshold,
            temperature=temperature,
            top_k=top_k,
            max_gen_toks=max_gen_toks,
            max_gen_toks_cap=max_gen_toks_cap,
            max_length=max_length,
            batch_size=parse_batch_size(batch_size),
            seed=seed,
            anchor=anchor,
            draft_steps=draft_steps,
            eos_aware_commit=eos_aware_commit,
            engine=engine,
            engine_step=engine_step,
        )
        self.settings.validate()
        if loaded is None:
            resolve_dtype(dtype)  # a bad name fails before any file is read
            loaded = _load(pretrained, device=device, denoiser_device=denoiser_device, dtype=dtype, quantize=quantize)
        elif denoiser_device is not None:
            loaded.model.place_towers_on_devices(device or loaded.model.context_device, denoiser_device)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_name = getattr(loaded, "name", str(pretrained))
        self._device = self.model.context_device
        if self.tokenizer.bos_id is None:
            raise ValueError("the tokenizer has no BOS token, which every context starts with")
        configured = self.model.config.extra.get("max_position_embeddings")
        self.max_length = int(max_length or configured or DEFAULT_MAX_LENGTH)
        self.eos_ids = tuple(self.model.config.eos_token_ids)  # the one EOS set (loading.resolve_special_ids)
        self.speed = SpeedStats(self.settings.mode)
        self._generate_calls = 0
        self._scheduler: Scheduler | None = None  # engine=true: one for the adapter's life (compiled steps persist)
        self._engine_requests = 0  # engine=true: requests submitted so far (each row's seed offset)

    @classmethod
    def from_loaded(cls, loaded, **settings) -> TwoTowerLM:
        """An adapter around an already loaded `twotower.loading.Loaded` (model + tokenizer)."""
        return cls(loaded=loaded, **settings)

    def get_model_info(self) -> dict:
        """Recorded by the harness in results['config']."""
        return {"model_name": self.model_name, "twotower": {**asdict(self.settings), "max_length": self.max_length}}

    # ---- text -> ids ------------------------------------------------------------------------------
    def _context_ids(self, context: str) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(context)]

    def _pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Trailing spaces of the context belong to the continuation (word-initial tokens)."""
        n_spaces = len(context) - len(context.rstrip(" "))
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        return self._context_ids(context), self.tokenizer.encode(continuation)

    # ---- loglikelihood ----------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair_ids(*req.args) for req in requests]
        empty = [i for i, (_, cont) in enumerate(pairs) if not cont]
        if empty:
            raise ValueError(f"loglikelihood request {empty[0]} has an empty continuation")
        scores = self._score([c for c, _ in pairs], [t for _, t in pairs], desc="loglikelihood")
        for req, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", req.args, tuple(score))
        return [(score.logprob, score.is_greedy) for score in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's full log-likelihood after BOS; strings longer than `max_length` are scored
        in disjoint windows that each keep as much preceding context as fits."""
        contexts, continuations, owner = [], [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tokenizer.encode(text)
            windows = get_rolling_token_windows(tokens, self.tokenizer.bos_id, self.max_length, 1)
            for ctx, cont in map(make_disjoint_window, windows):
                contexts.append(ctx)
                continuations.append(cont)
                owner.append(i)
        scores = self._score(contexts, continuations, desc="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, score in zip(owner, scores):
            totals[i] += score.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _score(self, contexts, continuations, *, desc: str):
        """score_continuations in chunks, so that the progress bar moves on long tasks."""
        chunk = self.settings.batch_size * 16
        out = []
        for start in tqdm(range(0, len(contexts), chunk), desc=desc, disable=len(contexts) <= chunk):
            out += score_continuations(
                self.model,
                contexts[start : start + chunk],
                continuations[start : start + chunk],
                batch_size=self.settings.batch_size,
                max_length=self.max_length,
            )
        return out

    # ---- generation -------------------------------------------------------------------------------
    def _gen_request(self, index: int, context: str, gen_kwargs: dict) -> _GenRequest:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else until
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"request {index}: until must be a string or a list of strings, got {until!r}")
        until = tuple(s for s in until if s)  # an empty stop string would cut every text to nothing
        max_gen_toks = kwargs.get("max_gen_toks", self.settings.max_gen_toks)
        if not isinstance(max_gen_toks, int) or isinstance(max_gen_toks, bool) or max_gen_toks < 1:
            raise ValueError(f"request {index}: max_gen_toks must be a positive integer, got {max_gen_toks!r}")
        if self.settings.max_gen_toks_cap is not None:
            max_gen_toks = min(max_gen_toks, self.settings.max_gen_toks_cap)
        if self.settings.temperature is not None:
            temperature = float(self.settings.temperature)
        else:
            temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
        check_sampling_options(temperature=temperature, top_k=self.settings.top_k)
        budget = self.max_length - max_gen_toks
        if budget < 1:
            raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in max_length {self.max_length}")
        prompt = self._context_ids(context)
        if len(prompt) > budget:  # keep the end of the prompt, and its BOS
            prompt = [prompt[0], *prompt[len(prompt) - budget + 1 :]] if budget > 1 else prompt[-1:]
        return _GenRequest(index, prompt, until, max_gen_toks, temperature, context, kwargs)

    def _text(self, tokens: list[int]) -> str:
        """Text of generated tokens, EOS left out."""
        return self.tokenizer.decode([t for t in tokens if t not in self.eos_ids])

    def _decode(self, tokens: list[int], until: tuple[str, ...]) -> str:
        """Text of the generated tokens without EOS, cut before the earliest stop string."""
        return cut_at_stop(self._text(tokens), until)

    def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float):
        """One batched call of the configured decoding mode; returns its `GenerationOutput`."""
        self._generate_calls += 1
        spec = self.settings.spec(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=self.settings.seed + self._generate_calls - 1,
            eos_ids=tuple(self.eos_ids),
        )  # fmt: skip
        return generate(self.model, prompts, spec)

    def warm_up(self, text: str = "Warm-up") -> None:
        """Short generations in the configured mode, neither timed nor counted in `speed`, and
        without moving the sampling seeds of later calls: so that one-off start-up costs (kernel
        selection, allocator growth, lazy initialisation, compiling) stay out of the measured
        throughput. Batched: one batch of `batch_size`. Engine: one request of two blocks, or with
        compiled steps one at every batch width the engine can take (`Scheduler.warm_up`)."""
        calls = self._generate_calls
        prompt = self._context_ids(text)
        if self.settings.engine:
            # an EOS table of the real shape that is never hit, so that every step compiles
            eos = (self.model.mask_token_id,) * len(self.eos_ids)
            spec = self.settings.spec(max_new_tokens=2 * self.settings.block_size, temperature=0.0, seed=0, eos_ids=eos)
            request = Request.from_spec(("warm-up",), prompt, spec)
            scheduler = self._engine()
            if scheduler.decode_step == "compiled":
                scheduler.warm_up(request)
                return
            scheduler.submit(request)
            while not scheduler.idle:
                scheduler.step()
            scheduler.stats = EngineStats()  # the engines (all idle, so gone) took the old counters
            return
        self.generate_ids([prompt] * self.settings.batch_size, max_new_tokens=self.settings.block_size, temperature=0.0)
        self._generate_calls = calls

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches requests that share stop strings, token budget and temperature, longest prompt
        first; returns the texts in request order."""
        gens = [self._gen_request(i, *req.args) for i, req in enumerate(requests)]
        groups: dict[tuple, list[_GenRequest]] = defaultdict(list)
        for g in gens:
            groups[(g.until, g.max_gen_toks, g.temperature)].append(g)
        results: list[str | None] = [None] * len(gens)
        bar = tqdm(
            total=len(gens), desc=f"generate_until ({self.settings.mode})", disable=disable_tqdm or len(gens) < 2
        )
        if self.settings.engine:
            self._generate_on_engine(gens, results, bar)
            bar.close()
            return results  # type: ignore[return-value]
        for (until, max_gen_toks, temperature), members in groups.items():
            members.sort(key=lambda g: -len(g.prompt))
            for start in range(0, len(members), self.settings.batch_size):
                batch = members[start : start + self.settings.batch_size]
                t0 = time.perf_counter()
                out = self.generate_ids([g.prompt for g in batch], max_new_tokens=max_gen_toks, temperature=temperature)
                self.speed.add(out, time.perf_counter() - t0)
                for g, tokens in zip(batch, out.new_tokens):
                    results[g.index] = self._decode(tokens, until)
                    self.cache_hook.add_partial("generate_until", (g.context, g.gen_kwargs), results[g.index])
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    # ---- engine=true ------------------------------------------------------------------------------
    @property
    def engine_step(self) -> str:
        """The engine's resolved steps (eager, static or compiled) for `engine=true`."""
        return self._engine().decode_step

    def _engine(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = Scheduler(
                self.model, max_batch_size=self.settings.batch_size, decode_step=self.settings.engine_step
            )
        return self._scheduler

    def _generate_on_engine(self, gens: list[_GenRequest], results: list, bar) -> None:
        """Every request of a `generate_until` call through the engine, longest prompt first; each
        row's seed is `seed` + its place in the adapter's request order."""
        scheduler = self._engine()
        jobs = []
        for g in sorted(gens, key=lambda g: -len(g.prompt)):
            seed = self.settings.seed + self._engine_requests
            self._engine_requests += 1
            spec = self.settings.spec(
                max_new_tokens=g.max_gen_toks, temperature=g.temperature, seed=seed, eos_ids=self.eos_ids
            )
            jobs.append(Job(g.index, g.prompt, g.until, spec))

        def done(item: Generated) -> None:
            results[item.index] = item.text
            g = gens[item.index]
            self.cache_hook.add_partial("generate_until", (g.context, g.gen_kwargs), item.text)
            self.speed.add_row(item)
            bar.update(1)

        stats, t0 = scheduler.stats, time.perf_counter()
        before = (stats.denoiser_forwards, stats.context_forwards)
        try:
            generate_continuously(scheduler, jobs, text_of=self._text, on_done=done)
        except BaseException:
            self._scheduler = None  # rows may be left in it: the next call starts a fresh one
            raise
        finally:  # the rows counted so far come with their time and forwards, even when interrupted
            ar = self.settings.mode == "ar"
            nfe = stats.context_forwards - before[1] if ar else stats.denoiser_forwards - before[0]
            self.speed.add_run(nfe=nfe, seconds=time.perf_counter() - t0)


def register() -> None:
    """Make `twotower` a model name of the harness (idempotent)."""
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME)(TwoTowerLM)


register()

if __name__ == "__main__":  # `python -m twotower.evaluation.harness run --model twotower ...`: the harness's CLI
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
