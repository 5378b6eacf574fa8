"""Imports go one way: dphys <- pdes <- assimilation."""

import ast
import pathlib

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"dphys": {"pdes", "assimilation"}, "pdes": {"assimilation"}}


def _imported_top_levels(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found for {package}"
    offenders = {
        str(f.relative_to(ROOT)): sorted(_imported_top_levels(f) & FORBIDDEN[package])
        for f in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package} must not import {FORBIDDEN[package]}: {offenders}"


def test_detector_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import assimilation.cli\nfrom pdes import Heat\n")
    assert _imported_top_levels(bad) == {"assimilation", "pdes"}
