r"""Exact and reference solutions used to verify the PDE models.

Shallow water (:class:`pdes.ShallowWater`):

* :func:`c_grid_frequency`: the inertia-gravity-wave frequency of the C-grid
  semi-discretisation for one Fourier mode (derived by hand, independent of the
  model's code), and :func:`crank_nicolson_phase`, its image under the
  Crank-Nicolson rational function.
* :func:`gill_adjustment`: Gill's steady state after geostrophic adjustment of a
  height step (f-plane, infinite domain, linear).
* :func:`stoker_dam_break`: the exact Riemann solution of a dam break over a wet,
  flat bed (rarefaction, middle state, bore).

Everything here is NumPy (float64), for tests and examples; nothing is traced.
"""

from __future__ import annotations

import math

import numpy as np


def c_grid_frequency(k, l, *, g, depth, f, dx, dy=None):
    r"""Frequency $\omega \ge 0$ of the C-grid linear rotating shallow-water modes.

    For the mode $e^{i(kx + ly)}$ on a periodic C-grid with constant depth $H$, the
    semi-discrete operator's eigenvalues are $0$ (the geostrophic mode) and
    $\pm i\omega$ with

    $$ \omega^2 = f^2\cos^2\tfrac{k\Delta x}{2}\cos^2\tfrac{l\Delta y}{2}
       + gH\Big(\tfrac{4}{\Delta x^2}\sin^2\tfrac{k\Delta x}{2}
              + \tfrac{4}{\Delta y^2}\sin^2\tfrac{l\Delta y}{2}\Big). $$

    Derivation: on the half-shifted Fourier basis the gradient and divergence are
    both $i a = \tfrac{2i}{\Delta x}\sin\tfrac{k\Delta x}{2}$ (and $i b$ in $y$), and
    the four-point Coriolis average is $c = \cos\tfrac{k\Delta x}{2}
    \cos\tfrac{l\Delta y}{2}$, so the symbol is
    $\begin{pmatrix}0 & -iHa & -iHb\\ -iga & 0 & fc\\ -igb & -fc & 0\end{pmatrix}$
    with characteristic polynomial $\lambda(\lambda^2 + f^2c^2 + gH(a^2+b^2))$.
    In 1D pass ``l=0`` (and any ``dy``): $\omega^2 = f^2\cos^2\tfrac{k\Delta x}2 +
    gHa^2$.

    Args:
        k, l: angular wavenumbers [rad/m] (arrays broadcast).
        g: gravity [m/s^2]; depth: $H$ [m]; f: Coriolis parameter [1/s].
        dx, dy: grid spacings [m] (``dy`` defaults to ``dx``).

    Returns:
        $\omega$ [rad/s].
    """
    dy = dx if dy is None else dy
    k, l = np.asarray(k, float), np.asarray(l, float)
    a2 = (4.0 / dx**2) * np.sin(0.5 * k * dx) ** 2
    b2 = (4.0 / dy**2) * np.sin(0.5 * l * dy) ** 2
    c = np.cos(0.5 * k * dx) * np.cos(0.5 * l * dy)
    return np.sqrt(f**2 * c**2 + g * depth * (a2 + b2))


def c_grid_symbol(k, l, *, g, depth, f, dx, dy=None):
    """The $3\\times3$ symbol of :func:`c_grid_frequency` (half-shifted basis).

    Acts on the amplitudes $(\\hat\\eta, \\hat u, \\hat v)$ of
    $\\eta = \\hat\\eta e^{i(kx+ly)}$, $u = \\hat u e^{i(k(x+\\Delta x/2)+ly)}$,
    $v = \\hat v e^{i(kx+l(y+\\Delta y/2))}$ (cell centres, east and north faces).
    """
    dy = dx if dy is None else dy
    a = (2.0 / dx) * math.sin(0.5 * k * dx)
    b = (2.0 / dy) * math.sin(0.5 * l * dy)
    c = math.cos(0.5 * k * dx) * math.cos(0.5 * l * dy)
    return np.array(
        [
            [0.0, -1j * depth * a, -1j * depth * b],
            [-1j * g * a, 0.0, f * c],
            [-1j * g * b, -f * c, 0.0],
        ]
    )


def crank_nicolson_phase(omega, dt):
    r"""Phase advance per Crank-Nicolson step of a mode with frequency $\omega$.

    CN maps the eigenvalue $i\omega$ to $\mu = (1 + i\omega\Delta t/2)/(1 -
    i\omega\Delta t/2)$, $|\mu| = 1$, $\arg\mu = 2\arctan(\omega\Delta t/2)$.
    """
    return 2.0 * np.arctan(0.5 * np.asarray(omega) * dt)


