"""rigl_ds: sparse training from scratch (RigL and its baselines), in plain PyTorch and under DeepSpeed.

The core (config, distributions, schedules, masks, methods, FLOPs) is pure PyTorch; the entry point
for a plain training loop is :func:`sparsify`.
"""

from .config import RigLConfig, RigLConfigError, load_config
from .distributions import layer_sparsities
from .flops import FlopsReport, expected_training_flops, weight_uses
from .methods import METHODS
from .pytorch import SparseTraining, sparsify
from .schedules import drop_fraction, gmp_sparsity, is_update_step

__version__ = "0.1.0"

__all__ = [
    "RigLConfig",
    "RigLConfigError",
    "load_config",
    "layer_sparsities",
    "METHODS",
    "SparseTraining",
    "sparsify",
    "drop_fraction",
    "gmp_sparsity",
    "is_update_step",
    "FlopsReport",
    "expected_training_flops",
    "weight_uses",
    "initialize",
]


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with the config's ``"rigl"`` block applied (see
    ``rigl_ds.integrations.deepspeed``); imports DeepSpeed only when called."""
    from .integrations.deepspeed import initialize as _initialize

    return _initialize(*args, **kwargs)
