# Second self-distillation round for the bundled denoiser: 40,960 more rows (seed 2), joined with the
# first round's 20,480 (scripts/distill_tiny.py), and 3000 more steps from the round-1 weights.
# Resumable at every stage: rerun the same command after a kill.
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from twotower.backbone import NemotronHForCausalLM
from twotower.model import TwoTowerForCausalLM
from twotower.tokenizer import Tokenizer
from twotower.train.data import PackedTokens
from twotower.train.distill import DistillSettings, build_distill_set
from twotower.train.recipes import train_denoiser
from twotower.train.trainer import TrainSettings

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
ar = NemotronHForCausalLM.from_pretrained("runs/tiny-ar/model").eval()
tokenizer = Tokenizer.load("runs/tokenizer")
build_distill_set(ar, PackedTokens("runs/packed/train.bin"), tokenizer, "runs/distill2",
                  DistillSettings(rows=40960, seed=2), split="train", progress=False)  # fmt: skip
print("distilled round 2: 40960 rows", flush=True)

joined = Path("runs/distill-joined")  # round 1 + round 2 rows; round 1's held-out rows
if not (joined / "train.json").is_file():
    joined.mkdir(exist_ok=True)
    parts = [np.fromfile(f"runs/{d}/train.bin", dtype=np.uint16) for d in ("distill", "distill2")]
    np.concatenate(parts).tofile(joined / "train.bin")
    meta = json.loads(Path("runs/distill2/train.json").read_text())
    meta.update(rows=sum(len(p) for p in parts) // 128, tokens=sum(len(p) for p in parts),
                source="runs/distill/train.bin + runs/distill2/train.bin")  # fmt: skip
    for split in ("heldout",):
        shutil.copy(f"runs/distill/{split}.bin", joined / f"{split}.bin")
        shutil.copy(f"runs/distill/{split}.json", joined / f"{split}.json")
    (joined / "train.json").write_text(json.dumps(meta, indent=2))

settings = TrainSettings(steps=3000, global_batch=16, micro_batch=16, seq_len=128, lr=3e-4, min_lr=1e-5,
                         warmup_steps=50, decay_fraction=0.3, weight_decay=0.1, eval_every=250,
                         eval_batches=8, save_every=100, seed=1)  # fmt: skip
model = TwoTowerForCausalLM.from_pretrained("runs/tiny-denoiser-distill/model")
train_denoiser(model, joined, "runs/tiny-denoiser-distill2", settings, block_size=16, progress=False)
