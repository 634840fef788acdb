"""Small helpers shared by the loss families: parameter checks, safe KL, channel counts, position pooling, and
:class:`SparseLogits` (a teacher's top-k logits as a cache stores them).

Parameter checks raise :class:`hfdistill.errors.LossParamError` (``param`` names the parameter, the
message says what it must be and what it got); the recipe validator turns that into a recipe error at
``terms[i].params.<param>``, before anything trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ..errors import DistillationError, LossParamError


def _got(value: Any) -> str:
    """``value`` as a message shows it: its repr, plus its type when that is what is wrong."""
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
        return f"{value!r} (a {type(value).__name__})"
    return repr(value)


def _domain(minimum: float | None, maximum: float | None, exclusive: bool) -> str:
    lo, hi = ("(", ")") if exclusive else ("[", "]")
    if minimum is not None and maximum is not None:
        return f"in {lo}{minimum:g}, {maximum:g}{hi}"
    if minimum is not None:
        return f"{'>' if exclusive else '>='} {minimum:g}"
    if maximum is not None:
        return f"{'<' if exclusive else '<='} {maximum:g}"
    return ""


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive: bool = False,
    integer: bool = False,
    allow_none: bool = False,
) -> Any:
    """A finite number (an ``int`` when ``integer``) within ``[minimum, maximum]``; returns it (floats as float).

    ``exclusive=True`` makes the given bounds strict (``> minimum``, ``< maximum``). Booleans, strings,
    NaN and infinities are rejected; ``None`` only with ``allow_none``.
    """
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a finite number"
    domain = _domain(minimum, maximum, exclusive)
    want = f"must be {kind}{' ' + domain if domain else ''}{' or null' if allow_none else ''}"
    is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not is_number or not math.isfinite(value):
        raise LossParamError(name, f"{want}, got {_got(value)}")
    too_low = minimum is not None and (value <= minimum if exclusive else value < minimum)
    too_high = maximum is not None and (value >= maximum if exclusive else value > maximum)
    if too_low or too_high:
        raise LossParamError(name, f"{want}, got {value!r}")
    return value if integer else float(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of a few fixed strings (``mode: soft``)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        got = repr(value) if isinstance(value, str) else _got(value)
        raise LossParamError(name, f"must be one of {', '.join(repr(c) for c in choices)}, got {got}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A true/false switch (YAML ``true``/``false``, not a string or a number)."""
    if not isinstance(value, bool):
        raise LossParamError(name, f"must be true or false, got {_got(value)}")
    return value


