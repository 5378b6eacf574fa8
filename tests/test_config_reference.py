"""Configuration a user can discover: the generated reference, `dphys init`, any
calibratable parameter (velocity too) and closed-basin shallow-water twins."""

import pathlib

import numpy as np
import pytest
import xarray as xr

from assimilation.cli import main
from assimilation.runs import (
    MODELS,
    ConfigError,
    build_run,
    config_reference,
    load_config,
    validate_config,
)
from assimilation.runs._config import tomllib


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_config_md_is_the_generated_reference():
    text = (ROOT / "docs" / "config.md").read_text()
    assert text == config_reference(), (
        "docs/config.md is stale: regenerate it with "
        "python -c 'from assimilation.runs import config_reference as r; "
        'print(r(), end="")\' > docs/config.md'
    )
    # every key of every section and every model parameter is documented
    for key in ("geographic_origin", "precision", "window", "keep_going", "seeds"):
        assert f"| `{key}` |" in text
    for params in MODELS.values():
        for name in params:
            assert f"`{name}`" in text
    assert "docs/config.md" in (ROOT / "README.md").read_text()


def test_help_links_the_reference(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "docs/config.md" in out and "dphys init MODEL" in out


@pytest.mark.parametrize("model", ["heat", "advection", "shallow_water"])
def test_init_writes_a_valid_commented_configuration(tmp_path, model, capsys):
    path = tmp_path / f"{model}.toml"
    assert main(["init", model, "-o", str(path)]) == 0
    text = path.read_text()
    assert text.count("#") > 40  # commented
    cfg = load_config(path)  # valid as written
    assert cfg["model"]["name"] == model and cfg["batch"]["seeds"] == [0, 1, 2]
    tomllib.loads(text)
    # refuses to overwrite
    assert main(["init", model, "-o", str(path)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_init_heat_runs_as_is_with_assimilate_and_batch(tmp_path, capsys):
    path = tmp_path / "heat.toml"
    assert main(["init", "heat", "-o", str(path)]) == 0
    assert main(["assimilate", str(path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "truth within ±2σ" in out and (tmp_path / "heat-analysis.nc").is_file()
    assert (tmp_path / "heat.png").is_file()
    assert main(["batch", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 done, 0 skipped" in out
    # [output] figure is honoured in batch: one figure per case
    for seed in range(3):
        assert (tmp_path / "heat-batch" / f"seed-{seed}.png").is_file()


def test_velocity_is_calibratable_from_toml(tmp_path, capsys):
    path = tmp_path / "adv.toml"
    assert main(["init", "advection", "-o", str(path)]) == 0
    text = path.read_text().replace("max_iterations = 5", "max_iterations = 3")
    path.write_text(text)
    assert main(["assimilate", str(path), "-q"]) == 0
    with xr.open_dataset(tmp_path / "advection-analysis.nc") as ds:
        v, std = float(ds["velocity"]), float(ds["velocity_std"])
        assert ds["velocity"].attrs["units"] == "m s-1"
        # truth 0.15, background 0.1: the estimate moved to the truth
        assert abs(v - 0.15) <= 2 * std and abs(v - 0.15) < 0.5 * 0.05
    # 2D: one control per component, named in array order
    cfg = validate_config(tomllib.loads(text))
    cfg["model"]["grid"] = {"shape": [8, 8], "lengths": 1.0, "boundary": "periodic"}
    cfg["model"]["parameters"]["velocity"] = [0.1, 0.2]
    cfg["control"]["parameters"] = {"velocity_x": {"sigma": 0.1}}
    cfg["twin"]["truth"] = {"velocity_x": 0.3}
    setup = build_run(validate_config(cfg))
    assert float(setup.truth_model.velocity[1]) == 0.3
    assert float(setup.truth_model.velocity[0]) == 0.1
    cfg["control"]["parameters"] = {"velocity": {"sigma": 0.1}}
    with pytest.raises(ConfigError, match="Calibratable: velocity_y, velocity_x"):
        validate_config(cfg)


def test_closed_basin_shallow_water_twin_runs_through_the_cli(tmp_path, capsys):
    path = tmp_path / "sw.toml"
    assert main(["init", "shallow_water", "-o", str(path)]) == 0
    text = path.read_text()
    assert 'boundary = "neumann"' in text  # walls at both ends
    cfg = load_config(path)
    setup = build_run(cfg)
    # the truth's draw from B has zero normal velocity on the wall face
    assert float(setup.truth_state0.u[-1]) == 0.0
    assert float(np.abs(setup.truth_state0.u[:-1]).max()) > 0
    fast = text.replace('method = "gauss_newton"', 'method = "lbfgs"').replace(
        "max_iterations = 5", "max_iterations = 1"
    )
    fast = fast.replace("# uncertainty = true", "uncertainty = false")
    path.write_text(fast)
    assert main(["assimilate", str(path), "-q", "--no-figure"]) == 0, (
        capsys.readouterr().err
    )
    with xr.open_dataset(tmp_path / "shallow_water-analysis.nc") as ds:
        assert ds["analysis_u"].attrs["units"] == "m s-1"
        assert ds["analysis_eta"].attrs["units"] == "m"
