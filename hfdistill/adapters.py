"""Adapters: small trainable modules that map a student tap to the teacher tap's shape.

Each adapter is built from the two shapes seen in the trainer's dry-run forward
(``student_shape``, ``teacher_shape``, batch dimension included) plus its recipe parameters.
Adapters are optimised with the student and live in Trainer checkpoints, never in the saved student.

Errors: an unknown adapter, an unknown parameter, a parameter value out of its domain and shapes an
adapter cannot map all raise :class:`hfdistill.errors.AdapterError` (a bad-input error: the CLI exits 2).
:func:`check_adapter_params` checks a recipe's parameters without the shapes, before anything runs.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError

_ADAPTERS: dict[str, type[nn.Module]] = {}

RESIZE_MODES = ("auto", "pool", "bilinear")


# Parameter checks, one per parameter kind; each returns an error text or None.
def _is_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _is_resize_mode(value: Any) -> str | None:
    return None if isinstance(value, str) and value in RESIZE_MODES else f"must be one of {', '.join(RESIZE_MODES)}, got {value!r}"


def _is_positive_int_or_none(value: Any) -> str | None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if ok else f"must be an integer >= 1 or null, got {value!r}"


def register_adapter(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _ADAPTERS:
            raise ValueError(f"adapter {name!r} is registered twice")
        _ADAPTERS[name] = cls
        return cls

    return decorator


def available_adapters() -> list[str]:
    return sorted(_ADAPTERS)


def _get(name: str) -> type[nn.Module]:
    if name not in _ADAPTERS:
        raise AdapterError(f"unknown adapter {name!r}; registered adapters: {', '.join(available_adapters())}")
    return _ADAPTERS[name]


def get_adapter_params(name: str) -> tuple[str, ...]:
    """The recipe parameters of an adapter (its constructor's keywords after the two shapes)."""
    signature = inspect.signature(_get(name).__init__)
    return tuple(p for p in signature.parameters if p not in ("self", "student_shape", "teacher_shape"))


def _param_error(key: str, message: str) -> AdapterError:
    error = AdapterError(message)
    error.param = key  # the recipe validator reports it at terms[i].adapter_params.<param>
    return error


def check_adapter_params(name: str, params: dict) -> None:
    """Check an adapter's recipe parameters (names and values) without building it.

    Raises AdapterError; for a parameter's name or value its ``param`` attribute names the parameter.
    """
    cls = _get(name)
    allowed = get_adapter_params(name)
    for key, value in params.items():
        if key not in allowed:
            raise _param_error(
                key, f"adapter {name!r} has no parameter {key!r}; its parameters are: {', '.join(allowed) or 'none'}"
            )
        check = getattr(cls, "param_checks", {}).get(key)
        problem = check(value) if check is not None else None
        if problem:
            raise _param_error(key, f"adapter {name!r}: parameter {key!r} {problem}")


def build_adapter(name: str, student_shape: torch.Size, teacher_shape: torch.Size, **params) -> nn.Module:
    """Build adapter ``name`` for these shapes; AdapterError for an unknown name, parameter or value, or shapes it cannot map."""
    check_adapter_params(name, params)
    return _get(name)(torch.Size(student_shape), torch.Size(teacher_shape), **params)


def suggest_adapter(student_shape: torch.Size, teacher_shape: torch.Size) -> str:
    """The adapter a user most likely wants for these shapes (for error messages)."""
    if len(student_shape) == 4 and len(teacher_shape) == 4:
        return "conv1x1" if student_shape[2:] == teacher_shape[2:] else "conv1x1 (it also resizes) or conv_reg"
    if len(student_shape) == len(teacher_shape) and student_shape[:-1] == teacher_shape[:-1]:
        return "linear"
    return "a matching tap, or a method that compares relations (pkt, rkd, sp)"


def resize_spatial(x: torch.Tensor, size: tuple[int, int], mode: str = "auto") -> torch.Tensor:
    """Resize a [B, C, H, W] map to ``size``: average pooling to shrink, bilinear to grow."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
    if mode == "pool" or (mode == "auto" and shrink):
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _require_ndim(name: str, shape: torch.Size, allowed: tuple[int, ...], which: str) -> None:
    if len(shape) not in allowed:
        raise AdapterError(
            f"adapter {name!r} takes {' or '.join(f'{n}-d' for n in allowed)} tensors, "
            f"but the {which} tap has shape {tuple(shape)}; pick an adapter for that shape (linear or mlp map "
            "the last dimension of any tensor)"
        )


@register_adapter("identity")
class IdentityAdapter(nn.Module):
    """No-op; the shapes must already agree."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register_adapter("linear")
class LinearAdapter(nn.Module):
    """A linear map of the last (feature) dimension: [B, D_s] or [B, T, D_s] -> D_t; for [B, C, H, W] the channels."""

    param_checks = {"bias": _is_bool}

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, bias: bool = True):
        super().__init__()
        _require_ndim("linear", student_shape, (2, 3, 4), "student")
        self.channels_first = len(student_shape) == 4
        s_dim = student_shape[1] if self.channels_first else student_shape[-1]
        t_dim = teacher_shape[1] if self.channels_first else teacher_shape[-1]
        self.proj = nn.Linear(s_dim, t_dim, bias=bias)
        self.spatial = tuple(teacher_shape[2:]) if self.channels_first and len(teacher_shape) == 4 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = self.proj(x.movedim(1, -1)).movedim(-1, 1)
            return resize_spatial(x, self.spatial) if self.spatial else x
        return self.proj(x)


