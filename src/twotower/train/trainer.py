"""One trainer for AR pretraining and denoiser training: AdamW with warmup-stable-decay, gradient
accumulation, data parallelism on DDP or FSDP2 (`parallel.py`), held-out loss, safe sharded
checkpoints with exact resume (`checkpointing.py`), and throughput (tokens/s, step time, MFU).

The update is the single-process update on the whole global batch whatever the engine and the
number of processes: every rank takes a disjoint slice of the same global batch, its loss is a SUM
divided by the GLOBAL target count, and the engines SUM gradients over ranks.

Exact resume: batches and noise are pure functions of (seed, step); a checkpoint holds the trained
weights, the optimizer state, the step and the loss log. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpointing
from .flops import Peak, mfu
from .parallel import Dist, Engine, ParallelSettings, parallelize

LOG_NAME = "log.jsonl"
EXPORT_DIR = "model"
RESUME_MUST_MATCH = ("seed", "global_batch", "seq_len")  # what defines the data stream
logger = logging.getLogger("twotower.train")


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived: the step in progress was finished and saved, then the run stopped
    (resume it with the same command). `signum` is the signal."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by signal {signum} after step {step}, which is saved: rerun to resume")
        self.signum, self.step = signum, step


class _StopRequests:
    """SIGTERM / SIGINT handlers that only note the request, for the main thread (elsewhere signals
    cannot be handled here and nothing is installed); a signal that was ignored stays ignored.
    A second Ctrl-C (SIGINT) stops at once, as if no handler were here. Repeated SIGTERMs are
    only noted: torchrun forwards the one it gets while a cluster (Slurm) may signal the workers
    too, so a worker can see two within milliseconds. (torchrun kills its workers outright after
    `--shutdown-timeout`, 30 s by default: the step and its save must fit in it.)"""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                previous = signal.signal(sig, self._note)
                self._previous[sig] = signal.SIG_DFL if previous is None else previous  # None: set from C
        return self

    def _note(self, signum, _frame) -> None:
        if self.signum and signum == signal.SIGINT:  # Ctrl-C again: as if no handler were here
            self.__exit__()
            signal.raise_signal(signum)
            return
        if not self.signum:
            self.signum = signum
            logger.warning("signal %d: finishing this step, saving, then stopping (Ctrl-C again stops at once)",
                           signum)  # fmt: skip

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class NonFiniteLossError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm. Skipped steps
    change no weights, so every checkpoint holds finite weights (the last finite step's at most)."""


