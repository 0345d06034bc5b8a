"""lightning-kd: knowledge distillation for PyTorch Lightning.

A frozen teacher, a trainable student, a callback that anneals temperature and alpha, and Hydra
configs that run the whole teacher -> student workflow.
"""

__version__ = "0.1.0"  # before the imports: the soft-target store records it

from lightning_kd.cache import build_soft_targets
from lightning_kd.callbacks import DistillationAnnealing
from lightning_kd.data.indexed import SoftTargetDataModule, with_soft_targets
from lightning_kd.data.soft_targets import SoftTargetStore
from lightning_kd.losses import kd_loss
from lightning_kd.module import DistillationModule
from lightning_kd.weights import load_weights

__all__ = [
    "DistillationAnnealing",
    "DistillationModule",
    "SoftTargetDataModule",
    "SoftTargetStore",
    "build_soft_targets",
    "kd_loss",
    "load_weights",
    "with_soft_targets",
    "__version__",
]
