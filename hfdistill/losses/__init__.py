"""Distillation losses: one registry (contract 1), one file per family.

>>> from hfdistill import losses
>>> losses.available()[:3]
>>> kd = losses.build("kd", temperature=4.0)
"""

from .registry import LossInfo, available, build, get_info, needs_teacher, register_loss

# Importing the family modules registers their losses.
from . import logits  # noqa: E402,F401
from . import features  # noqa: E402,F401
from . import relations  # noqa: E402,F401
from . import sequence  # noqa: E402,F401
from . import matching  # noqa: E402,F401
from . import contrastive  # noqa: E402,F401
from . import gradients  # noqa: E402,F401
from . import mutual  # noqa: E402,F401
from . import tokens  # noqa: E402,F401
from . import dense  # noqa: E402,F401

__all__ = ["LossInfo", "available", "build", "get_info", "needs_teacher", "register_loss"]
