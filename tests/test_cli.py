"""The `dphys` command: demo end to end, config validation, one-line errors."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import dphys
import dphys.io as dio
from assimilation import Observations
from assimilation.cli import demo_config, main
from assimilation.io import observations_to_dataset
from assimilation.runs import ConfigError, load_config, validate_config


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, match):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dphys: error: ")
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


# -- the demo ------------------------------------------------------------------------
def test_demo_quick_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(capsys, "-v", "demo", "--quick", "--out", str(out_dir))
    assert code == 0, err
    # progress on stderr: a bar, a line per phase and (-v) per iteration; summary on
    # stdout
    assert "iteration   0/" in err and "iteration   1/" in err
    assert "4D-Var" in err and "posterior (Laplace)" in err and "posterior done" in err
    assert "truth within ±2σ" in out and "initial-state RMSE" in out
    nc, png = out_dir / "analysis.nc", out_dir / "demo.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ds = xr.open_dataset(nc)  # CF-decoded: dated time axis
    try:
        assert ds.attrs["Conventions"] == "CF-1.8"
        assert ds.attrs["history"].endswith(
            f"dphys -v demo --quick --out {out_dir} (dphys {dphys.__version__})"
        )
        assert '"twin"' in ds.attrs["dphys_config"]
        assert np.issubdtype(ds["time"].dtype, np.datetime64)
        for name in (
            "analysis",
            "background",
            "increment",
            "analysis_std",
            "truth",
            "kappa",
            "kappa_std",
            "kappa_history",
            "cost",
            "obs",
            "obs_minus_analysis",
            "obs_minus_background",
            "parameter_correlation",
        ):
            assert name in ds, name
        assert ds["kappa"].attrs["units"] == "m2 s-1"
        kappa, std = float(ds["kappa"]), float(ds["kappa_std"])
        truth = float(ds["kappa_truth"])
        # the estimate is close to the truth (2e-3, background 1e-3): within 2 sigma
        # and much nearer than the background
        assert abs(kappa - truth) <= 2 * std
        assert abs(kappa - truth) < 0.25 * abs(1e-3 - truth)
        rmse_b = float(ds["rmse_initial_background"])
        rmse_a = float(ds["rmse_initial_analysis"])
        assert rmse_a < 0.5 * rmse_b
        # residuals shrink: the analysis fits the observations better
        oma = np.nanstd(ds["obs_minus_analysis"].values)
        omb = np.nanstd(ds["obs_minus_background"].values)
        assert oma < 0.2 * omb
        assert float(ds["cost"][-1]) < float(ds["cost"][0])
        np.testing.assert_allclose(ds["increment"], ds["analysis"] - ds["background"])
    finally:
        ds.close()
    assert f"{kappa:.5g}"[:4] in out  # the printed estimate is the stored one


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"dphys {dphys.__version__}"
    code, out, _ = run_cli(capsys, "demo", "--help")
    assert code == 0 and "--quick" in out


def test_usage_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys)
    assert_one_line_error(code, err, "the following arguments are required: COMMAND")
    code, _, err = run_cli(capsys, "demo", "--seed", "x")
    assert_one_line_error(code, err, "argument --seed: invalid int value: 'x'")
    code, _, err = run_cli(capsys, "assimilate", str(tmp_path / "nope.toml"))
    assert_one_line_error(code, err, "no such configuration file")


# -- configurations --------------------------------------------------------------------
HEAT_TOML = """
[model]
name = "heat"
units = "K"
length_units = "m"
time_units = "s"
grid = {{ shape = [24], lengths = 1.0, boundary = "neumann" }}
parameters = {{ kappa = 0.01 }}

[time]
dt = 0.05
n_steps = 8
reference = "2000-01-01T00:00:00"
calendar = "noleap"

[observations]
path = "obs.nc"
variable = "u"

[background]
value = 273.15
std = 0.5
length_scale = 0.2

[control]
initial_state = true
[control.parameters.kappa]
transform = "log"
sigma = 0.5

