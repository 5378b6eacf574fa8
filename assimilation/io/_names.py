"""Names of the dimensions and variables of the DA files, in one place."""

STATION_DIM = "station"
SIGMA_NAME = "sigma"
ITERATION_DIM = "iteration"
PARAMETER_DIM = "parameter"