__all__ = ["Dist", "NonFiniteLossError", "StepBatch", "TrainSettings", "Trainer", "TrainingInterrupted", "wsd_lr"]


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a run (saved in each checkpoint's JSON state); `validate` says what is wrong."""

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
    keep_checkpoints: int = 2
    seed: int = 0
    bf16: bool = False  # bfloat16 compute, float32 master weights (see parallel.py)
    parallel: str = "auto"  # auto | none | ddp | fsdp
    activation_checkpointing: bool = False
    peak_tflops: float | None = None  # per device, for MFU (None: a known GPU's data sheet, else no MFU)
    # a step whose loss or gradient norm is not finite is skipped (weights and optimizer state left as
    # they were); this many in a row stop the run, before anything is saved (0: stop at the first)
    max_nonfinite_steps: int = 3

    def validate(self, world_size: int) -> None:
        for name in ("steps", "global_batch", "micro_batch", "seq_len", "eval_every", "save_every",
                     "keep_checkpoints"):  # fmt: skip
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
        if self.warmup_steps < 0 or self.eval_batches < 1 or self.max_nonfinite_steps < 0:
            raise ValueError(
                f"need warmup_steps >= 0, eval_batches >= 1 and max_nonfinite_steps >= 0, got "
                f"{self.warmup_steps}, {self.eval_batches}, {self.max_nonfinite_steps}"
            )
        if not self.grad_clip > 0:  # also refuses NaN; 0 would zero every gradient
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        ParallelSettings(mode=self.parallel).resolve(world_size)

    @property
    def parallel_settings(self) -> ParallelSettings:
        return ParallelSettings(self.parallel, self.bf16, self.activation_checkpointing)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


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
class StepBatch:
    """What one optimizer step consumes on this rank: micro-batches and the global target count."""

    micro: list = field(default_factory=list)
    global_count: int = 0


# An objective turns (step, dist) into a StepBatch, and (model, micro-item, global_count) into a loss;
# an evaluation runs its forwards through the engine (`engine.run(fn, *args)`) and returns a loss.
Prepare = Callable[[int, Dist], StepBatch]
LossFn = Callable[[nn.Module, object, int], torch.Tensor]
EvalFn = Callable[[Engine], float]


class Trainer:
    """Trains `trainable` (parameters of `model`, on its device, identical on every rank), exporting
    `out_dir/model` at the end. Under fsdp `model` is sharded in place (its parameters become DTensors),
    or is already the sharded root each rank built for itself (`parallel.shard_for_training`).

    flops_per_token: model FLOPs per trained token (`flops.py`), for MFU; peak: the device peak.
    """

    def __init__(
        self,
        model: nn.Module,
        trainable: list[nn.Parameter],
        *,
        prepare: Prepare,
        loss_fn: LossFn,
        settings: TrainSettings,
        out_dir: str | Path,
        evaluate: EvalFn | None = None,
        dist_info: Dist | None = None,
        flops_per_token: float | None = None,
        peak: Peak | None = None,
        progress: bool | None = None,
        data: dict | None = None,
        objective: dict | None = None,
    ) -> None:
        self.settings = settings
        self.data = data  # what identifies the training data (`PackedTokens.identity`), checked on resume
        self.objective = objective  # what else defines the run (block sizes, the frozen tower), checked too
        self.dist = dist_info or Dist()
        settings.validate(self.dist.world_size)
        self.prepare = prepare
        self.loss_fn = loss_fn
        self.out_dir = Path(out_dir)
        self.evaluate = evaluate
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.progress = progress
        self.engine = parallelize(model, trainable, dist_info=self.dist, settings=settings.parallel_settings)
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
        self.step = 0
        self.log: list[dict] = []
        self.nonfinite_in_a_row = 0

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    def _param_groups(self) -> list[dict]:
        """No weight decay on 1-D tensors (norms, biases, dt/A/D) or the adaLN tables."""
        decay, keep = [], []
        for name, p in zip(self.engine.names, self.engine.params, strict=True):
            (keep if p.dim() < 2 or "scale_shift_tables" in name else decay).append(p)
        return [{"params": decay}, {"params": keep, "weight_decay": 0.0}]

    # ---- checkpoints --------------------------------------------------------------------------------
    def save(self) -> None:
        state = checkpointing.TrainerState(
            self.step,
            self.log,
            {**asdict(self.settings), "data": self.data, "objective": self.objective},
            self.dist.world_size,
            self.engine.mode,
        )
        checkpointing.save_checkpoint(
            self.out_dir,
            engine=self.engine,
            optimizer=self.optimizer,
            state=state,
            keep=self.settings.keep_checkpoints,
        )

    def try_resume(self) -> bool:
        """Continue from the newest complete checkpoint in `out_dir`, if there is one."""
        path = checkpointing.latest_checkpoint(self.out_dir)
        if path is None:
            return False
        saved = checkpointing.read_state(path).settings
        for name in RESUME_MUST_MATCH:
            if saved.get(name) != getattr(self.settings, name):
                raise ValueError(
                    f"{path} was written with {name}={saved.get(name)}, this run has {getattr(self.settings, name)}; "
                    "use a fresh --out"
                )
        if saved.get("data") is not None and self.data is not None and saved["data"] != self.data:
            raise ValueError(f"{path} was written for other training data ({saved['data']}); use a fresh --out")
        if saved.get("objective") is not None and self.objective is not None and saved["objective"] != self.objective:
            changed = sorted(k for k in {*saved["objective"], *self.objective}
                             if saved["objective"].get(k) != self.objective.get(k))  # fmt: skip
            raise ValueError(
                f"{path} was written with other {', '.join(changed)} ("
                + ", ".join(f"{k}={saved['objective'].get(k)!r}, now {self.objective.get(k)!r}" for k in changed)
                + "); use a fresh --out"
            )
        state = checkpointing.load_checkpoint(path, engine=self.engine, optimizer=self.optimizer)
        self.step = state.step
        self.log = list(state.log)
        if self.dist.is_main:  # drop log lines of steps after the checkpoint: they will be redone
            lines = "".join(json.dumps(r) + "\n" for r in self.log)
            (self.out_dir / LOG_NAME).write_text(lines)
        if self.dist.is_main:
            logger.info("resumed from %s (step %d, written by %d processes)", path, state.step, state.world_size)
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
        for i, item in enumerate(batch.micro):
            with self.engine.accumulate(sync=i == len(batch.micro) - 1):
                loss = self.engine.run(self.loss_fn, item, batch.global_count)
                loss.backward()
            total += float(loss.detach())
        grad_norm = self.engine.clip_grad_norm_(s.grad_clip)
        device = self.engine.params[0].device
        loss_sum = float(self.dist.sum_(torch.tensor([total], dtype=torch.float64, device=device)))
        record = {"step": self.step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm}
        # both figures are global (summed, or the norm over every shard): every rank decides alike
        if math.isfinite(loss_sum) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
            return record
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row > s.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"step {self.step}: loss {loss_sum}, gradient norm {grad_norm}: {self.nonfinite_in_a_row} "
                f"non-finite step(s) in a row (max_nonfinite_steps={s.max_nonfinite_steps}); the weights saved "
                f"since are the last finite step's: lower the learning rate or check the data, then resume"
            )
        logger.warning("step %d: non-finite loss %s or gradient norm %s; skipped (weights unchanged)",
                       self.step, loss_sum, grad_norm)  # fmt: skip
        return {**record, "skipped": "non-finite loss or gradient norm"}

    def _throughput(self, seconds: float) -> dict:
        tokens_per_s = self.settings.tokens_per_step / max(seconds, 1e-9)
        record = {"tokens_per_s": tokens_per_s, "step_time_s": seconds}
        if self.flops_per_token is not None and self.peak is not None and self.peak.flops is not None:
            record["mfu"] = mfu(flops_per_token=self.flops_per_token, tokens_per_s=tokens_per_s,
                                peak=self.peak.flops, devices=self.dist.world_size)  # fmt: skip
        return record

    def _announce(self) -> None:
        s, d = self.settings, self.dist
        precision = "bf16 compute, fp32 master weights" if s.bf16 else "fp32"
        logger.info("engine %s on %d process(es), %s%s", self.engine.mode, d.world_size, precision,
                    ", activation checkpointing" if s.activation_checkpointing else "")  # fmt: skip
        if self.flops_per_token is not None:
            logger.info("model FLOPs per trained token %.4g; %s", self.flops_per_token,
                        self.peak.note if self.peak else "no peak FLOP/s: MFU omitted")  # fmt: skip
        if self.evaluate is None:
            logger.warning("no held-out set: training without evaluation")
        if s.warmup_steps > s.steps:
            logger.warning("warmup_steps %d > steps %d: the learning rate never reaches its peak %g",
                           s.warmup_steps, s.steps, s.lr)  # fmt: skip

    def run(self) -> list[dict]:
        s = self.settings
        resumed = self.try_resume()
        if self.dist.is_main:
            self._announce()
        bar = tqdm(
            total=s.steps,
            initial=self.step,
            disable=not self.dist.is_main or (self.progress is False),
            desc="resumed" if resumed else "train",
            dynamic_ncols=True,
        )
        with _StopRequests() as stop:
            while self.step < s.steps:
                self._one_step(bar)
                signum = self._stop_requested(stop) if self.step < s.steps else 0  # the last step ends anyway
                if signum:
                    if self.step % s.save_every:  # not saved by the step itself
                        self.save()
                    bar.close()
                    raise TrainingInterrupted(signum, self.step)
        bar.close()
        checkpointing.export_pretrained(self.engine, self.out_dir / EXPORT_DIR)
        if self.dist.is_main:
            self._summary()
        return self.log

    def _one_step(self, bar) -> None:
        s = self.settings
        started = time.perf_counter()
        record = self.train_step()
        _synchronize(self.engine.params[0].device)
        record.update(self._throughput(time.perf_counter() - started))
        self.step += 1
        if self.evaluate is not None and (self.step % s.eval_every == 0 or self.step == s.steps):
            record["heldout_loss"] = self.evaluate(self.engine)
        self.log.append(record)
        if self.dist.is_main:
            self._append_log(record)
        shown = {"loss": f"{record['loss']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
        if "mfu" in record:
            shown["mfu"] = f"{record['mfu']:.1%}"
        bar.set_postfix(shown)
        bar.update(1)
        if self.step % s.save_every == 0 or self.step == s.steps:
            self.save()

    def _stop_requested(self, stop: _StopRequests) -> int:
        """The signal if any rank was asked to stop, else 0; agreed by all ranks (one all-reduce of
        a flag per step), so that they all save the same step."""
        if not self.dist.is_distributed:
            return stop.signum
        flag = torch.tensor([float(stop.signum > 0)], dtype=torch.float64, device=self.engine.params[0].device)
        self.dist.sum_(flag)
        return (stop.signum or int(signal.SIGTERM)) if float(flag) > 0 else 0

    def _summary(self) -> None:
        timed = [r for r in self.log if "step_time_s" in r][1:]  # the first step includes warm-up
        if not timed:
            return
        seconds = sum(r["step_time_s"] for r in timed)
        summary = self._throughput(seconds / len(timed))
        line = f"throughput {summary['tokens_per_s']:.1f} tokens/s, {summary['step_time_s']:.3f} s/step"
        logger.info(line + (f", MFU {summary['mfu']:.2%}" if "mfu" in summary else ""))

    def _append_log(self, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
