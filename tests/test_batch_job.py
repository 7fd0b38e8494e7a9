"""`twotower batch`: outputs equal the library's decoding of each prompt alone; re-runs resume
(also after kill -9) with exactly one output per id; bad lines go to the errors file with their
line number and reason; two torchrun processes produce the same outputs as one."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twotower.batch_job import (
    Job,
    OutputLog,
    finalize,
    id_key,
    part_path,
    read_done,
    read_records,
    shard_of,
)
from twotower.cli import CLIError
from twotower.cli import batch as batch_cli
from twotower.loading import load_for_inference
from twotower.workload import Options

from .serve.models import save_model_dir

FAST = ["--block-size", "4", "--steps-per-block", "4", "--threshold", "0.5", "--max-new-tokens", "12"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("model"))


def run_batch(*argv) -> int:
    """`twotower batch ARGV` in this process."""
    parser = argparse.ArgumentParser()
    batch_cli.register(parser.add_subparsers())
    args = parser.parse_args(["batch", *map(str, argv)])
    return args.func(args)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def outputs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def subprocess_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return env


def test_outputs_equal_each_prompt_alone_and_a_rerun_changes_nothing(tmp_path, model_dir, capsys):
    lines = [
        {"id": "a", "prompt": "the quick brown"},
        {"id": 7, "prompt": "over the lazy dog", "mode": "ar", "max_tokens": 9},
        {"id": "c", "prompt": "Line 4:", "block_size": 2, "steps_per_block": 2, "max_new_tokens": 6},
        {"id": "d", "prompt": "jumps", "temperature": 0.9, "seed": 5},
        {"id": "s", "prompt": "over the lazy dog", "mode": "speculative", "max_tokens": 9, "draft_steps": 2},
        {"id": "e", "prompt": "the quick brown", "eos_aware_commit": True},
    ]
    src, out = write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert run_batch("--input", src, "--output", out, "--model", model_dir, *FAST) == 0
    got = outputs(out)
    assert [r["id"] for r in got] == ["a", 7, "c", "d", "s", "e"]  # one per id, in input order
    assert got[5]["settings"]["eos_aware_commit"] is True and got[0]["settings"]["eos_aware_commit"] is False
    loaded = load_for_inference(str(model_dir))
    tok, model = loaded.tokenizer, loaded.model
    for line, record in zip(lines, got):
        s = record["settings"]
        ids = [tok.bos_id, *tok.encode(line["prompt"])]
        common = dict(
            max_new_tokens=s["max_tokens"], eos_token_id=tok.eos_id, temperature=s["temperature"], seed=s["seed"]
        )
        if s["mode"] in ("ar", "speculative"):  # greedy speculative decoding is the AR model's
            new = model.generate_ar([ids], **common).new_tokens[0]
            assert record["nfe"] >= 1
        else:
            diffusion = dict(
                block_size=s["block_size"], steps_per_block=s["steps_per_block"], eos_aware_commit=s["eos_aware_commit"]
            )
            res = model.generate_mask_diffusion(
                [ids], confidence_threshold=s["confidence_threshold"], **diffusion, **common
            )
            new = res.new_tokens[0]
            assert record["nfe"] == res.stats["nfe"], line["id"]  # the row's own denoiser forwards
        assert record["text"] == tok.decode([t for t in new if t != tok.eos_id]), line["id"]
        assert record["prompt_tokens"] == len(ids)
        assert record["completion_tokens"] == len([t for t in new if t != tok.eos_id])
    assert (got[1]["settings"]["max_tokens"], got[2]["settings"]["max_tokens"], got[0]["settings"]["max_tokens"]) == (
        9,
        6,
        12,
    )
    assert got[2]["settings"]["block_size"] == 2 and got[3]["settings"]["seed"] == 5
    assert got[4]["text"] == got[1]["text"] and got[4]["settings"]["draft_steps"] == 2  # same prompt as the AR line
    assert "6/6" in capsys.readouterr().err and not (tmp_path / "out.jsonl.errors.jsonl").read_text()

    before = out.read_bytes()
    assert run_batch("--input", src, "--output", out, "--model", model_dir, *FAST) == 0
    assert out.read_bytes() == before
    write_lines(src, [*lines, {"id": "n", "prompt": "a new line"}])
    assert run_batch("--input", src, "--output", out, "--model", model_dir, *FAST) == 0
    again = outputs(out)
    assert again[:6] == got and [r["id"] for r in again] == ["a", 7, "c", "d", "s", "e", "n"]


def test_bad_lines_go_to_the_errors_file_and_the_job_continues(tmp_path, model_dir):
    lines = [
        {"id": 1, "prompt": "fine"},
        "{not json",
        "",  # blank lines are skipped, not errors
        "[1, 2]",
        {"prompt": "no id"},
        {"id": True, "prompt": "bool id"},
        {"id": 2},
        {"id": 3, "prompt": "x", "colour": "red"},
        {"id": 4, "prompt": "x", "max_tokens": "ten"},
        {"id": 5, "prompt": "x", "mode": "mock-ar"},
        {"id": 6, "prompt": "word " * 50},
        {"id": 1, "prompt": "duplicate"},
        {"id": 8, "prompt": "x", "max_tokens": 3, "max_new_tokens": 4},
        {"id": 9, "prompt": "x", "confidence_threshold": 1.5},
        {"id": 10, "prompt": "also fine", "stop": ["zz"]},
        {"id": 12, "prompt": "x", "mode": "speculative", "draft_steps": 0},
    ]
    src, out = write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    with open(src, "ab") as f:
        f.write(b'{"id": 11, "prompt": "\xff\xfe"}\n')
        f.write(b'{"id": 13, "prompt": "x\\ud800"}\n')  # valid JSON, not text: a lone surrogate
        f.write(b'{"id": "\\udc00", "prompt": "x"}\n')  # its output line could not be written
        f.write(b"[" * 5000 + b"]" * 5000 + b"\n")
        f.write(b'{"id": 14, "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}\n")
        f.write(b'{"id": 15, "prompt": "x", "block_size": 100000}\n')
    assert run_batch("--input", src, "--output", out, "--model", model_dir, "--max-prompt-tokens", "20", *FAST) == 0
    assert [r["id"] for r in outputs(out)] == [1, 10]
    errors = {e["line"]: e for e in outputs(tmp_path / "out.jsonl.errors.jsonl")}
    expected = {
        2: "not valid JSON",
        4: "must be a JSON object",
        5: "id must be a non-empty string or an integer",
        6: "id must be a non-empty string or an integer",
        7: "prompt must be a string",
        8: "unknown field(s) colour",
        9: "max_tokens must be an integer",
        10: "mode must be one of diffusion, ar",
        11: "more than the limit of 20",
        12: "duplicate id 1 (first on line 1)",
        13: "give max_tokens or max_new_tokens, not both",
        14: "confidence_threshold must be in [0, 1]",
        16: "draft_steps must be a positive integer",
        17: "not valid UTF-8",
        18: "lone UTF-16 surrogate",
        19: "lone UTF-16 surrogate",
        20: "nested too deeply",
        21: "not valid JSON",
        22: "block_size must be between 1 and 1024",
    }
    assert sorted(errors) == sorted(expected)
    for line, message in expected.items():
        assert message in errors[line]["error"], line
    assert errors[9]["id"] == 4 and errors[2]["id"] is None


def test_output_log_cuts_a_torn_line_and_admits_one_writer(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1, "text": "x"}\n{"id": 2, "te')  # killed mid-write
    assert [r["id"] for r in read_records(path)] == [1]
    log = OutputLog(path)
    assert path.read_bytes() == b'{"id": 1, "text": "x"}\n'
    with pytest.raises(ValueError, match="another job is writing"):
        OutputLog(path)
    log.append([{"id": 2, "text": "y"}, {"id": 3, "text": "z"}])
    log.close()
    assert [r["id"] for r in read_records(path)] == [1, 2, 3]


def test_finalize_merges_parts_in_input_order_only_when_complete(tmp_path):
    out = tmp_path / "out.jsonl"
    jobs = [Job(n, i, "p", [1], Options()) for n, i in enumerate(["a", "b", "c", 4], start=1)]
    write_lines(out, [{"id": "c", "text": "3"}])
    write_lines(part_path(out, 0), [{"id": 4, "text": "4"}, {"id": "a", "text": "1"}])
    assert not finalize(out, jobs)  # "b" is missing: nothing changes
    assert part_path(out, 0).exists() and len(outputs(out)) == 1
    write_lines(part_path(out, 1), [{"id": "b", "text": "2"}, {"id": "a", "text": "dup"}, {"id": "old", "text": "?"}])
    assert set(read_done(out)) == {id_key(x) for x in ["a", "b", "c", 4, "old"]}
    assert finalize(out, jobs)
    assert [(r["id"], r["text"]) for r in outputs(out)] == [("a", "1"), ("b", "2"), ("c", "3"), (4, "4"), ("old", "?")]
    assert not list(tmp_path.glob("out.jsonl.rank*"))


def test_shards_partition_the_ids():
    keys = [id_key(i) for i in range(200)] + [id_key(str(i)) for i in range(200)]
    for world in (1, 2, 3):
        shards = [shard_of(k, world) for k in keys]
        assert set(shards) == set(range(world))
        assert shards == [shard_of(k, world) for k in keys]  # fixed, whatever is done


def test_cli_refuses_bad_invocations(tmp_path, model_dir):
    src = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    with pytest.raises(CLIError, match="does not exist"):
        run_batch("--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o.jsonl")
    with pytest.raises(CLIError, match="must differ"):
        run_batch("--input", src, "--output", src)
    with pytest.raises(CLIError, match="mock-ar"):
        run_batch("--input", src, "--output", tmp_path / "o.jsonl", "--mode", "mock-ar")
    with pytest.raises(ValueError, match="anchor applies to mode diffusion only"):
        run_batch("--input", src, "--output", tmp_path / "o.jsonl", "--anchor", "--mode", "ar")
    with pytest.raises(ValueError, match="block_size"):
        run_batch("--input", src, "--output", tmp_path / "o.jsonl", "--block-size", "0")
    with pytest.raises(ValueError, match="block_size must be at least 2 for speculative"):
        run_batch("--input", src, "--output", tmp_path / "o.jsonl", "--mode", "speculative", "--block-size", "1")


def test_kill_9_mid_run_then_resume_gives_exactly_one_output_per_id(tmp_path, model_dir):
    n = 40
    src = write_lines(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"Line {i}: the"} for i in range(n)])
    out = tmp_path / "out.jsonl"
    argv = ["--input", src, "--output", out, "--model", model_dir, "--max-batch-size", "2", "--no-progress", "--no-eos"]
    argv += ["--block-size", "4", "--steps-per-block", "4", "--max-new-tokens", "48"]
    cmd = [sys.executable, "-m", "twotower.cli", "batch", *map(str, argv)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    first = list(read_records(out))
    assert 3 <= len(first) < n  # killed mid-run
    assert run_batch(*argv) == 0
    final = outputs(out)
    assert [r["id"] for r in final] == [f"r{i}" for i in range(n)]  # every id exactly once, input order
    assert all(r in final for r in first)  # what was written before the kill is kept as it was
    assert all(r["completion_tokens"] == 48 for r in final)


def test_torchrun_two_processes_give_the_same_outputs_as_one(tmp_path, model_dir):
    lines = [{"id": i, "prompt": f"Line {i}: over", "max_tokens": 6 + i % 7} for i in range(14)]
    lines += [{"id": "ar", "prompt": "the", "mode": "ar"}, {"id": "s", "prompt": "x", "temperature": 1.0}]
    src = write_lines(tmp_path / "in.jsonl", [*lines, "{broken"])
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert run_batch("--input", src, "--output", one, "--model", model_dir, "--no-progress", *FAST) == 0
    argv = ["--input", src, "--output", two, "--model", model_dir, "--no-progress", *FAST]
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "twotower.cli", "batch", *map(str, argv)]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert outputs(two) == outputs(one) and len(outputs(one)) == len(lines)
    assert not list(tmp_path.glob("two.jsonl.rank*"))
    assert outputs(tmp_path / "two.jsonl.errors.jsonl") == outputs(tmp_path / "one.jsonl.errors.jsonl")


def test_engine_step_static_gives_the_same_records(tmp_path, model_dir):
    """`--engine-step static` (the engine's fixed-shape slot steps) writes what eager writes."""
    lines = [
        {"id": "a", "prompt": "the quick brown"},
        {"id": "b", "prompt": "over the lazy dog", "mode": "ar", "max_tokens": 7},
        {"id": "c", "prompt": "jumps", "temperature": 0.9, "seed": 5},
    ]
    src = write_lines(tmp_path / "in.jsonl", lines)
    records = {}
    for step in ("eager", "static"):
        out = tmp_path / f"{step}.jsonl"
        assert run_batch("--input", src, "--output", out, "--model", model_dir, "--engine-step", step, *FAST) == 0
        records[step] = outputs(out)
    assert records["static"] == records["eager"] and len(records["eager"]) == 3


# ---- a step that raises fails only the jobs at fault -------------------------------------------------
def _jobs_and_reference(model_dir):
    from twotower import batch_job
    from twotower.workload import Limits

    loaded = load_for_inference(str(model_dir))
    defaults = Options(block_size=4, steps_per_block=4, confidence_threshold=0.5, max_tokens=12)
    lines = [{"id": i, "prompt": p} for i, p in enumerate(["one", "two two", "three", "four four four", "five"])]
    jobs = [
        batch_job.parse_line(json.dumps(x).encode(), n, loaded.tokenizer, defaults, Limits())
        for n, x in enumerate(lines, 1)
    ]
    return loaded, jobs, _generate(loaded, jobs)


def _generate(loaded, jobs, *, max_batch_size=4) -> dict:
    from twotower.batch_generate import generate_outputs

    records = {}
    generate_outputs(
        loaded.model, loaded.tokenizer, jobs, model_name="m", max_batch_size=max_batch_size, eos_ids=(),
        on_step=lambda finished, _n: records.update({r["id"]: r for r in finished}),
    )  # fmt: skip
    return records


def _faulty_scheduler(fails):
    """A Scheduler whose step raises when `fails(ids of the rows the step would decode)` is true."""
    from twotower.decode.scheduler import Scheduler

    class Faulty(Scheduler):
        def step(self):
            rows = {i for e in self.engines.values() for i in e.request_ids}
            rows |= {r.id for r in list(self.waiting)[: self.max_batch_size - self.active]}
            if fails(rows):
                for _ in range(min(len(self.waiting), self.max_batch_size - self.active)):
                    self.waiting.popleft()  # as a real step does: the joining rows leave the queue first
                raise RuntimeError(f"cannot decode {sorted(rows)}")
            return super().step()

    return Faulty


def test_a_job_that_fails_alone_gets_an_error_record_and_the_rest_their_outputs(model_dir, monkeypatch):
    from twotower import batch_generate

    loaded, jobs, want = _jobs_and_reference(model_dir)
    bad = jobs[1].key
    monkeypatch.setattr(batch_generate, "Scheduler", _faulty_scheduler(lambda rows: bad in rows))
    got = _generate(loaded, jobs)
    assert sorted(got) == sorted(want)  # every job finished once
    assert got[1]["finish_reason"] == "error" and "cannot decode" in got[1]["error"] and got[1]["text"] == ""
    assert got[1]["prompt_tokens"] == want[1]["prompt_tokens"] and got[1]["completion_tokens"] == 0
    for key, record in want.items():
        if key != 1:
            assert got[key] == record  # started over in a fresh engine: the same text and forwards


def test_a_batch_that_fails_as_a_whole_is_retried_in_smaller_batches(model_dir, monkeypatch):
    from twotower import batch_generate

    loaded, jobs, want = _jobs_and_reference(model_dir)
    sizes = []
    faulty = _faulty_scheduler(lambda rows: sizes.append(len(rows)) or len(rows) > 1)  # only one row fits
    monkeypatch.setattr(batch_generate, "Scheduler", faulty)
    got = _generate(loaded, jobs)
    assert got == want and max(sizes) > 1  # the batch halved down to one row; nothing failed
    monkeypatch.setattr(batch_generate, "Scheduler", _faulty_scheduler(lambda rows: True))  # nothing ever fits
    failed = _generate(loaded, jobs)
    assert sorted(failed) == sorted(want) and all(r["finish_reason"] == "error" for r in failed.values())
