"""Bounded load test of `twotower serve`: loopback only, a fixed number of requests per concurrency
level, stops by itself.

The script starts the server as a subprocess on 127.0.0.1 with a free port, and for each
concurrency level C sends the same `--requests` greedy completions (prompt i is the same at every
level, so every level generates the same tokens) from C client threads over keep-alive
connections. Per level it reports requests/s, generated tokens/s (usage.completion_tokens over the
level's wall time), p50/p99 latency (send to full response) and the error count (any non-200 or
exception). The batched-vs-sequential ratio is tokens/s at the highest level over tokens/s at
concurrency 1 (one request at a time: no batching). Then it stops the server.

    python benchmarks/load_test.py                              # the bundled model
    python benchmarks/load_test.py --random-model --requests 8 --concurrency 1,4 --max-tokens 16
    python benchmarks/load_test.py --model PATH --concurrency 1,4,16,32 --requests 64 --json load.json

Exit status 1 if any request failed.
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

HOST = "127.0.0.1"  # loopback only: the server this script starts is reachable from this machine alone
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


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


def start_server(model: str | None, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "twotower.cli", "serve", "--host", HOST, "--port", "0"]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--max-queue", str(max(args.levels))]
    cmd += ["--max-tokens-limit", str(max(args.max_tokens, 1))]
    if model is not None:
        cmd += ["--model", model]
    env = {**os.environ}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + READY_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it was ready")
        if line.startswith("serving ") and " on http://" in line:
            return proc, line.rsplit(" on ", 1)[1].strip()
    stop_server(proc)
    raise SystemExit(f"the server was not ready after {READY_TIMEOUT_S} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- the clients -----------------------------------------------------------------------------------
def request_body(i: int, args: argparse.Namespace) -> bytes:
    body = {"prompt": f"Request {i}: the quick brown fox", "max_tokens": args.max_tokens, "mode": args.mode}
    if args.mode == "diffusion":
        body.update(
            block_size=args.block_size, steps_per_block=args.steps_per_block, confidence_threshold=args.threshold
        )
    return json.dumps(body).encode()


def run_level(url: str, concurrency: int, args: argparse.Namespace) -> LevelResult:
    port = int(url.rsplit(":", 1)[1])
    next_index, lock = iter(range(args.requests)), threading.Lock()
    latencies, tokens, errors = [], [], []

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", body=request_body(i, args), headers=HEADERS)
                resp = conn.getresponse()
                data = json.loads(resp.read())
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {data.get('error', {}).get('message')}")
                latencies.append(time.perf_counter() - t0)
                tokens.append(data["usage"]["completion_tokens"])
            except Exception as err:  # counted and reported; the level goes on
                errors.append(f"request {i}: {err}")
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for e in errors[:5]:
        print(f"  error: {e}", file=sys.stderr)
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
    )


HEADERS = {"Content-Type": "application/json"}


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
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default: 1,4,16)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (default: 32)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--mode", choices=("diffusion", "ar"), default="diffusion")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps-per-block", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--max-batch-size", type=int, default=None, help="server batch (default: highest level)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
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
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_random_model(Path(tmp))) if args.random_model else args.model
        proc, url = start_server(model, args)
        try:
            run_level(url, 1, argparse.Namespace(**{**vars(args), "requests": 1}))  # warm-up
            results = []
            for c in args.levels:
                r = run_level(url, c, args)
                results.append(r)
                print(
                    f"concurrency {c:>3}: {r.requests_per_s:7.2f} req/s  {r.tokens_per_s:9.1f} tok/s  "
                    f"p50 {r.latency_p50_s:7.3f} s  p99 {r.latency_p99_s:7.3f} s  errors {r.errors}",
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
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
