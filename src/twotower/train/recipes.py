"""The two training recipes, wired from packed data to the Trainer:
`pretrain_backbone` (AR, for making small NemotronH models) and `train_denoiser` (SPEC section 4).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbone import NemotronHForCausalLM
from ..config import NemotronHConfig
from ..model import TwoTowerForCausalLM
from .data import PackedTokens
from .flops import ar_train_flops, denoiser_train_flops, peak_flops
from .objective import ar_loss, count_masked, diffusion_loss, draw_noise
from .parallel import LossModule, is_sharded
from .trainer import Dist, StepBatch, Trainer, TrainSettings

logger = logging.getLogger("twotower.train")


@dataclass(frozen=True)
class DataPaths:
    train: Path
    heldout: Path | None

    @classmethod
    def from_dir(cls, path: str | Path) -> DataPaths:
        path = Path(path)
        train = path / "train.bin"
        if not train.is_file():
            raise ValueError(f"{path}: no train.bin (pack a corpus first)")
        heldout = path / "heldout.bin"
        return cls(train, heldout if heldout.is_file() else None)


def check_vocab(data: PackedTokens, vocab_size: int) -> None:
    """ValueError when `data` was packed with a tokenizer of more ids than the model has: such
    tokens would index past its embedding (a crash at the first step, or, for a model only a
    little smaller, silently wrong training)."""
    packed = data.metadata.get("vocab_size")
    if isinstance(packed, int) and packed > vocab_size:
        raise ValueError(
            f"{data.bin_path} was packed with a tokenizer of {packed} tokens; the model has {vocab_size}: "
            "pack the data with the model's tokenizer"
        )


def heldout_tokens(paths: DataPaths, *, seq_len: int, announce: bool = True) -> PackedTokens | None:
    """The held-out split if it holds at least one `seq_len` window; else None, with a warning (when
    `announce`) that training runs without evaluation (decided before the first step, not after the last)."""
    if paths.heldout is None:
        if announce:
            logger.warning("%s: no heldout.bin: training without evaluation", paths.train.parent)
        return None
    data = PackedTokens(paths.heldout)
    if len(data) < seq_len:
        if announce:
            logger.warning("%s holds %d tokens, fewer than one %d-token window: training without evaluation",
                       paths.heldout, len(data), seq_len)  # fmt: skip
        return None
    return data


def _micro_slices(rows: int, micro: int) -> list[slice]:
    micro = min(micro, rows)
    return [slice(i, i + micro) for i in range(0, rows, micro)]


def _heldout_eval(loss_of, data: PackedTokens | None, s: TrainSettings):
    if data is None:
        return None

    @torch.no_grad()
    def evaluate(engine) -> float:
        """Every rank evaluates the same batches (the engines need every rank in every forward)."""
        model = engine.model
        was_training = model.training
        model.eval()
        total = count = 0.0
        for i in range(s.eval_batches):
            ids = data.batch(i, global_batch_size=s.micro_batch, seq_len=s.seq_len, seed=s.seed + 12345)
            out = engine.run(loss_of, ids, i)
            total += float(out.total)
            count += out.count
        model.train(was_training)
        return total / max(count, 1)

    return evaluate


def pretrain_backbone(
    config: NemotronHConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    *,
    device: str = "cpu",
    progress: bool | None = None,
) -> list[dict]:
    """AR pretraining of a fresh NemotronH model, initialised from `settings.seed` (the same weights on
    every rank); exports `out_dir/model` at the end."""
    dist_info = Dist.from_env(device=device)
    device = dist_info.device(device)
    paths = DataPaths.from_dir(data_dir)
    train = PackedTokens(paths.train)
    check_vocab(train, config.vocab_size)
    if settings.seq_len + 1 > len(train):
        raise ValueError(
            f"seq_len {settings.seq_len} needs rows of {settings.seq_len + 1} tokens (inputs and their next-token "
            f"targets); {paths.train} holds {len(train)}"
        )
    heldout = heldout_tokens(paths, seq_len=settings.seq_len, announce=dist_info.is_main)
    torch.manual_seed(settings.seed)
    model = NemotronHForCausalLM(config).to(device).train()
    local = settings.global_batch // dist_info.world_size

    def prepare(step: int, d: Dist) -> StepBatch:
        ids = train.batch(
            step,
            global_batch_size=settings.global_batch,
            seq_len=settings.seq_len + 1,
            seed=settings.seed,
            rank=d.rank,
            world_size=d.world_size,
        ).to(device)
        return StepBatch(
            [ids[sl] for sl in _micro_slices(local, settings.micro_batch)], settings.global_batch * settings.seq_len
        )

    def loss_fn(model, ids, global_count):
        return ar_loss(model, ids, global_count=global_count).total

    evaluate = _heldout_eval(lambda m, ids, i: ar_loss(m, ids.to(device)), heldout, settings)
    trainer = Trainer(
        model,
        list(model.parameters()),
        prepare=prepare,
        loss_fn=loss_fn,
        settings=settings,
        out_dir=out_dir,
        evaluate=evaluate,
        dist_info=dist_info,
        flops_per_token=ar_train_flops(config, seq_len=settings.seq_len).per_token,
        peak=peak_flops(device, bf16=settings.bf16, tflops=settings.peak_tflops),
        progress=progress,
        data=train.identity(),
        objective={"kind": "backbone", "config": config.to_dict()},
    )
    return trainer.run()


def block_size_schedule(block_size: int, curriculum: Sequence[tuple[int, int]] = ()) -> Callable[[int], int]:
    """step -> block size: each (size, steps) phase of `curriculum` in turn, then `block_size`."""
    phases = []
    end = 0
    for size, steps in curriculum:
        if not isinstance(size, int) or size < 1 or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"a curriculum phase is (block size >= 1, steps >= 1), got ({size!r}, {steps!r})")
        end += steps
        phases.append((end, size))
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")

    def block_at(step: int) -> int:
        for phase_end, size in phases:
            if step < phase_end:
                return size
        return block_size

    return block_at


def context_identity(model: TwoTowerForCausalLM) -> dict:
    """What identifies the frozen context tower a denoiser is trained against, alike on every rank
    and without reading its weights: a digest of its config and its parameter count (another
    architecture is caught; the same architecture with other weights is not)."""
    fields = model.config.to_dict()
    for key in ("block_size", "mask_token_id"):  # the run's own settings, not the tower's (checked apart)
        fields.pop(key, None)
    config = json.dumps(fields, sort_keys=True, default=str)
    count = sum(p.numel() for part in (model.context_tower, model.context_lm_head) for p in part.parameters())
    return {"config_sha256": hashlib.sha256(config.encode()).hexdigest()[:16], "parameters": count}


def check_denoiser_options(
    settings: TrainSettings, *, block_size: int, curriculum: Sequence[tuple[int, int]], world_size: int = 1
) -> None:
    """ValueError for settings `train_denoiser` cannot run, before any model is loaded: the
    trainer's (`TrainSettings.validate`), a curriculum that leaves no steps at `block_size`, block
    sizes that do not divide `seq_len`."""
    settings.validate(world_size)
    if curriculum and sum(steps for _, steps in curriculum) >= settings.steps:
        raise ValueError(
            f"the curriculum's {sum(steps for _, steps in curriculum)} steps leave none of the {settings.steps} "
            f"for block_size {block_size}, which the saved model would claim it was trained at"
        )
    for size in {block_size, *(b for b, _ in curriculum)}:
        if size < 1 or settings.seq_len % size:
            raise ValueError(f"seq_len {settings.seq_len} must be a multiple of block size {size}")


def train_denoiser(
    model: TwoTowerForCausalLM | LossModule,
    data_dir: str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    *,
    block_size: int = 16,
    curriculum: Sequence[tuple[int, int]] = (),
    device: str = "cpu",
    progress: bool | None = None,
) -> list[dict]:
    """Train the denoiser of `model` (context tower frozen) with the single-pass objective.

    `curriculum`: the paper's block-size curriculum, as (block size, steps) phases run first, e.g.
    `[(32, 1000)]` trains with 32-token blocks for steps 0..999 and with `block_size` after. The
    block size is a function of the step, so a resumed run sees what an uninterrupted one would.
    `block_size` (the last phase) is what the saved model records as its trained block size.

    `model` is a whole TwoTower (identical on every rank), or the sharded root that
    `rank_load.load_sharded_twotower` built on this rank's device (fsdp only).
    """
    dist_info = Dist.from_env(device=device)
    check_denoiser_options(settings, block_size=block_size, curriculum=curriculum, world_size=dist_info.world_size)
    block_at = block_size_schedule(block_size, curriculum)
    device = dist_info.device(device)
    paths = DataPaths.from_dir(data_dir)
    train = PackedTokens(paths.train)
    heldout = heldout_tokens(paths, seq_len=settings.seq_len, announce=dist_info.is_main)
    root = model if is_sharded(model) else None
    model = root.model if root is not None else model.to(device)
    check_vocab(train, model.config.vocab_size)
    model.config.extra["block_size"] = block_size
    model.config.extra.setdefault("mask_token_id", model.mask_token_id)
    model.train()
    model.context_tower.eval()  # frozen; eval() is a no-op today but states the intent
    local = settings.global_batch // dist_info.world_size

    def prepare(step: int, d: Dist) -> StepBatch:
        ids = train.batch(
            step,
            global_batch_size=settings.global_batch,
            seq_len=settings.seq_len,
            seed=settings.seed,
            rank=d.rank,
            world_size=d.world_size,
        ).to(device)
        size = block_at(step)
        t, u = draw_noise(settings.global_batch, settings.seq_len, block_size=size, seed=settings.seed, step=step)
        count = count_masked(t, u, block_size=size)
        rows = slice(d.rank * local, (d.rank + 1) * local)
        t, u = t[rows].to(device), u[rows].to(device)
        micro = [(ids[sl], (t[sl], u[sl]), size) for sl in _micro_slices(local, settings.micro_batch)]
        return StepBatch(micro, count)

    def loss_fn(model, item, global_count):
        ids, noise, size = item
        return diffusion_loss(model, ids, noise, block_size=size, global_count=global_count).total

    def heldout_loss(m, ids, i):
        noise = draw_noise(ids.shape[0], settings.seq_len, block_size=block_size, seed=settings.seed + 999, step=i)
        return diffusion_loss(m, ids.to(device), noise, block_size=block_size)

    trainer = Trainer(
        root if root is not None else model,
        model.denoiser_parameters(),
        prepare=prepare,
        loss_fn=loss_fn,
        settings=settings,
        out_dir=out_dir,
        evaluate=_heldout_eval(heldout_loss, heldout, settings),
        dist_info=dist_info,
        flops_per_token=denoiser_train_flops(model.config, seq_len=settings.seq_len, block_size=block_size).per_token,
        peak=peak_flops(device, bf16=settings.bf16, tflops=settings.peak_tflops),
        progress=progress,
        data=train.identity(),
        objective={
            "kind": "denoiser",
            "block_size": block_size,
            "curriculum": [list(phase) for phase in curriculum],
            "context_tower": context_identity(model),
        },
    )
    return trainer.run()
