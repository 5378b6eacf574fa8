"""Files built like real gridded products, read as they come or refused by name.

Synthetic stand-ins for: a satellite SST analysis (lat-lon, land as NaN, latitude
stored north to south, float32 coordinates, a 360-day calendar), an ocean-model file
on a curvilinear grid (2-D nav_lat/nav_lon, `time_counter`), xarray's default time
encoding (milliseconds since ...) and reanalysis winds in m s-1 for shallow water.
"""

import logging
import math

import cftime
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import dphys
import dphys.io as dio
from assimilation import Observations
from assimilation.cli import main
from assimilation.io import (
    EARTH_RADIUS,
    CurvilinearGridError,
    DataError,
    TangentPlane,
    UnitsError,
    observations_to_dataset,
    read_field,
    read_observations,
    unit_conversion,
)
from assimilation.runs import build_run, validate_config


LAT0, LON0, DEG = 40.0, 10.0, 0.1  # the regional domain: 8 x 10 cells of 0.1 degree
NY, NX = 8, 10
GEO = TangentPlane(LAT0, LON0)
M_PER_DEG_Y = EARTH_RADIUS * math.pi / 180
M_PER_DEG_X = M_PER_DEG_Y * math.cos(math.radians(LAT0))
GRID = dphys.Grid(
    (NY, NX),
    lengths=(NY * DEG * M_PER_DEG_Y, NX * DEG * M_PER_DEG_X),
    boundary="neumann",
)
LATS = LAT0 + DEG * (np.arange(NY) + 0.5)  # cell centres
LONS = LON0 + DEG * (np.arange(NX) + 0.5)


def sst_dataset(n_t=3, land=True):
    """An SST analysis like a satellite L4 product: (time, lat, lon), K, land NaN,
    latitude descending, float32 coordinates, 360-day calendar in days."""
    rng = np.random.default_rng(0)
    values = 290.0 + rng.normal(scale=0.3, size=(n_t, NY, NX))
    if land:
        values[:, :3, :2] = np.nan  # a coast in the south-west corner
    ds = xr.Dataset(
        {
            "analysed_sst": (
                ("time", "lat", "lon"),
                values[:, ::-1].astype(np.float32),  # north to south
                {"units": "kelvin", "standard_name": "sea_surface_temperature"},
            )
        },
        coords={
            "time": (
                "time",
                np.arange(n_t) * 0.25,
                {"units": "days since 2001-02-30 00:00", "calendar": "360_day"},
            ),
            "lat": (
                "lat",
                LATS[::-1].astype(np.float32),
                {"units": "degrees_north", "standard_name": "latitude"},
            ),
            "lon": (
                "lon",
                LONS.astype(np.float32),
                {"units": "degrees_east", "standard_name": "longitude"},
            ),
        },
    )
    return ds, values


def test_tangent_plane_maps_the_regular_lat_lon_grid_onto_the_model_grid():
    y = GEO.to_metres("y", LATS)
    x = GEO.to_metres("x", LONS)
    np.testing.assert_allclose(y, GRID.axis_coords(0), rtol=1e-12)
    np.testing.assert_allclose(x, GRID.axis_coords(1), rtol=1e-12)
    # longitudes wrap: 370 E is 10 E
    np.testing.assert_allclose(GEO.to_metres("x", LONS + 360.0), x, rtol=1e-9)
    with pytest.raises(ValueError, match="`lat0` must lie in"):
        TangentPlane(95.0, 0.0)


def test_sst_analysis_as_gridded_observations(tmp_path, caplog):
    ds, values = sst_dataset()
    dio.write_netcdf(ds, tmp_path / "sst.nc")
    with caplog.at_level(logging.INFO, logger="assimilation.io"):
        obs = read_observations(
            tmp_path / "sst.nc",
            GRID,
            variable="analysed_sst",
            sigma=0.4,
            units="degC",
            length_units="km",
            time_units="h",
            reference="2001-02-30",
            geometry=GEO,
        )
    # land (6 points, NaN at every time) is never assimilated; the rest are sensors
    assert obs.n_sensors == NY * NX - 6
    assert "6 of 80 grid point(s) missing at every time" in caplog.text
    assert "flipped descending axis `y`" in caplog.text
    np.testing.assert_allclose(np.asarray(obs.times), [0.0, 6.0, 12.0])  # 360-day
    pos = np.asarray(obs.positions)
    sea = ~np.isnan(values[0])
    yy, xx = np.meshgrid(GRID.axis_coords(0), GRID.axis_coords(1), indexing="ij")
    # positions in km from float32 degrees: float32 rounding of a latitude near 40
    # degrees is up to 2e-6 degree, 0.2 m
    np.testing.assert_allclose(pos[:, 0], yy[sea] / 1e3, rtol=0, atol=5e-4)
    np.testing.assert_allclose(pos[:, 1], xx[sea] / 1e3, rtol=0, atol=5e-4)
    expect = values[:, sea].astype(np.float32).astype(np.float64) - 273.15
    np.testing.assert_allclose(np.asarray(obs.values), expect, rtol=1e-12)


