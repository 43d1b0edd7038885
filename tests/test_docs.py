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


# --- hand-written lists of the flow families agree with the registry -------------------

#: How prose names each family with layers (a family registered without an entry here
#: fails `test_every_family_has_prose_names`, so the list checks below cover it too).
FAMILY_WORDS = {
    "planar": r"planar",
    "radial": r"radial",
    "iaf": r"iaf|affine autoregressive|inverse[- ]autoregressive",
    "spline": r"(?:neural[- ])?spline",
    "coupling": r"coupling|realnvp",
}


def _families() -> set[str]:
    from pyro_nf.flows import FLOWS

    return set(FLOWS) - {"none"}  # the empty flow has no guide, row or mention of its own


def _named_guides() -> dict[str, str]:
    """Guide class name -> its family, for the named guides `pyro_nf` exports."""
    from pyro_nf.autoguides import AutoFlow

    guides = {}
    for name in pyro_nf.__all__:
        obj = getattr(pyro_nf, name)
        if inspect.isclass(obj) and issubclass(obj, AutoFlow) and obj.flow_name:
            guides[name] = obj.flow_name
    return guides


def test_every_family_has_prose_names():
    assert set(FAMILY_WORDS) == _families()


def test_every_family_has_one_named_guide():
    guides = _named_guides()
    assert sorted(guides.values()) == sorted(_families()), guides


def _family_table(page: str) -> dict[str, dict[str, str]]:
    """The rows of the page's table of guides (the one with a 'default Adam lr' column)."""
    lines = (ROOT / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "default Adam lr" in line)
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        values = [cell.strip() for cell in line.strip().strip("|").split("|")]
        cells = dict(zip(header, values, strict=True))
        rows[cells["guide"].strip("`")] = cells
    return rows


@pytest.mark.parametrize("page", ["README.md", "docs/choosing.md"])
def test_the_table_of_guides_lists_every_family_with_its_defaults(page):
    from pyro_nf.flows import FLOWS

    rows, guides = _family_table(page), _named_guides()
    assert set(rows) == set(guides), f"{page}: the table of guides and pyro_nf's differ"
    for guide, cells in rows.items():
        spec = FLOWS[guides[guide]]
        lr = f"{spec.lr:.0e}".replace("e-0", "e-")
        assert cells["default layers"] == str(spec.num_layers), (page, guide)
        assert cells["default Adam lr"] == lr, (page, guide)
        if "options" in cells:
            named = set(re.findall(r"`(\w+)(?:=[^`]*)?`", cells["options"]))
            assert set(spec.options) <= named, (page, guide, cells["options"])


_TOKEN = r"[`\"']*(?:{})[`\"']*"
_SEPARATOR = r"(?:\s*,\s*(?:or\s+|and\s+)?|\s+(?:or|and)\s+)"


def _lists_of_families(text: str) -> list[tuple[str, set[str]]]:
    """Each run of three or more family or guide names in `text` (`a, b or c`), with the
    families named on the lines it spans."""
    names = {family: [words] for family, words in FAMILY_WORDS.items()}
    for guide, family in _named_guides().items():
        names[family].append(guide)
    any_name = _TOKEN.format("|".join(w for words in names.values() for w in words))
    run = re.compile(rf"{any_name}(?:{_SEPARATOR}{any_name}){{2,}}", re.I)
    found = []
    for match in run.finditer(text):
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        lines = text[start : None if end < 0 else end]
        named = {f for f, words in names.items() if re.search("|".join(words), lines, re.I)}
        found.append((match.group(0), named))
    return found


def _text_files() -> list[Path]:
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]
    return pages + sorted((ROOT / "pyro_nf").rglob("*.py"))


def test_lists_of_families_in_prose_name_every_family():
    """A list of three or more families names all of them (or all those with networks)."""
    from pyro_nf.flows import FLOWS

    with_networks = {name for name, spec in FLOWS.items() if "hidden_dims" in spec.options}
    stale = [
        f"{path.relative_to(ROOT)}: {text!r} lacks {sorted(_families() - named)}"
        for path in _text_files()
        for text, named in _lists_of_families(path.read_text())
        if named != _families() and named != with_networks
    ]
    assert not stale, "lists of flow families missing some (write them from FLOWS):\n" + (
        "\n".join(stale)
    )
