"""Parity with Hugging Face `transformers.NemotronHForCausalLM` (the reference implementation)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_special_params, tiny_config

from twotower.backbone import NemotronHForCausalLM

transformers = pytest.importorskip("transformers")

CASES = {
    "all-kinds-chunk-smaller": dict(pattern="M*E-M*", chunk_size=4),
    "chunk-larger-than-seq": dict(pattern="ME*M-", chunk_size=64),
    "mha-one-group": dict(pattern="*MM-E", num_key_value_heads=4, n_groups=1, chunk_size=5),
    "moe-groups": dict(pattern="EM*E", n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3),
}


def _hf_model(cfg, seed):
    hf_cfg = transformers.NemotronHConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(hf_cfg).eval().float()
    randomise_special_params(model, seed=seed)
    return model


@pytest.fixture(params=sorted(CASES))
def pair(request, tmp_path):
    spec = dict(CASES[request.param])
    pattern = spec.pop("pattern")
    cfg = tiny_config(pattern, **spec)
    hf = _hf_model(cfg, seed=len(request.param))
    hf.save_pretrained(tmp_path)
    ours = NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    return hf, ours


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(3, hf.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    ref = hf(ids).logits
    got = ours(ids).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(3, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=32)
    assert got.sequences[0].tolist() == ref[0].tolist()


@torch.no_grad()
def test_save_pretrained_loads_in_transformers(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    assert (hf(ids).logits - tiny_model(ids).logits).abs().max().item() <= 1e-4
