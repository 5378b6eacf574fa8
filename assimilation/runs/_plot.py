"""Figures of an analysis (matplotlib, imported only here and only when plotting).

:func:`plot_analysis` draws one summary figure: the initial state (truth when known,
background, analysis with its posterior ±2σ band, sensor positions), the state at
the end of the window with the observations, the cost convergence, the
parameter convergence (with the truth and the posterior ±2σ interval), station
time series and, for shallow water, the velocity vectors.
"""

from __future__ import annotations

import pathlib

import jax.tree_util as jtu
import numpy as np

from dphys.io import atomic_write


__all__ = ["plot_analysis"]


def _first_field(state, field: str | None = None):
    """The array to draw of a state: the observed field of a multi-field state."""
    if state is None:
        return None
    if field is not None and hasattr(state, field):
        return np.asarray(getattr(state, field))
    return np.asarray(jtu.tree_leaves(state)[0])


def _centred(face, axis: int, boundary: str):
    """A C-grid face velocity averaged to cell centres along ``axis``.

    ``face[i]`` sits on the east (north) face of cell ``i``; the west face of
    cell 0 is the last face on a periodic axis and a wall (zero) otherwise.
    """
    face = np.asarray(face, dtype=float)
    if boundary == "periodic":
        west = np.roll(face, 1, axis=axis)
    else:
        west = np.moveaxis(face, axis, 0)
        west = np.moveaxis(
            np.concatenate([np.zeros_like(west[:1]), west[:-1]]), 0, axis
        )
    return 0.5 * (face + west)


def _station_panel(ax, analysis, obs, *, field, units, time_units, n_stations=3):
    """Observations and the background/analysis equivalents $H(x(t_k))$ at the
    ``n_stations`` best-observed sensors (equivalents are $y - (y - Hx)$, so they
    exist where an observation does)."""
    y = np.asarray(obs.values, dtype=float)
    t = np.asarray(obs.times, dtype=float)
    pos = np.asarray(obs.positions)
    counts = np.sum(~np.isnan(y), axis=0)
    chosen = np.argsort(-counts, kind="stable")[: min(n_stations, y.shape[1])]
    hb = y - np.asarray(analysis.obs_minus_background, dtype=float)
    ha = y - np.asarray(analysis.obs_minus_analysis, dtype=float)
    for colour, j in enumerate(chosen):
        where = ", ".join(f"{p:.3g}" for p in pos[j])
        c = f"C{colour}"
        ax.plot(t, y[:, j], "o", color=c, ms=4, label=f"obs, sensor {j} ({where})")
        ax.plot(t, hb[:, j], "--", color=c, lw=1.0)
        ax.plot(t, ha[:, j], "-", color=c, lw=1.5)
    ax.plot([], [], "k--", lw=1.0, label="background")
    ax.plot([], [], "k-", lw=1.5, label="analysis")
    ax.set_xlabel(f"time [{time_units}]" if time_units else "time")
    name = field or "state"
    ax.set_ylabel(f"{name} [{units}]" if units else name)
    ax.set_title("station time series")
    ax.legend(fontsize=7)


