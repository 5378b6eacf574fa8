"""Imports go one way: dphys <- pdes <- assimilation, and inside assimilation the DA
maths <- the learning layer, the I/O edge <- the run edge <- the command line."""

import ast
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"dphys": {"pdes", "assimilation"}, "pdes": {"assimilation"}}

# Inside assimilation: which modules a group of files must not import (a module and
# everything below it, e.g. "assimilation.io" also bans "assimilation.io._units").
EDGES = ("xarray", "assimilation.io", "assimilation.runs", "assimilation.cli")
WALLS = {
    # the DA maths: the top-level private modules of assimilation
    "maths": (
        lambda p: p.parent == ROOT / "assimilation" and p.name != "cli.py",
        EDGES,
    ),
    # the learning layer takes pytrees, never files
    "learn": (lambda p: (ROOT / "assimilation" / "learn") in p.parents, EDGES),
    # the I/O edge reads and writes; it never runs anything
    "io": (
        lambda p: (ROOT / "assimilation" / "io") in p.parents,
        ("assimilation.runs", "assimilation.cli", "assimilation.learn"),
    ),
    "runs": (
        lambda p: (ROOT / "assimilation" / "runs") in p.parents,
        ("assimilation.cli",),
    ),
}


def _module_name(path: pathlib.Path) -> str:
    if ROOT not in path.parents:
        return path.stem  # a file outside the tree: only absolute imports resolve
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported_modules(path: pathlib.Path, source: str | None = None) -> set[str]:
    """Every module ``path`` imports (statically, anywhere in the file), absolute."""
    tree = ast.parse(path.read_text() if source is None else source)
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            # `from . import io` imports the submodule `io`
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def _imported_top_levels(path: pathlib.Path) -> set[str]:
    return {m.split(".")[0] for m in _imported_modules(path)}


def _violations(path: pathlib.Path, banned, source: str | None = None) -> list[str]:
    return sorted(
        m
        for m in _imported_modules(path, source)
        if any(m == b or m.startswith(b + ".") for b in banned)
    )


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


@pytest.mark.parametrize("wall", sorted(WALLS))
def test_assimilation_walls(wall):
    selects, banned = WALLS[wall]
    files = [f for f in sorted((ROOT / "assimilation").rglob("*.py")) if selects(f)]
    assert files, f"no sources found for {wall}"
    offenders = {str(f.relative_to(ROOT)): _violations(f, banned) for f in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{wall} must not import {banned}: {offenders}"


def test_detector_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import assimilation.cli\nfrom pdes import Heat\n")
    assert _imported_top_levels(bad) == {"assimilation", "pdes"}


def test_wall_detector_resolves_relative_imports():
    """A relative import of the edges from the maths or the learning room is seen."""
    maths = ROOT / "assimilation" / "_somewhere.py"
    learn = ROOT / "assimilation" / "learn" / "_somewhere.py"
    for path, source, bad in (
        (maths, "from .io import read_field\n", "assimilation.io"),
        (maths, "from . import runs\n", "assimilation.runs"),
        (maths, "def f():\n    import xarray as xr\n", "xarray"),
        (learn, "from ..cli import main\n", "assimilation.cli"),
        (learn, "from ..io._units import convert_units\n", "assimilation.io._units"),
    ):
        assert bad in _violations(path, EDGES, source), source
        assert WALLS["learn" if "learn" in path.parts else "maths"][0](path)
    assert _violations(maths, EDGES, "from ._cost import FourDVar\n") == []


def test_import_assimilation_loads_no_edge():
    """`import assimilation` (the maths) loads neither xarray nor an edge package."""
    code = (
        "import sys, assimilation, assimilation.learn; "
        "bad = [m for m in sys.modules if m == 'xarray' or "
        "m.startswith(('assimilation.io', 'assimilation.runs', 'assimilation.cli'))]; "
        "assert not bad, bad"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


# xarray and netCDF are imported only at the I/O edges: in the
# core only by dphys/io.py, never by pdes.
IO_LIBRARIES = ("xarray", "netCDF4", "h5netcdf", "cftime")
IO_EDGES = {ROOT / "dphys" / "io.py"}


@pytest.mark.parametrize("package", ["dphys", "pdes"])
def test_core_numerics_import_no_io_library(package):
    files = [f for f in sorted((ROOT / package).rglob("*.py")) if f not in IO_EDGES]
    assert files, f"no sources found for {package}"
    offenders = {str(f.relative_to(ROOT)): _violations(f, IO_LIBRARIES) for f in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"only dphys/io.py may import {IO_LIBRARIES}: {offenders}"
    # the detector sees a function-level import in a core file
    bad = "def f():\n    import netCDF4\n"
    assert _violations(files[0], IO_LIBRARIES, bad) == ["netCDF4"]