[solver]
# the cheapest run that still exercises the whole path (the demo test covers
# Gauss-Newton and the posterior)
method = "lbfgs"
max_iterations = 1
uncertainty = false
{extra}
[output]
path = "out/analysis.nc"
"""


def write_obs(
    path,
    *,
    units="degC",
    positions=(0.2, 0.5, 0.8),
    times=(0.1, 0.2, 0.4),
    reference="2000-01-01T00:00:00",
):
    obs = Observations(
        times=jnp.asarray(times),
        values=jnp.full((len(times), len(positions)), 0.05),
        positions=jnp.asarray(positions),
        sigma=0.05,
    )
    ds = observations_to_dataset(
        obs,
        units=units,
        length_units="m",
        time_units="s",
        reference=reference,
        calendar="noleap",
    )
    dio.write_netcdf(ds, path)


def test_assimilate_config_file(tmp_path, capsys):
    write_obs(tmp_path / "obs.nc")
    cfg = tmp_path / "run.toml"
    cfg.write_text(HEAT_TOML.format(extra=""))
    code, out, err = run_cli(capsys, "assimilate", str(cfg), "-q")
    assert code == 0, err
    ds = dio.read_netcdf(tmp_path / "out" / "analysis.nc")
    # degC observations were converted to the model's K: 0.05 degC = 273.2 K
    np.testing.assert_allclose(ds["obs"].values, 273.2)
    assert ds["time"].attrs["calendar"] == "noleap"
    np.testing.assert_allclose(ds["time"].values, [0.1, 0.2, 0.4])
    assert ds["analysis"].attrs["units"] == "K"
    assert ds.attrs["n_iterations"] <= 1
    assert "kappa" in out


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            ("[solver]", "[solver]\nmax_iteration = 3"),
            "unknown key `max_iteration` in [solver]. Did you mean `max_iterations`?",
        ),
        (
            ("n_steps = 8", 'n_steps = "8"'),
            "`time.n_steps` must be an integer, got str",
        ),
        (("dt = 0.05", "dt = -0.05"), "`time.dt` must be positive and finite"),
        (('name = "heat"', 'name = "hheat"'), "`model.name` must be one of"),
        (('boundary = "neumann"', 'boundary = "nuemann"'), "Did you mean `neumann`?"),
        (
            ("parameters = { kappa = 0.01 }", "parameters = { kapa = 0.01 }"),
            "unknown key `kapa` in [model.parameters]",
        ),
        (
            ('transform = "log"', 'transform = "bounded"'),
            "transform 'bounded' needs `lower` < `upper`",
        ),
        (
            ("[observations]", "[twin]\n[observations]"),
            "give exactly one of [observations]",
        ),
        (("[time]\n", "[tyme]\n"), "unknown key `tyme` in the top level"),
        (("shape = [24]", "shape = [2]"), "each >= 3"),
        (
            ("sigma = 0.5", "sigma = 0.5\nlower = 0.0"),
            "`lower`/`upper` apply only to transform = 'bounded'",
        ),
        (("dt = 0.05", "dt = 0.05\ndt = 0.1"), "is not valid TOML"),
    ],
)
def test_config_errors(tmp_path, capsys, edit, message):
    text = HEAT_TOML.format(extra="")
    assert edit[0] in text
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert message in str(info.value)
    assert info.value.args[0].startswith("bad.toml")
    code, _, err = run_cli(capsys, "assimilate", str(cfg))
    assert_one_line_error(code, err, message)


def test_missing_section_and_key():
    base = demo_config()
    del base["time"]
    with pytest.raises(ConfigError, match=r"missing section \[time\]"):
        validate_config(base)
    base = demo_config()
    del base["time"]["dt"]
    with pytest.raises(ConfigError, match=r"missing key `dt` in \[time\]"):
        validate_config(base)
    base = demo_config()
    del base["model"]["parameters"]["kappa"]
    with pytest.raises(
        ConfigError, match=r"missing key `kappa` in \[model.parameters\]"
    ):
        validate_config(base)
    base = demo_config()
    base["control"]["parameters"]["depth"] = {"sigma": 1.0}
    with pytest.raises(ConfigError, match="has no calibratable parameter `depth`"):
        validate_config(base)


@pytest.mark.parametrize(
    "obs_kwargs, message",
    [
        ({"units": "m s-1"}, "`u` has units 'm s-1' but the model uses 'K'"),
        ({"positions": (0.2, 0.5, 1.3)}, "lie outside the neumann domain [0, 1]"),
        ({"times": (0.1, 0.2, 0.6)}, "outside the assimilation window [0, 0.4]"),
        ({"reference": "2000-01-01T00:00:01"}, "outside the assimilation window"),
    ],
)
def test_bad_data_through_the_cli(tmp_path, capsys, obs_kwargs, message):
    write_obs(tmp_path / "obs.nc", **obs_kwargs)
    cfg = tmp_path / "run.toml"
    cfg.write_text(HEAT_TOML.format(extra=""))
    code, _, err = run_cli(capsys, "assimilate", str(cfg))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_background_grid_through_the_cli(tmp_path, capsys):
    write_obs(tmp_path / "obs.nc")
    other = dphys.Grid(24, lengths=1.0, boundary="neumann", origin=0.1)
    dio.write_netcdf(
        dio.to_dataset(jnp.zeros(24), other, units="K", length_units="m"),
        tmp_path / "bg.nc",
    )
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        HEAT_TOML.format(extra="").replace(
            "value = 273.15", 'path = "bg.nc"\nvariable = "u"'
        )
    )
    code, _, err = run_cli(capsys, "assimilate", str(cfg))
    assert_one_line_error(code, err, "field `u`'s `x` coordinate does not match")
    assert not (tmp_path / "out").exists()


def test_subprocess_error_exit_code_and_no_output(tmp_path):
    """The installed entry point's behaviour, in a fresh interpreter."""
    write_obs(tmp_path / "obs.nc", units="m s-1")
    cfg = tmp_path / "run.toml"
    cfg.write_text(HEAT_TOML.format(extra=""))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "assimilation.cli", "assimilate", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "libtpu" not in ln and "TPU" not in ln]
    assert len(lines) == 1 and lines[0].startswith("dphys: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "analysis.nc").exists()


# -- other models ----------------------------------------------------------------------
def model_config(name):
    cfg = demo_config(quick=True)
    cfg["background"]["length_scale"] = 0.0  # diagonal B: nothing to compile here
    if name == "advection":
        cfg["model"]["name"] = "advection"
        cfg["model"]["parameters"] = {"velocity": 0.2, "kappa": 1e-3}
    else:
        cfg["model"] = {
            "name": "shallow_water",
            "units": "m",
            "length_units": "m",
            "time_units": "s",
            "grid": {"shape": [32], "lengths": 1e5, "boundary": "periodic"},
            "parameters": {"depth": 100.0},
        }
        cfg["time"] = {"dt": 30.0, "n_steps": 20}
        cfg["background"] = {"std": {"eta": 0.1, "u": 0.01, "v": 0.01}}
        cfg["control"] = {"parameters": {"depth": {"transform": "log", "sigma": 0.3}}}
        cfg["twin"].update(field="eta", truth={"depth": 120.0})
    return cfg


def test_config_builds_advection_and_shallow_water():
    import pdes
    from assimilation.runs import build_run

    setup = build_run(validate_config(model_config("advection")))
    assert isinstance(setup.model, pdes.Advection)
    assert setup.control.names == ("initial_state", "kappa")
    assert float(setup.truth_model.kappa) == 2e-3 and float(setup.model.kappa) == 1e-3

    setup = build_run(validate_config(model_config("shallow_water")))
    assert isinstance(setup.model, pdes.ShallowWater)
    assert isinstance(setup.state0, pdes.SWState)
    assert float(setup.truth_model.depth) == 120.0
    # the truth differs from the background by a draw from B, field by field
    for field, std in (("eta", 0.1), ("u", 0.01)):
        diff = getattr(setup.truth_state0, field) - getattr(setup.state0, field)
        assert 0.3 * std < float(np.std(diff)) < 3 * std


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["twin"].pop("field"), "`twin.field` must name the observed state"),
        (lambda c: c["background"]["std"].update(h=1.0), r"unknown field\(s\) \['h'\]"),
        (lambda c: c["model"]["parameters"].update(kappa=1.0), "unknown key `kappa`"),
        (
            lambda c: c["control"]["parameters"].update(nonlinear={"sigma": 1.0}),
            "no calibratable parameter `nonlinear`",
        ),
    ],
)
def test_shallow_water_config_errors(edit, message):
    cfg = model_config("shallow_water")
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


