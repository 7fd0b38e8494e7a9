"""One trainer for AR pretraining and denoiser training: AdamW with warmup-stable-decay, gradient
accumulation, data parallelism across processes, held-out loss, checkpoints and exact resume.

Data parallelism (`torchrun --nproc_per_node=N`): every rank takes a disjoint slice of the same
global batch, its loss is a SUM divided by the GLOBAL target count, and gradients are summed with one
all-reduce per step. The update is therefore the single-process update on the whole global batch
(DDP semantics, written out so frozen towers need no special casing). gloo on CPU, nccl on GPU.

Exact resume: batches and noise are pure functions of (seed, step); a checkpoint holds the model,
the optimizer, the step and the loss log, written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    global_batch: int = 16
    micro_batch: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays lr -> min_lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0
    bf16: bool = False  # autocast to bfloat16 (GPU); fp32 on CPU by default

    def validate(self, world_size: int) -> None:
        for name in ("steps", "global_batch", "micro_batch", "seq_len", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch % world_size:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by {world_size} processes")
        if (self.global_batch // world_size) % self.micro_batch and self.micro_batch < self.global_batch // world_size:
            raise ValueError(
                f"the per-process batch {self.global_batch // world_size} is not a multiple of micro_batch "
                f"{self.micro_batch}"
            )
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")


def wsd_lr(step: int, s: TrainSettings) -> float:
    """Warmup (linear) - stable - decay (cosine to min_lr over the last decay_fraction of steps)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    decay_start = int(s.steps * (1 - s.decay_fraction))
    if step < decay_start or s.steps == decay_start:
        return s.lr
    progress = (step - decay_start) / max(1, s.steps - decay_start)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """Join the process group torchrun set up (WORLD_SIZE > 1), else a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t


@dataclass
class StepBatch:
    """What one optimizer step consumes on this rank: micro-batches and the global target count."""

    micro: list = field(default_factory=list)
    global_count: int = 0


# An objective turns (step, dist) into a StepBatch, and (model, micro-item, global_count) into a loss.
Prepare = Callable[[int, Dist], StepBatch]
LossFn = Callable[[nn.Module, object, int], torch.Tensor]
EvalFn = Callable[[nn.Module], float]


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        *,
        prepare: Prepare,
        loss_fn: LossFn,
        settings: TrainSettings,
        out_dir: str | Path,
        evaluate: EvalFn | None = None,
        dist_info: Dist | None = None,
        on_save: Callable[[nn.Module, Path], None] | None = None,
        progress: bool | None = None,
    ) -> None:
        self.model = model
        self.params = params
        self.prepare = prepare
        self.loss_fn = loss_fn
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.evaluate = evaluate
        self.dist = dist_info or Dist()
        self.on_save = on_save
        self.progress = progress
        settings.validate(self.dist.world_size)
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
        self.step = 0
        self.log: list[dict] = []

    def _param_groups(self) -> list[dict]:
        """No weight decay on 1-D tensors (norms, biases, dt/A/D) or the adaLN tables."""
        decay = [p for p in self.params if p.dim() >= 2 and p.shape[0] != 3]
        keep = [p for p in self.params if not (p.dim() >= 2 and p.shape[0] != 3)]
        return [{"params": decay}, {"params": keep, "weight_decay": 0.0}]

    # ---- checkpoints --------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save(self) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "log": self.log,
            "settings": asdict(self.settings),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)
        if self.on_save is not None:
            self.on_save(self.model, self.out_dir)

    def try_resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated or foreign file: say so, never guess
            raise ValueError(f"cannot resume from {self.checkpoint_path}: {err}") from None
        if state.get("settings", {}).get("seed") != self.settings.seed:
            raise ValueError(f"{self.checkpoint_path} was written with another seed; use a fresh --out")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.log = list(state["log"])
        if self.dist.is_main:  # drop log lines of steps after the checkpoint: they will be redone
            lines = "".join(json.dumps(r) + "\n" for r in self.log)
            (self.out_dir / LOG_NAME).write_text(lines)
        return True

    # ---- the loop -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        s = self.settings
        lr = wsd_lr(self.step, s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.prepare(self.step, self.dist)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for item in batch.micro:
            with torch.autocast(self._device_type(), dtype=torch.bfloat16, enabled=s.bf16):
                loss = self.loss_fn(self.model, item, batch.global_count)
            loss.backward()
            total += float(loss.detach())
        self._sync_grads()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip))
        self.optimizer.step()
        loss_sum = self.dist.sum_(torch.tensor([total], dtype=torch.float64))
        return {"step": self.step, "loss": float(loss_sum), "lr": lr, "grad_norm": grad_norm}

    def _sync_grads(self) -> None:
        if self.dist.world_size == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def _device_type(self) -> str:
        return self.params[0].device.type

    def run(self) -> list[dict]:
        s = self.settings
        resumed = self.try_resume()
        bar = tqdm(
            total=s.steps,
            initial=self.step,
            disable=not self.dist.is_main or (self.progress is False),
            desc="resumed" if resumed else "train",
            dynamic_ncols=True,
        )
        tokens_per_step = s.global_batch * s.seq_len
        t_last = time.perf_counter()
        while self.step < s.steps:
            record = self.train_step()
            now = time.perf_counter()
            record["tokens_per_s"] = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            self.step += 1
            if self.evaluate is not None and (self.step % s.eval_every == 0 or self.step == s.steps):
                record["heldout_loss"] = self.evaluate(self.model)
            self.log.append(record)
            if self.dist.is_main:
                self._append_log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if self.step % s.save_every == 0 or self.step == s.steps:
                self.save()
        bar.close()
        return self.log

    def _append_log(self, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
