"""Every kind of netCDF output is CF-clean.

Two checks per file: the project's own (no string or vlen variables, numeric
coordinate variables without fill values, units and a long or standard name on
every variable, `time` standard names only with a reference date, featureType and
cf_role for station data, scores as variables), and, when it is installed, the CF
checker itself (`cfchecks`, run offline with the minimal tables in
tests/data/cf/), which must report 0 errors and 0 warnings.
"""

import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import netCDF4
import numpy as np
import pytest
import tomllib

import dphys
import dphys.io as dio
import pdes
from assimilation import Observations
from assimilation.cli import demo_config
from assimilation.io import observations_to_dataset
from assimilation.runs import (
    Case,
    init_config,
    output_dataset,
    run,
    run_batch,
    validate_config,
)


TABLES = pathlib.Path(__file__).parent / "data" / "cf"
STANDARD_NAMES = {
    "time",
    "latitude",
    "longitude",
    "projection_x_coordinate",
    "projection_y_coordinate",
    "sea_surface_temperature",
    "sea_surface_height_above_geoid",
    "eastward_sea_water_velocity",
    "northward_sea_water_velocity",
}
MODIFIERS = {"standard_error"}
_SINCE = re.compile(r"^\w+ since \d")


def cf_problems(path) -> list[str]:
    """What the CF conventions (1.8) forbid or require, for dphys's outputs."""
    problems = []
    with netCDF4.Dataset(path) as nc:
        if not str(getattr(nc, "Conventions", "")).startswith("CF-"):
            problems.append("no Conventions = CF-x.y")
        names = set(nc.variables)
        for name, var in nc.variables.items():
            attrs = var.ncattrs()
            where = f"`{name}`"
            if var.dtype is str or isinstance(var.datatype, netCDF4.VLType):
                problems.append(f"{where} is a string (vlen) variable")
                continue
            is_char = var.dtype.kind == "S"
            if var.dimensions == (name,):  # a coordinate variable
                if is_char or not np.issubdtype(var.dtype, np.number):
                    problems.append(f"coordinate {where} is not numeric")
                if "_FillValue" in attrs:
                    problems.append(f"coordinate {where} has a _FillValue")
                values = var[:]
                if values.size > 1 and not (
                    np.all(np.diff(values) > 0) or np.all(np.diff(values) < 0)
                ):
                    problems.append(f"coordinate {where} is not monotonic")
            if "long_name" not in attrs and "standard_name" not in attrs:
                problems.append(f"{where} has neither long_name nor standard_name")
            if not is_char and "units" not in attrs:
                problems.append(f"{where} has no units")
            std = getattr(var, "standard_name", None)
            if std is not None:
                std, *modifier = str(std).split()
                if std not in STANDARD_NAMES or not set(modifier) <= MODIFIERS:
                    problems.append(f"{where}: unknown standard_name {std!r}")
            if std == "time" and not _SINCE.match(str(getattr(var, "units", ""))):
                problems.append(f"{where}: standard_name time without a date")
            axis = getattr(var, "axis", None)
            if axis is not None and axis not in ("X", "Y", "Z", "T"):
                problems.append(f"{where}: axis {axis!r}")
            for ref in str(getattr(var, "coordinates", "")).split():
                if ref not in names:
                    problems.append(f"{where}: coordinates names missing `{ref}`")
        if "station" in nc.dimensions:
            if getattr(nc, "featureType", None) != "timeSeries":
                problems.append("station data without featureType = timeSeries")
            roles = [v for v in nc.variables.values() if "cf_role" in v.ncattrs()]
            if not roles:
                problems.append("station data without a cf_role variable")
        for score in str(getattr(nc, "dphys_scores", "")).split():
            if score not in nc.variables:
                problems.append(f"score `{score}` is not a variable")
    return problems


