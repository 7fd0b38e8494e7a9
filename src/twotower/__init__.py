"""twotower: NVIDIA's Nemotron-Labs-TwoTower diffusion language model in pure PyTorch."""

from . import api  # noqa: F401  (attaches from_pretrained, generate_*, score, ... to the model classes)
from .backbone import NemotronHForCausalLM, NemotronHModel
from .cache import HybridCache
from .checkpoint import CheckpointError
from .config import NemotronHConfig, preset
from .decode.batch import GenerationOutput
from .model import TwoTowerForCausalLM

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "GenerationOutput",
    "HybridCache",
    "NemotronHConfig",
    "NemotronHForCausalLM",
    "NemotronHModel",
    "TwoTowerForCausalLM",
    "preset",
]
