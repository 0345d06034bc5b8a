"""The model zoo: MNIST-1D teacher/student and the CIFAR teachers/students of RepDistiller.

Importing this package registers every model; build one by name with ``get_model``.

Example::

    >>> from lightning_kd.models import get_model, list_models
    >>> list_models()  # doctest: +NORMALIZE_WHITESPACE
    ['cnn1d', 'gpt', 'gpt_student', 'gpt_teacher',
     'mlp', 'resnet20', 'resnet32x4', 'resnet56', 'resnet8x4',
     'vgg13', 'vgg8', 'wrn_16_2', 'wrn_40_2']
    >>> get_model("resnet8x4", num_classes=10).fc.out_features
    10
"""

from lightning_kd.models.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    resnet8x4,
    resnet20,
    resnet32x4,
    resnet56,
)
from lightning_kd.models.cifar_vgg import CifarVGG, vgg8, vgg13
from lightning_kd.models.cifar_wrn import WideBasicBlock, WideResNet, wrn_16_2, wrn_40_2
from lightning_kd.models.gpt import GPT, GPTModel, gpt_student, gpt_teacher
from lightning_kd.models.mnist1d import CNN1D, MLP
from lightning_kd.models.registry import get_model, list_models, register_model

__all__ = [
    "CNN1D",
    "GPT",
    "GPTModel",
    "MLP",
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "WideBasicBlock",
    "WideResNet",
    "get_model",
    "gpt_student",
    "gpt_teacher",
    "list_models",
    "register_model",
    "resnet8x4",
    "resnet20",
    "resnet32x4",
    "resnet56",
    "vgg8",
    "vgg13",
    "wrn_16_2",
    "wrn_40_2",
]
