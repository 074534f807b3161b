"""docs/ARCHITECTURE.md matches the code: every module is in its map, and every ``file:function`` it names exists.

The page is how a newcomer (or a security reviewer) finds their way; a page that names moved or deleted code is
worse than none. Static checks only: ``ast`` on the sources, nothing imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedshield"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
#: `path/to/file.py:name` or `path/to/file.py:Class.method` in backticks.
_REFERENCE = re.compile(r"`([a-z_/]+\.py):([A-Za-z_][A-Za-z0-9_.]*)`")
_MODULE_ENTRY = re.compile(r"^- `([a-z_/]+\.py)`:", re.MULTILINE)


def _modules() -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def _defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assignments, and ``Class.method`` for every method."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_the_module_map_lists_every_module_and_no_other() -> None:
    """Every module (and every package ``__init__`` with a docstring) has its line; no line names a gone module."""
    text = DOC.read_text()
    mapped = set(_MODULE_ENTRY.findall(text[text.index("## Module map"):]))
    # a package's __init__ is listed when it says something (a docstring); the modules always
    required = {m for m in _modules() if not m.endswith("__init__.py") or ast.get_docstring(ast.parse((PACKAGE / m).read_text()))}
    missing = sorted(required - mapped)
    stale = sorted(mapped - _modules())
    assert not missing, f"docs/ARCHITECTURE.md's module map lacks {missing}: add a line for each"
    assert not stale, f"docs/ARCHITECTURE.md's module map names modules that are gone: {stale}"


def test_every_file_and_function_the_page_names_exists() -> None:
    wrong = []
    for path, name in _REFERENCE.findall(DOC.read_text()):
        source = PACKAGE / path
        if not source.is_file():
            wrong.append(f"{path} (no such file)")
        elif name not in _defined_names(source):
            wrong.append(f"{path}:{name} (not defined there)")
    assert not wrong, "docs/ARCHITECTURE.md names code that does not exist: " + ", ".join(sorted(set(wrong)))


#: ``tests/test_x.py`` or ``tests/test_x.py::test_name``, as the threat model, the reliability page and the README
#: cite the test that proves a claim.
_TEST_REFERENCE = re.compile(r"tests/(test_[a-z_0-9]+\.py)(?:::([A-Za-z_][A-Za-z0-9_]*))?")


def test_every_test_a_document_cites_exists() -> None:
    """A defence whose cited test was renamed or never written is a claim without proof."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    missing = []
    for doc in documents:
        for file, name in _TEST_REFERENCE.findall(doc.read_text(encoding="utf-8")):
            path = ROOT / "tests" / file
            if not path.is_file() or (name and name not in _defined_names(path)):
                missing.append(f"{doc.relative_to(ROOT)}: tests/{file}{'::' + name if name else ''}")
    assert not missing, "documents cite tests that do not exist:\n" + "\n".join(sorted(set(missing)))
