"""The documentation is complete and builds: docstrings, API reference, pages, figures.

- every name in ``pyro_nf.__all__`` has a docstring with an ``Examples`` section holding
  a ``>>>`` example, and is rendered in the API reference;
- every page in the ``mkdocs.yml`` nav and every image the pages embed exists;
- the Getting-started example runs;
- ``mkdocs build --strict`` succeeds (when mkdocs is installed).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyro_nf

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC = sorted(pyro_nf.__all__)


def _defining_modules() -> dict[str, str]:
    """Public name -> the module ``pyro_nf`` loads it from."""
    return dict(pyro_nf._EXPORTS)


def _attribute_docstring(module_name: str, name: str) -> str | None:
    """The string literal right after ``name = ...`` at the top of a module (as griffe reads
    it), or None."""
    source = inspect.getsource(importlib.import_module(module_name))
    body = ast.parse(source).body
    for node, following in zip(body, body[1:], strict=False):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                return following.value.value
            return None
    return None


def _docstring(name: str) -> str | None:
    obj = getattr(pyro_nf, name)
    if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
        return obj.__doc__  # not inspect.getdoc: a class must not borrow its base's docstring
    return _attribute_docstring(_defining_modules()[name], name)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring_with_an_example(name):
    doc = _docstring(name)
    assert doc, f"pyro_nf.{name} has no docstring"
    section = re.search(r"^\s*Examples\n\s*-{3,}\n(.*)", doc, flags=re.M | re.S)
    assert section, f"pyro_nf.{name}: the docstring needs an 'Examples' section (numpy style)"
    assert ">>>" in section.group(1), f"pyro_nf.{name}: the Examples section has no >>> line"


def _api_entries() -> dict[str, str]:
    """``::: identifier`` entries of docs/api.md with the option lines that follow each."""
    entries: dict[str, str] = {}
    current = None
    for line in (DOCS / "api.md").read_text().splitlines():
        match = re.match(r":::\s*(\S+)", line)
        if match:
            current = match.group(1)
            entries[current] = ""
        elif current and line.startswith((" ", "\t")):
            entries[current] += line + "\n"
        else:
            current = None
    return entries


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_in_the_api_reference(name):
    entries = _api_entries()
    module = _defining_modules().get(name, "")
    direct = {f"pyro_nf.{name}", f"{module}.{name}"} & set(entries)
    via_module = module in entries and (
        "members:" not in entries[module] or re.search(rf"\b{name}\b", entries[module])
    )
    assert direct or via_module, (
        f"pyro_nf.{name} (from {module}) is not in docs/api.md: add '::: {module}' "
        f"(or '::: {module}.{name}')"
    )


def _nav_pages() -> list[str]:
    return re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)


def test_every_nav_page_exists():
    pages = _nav_pages()
    assert "index.md" in pages and "api.md" in pages
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"pages in the mkdocs.yml nav but not in docs/: {missing}"


def test_every_embedded_image_exists():
    missing = []
    for page in DOCS.glob("**/*.md"):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", page.read_text()):
            if "://" not in target and not (page.parent / target).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, f"images not found (regenerate them, see docs/examples.md): {missing}"


@pytest.mark.slow
def test_getting_started_example_runs(capsys):
    text = (DOCS / "index.md").read_text()
    code = next(
        block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "fit(" in block
    )
    exec(compile(code, "docs/index.md", "exec"), {"__name__": "getting_started"})
    out = capsys.readouterr().out
    assert math.isfinite(float(re.search(r"k-hat (\S+)", out).group(1)))
    slope = float(re.search(r"^slope\s+(\S+)", out, flags=re.M).group(1))
    assert 0.3 < slope < 0.8, "the fitted slope should be near the true 0.5"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    api = (site / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="(pyro_nf\.[\w.]+)"', api))
    unrendered = [name for name in PUBLIC if not any(a.endswith(f".{name}") for a in anchors)]
    assert not unrendered, f"public names missing from the rendered API reference: {unrendered}"
    raw = [
        f"{page.relative_to(site)}: {match.group(0)}"
        for page in site.glob("**/*.html")
        for match in _RAW_ROLE.finditer(_visible_text(page.read_text()))
    ]
    assert not raw, f"reST roles rendered as plain text (use `Name` or $math$): {raw[:10]}"


#: A Sphinx role such as :class:`x`, which mkdocs renders literally (as ":class:x", the
#: backticks turned into a code span).
_RAW_ROLE = re.compile(r":(?:class|func|meth|mod|math|data|attr|obj|exc|ref):`?[^\s`<]+")


def _visible_text(html: str) -> str:
    """The page without tags, so that a role in visible text is found wherever it sits."""
    return re.sub(r"<[^>]+>", "", re.sub(r"<(script|style)\b.*?</\1>", "", html, flags=re.S))
