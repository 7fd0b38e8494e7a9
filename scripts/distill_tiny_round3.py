# Third self-distillation round for the bundled denoiser: 81,920 more rows (seed 3), joined with rounds
# 1 and 2 (143,360 rows in all), and 4000 more steps from the round-2 weights.
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
build_distill_set(ar, PackedTokens("runs/packed/train.bin"), tokenizer, "runs/distill3",
                  DistillSettings(rows=81920, seed=3), split="train", progress=False)  # fmt: skip
print("distilled round 3: 81920 rows", flush=True)

rounds = ("distill", "distill2", "distill3")
joined = Path("runs/distill-joined3")  # rounds 1-3; round 1's held-out rows
if not (joined / "train.json").is_file():
    joined.mkdir(exist_ok=True)
    parts = [np.fromfile(f"runs/{d}/train.bin", dtype=np.uint16) for d in rounds]
    np.concatenate(parts).tofile(joined / "train.bin")
    meta = json.loads(Path("runs/distill3/train.json").read_text())
    meta.update(rows=sum(len(p) for p in parts) // 128, tokens=sum(len(p) for p in parts),
                source=" + ".join(f"runs/{d}/train.bin" for d in rounds))  # fmt: skip
    for name in ("heldout.bin", "heldout.json"):
        shutil.copy(f"runs/distill/{name}", joined / name)
    (joined / "train.json").write_text(json.dumps(meta, indent=2))

settings = TrainSettings(steps=4000, global_batch=16, micro_batch=16, seq_len=128, lr=3e-4, min_lr=1e-5,
                         warmup_steps=50, decay_fraction=0.3, weight_decay=0.1, eval_every=250,
                         eval_batches=8, save_every=100, seed=2)  # fmt: skip
model = TwoTowerForCausalLM.from_pretrained("runs/tiny-denoiser-distill2/model")
train_denoiser(model, joined, "runs/tiny-denoiser-distill3", settings, block_size=16, progress=False)
