"""MkDocs hook: the pages that are generated from the code, so that they cannot drift from it.

- docs/index.md's `<!-- readme -->` becomes the repository's README.md, its links made relative to
  docs/ (the site's home page and the repository's front page are one text).
- docs/configuration.md's `<!-- config-reference -->` becomes one table per config slice, read from
  rlsys/config.py: every key with its type, its default, what load_config allows (rlsys.config's
  CHOICES, LOWER_BOUNDS, RANGES) and its field docstring, then the slice's rules across keys
  (rlsys.config.RULES). A key without a docstring fails the build, naming it.
- docs/metrics.md's table of metric keys is checked, not generated (the keys come from a run):
  tests/test_cli.py holds every key a real run writes against it.

Run by `./dev.sh docs` (mkdocs build --strict); tests/test_docs.py builds the site the same way.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
from pathlib import Path

CONFIG_SOURCE = Path(importlib.util.find_spec("rlsys.config").origin)  # the rlsys the build imports
MARKER = "<!-- config-reference -->"
README_MARKER = "<!-- readme -->"


class UndocumentedKeys(Exception):
    """A config key the reference cannot document (mkdocs stops the build with it)."""


def field_docstrings(source: str) -> dict[str, dict[str, str]]:
    """class name -> field name -> the string literal right below the field (its docstring).

    >>> field_docstrings('@dataclass\\nclass A:\\n    x: int = 1\\n    \"\"\"The x.\"\"\"\\n    y: int = 2\\n')
    {'A': {'x': 'The x.'}}
    """
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        found = docs.setdefault(node.name, {})
        for this, below in zip(node.body, node.body[1:] + [None]):
            if (isinstance(this, ast.AnnAssign) and isinstance(this.target, ast.Name) and isinstance(below, ast.Expr)
                    and isinstance(below.value, ast.Constant) and isinstance(below.value.value, str)):
                found[this.target.id] = inspect.cleandoc(below.value.value)
    return {name: found for name, found in docs.items() if found}


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped; outside `code`, no <name> read as an HTML tag and no
    a * b as emphasis.

    >>> _cell("a * b in <run_dir>, `x<y`\\n  | c")
    'a \\\\* b in &lt;run_dir>, `x<y` \\\\| c'
    """
    parts = " ".join(text.split()).split("`")
    parts[::2] = [p.replace("<", "&lt;").replace("*", "\\*") for p in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def _value(value: object) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value!r}`"


def rows(cls: type, prefix: str, docs: dict[str, dict[str, str]], missing: list[str]
         ) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, what it does, checked) for every leaf key under cls; a nested slice is
    flattened (reward.code.wall_s). Keys without a docstring go to `missing`."""
    from rlsys.config import key_checks

    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        default = _default(f)
        if dataclasses.is_dataclass(default):
            out += rows(type(default), key, docs, missing)
            continue
        doc = docs.get(cls.__name__, {}).get(f.name)
        if not doc:
            missing.append(f"{key} ({cls.__name__}.{f.name} in rlsys/config.py)")
            continue
        out.append((key, str(f.type), _value(default), doc, "; ".join(key_checks(key))))
    return out


def config_reference() -> str:
    """The markdown of every config slice's table; UndocumentedKeys names every key without a docstring."""
    from rlsys import config

    docs = field_docstrings(CONFIG_SOURCE.read_text())
    missing: list[str] = []
    parts = []
    for top in dataclasses.fields(config.Config):
        cls = type(_default(top))
        intro = inspect.cleandoc(cls.__doc__) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        table = rows(cls, top.name, docs, missing)
        parts += [f"## `{top.name}`", "", *([intro, ""] if intro else []),
                  "| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        parts += [f"| `{key}` | `{_cell(kind)}` | {default} | {_cell(checked)} | {_cell(doc)} |"
                  for key, kind, default, doc, checked in table]
        parts.append("")
        across = [r for r in config.RULES if r.keys[0].split(".")[0] == top.name]
        if across:
            parts += ["Checked across keys (`rlsys.config.RULES`; a run that breaks one stops before any actor starts):", ""]
            parts += [f"- {_cell(r.says)}" for r in across]
            parts.append("")
    if missing:
        raise UndocumentedKeys("config keys without a docstring (a string literal right below the field): "
                             + ", ".join(missing))
    return "\n".join(parts)


def readme_for_docs(text: str) -> str:
    """README.md as a page of docs/: links into docs/ lose the prefix.

    >>> readme_for_docs("[Concepts](docs/concepts.md) ![plot](docs/a.png) `docs/x`")
    '[Concepts](concepts.md) ![plot](a.png) `docs/x`'
    """
    return text.replace("](docs/", "](")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs' hook signature)
    if README_MARKER in markdown:
        readme = Path(config["config_file_path"]).parent / "README.md"
        markdown = markdown.replace(README_MARKER, readme_for_docs(readme.read_text()))
    if MARKER not in markdown:
        return markdown
    from mkdocs.exceptions import PluginError

    try:
        return markdown.replace(MARKER, config_reference())
    except UndocumentedKeys as e:
        raise PluginError(f"{page.file.src_path}: {e}") from None