@register_adapter("conv1x1")
class Conv1x1Adapter(nn.Module):
    """1x1 convolution from student to teacher channels, optional BatchNorm, spatial resize when sizes differ."""

    param_checks = {"bn": _is_bool, "resize": _is_resize_mode}

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, bn: bool = True, resize: str = "auto"):
        super().__init__()
        _require_ndim("conv1x1", student_shape, (4,), "student")
        _require_ndim("conv1x1", teacher_shape, (4,), "teacher")
        self.conv = nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1, bias=not bn)
        self.bn = nn.BatchNorm2d(teacher_shape[1]) if bn else nn.Identity()
        self.size = tuple(teacher_shape[2:])
        self.resize = resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(resize_spatial(x, self.size, self.resize)))


@register_adapter("conv_reg")
class ConvRegressor(nn.Module):
    """FitNet's convolutional regressor (Romero et al., ICLR 2015): conv -> BN -> ReLU.

    Like the paper, the kernel is chosen so the output matches the teacher's spatial size: a
    3x3 conv when sizes agree, a stride-2 3x3 conv when the student map is twice as large, a
    stride-2 transposed conv when it is half as large, a valid ``(Hs-Ht+1)`` conv when larger by
    another amount, and bilinear upsampling plus 3x3 otherwise. The BN and ReLU follow the
    regressor of the RepDistiller reference code (the paper only specifies the conv).
    """

    param_checks = {"relu": _is_bool}

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, relu: bool = True):
        super().__init__()
        _require_ndim("conv_reg", student_shape, (4,), "student")
        _require_ndim("conv_reg", teacher_shape, (4,), "teacher")
        (_, cs, hs, ws), (_, ct, ht, wt) = student_shape, teacher_shape
        self.upsample_to = None
        if (hs, ws) == (ht, wt):
            self.conv = nn.Conv2d(cs, ct, 3, padding=1)
        elif (hs, ws) == (2 * ht, 2 * wt):
            self.conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
        elif (2 * hs, 2 * ws) == (ht, wt):
            self.conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, (hs - ht + 1, ws - wt + 1))
        else:
            self.upsample_to = (ht, wt)
            self.conv = nn.Conv2d(cs, ct, 3, padding=1)
        self.bn = nn.BatchNorm2d(ct)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample_to is not None:
            x = resize_spatial(x, self.upsample_to)
        return self.relu(self.bn(self.conv(x)))


@register_adapter("mlp")
class MLPAdapter(nn.Module):
    """Two linear layers with a GELU between them, on the last dimension (channels for 4-d maps)."""

    param_checks = {"hidden": _is_positive_int_or_none}

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, hidden: int | None = None):
        super().__init__()
        _require_ndim("mlp", student_shape, (2, 3, 4), "student")
        self.channels_first = len(student_shape) == 4
        s_dim = student_shape[1] if self.channels_first else student_shape[-1]
        t_dim = teacher_shape[1] if self.channels_first else teacher_shape[-1]
        hidden = hidden or max(s_dim, t_dim)
        self.net = nn.Sequential(nn.Linear(s_dim, hidden), nn.GELU(), nn.Linear(hidden, t_dim))
        self.spatial = tuple(teacher_shape[2:]) if self.channels_first and len(teacher_shape) == 4 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = self.net(x.movedim(1, -1)).movedim(-1, 1)
            return resize_spatial(x, self.spatial) if self.spatial else x
        return self.net(x)


@register_adapter("resize")
class ResizeAdapter(nn.Module):
    """Spatial resizing only (no parameters): pool or interpolate [B, C, H, W] to the teacher's H x W."""

    param_checks = {"mode": _is_resize_mode}

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, mode: str = "auto"):
        super().__init__()
        _require_ndim("resize", student_shape, (4,), "student")
        _require_ndim("resize", teacher_shape, (4,), "teacher")
        self.size = tuple(teacher_shape[2:])
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_spatial(x, self.size, self.mode)
