"""hfdistill: knowledge distillation for the Hugging Face ecosystem.

The public API: :class:`DistillationTrainer` and :class:`DistillationConfig` (a ``transformers.Trainer``
that distils), :class:`Recipe` (a distillation as plain data), :func:`run` (a whole run from a recipe,
what ``hfdistill train`` does), :func:`load_model`, the loss registry :mod:`hfdistill.losses`, and the
errors (:class:`BadInputError` and its branches, :class:`HubError`).

Note: ``hfdistill.run`` is the function; the module that holds it is reached as
``from hfdistill.run import check, RunResult, ...``.
"""

from . import losses
from .config import DistillationConfig
from .errors import BadInputError, DistillationError, HfdistillError, HubError, RecipeError
from .models import load_model
from .recipe import Recipe
from .run import RunInterrupted, RunResult
from .run import run  # noqa: E402 - after the submodule import above: `hfdistill.run` is the function
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "BadInputError",
    "DistillationConfig",
    "DistillationError",
    "DistillationTrainer",
    "HfdistillError",
    "HubError",
    "Recipe",
    "RecipeError",
    "RunInterrupted",
    "RunResult",
    "load_model",
    "losses",
    "run",
]
