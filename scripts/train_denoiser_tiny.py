# Exact command used to train the bundled model's denoiser
# (equivalent to `twotower train denoiser --backbone runs/tiny-ar/model --data runs/packed ...`).
from twotower.backbone import NemotronHForCausalLM
from twotower.model import TwoTowerForCausalLM
from twotower.train.recipes import train_denoiser
from twotower.train.trainer import TrainSettings

settings = TrainSettings(
    steps=1200,
    global_batch=16,
    micro_batch=16,
    seq_len=128,
    lr=1e-3,
    min_lr=1e-5,
    warmup_steps=30,
    decay_fraction=0.25,
    weight_decay=0.1,
    eval_every=100,
    eval_batches=8,
    save_every=50,
    seed=0,
)
model = TwoTowerForCausalLM.from_backbone(NemotronHForCausalLM.from_pretrained("runs/tiny-ar/model"))
train_denoiser(model, "runs/packed", "runs/tiny-denoiser", settings, block_size=16, progress=False)
