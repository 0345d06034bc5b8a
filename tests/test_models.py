"""Tests for the model zoo: parameter counts, shapes, the registry, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kd import models
from lightning_kd.models import (
    CNN1D,
    MLP,
    CifarResNet,
    CifarVGG,
    WideResNet,
    get_model,
    list_models,
    register_model,
    registry,
)

MNIST1D_MODELS = ["cnn1d", "mlp"]

# Published sizes with 100 classes (Tian et al., CRD / RepDistiller, Table 1 and README).
CIFAR_PARAMS_M = {
    "resnet8x4": 1.23,
    "resnet20": 0.28,
    "resnet32x4": 7.43,
    "resnet56": 0.86,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.26,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register names without leaking them into the shared registry."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- parameter counts -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("cnn1d", 25_258), ("mlp", 15_210)])
def test_mnist1d_param_counts_exact(name: str, expected: int) -> None:
    assert _num_params(get_model(name)) == expected


@pytest.mark.parametrize(("name", "millions"), sorted(CIFAR_PARAMS_M.items()))
def test_cifar_param_counts_match_published(name: str, millions: float) -> None:
    count = _num_params(get_model(name))
    assert count == pytest.approx(millions * 1e6, rel=0.01)


def test_num_classes_changes_only_the_head() -> None:
    # resnet8x4's head is Linear(256, num_classes): 257 parameters per class.
    fewer = _num_params(get_model("resnet8x4")) - _num_params(get_model("resnet8x4", num_classes=10))
    assert fewer == 90 * 257


# --- shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS_M))
def test_cifar_output_shape(name: str) -> None:
    # num_classes=10 rather than the default 100, to check the argument reaches the head.
    model = get_model(name, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MNIST1D_MODELS)
@pytest.mark.parametrize("shape", [(4, 40), (4, 1, 40)])
def test_mnist1d_output_shape(name: str, shape: tuple[int, ...]) -> None:
    model = get_model(name).eval()
    assert model(torch.randn(shape)).shape == (4, 10)


@pytest.mark.parametrize("name", MNIST1D_MODELS)
def test_mnist1d_2d_and_3d_inputs_agree(name: str) -> None:
    model = get_model(name).eval()
    x = torch.randn(4, 40)
    torch.testing.assert_close(model(x), model(x.unsqueeze(1)))


@pytest.mark.parametrize("name", MNIST1D_MODELS)
@pytest.mark.parametrize("shape", [(4, 41), (4, 2, 40), (40,)])
def test_mnist1d_rejects_bad_shape(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"Expected input of shape \(B, 40\) or \(B, 1, 40\)"):
        get_model(name)(torch.randn(shape))


def test_vgg_accepts_64x64() -> None:
    model = CifarVGG(((8,), (8,), (8,), (8,), (16,)), num_classes=5).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_cnn1d_other_length_and_width() -> None:
    model = CNN1D(num_classes=3, channels=4, in_length=17)  # 17 -> 9 -> 5 -> 3
    assert model.classifier.in_features == 8 * 3
    assert model(torch.randn(2, 17)).shape == (2, 3)


def test_mlp_hidden_layers() -> None:
    model = MLP(hidden=[8, 8, 8], num_classes=3)
    assert len(model.hidden) == 3
    assert MLP(hidden=()).classifier.in_features == 40


# --- submodule names that feature hooks address -----------------------------------------------


@pytest.mark.parametrize(
    ("name", "submodules"),
    [
        ("cnn1d", ["features.0", "features.3", "classifier"]),
        ("mlp", ["hidden.0", "hidden.1", "classifier"]),
        ("resnet8x4", ["layer1", "layer2", "layer3", "fc"]),
        ("wrn_16_2", ["block1", "block2", "block3", "bn1", "fc"]),
        ("vgg8", ["block0", "block4", "classifier"]),
    ],
)
def test_named_submodules(name: str, submodules: list[str]) -> None:
    names = dict(get_model(name).named_modules())
    for sub in submodules:
        assert sub in names


# --- constructor validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: CNN1D(channels=0), "Expected `channels` to be >= 1, but got 0"),
        (lambda: MLP(hidden=(10, 0)), r"Expected every `hidden` width to be >= 1"),
        (lambda: MLP(num_classes=0), "Expected `num_classes` to be >= 1, but got 0"),
        (lambda: MLP(in_features=0), "Expected `in_features` to be >= 1, but got 0"),
        (lambda: CifarResNet(depth=21, widths=(16, 16, 32, 64)), r"Expected `depth` to be 6n \+ 2"),
        (lambda: CifarResNet(depth=20, widths=(16, 32, 64)), "Expected `widths` to have 4 entries"),
        (lambda: WideResNet(depth=41, widen_factor=2), r"Expected `depth` to be 6n \+ 4"),
        (lambda: WideResNet(depth=16, widen_factor=0), "Expected `widen_factor` to be >= 1"),
        (lambda: WideResNet(depth=16, widen_factor=2, dropout=1.0), r"Expected `dropout` to be in \[0, 1\)"),
        (lambda: CifarVGG(((64,),) * 4), "Expected `stages` to have 5 non-empty stages"),
    ],
)
def test_constructor_errors(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


# --- registry ---------------------------------------------------------------------------------


def test_list_models_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(MNIST1D_MODELS) | set(CIFAR_PARAMS_M) <= set(names)


def test_unknown_model_lists_valid_names() -> None:
    expected = "Unknown model 'resnet9000'. Expected one of: " + ", ".join(list_models())
    with pytest.raises(ValueError, match=expected) as info:
        get_model("resnet9000")
    assert str(info.value) == expected


def test_duplicate_registration_raises(scratch_registry: None) -> None:
    with pytest.raises(ValueError, match="A model named 'cnn1d' is already registered"):

        @register_model("cnn1d")
        def other() -> nn.Module:
            return nn.Identity()


def test_register_and_build(scratch_registry: None) -> None:
    @register_model("tiny_linear")
    def tiny_linear(num_classes: int = 2) -> nn.Module:
        return nn.Linear(40, num_classes)

    assert "tiny_linear" in list_models()
    assert get_model("tiny_linear", num_classes=3).out_features == 3


def test_scratch_registry_does_not_leak() -> None:
    assert "tiny_linear" not in list_models()


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [(3, TypeError, "Expected `name` to be a str"), ("", ValueError, "non-empty")],
)
def test_register_bad_name(name, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        register_model(name)


def test_unexpected_kwarg_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        get_model("mlp", depth=3)


def test_package_exports() -> None:
    for name in models.__all__:
        assert hasattr(models, name)


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn1d", "mlp", "resnet8x4", "wrn_16_2", "vgg8"])
def test_construction_is_deterministic_under_seed(name: str) -> None:
    torch.manual_seed(123)
    a = get_model(name).state_dict()
    torch.manual_seed(123)
    b = get_model(name).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    torch.manual_seed(124)
    c = get_model(name).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)
