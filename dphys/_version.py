"""The package version, from the installed distribution's metadata (one source:
``pyproject.toml``)."""

from __future__ import annotations

import importlib.metadata
import pathlib


def version() -> str:
    """The installed ``dphys`` distribution's version; in a checkout that is not
    installed, the version in its ``pyproject.toml``; otherwise ``"0+unknown"``."""
    try:
        return importlib.metadata.version("dphys")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    pyproject = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        with open(pyproject, "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "0+unknown"
