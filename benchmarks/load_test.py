"""Bounded load test of `twotower serve`: loopback only, a fixed number of requests per phase, stops
by itself.

The script starts the server as a subprocess on 127.0.0.1 with a free port. For each concurrency
level C it sends the same `--requests` greedy completions (prompt i is the same at every level, so
every level generates the same tokens) from C client threads over keep-alive connections, and
reports requests/s, generated tokens/s (usage.completion_tokens over the level's wall time),
p50/p99 latency (send to full response) and errors (any non-200 or exception). The batched vs
sequential ratio is tokens/s at the highest level over tokens/s at concurrency 1.

Then the disconnect phase: `--requests` streaming completions from the highest level's number of
clients, where every third request asks for 8x the tokens and its client leaves after the first
block. Errors count the other streams that did not end in `data: [DONE]` with their usage.
Afterwards /metrics must show no running rows and nothing in flight (the abandoned requests were
cancelled, not decoded to their limit); it reports how long that took and the 499s counted.
Each phase also reports the mean rows per engine step (how full the batch was), from /metrics.

    python benchmarks/load_test.py                              # the bundled model, 1/8/32
    python benchmarks/load_test.py --random-model --requests 8 --concurrency 1,4 --max-tokens 16
    python benchmarks/load_test.py --concurrency 1,8,32 --requests 64 --json docs/serving_load_test.json

Exit status 1 if any request failed or rows were left running.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from twotower.decode.static import resolve_engine_step

HOST = "127.0.0.1"  # loopback only: the server this script starts is reachable from this machine alone
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600
IDLE_TIMEOUT_S = 30  # after the disconnect phase, rows must be gone within this
POLL_S = 0.05
HEADERS = {"Content-Type": "application/json"}
LEAVER_BUDGET_FACTOR = 8


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    generated_tokens: int
    latency_p50_s: float
    latency_p99_s: float
    mean_batch_rows: float  # rows decoded together per engine step, on average


@dataclass
class DisconnectResult:
    concurrency: int
    requests: int
    left_early: int
    errors: int  # among the clients that stayed
    seconds: float
    mean_batch_rows: float  # rows decoded together per engine step, on average
    seconds_to_idle: float | None  # after the last client finished; None if rows stayed
    running_rows_after: int
    in_flight_after: int
    cancelled_499: int


# ---- the server ------------------------------------------------------------------------------------
def make_random_model(path: Path) -> Path:
    """The `tiny` preset with random weights and a small tokenizer: the bundled model's shapes."""
    from twotower.config import preset
    from twotower.model import TwoTowerForCausalLM
    from twotower.tokenizer import train_tokenizer

    texts = [f"Sample {i}: the quick brown fox jumps over the lazy dog, {i * 13} times.\n" for i in range(200)]
    tokenizer = train_tokenizer(iter(texts), path, vocab_size=512)
    TwoTowerForCausalLM(preset("tiny").replace(vocab_size=tokenizer.vocab_size)).eval().save_pretrained(path)
    return path


