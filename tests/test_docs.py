"""The docs cannot drift silently: every markdown link, repository path, test name and ``docs/…§N`` citation
in README.md, docs/ and the code's docstrings and comments points at something that exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CODE = [p for folder in ("fewstep", "objectives", "backbones", "kernels", "recipes", "scripts", "tests")
        for p in sorted((ROOT / folder).rglob("*.py")) if p.name != "test_docs.py"]   # not its own examples
TOP = ("fewstep", "objectives", "backbones", "kernels", "recipes", "tests", "docs", "scripts")

LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(r"`((?:%s)/[\w./-]+?)(?:::([\w…\[\]-]+))?`" % "|".join(TOP))
TEST_REF = re.compile(r"`(test_\w+\.py)::(\w+)(…)?")
CITATION = re.compile(r"(docs/[\w/-]+\.md)(?:`{0,2})?\s*§\s*(\d+(?:\.\d+)*)")
DOC_PATH = re.compile(r"\b(docs/[\w/-]+\.md)\b")


def _exists(target: str, base: Path) -> bool:
    target = target.split("#")[0].rstrip(".,;:")
    return not target or (base / target).exists() or (ROOT / target).exists()


def _headings(doc: Path) -> set[str]:
    """Section numbers of a markdown file's headings (``### 2.3 Title`` → ``2.3``)."""
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#+\s+§?(\d+(?:\.\d+)*)\.?\s", doc.read_text(), re.M)}


def _defined(file: Path) -> set[str]:
    """Names of the functions and classes a Python file defines (tests, methods included)."""
    return set(re.findall(r"^\s*(?:async )?(?:def|class) (\w+)", file.read_text(), re.M))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_paths_and_test_names_in_the_docs_resolve(doc):
    text = doc.read_text()
    missing = [t for t in LINK.findall(text) if "://" not in t and not t.startswith("mailto:")
               and not _exists(t, doc.parent)]
    for path, test in PATH.findall(text):
        if "<" in path or "*" in path:
            continue
        if not _exists(path, ROOT):
            missing.append(path)
        elif test and path.endswith(".py") and not any(n.startswith(test.rstrip("…").split("[")[0])
                                                       for n in _defined(ROOT / path)):
            missing.append(f"{path}::{test}")
    for file, test, prefix in TEST_REF.findall(text):
        names = _defined(ROOT / "tests" / file) if (ROOT / "tests" / file).is_file() else set()
        if not any(n == test or (prefix and n.startswith(test)) for n in names):
            missing.append(f"{file}::{test}{prefix}")
    assert not missing, f"{doc.relative_to(ROOT)} points at what does not exist: {missing}"


def test_design_citations_in_code_and_docs_resolve():
    bad = []
    for file in CODE + DOCS:
        text = file.read_text()
        for doc, section in CITATION.findall(text):
            target = ROOT / doc
            if not target.is_file():
                bad.append(f"{file.relative_to(ROOT)}: {doc} (no such file)")
            elif section not in _headings(target):
                bad.append(f"{file.relative_to(ROOT)}: {doc} §{section} (no such section)")
        for doc in DOC_PATH.findall(text):
            if not (ROOT / doc).is_file():
                bad.append(f"{file.relative_to(ROOT)}: {doc} (no such file)")
    assert not bad, "citations that do not resolve:\n" + "\n".join(bad)


def test_the_checker_finds_what_is_missing(tmp_path):
    """The patterns above match what they must (a checker that matches nothing would pass everything)."""
    text = ("see [speed](speed.md), `fewstep/nowhere.py`, `test_faults.py::test_nothing_like_this`, "
            "docs/design/tvm.md §99.9 and docs/design/tvm.md §2")
    assert LINK.findall(text) == ["speed.md"]
    assert PATH.findall(text) == [("fewstep/nowhere.py", "")]
    assert TEST_REF.findall(text) == [("test_faults.py", "test_nothing_like_this", "")]
    assert CITATION.findall(text) == [("docs/design/tvm.md", "99.9"), ("docs/design/tvm.md", "2")]
    assert "2" in _headings(ROOT / "docs/design/tvm.md") and "99.9" not in _headings(ROOT / "docs/design/tvm.md")