def gill_adjustment(x, *, x_front, eta_left, eta_right, g, depth, f):
    r"""Gill's geostrophically adjusted state for a height step at ``x_front``.

    Linear f-plane shallow water with $\eta(x, 0) = \eta_L$ for $x<x_f$ and $\eta_R$
    beyond, fluid at rest: potential vorticity $v_x - f\eta/H$ is conserved, and the
    steady state it determines is

    $$ \eta = \bar\eta + \tfrac{\Delta}{2}\,\mathrm{sgn}(\xi)\,(1 - e^{-|\xi|/R}),
       \qquad v = \frac{g}{f}\,\frac{\Delta}{2R}\,e^{-|\xi|/R},\qquad u = 0, $$

    with $\xi = x - x_f$, $\Delta = \eta_R - \eta_L$, $\bar\eta =
    (\eta_L+\eta_R)/2$ and the deformation radius $R = \sqrt{gH}/f$. One third of the
    potential energy released is in the kinetic energy of this flow; the rest has
    left as inertia-gravity waves (Gill 1982, section 7.3).

    Returns:
        ``(eta, v)`` at the points ``x``.

    References:
        Gill (1982), "Atmosphere-Ocean Dynamics", Academic Press, section 7.3.
    """
    x = np.asarray(x, float)
    radius = math.sqrt(g * depth) / abs(f)
    xi = x - x_front
    jump = eta_right - eta_left
    decay = np.exp(-np.abs(xi) / radius)
    eta = 0.5 * (eta_left + eta_right) + 0.5 * jump * np.sign(xi) * (1.0 - decay)
    v = (g / f) * 0.5 * jump / radius * decay
    return eta, v


def stoker_middle_state(h_left, h_right, g):
    r"""Middle depth $h_m$ and velocity $u_m$ of a wet-bed dam break.

    The left state connects to the middle one by a rarefaction
    ($u_m = 2(\sqrt{gh_L} - \sqrt{gh_m})$), the middle state to the right one by a
    bore obeying the mass and momentum jump conditions
    ($u_m = (h_m - h_R)\sqrt{g(h_m+h_R)/(2h_m h_R)}$). Solved by bisection to
    round-off.
    """
    if not (h_left > h_right > 0):
        raise ValueError(
            f"`h_left` > `h_right` > 0 is needed (wet bed, dam on the left), got "
            f"h_left={h_left}, h_right={h_right}."
        )

    def mismatch(h):
        rare = 2.0 * (math.sqrt(g * h_left) - math.sqrt(g * h))
        bore = (h - h_right) * math.sqrt(g * (h + h_right) / (2.0 * h * h_right))
        return rare - bore

    lo, hi = h_right, h_left
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mismatch(mid) > 0:
            lo = mid
        else:
            hi = mid
    h_m = 0.5 * (lo + hi)
    u_m = 2.0 * (math.sqrt(g * h_left) - math.sqrt(g * h_m))
    return h_m, u_m


def stoker_dam_break(x, t, *, h_left, h_right, x_dam, g):
    r"""Exact depth and velocity of a dam break over a wet flat bed (Stoker 1957).

    Returns ``(h, u, fronts)`` at points ``x`` and time ``t > 0``, where ``fronts``
    is a dict with the rarefaction head and tail and the bore position, and the
    middle state ``h_m``, ``u_m`` and bore speed ``s = h_m u_m/(h_m - h_R)``.

    References:
        Stoker (1957), "Water Waves", Interscience, chapter 10.
    """
    x = np.asarray(x, float)
    h_m, u_m = stoker_middle_state(h_left, h_right, g)
    c_l, c_m = math.sqrt(g * h_left), math.sqrt(g * h_m)
    s = h_m * u_m / (h_m - h_right)
    head = x_dam - c_l * t
    tail = x_dam + (u_m - c_m) * t
    bore = x_dam + s * t
    xi = (x - x_dam) / t
    # Inside the rarefaction: u = 2/3 (c_L + xi), c = (2 c_L - xi) / 3.
    c_fan = (2.0 * c_l - xi) / 3.0
    h = np.where(
        x < head,
        h_left,
        np.where(x < tail, c_fan**2 / g, np.where(x < bore, h_m, h_right)),
    )
    u = np.where(
        x < head,
        0.0,
        np.where(x < tail, 2.0 / 3.0 * (c_l + xi), np.where(x < bore, u_m, 0.0)),
    )
    fronts = {"head": head, "tail": tail, "bore": bore, "h_m": h_m, "u_m": u_m, "s": s}
    return h, u, fronts
