"""The repository stands on its own: every `docs/methods.md §N` citation resolves to a section of that page,
and nothing points at files outside the repository."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = [p for d in ("src", "tests", "bench", "configs", "docs") for p in (REPO / d).rglob("*")
         if p.suffix in (".py", ".md", ".yaml")] + [REPO / "README.md", REPO / "Makefile"]


def _sections() -> set[str]:
    text = (REPO / "docs" / "methods.md").read_text()
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M)}


def test_every_methods_citation_resolves():
    sections = _sections()
    assert {"1", "1.3", "2.4", "3.9", "4.4"} <= sections
    dead = []
    for p in FILES:
        for m in re.finditer(r"docs/methods\.md[ ,]*§\s*(\d+(?:\.\d+)?)", p.read_text(errors="replace")):
            if m.group(1).rstrip(".") not in sections:
                dead.append(f"{p.relative_to(REPO)}: §{m.group(1)}")
    assert not dead, dead


def test_no_reference_outside_the_repository():
    pattern = re.compile(r"\.\./shared|papers\.md|feasibility\.md|DESIGN\.md|anchors\.md")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in FILES if p.name != "test_docs.py"
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_every_compare_module_exists():
    """`make test-portable` selects the modules named in tests/conftest.py: a renamed module would drop out
    of the second pass without a word."""
    from conftest import COMPARE
    here = Path(__file__).parent
    assert sorted(m for m in COMPARE if not (here / f"{m}.py").exists()) == []
