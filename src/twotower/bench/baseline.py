"""The external baseline: `transformers`' `generate` on the same AR weights (the context tower and
its head exported as a Hugging Face NemotronH checkpoint). `transformers` is optional here."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch

from ..backbone import NemotronHForCausalLM
from ..decode.batch import GenerationOutput, cut_at_eos, left_pad, normalise_eos


def export_context_tower(model, path) -> None:
    """Write the context tower + AR head of a TwoTower as a plain NemotronH checkpoint directory."""
    config = model.config.replace(extra={**model.config.extra, "architectures": ["NemotronHForCausalLM"]})
    with torch.device("meta"):
        backbone = NemotronHForCausalLM(config)
    backbone.backbone.load_state_dict(model.context_tower.state_dict(), assign=True)
    backbone.lm_head.load_state_dict(model.context_lm_head.state_dict(), assign=True)
    backbone.save_pretrained(path)


def load_hf_baseline(model):
    """`transformers.NemotronHForCausalLM` holding the context tower's weights, float32, eval mode.
    Raises ImportError when `transformers` (or its NemotronH) is not installed."""
    import transformers

    if not hasattr(transformers, "NemotronHForCausalLM"):
        raise ImportError(f"transformers {transformers.__version__} has no NemotronHForCausalLM")
    transformers.logging.set_verbosity_error()  # CPU falls back to its torch paths; that warning is expected
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        export_context_tower(model, tmp)
        hf = transformers.NemotronHForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return hf.to(model.context_device).eval()


@torch.no_grad()
def hf_generate(
    hf_model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_token_id, pad_token_id: int
) -> GenerationOutput:
    """Greedy `generate` over left-padded prompts; rows cut after their first EOS (padding dropped).
    stats["nfe"] = decoding forwards: one per generated position of the longest row."""
    batch = left_pad(prompts, pad_id=pad_token_id, device=hf_model.device)
    eos = normalise_eos(eos_token_id)
    out = hf_model.generate(
        batch.ids,
        attention_mask=batch.mask.long(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(eos) or None,
        pad_token_id=pad_token_id,
    )
    new = out[:, batch.ids.shape[1] :].cpu()
    rows = [cut_at_eos(r, eos) for r in new.tolist()]
    return GenerationOutput(out.cpu(), batch.lengths, rows, {"nfe": new.shape[1]})
