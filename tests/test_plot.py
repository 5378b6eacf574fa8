"""The summary figure: station time series and, for shallow water, vectors."""

import numpy as np
import pytest
import tomllib

from assimilation.runs import init_config, plot_analysis, run, validate_config


pytest.importorskip("matplotlib")


def tiny(model, **solver):
    cfg = tomllib.loads(init_config(model))
    del cfg["batch"]
    cfg["model"]["grid"]["shape"] = [8]
    cfg["time"]["n_steps"] = 4
    cfg["twin"].update(obs_every=1, n_sensors=4)
    cfg["solver"].update(max_iterations=1, uncertainty=False, **solver)
    return validate_config(cfg)


@pytest.fixture(scope="module")
def shallow_water():
    return run(tiny("shallow_water"))


def by_title(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_station_panel_shows_obs_and_equivalents(shallow_water):
    out = shallow_water
    fig = plot_analysis(
        out.analysis,
        out.setup.grid,
        out.obs,
        truth=out.truth,
        units="m",
        time_units="s",
    )
    ax = by_title(fig)["station time series"]
    assert ax.get_xlabel() == "time [s]" and ax.get_ylabel() == "eta [m]"
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert len(lines) == 3 * 3  # three sensors: obs, background, analysis
    obs_line, bg_line, an_line = lines[:3]
    y = np.asarray(out.obs.values)
    j = int(obs_line.get_label().split()[2])
    np.testing.assert_array_equal(obs_line.get_ydata(), y[:, j])
    # the analysis line is H(x_a): y minus the analysis residual
    np.testing.assert_allclose(
        an_line.get_ydata(), y[:, j] - np.asarray(out.analysis.obs_minus_analysis)[:, j]
    )
    assert not np.allclose(bg_line.get_ydata(), an_line.get_ydata())


def test_vector_panel_for_shallow_water(shallow_water):
    from matplotlib.quiver import Quiver

    out = shallow_water
    fig = plot_analysis(
        out.analysis, out.setup.grid, out.obs, length_units="m", speed_units="m s-1"
    )
    ax = by_title(fig)["analysis velocity (u, v), window start"]
    (q,) = [c for c in ax.collections if isinstance(c, Quiver)]
    u = np.asarray(out.analysis.initial_state.u)
    # closed channel: cell 0's west face is the wall, so the centred u is u[0] / 2
    np.testing.assert_allclose(q.U[0], 0.5 * u[0])
    np.testing.assert_allclose(q.U[1:], 0.5 * (u[1:] + u[:-1]))
    np.testing.assert_allclose(q.V, np.asarray(out.analysis.initial_state.v))
    assert ax.get_xlabel() == "x [m]"
    assert fig.axes[-1].get_ylabel() == "speed [m s-1]"  # the colour bar


def test_no_vector_panel_without_velocities(tmp_path):
    out = run(tiny("heat"))
    fig = plot_analysis(out.analysis, out.setup.grid, out.obs)
    titles = by_title(fig)
    assert "station time series" in titles
    assert not any("velocity" in t for t in titles)