def test_sst_background_land_nan_is_named_and_filled_one_reads(tmp_path):
    ds, values = sst_dataset()
    with pytest.raises(DataError, match=r"`analysed_sst` has 6 NaN value\(s\).*land"):
        read_field(ds.isel(time=0), "analysed_sst", GRID, geometry=GEO)
    filled = ds.fillna(290.0)
    times, out = read_field(
        filled,
        "analysed_sst",
        GRID,
        units="K",
        length_units="m",
        time_units="d",
        reference="2001-02-30",
        geometry=GEO,
    )
    np.testing.assert_allclose(np.asarray(times), [0.0, 0.25, 0.5])
    expect = np.where(np.isnan(values), 290.0, values).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out), expect)  # flipped back: S to N
    # degrees without a geometry are refused, with the fix
    with pytest.raises(UnitsError, match="degrees are not lengths.*geographic_origin"):
        read_field(filled.isel(time=0), "analysed_sst", GRID, length_units="m")
    # a real mismatch is still caught at float32 tolerance: shift by 1/100 cell
    shifted = filled.assign_coords(lat=(filled.lat + np.float32(0.001)))
    with pytest.raises(dio.GridMismatchError, match="tolerance .* for float32"):
        read_field(shifted.isel(time=0), "analysed_sst", GRID, geometry=GEO)


def test_ocean_model_curvilinear_grid_is_refused_by_name(tmp_path):
    j, i = np.meshgrid(np.arange(NY), np.arange(NX), indexing="ij")
    nav_lat = LAT0 + 0.1 * j + 0.01 * i  # rotated grid: 2-D coordinates
    nav_lon = LON0 + 0.1 * i - 0.01 * j
    ds = xr.Dataset(
        {"thetao": (("time_counter", "y", "x"), np.full((2, NY, NX), 285.0))},
        coords={
            "time_counter": (
                "time_counter",
                [0.0, 86400.0],
                {"units": "seconds since 1900-01-01", "calendar": "360_day"},
            ),
            "nav_lat": (("y", "x"), nav_lat, {"units": "degrees_north"}),
            "nav_lon": (("y", "x"), nav_lon, {"units": "degrees_east"}),
        },
    )
    dio.write_netcdf(ds, tmp_path / "ocean.nc")
    message = r"curvilinear grid: its horizontal coordinates `nav_lat\('y', 'x'\)`"
    with pytest.raises(CurvilinearGridError, match=message):
        read_field(tmp_path / "ocean.nc", "thetao", GRID, geometry=GEO)
    with pytest.raises(CurvilinearGridError, match="Regrid it"):
        read_observations(
            tmp_path / "ocean.nc", GRID, variable="thetao", sigma=0.1, geometry=GEO
        )
    assert issubclass(CurvilinearGridError, dio.GridMismatchError)


def test_xarray_default_millisecond_time_encoding(tmp_path):
    grid = dphys.Grid(16, lengths=1.0, boundary="neumann")
    obs = Observations(
        times=jnp.asarray([0.0, 1.0]),
        values=jnp.ones((2, 2)),
        positions=jnp.asarray([0.25, 0.75]),
        sigma=0.1,
    )
    ds = observations_to_dataset(obs, units="K", length_units="m")
    dates = np.array(["2000-01-01T00:00:00.250", "2000-01-01T06:00:00"], "M8[ns]")
    ds = ds.assign_coords(time=("time", dates))
    ds["time"].encoding.update(units="milliseconds since 2000-01-01")
    ds.to_netcdf(tmp_path / "obs.nc")
    with xr.open_dataset(tmp_path / "obs.nc", decode_times=False) as raw:
        assert raw["time"].attrs["units"] == "milliseconds since 2000-01-01"
    back = read_observations(
        tmp_path / "obs.nc", grid, time_units="s", reference="2000-01-01"
    )
    np.testing.assert_allclose(np.asarray(back.times), [0.25, 21600.0])


def test_units_by_a_units_library():
    assert unit_conversion("g m-3", "kg m-3") == pytest.approx((1e-3, 0.0))
    assert unit_conversion("km h-1", "m s-1") == pytest.approx((1 / 3.6, 0.0))
    assert unit_conversion("m.s-1", "m s-1") == (1.0, 0.0)
    with pytest.raises(UnitsError, match="no known conversion between them"):
        unit_conversion("m s-1", "K")


