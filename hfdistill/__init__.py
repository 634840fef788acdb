"""hfdistill: knowledge distillation for the Hugging Face ecosystem."""

from . import losses
from .config import DistillationConfig
from .hub import HubError
from .models import load_model
from .recipe import Recipe, RecipeError
from .trainer import DistillationError, DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "DistillationConfig",
    "DistillationError",
    "DistillationTrainer",
    "HubError",
    "Recipe",
    "RecipeError",
    "load_model",
    "losses",
]
