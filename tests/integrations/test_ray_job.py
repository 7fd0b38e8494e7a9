"""The driver's side of the Ray engine without a cluster: the block writer (a block's file appears when
its last row is in; a retried batch's second copy is ignored; a row an actor rejects is an error with
its source and line), the run summary, and how the actor pool follows the device and GPU options."""

from __future__ import annotations

import argparse

import pytest

from twotower.batch_job import id_key
from twotower.cli import CLIError
from twotower.cli.batch_ray import ROWS_PER_CALL_FACTOR, actor_pool, root_cause
from twotower.integrations.ray_files import Pending, Plan
from twotower.integrations.ray_job import ActorPool, BlockWriter, JobSummary

from .helpers import records

pytest.importorskip("pyarrow")


def small_plan() -> Plan:
    keys = [id_key(i) for i in range(3)]
    plan = Plan(blocks={"b0.jsonl": keys[:2], "b1.jsonl": keys[2:]})
    plan.pending = [
        Pending(k, "{}", "b0.jsonl" if i < 2 else "b1.jsonl", "in.jsonl", i + 1) for i, k in enumerate(keys)
    ]
    return plan


def test_a_block_file_is_written_when_its_last_row_arrives_and_only_once(tmp_path):
    writer = BlockWriter(tmp_path, small_plan())
    assert writer.add(id_key(1), {"id": 1, "text": "b"})
    assert not (tmp_path / "b0.jsonl").exists()  # row 0 is still out
    assert not writer.add(id_key(1), {"id": 1, "text": "retried copy"})
    assert not writer.add(id_key(99), {"id": 99, "text": "never sent"})
    assert writer.add(id_key(0), {"id": 0, "text": "a"})
    assert [(r["id"], r["text"]) for r in records(tmp_path / "b0.jsonl")] == [(0, "a"), (1, "b")]  # input order
    assert not writer.complete and writer.written == ["b0.jsonl"]
    assert writer.add(id_key(2), None, "prompt too long")
    assert writer.complete and not (tmp_path / "b1.jsonl").exists()  # nothing to write for it
    (error,) = writer.errors
    assert (error.source, error.line, error.id, error.error) == ("in.jsonl", 3, 2, "prompt too long")


def test_summary_figures():
    s = JobSummary(rows=4, skipped=2, rejected=1, tokens=100, nfe=40, seconds=4.0, files=["x"])
    assert s.tokens_per_second == 25.0 and s.nfe_per_token == 0.4
    assert s.line() == (
        "4 rows decoded (2 already done, 1 rejected), 100 tokens in 4.0 s: 25.0 tokens/s, "
        "0.400 NFE per token, 1 output files written"
    )
    assert JobSummary().tokens_per_second == 0.0 and JobSummary().nfe_per_token == 0.0


def options(**kw) -> argparse.Namespace:
    base = dict(device="cpu", denoiser_device=None, gpus_per_actor=None, actors=None, cpus_per_actor=1.0)
    return argparse.Namespace(**{**base, **kw}, max_batch_size=8)


def test_actor_pool_follows_the_devices_and_the_cluster(capsys):
    cpu_only, gpus = {"CPU": 2.0}, {"CPU": 64.0, "GPU": 8.0}
    assert actor_pool(options(), cpu_only) == ActorPool(1, 0.0, 1.0, ROWS_PER_CALL_FACTOR * 8)  # CPU: one actor
    assert actor_pool(options(), gpus).gpus_per_actor == 0.0  # --device cpu never takes a GPU
    assert actor_pool(options(device="cuda"), gpus) == ActorPool(8, 1.0, 1.0, ROWS_PER_CALL_FACTOR * 8)
    assert actor_pool(options(device="cpu", denoiser_device="cuda"), gpus).gpus_per_actor == 1.0
    split = actor_pool(options(device="auto", gpus_per_actor=2.0), gpus)
    assert (split.actors, split.gpus_per_actor) == (4, 2.0)  # one actor per pair of GPUs
    assert actor_pool(options(device="auto"), cpu_only).gpus_per_actor == 0.0  # auto on a CPU cluster
    assert actor_pool(options(device="cuda", actors=3), gpus).actors == 3
    with pytest.raises(CLIError, match="cluster has 1"):
        actor_pool(options(device="cuda", gpus_per_actor=2.0), {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(CLIError, match="3 actors x 1 CPU"):
        actor_pool(options(actors=3), cpu_only)
    with pytest.raises(CLIError, match="--actors must be at least 1"):
        actor_pool(options(actors=0), cpu_only)
    with pytest.raises(CLIError, match="cpus_per_actor"):
        actor_pool(options(cpus_per_actor=0.0), cpu_only)
    # a cluster that may grow (one given by --ray-address): a warning, the job waits for room
    assert actor_pool(options(device="cuda", actors=16), gpus, fixed=False).actors == 16
    assert "16 actors x 1 GPU(s) need 16, the cluster has 8" in capsys.readouterr().err


def test_root_cause_finds_the_original_exception_in_a_ray_error():
    text = (
        "\x1b[36mray::MapWorker(MapBatches(P)).submit()\x1b[39m (pid=1, ip=127.0.0.1)\n"
        '  File "x.py", line 8, in __call__\n    raise RuntimeError("the model broke")\n'
        "RuntimeError: the model broke\n\nThe above exception was the direct cause of the following exception:\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\nTo change retry attempts, ..."
    )
    assert root_cause(Exception(text)) == "RuntimeError: the model broke"
    assert root_cause(Exception("\n  only text\n")) == "only text"
