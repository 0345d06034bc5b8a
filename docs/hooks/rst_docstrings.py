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

    def __init__(self) -> None:
        super().__init__()
        # where a name that a package re-exports is shown: `lightning_kd.losses._reduction.log_probs` is
        # rendered as `lightning_kd.losses.log_probs`, by `::: lightning_kd.losses`
        self.public: dict[str, str] = {}
        self.paths: set[str] = set()  # every object's path
        # a class or function by its name alone, where the package defines one of that name only: what
        # `lightning_kd.DistillationModule` (a lazy export, invisible to static analysis) stands for
        self.unique: dict[str, str | None] = {}

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        objects = self._walk(pkg)
        for obj in objects:
            self.paths.add(obj.path)
            if obj.is_class or obj.is_function:
                self.unique[obj.name] = obj.path if obj.name not in self.unique else None
            exports = set(obj.exports or ()) if obj.is_module and obj.is_init_module else set()
            for member in obj.members.values():  # a package's `__all__` re-exports: where the site shows them
                if isinstance(member, Alias) and member.name in exports:
                    self.public.setdefault(member.target_path, member.path)
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = self.rewrite(obj.docstring.value, obj)

    @staticmethod
    def _walk(pkg: Object) -> list[Object]:
        """Every object of the package (aliases, i.e. imports, left out: their targets are walked where defined)."""
        found: list[Object] = []
        seen: set[int] = set()
        stack: list[Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            found.append(obj)
            stack.extend(member for member in obj.members.values() if not isinstance(member, Alias))
        return found

    def rewrite(self, text: str, obj: Object) -> str:
        lines = _literal_blocks(_math_blocks(text.splitlines()))
        text = "\n".join(lines)
        text = _MATH_ROLE.sub(lambda m: f"${m['tex']}$", text)
        return _ROLE.sub(lambda m: self._reference(m["target"], obj), text)

    def _reference(self, target: str, obj: Object) -> str:
        short = target.startswith("~")
        name = target.lstrip("~").removesuffix("()")
        title = name.rsplit(".", 1)[-1] if short else name
        identifier = name if name.startswith("lightning_kd") else self._relative(name, obj)
        if identifier not in self.paths and identifier.startswith("lightning_kd."):
            identifier = self._by_name(identifier)
        owner, _, attribute = identifier.rpartition(".")
        if identifier in self.public:
            identifier = self.public[identifier]
        elif owner in self.public:  # a method of a re-exported class
            identifier = f"{self.public[owner]}.{attribute}"
        return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(title)}</code></autoref>'

    @staticmethod
    def _relative(name: str, obj: Object) -> str:
        """A name as the docstring's object sees it: its members, then its parents' (an import: where it comes from)."""
        head, _, rest = name.partition(".")
        scope: Object | None = obj
        while scope is not None:
            member = scope.members.get(head)
            if member is not None:
                path = member.target_path if isinstance(member, Alias) else member.path
                return path + (f".{rest}" if rest else "")
            scope = scope.parent
        return name  # not found: the reference stays plain code

    def _by_name(self, identifier: str) -> str:
        """``lightning_kd.X`` or ``lightning_kd.X.method`` for a class or function ``X`` defined once in the package."""
        parts = identifier.split(".")
        for owner in (parts[-1], parts[-2] if len(parts) > 2 else None):
            path = self.unique.get(owner) if owner else None
            if path is not None:
                return path if owner == parts[-1] else f"{path}.{parts[-1]}"
        return identifier
