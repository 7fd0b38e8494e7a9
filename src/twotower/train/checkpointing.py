"""Safe, sharded, resumable training checkpoints: torch.distributed.checkpoint (DCP) writing
safetensors, plus a JSON trainer state; nothing is ever pickled or unpickled.

Layout of `out/checkpoints/`:
    step-00000100/                      one checkpoint
        shard-0000R-model-00001-of-00001.safetensors   rank R-1's part (DCP's HuggingFace storage:
                                        each tensor shard with its offsets in the safetensors header)
        trainer_state.json              step, log, settings, world size (written last)
    latest                              the name of the newest complete checkpoint

What is saved: the TRAINED parameters (and the buffers) and the AdamW state (`exp_avg`, `exp_avg_sq`, `step`) as
DCP sharded state dicts (the frozen context tower is rebuilt from its source on resume and is
checked to be bit-for-bit frozen by the tests; it is not copied into every checkpoint). The
optimizer's hyperparameters come from the run's settings. Because the shards carry their global
offsets, a checkpoint written by N processes (FSDP2 or DDP) loads on any other number.

Crash safety: every rank writes into `.step-XXXXXXXX.tmp/`; once all ranks are done, rank 0 writes
`trainer_state.json`, renames the directory to `step-XXXXXXXX/` (atomic) and only then replaces the
`latest` pointer (atomic). A crash at any point leaves `latest` naming a complete checkpoint (or
nothing), so resume never reads a half-written one; stale `.tmp` directories are removed on the
next save. All ranks read and write `out/checkpoints` (a file system every rank sees).

Why not DCP's default format: its `.metadata` file is read back with `pickle.load` (unrestricted),
and its tensors with `torch.load(weights_only=True)`. The HuggingFace storage reader used here
reads only safetensors headers (JSON) and tensor bytes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from ..staged_dir import commit_directory, write_text_atomically
from .parallel import Engine

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
STATE_NAME = "trainer_state.json"
FORMAT = "twotower.train_checkpoint"
VERSION = 1
MODEL_KEY = "model"
OPTIM_KEY = "optim"


@dataclass(frozen=True)
class TrainerState:
    """The JSON half of a checkpoint: everything that is not a tensor."""

    step: int
    log: list[dict]
    settings: dict
    world_size: int
    mode: str

    def to_json(self) -> str:
        record = {"format": FORMAT, "version": VERSION, **self.__dict__}
        return json.dumps(record, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: Path) -> TrainerState:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not a trainer state ({err})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"{where}: not a {FORMAT} file")
        if record.get("version") != VERSION:
            raise ValueError(f"{where}: checkpoint version {record.get('version')}, this code reads {VERSION}")
        fields = {"step": int, "log": list, "settings": dict, "world_size": int, "mode": str}
        missing = [k for k in fields if k not in record]
        if missing:
            raise ValueError(f"{where}: a damaged trainer state (no {', '.join(missing)})")
        wrong = [k for k, kind in fields.items() if not isinstance(record[k], kind) or isinstance(record[k], bool)]
        if wrong or record["step"] < 0:
            bad = wrong[0] if wrong else "step"
            raise ValueError(f"{where}: a damaged trainer state ({bad} = {record[bad]!r})")
        return cls(**{k: record[k] for k in fields})


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The directory the `latest` pointer names, or None when there is no (complete) checkpoint."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_NAME).is_file():
        raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def read_state(path: str | Path) -> TrainerState:
    """The trainer state of one checkpoint directory."""
    where = Path(path) / STATE_NAME
    return TrainerState.from_json(where.read_text(), where=where)


# ---- the tensor half ---------------------------------------------------------------------------------
def _state_dicts(engine: Engine, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """DCP state dicts of the trained parameters and the AdamW state (sharded under fsdp)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(engine.module, optimizer, options=options)
    return {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}


def save_checkpoint(
    out_dir: str | Path,
    *,
    engine: Engine,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    keep: int = 2,
) -> Path:
    """Write one checkpoint (every rank calls this) and point `latest` at it; keep the newest `keep`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    d = engine.dist
    root = Path(out_dir) / CHECKPOINTS_DIR
    final = root / step_dir_name(state.step)
    tmp = root / f".{final.name}.tmp"
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".*.tmp"), *root.glob(".*.old")]:  # left by a crash: never complete
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:  # a half-written `latest` (write_text_atomically's temporary file)
                stale.unlink(missing_ok=True)
        tmp.mkdir()
    d.barrier()
    sd = _state_dicts(engine, optimizer)
    sd[OPTIM_KEY] = {"state": sd[OPTIM_KEY]["state"]}  # hyperparameters come from the settings
    with _single_process_quiet():
        dcp.save(
            sd, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True), no_dist=not d.is_distributed
        )
    d.barrier()
    if d.is_main:
        _write_atomically(tmp / STATE_NAME, state.to_json())
        commit_directory(tmp, final)
        _write_atomically(root / LATEST_NAME, final.name + "\n")
        _prune(root, current=final, keep=keep)
    d.barrier()
    return final


def load_checkpoint(path: str | Path, *, engine: Engine, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Load the trained parameters and optimizer state of checkpoint `path` into `engine` and
    `optimizer` (any world size, any engine), and return its trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    state = read_state(path)
    sd = _state_dicts(engine, optimizer)
    groups = sd[OPTIM_KEY]["param_groups"]
    target = {MODEL_KEY: sd[MODEL_KEY], OPTIM_KEY: {"state": sd[OPTIM_KEY]["state"]}}
    try:
        with _single_process_quiet():
            dcp.load(target, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not engine.dist.is_distributed)
    except (Exception, CheckpointException) as err:  # a foreign or damaged checkpoint: say which, never guess
        raise ValueError(f"cannot resume from {path}: {_last_line(err)}") from None
    optim_sd = {"state": target[OPTIM_KEY]["state"], "param_groups": groups}
    set_state_dict(engine.module, optimizer, model_state_dict=target[MODEL_KEY], optim_state_dict=optim_sd,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # fmt: skip
    return state


# ---- exported weights ----------------------------------------------------------------------------------
def export_pretrained(engine: Engine, path: str | Path) -> None:
    """Write the whole model (both towers) as a released-layout safetensors directory via its
    `save_pretrained` (every rank calls this; rank 0 writes). Under fsdp the full weights are
    gathered to rank 0's CPU first. The directory is replaced only once complete."""
    model = engine.model
    if engine.mode == "fsdp":
        model = _gathered_copy(engine)
    if engine.dist.is_main:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        commit_directory(tmp, path)
    engine.dist.barrier()


def _gathered_copy(engine: Engine) -> nn.Module | None:
    """A plain (unsharded, CPU) copy of the sharded model on rank 0; None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not engine.dist.is_main:
        return None
    inner = engine.model
    prefix = "model."  # the LossModule's attribute
    with torch.device("meta"):
        copy = type(inner)(inner.config)
    copy.load_state_dict({k.removeprefix(prefix): v for k, v in full.items()}, assign=True)
    return copy


def _last_line(err: BaseException) -> str:
    """The cause of a (possibly DCP-wrapped, multi-line) error in one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save or load that it is single-process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ---- file system -----------------------------------------------------------------------------------------
def _write_atomically(path: Path, text: str) -> None:
    write_text_atomically(path, text)  # (a name of its own: the crash tests patch it)


def _prune(root: Path, *, current: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `current`; drop later ones (left by a run that crashed
    before pointing `latest` at them, then resumed from an earlier one)."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[: max(done.index(current) + 1 - keep, 0)] + done[done.index(current) + 1 :]:
        shutil.rmtree(old)
