"""features losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_loss
