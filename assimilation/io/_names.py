"""Names of the dimensions and variables of the DA files, in one place."""

STATION_DIM = "station"
SIGMA_NAME = "sigma"
ITERATION_DIM = "iteration"
PARAMETER_DIM = "parameter"

# CF standard names (table version 84) that the models' fields can carry, with
# their canonical units. A configured name in this table is checked against the
# field's units; any other well-formed name is written as given (the CF table is
# too large to ship; `cfchecks` validates it).
STANDARD_NAME_UNITS = {
    "sea_surface_temperature": "K",
    "sea_water_temperature": "K",
    "air_temperature": "K",
    "sea_surface_height_above_geoid": "m",
    "sea_surface_height_above_mean_sea_level": "m",
    "sea_surface_height_above_reference_ellipsoid": "m",
    "eastward_sea_water_velocity": "m s-1",
    "northward_sea_water_velocity": "m s-1",
    "sea_water_x_velocity": "m s-1",
    "sea_water_y_velocity": "m s-1",
    "eastward_wind": "m s-1",
    "northward_wind": "m s-1",
    "x_wind": "m s-1",
    "y_wind": "m s-1",
}
# The CF modifier for an uncertainty (posterior or observation error std).
STANDARD_ERROR = "standard_error"
