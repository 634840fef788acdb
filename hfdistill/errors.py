"""Errors that mean the input (models, taps, shapes, recipe) does not fit: the CLI exits with code 2."""


class DistillationError(ValueError):
    """The models, taps or shapes do not fit the recipe; the message says what would."""