def _vector_panel(ax, state, grid, *, xlabel, ylabel, speed_units, max_arrows=16):
    """Quiver of the analysed velocity $(u, v)$ at cell centres, at most
    ``max_arrows`` arrows per axis."""
    axis_x = grid.ndim - 1
    u = _centred(state.u, axis_x, grid.boundary[axis_x])
    v = np.asarray(state.v, dtype=float)
    if grid.ndim == 2:
        v = _centred(v, 0, grid.boundary[0])
        ys, xs = grid.axis_coords(0), grid.axis_coords(1)
    else:
        # 1D: v is the along-channel-invariant cross velocity, at the centres
        ys, xs = np.zeros(1), grid.axis_coords(0)
        u, v = u[None], v[None]
    sy = max(1, -(-len(ys) // max_arrows))
    sx = max(1, -(-len(xs) // max_arrows))
    X, Y = np.meshgrid(xs[::sx], ys[::sy])
    U, V = u[::sy, ::sx], v[::sy, ::sx]
    q = ax.quiver(X, Y, U, V, np.hypot(U, V), cmap="viridis")
    ax.figure.colorbar(
        q,
        ax=ax,
        shrink=0.8,
        label=f"speed [{speed_units}]" if speed_units else "speed",
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel if grid.ndim == 2 else "")
    ax.set_title("analysis velocity (u, v), window start")


def _savefig(fig, path) -> pathlib.Path:
    path = pathlib.Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    return path


def plot_analysis(
    analysis,
    grid,
    obs,
    path=None,
    *,
    truth: dict | None = None,
    title: str | None = None,
    units: str | None = None,
    length_units: str | None = None,
    time_units: str | None = None,
    speed_units: str | None = None,
):
    """The summary figure of ``analysis``: a :class:`matplotlib.figure.Figure`.

    Panels: the state at the window start (truth when known, background, analysis
    with its posterior ±2σ band, sensor positions) and at the window end with the
    last observations, the cost convergence and the first parameter's convergence
    (with the truth and the posterior ±2σ interval), the station time series of
    the three best-observed sensors (observations, background and analysis
    equivalents) and, for a state with velocities ``u`` and ``v`` (shallow
    water), a quiver of the analysed velocity at cell centres. Axes are labelled
    ``name [units]``.

    Args:
        analysis: an :class:`assimilation.Analysis`.
        grid: the model grid.
        obs: the :class:`assimilation.Observations` assimilated.
        path: if given, the figure is also written there (atomically; the format
            from the suffix, e.g. ``.png``).
        truth: for twin experiments, ``{"state0", "final", "parameters"}``.
        title: the figure title (default: the analysis message).
        units: units of the observed field (axis labels).
        length_units: units of positions (axis labels).
        time_units: units of model time (axis labels).
        speed_units: units of velocities (the quiver's colour bar).

    Returns:
        The figure (built without pyplot: nothing to close, safe in threads).
    """
    from matplotlib.figure import Figure

    def axis_label(name, u):
        return f"{name} [{u}]" if u else name

    xlabel = axis_label("x", length_units)
    ylabel_pos = axis_label("y", length_units)
    field = getattr(obs, "field", None)
    params = list(analysis.parameters)
    state = analysis.initial_state
    vectors = hasattr(state, "u") and hasattr(state, "v")
    fig = Figure(figsize=(11, 10.5), layout="constrained")
    axes = fig.subplot_mosaic(
        [
            ["x0", "x1"],
            ["cost", "par"],
            ["stations", "vectors" if vectors else "stations"],
        ]
    )
    ax_x0, ax_x1, ax_cost, ax_par = (axes[k] for k in ("x0", "x1", "cost", "par"))
    _station_panel(
        axes["stations"],
        analysis,
        obs,
        field=field,
        units=units,
        time_units=time_units,
    )
    if vectors:
        _vector_panel(
            axes["vectors"],
            state,
            grid,
            xlabel=xlabel,
            ylabel=ylabel_pos,
            speed_units=speed_units,
        )
    pos = np.asarray(obs.positions)
    truth = truth or {}
    states0 = [
        ("truth", _first_field(truth.get("state0"), field), "k-"),
        ("background", _first_field(analysis.background_state, field), "C0--"),
        ("analysis", _first_field(analysis.initial_state, field), "C3-"),
    ]
    finals = [
        ("truth", _first_field(truth.get("final"), field), "k-"),
        (
            "background forecast",
            _first_field(analysis.background_final_state, field),
            "C0--",
        ),
        ("analysis forecast", _first_field(analysis.final_state, field), "C3-"),
    ]
    if grid.ndim == 1:
        (x,) = [grid.axis_coords(0)]
        for ax, states, when in (
            (ax_x0, states0, "window start"),
            (ax_x1, finals, "window end"),
        ):
            for label, u, style in states:
                if u is not None:
                    ax.plot(x, u, style, label=label, lw=1.5)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(axis_label(field or "state", units))
            ax.set_title(f"state at the {when}")
        if analysis.initial_state_std is not None and field is None:
            ua = _first_field(analysis.initial_state)
            s = np.asarray(analysis.initial_state_std)
            ax_x0.fill_between(
                x, ua - 2 * s, ua + 2 * s, color="C3", alpha=0.2, label="analysis ±2σ"
            )
        for ax in (ax_x0, ax_x1):
            for p in pos[:, 0]:
                ax.axvline(p, color="0.6", lw=0.8, zorder=0)
        last = np.asarray(obs.values)[-1]
        ax_x1.plot(
            pos[:, 0],
            last,
            "o",
            color="C2",
            ms=5,
            label=f"observations at t={float(np.asarray(obs.times)[-1]):.3g}",
        )
        ax_x0.plot([], [], color="0.6", lw=0.8, label="sensors")
        ax_x0.legend(fontsize=8)
        ax_x1.legend(fontsize=8)
    else:
        y, x = grid.axis_coords(0), grid.axis_coords(1)
        ua = _first_field(analysis.initial_state, field)
        ut = _first_field(truth.get("state0"), field)
        lo, hi = np.nanmin(ua), np.nanmax(ua)
        if ut is not None:
            lo, hi = min(lo, np.nanmin(ut)), max(hi, np.nanmax(ut))
        for ax, u, name in (
            (
                ax_x0,
                ut
                if ut is not None
                else _first_field(analysis.background_state, field),
                "truth" if ut is not None else "background",
            ),
            (ax_x1, ua, "analysis"),
        ):
            im = ax.pcolormesh(x, y, u, vmin=lo, vmax=hi, shading="nearest")
            ax.plot(pos[:, 1], pos[:, 0], "w^", ms=5, mec="k", label="sensors")
            ax.set_title(f"{name}, window start")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel_pos)
            ax.set_aspect("equal")
            fig.colorbar(
                im, ax=ax, shrink=0.8, label=axis_label(field or "state", units)
            )
        ax_x0.legend(fontsize=8, loc="upper right")

    hist = analysis.history
    it = np.arange(hist.n_iterations + 1)
    for key, style in (
        ("cost", "k-o"),
        ("background_cost", "C0--"),
        ("obs_cost", "C3--"),
    ):
        values = np.asarray(getattr(hist, key), dtype=float)
        values = np.where(values > 0, values, np.nan)  # J_b = 0 at the background
        ax_cost.semilogy(it, values, style, label=key.replace("_", " "), ms=3)
    ax_cost.set_xlabel("iteration")
    ax_cost.set_title("cost convergence")
    ax_cost.legend(fontsize=8)

    if params:
        name = params[0]
        h = np.asarray(hist.parameters[name])
        t = truth.get("parameters", {}).get(name)
        if h.ndim == 1:
            ax_par.plot(it, h, "C3-o", ms=3, label=f"{name} (analysis)")
            if analysis.parameter_std is not None:
                m = float(np.asarray(analysis.parameters[name]))
                s = float(np.asarray(analysis.parameter_std[name]))
                ax_par.axhspan(
                    m - 2 * s, m + 2 * s, color="C3", alpha=0.15, label="posterior ±2σ"
                )
            if t is not None:
                ax_par.axhline(float(np.asarray(t)), color="k", lw=1.2, label="truth")
            ax_par.set_xlabel("iteration")
            ax_par.set_title(f"{name} convergence")
        elif grid.ndim == 1:
            xg = grid.axis_coords(0)
            ax_par.plot(
                xg,
                np.asarray(analysis.background_parameters[name]),
                "C0--",
                label="background",
            )
            a = np.asarray(analysis.parameters[name])
            ax_par.plot(xg, a, "C3-", label="analysis")
            if analysis.parameter_std is not None:
                s = np.asarray(analysis.parameter_std[name])
                ax_par.fill_between(
                    xg, a - 2 * s, a + 2 * s, color="C3", alpha=0.2, label="±2σ"
                )
            if t is not None:
                ax_par.plot(xg, np.asarray(t), "k-", label="truth")
            ax_par.set_xlabel(xlabel)
            ax_par.set_title(f"{name} field")
        else:
            im = ax_par.pcolormesh(
                grid.axis_coords(1),
                grid.axis_coords(0),
                np.asarray(analysis.parameters[name]),
                shading="nearest",
            )
            fig.colorbar(im, ax=ax_par, shrink=0.8)
            ax_par.set_title(f"{name} field (analysis)")
        ax_par.legend(fontsize=8)
    else:
        ax_par.axis("off")
    ax_cost.set_ylabel("J")
    fig.suptitle(title or analysis.message, fontsize=9)
    if path is not None:
        _savefig(fig, path)
    return fig
