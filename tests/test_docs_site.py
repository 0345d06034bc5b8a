"""The documentation site builds with ``mkdocs build --strict``, and what it shows comes from the code and conf/.

One build (a subprocess, into a temporary folder) serves every test of the module: the API reference must
carry the docstrings of the public names, the config reference every group and option file of conf/ with
its comments and YAML, and the build must leave the repository as it was.
"""

from __future__ import annotations

import html
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# API page -> the modules whose public names (``__all__``) it documents
API_PAGES = {
    "api/index.html": ["lightning_kd"],
    "api/losses/index.html": ["lightning_kd.losses"],
    "api/callbacks/index.html": ["lightning_kd.callbacks", "lightning_kd.schedules"],
    "api/soft_targets/index.html": ["lightning_kd.soft_targets"],
    "api/data/index.html": ["lightning_kd.data"],
    "api/models/index.html": ["lightning_kd.models"],
    "api/lm/index.html": ["lightning_kd.lm"],
}


def _text(page: str) -> str:
    """A built page as plain text: tags removed, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())


def _summary(obj: object) -> str:
    """The first line of an object's docstring as the site shows it: RST roles and literals reduced to their text."""
    line = inspect.getdoc(obj).splitlines()[0]
    line = re.sub(r":math:`([^`]*)`", r"\\(\1\\)", line)
    line = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`.]+)`", r"\1", line)
    return " ".join(line.replace("``", "").split())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    before = (ROOT / "site").exists()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (ROOT / "site").exists() == before, "the build wrote a site/ folder into the repository"
    return site_dir


@pytest.mark.slow  # the site's build: about ten seconds, once for the module
def test_the_site_builds_into_the_given_folder_and_site_is_git_ignored(site: Path) -> None:
    assert (site / "index.html").is_file() and (site / "api" / "index.html").is_file()
    assert not (site / "hooks").exists(), "the build hooks are tooling, not pages"
    ignored = subprocess.run(["git", "check-ignore", "-q", "site/index.html"], cwd=ROOT)
    assert ignored.returncode == 0, "site/ (mkdocs' default output folder) must be in .gitignore"


@pytest.mark.slow  # the site's build: about ten seconds, once for the module
def test_the_api_reference_shows_the_docstring_of_every_public_name(site: Path) -> None:
    import lightning_kd

    top = _text((site / "api" / "index.html").read_text())
    assert _summary(lightning_kd.DistillationModule) in top
    assert "Distil a frozen teacher (or several) into a trainable student." in top
    assert "Split a batch into (inputs, targets)" in top  # a hook's own docstring: DistillationModule.unpack_batch
    every_page = " ".join(_text(p.read_text()) for p in (site / "api").rglob("index.html"))
    missing = []
    for page, modules in API_PAGES.items():
        text = _text((site / page).read_text())
        for module_name in modules:
            module = importlib.import_module(module_name)
            for name in _public_names(module):
                obj = getattr(module, name)
                if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                    continue  # constants (IGNORE_INDEX) have no docstring of their own
                # the top-level page links to where a name re-exported from another public module is shown
                where = every_page if module_name == "lightning_kd" else text
                if _summary(obj) not in where:
                    missing.append(f"{module_name}.{name} on {page}: {_summary(obj)!r}")
    assert not missing, "docstrings missing from the API reference:\n" + "\n".join(missing)


@pytest.mark.slow  # the site's build: about ten seconds, once for the module
def test_the_api_reference_reads_the_docstrings_rst_as_markdown(site: Path) -> None:
    leftovers = {}
    for page in (site / "api").rglob("index.html"):
        text = _text(page.read_text())
        found = [mark for mark in (":class:`", ":func:`", ":meth:`", ":mod:`", ":math:`", ".. math::", "``", "Example::")
                 if mark in text]
        if found:
            leftovers[str(page.relative_to(site))] = found
    assert not leftovers, f"reStructuredText left in the API reference: {leftovers}"
    top = (site / "api" / "index.html").read_text()
    # DistillationModule's `.. math::` block became a formula block, and its roles links to where the site shows them
    assert re.search(r'<div class="arithmatex">\\\[\s*\\mathcal\{L\} = w', top)
    assert 'href="losses/#lightning_kd.losses.KDLoss"' in top
    assert 'href="#lightning_kd.module.DistillationModule.unpack_batch"' in top


