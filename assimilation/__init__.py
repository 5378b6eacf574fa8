"""Variational data assimilation and calibration on top of :mod:`pdes`/:mod:`dphys`."""

from ._observation import Observations as Observations
