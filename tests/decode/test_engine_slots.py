"""The engine's slot state: rows join and leave without touching the others' state, fixed-shape and
compiled steps give each row exactly what it gives decoded alone, and with a denoiser-side mirror
only the new entries cross per block."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.serve.models import make_two_tower
from tests.serve.test_engine import BLOCK4, alone, prompts, rare_token, run
from twotower.decode.engine import DecodeEngine, Request
from twotower.decode.scheduler import Scheduler
from twotower.decode.spec import DiffusionSettings
from twotower.layers.attention import AttentionState
from twotower.layers.mamba2 import MambaState


@pytest.fixture(scope="module")
def model():
    return make_two_tower()


def sampled_with_eos(model, reqs: list[Request], seed: int | None) -> list[Request]:
    """The requests seeded and sampled (seed given; else greedy as they are), with a shared EOS some rows hit."""
    if seed is not None:
        reqs = [replace(r, settings=replace(r.settings, temperature=0.8), seed=seed + r.id) for r in reqs]
    eos = rare_token(model, reqs)
    return [replace(r, eos_ids=(eos,)) for r in reqs]


def diffusion_requests(model, *, seed: int | None = None) -> list[Request]:
    """Unequal prompts, budgets, thresholds and anchoring."""
    ps = prompts(3, 9, 1, 6, 5, seed=7)
    reqs = [
        Request(
            i, p, max_new_tokens=6 + 3 * i, settings=DiffusionSettings(4, 4, (0.5, 0.9, 0.2)[i % 3], temperature=0.0),
            anchor=i == 2,
        )
        for i, p in enumerate(ps)
    ]  # fmt: skip
    return sampled_with_eos(model, reqs, seed)


WAVES = [[0, 1], [2], [], [3, 4]]  # request indices submitted before each step: rows join a running batch


def check_each_alone(model, reqs: list[Request], **engine) -> Scheduler:
    scheduler = Scheduler(model, max_batch_size=4, **engine)
    tokens, _ = run(scheduler, [[reqs[i] for i in wave] for wave in WAVES])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
    return scheduler


@pytest.mark.parametrize("decode_step", ["eager", "static"])
@pytest.mark.parametrize("seed", [None, 100])
def test_diffusion_rows_in_slots_equal_each_alone(model, decode_step, seed):
    check_each_alone(model, diffusion_requests(model, seed=seed), decode_step=decode_step)


def mixed_settings_requests(model) -> list[Request]:
    """Rows whose steps, thresholds and temperatures all differ (greedy and sampled side by side):
    one denoiser loop fills all their blocks."""
    kinds = [(4, 0.9, 0.0), (2, 0.5, 0.8), (4, 0.2, 1.3), (1, 0.0, 0.0), (3, 0.7, 0.5), (4, 0.95, 0.0)]
    ps = prompts(3, 9, 1, 6, 5, 4, seed=17)
    reqs = [
        Request(i, p, max_new_tokens=6 + 2 * i, settings=DiffusionSettings(4, steps, th, temperature=temp),
                seed=100 + i if temp > 0 else None)
        for i, (p, (steps, th, temp)) in enumerate(zip(ps, kinds, strict=True))
    ]  # fmt: skip
    eos = rare_token(model, reqs)
    return [replace(r, eos_ids=(eos,)) for r in reqs]


MIXED_WAVES = [[0, 1, 2], [3], [], [4, 5]]


@pytest.mark.parametrize("engine", [dict(decode_step="eager"), dict(decode_step="static"), dict(slots=False)])
@pytest.mark.parametrize("requests", ["mixed_settings_requests", "one_loop_requests"])
def test_rows_with_different_settings_share_each_denoiser_forward_and_equal_each_alone(model, engine, requests):
    """Steps, thresholds and temperatures differing; or top_k, anchoring and EOS-awareness."""
    reqs = globals()[requests](model)
    scheduler = Scheduler(model, max_batch_size=6, **engine)
    tokens, _ = run(scheduler, [[reqs[i] for i in wave] for wave in MIXED_WAVES])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id


def test_one_block_of_rows_with_different_settings_takes_the_longest_row_s_forwards(model):
    """Three rows of one block each, joining together, thresholds and temperatures all different:
    the block takes as many denoiser forwards as its slowest row alone (one loop for all), not
    their sum (one loop per setting, as before)."""
    ps = prompts(5, 5, 5, seed=3)
    kinds = [(0.95, 0.0), (0.3, 0.0), (0.6, 0.9)]
    reqs = [
        Request(i, p, max_new_tokens=4, settings=DiffusionSettings(4, 4, th, temperature=temp), seed=7 + i)
        for i, (p, (th, temp)) in enumerate(zip(ps, kinds, strict=True))
    ]
    scheduler = Scheduler(model, max_batch_size=3)
    tokens, _ = run(scheduler, [reqs])
    nfe = []
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
        out = model.generate_mask_diffusion(
            [list(r.prompt)], max_new_tokens=4, block_size=4, steps_per_block=4,
            confidence_threshold=r.settings.confidence_threshold, temperature=r.settings.temperature, seed=r.seed,
        )  # fmt: skip
        nfe.append(out.stats.nfe)
    assert scheduler.stats.denoiser_forwards == max(nfe) < sum(nfe)


@pytest.mark.parametrize("slots", [True, False])
def test_speculative_rows_with_different_draft_settings_draft_in_one_loop(model, slots):
    """Draft steps 1, 2 and 3 and three thresholds: a round's drafts take at most 3 denoiser
    forwards for all rows (one loop), where one loop per setting took up to 1 + 2 + 3; the tokens
    still equal each request alone."""
    ps = prompts(6, 6, 6, seed=5)
    reqs = [
        Request(i, p, mode="speculative", max_new_tokens=12, draft_steps=i + 1,
                settings=DiffusionSettings(4, 4, (0.9, 0.5, 0.1)[i], temperature=0.0))
        for i, p in enumerate(ps)
    ]  # fmt: skip
    check_one_draft_loop(model, reqs, slots=slots, draft_steps=3)


def check_one_draft_loop(model, reqs: list[Request], *, slots: bool, draft_steps: int) -> None:
    """The speculative rows together: each equals its request alone, and every round's drafts take
    at most `draft_steps` denoiser forwards for all rows (one draft loop)."""
    scheduler = Scheduler(model, max_batch_size=len(reqs), slots=slots)
    tokens, _ = run(scheduler, [reqs])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
    rounds = scheduler.stats.context_forwards - 1  # the prefill, then one verify per round
    assert rounds > 0 and scheduler.stats.denoiser_forwards <= draft_steps * rounds


def one_loop_requests(model) -> list[Request]:
    """Rows that differ in top_k, anchoring and EOS-aware commits, greedy and sampled side by side."""
    kinds = [  # (top_k, anchor, eos_aware_commit, temperature)
        (None, False, False, 0.0), (3, True, False, 0.9), (1, False, True, 0.7),
        (20, True, True, 0.0), (None, True, False, 1.1), (5, False, True, 0.8),
    ]  # fmt: skip
    ps = prompts(3, 9, 1, 6, 5, 4, seed=23)
    reqs = [
        Request(i, p, max_new_tokens=6 + 2 * i, settings=DiffusionSettings(4, 4, 0.6, temperature=temp, top_k=k),
                anchor=anchor, eos_aware_commit=aware, seed=200 + i if temp > 0 else None)
        for i, (p, (k, anchor, aware, temp)) in enumerate(zip(ps, kinds, strict=True))
    ]  # fmt: skip
    eos = rare_token(model, reqs)
    return [replace(r, eos_ids=(eos,)) for r in reqs]


def _forwards_alone(model, req: Request) -> int:
    s = req.settings
    out = model.generate_mask_diffusion(
        [list(req.prompt)], max_new_tokens=req.max_new_tokens, block_size=s.block_size,
        steps_per_block=s.steps_per_block, confidence_threshold=s.confidence_threshold, temperature=s.temperature,
        top_k=s.top_k, seed=req.seed, anchor=req.anchor, eos_aware_commit=req.eos_aware_commit,
        eos_token_id=list(req.eos_ids) or None,
    )  # fmt: skip
    return out.stats.nfe


@pytest.mark.parametrize("slots", [True, False])
def test_one_block_of_rows_with_different_top_k_anchoring_and_eos_awareness_is_one_denoiser_loop(model, slots):
    """Four rows of one block each, joining together, each with another top_k, anchoring or
    EOS-awareness: the block takes as many denoiser forwards as its slowest row alone (one loop for
    all), where one loop per (top_k, anchor, EOS-aware) group took their sum."""
    ps = prompts(5, 5, 5, 5, seed=29)
    kinds = [(None, False, False), (2, False, False), (None, True, False), (None, False, True)]
    eos = rare_token(model, [Request(i, p, max_new_tokens=4, settings=BLOCK4) for i, p in enumerate(ps)])
    reqs = [
        Request(i, p, max_new_tokens=4, settings=DiffusionSettings(4, 4, 0.95, temperature=0.8, top_k=k), seed=40 + i,
                anchor=anchor, eos_aware_commit=aware, eos_ids=(eos,))
        for i, (p, (k, anchor, aware)) in enumerate(zip(ps, kinds, strict=True))
    ]  # fmt: skip
    scheduler = Scheduler(model, max_batch_size=4, slots=slots)
    tokens, _ = run(scheduler, [reqs])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
    nfe = [_forwards_alone(model, r) for r in reqs]
    assert scheduler.stats.denoiser_forwards == max(nfe) < sum(nfe)


@pytest.mark.parametrize("slots", [True, False])
def test_speculative_rows_with_different_draft_top_k_draft_in_one_loop(model, slots):
    """Sampled drafts cut at top_k None, 5 and 2: one draft loop per round for all rows (at most
    the draft steps' forwards), and each row's tokens equal its request alone."""
    ps = prompts(6, 6, 6, seed=31)
    reqs = [
        Request(i, p, mode="speculative", max_new_tokens=10, draft_steps=2, seed=60 + i,
                settings=DiffusionSettings(4, 4, 0.5, temperature=0.8, top_k=k))
        for i, (p, k) in enumerate(zip(ps, (None, 5, 2), strict=True))
    ]  # fmt: skip
    check_one_draft_loop(model, reqs, slots=slots, draft_steps=2)


@pytest.mark.parametrize("decode_step", ["eager", "static"])
def test_ar_rows_in_slots_equal_each_alone(model, decode_step):
    ps = prompts(4, 1, 7, 2, 5, seed=9)
    reqs = [Request(i, p, mode="ar", max_new_tokens=3 + 2 * i, seed=i if i % 2 else None) for i, p in enumerate(ps)]
    reqs = [replace(r, settings=replace(r.settings, temperature=0.7)) if r.seed is not None else r for r in reqs]
    check_each_alone(model, reqs, decode_step=decode_step)


def speculative_requests(model, *, seed: int | None = None) -> list[Request]:
    """Unequal prompts, budgets, draft steps and thresholds."""
    ps = prompts(3, 9, 1, 6, 5, seed=11)
    reqs = [
        Request(
            i, p, mode="speculative", max_new_tokens=7 + 3 * i, draft_steps=1 + i % 3,
            settings=DiffusionSettings(4, 4, (0.5, 0.9, 0.2)[i % 3], temperature=0.0),
        )
        for i, p in enumerate(ps)
    ]  # fmt: skip
    return sampled_with_eos(model, reqs, seed)


@pytest.mark.parametrize("decode_step", ["eager", "static"])
@pytest.mark.parametrize("seed", [None, 100])
def test_speculative_rows_in_slots_equal_each_alone(model, decode_step, seed):
    check_each_alone(model, speculative_requests(model, seed=seed), decode_step=decode_step)


@pytest.mark.parametrize("slots", [True, False])
def test_speculative_rows_that_one_token_finishes_take_no_round(model, slots):
    """A speculative request for one token, and one whose first token is its EOS, finish at the
    first step on the prefill's AR token, with no denoiser forward, beside rows that go on; every
    row still equals its prompt alone."""
    a, b, c = prompts(4, 6, 3, seed=21)
    first_of_c = alone(model, Request("probe", c, mode="speculative", max_new_tokens=1, settings=BLOCK4))[0]
    reqs = [
        Request("one", a, mode="speculative", max_new_tokens=1, settings=BLOCK4),
        Request("long", b, mode="speculative", max_new_tokens=9, settings=BLOCK4),
        Request("eos first", c, mode="speculative", max_new_tokens=9, settings=BLOCK4, eos_ids=(first_of_c,)),
    ]
    scheduler = Scheduler(model, max_batch_size=4, slots=slots)
    tokens, reasons = run(scheduler, [reqs[:1], reqs[1:]])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id
    assert tokens["eos first"] == [first_of_c] and reasons["eos first"] == "eos" and reasons["one"] == "length"
    alone_engine = DecodeEngine(model, mode="speculative", block_size=4, max_rows=2, slots=slots)
    alone_engine.add([reqs[0]])
    events = alone_engine.step()
    assert [e.tokens for e in events] == [tokens["one"]] and events[0].finished
    assert alone_engine.stats.denoiser_forwards == 0 and alone_engine.stats.draft_rounds == 0


@pytest.mark.parametrize("seed", [None, 100])
def test_speculative_slots_equal_the_packed_twin_with_a_mirror(model, seed):
    """The packed cache (slots=False) is the plain twin; the slot state with a denoiser-side mirror
    (as with the towers on two devices) gives the same tokens and statistics."""
    reqs = speculative_requests(model, seed=seed)
    results = []
    for engine in (dict(slots=False), dict(mirror=True)):
        scheduler = Scheduler(model, max_batch_size=4, **engine)
        tokens, reasons = run(scheduler, [[reqs[i] for i in wave] for wave in WAVES])
        stats = scheduler.stats
        results.append((tokens, reasons, stats.accepted_drafts, stats.draft_rounds, stats.denoiser_forwards))
    assert results[0] == results[1]


def eos_aware_mix(model) -> tuple[list[Request], list[list[Request]]]:
    """Four greedy EOS-aware requests whose output alone awareness changes, beside sampled rows (one
    anchored) and two of the same requests not EOS-aware, joining in waves (slot order differs from
    row order); top_k only 3 or none, so a compiled run needs two kernel widths at most. Returns
    the requests and the waves."""
    ps = prompts(*[2 + i % 7 for i in range(20)], seed=41)
    aware = [
        Request(i, ps[i], max_new_tokens=12, settings=DiffusionSettings(4, 4, 0.3, temperature=0.0, top_k=k),
                eos_ids=(42,), eos_aware_commit=True)
        for i, k in ((5, 3), (7, 3), (14, None), (19, 3))
    ]  # fmt: skip
    for r in aware:  # the check below is only as good as this: awareness changes each of them alone
        assert alone(model, r) != alone(model, replace(r, eos_aware_commit=False)), r.id
    sampled = [
        Request(100 + j, p, max_new_tokens=9 + j, settings=DiffusionSettings(4, 3, 0.5, temperature=0.8, top_k=k),
                seed=7 + j, anchor=j == 0)
        for j, (p, k) in enumerate(zip(prompts(5, 3, seed=2), (3, None), strict=True))
    ]  # fmt: skip
    unaware = [replace(r, id=200 + r.id, eos_aware_commit=False) for r in aware[1::2]]  # awareness would change them
    others = [sampled[0], unaware[0], sampled[1], unaware[1]]
    reqs = [r for pair in zip(others, aware, strict=True) for r in pair]
    return reqs, [reqs[:3], [reqs[3]], [], reqs[4:6], reqs[6:]]


@pytest.mark.parametrize("engine", [dict(decode_step="eager"), dict(decode_step="static"), dict(slots=False)])
def test_rows_whose_eos_awareness_matters_equal_each_alone_beside_other_settings(model, engine):
    reqs, waves = eos_aware_mix(model)
    tokens, _ = run(Scheduler(model, max_batch_size=4, **engine), waves)
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id


@pytest.fixture(scope="module")
def compiled_scheduler_run(model):
    """One compiled run shared by the compiled checks (graphs are compiled once per shape; whole
    blocks only, so few shapes): rows with their own top_k, anchoring, EOS-awareness and sampling."""
    reqs, waves = eos_aware_mix(model)
    scheduler = Scheduler(model, max_batch_size=4, decode_step="compiled")
    tokens, _ = run(scheduler, waves)
    return reqs, tokens


def test_compiled_diffusion_rows_equal_each_alone(model, compiled_scheduler_run):
    reqs, tokens = compiled_scheduler_run
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id


def kv_buffers(engine: DecodeEngine) -> list[torch.Tensor]:
    return [t for st in engine.state.cache.layers if isinstance(st, AttentionState) for t in (st.k, st.v)]


@torch.no_grad()
def test_joining_and_leaving_copy_nothing_of_the_other_rows(model):
    engine = DecodeEngine(model, mode="diffusion", block_size=4, max_rows=4)
    a, b, c = prompts(5, 3, 8, seed=2)
    engine.add(
        [Request("a", a, max_new_tokens=12, settings=BLOCK4), Request("b", b, max_new_tokens=4, settings=BLOCK4)]
    )
    engine.step()
    buffers = [t.data_ptr() for t in kv_buffers(engine)]
    generation, slot_a = engine.state.generation, engine.slot_of[0]
    engine.step()  # "b" leaves after its one block
    n = engine.state.length
    before = [t[slot_a, :, :n].clone() for t in kv_buffers(engine)]
    mamba = [st.ssm[slot_a].clone() for st in engine.state.cache.layers if isinstance(st, MambaState)]
    engine.add([Request("c", c, max_new_tokens=4, settings=BLOCK4)])  # "c" claims the free slot
    assert engine.request_ids == ["a", "c"] and engine.slot_of[0] == slot_a
    assert [t.data_ptr() for t in kv_buffers(engine)] == buffers and engine.state.generation == generation
    for old, t in zip(before, kv_buffers(engine)):
        assert torch.equal(old, t[slot_a, :, :n])  # "a"'s past is where it was, untouched
    now = [st.ssm[slot_a] for st in engine.state.cache.layers if isinstance(st, MambaState)]
    assert all(torch.equal(x, y) for x, y in zip(mamba, now))


@torch.no_grad()
def test_speculative_rows_join_and_leave_without_copying_the_others(model):
    engine = DecodeEngine(model, mode="speculative", block_size=4, max_rows=4)
    a, b, c = prompts(5, 3, 8, seed=2)
    settings = replace(BLOCK4, confidence_threshold=0.0)
    engine.add([Request("a", a, mode="speculative", max_new_tokens=30, settings=settings),
                Request("b", b, mode="speculative", max_new_tokens=2, settings=settings)])  # fmt: skip
    buffers = [t.data_ptr() for t in kv_buffers(engine)]
    generation, slot_a = engine.state.generation, engine.slot_of[0]
    while "b" in engine.request_ids:
        engine.step()
    n = engine.state.length
    before = [t[slot_a, :, :n].clone() for t in kv_buffers(engine)]
    valid = engine.state.cache.valid[slot_a, :n].clone()
    engine.add([Request("c", c, mode="speculative", max_new_tokens=4, settings=settings)])
    assert engine.request_ids == ["a", "c"] and engine.slot_of[0] == slot_a
    assert [t.data_ptr() for t in kv_buffers(engine)] == buffers and engine.state.generation == generation
    assert torch.equal(valid, engine.state.cache.valid[slot_a, :n])
    for old, t in zip(before, kv_buffers(engine)):
        assert torch.equal(old, t[slot_a, :, :n])


@torch.no_grad()
def test_a_long_running_batch_compacts_instead_of_growing(model):
    """Rows keep joining one slot state: the shared end passes the capacity, rows are compacted to the
    front of their slots and the capacity stays put; each row still equals its prompt alone."""
    scheduler = Scheduler(model, max_batch_size=2)
    reqs = [Request(i, p, mode="ar", max_new_tokens=40) for i, p in enumerate(prompts(*([6] * 8), seed=13))]
    tokens, _ = run(scheduler, [[r] for r in reqs[:2]] + [[] for _ in range(30)] + [[r] for r in reqs[2:]])
    for r in reqs:
        assert tokens[r.id] == alone(model, r), r.id


@pytest.mark.parametrize("mode", ["diffusion", "speculative"])
def test_fixed_shape_steps_with_a_mirror_equal_each_alone_whatever_fresh_memory_holds(model, mode, monkeypatch):
    """The fixed-shape denoiser reads the mirror's whole capacity under the key mask; a masked NaN
    still poisons attention, so nothing unwritten may be read as it comes from the allocator.
    Fresh `empty_like` memory is filled with NaN here (it held NaN by chance in 42 of 101 mirror
    allocations measured): the tokens must still equal each request alone."""
    reqs = diffusion_requests(model) if mode == "diffusion" else speculative_requests(model)
    want = {r.id: alone(model, r) for r in reqs}
    plain = torch.empty_like

    def nan_empty_like(t, *args, **kwargs):
        out = plain(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    scheduler = Scheduler(model, max_batch_size=4, mirror=True, decode_step="static")
    tokens, _ = run(scheduler, [[reqs[i] for i in wave] for wave in WAVES])
    assert tokens == want


@torch.no_grad()
def test_the_denoiser_mirror_moves_only_the_new_entries(model):
    reqs = diffusion_requests(model)
    scheduler = Scheduler(model, max_batch_size=4, mirror=True)
    tokens, _ = run(scheduler, [[reqs[i] for i in wave] for wave in WAVES])
    assert all(tokens[r.id] == alone(model, r) for r in reqs)
    # one row alone: per block, the bytes moved are the same whatever the past's length
    engine = DecodeEngine(model, mode="diffusion", block_size=4, mirror=True)
    engine.add([Request("x", prompts(20, seed=1)[0], max_new_tokens=40, settings=BLOCK4)])
    moved = []
    for _ in range(6):
        start = engine.mirror.copied_bytes
        engine.step()
        moved.append(engine.mirror.copied_bytes - start)
    S, slots = BLOCK4.block_size, engine.state.slots
    new_kv = sum(t[:, :, :S].numel() * t.element_size() for t in kv_buffers(engine))
    states = [t for st in engine.state.cache.layers if isinstance(st, MambaState) for t in (st.conv, st.ssm)]
    expected = new_kv + sum(t.numel() * t.element_size() for t in states) + slots * S  # + S validity flags per slot
    assert moved[1] == moved[2] == moved[5] == expected  # the first block also moves the prompt
    assert engine.state.length > 40  # while the past has grown past 10 blocks


@torch.no_grad()
def test_slot_growth_stops_at_the_batch_limit(model):
    """Rows joining one by one double the slots, but never past `max_rows`: every width the state
    takes is one of `slot_widths(max_rows)` (what a server's warm-up compiles)."""
    from twotower.decode.slots import slot_widths

    engine = DecodeEngine(model, mode="ar", max_rows=6)
    seen = []
    for i, p in enumerate(prompts(*([4] * 6), seed=21)):
        engine.add([Request(i, p, mode="ar", max_new_tokens=50)])
        seen.append(engine.state.slots)
    assert seen == [1, 2, 4, 4, 6, 6] and set(seen) <= set(slot_widths(6))
    assert slot_widths(6) == [1, 2, 4, 6] and slot_widths(8) == [1, 2, 4, 8] and slot_widths(1) == [1]


def test_short_last_blocks_take_the_uncompiled_step(model, monkeypatch):
    """A row's last block shorter than the block size runs the fused step's plain twin, so compiled
    graphs stay one per batch width (not one per remaining length ever met); tokens unchanged."""
    import twotower.decode.engine as engine_module

    seen = {"graph": set(), "plain": set()}

    class Recording(engine_module.Compiled):
        def __init__(self, fn, *, compile, what):
            super().__init__(fn, compile=compile, what=what)
            if what == "the diffusion step":
                inner = self.plain
                self.fn = lambda model, canvas, *a, **k: (
                    seen["graph"].add(canvas.shape[1]),
                    inner(model, canvas, *a, **k),
                )[1]
                self.plain = lambda model, canvas, *a, **k: (
                    seen["plain"].add(canvas.shape[1]),
                    inner(model, canvas, *a, **k),
                )[1]

    monkeypatch.setattr(engine_module, "Compiled", Recording)
    reqs = diffusion_requests(model)  # budgets 6, 9, 12, 15, 18 at block 4: last blocks of 2, 1, 4, 3, 2
    check_each_alone(model, reqs, decode_step="static")
    assert seen["graph"] == {4}, seen
    assert seen["plain"] and seen["plain"] <= {1, 2, 3}, seen  # (a row that hits EOS first has no short block)


def test_slot_capacities_are_few_powers_of_two(model):
    """Whatever the first request's length, a slot state's capacity is a power of two >= 128, so the
    compiled steps see a few capacities per width (not one per 128 positions)."""
    from twotower.decode.slots import SlotCache, slot_capacity

    assert [slot_capacity(n) for n in (1, 128, 129, 600, 1024, 1025)] == [128, 128, 256, 1024, 1024, 2048]
    caps = {SlotCache.for_requests(model, rows=2, longest=n).capacity for n in (40, 70, 100, 130, 250, 300)}
    assert caps == {128, 256, 512, 1024}


@pytest.mark.parametrize(("mode", "kinds"), [("diffusion", {0.0, 1.0}), ("speculative", {0.0, 1.0}), ("ar", {0.0})])
def test_warm_up_runs_greedy_and_sampled_copies_where_the_denoiser_steps(model, mode, kinds):
    """The compiled denoiser step is two graphs, greedy and sampled (every value of threshold,
    temperature and steps shares them): warm-up decodes both kinds at every width; AR one."""
    from twotower.decode.engine import EngineStats

    scheduler = Scheduler(model, max_batch_size=2)
    seen = []
    submit = scheduler.submit
    scheduler.submit = lambda r: (seen.append(r.settings.temperature), submit(r))[1]
    request = Request("w", [1], mode=mode, max_new_tokens=8, settings=DiffusionSettings(4, 4, 0.9))
    widths = scheduler.warm_up(request)
    assert set(seen) == kinds and len(seen) == len(kinds) * sum(widths)
    assert scheduler.idle and scheduler.stats == EngineStats()
