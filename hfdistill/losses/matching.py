"""Matching losses: MGD, Matching Guided Distillation (Yue, Deng, Zhou, ECCV 2020, arXiv:2008.09958).

MGD distils a teacher feature map into a student map with fewer channels without any adapter: teacher
channels are *assigned* to student channels by a linear assignment on the distance between channel
responses (gathered over a pass of training data), the teacher channels assigned to one student channel
are *reduced* to one map, and the student's pre-ReLU map is pulled towards it with OFD's partial L2
and margin. Training alternates (coordinate descent) between the assignment, recomputed every
``update_freq`` epochs, and the student's parameters.

Shapes: student ``s`` [B, Cs, H, W], teacher ``t`` [B, Ct, H, W] (the larger map is average-pooled to the
smaller size), ``g`` teacher channels per student channel (``g = (Ct - len(ignore_inds)) // Cs``, or 1
for the sparse-matching reducer ``sm``), the matching ``M`` [Cs, g] of teacher channel indices.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..errors import DistillationError, LossParamError
from ..taps import Tap, resolve_module
from .common import check_choice, check_number, pool_to_smaller
from .features import _require_dims, _single, _single_shape, ofd_margin_from_bn
from .registry import register_loss

logger = logging.getLogger(__name__)

REDUCERS = ("amp", "rd", "sp", "sm")


# --------------------------------------------------------------------------------------------
# The matching: channel distances and the assignment (the authors' track_running_stats and update_flow)
# --------------------------------------------------------------------------------------------


def channel_costs(student: torch.Tensor, teacher: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``D[i, j] = sum_b (2 - 2 cos(s_bi, t_bj)) = sum_b || s_bi / ||s_bi|| - t_bj / ||t_bj|| ||^2`` -> [Cs, Ct].

    ``s_bi`` is student channel ``i``'s map of example ``b`` as a vector over positions (same for ``t``):
    the distance between channel *responses* that the paper's assignment minimises (the authors'
    ``track_running_stats``, written ``2 - 2 <s_hat, t_hat>``). A channel whose map is all zeros has
    cosine 0 with everything: cost 2, as theirs.
    Summed over the batch; divide by the number of examples for the mean (the assignment is the same).
    """
    s, t = pool_to_smaller(student.float(), teacher.float())
    s_hat = F.normalize(s.flatten(2).to(dtype), dim=2)  # [B, Cs, N]
    t_hat = F.normalize(t.flatten(2).to(dtype), dim=2)  # [B, Ct, N]
    cos_sum = torch.einsum("bin,bjn->ij", s_hat, t_hat)  # [Cs, Ct], summed over the batch
    return 2.0 * s.shape[0] - 2.0 * cos_sum


