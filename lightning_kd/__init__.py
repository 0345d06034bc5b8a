"""lightning-kd: knowledge distillation for PyTorch Lightning.

A frozen teacher, a trainable student, a callback that anneals temperature and alpha, and Hydra
configs that run the whole teacher -> student workflow.
"""

from lightning_kd.callbacks import DistillationAnnealing
from lightning_kd.losses import kd_loss
from lightning_kd.module import DistillationModule
from lightning_kd.weights import load_weights

__version__ = "0.1.0"

__all__ = ["DistillationAnnealing", "DistillationModule", "kd_loss", "load_weights", "__version__"]