def kl_from_log_probs(log_p_t: torch.Tensor, log_p_s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``KL(p_t || p_s) = sum_k p_t (log p_t - log p_s)`` along ``dim``, from log-probabilities.

    Entries where the teacher's probability is 0 (a masked class, logit ``-inf``) contribute 0, the
    limit of ``p log p``; both logs are replaced by 0 there *before* the product, so neither the value
    nor the gradients see ``0 * inf`` (a ``torch.where`` after the product would still give NaN
    gradients). Where the teacher has mass and the student has none the KL is ``+inf``, as it is.
    """
    p_t = log_p_t.exp()
    keep = p_t > 0
    zero = log_p_t.new_zeros(())
    return (p_t * (torch.where(keep, log_p_t, zero) - torch.where(keep, log_p_s, zero))).sum(dim)


def require_batch_for_bn(loss: str, training: bool, x: torch.Tensor | tuple[int, ...], what: str, fix: str) -> None:
    """BatchNorm in training needs more than one value per channel: batch x positions of ``x`` ([B, C, ...]).

    Raises :class:`DistillationError` naming the term's problem and ``fix`` (what the user can change)
    instead of PyTorch's raw "Expected more than 1 value per channel" message.
    """
    if not training:
        return
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)
    if shape[0] * math.prod(shape[2:]) < 2:
        raise DistillationError(
            f"{loss}: needs a batch of at least 2 examples in training: {what} is {shape}, and its "
            f"BatchNorm layers use batch statistics (one value per channel is not enough); {fix}"
        )


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
        raise DistillationError(
            f"student {tuple(a.shape)} and teacher {tuple(b.shape)} have different ranks; tap layers of the same "
            "kind (both [B, C, H, W] maps or both [B, T, D] sequences) or add an adapter"
        )
    size = tuple(min(p, q) for p, q in zip(positions(a), positions(b)))
    return pool_to(a, size), pool_to(b, size)


# =============================================================================================== sparse logits
@dataclass(frozen=True)
class SparseLogits:
    """A teacher's logits as a top-k: the k largest logits of each row, their classes and the rest's mass.

    ``values`` [..., k] (the raw logits z_i of the kept classes), ``indices`` [..., k] (their classes),
    ``rest_logmass`` [...] (``log m``, m = the softmax mass at temperature 1 of the ``num_classes - k`` other
    classes). This is what a teacher cache built with ``logits_top_k`` stores (for a language model: per token
    position). Losses that declare ``accepts_sparse_logits`` read it as it is (the token losses: exact on the
    kept classes, the other classes as one bucket); every other loss gets :meth:`dense` full logits.
    """

    values: torch.Tensor
    indices: torch.Tensor
    rest_logmass: torch.Tensor
    num_classes: int

    @property
    def shape(self) -> torch.Size:
        """The shape of the full logits this stands for: [..., num_classes]."""
        return torch.Size((*self.values.shape[:-1], self.num_classes))

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.values.device

    requires_grad = False  # stored teacher outputs: never differentiated

    def dim(self) -> int:
        return self.values.dim()

    def to(self, device: torch.device | str) -> "SparseLogits":
        return SparseLogits(self.values.to(device), self.indices.to(device), self.rest_logmass.to(device),
                            self.num_classes)

    def flat_rows(self, rows: torch.Tensor) -> "SparseLogits":
        """Rows ``rows`` of the flattened leading dims, in fp32/int64: values [n, k], indices [n, k], mass [n]."""
        k = self.k
        return SparseLogits(self.values.reshape(-1, k).index_select(0, rows).float(),
                            self.indices.reshape(-1, k).index_select(0, rows).long(),
                            self.rest_logmass.reshape(-1).index_select(0, rows).float(), self.num_classes)

    def log_normaliser(self) -> torch.Tensor:
        """``logsumexp`` of the full logits at temperature 1 [...], recovered from the kept part and the rest's
        mass: ``lse = logsumexp(z_kept) - log(1 - m)``."""
        return torch.logsumexp(self.values.float(), -1) - torch.log(-torch.expm1(self.rest_logmass.float()))

    def fill_value(self) -> torch.Tensor:
        """The logit each other class gets when the rest's mass is spread evenly over them [...]:
        ``f = lse + log m - log(C - k)``, so that ``sum_kept e^z_i + (C - k) e^f = e^lse``."""
        return self.log_normaliser() + self.rest_logmass.float() - math.log(self.num_classes - self.k)

    def dense(self) -> torch.Tensor:
        """Full fp32 logits [..., num_classes]: the kept classes keep their logits, every other class gets
        :meth:`fill_value`, so the softmax at temperature 1 is exact on the kept classes. Since the kept
        classes are the k largest, ``m / (C - k) <= p_k``: the filled value never outranks a kept one."""
        values = self.values.float()
        if self.k >= self.num_classes:
            out = torch.empty(*values.shape[:-1], self.num_classes, dtype=torch.float32, device=values.device)
            return out.scatter_(-1, self.indices.long(), values)
        fill = self.fill_value()
        out = fill.unsqueeze(-1).expand(*values.shape[:-1], self.num_classes).clone()
        return out.scatter_(-1, self.indices.long(), values)

    def bucket_logits(self, temperature: float = 1.0) -> torch.Tensor:
        """[..., k + 1]: the kept classes' logits and one bucket for all the others, divided by ``temperature``:
        ``log_softmax`` of it is the teacher's distribution over the kept classes and "any other class".

        Exact at temperature 1 (kept: ``log p_i``; bucket: ``log m``). At another temperature the other
        classes' own logits are unknown; they are taken as all equal to :meth:`fill_value` (the only thing the
        top-k keeps about them), so the bucket's logit is ``f / T + log(C - k)``.
        """
        values = self.values.float() / temperature
        if self.k >= self.num_classes:
            return values
        if temperature == 1.0:
            tail = self.log_normaliser() + self.rest_logmass.float()
        else:
            tail = self.fill_value() / temperature + math.log(self.num_classes - self.k)
        return torch.cat([values, tail.unsqueeze(-1)], -1)

    def student_bucket_logits(self, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The student's logits [..., C] (fp32) on the same buckets [..., k + 1]: its logits of the teacher's
        kept classes and ``logsumexp`` of all its other logits, divided by ``temperature`` (exact: the
        ``log_softmax`` of the result is the student's mass on each kept class and on all the others)."""
        z = student / temperature if temperature != 1.0 else student
        index = self.indices.long()
        kept = z.gather(-1, index)
        if self.k >= self.num_classes:
            return kept
        tail = torch.logsumexp(z.scatter(-1, index, float("-inf")), -1)
        return torch.cat([kept, tail.unsqueeze(-1)], -1)


def sparse_as_dense(value: Any) -> Any:
    """:class:`SparseLogits` (and lists holding them) as full logits; everything else unchanged."""
    if isinstance(value, SparseLogits):
        return value.dense()
    if isinstance(value, (list, tuple)):
        return [sparse_as_dense(v) for v in value]
    return value
