# Exact commands used to retrain the bundled model's denoiser on self-distillation data:
# 1. the frozen AR model (the context tower) continues training-split prefixes greedily;
# 2. the shipped denoiser is fine-tuned on those rows with the usual single-pass objective.
# Resumable at every stage: rerun the same command after a kill.
import sys

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
for split, rows in (("heldout", 512), ("train", 20480)):
    build_distill_set(
        ar,
        PackedTokens(f"runs/packed/{split}.bin"),
        tokenizer,
        "runs/distill",
        DistillSettings(rows=rows, seed=0 if split == "train" else 1),
        split=split,
        progress=False,
    )
    print(f"distilled {split}: {rows} rows", flush=True)

settings = TrainSettings(
    steps=3000,
    global_batch=16,
    micro_batch=16,
    seq_len=128,
    lr=5e-4,
    min_lr=1e-5,
    warmup_steps=50,
    decay_fraction=0.3,
    weight_decay=0.1,
    eval_every=250,
    eval_batches=8,
    save_every=100,
    seed=0,
)
model = TwoTowerForCausalLM.from_pretrained("runs/tiny-denoiser/model")
train_denoiser(model, "runs/distill", "runs/tiny-denoiser-distill", settings, block_size=16, progress=False)
