"""Docstrings, comments and recipes cite public sources (papers, reports, public repositories by name and path), never
files outside the repository: a reader of hybridmoe has no `../shared/` folder.

Every file under src/ and recipes/ (and the two READMEs) is one case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = (b"../shared", b"shared/reference")


def _files() -> list[str]:
    found = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    for top in ("src", "recipes"):
        found += [p for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(str(p.relative_to(ROOT)) for p in found if p.exists())


def test_the_check_sees_the_package_and_the_recipes():
    files = _files()
    assert "src/hybridmoe/modeling.py" in files and any(f.startswith("recipes/") for f in files)


@pytest.mark.parametrize("path", _files())
def test_no_reference_to_files_outside_the_repository(path):
    lines = (ROOT / path).read_bytes().splitlines()
    hits = [n for n, line in enumerate(lines, 1) if any(pattern in line for pattern in FORBIDDEN)]
    assert not hits, f"{path} points outside the repository (lines {hits}): cite the public source instead"
