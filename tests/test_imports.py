"""Light imports: the losses and schedules need torch (or nothing), not Lightning; the package root is lazy."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

import lightning_kd


def fresh_modules(code: str) -> dict:
    """Run ``code`` in a fresh interpreter and return which of our heavy dependencies it imported."""
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps({name: name in sys.modules for name in ('lightning', 'lightning.pytorch', 'torchmetrics', 'hydra', 'torch')}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["lightning_kd.losses", "lightning_kd.teachers", "lightning_kd.features", "lightning_kd.export"])
def test_losses_and_torch_only_modules_import_no_lightning(module):
    loaded = fresh_modules(f"import {module}")
    assert loaded == {"lightning": False, "lightning.pytorch": False, "torchmetrics": False, "hydra": False, "torch": True}


def test_schedules_import_nothing_heavy():
    loaded = fresh_modules("import lightning_kd.schedules")
    assert loaded == {"lightning": False, "lightning.pytorch": False, "torchmetrics": False, "hydra": False, "torch": False}


def test_the_package_root_loads_its_names_on_first_use():
    loaded = fresh_modules("import lightning_kd; lightning_kd.__version__")
    assert not loaded["lightning"] and not loaded["torch"]
    loaded = fresh_modules("import lightning_kd; lightning_kd.DistillationModule")
    assert loaded["lightning.pytorch"]


def test_every_exported_name_resolves_and_is_listed():
    for name in lightning_kd.__all__:
        assert getattr(lightning_kd, name) is not None, name
    assert set(lightning_kd.__all__) <= set(dir(lightning_kd))
    with pytest.raises(AttributeError, match="has no attribute 'kd_losss'"):
        lightning_kd.kd_losss  # noqa: B018


def test_the_version_comes_from_the_package_metadata():
    assert lightning_kd.__version__ == importlib.metadata.version("lightning-kd")


def test_the_soft_targets_package_is_lazy_too():
    loaded = fresh_modules("import lightning_kd.soft_targets.store")
    assert not loaded["lightning"] and loaded["torch"]
    import lightning_kd.soft_targets as soft_targets

    assert soft_targets.SoftTargetStore is lightning_kd.SoftTargetStore
    assert soft_targets.build_soft_targets is lightning_kd.build_soft_targets