@pytest.mark.slow  # the site's build: about ten seconds, once for the module
def test_the_top_level_page_names_every_export(site: Path) -> None:
    import lightning_kd

    page = (site / "api" / "index.html").read_text()
    absent = [name for name in lightning_kd.__all__ if f"<code>{name}</code>" not in page]
    assert not absent, f"lightning_kd exports missing from api/index.md: {absent}"


def _public_names(module: object) -> list[str]:
    """``__all__``, or else the public names the module defines itself."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [n for n, o in vars(module).items() if not n.startswith("_") and getattr(o, "__module__", None) == module.__name__]


def _leading_comment(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return " ".join(" ".join(lines).split())


@pytest.mark.slow  # the site's build: about ten seconds, once for the module
def test_the_config_reference_shows_every_group_and_option_of_conf(site: Path) -> None:
    page = (site / "config_reference" / "index.html").read_text()
    text = _text(page)
    groups = sorted({p.parent.name for p in CONF.glob("*/*.yaml")})
    assert len(groups) >= 10
    for group in groups:
        assert re.search(rf"<h2[^>]*>.*?<code>{re.escape(group)}</code>", page), f"no section for group {group}"
    files = sorted(CONF.glob("*/*.yaml")) + [CONF / "config.yaml"]
    for path in files:
        relative = path.relative_to(CONF).as_posix()
        assert f"conf/{relative}" in text, f"{relative} is not on the page"
        if path.parent != CONF:
            assert f"<code>{path.parent.name}/{path.stem}</code>" in page, f"no heading for {relative}"
        # the file itself, every line, in its code block (highlighting spans removed)
        yaml_text = " ".join(path.read_text().split())
        assert yaml_text in text, f"the YAML of {relative} is not shown as it is"
        comment = _leading_comment(path)
        if comment:  # and its leading comment as prose, outside the code block (code spans keep their text)
            prose = " ".join(re.sub(r"`([^`]*)`", r"\1", comment).split())
            assert prose in text.replace(yaml_text, ""), f"the leading comment of {relative} is not shown as prose"


def test_a_hand_written_config_reference_is_refused(tmp_path: Path) -> None:
    from mkdocs.config import load_config
    from mkdocs.structure.files import File, Files

    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        hook = importlib.import_module("config_reference")
    finally:
        sys.path.remove(str(ROOT / "docs" / "hooks"))
    config = load_config(str(ROOT / "mkdocs.yml"))
    (tmp_path / "config_reference.md").write_text("# hand-written\n")
    files = Files([File("config_reference.md", str(tmp_path), str(tmp_path / "out"), use_directory_urls=True)])
    with pytest.raises(ValueError, match="generated from conf/ by docs/hooks/config_reference.py: remove the file"):
        hook.on_files(files, config)


def test_the_site_sources_name_no_path_outside_the_repository() -> None:
    # the site is built from docs/, the docstrings and conf/: none may point at the development machine's folders
    sources = [*ROOT.joinpath("docs").rglob("*.md"), *ROOT.joinpath("docs").rglob("*.py"), ROOT / "mkdocs.yml",
               *ROOT.joinpath("lightning_kd").rglob("*.py"), *CONF.rglob("*.yaml")]
    outside = [f"{p.relative_to(ROOT)}: {needle}" for p in sources for needle in ("/work/shared", "../shared")
               if needle in p.read_text()]
    assert not outside, f"paths outside the repository: {outside}"