@pytest.mark.slow
def test_shallow_water_twin_end_to_end(tmp_path):
    from assimilation.runs import output_dataset, run

    cfg = model_config("shallow_water")
    cfg["background"]["length_scale"] = 1e4
    cfg["twin"].update(n_sensors=6, obs_every=2, sigma=0.01)
    cfg["solver"]["max_iterations"] = 5
    out = run(validate_config(cfg))
    assert out.scores["rmse_initial_analysis"] < out.scores["rmse_initial_background"]
    ds = output_dataset(out)
    assert {"analysis_eta", "analysis_u", "analysis_v", "depth_std"} <= set(ds)
    dio.write_netcdf(ds, tmp_path / "sw.nc")
    assert dio.read_netcdf(tmp_path / "sw.nc")["analysis_eta"].dims == ("x",)


def test_run_failure_inside_jit_is_one_line(tmp_path, capsys, monkeypatch):
    import equinox as eqx

    import assimilation.runs as config

    def fail(*args, **kwargs):
        raise eqx.EquinoxRuntimeError(
            "Above is the stack outside of JIT.\n  File ...\n"
            "equinox.EquinoxRuntimeError: The maximum number of solver steps was "
            "reached. Try increasing `max_steps`.\n\n----\n1) Setting ..."
        )

    monkeypatch.setattr(config, "run", fail)
    code, _, err = run_cli(capsys, "demo", "--quick", "-q", "--out", str(tmp_path))
    assert code == 1
    lines = err.strip().splitlines()
    assert lines == [
        "dphys: error: the run failed: The maximum number of solver steps was "
        "reached. Try increasing `max_steps`."
    ]
    assert not list(tmp_path.iterdir())


