"""The benchmark problems of benchmarks/README.md (P1, P2, P6) in plain NumPy.

Everything a benchmark needs to check an answer lives here and is independent of the
code being measured: initial states, the exact solution of the *discrete* scheme (per
Fourier mode, $\\hat u_k \\leftarrow G_k^n \\hat u_k$), the exact PDE solution, the
sensor lattice of the P5 cost and its observations.

Grid convention (as in :class:`dphys.Grid`): arrays are indexed ``[iy, ix]`` (the last
axis is ``x``), nodes at ``x_i = i/N`` on the periodic unit interval/square.
"""

from __future__ import annotations

import dataclasses

import numpy as np


GOLDEN = 0.6180339887
SILVER = 0.4142135624
N_OBS = 10  # observation times of the P5 cost


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Attributes:
        name: ``"P1"``, ``"P2"`` or ``"P6"``.
        title: a short description.
        ndim: 1 or 2.
        n: grid points per axis.
        dt: time step.
        steps: number of steps of the forward benchmark.
        theta: 1 (backward Euler) or 1/2 (Crank-Nicolson).
        kappa: true diffusivity, a float or an ``(n, n)`` field (P6).
        n_sensors: number of sensors of the P5 cost (64: 1D evenly spaced, 2D 8x8).
    """

    name: str
    title: str
    ndim: int
    n: int
    dt: float
    steps: int
    theta: float
    kappa: float | np.ndarray
    n_sensors: int = 64

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n,) * self.ndim

    @property
    def variable(self) -> bool:
        return np.ndim(self.kappa) > 0

    @property
    def stepper_name(self) -> str:
        return "BackwardEuler" if self.theta == 1.0 else "CrankNicolson"

    # ------------------------------------------------------------------ states
    def coords(self) -> tuple[np.ndarray, ...]:
        """``(x,)`` in 1D, ``(y, x)`` in 2D (``ij`` indexing, last axis x)."""
        axis = np.arange(self.n) / self.n
        if self.ndim == 1:
            return (axis,)
        y, x = np.meshgrid(axis, axis, indexing="ij")
        return (y, x)

    def modes(self) -> list[tuple[float, tuple[int, ...], float]]:
        """``(amplitude, wavevector, phase)`` of every mode of ``u0``.

        The wavevector is ``(k,)`` in 1D and ``(k_y, k_x)`` in 2D.
        """
        out = []
        if self.ndim == 1:
            for k in range(1, 17):
                out.append((1.0 / k, (k,), 2 * np.pi * ((GOLDEN * k) % 1.0)))
        else:
            kmax = 8
            for kx in range(0, kmax + 1):
                for ky in range(-kmax, kmax + 1):
                    if kx > 0 or ky > 0:
                        phase = 2 * np.pi * ((GOLDEN * kx + SILVER * ky) % 1.0)
                        out.append((1.0 / (kx * kx + ky * ky), (ky, kx), phase))
        return out

    def u0(self) -> np.ndarray:
        """The initial state of benchmarks/README.md."""
        return self.exact_pde(0.0, kappa=0.0)

    def exact_pde(self, t: float, kappa: float | None = None) -> np.ndarray:
        r"""Exact PDE solution.

        $u = \sum_k a_k\cos(2\pi k\cdot x+\phi_k)\,e^{-\kappa(2\pi|k|)^2t}$.

        Only for constant ``kappa`` (P1, P2).
        """
        kappa = self.kappa if kappa is None else kappa
        if np.ndim(kappa) > 0:
            raise ValueError("`exact_pde` needs a constant `kappa` (P1/P2, not P6).")
        xs = self.coords()
        u = np.zeros(self.shape)
        for amp, kvec, phase in self.modes():
            arg = sum(k * xi for k, xi in zip(kvec, xs, strict=True))
            k2 = float(sum(k * k for k in kvec))
            decay = np.exp(-kappa * (2 * np.pi) ** 2 * k2 * t)
            u += amp * decay * np.cos(2 * np.pi * arg + phase)
        return u

    def perturbation(self) -> np.ndarray:
        """Smooth perturbation added to ``u0`` where the P5 cost is evaluated."""
        xs = self.coords()
        if self.ndim == 1:
            (x,) = xs
            return 0.2 * np.cos(2 * np.pi * 3 * x + 0.5) + 0.1 * np.sin(
                2 * np.pi * 7 * x
            )
        y, x = xs
        return 0.2 * np.cos(2 * np.pi * (2 * x + 3 * y) + 0.5) + 0.1 * np.sin(
            2 * np.pi * (5 * x - y)
        )

    # ---------------------------------------------------------- exact discrete
    def symbol(self, kappa: float | None = None) -> np.ndarray:
        r"""Eigenvalues on ``rfftn`` modes.

        $\lambda_k = -\kappa\sum_a (4/\Delta x^2)\sin^2(\pi k_a/N)$.
        """
        kappa = self.kappa if kappa is None else kappa
        n, dx = self.n, 1.0 / self.n
        full = -(4.0 / dx**2) * np.sin(np.pi * np.fft.fftfreq(n) * n / n) ** 2
        half = -(4.0 / dx**2) * np.sin(np.pi * np.fft.rfftfreq(n) * n / n) ** 2
        if self.ndim == 1:
            return kappa * half
        return kappa * (full[:, None] + half[None, :])

    def exact_discrete(self, u0: np.ndarray, n_steps: int, kappa=None) -> np.ndarray:
        r"""$n$ θ-method steps, exactly: $\hat u_k G_k^n$ with
        $G_k = (1 + (1-\theta)\Delta t\lambda_k) / (1 - \theta\Delta t\lambda_k)$."""
        lam = self.symbol(kappa)
        g = (1 + (1 - self.theta) * self.dt * lam) / (1 - self.theta * self.dt * lam)
        axes = tuple(range(self.ndim))
        uh = np.fft.rfftn(np.asarray(u0, dtype=np.float64), axes=axes)
        return np.fft.irfftn(uh * g**n_steps, s=self.shape, axes=axes)

    # ------------------------------------------------------------- P5 sensors
    def sensor_index(self) -> tuple[np.ndarray, ...]:
        """Index arrays of the sensors: 64 evenly spaced (1D) or an 8x8 lattice (2D)."""
        if self.ndim == 1:
            m = min(self.n_sensors, self.n)
            return ((np.arange(m) * self.n) // m,)
        m = min(int(round(np.sqrt(self.n_sensors))), self.n)
        idx = (np.arange(m) * self.n) // m
        iy, ix = np.meshgrid(idx, idx, indexing="ij")
        return (iy.ravel(), ix.ravel())

    def sense(self, u: np.ndarray) -> np.ndarray:
        """The observation operator H applied with NumPy (for making observations)."""
        return np.asarray(u)[self.sensor_index()]

    def obs_every(self, n_steps: int) -> int:
        """Steps between observations for a run of ``n_steps`` steps."""
        return max(1, n_steps // N_OBS)

    def obs_steps(self, n_steps: int) -> list[int]:
        every = self.obs_every(n_steps)
        return list(range(every, n_steps + 1, every))

    def observations(self, n_steps: int, reference=None) -> np.ndarray:
        """``y_k = H u(t_k)`` at the observation times of a run of ``n_steps`` steps.

        From the exact PDE solution with the true κ (P1, P2), or from
        ``reference(step) -> state`` (P6, the converged run).
        """
        ys = []
        for s in self.obs_steps(n_steps):
            if reference is None:
                ys.append(self.sense(self.exact_pde(s * self.dt)))
            else:
                ys.append(self.sense(reference(s)))
        return np.stack(ys)


def kappa_field_p6(n: int) -> np.ndarray:
    """P6: κ(x, y) = 1e-3 (1 + 0.5 sin(2πx) cos(2πy)) on the ``(n, n)`` grid."""
    axis = np.arange(n) / n
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return 1e-3 * (1.0 + 0.5 * np.sin(2 * np.pi * x) * np.cos(2 * np.pi * y))


def make_problem(name: str, *, size: str = "full") -> Problem:
    """The problem ``name`` at ``size`` ``"full"`` (benchmarks/README.md) or
    ``"tiny"``."""
    tiny = size == "tiny"
    if name == "P1":
        return Problem(
            "P1",
            "heat-1d, backward Euler, FFT-diagonal",
            1,
            64 if tiny else 4096,
            1e-3 if not tiny else 4e-2,
            20 if tiny else 1000,
            1.0,
            1e-3,
        )
    if name == "P2":
        return Problem(
            "P2",
            "heat-2d, Crank-Nicolson, FFT-diagonal",
            2,
            16 if tiny else 256,
            2e-2,
            20 if tiny else 200,
            0.5,
            1e-3,
        )
    if name == "P6":
        n = 16 if tiny else 256
        return Problem(
            "P6",
            "heat-2d variable coefficient, Crank-Nicolson, Krylov",
            2,
            n,
            2e-2,
            20 if tiny else 200,
            0.5,
            kappa_field_p6(n),
        )
    raise ValueError(f"`name` must be 'P1', 'P2' or 'P6', got {name!r}.")


def rel_l2(a, b) -> float:
    """Relative L2 error ``||a - b|| / ||b||``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
