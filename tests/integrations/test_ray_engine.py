"""`twotower batch --engine ray` on one local Ray cluster (2 CPUs, the bundled model) kept on
127.0.0.1: its outputs equal the local engine's for the same requests (greedy and sampled, JSONL and
Parquet inputs), re-runs skip what is written, an actor killed mid-run is retried and the job still
ends with one output per id, and every Ray process listens and connects on loopback only."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from twotower.cli import CLIError
from twotower.cli import batch as batch_cli
from twotower.cli.batch_ray import cmd_batch_ray
from twotower.integrations.ray_files import ERRORS_NAME, output_files

from .helpers import FAST, by_id, records, write_lines, write_parquet
from .killers import Broken, kill_once

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("psutil") is None:
    pytest.skip("needs the ray extra and psutil", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, from its DataContext
REPO = Path(__file__).resolve().parents[2]
JSONL_ROWS = [
    {"id": "greedy", "prompt": "the quick brown"},
    {"id": 7, "prompt": "over the lazy dog", "mode": "ar", "max_tokens": 9},
    {"id": "spec", "prompt": "over the lazy dog", "mode": "speculative", "draft_steps": 2},
    {"id": "seeded", "prompt": "jumps", "temperature": 0.9, "seed": 5},
    {"id": "derived", "prompt": "jumps", "temperature": 0.9},
    {"id": "short", "prompt": "Line 4:", "block_size": 2, "steps_per_block": 2, "max_new_tokens": 6},
    {"id": "stop", "prompt": "the quick brown", "stop": ["e"]},
    {"id": 8, "prompt": "Line 8: the"},
]
PARQUET_ROWS = [
    {"id": "p0", "prompt": "the lazy", "mode": "ar", "temperature": None, "seed": None},
    {"id": "p1", "prompt": "fox", "mode": None, "temperature": 0.8, "seed": None},
    {"id": "p2", "prompt": "dog", "mode": None, "temperature": 0.8, "seed": 11},
    {"id": "p3", "prompt": "quick", "mode": "speculative", "temperature": None, "seed": None},
]
BAD_LINES = ["{broken", json.dumps({"id": "bad", "prompt": "x", "max_tokens": "ten"})]
ALL_ROWS = JSONL_ROWS + [{k: v for k, v in r.items() if v is not None} for r in PARQUET_ROWS]


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    batch_cli.register(parser.add_subparsers())
    return parser.parse_args(["batch", *map(str, argv)])


def ray_args(src, out, *extra) -> argparse.Namespace:
    return parse("--engine", "ray", "--input", src, "--output", out, "--no-progress", "--seed", 3, *FAST, *extra)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: 2 CPUs, no GPU, small object store, own temp dir."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    from twotower.integrations.ray_cluster import start_local_cluster

    temp = tempfile.mkdtemp(prefix="ttray-")
    info = start_local_cluster(num_cpus=2, num_gpus=0, object_store_memory=128 << 20, _temp_dir=temp)
    import ray

    yield info
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict:
    """The local engine's outputs for ALL_ROWS (one JSONL file), by id."""
    tmp = tmp_path_factory.mktemp("local")
    src = write_lines(tmp / "in.jsonl", ALL_ROWS)
    args = parse("--input", src, "--output", tmp / "out.jsonl", "--no-progress", "--seed", 3, *FAST)
    assert args.func(args) == 0
    return by_id(records(tmp / "out.jsonl"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("in")
    write_lines(src / "a.jsonl", [*JSONL_ROWS[:4], *BAD_LINES, *JSONL_ROWS[4:]])
    write_parquet(src / "b.parquet", PARQUET_ROWS)
    return src


@pytest.fixture(scope="module")
def first_run(cluster, inputs, tmp_path_factory) -> Path:
    """The Ray engine over `inputs` (blocks of 3 rows) into a fresh directory."""
    out = tmp_path_factory.mktemp("ray") / "out"
    assert cmd_batch_ray(ray_args(inputs, out, "--rows-per-file", 3)) == 0
    return out


def all_outputs(out: Path) -> list[dict]:
    return [r for path in output_files(out) for r in records(path)]


def test_outputs_equal_the_local_engine_one_file_per_block(first_run, local, inputs):
    got = all_outputs(first_run)
    assert len(got) == len(ALL_ROWS) and by_id(got) == local  # every id once, equal records
    # a.jsonl has 10 lines -> blocks of 3: [1-3] [4-6] [7-9] [10]; b.parquet 4 rows -> [1-3] [4]
    names = [p.name for p in output_files(first_run)]
    assert len(names) == 6 and sum(n.startswith("a-") for n in names) == 4
    first_block = records(first_run / next(n for n in names if n.startswith("a-") and n.endswith(".b000000.jsonl")))
    assert [r["id"] for r in first_block] == ["greedy", 7, "spec"]  # input order inside a block
    errors = records(first_run / ERRORS_NAME)
    assert [(Path(e["source"]).name, e["line"], e["id"]) for e in errors] == [
        ("a.jsonl", 5, None),
        ("a.jsonl", 6, "bad"),
    ]
    assert "not valid JSON" in errors[0]["error"] and "max_tokens must be an integer" in errors[1]["error"]


def test_a_rerun_skips_written_ids_and_fills_in_missing_blocks(first_run, inputs, capsys):
    before = {p.name: p.read_bytes() for p in output_files(first_run)}
    assert cmd_batch_ray(ray_args(inputs, first_run, "--rows-per-file", 3)) == 0
    assert "0 rows decoded (12 already done, 2 rejected)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in output_files(first_run)} == before  # nothing rewritten

    lost, kept = sorted(before)[:2]
    (first_run / lost).unlink()  # as if the job had died before this block was written
    tampered = records(first_run / kept)
    tampered[0]["text"] = "WRITTEN BEFORE"
    write_lines(first_run / kept, tampered)
    assert cmd_batch_ray(ray_args(inputs, first_run, "--rows-per-file", 3)) == 0
    err = capsys.readouterr().err
    n_lost = before[lost].count(b"\n")
    assert f"{n_lost} rows decoded ({len(ALL_ROWS) - n_lost} already done" in err
    assert (first_run / lost).read_bytes() == before[lost]  # decoded again, the same
    assert records(first_run / kept)[0]["text"] == "WRITTEN BEFORE"  # a written id is never redone
    assert len(all_outputs(first_run)) == len(ALL_ROWS)


def test_a_killed_actor_is_retried_and_each_id_is_written_once(cluster, local, tmp_path):
    src = write_lines(tmp_path / "in" / "all.jsonl", ALL_ROWS)
    out, marker = tmp_path / "out", tmp_path / "killed"
    args = ray_args(src, out, "--max-batch-size", 2, "--actors", 1)  # 8 rows per call: 2 calls
    assert cmd_batch_ray(args, predictor_cls=kill_once(marker)) == 0
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # an actor process did die
    got = all_outputs(out)
    assert len(got) == len(ALL_ROWS) and by_id(got) == local


def test_an_error_in_the_actors_is_one_clear_message(cluster, tmp_path):
    src = write_lines(tmp_path / "in" / "a.jsonl", ALL_ROWS[:2])
    with pytest.raises(CLIError, match="the Ray job failed: .*the model broke.*re-running the same command"):
        cmd_batch_ray(ray_args(src, tmp_path / "out"), predictor_cls=Broken)
    assert output_files(tmp_path / "out") == []


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def test_every_ray_process_listens_and_connects_on_loopback_only(first_run, cluster):
    import psutil

    assert cluster["node_ip_address"] == "127.0.0.1"
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    names = {p.name() for p in procs if p.is_running()}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), names
    listening, bad = 0, []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            listening += c.status == psutil.CONN_LISTEN
            addrs = [c.laddr] + ([c.raddr] if c.raddr else [])
            if not all(is_loopback(a.ip) for a in addrs):
                bad.append((proc.name(), c.status, c.laddr, c.raddr))
    assert listening >= 3 and not bad, bad


def test_bad_invocations_are_clear_errors(cluster, inputs, tmp_path):
    with pytest.raises(CLIError, match="cluster has 0"):
        cmd_batch_ray(ray_args(inputs, tmp_path / "o1", "--gpus-per-actor", 1, "--device", "cuda"))
    with pytest.raises(CLIError, match="--device cpu keeps the model off them"):
        cmd_batch_ray(ray_args(inputs, tmp_path / "o2", "--gpus-per-actor", 1))
    with pytest.raises(CLIError, match="needs GPUs in each actor"):
        cmd_batch_ray(ray_args(inputs, tmp_path / "o3", "--device", "cuda"))
    (tmp_path / "file").write_text("")
    with pytest.raises(CLIError, match="must be a directory"):
        cmd_batch_ray(ray_args(inputs, tmp_path / "file"))
    with pytest.raises(CLIError, match="holds input file"):
        cmd_batch_ray(ray_args(inputs, inputs))
    with pytest.raises(ValueError, match="no input files"):
        cmd_batch_ray(ray_args(tmp_path / "nothing", tmp_path / "o4"))
    with pytest.raises(CLIError, match="mock-ar"):
        cmd_batch_ray(ray_args(inputs, tmp_path / "o5", "--mode", "mock-ar"))
