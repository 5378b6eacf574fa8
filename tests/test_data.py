"""assimilation.io: reading observations and fields, and every validation error."""

import logging
import pathlib

import cftime
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import dphys
import dphys.io as dio
from assimilation import Observations
from assimilation.io import (
    DataError,
    DomainError,
    GridMismatchError,
    MissingVariableError,
    TimeAxisError,
    UnitsError,
    convert_units,
    model_times,
    observations_to_dataset,
    read_field,
    read_observations,
    unit_conversion,
)


GRID = dphys.Grid(20, lengths=1000.0, boundary="neumann")  # metres
PERIODIC = dphys.Grid((8, 10), lengths=(2.0, 5.0), boundary="periodic")


def obs_dataset(
    times=(0.0, 1.0, 2.0),
    positions=(100.0, 500.0, 900.0),
    calendar=None,
    time_units="h",
    values=None,
    **kw,
):
    n_t, n_s = len(times), len(positions)
    if values is None:
        values = np.arange(n_t * n_s, dtype=float).reshape(n_t, n_s)
    # Observations refuses unsorted times, so files with bad time axes are made by
    # writing sorted ones and overwriting the coordinate afterwards.
    obs = Observations(
        times=jnp.arange(n_t, dtype=float),
        values=jnp.asarray(values),
        positions=jnp.asarray(positions, dtype=float)[:, None],
        sigma=jnp.full((n_s,), 0.5),
    )
    kw.setdefault("units", "K")
    kw.setdefault("length_units", "m")
    ds = observations_to_dataset(
        obs, time_units=time_units, calendar=calendar or "standard", **kw
    )
    return ds.assign_coords(time=ds.time.copy(data=np.asarray(times, dtype=float)))


