"""docs/reliability.md and the reliability tests stay in step: every test the page names exists, and
every test of the reliability modules is on the page (a new case without a row fails here)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reliability.md"
# The modules whose every test is a row of the matrix.
MATRIX_MODULES = ("test_reliability_module.py", "test_loss_numerics.py", "test_store_safety.py", "test_faults.py")


def _named_tests() -> set[tuple[str, str]]:
    return set(re.findall(r"`tests/(test_\w+\.py)::(test_\w+)`", PAGE.read_text()))


def _defined_tests(module: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / module).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_named_on_the_page_exists():
    missing = [f"{module}::{name}" for module, name in sorted(_named_tests()) if name not in _defined_tests(module)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_reliability_test_has_a_row_on_the_page():
    named = _named_tests()
    unlisted = [
        f"{module}::{name}"
        for module in MATRIX_MODULES
        if (ROOT / "tests" / module).is_file()
        for name in sorted(_defined_tests(module))
        if (module, name) not in named
    ]
    assert not unlisted, f"tests without a row in docs/reliability.md: {unlisted}"