def match_channels(cost: torch.Tensor, groups: int, ignore: Iterable[int] = ()) -> torch.Tensor:
    """Teacher channels for each student channel: ``M`` [Cs, groups], all entries distinct, none in ``ignore``.

    The cost matrix ``D`` [Cs, Ct] is stacked ``groups`` times (row ``r`` stands for slot ``r // Cs`` of
    student channel ``r % Cs``) and the linear assignment problem ``min sum_r D'[r, pi(r)]`` over
    injective ``pi`` is solved with ``scipy.optimize.linear_sum_assignment``: every student channel gets
    ``groups`` distinct teacher channels, minimising the total distance. When ``groups * Cs`` is smaller
    than the number of usable teacher channels the solver also picks *which* channels are left out (the
    cheapest choice); the authors instead drop the trailing channels by index ("shave") before solving.
    """
    c_s, c_t = cost.shape
    ignored = set(int(i) for i in ignore)
    keep = [k for k in range(c_t) if k not in ignored]
    if groups < 1 or groups * c_s > len(keep):
        raise DistillationError(
            f"mgd: cannot give each of {c_s} student channels {groups} distinct teacher channels out of the "
            f"{len(keep)} usable ones ({c_t} minus {len(ignored)} in ignore_inds)"
        )
    tiled = cost[:, keep].double().cpu().repeat(groups, 1).numpy()  # [groups * Cs, A]
    try:
        rows, cols = linear_sum_assignment(tiled)
    except ValueError as exc:  # NaN / inf entries
        raise DistillationError(
            f"mgd: the channel distances are not finite ({exc}); the features of the statistics pass contain "
            "NaN or inf values, check the models' outputs on the training data"
        ) from None
    by_row = torch.empty(groups * c_s, dtype=torch.long)
    by_row[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(keep, dtype=torch.long)[torch.as_tensor(cols)]
    # M[i, slot] = teacher channel of row slot * Cs + i; the slots of one student channel are interchangeable
    # (equal costs), so each row is sorted: one canonical matching, whatever order the solver returned them in.
    return by_row.view(groups, c_s).t().sort(dim=1).values.contiguous()


# --------------------------------------------------------------------------------------------
# Reducers (the paper's three channel reductions plus sparse matching; the authors' MGDistiller.rd / amp / sp and
# SMDistiller.sm)
# --------------------------------------------------------------------------------------------


def reduce_channels(teacher: torch.Tensor, matching: torch.Tensor, margin: torch.Tensor, reducer: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher map on the student's width and its margin: ``([B, Cs, H, W], m)``.

    ``m`` is [Cs] (one margin per student channel) for ``amp``/``sp``/``sm`` and [B, Cs, H, W] for ``rd``.
    With ``T_i = t[:, M[i]]`` the ``g`` teacher maps matched to student channel ``i`` ([B, g, H, W]):

    - ``sm`` sparse matching: ``T_i[:, 0]`` (``g = 1``: one teacher channel each, the rest unused);
    - ``amp`` absolute max pooling: at each position the matched response of largest magnitude
      (``T_i`` at ``argmax_k |T_ik|``); margin the mean of the matched channels' margins (as the authors);
    - ``sp`` simple pooling: the maximum over the matched channels, margin the maximum of their margins
      (the authors' docstring names max or average pooling; their code always max-pools both, as here);
    - ``rd`` random drop: at each position one matched channel drawn uniformly, with *that* channel's
      margin. The authors draw the margin's channel independently (once per student channel); we keep
      the response and its margin from the same channel, since the margin is a property of the channel.
    """
    t_g = teacher[:, matching]  # [B, Cs, g, H, W]
    m_g = margin[matching]  # [Cs, g]
    if reducer == "sm":
        return t_g[:, :, 0], m_g[:, 0]
    if reducer == "amp":
        pick = t_g.abs().argmax(dim=2, keepdim=True)  # [B, Cs, 1, H, W]
        return t_g.gather(2, pick).squeeze(2), m_g.mean(dim=1)
    if reducer == "sp":
        return t_g.max(dim=2).values, m_g.max(dim=1).values
    if reducer == "rd":
        b, c_s, g, h, w = t_g.shape
        pick = torch.randint(0, g, (b, c_s, 1, h, w), device=t_g.device)
        m_full = m_g.view(1, c_s, g, 1, 1).expand(b, c_s, g, h, w)
        return t_g.gather(2, pick).squeeze(2), m_full.gather(2, pick).squeeze(2)
    raise ValueError(f"unknown reducer {reducer!r}")


def partial_l2(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 (Heo et al. 2019; the authors' ``distillation_loss``): ``mean_b sum_{c,h,w} d_p(T, S)``
    with ``d_p = 0 where S <= T <= 0, else (T - S)^2``; ``target`` already holds ``T = max(t, m)``."""
    keep = (student > target) | (target > 0)
    return ((student - target).pow(2) * keep).sum(dim=(1, 2, 3)).mean()


# --------------------------------------------------------------------------------------------
# Across processes: sum the statistics, solve once, give rank 0's answer to every rank
# --------------------------------------------------------------------------------------------


def _world(accelerator: Any) -> tuple[int, int]:
    """(number of processes, this process's index), from the accelerator, else torch.distributed."""
    if accelerator is not None:
        return int(getattr(accelerator, "num_processes", 1)), int(getattr(accelerator, "process_index", 0))
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _sum_across_processes(x: torch.Tensor, accelerator: Any) -> torch.Tensor:
    world, _ = _world(accelerator)
    if world == 1:
        return x
    if accelerator is not None:
        return accelerator.reduce(x, reduction="sum")
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _from_rank0(x: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Rank 0's ``x`` on every rank: a broadcast written as a sum where the other ranks give zeros
    (exact: ``v + 0 = v``), so it needs nothing beyond the accelerator's ``reduce``."""
    world, rank = _world(accelerator)
    if world == 1:
        return x
    return _sum_across_processes(x if rank == 0 else torch.zeros_like(x), accelerator)


# --------------------------------------------------------------------------------------------
# The teacher BN before the tapped pre-ReLU feature (for the margin)
# --------------------------------------------------------------------------------------------


def find_teacher_bn(teacher: nn.Module, tap_text: str) -> tuple[str, nn.Module] | None:
    """The BatchNorm that produces a teacher tap, by module structure; ``(path, module)`` or None.

    - a tap reading a BatchNorm's output (``layer3.-1.bn2``): that BatchNorm;
    - a tap reading the input of an activation (a module without parameters): ``layer3.-1.act2:input``,
      the pre-ReLU end of a timm BasicBlock (``act3:input`` for a Bottleneck): the last BatchNorm registered
      before the activation
      in the same parent module (``bn2`` / ``bn3``), i.e. the authors' ``get_bn_before_relu``. None when
      a BatchNorm with the same channel count is registered *after* it (a torchvision block reuses one
      ``relu``, so the order says nothing) or there is none: name it with ``margin: "bn:<path>"``.
    """
    tap = Tap.parse(tap_text)
    module = resolve_module(teacher, tap.path)
    if module is None:
        return None
    if tap.capture == "output":
        return (tap.path, module) if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or any(True for _ in module.parameters()):
        return None  # the input of a layer with weights (a conv, a BatchNorm) is not a BatchNorm's output
    parent_path, _, _ = tap.path.rpartition(".")
    parent = resolve_module(teacher, parent_path) if parent_path else teacher
    names = list(parent._modules)
    position = next((i for i, name in enumerate(names) if parent._modules[name] is module), None)
    if position is None:
        return None

    def is_bn(name: str) -> bool:
        return isinstance(parent._modules[name], nn.modules.batchnorm._BatchNorm)

    before = [name for name in names[:position] if is_bn(name)]
    if not before:
        return None
    found = parent._modules[before[-1]]
    after = [name for name in names[position + 1:]
             if is_bn(name) and parent._modules[name].num_features == found.num_features]
    if after:
        return None
    return (f"{parent_path}.{before[-1]}" if parent_path else before[-1]), found


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def _check_margin(value: Any) -> str:
    want = "must be 'bn', 'bn:<module path of the teacher's BatchNorm>' or 'data'"
    if not isinstance(value, str):
        raise LossParamError("margin", f"{want}, got {value!r} (a {type(value).__name__})")
    if value in ("bn", "data"):
        return value
    if value.startswith("bn:"):
        path = value[3:]
        parts = path.split(".")
        if path and all(p.isidentifier() or p.lstrip("-").isdigit() for p in parts):
            return value
    raise LossParamError("margin", f"{want}, got {value!r}")


def _check_ignore_inds(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise LossParamError("ignore_inds", f"must be a list of teacher channel indices (integers >= 0), got {value!r} "
                                            f"(a {type(value).__name__})")
    inds = tuple(check_number("ignore_inds", v, minimum=0, integer=True) for v in value)
    if len(set(inds)) != len(inds):
        raise LossParamError("ignore_inds", f"must list each teacher channel once, got {list(value)!r}")
    return inds


@register_loss(
    "mgd",
    description="Matching Guided Distillation: teacher channels assigned to student channels by linear assignment "
    "on channel-response distances, reduced (amp/rd/sp/sm) onto the student's width, partial L2 with OFD's margin",
    paper="Matching Guided Distillation (Yue, Deng, Zhou), ECCV 2020, arXiv:2008.09958",
    year=2020,
    reads="features",
    same_shape=False,
    trainable=False,
)
class MGDLoss(nn.Module):
    """``mean_b sum_{i,h,w} d_p(max(R(t)_i, m_i), s_i)`` with ``R`` the reducer over the matched teacher
    channels ``t[:, M[i]]``, ``m`` their margin and ``d_p`` OFD's partial L2 (the authors'
    ``MGDistiller.forward`` with ``distillation_loss``).

    Both taps should be *pre-ReLU* stage ends (the authors' ``preReLU=True``): in a timm ResNet
    ``layer3.-1.act2:input`` (BasicBlock) or ``layer3.-1.act3:input`` (Bottleneck).

    Parameters (the authors' defaults):

    - ``reducer``: ``amp`` absolute max pooling (default, the authors' choice), ``rd`` random drop,
      ``sp`` simple (max) pooling, ``sm`` sparse matching (one teacher channel per student channel, the
      others unused; the authors' ``SMDistiller``; "sm" is not a sum). See :func:`reduce_channels`.
    - ``update_freq`` (2, the authors' ``--mgd-update-freq``): the matching is computed when training
      starts and again at the start of epoch ``k`` whenever ``k`` is a multiple of ``update_freq``
      (``k = 0, 2, 4, ...``), as the authors' ``mgd_update`` before training and after epoch ``e`` when
      ``(e + 1) % update_freq == 0``. Epoch ``k`` is ``floor`` of the trainer's (float) epoch, so a run
      resumed in the middle of an epoch does not recompute: the matching is restored from the
      checkpoint (it lives in buffers), and recomputed at the next epoch that is due.
    - ``max_batches`` (None): the statistics pass reads this many training batches per process; None
      reads the whole training set. The authors' pass stops after about 20k images (all of CUB-200's
      training set, a sample of ImageNet's); set it for large datasets.
    - ``ignore_inds`` ([]): teacher channel indices never assigned (their responses are never distilled).
      The authors' ``ignore_inds`` indexes *stages* of their multi-stage distiller instead; here a stage
      is left out by not writing a term for it.
    - ``margin``: ``bn`` (default) the paper's margin from the teacher BatchNorm that produces the tapped
      feature, ``E[x | x < 0]`` for ``x ~ N(beta, gamma^2)`` (OFD's formula, :func:`ofd_margin_from_bn`),
      the BatchNorm found by :func:`find_teacher_bn` (the one before the tapped activation, as the
      authors' ``get_bn_before_relu``); ``bn:<path>`` names it (a module path relative to the teacher,
      like a tap); ``data`` estimates ``E[t | t < 0]`` per teacher channel in the same statistics pass
      as the matching (OFD's fallback when there is no BatchNorm, e.g. a cached teacher; channels
      without negative responses get 0).

    The statistics pass (``ctx.term_values``, each process over its shard of the training data) sums
    :func:`channel_costs` (and the negative responses for ``margin: data``); the sums are added across
    processes (``ctx.accelerator.reduce``, else ``torch.distributed``), rank 0 solves the assignment
    (:func:`match_channels`) and every rank takes rank 0's matching and margin, so they are identical
    on every rank. The authors instead feed every rank the same batches and broadcast rank 0's answer.

    Where we differ from the authors' code (KaiyuYue/mgd, ``mgd/builder.py``), and why:

    - no trainable parameters: the paper calls MGD parameter-free; the authors' code passes the student
      feature through an extra BatchNorm (trained with the student) before the loss; we do not add it;
    - channels that do not divide evenly: the assignment picks the cheapest teacher channels to leave
      out instead of dropping the last ones by index;
    - ``rd``'s margin comes from the drawn channel (see :func:`reduce_channels`).

    The value is summed over channels and positions and averaged over the batch, as the authors' code
    before its scaling: they divide by a loss factor (1e4 at 224 px on ImageNet; OFD's CIFAR code, on
    which theirs is built, uses 1e3) and weight stage ``i`` of ``n`` by ``1/2^(n-i-1)``; put those
    factors in the term weights (one term per stage), and KD (the authors' ``with_kd``: T = 1.5,
    weight 1) as a separate ``kd`` term.

    Outside a trainer (no statistics pass has run), the first forward computes the matching (and a data
    margin) from its own batch, in this process only; :meth:`update_matching` takes any iterable of
    (student, teacher) feature pairs instead.
    """

    def __init__(self, reducer: str = "amp", update_freq: int = 2, max_batches: int | None = None,
                 ignore_inds: Sequence[int] = (), margin: str = "bn"):
        super().__init__()
        self.reducer = check_choice("reducer", reducer, REDUCERS)
        self.update_freq = check_number("update_freq", update_freq, minimum=1, integer=True)
        self.max_batches = check_number("max_batches", max_batches, minimum=1, integer=True, allow_none=True)
        self.ignore_inds = _check_ignore_inds(ignore_inds)
        self.margin_source = _check_margin(margin)
        self.teacher_bn_path: str | None = None
        self.groups: int | None = None
        self.update_epochs: list[int] = []  # epochs at which this process recomputed the matching (not saved)
        self._fresh_start = False
        self._ready = False  # a matching and a margin exist (cached flag for the forward)

    # ---- set-up ----
    def configure(self, ctx) -> None:
        s_shape = _single_shape(ctx.student_shape, "mgd", "student")
        t_shape = _single_shape(ctx.teacher_shape, "mgd", "teacher")
        _require_dims(s_shape, (4,), "mgd", "student")
        _require_dims(t_shape, (4,), "mgd", "teacher")
        c_s, c_t = s_shape[1], t_shape[1]
        bad = [i for i in self.ignore_inds if i >= c_t]
        if bad:
            raise LossParamError("ignore_inds", f"must be teacher channel indices below {c_t} (the teacher feature's "
                                                f"channels), got {bad}")
        usable = c_t - len(self.ignore_inds)
        if usable < c_s:
            raise DistillationError(
                f"mgd: the student feature has {c_s} channels but the teacher only {usable} usable ones ({c_t} minus "
                f"{len(self.ignore_inds)} in ignore_inds); MGD reduces teacher channels onto the student's, so tap "
                "layers where the teacher is at least as wide, or ignore fewer channels"
            )
        self.groups = 1 if self.reducer == "sm" else usable // c_s
        self.c_s, self.c_t = c_s, c_t
        # Placeholder until the first statistics pass (the forward never reads it before one has run).
        self.register_buffer("matching", torch.arange(c_s * self.groups).view(self.groups, c_s).t().contiguous())
        self.register_buffer("margin", torch.zeros(c_t))
        self.register_buffer("margin_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("matched_epoch", torch.full((), -1, dtype=torch.long))  # -1: never matched
        if self.margin_source != "data":
            self._margin_from_teacher_bn(ctx)

    def _margin_from_teacher_bn(self, ctx) -> None:
        path = self.margin_source[3:] if self.margin_source.startswith("bn:") else None
        if ctx.teacher is None:
            if getattr(ctx, "frozen_teacher", None) is not None:
                raise DistillationError(
                    "mgd: margin 'bn' reads the teacher's BatchNorm, but the teacher here is a cache of its outputs; "
                    "add `margin: data` to the term's params (the margin estimated in the statistics pass)"
                )
            return  # no teacher model at set-up (Python use): set_teacher_bn(weight, bias) before the forward
        tap = ctx.teacher_taps[0] if ctx.teacher_taps else "?"
        if path is not None:
            bn = resolve_module(ctx.teacher, path)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                what = "no module" if bn is None else f"a {type(bn).__name__}"
                raise DistillationError(
                    f"mgd: margin {self.margin_source!r}: the teacher has {what} at {path!r}; name the BatchNorm that "
                    f"produces the teacher tap {tap!r} (a module path relative to the teacher), or use `margin: data`"
                )
        else:
            found = find_teacher_bn(ctx.teacher, tap)
            if found is None:
                raise DistillationError(
                    f"mgd: found no BatchNorm producing the teacher tap {tap!r} (the margin 'bn' needs the BatchNorm "
                    "before a pre-ReLU tap such as 'layer3.-1.act2:input'); name it with `margin: 'bn:<path>'` "
                    "(e.g. 'bn:layer3.-1.bn2', relative to the teacher) or use `margin: data`"
                )
            path, bn = found
        self.teacher_bn_path = path
        self.set_teacher_bn(bn.weight if bn.weight is not None else torch.ones(bn.num_features),
                            bn.bias if bn.bias is not None else torch.zeros(bn.num_features))

    def set_teacher_bn(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """The paper's margin from the teacher BN (``weight`` = gamma, ``bias`` = beta) before the tap.

        (With ``margin: data`` the next statistics pass replaces it.)"""
        self._require_configured()
        margin = ofd_margin_from_bn(weight, bias)
        if margin.numel() != self.c_t:
            raise DistillationError(
                f"mgd: the teacher BatchNorm has {margin.numel()} channels but the teacher feature {self.c_t}; "
                "give the BatchNorm that produces the tapped feature (`margin: 'bn:<path>'`)"
            )
        self.margin.copy_(margin.to(self.margin.device))
        self.margin_ready.fill_(True)

    def _require_configured(self) -> None:
        if self.groups is None:
            raise RuntimeError(
                "mgd: configure(ctx) must be called first; it sizes the matching from the tapped shapes (the trainer "
                "does this after its dry-run forward; in Python pass hfdistill.terms.LossContext(student_shape=..., "
                "teacher_shape=...))"
            )

    # ---- the matching ----
    @torch.no_grad()
    def update_matching(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], accelerator: Any = None,
                        sync: bool = True, epoch: int = 0) -> None:
        """Recompute the matching (and a data margin) from ``(student, teacher)`` feature pairs, at ``epoch``.

        With ``sync`` (default) the sums are added across processes and rank 0's solution is given to
        every rank: every process must call it (a collective). ``sync=False`` uses this process's data only.
        """
        self._require_configured()
        # Running sums over this process's batches, one vector: [Cs*Ct costs | Ct negatives | Ct counts | examples].
        n_cost, c_t = self.c_s * self.c_t, self.c_t
        stats = None
        for student, teacher in pairs:
            s, t = _single(student, "mgd").float(), _single(teacher, "mgd").float()
            self._check_channels(s, t)
            dtype = torch.float32 if s.device.type == "mps" else torch.float64  # MPS has no float64
            batch = torch.cat([
                channel_costs(s, t, dtype).flatten(),  # [Cs*Ct] summed 2 - 2 cos
                t.clamp(max=0).to(dtype).sum(dim=(0, 2, 3)),  # [Ct] sum of the negative responses
                (t < 0).to(dtype).sum(dim=(0, 2, 3)),  # [Ct] number of negative responses
                t.new_tensor([s.shape[0]], dtype=dtype),  # examples
            ])
            stats = batch if stats is None else stats + batch
        if stats is None:  # no batch here: zeros, so that the other processes are not left waiting
            stats = torch.zeros(n_cost + 2 * c_t + 1, dtype=torch.float64, device=self.margin.device)
        if sync:
            stats = _sum_across_processes(stats, accelerator)
        if stats[-1] <= 0:
            raise DistillationError("mgd: the statistics pass read no training batches; give the trainer training data "
                                    "(and max_batches >= 1)")
        costs = stats[:n_cost].view(self.c_s, c_t) / stats[-1]  # mean distance per example
        negatives, counts = stats[n_cost:n_cost + c_t], stats[n_cost + c_t:n_cost + 2 * c_t]
        world, rank = _world(accelerator) if sync else (1, 0)
        matching, failure = torch.zeros_like(self.matching, device=costs.device), None
        if rank == 0:
            try:
                matching = match_channels(costs, self.groups, self.ignore_inds).to(costs.device)
            except DistillationError as exc:  # tell the other ranks (-1 entries) instead of leaving them waiting
                matching, failure = torch.full_like(matching, -1), exc
        data_margin = negatives / counts.clamp_min(1.0)  # E[t | t < 0], 0 where no negative response
        # Rank 0's matching and data margin on every rank: [Cs*g matching | Ct margin].
        payload = torch.cat([matching.flatten().to(costs.dtype), data_margin])
        if sync:
            payload = _from_rank0(payload, accelerator)
        n_match = matching.numel()
        solved = payload[:n_match].round().long().view_as(self.matching)
        if failure is not None:
            raise failure
        if bool((solved < 0).any()):
            raise DistillationError("mgd: rank 0 could not solve the channel matching; its error says why")
        self.matching.copy_(solved)
        if self.margin_source == "data":
            self.margin.copy_(payload[n_match:].float())
            self.margin_ready.fill_(True)
        self.matched_epoch.fill_(epoch)

    def on_train_begin(self, ctx) -> None:
        # A fresh start (not a resume) computes the matching before its first step, even when the state was
        # carried from an earlier stage; a resumed run keeps the restored matching until the next due epoch.
        self._fresh_start = ctx.step == 0

    def on_epoch_begin(self, ctx) -> None:
        epoch = int(math.floor(ctx.epoch + 1e-6))  # the trainer's epoch is a float (1.5 when resumed mid-epoch)
        due = epoch % self.update_freq == 0 and epoch != int(self.matched_epoch)
        if not (self._fresh_start or int(self.matched_epoch) < 0 or due):
            return
        pairs = ((s, t) for s, t, _ in ctx.term_values(self.max_batches))
        self.update_matching(pairs, accelerator=ctx.accelerator, epoch=epoch)
        self._fresh_start = False
        self.update_epochs.append(epoch)
        logger.info("mgd term %r: matching updated at epoch %d", ctx.term, epoch)

    # ---- the loss ----
    def _check_channels(self, s: torch.Tensor, t: torch.Tensor) -> None:
        _require_dims(s, (4,), "mgd", "student")
        _require_dims(t, (4,), "mgd", "teacher")
        if s.shape[0] != t.shape[0]:
            raise DistillationError(f"mgd: batch sizes differ: student {s.shape[0]}, teacher {t.shape[0]}")
        if (s.shape[1], t.shape[1]) != (self.c_s, self.c_t):
            raise DistillationError(
                f"mgd: got {s.shape[1]} student and {t.shape[1]} teacher channels, but configure saw {self.c_s} and "
                f"{self.c_t}; the term's taps changed after set-up"
            )

    def forward(self, student, teacher) -> torch.Tensor:
        self._require_configured()
        s, t = _single(student, "mgd").float(), _single(teacher, "mgd").float()
        self._check_channels(s, t)
        if not self._ready:  # checked once (reading a buffer's value waits for the device)
            if int(self.matched_epoch) < 0:  # used outside a trainer: match on this batch (this process only)
                self.update_matching([(s.detach(), t.detach())], sync=False)
            if not bool(self.margin_ready):
                raise DistillationError(
                    "mgd: no margin yet: margin 'bn' needs the teacher model at set-up (give LossContext(teacher=...)) "
                    "or set_teacher_bn(weight, bias); or use `margin: data`"
                )
            self._ready = True  # later updates keep both set; a saved state always has them (set before step 1)
        s, t = pool_to_smaller(s, t)
        reduced, margin = reduce_channels(t.detach(), self.matching, self.margin.float(), self.reducer)
        if margin.dim() == 1:
            margin = margin.view(1, -1, 1, 1)
        return partial_l2(s, torch.maximum(reduced, margin))
