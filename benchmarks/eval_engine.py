"""lm-eval generation with and without the engine (`engine=true`), side by side in one process.

`generate_until` requests of the lm-eval adapter (arithmetic questions in two styles with GSM8K's
kind of stop strings, `STOP`) on the bundled model, run alternately through the batched library
calls (which decode every row to EOS or its budget and cut the text afterwards) and through the
continuous-batching engine (a row stops at its first stop string and the next request takes its
place). Prints the medians of the wall time, the generated tokens and the texts' agreement.

    python benchmarks/eval_engine.py --requests 64 --batch-size 8 --max-gen-toks 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import replace

import torch
from lm_eval.api.instance import Instance

from twotower.decode.spec import DECODE_STEPS
from twotower.evaluation.harness import TwoTowerLM
from twotower.loading import load_for_inference


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    p.add_argument("--mode", default="diffusion", choices=("diffusion", "ar", "speculative"))
    p.add_argument("--requests", type=int, default=64, help="generate_until requests per pass (default: 64)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch / engine rows (default: 8)")
    p.add_argument("--max-gen-toks", type=int, default=64, help="token budget of every request (default: 64)")
    p.add_argument("--confidence-threshold", type=float, default=0.9, help="diffusion's gamma (default: 0.9)")
    p.add_argument("--repeats", type=int, default=3, help="passes of each variant, alternating (default: 3)")
    p.add_argument(
        "--engine-step", default="eager", choices=("auto", *DECODE_STEPS), help="the engine's steps (default: eager)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the questions (default: 0)")
    p.add_argument("--json", metavar="FILE", help="write the settings and figures as JSON")
    return p


STOP = ["Question:", "\n\n"]  # GSM8K-style stop strings
FORMS = ("Q: {a} + {b} = ?\nA:", "Question: What is {a} plus {b}?\nAnswer:")  # the bundled model's two styles


def questions(n: int, seed: int, max_gen_toks: int) -> list[Instance]:
    """Arithmetic questions in two styles: the bundled model ends the first with EOS after its
    answer and runs on after the second, where a stop string (or the budget) ends it."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        prompt = FORMS[i % len(FORMS)].format(a=rng.randint(1, 99), b=rng.randint(1, 99))
        args = (prompt, {"until": list(STOP), "max_gen_toks": max_gen_toks, "do_sample": False})
        items.append(Instance(request_type="generate_until", doc={}, arguments=args, idx=i))
    return items


def one_pass(lm: TwoTowerLM, items: list[Instance]) -> tuple[float, list[str], dict]:
    before = replace(lm.speed)
    t0 = time.perf_counter()
    texts = lm.generate_until(items, disable_tqdm=True)
    return time.perf_counter() - t0, texts, lm.speed.since(before).as_dict()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.requests, args.batch_size, args.max_gen_toks, args.repeats) < 1:
        print("error: --requests, --batch-size, --max-gen-toks and --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_for_inference(args.model)
    settings = dict(mode=args.mode, batch_size=args.batch_size, confidence_threshold=args.confidence_threshold)
    variants = {
        "batched": TwoTowerLM.from_loaded(loaded, **settings),
        "engine": TwoTowerLM.from_loaded(loaded, engine=True, engine_step=args.engine_step, **settings),
    }
    items = questions(args.requests, args.seed, args.max_gen_toks)
    for lm in variants.values():
        lm.warm_up()
    runs: dict[str, list] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, lm in variants.items():
            runs[name].append(one_pass(lm, items))
            print(f"pass {r + 1}/{args.repeats} {name}: {runs[name][-1][0]:.2f} s", file=sys.stderr)
    figures = {}
    for name, passes in runs.items():
        speed = passes[-1][2]
        figures[name] = {
            "seconds": statistics.median(p[0] for p in passes),
            "generated_tokens": speed["generated_tokens"],
            "row_forwards": speed["row_forwards"],
            "nfe": speed["nfe"],
            "tokens_per_forward": speed["tokens_per_forward"],
        }
    same = sum(a == b for a, b in zip(runs["batched"][-1][1], runs["engine"][-1][1]))
    speedup = figures["batched"]["seconds"] / figures["engine"]["seconds"]
    print(f"{args.requests} requests, mode {args.mode}, batch {args.batch_size}, budget {args.max_gen_toks}:")
    print("| variant | seconds (median) | generated tokens | batched forwards | tokens per row forward |")
    print("|---|---:|---:|---:|---:|")
    for name, f in figures.items():
        print(f"| {name} | {f['seconds']:.2f} | {f['generated_tokens']} | {f['nfe']} | {f['tokens_per_forward']:.2f} |")
    print(f"engine / batched wall time: {1 / speedup:.2f} ({speedup:.2f}x faster); texts equal: {same}/{len(items)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"settings": vars(args), "figures": figures, "speedup": speedup, "texts_equal": same}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
