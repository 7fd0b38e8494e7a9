"""Layers compiled once per kind (`twotower.blocks`): the compiled decode steps call one region per
Mamba / feed-forward layer, one compiled body per kind, and equal the eager forwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from twotower import TwoTowerForCausalLM, blocks
from twotower.context import DenoiserContext
from twotower.decode.static import StaticDecoder, block_forward, denoise_step, verify_step

PATTERN = "MEM*EME"  # 3 Mamba, 3 MoE, 1 attention


def _regions(graphs) -> tuple[int, set]:
    """(calls, distinct bodies) of invoke_subgraph in Dynamo's graphs."""
    calls, bodies = 0, set()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.higher_order.invoke_subgraph:
                calls += 1
                bodies.add(node.args[0].target)  # the get_attr of the subgraph module
    return calls, bodies


def _capture():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


@pytest.fixture(params=["on", "off"])
def mode(request, monkeypatch):
    """Regions forced on (the release's depth) or off (what "auto" gives this shallow model)."""
    monkeypatch.setattr(blocks, "MODE", request.param)
    return request.param


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TwoTowerForCausalLM(tiny_config(PATTERN)).eval().requires_grad_(False)
    prompt = torch.randint(4, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        prefill = model.empty_cache(2, capacity=9)
        model.extend_context(prompt, prefill)
    return model, prompt, prefill


def _decoder(model, prefill):
    decoder = StaticDecoder(model.context_tower, model.context_lm_head, 2, 32)
    decoder.load(prefill)
    return decoder


@pytest.mark.parametrize("step", ["commit", "verify"])
def test_the_context_steps_compile_each_layer_kind_once(setup, step, mode):
    model, _, prefill = setup
    d = _decoder(model, prefill)
    graphs, backend = _capture()
    fn = torch.compile(block_forward if step == "commit" else verify_step, backend=backend, fullgraph=True)
    tokens = torch.randint(4, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        if step == "commit":
            got = fn(model.context_tower, tokens, d.position, d.kv, d.conv, d.ssm, d.valid)
            d.load(prefill)
            want = block_forward(model.context_tower, tokens, d.position, d.kv, d.conv, d.ssm, d.valid)
        else:
            got, hist = fn(model.context_tower, model.context_lm_head, tokens, d.position, d.kv, d.conv, d.ssm, d.valid)
            d.load(prefill)
            want, want_hist = verify_step(
                model.context_tower, model.context_lm_head, tokens, d.position, d.kv, d.conv, d.ssm, d.valid
            )
            assert hist.keys() == want_hist.keys() == {0, 2, 5}
            for i in hist:
                for a, b in zip(hist[i], want_hist[i]):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    calls, bodies = _regions(graphs)
    # 3 Mamba + 3 MoE layers: two compiled bodies, or one flat graph
    assert (calls, len(bodies)) == ((6, 2) if mode == "on" else (0, 0))


@pytest.mark.parametrize("with_t", [True, False])
def test_the_denoiser_compiles_each_layer_kind_once_with_and_without_adaln(setup, with_t, mode):
    model, prompt, _ = setup
    with torch.no_grad():
        cache = model.empty_cache(2, capacity=16)
        model.extend_context(prompt, cache)
        ctx = DenoiserContext.from_cache(cache)
        canvas = torch.randint(4, model.config.vocab_size, (2, 4))
        t = torch.tensor([0.3, 0.9]) if with_t else None
        graphs, backend = _capture()
        got = torch.compile(denoise_step, backend=backend, fullgraph=True)(model, canvas, t, ctx)
        want = model.denoise_hidden(canvas, t, ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    calls, bodies = _regions(graphs)
    assert (calls, len(bodies)) == ((6, 2) if mode == "on" else (0, 0))


def test_auto_marks_deep_towers_only_and_the_environment_decides():
    assert blocks.MODE == "auto"  # the suite does not set it
    assert not blocks.regions_for(blocks.REGION_MIN_LAYERS - 1) and blocks.regions_for(blocks.REGION_MIN_LAYERS)
    assert blocks.blocks_for(52) is blocks.REGIONAL and blocks.blocks_for(6) is blocks.FLAT
    assert hasattr(blocks.REGIONAL.mamba_block, "__marked_compile_region_fn__")
    assert not hasattr(blocks.FLAT.mamba_block, "__marked_compile_region_fn__")
    code = "import twotower.blocks as b; print(b.MODE, b.regions_for(52), b.regions_for(2))"
    for value, want in (("0", "off False False"), ("on", "on True True"), ("auto", "auto True False")):
        env = {**os.environ, blocks.MODE_ENV: value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == want.split()
    env = {**os.environ, blocks.MODE_ENV: "sometimes"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "use auto, on or off" in out.stderr
