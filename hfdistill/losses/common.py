"""Small helpers shared by the loss families: parameter checks, channel counts, position pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_positive(loss: str, name: str, value: float) -> None:
    """A hyper-parameter that must be a finite number > 0 (temperatures, scales)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{loss}: {name} must be a finite number > 0, got {value!r}")


def check_non_negative(loss: str, **values: float) -> None:
    """Hyper-parameters that must be >= 0 (loss weights inside a method)."""
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{loss}: {name} must be >= 0, got {value}")


def channels(shape: torch.Size) -> int:
    """Channel count of a feature shape: dim 1 of [B, C, H, W], the last dim of [B, D] and [B, T, D]."""
    return shape[1] if len(shape) == 4 else shape[-1]


def positions(x: torch.Tensor) -> tuple[int, ...]:
    """The positional size of a feature: (H, W) for [B, C, H, W], (T,) for [B, T, D], () for [B, D]."""
    if x.dim() == 4:
        return tuple(x.shape[2:])
    if x.dim() == 3:
        return (x.shape[1],)
    return ()


def pool_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of the positions of a [B, C, H, W] map or a [B, T, D] sequence."""
    if positions(x) == tuple(size) or x.dim() < 3:
        return x
    if x.dim() == 4:
        return F.adaptive_avg_pool2d(x, size)
    return F.adaptive_avg_pool1d(x.transpose(1, 2), size[0]).transpose(1, 2)


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever of two same-rank features has more positions down to the smaller size (per axis)."""
    if a.dim() != b.dim():
        raise ValueError(f"student {tuple(a.shape)} and teacher {tuple(b.shape)} have different ranks")
    size = tuple(min(p, q) for p, q in zip(positions(a), positions(b)))
    return pool_to(a, size), pool_to(b, size)
