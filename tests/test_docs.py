"""The documentation site (mkdocs.yml, docs/) builds in strict mode, and its pages that describe the
code hold to it: the configuration reference is generated from rlsys/config.py and refuses a key
without a docstring, a broken link fails the build, and every message the troubleshooting page
explains is one the code still writes. (The metrics table is checked against a real run's keys in
tests/test_cli.py.) No Ray, no torch: a few seconds per build."""

import ast
import dataclasses
import doctest
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def _hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def _copy_site_sources(tmp_path: Path) -> Path:
    """mkdocs.yml, README.md and docs/ copied, so a test can break a page without touching the repository's."""
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    return tmp_path / "mkdocs.yml"


def _leaf_keys(cls, prefix: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys += (_leaf_keys(type(default), f"{prefix}{f.name}.") if dataclasses.is_dataclass(default)
                 else [f"{prefix}{f.name}"])
    return keys


def test_the_site_builds_strictly_with_every_config_key_in_its_reference(tmp_path):
    from rlsys.config import Config

    proc = _build(REPO / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    keys = _leaf_keys(Config, "")
    assert len(keys) > 150 and "reward.code.wall_s" in keys
    missing = [k for k in keys if f"<code>{k}</code>" not in page]
    assert not missing, f"keys missing from the built configuration reference: {missing}"
    from rlsys.config import RULES

    text = re.sub(r"<[^>]+>", "", page)
    unprinted = [r.says for r in RULES if r.says.replace("<", "&lt;").replace(">", "&gt;")[:60] not in text]
    assert len(RULES) > 20 and not unprinted, f"rules missing from the configuration reference: {unprinted}"
    home = (tmp_path / "site" / "index.html").read_text()
    assert "What sets it apart" in home and 'href="concepts/"' in home, "the home page is README.md, linked into the site"
    for name in ("index", "quickstart", "concepts", "benchmarks", "troubleshooting", "metrics"):
        path = tmp_path / "site" / ("" if name == "index" else name) / "index.html"
        assert path.is_file(), f"no page {name} in the built site"


def test_a_broken_link_fails_the_strict_build(tmp_path):
    config = _copy_site_sources(tmp_path)
    page = tmp_path / "docs" / "quickstart.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    proc = _build(config, tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stdout + proc.stderr


def test_a_config_key_without_a_docstring_fails_the_build(tmp_path, monkeypatch):
    from mkdocs.exceptions import PluginError

    hook = _hook()
    source = hook.CONFIG_SOURCE.read_text()
    documented = '    lr: float = 1e-6\n    """AdamW\'s peak learning rate'
    assert documented in source
    undocumented = tmp_path / "config.py"
    undocumented.write_text(source.replace(documented, '    lr: float = 1e-6\n    #"""AdamW\'s peak learning rate', 1))
    monkeypatch.setattr(hook, "CONFIG_SOURCE", undocumented)
    page = type("Page", (), {"file": type("File", (), {"src_path": "configuration.md"})()})()
    with pytest.raises(PluginError, match=r"configuration.md: config keys without a docstring.*learner\.lr "
                                          r"\(LearnerConfig\.lr in rlsys/config.py\)"):
        hook.on_page_markdown(f"# c\n\n{hook.MARKER}\n", page, {}, None)
    monkeypatch.setattr(hook, "CONFIG_SOURCE", REPO / "rlsys" / "config.py")
    text = hook.on_page_markdown(f"# c\n\n{hook.MARKER}\n", page, {}, None)
    assert "| `learner.lr` | `float` | `1e-06` | > 0 | AdamW's peak learning rate" in text


def test_the_reference_hook_examples_run():
    result = doctest.testmod(_hook())
    assert result.attempted == 3 and result.failed == 0


def _messages() -> list[str]:
    """Every string the package writes, f-strings with each `{...}` as NUL (pieces joined as Python joins them)."""
    out = []
    for path in (REPO / "rlsys").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                out.append("".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values))
    return out


def test_every_message_the_troubleshooting_page_explains_is_written_by_the_code():
    headings = re.findall(r"^### `(.+)`$", (DOCS / "troubleshooting.md").read_text(), re.M)
    assert len(headings) >= 20
    messages = _messages()
    gone = [h for h in headings if not any(all(piece.strip() in m for piece in h.split("..."))
                                            for m in messages)]
    assert not gone, f"docs/troubleshooting.md explains messages the code no longer writes: {gone}"
