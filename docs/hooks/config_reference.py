"""MkDocs hook: the config reference page, generated from the YAML files in ``conf/`` at every build.

Nothing is written to the repository: the page is a generated file of this build only, so it cannot
fall behind the configs. For the primary config (``conf/config.yaml``) and every option of every group
(``conf/<group>/<option>.yaml``) it shows the file's leading comments (the lines before its first
key, which say what the option is for) and the file itself; each group gets a table of its options
and the default that ``config.yaml``'s ``defaults:`` list chooses.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import yaml
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

PAGE = "config_reference.md"

_CODE_SPAN = re.compile(r"(`[^`]*`)")
_MARKDOWN_SPECIAL = re.compile(r"([\\*_\[\]#|])")
_OPTION_LIST = re.compile(r"^[\w.-]+(\s*\|\s*[\w.-]+)+\s*:?\s*|:\s*[\w.-]+(\s*\|\s*[\w.-]+)+\s*$")


def conf_dir(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent / "conf"


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    config.watch.append(str(conf_dir(config)))  # `mkdocs serve` rebuilds the page when a config changes
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    existing = files.get_file_from_path(PAGE)
    if existing is not None:  # generated only: a hand-written page would be silently replaced otherwise
        raise ValueError(f"docs/{PAGE} is generated from conf/ by docs/hooks/config_reference.py: remove the file.")
    files.append(File.generated(config, PAGE, content=render(conf_dir(config))))
    return files


# ---------------------------------------------------------------------------------------------- reading
def leading_comments(text: str) -> tuple[str | None, list[str]]:
    """``(package, comment lines)``: the ``# @package`` directive (if any) and the comments above the first key."""
    package, lines = None, []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            if lines:
                lines.append("")
            continue
        if not stripped.startswith("#"):
            break
        body = stripped[1:]
        body = body[1:] if body.startswith(" ") else body
        if body.startswith("@package"):
            package = body.split(None, 1)[1].strip() if len(body.split(None, 1)) > 1 else ""
            continue
        lines.append(body)
    while lines and not lines[-1]:
        lines.pop()
    return package, lines


def defaults_of(primary: Path) -> dict[str, tuple[str | None, str]]:
    """``{group: (default option or None, the comment of its line)}`` from the primary config's ``defaults:`` list."""
    chosen: dict[str, str | None] = {}
    for entry in yaml.safe_load(primary.read_text()).get("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                chosen[str(group)] = None if option is None else str(option)
    comments: dict[str, str] = {}
    for line in primary.read_text().splitlines():
        match = re.match(r"\s*-\s*(?P<group>[\w/]+)\s*:[^#]*#\s*(?P<comment>.*)$", line)
        if match:
            # "a | b | c: what it is" -> "what it is": the page lists the options from the files themselves,
            # so a hand-kept list in a comment (which can fall behind) is not repeated.
            comment = _OPTION_LIST.sub("", match["comment"]).strip()
            comments[match["group"]] = comment[1:-1] if comment.startswith("(") and comment.endswith(")") else comment
    return {group: (option, comments.get(group, "")) for group, option in chosen.items()}


def groups_of(conf: Path) -> dict[str, list[Path]]:
    """``{group: [option files]}``; a group is a folder under ``conf/`` (nested ones as ``a/b``)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(conf.rglob("*.yaml")):
        if path.parent != conf:
            groups.setdefault(path.parent.relative_to(conf).as_posix(), []).append(path)
    return groups


# ---------------------------------------------------------------------------------------------- writing
def prose(text: str) -> str:
    """A comment as Markdown: its code spans as they are, everything else escaped (``_target_``, ``<date>``, ``*-mixed``)."""
    parts = _CODE_SPAN.split(text)
    return "".join(part if part.startswith("`") else _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(part, quote=False)) for part in parts)


def comment_block(lines: list[str]) -> str:
    """Comment lines as Markdown paragraphs; lines starting with ``- `` as a list."""
    out: list[str] = []
    in_list = False
    for line in lines:
        if not line:
            out.append("")
            in_list = False
            continue
        item = line.startswith("- ")
        if item and not in_list and out and out[-1]:
            out.append("")  # a list needs a blank line before it
        in_list = in_list or item
        if in_list and not item:
            out.append("    " + prose(line.strip()))  # continuation of the item above
        else:
            out.append(("- " + prose(line[2:])) if item else prose(line))
    return "\n".join(out)


def first_sentence(lines: list[str]) -> str:
    """The comment's first sentence (up to a full stop that ends a word; "e.g.", "i.e." and "et al." aside), for the tables."""
    text = " ".join(line for line in lines if line).strip()
    match = re.match(r"(.+?(?<!e\.g)(?<!i\.e)(?<! al)\.)(\s|$)", text)
    return prose(match.group(1) if match else text)


def yaml_block(path: Path, conf: Path) -> str:
    title = f"conf/{path.relative_to(conf).as_posix()}"
    return f'```yaml title="{title}"\n{path.read_text().rstrip()}\n```'


def anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def render(conf: Path) -> str:
    primary = conf / "config.yaml"
    defaults = defaults_of(primary)
    groups = groups_of(conf)
    out = [
        "# Config reference",
        "",
        "Every config group in `conf/` (shipped in the wheel as `lightning_kd.conf`) and every option of it, with the",
        "file's own comments and its full YAML. This page is generated from the files at every build of the site.",
        "",
        "Choose an option on the command line with `group=option` (`lightning-kd trainer=ddp_cpu precision=bf16-mixed`),",
        "change one value with its dotted path (`lightning-kd distill.alpha=0.5 student.epochs=50`), and print the",
        "composed config with `lightning-kd --cfg job`. A `# @package _global_` file (the `experiment` group) sets keys",
        "anywhere in the config; `@package trainer` files set keys of the trainer.",
        "",
        "| group | default | options | what it chooses |",
        "|---|---|---|---|",
    ]
    for group, files in groups.items():
        default, comment = defaults.get(group, (None, ""))
        options = ", ".join(f"[`{f.stem}`](#{anchor(group + '-' + f.stem)})" for f in files)
        out.append(f"| [`{group}`](#{anchor(group)}) | {'`' + default + '`' if default else '–'} | {options} | {prose(comment)} |")
    package, comments = leading_comments(primary.read_text())
    out += ["", "## The primary config: `config.yaml` { #config }", "", comment_block(comments), "", yaml_block(primary, conf), ""]
    for group, files in groups.items():
        default, comment = defaults.get(group, (None, ""))
        out += [f"## `{group}` {{ #{anchor(group)} }}", ""]
        if comment:
            out += [f"{prose(comment)}", ""]
        out += [f"Default: `{group}={default}`." if default else "Default: none (the group is left out unless chosen).", ""]
        out += ["| option | what it is |", "|---|---|"]
        for path in files:
            _, lines = leading_comments(path.read_text())
            out.append(f"| [`{group}={path.stem}`](#{anchor(group + '-' + path.stem)}) | {first_sentence(lines) or '–'} |")
        out.append("")
        for path in files:
            package, lines = leading_comments(path.read_text())
            out += [f"### `{group}/{path.stem}` {{ #{anchor(group + '-' + path.stem)} }}", ""]
            if package is not None:
                out += [f"Package: `{package}`.", ""]
            if lines:
                out += [comment_block(lines), ""]
            out += [yaml_block(path, conf), ""]
    return "\n".join(out)
