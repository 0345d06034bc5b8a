"""A griffe extension for the API reference: the docstrings' reStructuredText bits, read as Markdown.

The package's docstrings are Google style (``Args:``, ``Raises:``) with a few reStructuredText habits
that Markdown would mangle: roles (``:class:`~lightning_kd.losses.KDLoss```, ``:math:`T^2```),
``.. math::`` blocks and literal blocks introduced by ``::`` (``Example::``). This extension rewrites
them in each docstring before mkdocstrings parses it, so that the docstrings stay as they are (they are
also what ``help()`` and the doctests read):

- a role naming an object becomes an *optional* cross-reference: a link where the object is on the
  site, plain code where it is not (no warning either way, so private helpers may be named);
- ``:math:`x``` becomes ``$x$`` and a ``.. math::`` block a ``$$`` block (``pymdownx.arithmatex``);
- ``Example::`` and its indented block become an "Example" section holding a fenced code block
  (``pycon`` for doctests), and any other ``text::`` a paragraph ending in ``:`` and a fenced block.

Loaded by ``mkdocs.yml`` (``extensions:`` of the mkdocstrings Python handler).
"""

from __future__ import annotations

import html
import re
import textwrap
from typing import Any

from griffe import Alias, Extension, Object

_ROLE = re.compile(r":(?P<role>class|func|meth|mod|attr|data|exc|obj):`(?P<target>[^`]+)`")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>.*)$")
_LITERAL = re.compile(r"^(?P<indent>[ \t]*)(?P<text>\S.*?)::[ \t]*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The lines from ``start`` indented deeper than ``indent`` (blank lines inside kept), and the index after them."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    while end > start and not lines[end - 1].strip():  # trailing blank lines belong to what follows
        end -= 1
    return lines[start:end], end


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_BLOCK.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body, i = _block(lines, i + 1, len(indent))
        tex = [match["inline"]] if match["inline"].strip() else []
        tex += textwrap.dedent("\n".join(body)).strip("\n").splitlines()
        out += ["", f"{indent}$$", *(f"{indent}{line}" for line in tex), f"{indent}$$", ""]
    return out


def _literal_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _LITERAL.match(lines[i])
        if not match or match["text"].startswith(".."):
            out.append(lines[i])
            i += 1
            continue
        indent, text = match["indent"], match["text"]
        body, end = _block(lines, i + 1, len(indent))
        code = textwrap.dedent("\n".join(body)).strip("\n").splitlines()
        if not code:  # a `::` with nothing under it: leave the line alone
            out.append(lines[i])
            i += 1
            continue
        language = "pycon" if any(line.lstrip().startswith(">>>") for line in code) else "python" if text in ("Example", "Examples") else "text"
        fence = [f"```{language}", *code, "```"]
        if text in ("Example", "Examples"):  # a Google-style section: its content indented under it
            out += [f"{indent}{text}:", *(f"{indent}    {line}" if line else "" for line in fence)]
        else:
            out += [f"{indent}{text}:", "", *(f"{indent}{line}" if line else "" for line in fence)]
        i = end
    return out


class RstToMarkdown(Extension):
    """Rewrite each docstring of the package once it is loaded (see the module's docstring)."""

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = self.rewrite(obj.docstring.value, obj)
            stack.extend(member for member in obj.members.values() if not isinstance(member, Alias))

    def rewrite(self, text: str, obj: Object) -> str:
        lines = _literal_blocks(_math_blocks(text.splitlines()))
        text = "\n".join(lines)
        text = _MATH_ROLE.sub(lambda m: f"${m['tex']}$", text)
        return _ROLE.sub(lambda m: self._reference(m["target"], obj), text)

    @staticmethod
    def _reference(target: str, obj: Object) -> str:
        short = target.startswith("~")
        name = target.lstrip("~").removesuffix("()")
        title = name.rsplit(".", 1)[-1] if short else name
        identifier = name
        if "." not in name or not name.startswith("lightning_kd"):
            try:  # a name relative to the docstring's object: its members, its module's names
                head, _, rest = name.partition(".")
                identifier = obj.resolve(head) + (f".{rest}" if rest else "")
            except Exception:  # not found here: the reference stays plain code
                identifier = name
        return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(title)}</code></autoref>'