def test_plot_analysis_returns_a_labelled_figure(tmp_path):
    from matplotlib.figure import Figure

    from assimilation.runs import plot_analysis, run

    cfg = demo_config(quick=True, out=str(tmp_path))
    cfg["model"]["grid"]["shape"] = [16]
    cfg["time"]["n_steps"] = 10
    cfg["twin"]["n_sensors"] = 4
    cfg["solver"] = {"method": "lbfgs", "max_iterations": 1, "uncertainty": False}
    out = run(validate_config(cfg))
    fig = plot_analysis(
        out.analysis,
        out.setup.grid,
        out.obs,
        truth=out.truth,
        units="K",
        length_units="m",
    )
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "x [m]" and ax.get_ylabel() == "state [K]"
    assert not list(tmp_path.glob("*.png"))  # no path: nothing written
    plot_analysis(out.analysis, out.setup.grid, out.obs, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_assimilate_warns_in_float32():
    """Single precision is a silent accuracy trap: assimilate says so."""
    import subprocess
    import sys

    code = (
        "import warnings, jax.numpy as jnp, dphys, pdes, assimilation as da\n"
        "grid = dphys.Grid(8, lengths=1.0, boundary='periodic')\n"
        "obs = da.Observations(times=[0.5], values=[[0.0]], positions=[0.5], "
        "sigma=0.1)\n"
        "cost = da.FourDVar(pdes.Heat(grid, 0.01), dphys.CrankNicolson(), "
        "jnp.zeros(8), obs, da.Control(initial_state=da.InitialState("
        "da.Diagonal(1.0, shape=(8,)))), dt=0.25, n_steps=2)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    da.assimilate(cost, da.LBFGS(max_iterations=0), uncertainty=False)\n"
        "print([str(x.message) for x in w if 'single precision' in str(x.message)])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_ENABLE_X64": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "running in single precision (float32)" in proc.stdout


@pytest.mark.filterwarnings("default::UserWarning")
def test_library_warnings_reach_the_log(tmp_path, capsys, caplog):
    # Observations all missing, and Crank-Nicolson at diffusion number 14 (kappa
    # 0.5, dt 0.05, dx 1/24): both are warned about, one record each in the CLI's
    # log (printed as "dphys: WARNING: ..." on stderr outside pytest).
    write_obs(tmp_path / "obs.nc")
    ds = dio.read_netcdf(tmp_path / "obs.nc")
    ds["u"] = ds["u"] * np.nan
    dio.write_netcdf(ds, tmp_path / "obs.nc")
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        HEAT_TOML.format(extra="").replace(
            "parameters = { kappa = 0.01 }", "parameters = { kappa = 0.5 }"
        )
    )
    code, _, err = run_cli(capsys, "assimilate", str(cfg), "-q")
    assert code == 0, err
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "assimilation.cli" and r.levelname == "WARNING"
    ]
    assert any("observation values" in line and "missing" in line for line in lines)
    assert any("far from monotone" in line for line in lines), lines
    assert all("\n" not in line for line in lines)
