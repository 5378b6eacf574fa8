"""Public finite-difference / finite-volume operators (see ``dphys._operators``)."""

from ._operators import (
    divergence as divergence,
    face_flux as face_flux,
    gradient as gradient,
    laplacian as laplacian,
    pad_axis as pad_axis,
)
from ._roll import roll as roll
