# Exact command used to pretrain the bundled backbone (equivalent to `twotower train backbone ...`).
from twotower.config import preset
from twotower.train.recipes import pretrain_backbone
from twotower.train.trainer import TrainSettings

settings = TrainSettings(
    steps=1000,
    global_batch=16,
    micro_batch=16,
    seq_len=256,
    lr=1.5e-3,
    min_lr=1.5e-5,
    warmup_steps=30,
    decay_fraction=0.25,
    weight_decay=0.1,
    eval_every=100,
    eval_batches=8,
    save_every=50,
    seed=0,
)
pretrain_backbone(preset("tiny"), "runs/packed", "runs/tiny-ar", settings, progress=False)
