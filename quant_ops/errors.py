"""The package's own error types, so callers can catch toolkit failures apart from MXNet's."""


class QuantOpsError(Exception):
    """Any error the toolkit raises on bad input, configuration or environment."""


class BuildError(QuantOpsError):
    """The C++ operator library could not be found, built or loaded."""