def cfchecks(path) -> str | None:
    """The CF checker's summary lines, or None if it is not installed."""
    beside = pathlib.Path(sys.executable).parent / "cfchecks"
    exe = str(beside) if beside.is_file() else shutil.which("cfchecks")
    if exe is None or importlib.util.find_spec("cfchecker") is None:
        return None
    proc = subprocess.run(
        [
            exe,
            "-s",
            str(TABLES / "standard-names.xml"),
            "-a",
            str(TABLES / "area-types.xml"),
            "-r",
            str(TABLES / "region-names.xml"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if "udunits" in proc.stderr.lower() and proc.returncode:
        return None  # installed without the UDUNITS-2 library it needs
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One file of every kind dphys writes."""
    root = tmp_path_factory.mktemp("cf")
    files = {}
    obs = Observations(
        times=jnp.asarray([0.1, 0.2]),
        values=jnp.asarray([[1.0, jnp.nan], [2.0, 3.0]]),
        positions=jnp.asarray([0.2, 0.5]),
        sigma=0.1,
    )
    files["observations"] = dio.write_netcdf(
        observations_to_dataset(
            obs,
            units="K",
            length_units="m",
            time_units="s",
            reference="2000-01-01",
            standard_name="sea_surface_temperature",
        ),
        root / "obs.nc",
    )
    grid = dphys.Grid((6, 8), lengths=1.0, boundary="neumann")
    traj = dphys.simulate(
        pdes.Heat(grid, 0.01),
        dphys.CrankNicolson(),
        jnp.ones(grid.shape),
        dt=0.1,
        n_steps=4,
        saveat=dphys.SaveAt(t0=True, every=2),
    )
    files["trajectory"] = dio.write_netcdf(
        dio.to_dataset(traj, grid, units="K", time_units="s", length_units="m"),
        root / "traj.nc",
    )
    # an analysis with a diffusivity field: many labelled parameter entries
    cfg = demo_config(quick=True, kappa_field=True, out=str(root))
    cfg["model"]["grid"]["shape"] = [16]
    cfg["time"]["n_steps"] = 10
    cfg["twin"]["n_sensors"] = 4
    cfg["solver"]["max_iterations"] = 1
    ds = output_dataset(run(validate_config(cfg)), {"history": "test"})
    files["analysis"] = dio.write_netcdf(ds, root / "analysis.nc")
    run_batch([Case("one", 1)], lambda case: ds, root / "batch")
    files["batch case"] = root / "batch" / "one.nc"
    files["shallow water analysis"] = dio.write_netcdf(
        output_dataset(run(validate_config(shallow_water_config()))),
        root / "sw.nc",
    )
    return files


def shallow_water_config(**names):
    """A tiny shallow-water twin whose fields carry CF standard names."""
    cfg = tomllib.loads(init_config("shallow_water"))
    del cfg["batch"]
    cfg["model"]["standard_names"] = {
        "eta": "sea_surface_height_above_geoid",
        "u": "eastward_sea_water_velocity",
        "v": "northward_sea_water_velocity",
        **names,
    }
    cfg["model"]["grid"]["shape"] = [8]
    cfg["time"]["n_steps"] = 2
    cfg["twin"].update(obs_every=1, n_sensors=3)
    cfg["solver"]["max_iterations"] = 1
    return cfg


@pytest.mark.parametrize(
    "kind",
    [
        "observations",
        "trajectory",
        "analysis",
        "batch case",
        "shallow water analysis",
    ],
)
def test_outputs_are_cf_clean(outputs, kind):
    assert cf_problems(outputs[kind]) == []


@pytest.mark.parametrize(
    "kind",
    [
        "observations",
        "trajectory",
        "analysis",
        "batch case",
        "shallow water analysis",
    ],
)
def test_cf_checker_reports_no_error(outputs, kind):
    report = cfchecks(outputs[kind])
    if report is None:
        pytest.skip("cfchecker (and the UDUNITS-2 library) not installed")
    assert "ERRORS detected: 0" in report and "WARNINGS given: 0" in report, report


def test_labels_are_auxiliary_coordinates(outputs):
    with netCDF4.Dataset(outputs["analysis"]) as nc:
        labels = [str(x) for x in nc["parameter_label"][:]]
        assert nc["parameter_label"].dtype.kind == "S"  # a character array
        assert nc["parameter"].dtype == np.int32
        assert len(labels) == 16 and labels[0].startswith("kappa")
        assert nc["chi2_analysis"].ndim == 0


def test_the_checker_catches_what_it_checks(tmp_path):
    """A negative control: a file with the old faults is flagged."""
    import xarray as xr

    bad = xr.Dataset(
        {"v": (("station",), np.ones(2))},
        coords={
            "station": ("station", ["a", "b"]),
            "time": ("time", [0.0, 1.0], {"standard_name": "time", "units": "s"}),
        },
    )
    bad.to_netcdf(tmp_path / "bad.nc")
    problems = cf_problems(tmp_path / "bad.nc")
    assert "`station` is a string (vlen) variable" in problems
    assert "coordinate `time` has a _FillValue" in problems
    assert "`time`: standard_name time without a date" in problems
    assert "`v` has no units" in problems
    assert "station data without featureType = timeSeries" in problems


def test_standard_names_written_where_they_hold(outputs):
    """The configured names go on the states and the observations of their field,
    with `standard_error` on the posterior std, and nowhere else."""
    with netCDF4.Dataset(outputs["shallow water analysis"]) as nc:
        std = {
            name: var.standard_name
            for name, var in nc.variables.items()
            if "standard_name" in var.ncattrs()
        }
        assert nc["analysis_eta"].units == "m"
        assert nc["analysis_u"].units == "m s-1"
        # RMSE scores per field in its units; the pooled one (m with m s-1) is
        # not written
        assert nc["rmse_final_analysis_eta"].units == "m"
        assert nc["rmse_final_analysis_v"].units == "m s-1"
        assert "rmse_final_analysis" not in nc.variables
    for prefix in ("analysis", "background", "analysis_final", "truth_final"):
        assert std[f"{prefix}_eta"] == "sea_surface_height_above_geoid"
        assert std[f"{prefix}_u"] == "eastward_sea_water_velocity"
        assert std[f"{prefix}_v"] == "northward_sea_water_velocity"
    assert std["analysis_std_eta"] == "sea_surface_height_above_geoid standard_error"
    assert std["obs"] == "sea_surface_height_above_geoid"  # twin field = eta
    assert not any(k.startswith(("increment", "obs_minus")) for k in std)
    with netCDF4.Dataset(outputs["analysis"]) as nc:  # none configured: none written
        assert not [
            n
            for n, v in nc.variables.items()
            if "standard_name" in v.ncattrs() and n not in ("time", "x")
        ]


@pytest.mark.parametrize(
    "names, message",
    [
        ({"u": "sea_surface_height_above_geoid"}, "cannot be the units of CF"),
        ({"eta": "Sea Surface Height"}, "must be a CF standard name"),
        ({"w": "eastward_sea_water_velocity"}, r"unknown field\(s\) \['w'\]"),
    ],
)
def test_standard_name_config_errors(names, message):
    with pytest.raises(ValueError, match=message):
        validate_config(shallow_water_config(**names))


def test_standard_name_string_for_a_multi_field_state():
    cfg = shallow_water_config()
    cfg["model"]["standard_names"] = "sea_surface_height_above_geoid"
    with pytest.raises(ValueError, match="give a table"):
        validate_config(cfg)


def test_standard_name_checked_by_the_writer():
    obs = Observations(
        times=jnp.asarray([0.1]),
        values=jnp.asarray([[1.0]]),
        positions=jnp.asarray([0.2]),
        sigma=0.1,
    )
    with pytest.raises(ValueError, match="canonical units 'K'"):
        observations_to_dataset(obs, units="m", standard_name="sea_surface_temperature")
    with pytest.raises(ValueError, match="no units"):
        observations_to_dataset(obs, standard_name="sea_surface_temperature")
