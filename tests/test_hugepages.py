"""Weights in transparent huge pages (`twotower.hugepages`): placement, lifetime, loading, training."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from twotower import TwoTowerForCausalLM, hugepages
from twotower.loading import bundled_model_path

from .conftest import tiny_config

needs_thp = pytest.mark.skipif(not hugepages.enabled(), reason="this kernel has no transparent huge pages")


def _vma_fields(address: int) -> dict[str, str]:
    """The smaps fields of the mapping region holding `address`."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head.endswith(":"):
            fields[head[:-1]] = line.split(maxsplit=1)[1].strip() if len(line.split()) > 1 else ""
    return fields


def _mapped(address: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


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
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one packed mapping
    assert a.data_ptr() + a.nbytes <= b.data_ptr()  # not overlapping
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
    norm = model.context_tower.layers[0].norm.weight  # small: packed with the others
    assert norm.untyped_storage().nbytes() > norm.nbytes
    monkeypatch.setenv(hugepages.ENV, "0")
    plain = TwoTowerForCausalLM.from_pretrained(bundled_model_path()).eval()
    assert plain.lm_head.weight.untyped_storage().nbytes() == plain.lm_head.weight.nbytes
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
def test_to_huge_pages_keeps_values_and_trains():
    from twotower.backbone import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(tiny_config("M*E"))
    model.backbone.norm_f.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hugepages.to_huge_pages(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    params = dict(model.named_parameters())
    assert all(isinstance(p, torch.nn.Parameter) for p in params.values())
    assert not params["backbone.norm_f.weight"].requires_grad and params["lm_head.weight"].requires_grad
    assert params["lm_head.weight"].untyped_storage().nbytes() > params["lm_head.weight"].nbytes  # moved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(4, model.config.vocab_size, (2, 6))
    model(ids).logits.float().logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])  # updated in place
    assert torch.equal(model.backbone.norm_f.weight, before["backbone.norm_f.weight"])