def wind_config(tmp_path):
    """Shallow water on a 1D channel, observing winds in m s-1."""
    grid = dphys.Grid(16, lengths=1.6e5, boundary="periodic")
    obs = Observations(
        times=jnp.asarray([60.0, 120.0]),
        values=jnp.full((2, 3), 36.0),  # km h-1: 10 m s-1
        positions=jnp.asarray([2e4, 8e4, 1.4e5]),
        sigma=0.1,
    )
    ds = observations_to_dataset(
        obs,
        variable="u",
        units="km h-1",
        length_units="m",
        time_units="s",
        reference="2000-01-01",
    )
    dio.write_netcdf(ds, tmp_path / "wind.nc")
    bg = xr.Dataset(
        {
            "eta": ("x", np.zeros(16), {"units": "cm"}),
            "u": ("x", np.full(16, 500.0), {"units": "cm s-1"}),
            "v": ("x", np.zeros(16), {"units": "m s-1"}),
        },
        coords={"x": ("x", grid.axis_coords(0), {"units": "m"})},
    )
    dio.write_netcdf(bg, tmp_path / "bg.nc")
    return {
        "model": {
            "name": "shallow_water",
            "length_units": "m",
            "time_units": "s",
            "grid": {"shape": [16], "lengths": 1.6e5, "boundary": "periodic"},
            "parameters": {"depth": 100.0},
        },
        "time": {"dt": 30.0, "n_steps": 4, "reference": "2000-01-01T00:00:00"},
        "observations": {"path": str(tmp_path / "wind.nc"), "field": "u"},
        "background": {
            "path": str(tmp_path / "bg.nc"),
            "std": {"eta": 0.1, "u": 1.0, "v": 1.0},
        },
        "solver": {"method": "lbfgs", "max_iterations": 1, "uncertainty": False},
        "output": {"path": str(tmp_path / "out.nc")},
    }


def test_shallow_water_winds_in_m_per_s(tmp_path):
    cfg = validate_config(wind_config(tmp_path))
    setup = build_run(cfg)
    np.testing.assert_allclose(np.asarray(setup.obs.values), 10.0)  # km/h -> m/s
    np.testing.assert_allclose(np.asarray(setup.state0.u), 5.0)  # cm/s -> m/s
    np.testing.assert_allclose(np.asarray(setup.state0.eta), 0.0)
    # a velocity observed in a length unit is refused, with the field named
    bad = wind_config(tmp_path)
    bad["model"]["units"] = {"u": "m"}
    with pytest.raises(
        UnitsError, match="`u` has units 'cm s-1' but the model uses 'm'"
    ):
        build_run(validate_config(bad))


def test_regional_sst_assimilated_through_the_cli(tmp_path, capsys):
    """The SST file as it comes: observations and (filled) background, both on
    lat-lon in degrees, assimilated by a heat model on the tangent plane."""
    ds, _ = sst_dataset(n_t=3)
    dio.write_netcdf(ds, tmp_path / "sst.nc")
    bg = ds.isel(time=[0]).fillna(290.0)
    bg = bg.assign_coords(time=("time", [0.0], ds.time.attrs))
    dio.write_netcdf(bg, tmp_path / "bg.nc")
    toml = f"""
[model]
name = "heat"
units = "K"
length_units = "m"
time_units = "h"
grid = {{ shape = [{NY}, {NX}], lengths = [{GRID.lengths[0]!r}, {GRID.lengths[1]!r}], \
boundary = "neumann", geographic_origin = [{LAT0}, {LON0}] }}
parameters = {{ kappa = 1000.0 }}

[time]
dt = 3.0
n_steps = 4
reference = "2001-02-30T00:00:00"
calendar = "360_day"

[observations]
path = "sst.nc"
variable = "analysed_sst"
sigma = 0.4

[background]
path = "bg.nc"
variable = "analysed_sst"
std = 0.5

[solver]
method = "lbfgs"
max_iterations = 1
uncertainty = false

[output]
path = "analysis.nc"
"""
    cfg = tmp_path / "sst.toml"
    cfg.write_text(toml)
    assert main(["assimilate", str(cfg), "-q"]) == 0, capsys.readouterr().err
    with xr.open_dataset(tmp_path / "analysis.nc", decode_times=False) as out:
        assert out.sizes["station"] == NY * NX - 6
        assert out["time"].attrs["calendar"] == "360_day"
        assert float(out["chi2_analysis"]) <= float(out["chi2_background"])
        assert np.isfinite(out["analysis"].values).all()
    # the same background with its land NaN: named, not a solver failure
    dio.write_netcdf(ds.isel(time=[0]), tmp_path / "bg.nc")
    code = main(["assimilate", str(cfg), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "NaN value(s)" in err and "land" in err


def test_cftime_dates_in_360_day_calendar_round_trip():
    dates = [cftime.Datetime360Day(2001, 2, 30), cftime.Datetime360Day(2001, 3, 1)]
    t = xr.DataArray(
        cftime.date2num(dates, "days since 2001-02-01", calendar="360_day"),
        dims="time",
        attrs={"units": "days since 2001-02-01", "calendar": "360_day"},
    )
    from assimilation.io import model_times

    np.testing.assert_allclose(
        model_times(t, time_units="h", reference="2001-02-29"), [24.0, 48.0]
    )
