"""Package metadata: one version, read from the distribution."""

import importlib.metadata
import pathlib


try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import dphys
from dphys import _version


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject_version():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def test_version_comes_from_the_package_metadata():
    assert dphys.__version__ == importlib.metadata.version("dphys")
    assert dphys.__version__ == _pyproject_version()


def test_version_of_an_uninstalled_checkout_is_pyprojects(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert _version.version() == _pyproject_version()
