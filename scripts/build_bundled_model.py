"""Assemble the bundled `twotower-tiny` package asset from the training runs: weights + config,
tokenizer, corpus manifest, loss-curve plot and MODEL_CARD.md figures (computed from the logs).

    python scripts/build_bundled_model.py --ar-run runs/tiny-ar --denoiser-run runs/tiny-denoiser \
        --distill-run runs/tiny-denoiser-distill runs/tiny-denoiser-distill2 \
        --distill-data runs/distill runs/distill-joined \
        --tokenizer runs/tokenizer --corpus runs/corpus --packed runs/packed

With `--distill-run` (one or more runs, in order), the weights are the last run's (the denoiser
fine-tuned on self-distillation rows, `scripts/distill_tiny.py`, `scripts/distill_tiny_round2.py`)
and their logs are the later training stages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "src" / "twotower" / "assets" / "twotower-tiny"


def read_log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]


def run_settings(run: Path) -> dict:
    """The TrainSettings a run used, from its newest checkpoint's JSON state (never a pickle)."""
    from twotower.train.checkpointing import latest_checkpoint, read_state

    path = latest_checkpoint(run)
    if path is None:
        raise SystemExit(f"{run}: no checkpoint (runs written before the safetensors checkpoints are not read)")
    return read_state(path).settings


def summarise(run: Path) -> dict:
    log = read_log(run)
    state = run_settings(run)
    tokens = state["global_batch"] * state["seq_len"]
    seconds = sum(tokens / r["tokens_per_s"] for r in log if r.get("tokens_per_s"))
    held = [r["heldout_loss"] for r in log if "heldout_loss" in r]
    tail = log[-50:]
    return {
        "steps": len(log),
        "tokens_seen": len(log) * tokens,
        "train_seconds": round(seconds),
        "final_train_loss_avg50": round(sum(r["loss"] for r in tail) / len(tail), 4),
        "first_heldout_loss": round(held[0], 4) if held else None,
        "final_heldout_loss": round(held[-1], 4) if held else None,
        "settings": state,
    }


def _meta(path: Path) -> dict:
    return json.loads(path.read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar-run", type=Path, required=True)
    p.add_argument("--denoiser-run", type=Path, required=True)
    p.add_argument(
        "--distill-run", type=Path, nargs="*", default=[], help="denoiser runs on distillation rows, in order"
    )
    p.add_argument("--distill-data", type=Path, nargs="*", default=[], help="the distillation rows each trained on")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--packed", type=Path, required=True)
    args = p.parse_args()

    card = (ASSET / "MODEL_CARD.md").read_text() if (ASSET / "MODEL_CARD.md").is_file() else None
    if ASSET.exists():
        shutil.rmtree(ASSET)
    shutil.copytree((args.distill_run[-1] if args.distill_run else args.denoiser_run) / "model", ASSET)
    if card is not None:  # hand-written; its figures are updated from training_facts.json by hand
        (ASSET / "MODEL_CARD.md").write_text(card)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(args.tokenizer / name, ASSET / name)
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    (ASSET / "corpus_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    figure = REPO / "docs" / "figures" / "tiny_training.png"
    logs = [str(args.ar_run / "log.jsonl"), str(args.denoiser_run / "log.jsonl")]
    labels = ["AR pretraining (context tower)", "denoiser training (mask diffusion, S=16)"]
    for i, run in enumerate(args.distill_run, start=1):
        logs.append(str(run / "log.jsonl"))
        labels.append(f"denoiser on self-distillation rows (round {i})")
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "plot_training.py"), *logs, "--labels", *labels,
         "--out", str(figure)],
        check=True,
    )  # fmt: skip
    shutil.copy(figure, ASSET / "training_curves.png")
    facts = {
        "ar": summarise(args.ar_run),
        "denoiser": summarise(args.denoiser_run),
        **{f"denoiser_distill_round{i}": summarise(run) for i, run in enumerate(args.distill_run, start=1)},
        **{
            f"distill_data_round{i}": {s: _meta(d / f"{s}.json") for s in ("train", "heldout")}
            for i, d in enumerate(args.distill_data, start=1)
        },
        "packed": {s: json.loads((args.packed / f"{s}.json").read_text()) for s in ("train", "heldout")},
        "weights_sha256": sha256(ASSET / "model.safetensors"),
        "weights_bytes": (ASSET / "model.safetensors").stat().st_size,
        "tokenizer_sha256": sha256(ASSET / "tokenizer.json"),
    }
    (ASSET / "training_facts.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in facts.items() if k != "packed"}, indent=1))


if __name__ == "__main__":
    main()