def test_observation_netcdf_round_trip(tmp_path):
    values = np.array([[1.0, np.nan, 3.0], [4.0, 5.0, 6.0]])
    ds = obs_dataset(
        times=(0.5, 1.5), values=values, reference="2000-01-01T00:00", calendar="noleap"
    )
    dio.write_netcdf(ds, tmp_path / "obs.nc")
    obs = read_observations(
        tmp_path / "obs.nc",
        GRID,
        units="K",
        length_units="m",
        time_units="h",
        reference="2000-01-01",
    )
    np.testing.assert_allclose(obs.times, [0.5, 1.5], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(obs.values), values)  # NaN kept
    np.testing.assert_array_equal(
        np.asarray(obs.positions)[:, 0], [100.0, 500.0, 900.0]
    )
    np.testing.assert_array_equal(np.asarray(obs.sigma), [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(obs.mask, ~np.isnan(values))


@pytest.mark.parametrize(
    "calendar, expected_days",
    # 2000 is a leap year: 1 Mar is day 60 in the standard calendar, day 59 without
    # leap days, day 60 in a calendar of twelve 30-day months.
    [("standard", [-1.0, 0.0]), ("noleap", [0.0, 1.0]), ("360_day", [-1.0, 0.0])],
)
def test_cf_calendars_convert_to_model_time(calendar, expected_days):
    time = xr.DataArray(
        [59.0, 60.0],
        dims="time",
        attrs={"units": "days since 2000-01-01", "calendar": calendar},
    )
    t = model_times(time, time_units="s", reference="2000-03-01T00:00:00")
    np.testing.assert_allclose(t, np.asarray(expected_days) * 86400.0)


def test_decoded_datetimes_and_cftime_objects():
    dates = xr.DataArray(
        np.array(["2001-01-01T06", "2001-01-02T06"], dtype="datetime64[ns]"),
        dims="time",
    )
    np.testing.assert_allclose(
        model_times(dates, time_units="h", reference="2001-01-01"), [6.0, 30.0]
    )
    cf = xr.DataArray(
        np.array(
            [cftime.Datetime360Day(2001, 2, 30), cftime.Datetime360Day(2001, 3, 1)]
        ),
        dims="time",
    )
    np.testing.assert_allclose(
        model_times(cf, time_units="d", reference="2001-02-29"), [1.0, 2.0]
    )
    with pytest.raises(TimeAxisError, match="pass `reference`"):
        model_times(dates, time_units="h")
    with pytest.raises(TimeAxisError, match="not a valid date in the 'standard'"):
        model_times(dates, time_units="h", reference="2001-02-30")


def test_plain_time_units_are_converted():
    time = xr.DataArray([1.0, 2.0], dims="time", attrs={"units": "hours"})
    np.testing.assert_allclose(model_times(time, time_units="s"), [3600.0, 7200.0])
    time = xr.DataArray([1.0, 2.0], dims="time", attrs={"units": "days"})
    np.testing.assert_allclose(model_times(time, time_units="h"), [24.0, 48.0])
    with pytest.raises(UnitsError, match="`time` has units 'K'"):
        model_times(
            xr.DataArray([1.0], dims="time", attrs={"units": "K"}), time_units="s"
        )
    dated = xr.DataArray([1.0], dims="time", attrs={"units": "days since 2000-01-01"})
    with pytest.raises(UnitsError, match="not a time unit; set `time_units`"):
        model_times(dated, time_units=None)


def test_time_axis_errors():
    with pytest.raises(TimeAxisError, match="not increasing: entry 2"):
        read_observations(obs_dataset(times=(0.0, 2.0, 1.0)), GRID, time_units="h")
    with pytest.raises(TimeAxisError, match="duplicate times: entries 0 and 1"):
        read_observations(obs_dataset(times=(1.0, 1.0, 2.0)), GRID, time_units="h")
    with pytest.raises(
        TimeAxisError,
        match=r"1 of 3 times outside the assimilation "
        r"window \[0, 1.5\]",
    ):
        read_observations(obs_dataset(), GRID, time_units="h", window=(0.0, 1.5))
    with pytest.raises(TimeAxisError, match="2 non-finite"):
        model_times(xr.DataArray([np.nan, 1.0, np.inf], dims="time"), time_units="s")


def test_outside_window_dropped_with_count(caplog):
    with caplog.at_level(logging.WARNING, logger="assimilation.io"):
        obs = read_observations(
            obs_dataset(), GRID, time_units="h", window=(0.5, 2.0), outside="drop"
        )
    np.testing.assert_array_equal(np.asarray(obs.times), [1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(obs.values)[0], [3.0, 4.0, 5.0])
    assert "dropped 1 of 3 times" in caplog.text


def test_round_off_at_the_edges_is_snapped(caplog):
    # float32 storage: 0.4 becomes 0.4000000059604645, just past the window's end
    t32 = np.float32(0.4).astype(np.float64)
    assert t32 > 0.4
    ds = obs_dataset(
        times=(0.1, 0.2, t32), positions=(0.0, 500.0, 1000.0 + 1e-7), time_units="s"
    )
    with caplog.at_level(logging.INFO, logger="assimilation.io"):
        obs = read_observations(ds, GRID, time_units="s", window=(0.0, 0.4))
    assert float(obs.times[-1]) == 0.4
    assert float(obs.positions[-1, 0]) == 1000.0
    assert "snapped 1 time(s)" in caplog.text
    assert "snapped 1 sensor position(s)" in caplog.text
    # a real miss is still refused
    with pytest.raises(TimeAxisError, match="outside the assimilation window"):
        read_observations(
            obs_dataset(times=(0.1, 0.2, 0.401), time_units="s"),
            GRID,
            time_units="s",
            window=(0.0, 0.4),
        )


def test_sensors_outside_domain():
    with pytest.raises(
        DomainError,
        match=r"1 sensor\(s\) lie outside the neumann "
        r"domain \[0, 1000\] along `x` \(axis 0\): sensor\(s\) \[2\]",
    ):
        read_observations(
            obs_dataset(positions=(10.0, 500.0, 1000.5)), GRID, time_units="h"
        )
    # wrong length units are the usual cause: km read as m would fail the same way
    with pytest.raises(DomainError, match="positions' units"):
        read_observations(
            obs_dataset(length_units="m", positions=(0.1, 0.5, 1.5e3)),
            GRID,
            time_units="h",
        )


def test_periodic_positions_are_wrapped(caplog):
    obs = Observations(
        times=jnp.asarray([0.0]),
        values=jnp.ones((1, 2)),
        positions=jnp.asarray([[2.5, -1.0], [1.0, 2.0]]),
        sigma=jnp.ones(2),
    )
    ds = observations_to_dataset(obs)
    with caplog.at_level(logging.WARNING, logger="assimilation.io"):
        back = read_observations(ds, PERIODIC)
    np.testing.assert_allclose(np.asarray(back.positions), [[0.5, 4.0], [1.0, 2.0]])
    assert "wrapped 1 sensor position(s) `y`" in caplog.text
    assert "wrapped 1 sensor position(s) `x`" in caplog.text


def test_units_conversion_and_refusal(caplog):
    ds = obs_dataset(units="degC", length_units="km", positions=(0.1, 0.5, 0.9))
    obs = read_observations(ds, GRID, units="K", length_units="m", time_units="s")
    np.testing.assert_allclose(np.asarray(obs.values)[0], [273.15, 274.15, 275.15])
    np.testing.assert_allclose(np.asarray(obs.positions)[:, 0], [100.0, 500.0, 900.0])
    np.testing.assert_allclose(np.asarray(obs.times), [0.0, 3600.0, 7200.0])
    np.testing.assert_allclose(np.asarray(obs.sigma), 0.5)  # a std: no offset
    with pytest.raises(
        UnitsError,
        match=r"`u` has units 'm s-1' but the model uses "
        r"'K'.*Convert the data",
    ):
        read_observations(obs_dataset(units="m s-1"), GRID, units="K", time_units="h")
    # no units attribute: assumed to be the model's, and said so
    bare = obs_dataset()
    del bare["u"].attrs["units"]
    with caplog.at_level(logging.WARNING, logger="assimilation.io"):
        read_observations(bare, GRID, units="K", time_units="h")
    assert "`u` has no `units` attribute; assuming the model's units 'K'" in caplog.text
    assert unit_conversion("celsius", "kelvin") == (1.0, 273.15)
    assert unit_conversion("hours", "s") == (3600.0, 0.0)
    assert convert_units(np.asarray(2.0), "km", "m") == 2000.0
    with pytest.raises(UnitsError, match="no known conversion"):
        unit_conversion("m", "s")


def test_missing_variables_and_sigma():
    ds = obs_dataset()
    with pytest.raises(
        MissingVariableError,
        match=r"no variable `temp`.*data variables "
        r"\['sigma', 'u'\]",
    ):
        read_observations(ds, GRID, variable="temp", time_units="h")
    with pytest.raises(MissingVariableError, match="no sensor position variable `x`"):
        read_observations(ds.drop_vars("x"), GRID, time_units="h")
    with pytest.raises(
        MissingVariableError,
        match=r"must have dims \('time', "
        r"'station'\)",
    ):
        read_observations(ds.rename(station="site"), GRID, time_units="h")
    with pytest.raises(MissingVariableError, match="no error standard deviation"):
        read_observations(ds.drop_vars("sigma"), GRID, time_units="h")
    obs = read_observations(ds.drop_vars("sigma"), GRID, time_units="h", sigma=0.2)
    np.testing.assert_array_equal(np.asarray(obs.sigma), [0.2, 0.2, 0.2])
    with pytest.raises(DataError, match="`sigma` must be positive"):
        read_observations(ds, GRID, time_units="h", sigma=[0.1, 0.0, 0.1])
    with pytest.raises(ValueError, match=r"one value per sensor \(3\)"):
        read_observations(ds, GRID, time_units="h", sigma=[0.1, 0.2])
    with pytest.raises(MissingVariableError, match="no `time` coordinate"):
        read_observations(ds.drop_vars("time"), GRID, time_units="h")


def test_every_io_error_is_a_value_error():
    for cls in (
        DataError,
        DomainError,
        GridMismatchError,
        MissingVariableError,
        TimeAxisError,
        UnitsError,
    ):
        assert issubclass(cls, ValueError)


# -- gridded fields --------------------------------------------------------------------
def field_dataset(grid, n_t=3, length_scale=1.0, order=None, units="K"):
    coords = {
        d: grid.axis_coords(a) * length_scale
        for a, d in enumerate(dio.spatial_dims(grid.ndim))
    }
    values = np.random.default_rng(0).normal(size=(n_t, *grid.shape))
    da = xr.DataArray(
        values,
        dims=("time", *dio.spatial_dims(grid.ndim)),
        coords={
            "time": ("time", np.arange(n_t, dtype=float), {"units": "s"}),
            **coords,
        },
        attrs={"units": units},
    )
    if order:
        da = da.transpose(*order)
    return xr.Dataset({"u": da}), values


def test_read_field_transposes_and_converts():
    ds, values = field_dataset(PERIODIC, order=("x", "time", "y"))
    times, out = read_field(ds, "u", PERIODIC, time_units="s")
    np.testing.assert_array_equal(np.asarray(out), values)
    np.testing.assert_array_equal(np.asarray(times), [0.0, 1.0, 2.0])
    ds, values = field_dataset(GRID, length_scale=1e-3, units="degC")
    ds = ds.assign_coords(x=ds.x.assign_attrs(units="km"))
    _, out = read_field(ds, "u", GRID, units="K", length_units="m", time_units="s")
    np.testing.assert_allclose(np.asarray(out), values + 273.15)
    static = ds.isel(time=0)
    t, out = read_field(static, "u", GRID, length_units="m")
    assert t is None and out.shape == GRID.shape


def test_read_field_never_aligns_mismatched_grids():
    shifted = dphys.Grid(20, lengths=1000.0, boundary="neumann", origin=10.0)
    ds, _ = field_dataset(shifted)
    # xarray alignment would inner-join these to an empty overlap; we refuse instead
    with pytest.raises(
        GridMismatchError,
        match="`x` coordinate does not match the "
        r"model grid: got \[35",
    ):
        read_field(ds, "u", GRID)
    coarse = dphys.Grid(10, lengths=1000.0, boundary="neumann")
    ds, _ = field_dataset(coarse)
    with pytest.raises(
        GridMismatchError, match="`x` has 10 points but the model grid has 20"
    ):
        read_field(ds, "u", GRID)
    ds, _ = field_dataset(GRID)
    with pytest.raises(MissingVariableError, match=r"unexpected \['member'\]"):
        read_field(ds.expand_dims(member=2), "u", GRID)
    with pytest.raises(MissingVariableError, match=r"missing \['y'\]"):
        read_field(ds, "u", PERIODIC)
    with pytest.raises(TimeAxisError, match="not increasing"):
        read_field(ds.isel(time=[0, 2, 1]), "u", GRID)


def test_io_exports_are_lazy():
    """`import assimilation` does not load xarray; the readers are exported lazily."""
    import subprocess
    import sys

    import assimilation
    from assimilation import io as _data

    assert assimilation.read_observations is _data.read_observations
    assert issubclass(assimilation.GridMismatchError, ValueError)
    with pytest.raises(AttributeError, match="no attribute 'read_obs'"):
        assimilation.read_obs  # noqa: B018
    code = (
        "import sys, assimilation; assert 'xarray' not in sys.modules; "
        "assimilation.read_field; assert 'xarray' in sys.modules"
    )
    root = str(pathlib.Path(__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["UnitsError", "TimeAxisError", "DomainError"])
def test_moved_error_classes_name_their_new_location(name):
    """The observation-data errors live in assimilation.io; the core's old spelling
    fails with a message naming the new place (the core never imports
    assimilation)."""
    import assimilation
    import assimilation.io as aio

    cls = getattr(aio, name)
    assert issubclass(cls, dio.DataError) and issubclass(cls, ValueError)
    assert getattr(assimilation, name) is cls
    with pytest.raises(ImportError, match=f"use `assimilation.io.{name}`"):
        getattr(dio, name)
    with pytest.raises(ImportError, match=f"use `assimilation.io.{name}`"):
        exec(f"from dphys.io import {name}", {})
    with pytest.raises(AttributeError, match="no attribute 'NoSuchError'"):
        dio.NoSuchError  # noqa: B018
