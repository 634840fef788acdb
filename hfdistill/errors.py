"""One error hierarchy for the whole package (the CLI maps it to exit codes).

    HfdistillError                      anything hfdistill raises on purpose
    ├── BadInputError (ValueError)      the input does not fit: the CLI exits 2, before training
    │   ├── RecipeError                 a recipe field (``path`` names it: ``terms[1].params.alpha``)
    │   │   └── OverrideError           a ``--dotted.key value`` override
    │   ├── LossParamError              a loss's parameter (``param``; the recipe adds the term's path)
    │   ├── AdapterError                an adapter's parameter or shapes
    │   ├── DistillationError           models, taps, shapes and data that do not fit the recipe
    │   │   └── TapError                a tap that does not exist (lists the closest real paths)
    │   └── ResultFolderError           a folder that is not a finished result
    └── HubError (RuntimeError)         the Hub: ``reason`` says what (bad-input reasons exit 2)

Every message says what is wrong and what would fix it, in one paragraph.
"""

from __future__ import annotations


class HfdistillError(Exception):
    """Base of every error hfdistill raises on purpose."""


class BadInputError(HfdistillError, ValueError):
    """The user's input (recipe, models, data, arguments) cannot be used; the CLI exits with code 2."""


class RecipeError(BadInputError):
    """A recipe that cannot be used; ``path`` is the offending field (``terms[1].adapter``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"recipe error at {path}: {message}" if path else f"recipe error: {message}")


class OverrideError(RecipeError):
    """A ``--dotted.key value`` override that does not fit the recipe."""


class LossParamError(BadInputError):
    """A loss parameter out of its domain. ``param`` names it; the recipe prefixes the term's field path."""

    def __init__(self, param: str, message: str):
        self.param = param
        self.message = message
        super().__init__(f"parameter {param!r}: {message}")


class AdapterError(BadInputError):
    """An adapter that cannot be built (unknown parameter, shapes it cannot map)."""


class DistillationError(BadInputError):
    """The models, taps, shapes or data do not fit the recipe; the message says what would."""


class TapError(DistillationError):
    """A tap that does not exist on its model; the message lists the closest real paths."""


class ResultFolderError(BadInputError):
    """A folder given as a finished result (``hfdistill push``) that is not one."""


class TrainingDivergedError(HfdistillError, RuntimeError):
    """Training produced a non-finite (NaN or inf) loss, gradient or weight; it stopped, and nothing
    non-finite was saved as a result. The message names the term and the step."""


class HubError(HfdistillError, RuntimeError):
    """Something on the Hub side failed; the message says what and what to do.

    ``reason`` is one of ``unreachable``, ``offline``, ``auth``, ``forbidden``, ``not_found``, ``gated``,
    ``revision``, ``invalid``, ``token_leak`` or ``http``; :data:`HUB_BAD_INPUT_REASONS` are the ones
    that mean the input named something that cannot be had (exit 2), not a failed push.
    """

    def __init__(self, message: str, reason: str = "http"):
        super().__init__(message)
        self.reason = reason

    @property
    def is_bad_input(self) -> bool:
        return self.reason in HUB_BAD_INPUT_REASONS


HUB_BAD_INPUT_REASONS = ("not_found", "gated", "revision", "invalid", "offline")
