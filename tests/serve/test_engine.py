"""The continuous-batching engine: rows that join and leave a running batch, with their own settings,
budgets, EOS and seeds, produce exactly what each prompt produces decoded alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from twotower.decode.diffusion import DiffusionSettings
from twotower.decode.engine import DecodeEngine, Request, compact
from twotower.decode.sampling import RowGenerators
from twotower.decode.scheduler import Scheduler

from .models import make_two_tower

BLOCK4 = DiffusionSettings(block_size=4, steps_per_block=4, confidence_threshold=0.5)


@pytest.fixture(scope="module")
def model():
    return make_two_tower()


def prompts(*lengths: int, seed: int = 3) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(4, 96, (n,), generator=g).tolist()) for n in lengths]


def alone(model, req: Request) -> list[int]:
    """The reference: the request's prompt decoded on its own by the library's generate_*."""
    s = req.settings
    common = dict(max_new_tokens=req.max_new_tokens, temperature=s.temperature, top_k=s.top_k)
    common.update(eos_token_id=list(req.eos_ids) or None, seed=req.seed)
    if req.mode == "ar":
        return model.generate_ar([list(req.prompt)], **common).new_tokens[0]
    if req.mode == "speculative":
        spec = dict(block_size=s.block_size, draft_steps=req.draft_steps, confidence_threshold=s.confidence_threshold)
        return model.generate_speculative([list(req.prompt)], **spec, **common).new_tokens[0]
    diffusion = dict(
        block_size=s.block_size, steps_per_block=s.steps_per_block, anchor=req.anchor,
        eos_aware_commit=req.eos_aware_commit,
    )  # fmt: skip
    out = model.generate_mask_diffusion(
        [list(req.prompt)], confidence_threshold=s.confidence_threshold, **diffusion, **common
    )
    return out.new_tokens[0]


def rare_token(model, reqs: list[Request]) -> int:
    """A token some but not all rows produce when free: as EOS it makes some rows leave early."""
    free = [set(alone(model, r)) for r in reqs]
    counts = {t: sum(t in f for f in free) for t in set().union(*free)}
    token = min(counts, key=lambda t: (counts[t] < 2, counts[t] == len(reqs), counts[t], t))
    assert 2 <= counts[token] < len(reqs)
    return token


def run(scheduler: Scheduler, waves: list[list[Request]]) -> tuple[dict, dict]:
    """Submit wave k before step k; step until idle. Returns tokens and finish reasons by id."""
    tokens, reasons = {}, {}
    step = 0
    while step < len(waves) or not scheduler.idle:
        for req in waves[step] if step < len(waves) else []:
            scheduler.submit(req)
        for e in scheduler.step():
            tokens.setdefault(e.request_id, []).extend(e.tokens)
            if e.finished:
                assert e.request_id not in reasons, "a request finished twice"
                reasons[e.request_id] = e.finish_reason
        step += 1
    return tokens, reasons


def test_diffusion_rows_joining_a_running_batch_equal_each_alone(model):
    ps = prompts(3, 9, 1, 6, 5, 2)
    thresholds = (0.5, 0.5, 0.9, 0.5, 0.2, 0.5)
    reqs = [
        Request(i, p, max_new_tokens=7 + 2 * i, settings=DiffusionSettings(4, 4, thresholds[i]))
        for i, p in enumerate(ps)
    ]
    eos = rare_token(model, reqs)
    reqs = [Request(r.id, r.prompt, max_new_tokens=r.max_new_tokens, settings=r.settings, eos_ids=(eos,)) for r in reqs]
    tokens, reasons = run(Scheduler(model), [reqs[:3], [], reqs[3:5], [reqs[5]]])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
    assert set(reasons.values()) == {"eos", "length"}
    assert sum(len(t) > BLOCK4.block_size for t in tokens.values()) >= 2  # several rows crossed blocks


def test_ar_rows_joining_a_running_batch_equal_each_alone(model):
    reqs = [Request(i, p, mode="ar", max_new_tokens=5 + 3 * i) for i, p in enumerate(prompts(4, 1, 8, 3))]
    eos = alone(model, reqs[2])[4]
    reqs = [Request(r.id, r.prompt, mode="ar", max_new_tokens=r.max_new_tokens, eos_ids=(eos,)) for r in reqs]
    tokens, reasons = run(Scheduler(model), [reqs[:2], [reqs[2]], [], [], [reqs[3]]])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
    assert reasons[2] == "eos"


def test_mixed_modes_block_sizes_and_seeded_sampling_each_equal_alone(model):
    ps = prompts(5, 2, 7, 4, 6, 3, seed=9)
    sampled = DiffusionSettings(4, 3, 0.6, temperature=0.8, top_k=20)
    reqs = [
        Request("d4", ps[0], max_new_tokens=9, settings=BLOCK4),
        Request("d2", ps[1], max_new_tokens=6, settings=DiffusionSettings(2, 2, 0.9)),
        Request("ar", ps[2], mode="ar", max_new_tokens=6),
        Request("d4-sampled", ps[3], max_new_tokens=10, settings=sampled, seed=7),
        Request("ar-sampled", ps[4], mode="ar", max_new_tokens=8, settings=DiffusionSettings(temperature=1.2), seed=3),
        Request("d4-sampled-2", ps[5], max_new_tokens=8, settings=sampled, seed=11),
    ]
    scheduler = Scheduler(model)
    tokens, _ = run(scheduler, [reqs[:4], [reqs[4]], [reqs[5]]])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
    # the two seeded diffusion rows shared denoiser forwards, yet each drew from its own stream
    assert scheduler.stats.generated_tokens == sum(len(t) for t in tokens.values())


def test_anchored_and_plain_diffusion_rows_share_a_batch_and_each_equal_alone(model):
    """Anchored rows (first token of each block from the AR head) join a batch of plain rows and the
    other way round, greedy and seeded; every row decodes exactly as generate_mask_diffusion alone."""
    ps = prompts(5, 2, 7, 4, 6, 3, seed=12)
    sampled = DiffusionSettings(4, 3, 0.6, temperature=0.8, top_k=20)
    reqs = [
        Request("plain", ps[0], max_new_tokens=9, settings=BLOCK4),
        Request("plain-sampled", ps[1], max_new_tokens=10, settings=sampled, seed=7),
        Request("anchored", ps[2], max_new_tokens=11, settings=BLOCK4, anchor=True),
        Request("anchored-sampled", ps[3], max_new_tokens=10, settings=sampled, seed=5, anchor=True),
        Request("anchored-late", ps[4], max_new_tokens=7, settings=DiffusionSettings(4, 4, 0.9), anchor=True),
        Request("plain-late", ps[5], max_new_tokens=8, settings=BLOCK4),
    ]
    tokens, _ = run(Scheduler(model), [reqs[:2], [reqs[2], reqs[3]], [reqs[4]], [reqs[5]]])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
    assert tokens["anchored"] != alone(model, replace(reqs[2], anchor=False))  # the anchor mattered
    tokens, _ = run(Scheduler(model), [[reqs[2]], [reqs[0], reqs[1]]])  # plain rows joining anchored ones
    for r in (reqs[0], reqs[1], reqs[2]):
        assert tokens[r.id] == alone(model, r), r.id


def test_speculative_rows_joining_a_running_batch_equal_ar_alone(model, monkeypatch):
    """Greedy speculative rows that join mid-run give generate_ar's tokens. The drafter is an oracle
    that knows each row's AR continuation but errs at every 5th position, so rounds accept 0 to 3
    drafts and rows of one round keep different counts (per-row rollback, EOS inside a draft)."""
    ps = prompts(3, 9, 1, 6, 5, seed=4)
    reqs = [
        Request(i, p, mode="speculative", max_new_tokens=9 + 4 * i, settings=BLOCK4, draft_steps=2)
        for i, p in enumerate(ps)
    ]
    eos = rare_token(model, [replace(r, mode="ar") for r in reqs])
    reqs = [replace(r, eos_ids=(eos,)) for r in reqs]
    free = [list(r.prompt) + alone(model, replace(r, mode="ar", eos_ids=(), max_new_tokens=40)) for r in reqs]
    vocab = model.config.vocab_size

    def oracle(block_ids, t, context, **kw):
        logits = torch.full((*block_ids.shape, vocab), -20.0)
        for r, n in enumerate(context.key_valid.sum(-1).tolist()):  # n: tokens of row r in the cache
            seq = next((f for f in free if len(f) > n and f[n] == int(block_ids[r, 0])), [])
            for j in range(block_ids.shape[1]):
                right = seq[n + j] if n + j < len(seq) else 0
                logits[r, j, right if (n + j) % 5 else (right + 1) % vocab] = 0.0
        return logits

    monkeypatch.setattr(model, "denoise", oracle)
    scheduler = Scheduler(model)
    tokens, reasons = run(scheduler, [reqs[:2], [reqs[2]], [], [reqs[3], reqs[4]]])
    for r in reqs:
        assert tokens[r.id] == alone(model, replace(r, mode="ar")), r.id
    assert set(reasons.values()) == {"eos", "length"}
    stats = scheduler.stats
    assert 1.0 < stats.accepted_per_round < BLOCK4.block_size - 1
    assert stats.generated_tokens == sum(len(t) for t in tokens.values())


def test_speculative_mixed_with_diffusion_and_ar_and_seeded_sampling_each_equal_alone(model):
    ps = prompts(4, 7, 2, 5, 6, 3, seed=11)
    sampled = DiffusionSettings(4, 4, 0.5, temperature=1.0, top_k=30)
    reqs = [
        Request("spec", ps[0], mode="speculative", max_new_tokens=9, settings=BLOCK4, draft_steps=2),
        Request("d4", ps[1], max_new_tokens=8, settings=BLOCK4),
        Request("ar", ps[2], mode="ar", max_new_tokens=6),
        Request("spec-sampled", ps[3], mode="speculative", max_new_tokens=10, settings=sampled, draft_steps=3, seed=5),
        Request("spec2", ps[4], mode="speculative", max_new_tokens=7, settings=DiffusionSettings(2, 2, 0.9)),
        Request("spec-sampled-2", ps[5], mode="speculative", max_new_tokens=8, settings=sampled, seed=8),
    ]
    scheduler = Scheduler(model)
    tokens, _ = run(scheduler, [reqs[:3], [reqs[3]], [reqs[4], reqs[5]]])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
    for r in (reqs[0], reqs[4]):  # greedy speculative is the AR model's decoding
        assert tokens[r.id] == alone(model, replace(r, mode="ar")), r.id
    assert scheduler.stats.draft_rounds > 0


def test_seeded_sampling_differs_between_seeds(model):
    p = prompts(5)[0]
    sampled = DiffusionSettings(4, 4, 0.5, temperature=1.5)
    reqs = [Request(s, p, max_new_tokens=12, settings=sampled, seed=s) for s in range(3)]
    tokens, _ = run(Scheduler(model), [reqs])
    assert len({tuple(t) for t in tokens.values()}) == 3


def test_batch_size_limit_and_fifo_admission(model):
    reqs = [
        Request(i, p, max_new_tokens=4 * (1 + i % 2), settings=BLOCK4) for i, p in enumerate(prompts(2, 3, 4, 5, 6))
    ]
    scheduler = Scheduler(model, max_batch_size=2)
    for r in reqs:
        scheduler.submit(r)
    finished_order = []
    while not scheduler.idle:
        finished_order += [e.request_id for e in scheduler.step() if e.finished]
        assert scheduler.active <= 2
    assert sorted(finished_order) == [0, 1, 2, 3, 4]
    assert finished_order[0] == 0  # admitted first, shortest budget


def test_cancel_a_running_and_a_waiting_request_leaves_the_others_intact(model):
    reqs = [Request(i, p, max_new_tokens=12, settings=BLOCK4) for i, p in enumerate(prompts(3, 6, 4))]
    scheduler = Scheduler(model, max_batch_size=2)
    for r in reqs:
        scheduler.submit(r)
    tokens = {}
    for e in scheduler.step():
        tokens.setdefault(e.request_id, []).extend(e.tokens)
    assert [e.finish_reason for e in scheduler.cancel(0)] == ["cancelled"]  # running
    assert [e.finish_reason for e in scheduler.cancel(2)] == ["cancelled"]  # still waiting
    assert scheduler.cancel("unknown") == []
    while not scheduler.idle:
        for e in scheduler.step():
            tokens.setdefault(e.request_id, []).extend(e.tokens)
    assert tokens[1] == alone(model, reqs[1])
    assert 2 not in tokens


def test_zero_budget_finishes_at_once_and_bad_requests_are_refused(model):
    scheduler = Scheduler(model)
    scheduler.submit(Request("zero", (5, 6), max_new_tokens=0))
    assert [(e.request_id, e.tokens, e.finish_reason) for e in scheduler.step()] == [("zero", [], "length")]
    with pytest.raises(ValueError, match="mode"):
        scheduler.submit(Request("x", (5,), mode="mock-ar"))
    with pytest.raises(ValueError, match="prompt"):
        scheduler.submit(Request("x", ()))
    with pytest.raises(ValueError, match="steps_per_block"):
        scheduler.submit(Request("x", (5,), settings=DiffusionSettings(steps_per_block=0)))
    with pytest.raises(ValueError, match="seed"):
        scheduler.submit(Request("x", (5,), seed=-1))
    with pytest.raises(ValueError, match="anchor applies to mode diffusion only"):
        scheduler.submit(Request("x", (5,), mode="ar", anchor=True))
    with pytest.raises(ValueError, match="anchor must be true or false"):
        scheduler.submit(Request("x", (5,), anchor="yes"))
    with pytest.raises(ValueError, match="draft_steps must be a positive integer"):
        scheduler.submit(Request("x", (5,), mode="speculative", draft_steps=0))
    with pytest.raises(ValueError, match="block_size must be at least 2 for speculative"):
        scheduler.submit(Request("x", (5,), mode="speculative", settings=DiffusionSettings(block_size=1)))
    scheduler.submit(Request("dup", (5,)))
    with pytest.raises(ValueError, match="already queued"):
        scheduler.submit(Request("dup", (6,)))
    with pytest.raises(ValueError, match="does not belong"):
        DecodeEngine(model, mode="ar").add([Request("y", (5,), settings=BLOCK4)])


@torch.no_grad()
def test_compact_drops_unused_leading_positions_and_keeps_logits(model):
    long_p, short_p = prompts(12, 3, seed=5)
    engine = DecodeEngine(model, mode="ar", slots=False)  # the packed cache (the slot state never compacts on leaving)
    engine.add(
        [Request("long", long_p, mode="ar", max_new_tokens=1), Request("short", short_p, mode="ar", max_new_tokens=9)]
    )
    assert engine.cache.length == 12
    engine.step()  # "long" leaves after its one token: 9 leading positions are now unused
    assert engine.cache.length == 12 + 1 - 9 and bool(engine.cache.key_valid().all())
    assert compact(engine.cache) is engine.cache  # nothing left to drop
    tokens = []
    while len(engine):
        tokens += [t for e in engine.step() for t in e.tokens]
    assert tokens == alone(model, Request("short", short_p, mode="ar", max_new_tokens=9))[1:]


def test_row_generators_draw_like_a_lone_generator_and_skipped_rows_draw_nothing():
    shape = torch.Size([3, 4, 5])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    u = RowGenerators(gens).uniform(shape, torch.device("cpu"))
    for r, s in enumerate((1, 2, 3)):
        assert torch.equal(u[r], torch.rand((1, 4, 5), generator=torch.Generator().manual_seed(s))[0])
    fresh = [torch.Generator().manual_seed(s) for s in (1, 2)]
    RowGenerators(fresh).only(torch.tensor([False, True])).uniform(torch.Size([2, 3]), torch.device("cpu"))
    assert torch.equal(fresh[0].get_state(), torch.Generator().manual_seed(1).get_state())
    assert not torch.equal(fresh[1].get_state(), torch.Generator().manual_seed(2).get_state())
    with pytest.raises(ValueError, match="row generators"):
        RowGenerators(gens).uniform(torch.Size([2, 3]), torch.device("cpu"))


def test_step_traces_show_each_denoiser_step_of_a_listening_row_only(model):
    """A request with `on_step` sees its block after every denoiser step: as many traces as the
    block took steps, masked positions only ever fill, and the last canvas is the block committed.
    Listening changes nothing: the row still decodes as it does alone, beside a silent row."""
    traces = []
    p_listen, p_quiet = prompts(4, 6, seed=21)
    listening = Request("listen", p_listen, max_new_tokens=10, settings=BLOCK4, on_step=traces.append)
    quiet = Request("quiet", p_quiet, max_new_tokens=10, settings=BLOCK4)
    scheduler = Scheduler(model)
    scheduler.submit(listening)
    scheduler.submit(quiet)
    tokens, steps_taken = {}, []
    while not scheduler.idle:
        for e in scheduler.step():
            tokens.setdefault(e.request_id, []).extend(e.tokens)
            if e.request_id == "listen":
                steps_taken.append((len(tokens["listen"]) - len(e.tokens), e.denoiser_steps, e.tokens))
    assert tokens["listen"] == alone(model, listening) and tokens["quiet"] == alone(model, quiet)
    assert {t.request_id for t in traces} == {"listen"}
    for position, n_steps, committed in steps_taken:
        block = [t for t in traces if t.position == position]
        assert [t.step for t in block] == list(range(n_steps))
        masked = [sum(t.masked) for t in block]
        assert masked == sorted(masked, reverse=True) and masked[-1] == 0
        assert all(
            sum(t.committed) == before - after
            for t, before, after in zip(block, [len(block[0].tokens), *masked], masked)
        )
        assert block[-1].tokens[: len(committed)] == committed
