"""What stops a long run from losing finished work: a non-finite step is skipped (and too many stop
the run before anything bad is saved), SIGTERM/SIGINT save the step in progress and stop, a
half-written `latest` left by a crash does not block later saves, a resume with another block size
or curriculum is refused, bad settings are refused before a model is loaded, and the Mamba scans
stay float32 under autocast."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.test_trainer import SMALL, twotower_model, write_packed
from twotower.cli import main as cli_main
from twotower.train import checkpointing
from twotower.train.recipes import train_denoiser
from twotower.train.trainer import NonFiniteLossError, StepBatch, Trainer, TrainingInterrupted, TrainSettings


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)

    def save_pretrained(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)


def _trainer(out: Path, *, bad_steps=(), on_step=None, dist_info=None, **settings) -> tuple[Trainer, Tiny]:
    model = Tiny()

    def prepare(step, _dist):
        if on_step is not None:
            on_step(step)
        return StepBatch([step], 1)

    def loss_fn(m, step, _count):
        loss = m.lin(torch.ones(1, 4)).square().sum()
        return loss * float("nan") if step in bad_steps else loss

    base = dict(steps=6, global_batch=1, micro_batch=1, seq_len=1, warmup_steps=1, save_every=2, eval_every=100)
    s = TrainSettings(**{**base, **settings})
    return Trainer(model, list(model.parameters()), prepare=prepare, loss_fn=loss_fn, settings=s, out_dir=out,
                   progress=False, dist_info=dist_info), model  # fmt: skip


def test_a_non_finite_step_is_skipped_and_the_weights_stay_finite(tmp_path):
    snapshots = {}
    trainer, model = _trainer(
        tmp_path,
        bad_steps={3},
        on_step=lambda step: snapshots.setdefault(step, [p.clone() for p in model.parameters()]),
    )
    log = trainer.run()
    assert [r.get("skipped") is not None for r in log] == [False, False, False, True, False, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for before, after in zip(snapshots[3], snapshots[4], strict=True):  # step 3 changed nothing
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    for before, after in zip(snapshots[4], snapshots[5], strict=True):  # step 4 trained again
        assert not torch.equal(after, before)
    assert [json.loads(x).get("skipped") is not None for x in (tmp_path / "log.jsonl").read_text().splitlines()][3]


def test_too_many_non_finite_steps_stop_before_a_bad_save(tmp_path):
    trainer, _ = _trainer(tmp_path, bad_steps={3, 4}, max_nonfinite_steps=1)
    with pytest.raises(NonFiniteLossError, match="2 non-finite step"):
        trainer.run()
    latest = checkpointing.latest_checkpoint(tmp_path)  # step 4: after the skipped step 3, before the raise
    assert latest is not None and checkpointing.read_state(latest).step == 4
    tensors = {}
    for f in latest.glob("*.safetensors"):
        tensors.update(load_file(f))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())  # weights and AdamW state
    trainer, _ = _trainer(tmp_path / "zero", bad_steps={1}, max_nonfinite_steps=0)
    with pytest.raises(NonFiniteLossError):
        trainer.run()


@pytest.fixture
def not_ignored(request):
    """The parametrized signal with its default handling for the test: a shell's background job
    inherits SIGINT ignored, and the trainer rightly leaves an ignored signal alone."""
    sig = request.node.callspec.params["sig"]
    before = signal.getsignal(sig)
    if before == signal.SIG_IGN:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    yield sig
    signal.signal(sig, before)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_in_progress_and_a_rerun_resumes_exactly(tmp_path, sig, not_ignored):
    uninterrupted, _ = _trainer(tmp_path / "full")
    full = [r["loss"] for r in uninterrupted.run()]

    def send(step):
        if step == 2:  # arrives mid-step 2 (0-based): steps 0..2 are done and saved at 3
            signal.raise_signal(sig)

    trainer, _ = _trainer(tmp_path / "run", on_step=send)
    handler = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.run()
    assert stopped.value.signum == sig and stopped.value.step == 3
    assert checkpointing.read_state(checkpointing.latest_checkpoint(tmp_path / "run")).step == 3
    assert signal.getsignal(sig) is handler  # the handlers are put back
    resumed, _ = _trainer(tmp_path / "run")
    log = resumed.run()
    assert [r["loss"] for r in log] == full
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(6))  # each step once


def test_a_repeated_sigterm_still_saves_and_an_ignored_signal_stays_ignored(tmp_path):
    """torchrun forwards its SIGTERM while a cluster may signal the worker too: two in a row still
    finish and save the step. A signal the process ignores is not taken over."""

    def twice(step):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)

    trainer, _ = _trainer(tmp_path / "twice", on_step=twice)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.run()
    assert stopped.value.step == 2
    assert checkpointing.read_state(checkpointing.latest_checkpoint(tmp_path / "twice")).step == 2
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer, _ = _trainer(tmp_path / "ignored", on_step=lambda step: signal.raise_signal(signal.SIGINT))
        assert len(trainer.run()) == 6  # every step ran: the ignored Ctrl-C stopped nothing
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_per_process_batch_is_checked_against_the_real_world_size():
    from twotower.train.recipes import check_denoiser_options

    settings = TrainSettings(steps=2, global_batch=12, micro_batch=8, seq_len=32)
    check_denoiser_options(settings, block_size=16, curriculum=(), world_size=3)  # 4 per process: fine
    with pytest.raises(ValueError, match="per-process batch 12"):
        check_denoiser_options(settings, block_size=16, curriculum=(), world_size=1)


def test_a_half_written_latest_left_by_a_crash_does_not_block_saves(tmp_path):
    trainer, _ = _trainer(tmp_path, steps=2)
    trainer.run()
    (tmp_path / checkpointing.CHECKPOINTS_DIR / ".latest.12345.tmp").write_text("step-")
    again, _ = _trainer(tmp_path, steps=4)
    again.run()
    assert checkpointing.read_state(checkpointing.latest_checkpoint(tmp_path)).step == 4
    assert not list((tmp_path / checkpointing.CHECKPOINTS_DIR).glob(".*.tmp"))


@pytest.mark.parametrize(
    ("changes", "named"),
    [({"block_size": 8}, "block_size"), ({"curriculum": [(8, 1)]}, "curriculum")],
)
def test_resuming_with_another_block_size_or_curriculum_is_refused(tmp_path, changes, named):
    data = write_packed(tmp_path / "data")
    settings = TrainSettings(steps=2, **SMALL)
    train_denoiser(twotower_model(), data, tmp_path / "run", settings, block_size=16, progress=False)
    longer = TrainSettings(**{**settings.__dict__, "steps": 4})
    options = {"block_size": 16, **changes}
    with pytest.raises(ValueError, match=f"other {named} ") as refused:
        train_denoiser(twotower_model(), data, tmp_path / "run", longer, progress=False, **options)
    assert "context_tower" not in str(refused.value)  # the frozen tower did not change


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grad_clip": 0.0}, "grad_clip must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"warmup_steps": -1}, "warmup_steps >= 0"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**settings).validate(1)


def test_the_cli_checks_its_settings_before_loading_a_model(tmp_path, capsys):
    """A bad --seq-len (not a multiple of the block size) is named at once: the backbone path does
    not even exist, so any load would have failed first."""
    data = write_packed(tmp_path / "data")
    rc = cli_main(["train", "denoiser", "--backbone", str(tmp_path / "missing"), "--data", str(data),
                   "--out", str(tmp_path / "out"), "--seq-len", "30", "--block-size", "16"])  # fmt: skip
    assert rc == 2
    assert "seq_len 30 must be a multiple of block size 16" in capsys.readouterr().err


@pytest.mark.parametrize("final", [True, False])
def test_the_scans_stay_float32_under_autocast(final):
    from twotower.layers.ssd import ssd_all_states, ssd_chunked, ssd_step
    from twotower.train.block_scan import chunk_scan_with_states

    g = torch.Generator().manual_seed(0)
    b, L, h, p, n = 2, 32, 4, 8, 16
    x, B, C = (torch.randn(b, L, h, d, generator=g) for d in (p, n, n))
    dt, A = torch.rand(b, L, h, generator=g) * 0.1, -torch.rand(h, generator=g)
    s0 = torch.randn(b, h, p, n, generator=g)

    def run():
        return (
            *ssd_chunked(x, dt, A, B, C, chunk_size=16, state=s0, final=final),
            chunk_scan_with_states(x, dt, A, B, C, chunk=16, state=s0).y,
            ssd_all_states(x[:, :8], dt[:, :8], A, B[:, :8], state=s0),
            *ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], s0),
        )

    want = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    for w, o in zip(want, got, strict=True):
        if w is None:
            assert o is None
            continue
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, w, rtol=0, atol=0)


def signal_job(job: dict) -> dict:
    """Under torchrun (tests/train/test_parallel.py): only rank 0 gets SIGTERM, during step 2; every
    rank must stop after the same step, saved once. Each rank writes what it saw; rank 0 returns all."""
    import os

    import torch.distributed as dist

    from twotower.train.parallel import Dist

    rank = int(os.environ.get("RANK", "0"))
    out = Path(job["out"])
    on_step = (lambda step: signal.raise_signal(signal.SIGTERM) if step == 2 else None) if rank == 0 else None
    trainer, _ = _trainer(out, on_step=on_step, parallel="ddp", global_batch=2, dist_info=Dist.from_env())
    try:
        trainer.run()
        seen = {"stopped": None}
    except TrainingInterrupted as stop:
        seen = {"stopped": stop.step, "signum": stop.signum}
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(dist.get_world_size())]
    latest = checkpointing.latest_checkpoint(out)
    return {"ranks": ranks, "saved_step": checkpointing.read_state(latest).step if latest else None}


# ---- the train command's exit statuses (the trainer-level tests above cover the behaviour) --------------
def _backbone_command(tmp_path: Path, *extra: str) -> list[str]:
    from tests.conftest import tiny_config

    data = write_packed(tmp_path / "data")
    tiny_config("M*E", chunk_size=4).save(tmp_path / "config.json")
    return ["train", "backbone", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "ar"),
            "--data", str(data), "--batch-size", "2", "--micro-batch", "1", "--seq-len", "32",
            "--eval-every", "1000", "--warmup-steps", "1", *extra]  # fmt: skip


def test_a_sigterm_to_the_train_command_saves_and_exits_128_plus_the_signal(tmp_path):
    """A real process and a real signal from outside: the command finishes its step, saves it,
    says so in one line (no traceback) and exits with 128 + SIGTERM."""
    import subprocess
    import sys
    import time

    out = tmp_path / "ar"
    argv = _backbone_command(tmp_path, "--steps", "5000", "--save-every", "1")
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", *argv], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while checkpointing.latest_checkpoint(out) is None:  # training runs (and the handlers are in)
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never saved"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "twotower train: stopped by signal" in err and "Traceback" not in err
    saved = checkpointing.read_state(checkpointing.latest_checkpoint(out)).step
    assert 1 <= saved < 5000 and f"after step {saved}," in err


def test_a_run_that_keeps_going_non_finite_exits_1_with_one_line(tmp_path, capsys):
    """A learning rate that blows the weights up: every later step is non-finite and skipped; after
    `max_nonfinite_steps` in a row the command stops with status 1 and one error line."""
    with pytest.raises(SystemExit) as stop:
        cli_main(_backbone_command(tmp_path, "--steps", "20", "--save-every", "1000", "--lr", "1e30"))
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err and "finite" in err