def start_server(model: str | None, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "twotower.cli", "serve", "--host", HOST, "--port", "0"]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--max-queue", str(max(args.levels))]
    cmd += ["--max-tokens-limit", str(leaver_budget(args)), "--engine-step", args.engine_step]
    if model is not None:
        cmd += ["--model", model]
    env = {**os.environ}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it was ready")
        if line.startswith("serving ") and " on http://" in line:
            return proc, int(line.rsplit(":", 1)[1])
    stop_server(proc)
    raise SystemExit(f"the server was not ready after {READY_TIMEOUT_S} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_metrics(port: int) -> dict[str, float]:
    """The unlabelled gauges, the batch-rows histogram's sum and count, and the 499 count, from /metrics."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {"cancelled_499": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, value = line.rsplit(" ", 1)
        if name in (
            "twotower_running_rows",
            "twotower_in_flight",
            "twotower_queue_depth",
            "twotower_batch_rows_sum",
            "twotower_batch_rows_count",
        ):
            out[name.removeprefix("twotower_")] = float(value)
        elif name.startswith("twotower_requests_total{") and 'status="499"' in name:
            out["cancelled_499"] += float(value)
    return out


class BatchRows:
    """The mean rows per engine step over a phase, from the twotower_batch_rows histogram."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.mean = 0.0

    def __enter__(self) -> BatchRows:
        self._start = read_metrics(self.port)
        return self

    def __exit__(self, *exc) -> None:
        end = read_metrics(self.port)
        steps = end["batch_rows_count"] - self._start["batch_rows_count"]
        self.mean = round((end["batch_rows_sum"] - self._start["batch_rows_sum"]) / steps, 2) if steps else 0.0


# ---- the clients -----------------------------------------------------------------------------------
def request_body(i: int, args: argparse.Namespace, *, stream: bool = False, max_tokens: int | None = None) -> bytes:
    body = {
        "prompt": f"Request {i}: the quick brown fox",
        "max_tokens": max_tokens or args.max_tokens,
        "mode": args.mode,
    }
    if args.mode == "diffusion":
        body.update(
            block_size=args.block_size, steps_per_block=args.steps_per_block, confidence_threshold=args.threshold
        )
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(body).encode()


def run_clients(port: int, concurrency: int, n_requests: int, one) -> float:
    """`one(conn, i)` for i in range(n_requests) from `concurrency` threads; returns the wall time."""
    next_index, lock = iter(range(n_requests)), threading.Lock()

    def client() -> None:
        conn = None
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            conn = conn or http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
            if not one(conn, i):
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_level(port: int, concurrency: int, args: argparse.Namespace) -> LevelResult:
    latencies, tokens, errors = [], [], []

    def one(conn: http.client.HTTPConnection, i: int) -> bool:
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/completions", body=request_body(i, args), headers=HEADERS)
            resp = conn.getresponse()
            data = json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data.get('error', {}).get('message')}")
            latencies.append(time.perf_counter() - t0)
            tokens.append(data["usage"]["completion_tokens"])
            return True
        except Exception as err:  # counted and reported; the level goes on
            errors.append(f"request {i}: {err}")
            return False

    with BatchRows(port) as rows:
        seconds = run_clients(port, concurrency, args.requests, one)
    report_errors(errors)
    return LevelResult(
        concurrency=concurrency,
        requests=args.requests,
        errors=len(errors),
        seconds=round(seconds, 3),
        requests_per_s=round(len(latencies) / seconds, 3),
        tokens_per_s=round(sum(tokens) / seconds, 2),
        generated_tokens=sum(tokens),
        latency_p50_s=round(percentile(latencies, 50), 4),
        latency_p99_s=round(percentile(latencies, 99), 4),
        mean_batch_rows=rows.mean,
    )


def run_disconnects(port: int, concurrency: int, args: argparse.Namespace) -> DisconnectResult:
    """Streams; every third client leaves after its first block (see the module docstring)."""
    errors, left = [], []
    before = read_metrics(port)["cancelled_499"]

    def one(conn: http.client.HTTPConnection, i: int) -> bool:
        leave = i % 3 == 0
        try:
            body = request_body(i, args, stream=True, max_tokens=leaver_budget(args) if leave else None)
            conn.request("POST", "/v1/completions", body=body, headers=HEADERS)
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
            if leave:
                resp.readline()  # the first block's event, then gone mid-stream
                left.append(i)
                return False  # closes the connection
            events = [line for line in resp.read().decode().split("\n") if line.startswith("data: ")]
            usage = json.loads(events[-2][len("data: ") :]).get("usage") if len(events) >= 2 else None
            if events[-1:] != ["data: [DONE]"] or not usage or usage["completion_tokens"] < 1:
                raise RuntimeError(f"the stream did not end with usage and [DONE]: {events[-2:]}")
            return True
        except Exception as err:
            errors.append(f"stream {i}: {err}")
            return False

    with BatchRows(port) as rows:
        seconds = run_clients(port, concurrency, args.requests, one)
    t0 = time.perf_counter()
    deadline = t0 + IDLE_TIMEOUT_S
    after = read_metrics(port)
    while (after.get("running_rows") or after.get("in_flight")) and time.perf_counter() < deadline:
        time.sleep(POLL_S / 4)
        after = read_metrics(port)
    idle = not after.get("running_rows") and not after.get("in_flight")
    report_errors(errors)
    return DisconnectResult(
        concurrency=concurrency,
        requests=args.requests,
        left_early=len(left),
        errors=len(errors),
        seconds=round(seconds, 3),
        mean_batch_rows=rows.mean,
        seconds_to_idle=round(time.perf_counter() - t0, 3) if idle else None,
        running_rows_after=int(after.get("running_rows", 0)),
        in_flight_after=int(after.get("in_flight", 0)),
        cancelled_499=int(after["cancelled_499"] - before),
    )


