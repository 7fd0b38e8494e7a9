"""Weights in transparent huge pages (`twotower.hugepages`): placement, lifetime, loading, training."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch

from twotower import TwoTowerForCausalLM, hugepages
from twotower.loading import bundled_model_path

from .conftest import tiny_config

needs_thp = pytest.mark.skipif(not hugepages.enabled(), reason="this kernel has no transparent huge pages")


def _vma_fields(address: int) -> dict[str, str]:
    """The smaps fields of the mapping region holding `address`."""
    return next((f for start, end, f in hugepages.smaps_regions() if start <= address < end), {})


def _mapped(address: int) -> bool:
    return any(start <= address < end for start, end, _ in hugepages.smaps_regions())


@needs_thp
def test_big_tensors_get_an_aligned_advised_mapping_and_small_ones_are_packed():
    big_shape, small = (1024, 1024), [((3, 5), torch.float32), ((7,), torch.bfloat16), ((0,), torch.float32)]
    big, *rest = hugepages.empty([(big_shape, torch.float32), *small])
    assert big.shape == big_shape and big.dtype == torch.float32 and big.is_contiguous()
    assert big.data_ptr() % hugepages.HUGE_PAGE == 0
    assert _vma_fields(big.data_ptr())["THPeligible"] == "1"  # the kernel may back it with 2 MiB pages
    for t, (shape, dtype) in zip(rest, small):
        assert t.shape == shape and t.dtype == dtype and t.data_ptr() % hugepages.ALIGN == 0
    a, b, _ = rest
    assert b.data_ptr() - a.data_ptr() == 64  # packed: a's 60 bytes rounded up to the alignment
    for t in (big, a, b):  # each its own storage of exactly its bytes: a copy copies no more
        assert t.untyped_storage().nbytes() == t.nbytes
    assert copy.deepcopy(big).untyped_storage().nbytes() == big.nbytes
    assert len(pickle.dumps(a)) < 2000
    big.fill_(2.0), a.fill_(1.0), b.fill_(3.0)
    assert big.sum().item() == 2.0 * big.numel() and a.sum().item() == 15.0 and b.sum().item() == 21.0


@needs_thp
def test_a_written_big_tensor_is_backed_by_huge_pages_and_unmapped_when_dropped():
    (t,) = hugepages.empty([((8, 1024, 1024), torch.uint8)])  # 8 MiB
    t.fill_(1)
    assert hugepages.huge_page_bytes(t) > 0
    address = t.data_ptr()
    del t
    gc.collect()
    assert not _mapped(address)  # replacing a big weight (quantizing, moving it) returns its memory


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(hugepages.ENV, "0")
    assert not hugepages.enabled()
    a, b = hugepages.empty([((4, 4), torch.float32), ((2,), torch.float32)])
    assert a.untyped_storage().nbytes() == a.nbytes and b.untyped_storage().nbytes() == b.nbytes


@needs_thp
def test_loading_puts_cpu_weights_in_huge_pages_with_the_same_values_and_outputs(tmp_path, monkeypatch):
    model = TwoTowerForCausalLM.from_pretrained(bundled_model_path()).eval()
    head = model.lm_head.weight
    assert head.data_ptr() % hugepages.HUGE_PAGE == 0 and _vma_fields(head.data_ptr())["THPeligible"] == "1"
    layer = model.context_tower.layers[0]  # small tensors: packed one after the other
    assert layer.mixer.dt_bias.data_ptr() - layer.norm.weight.data_ptr() == layer.norm.weight.nbytes
    monkeypatch.setenv(hugepages.ENV, "0")
    plain = TwoTowerForCausalLM.from_pretrained(bundled_model_path()).eval()
    layer = plain.context_tower.layers[0]
    assert layer.mixer.dt_bias.data_ptr() - layer.norm.weight.data_ptr() != layer.norm.weight.nbytes
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(4, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.context_forward(ids), plain.context_forward(ids))
    model.save_pretrained(tmp_path)  # packed tensors share a mapping without overlapping: writable
    again = TwoTowerForCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


@needs_thp
def test_to_huge_pages_keeps_values_parameters_and_ties_and_trains():
    from twotower.backbone import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(tiny_config("M*E"))
    model.backbone.embeddings.weight = model.lm_head.weight  # a tie: one parameter in two places
    model.backbone.norm_f.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    old_ptr = model.lm_head.weight.data_ptr()  # (named_parameters lists the tie once)
    hugepages.to_huge_pages(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert dict(model.named_parameters()) == params  # the same parameter objects
    assert model.backbone.embeddings.weight is model.lm_head.weight  # still tied
    assert model.lm_head.weight.data_ptr() != old_ptr  # moved
    first, second = model.backbone.layers[0].norm.weight, model.backbone.layers[0].mixer.dt_bias
    assert second.data_ptr() - first.data_ptr() == first.nbytes  # packed together
    assert not model.backbone.norm_f.weight.requires_grad and model.lm_head.weight.requires_grad
    ids = torch.randint(4, model.config.vocab_size, (2, 6))
    model(ids).logits.float().logsumexp(-1).mean().backward()
    opt.step()  # the optimizer made before the move updates the moved weights
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert torch.equal(model.backbone.norm_f.weight, before["backbone.norm_f.weight"])