def leaver_budget(args: argparse.Namespace) -> int:
    """What a client that leaves asks for: far past its first block, so it truly leaves mid-stream."""
    return LEAVER_BUDGET_FACTOR * max(args.max_tokens, args.block_size)


def report_errors(errors: list[str]) -> None:
    for e in errors[:5]:
        print(f"  error: {e}", file=sys.stderr)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# ---- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    src.add_argument("--random-model", action="store_true", help="a random `tiny`-preset model (no checkpoint needed)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=64, help="requests per level and in the disconnect phase (64)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--mode", choices=("diffusion", "ar"), default="diffusion")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps-per-block", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--max-batch-size", type=int, default=None, help="server batch (default: highest level)")
    p.add_argument("--no-disconnects", action="store_true", help="skip the disconnect phase")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    p.add_argument(
        "--engine-step",
        choices=("auto", "eager", "static", "compiled"),
        default="auto",
        help="the server's --engine-step (default: auto); compiled steps are warmed up at every level first",
    )
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        args.levels = sorted({int(c) for c in args.concurrency.split(",")})
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if min(args.levels) < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("concurrency levels, --requests and --max-tokens must be positive")
    args.max_batch_size = args.max_batch_size or max(args.levels)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    disconnects = None
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_random_model(Path(tmp))) if args.random_model else args.model
        proc, port = start_server(model, args)
        try:
            # warm-up: one request, or one wave per level when steps may compile (each batch shape compiles once)
            for c in args.levels if args.engine_step in ("auto", "compiled") else [1]:
                run_level(port, c, argparse.Namespace(**{**vars(args), "requests": c}))
            results = []
            for c in args.levels:
                r = run_level(port, c, args)
                results.append(r)
                print(
                    f"concurrency {c:>3}: {r.requests_per_s:7.2f} req/s  {r.tokens_per_s:9.1f} tok/s  "
                    f"p50 {r.latency_p50_s:7.3f} s  p99 {r.latency_p99_s:7.3f} s  rows/step {r.mean_batch_rows:5.1f}  "
                    f"errors {r.errors}",
                    flush=True,
                )
            if not args.no_disconnects:
                d = disconnects = run_disconnects(port, max(args.levels), args)
                print(
                    f"disconnects (concurrency {d.concurrency}): {d.left_early} of {d.requests} left mid-stream, "
                    f"errors {d.errors} among the rest, rows/step {d.mean_batch_rows}, after: running rows "
                    f"{d.running_rows_after}, in flight {d.in_flight_after}, idle after {d.seconds_to_idle} s, "
                    f"499s counted {d.cancelled_499}",
                    flush=True,
                )
        finally:
            stop_server(proc)
    by_level = {r.concurrency: r for r in results}
    ratio = None
    if 1 in by_level and len(results) > 1 and by_level[1].tokens_per_s > 0:
        ratio = round(results[-1].tokens_per_s / by_level[1].tokens_per_s, 2)
        print(f"batched (concurrency {results[-1].concurrency}) vs sequential throughput: {ratio}x")
    report = {
        "server": "FastAPI + uvicorn (twotower.serve)",
        "engine_step": resolve_engine_step(args.engine_step, "cpu"),  # what the server resolves on this machine
        "model": "random tiny preset" if args.random_model else (args.model or "bundled"),
        "mode": args.mode,
        "max_tokens": args.max_tokens,
        "diffusion": {
            "block_size": args.block_size,
            "steps_per_block": args.steps_per_block,
            "threshold": args.threshold,
        }
        if args.mode == "diffusion"
        else None,
        "requests_per_level": args.requests,
        "server_max_batch_size": args.max_batch_size,
        "levels": [asdict(r) for r in results],
        "batched_vs_sequential_tokens_per_s": ratio,
        "disconnects": asdict(disconnects) if disconnects else None,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = any(r.errors for r in results)
    if disconnects is not None:
        failed |= bool(disconnects.errors or disconnects.running_rows_after or disconnects.in_flight_after)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
