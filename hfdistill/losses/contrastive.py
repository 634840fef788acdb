"""Contrastive distillation losses: CRD (memory banks and NCE) and SSKD (rotation self-supervision).

Both own state that lives in the loss module (DESIGN.md, contracts 1 and 5): CRD its two embedding
heads and two memory banks (one row per training example), SSKD its two projection heads (the
teacher-side one trained in a first stage with the teacher frozen). Neither is ever in the saved
student; both are saved in Trainer checkpoints and carried across stages by term name.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import DistillationError
from ..taps import ModelTaps
from ..teacher import call_model
from .common import check_choice, check_number, kl_from_log_probs
from .features import _single
from .registry import register_loss

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _one_tensor(x: Any, loss: str, who: str) -> torch.Tensor:
    """A single tap's value (a tensor, or a list holding one) as float32 [B, D] (a map is flattened per example)."""
    x = _single(x, loss)
    if x.dim() < 2:
        raise DistillationError(f"{loss}: the {who} feature must be [B, D] (or [B, C, H, W], flattened), got {tuple(x.shape)}")
    return x.float().reshape(x.shape[0], -1)


def _flat_dim(shape: Any, loss: str, who: str) -> int:
    """D of a tapped shape [B, ...] flattened per example (a list of one shape is accepted)."""
    if shape is None:
        fix = "; give the recipe a teacher model" if who == "teacher" else ""
        raise DistillationError(f"{loss}: needs a {who} feature, but the term has no {who} tap{fix}")
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        if len(shape) != 1:
            raise DistillationError(f"{loss}: reads one {who} tap, the term gives {len(shape)}; give it one")
        shape = shape[0]
    shape = tuple(shape)
    if len(shape) < 2:
        raise DistillationError(f"{loss}: the {who} feature must be [B, D] (or [B, C, H, W]), got shape {shape}")
    return math.prod(shape[1:])


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All processes' ``x`` ([n_r, ...], n_r may differ per rank) concatenated in rank order; ``x`` alone
    without a process group. No gradient flows through it (used for state updates only)."""
    _, world = _distributed()
    if world == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _mean_across_processes(x: torch.Tensor) -> torch.Tensor:
    _, world = _distributed()
    if world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world


def _first_occurrences(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct value of ``index`` (so duplicates update once)."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((unique.numel(),), index.numel(), dtype=torch.long, device=index.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


class _HostCopy:
    """A host-side copy of a small buffer, re-read (one device sync) only when the buffer was written
    by someone else (loading a checkpoint or a stage's state, DDP's buffer broadcast), detected by the
    tensor's identity and in-place version counter. Keeps a training step free of host-device syncs."""

    def __init__(self):
        self.key: tuple[int, int] | None = None
        self.value: Any = None

    def read(self, buffer: torch.Tensor, convert) -> Any:
        key = (buffer.data_ptr(), buffer._version)
        if key != self.key:
            self.value = convert(buffer)
            self.key = (buffer.data_ptr(), buffer._version)
        return self.value

    def wrote(self, buffer: torch.Tensor, value: Any) -> None:
        """Record that we wrote ``value`` into ``buffer`` ourselves (no re-read needed)."""
        self.value = value
        self.key = (buffer.data_ptr(), buffer._version)


# --------------------------------------------------------------------------------------------
# CRD: Contrastive Representation Distillation
# --------------------------------------------------------------------------------------------

CRD_MODES = ("exact", "relax")
CRD_EPS = 1e-7  # the reference's eps in the NCE denominators
# Negative sampling builds one [rows, N] key matrix per chunk of the batch: at most this many elements.
CRD_SAMPLING_ELEMENTS = 1 << 25


class CRDEmbed(nn.Module):
    """CRD's embedding head g: flatten, linear D -> feat_dim, L2-normalise each row."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)


def crd_nce_loss(scores: torch.Tensor, num_examples: int, eps: float = CRD_EPS) -> torch.Tensor:
    """The NCE loss of CRD for one anchor side (the reference's ``ContrastLoss``, commented "Eq (18)").

    ``scores`` [B, K+1] are ``P = exp(v_anchor . m_j / tau) / Z`` with the positive in column 0 and K
    negatives after it. With the noise distribution uniform over the N training examples
    (``P_n = 1/N``), the critic is ``h = P / (P + K P_n)`` and the loss is
    ``-(1/B) sum_b [log h(b, pos) + sum_{j neg} log(1 - h(b, j))]``, where ``1 - h = K P_n / (P + K P_n)``.
    """
    k = scores.shape[1] - 1
    noise = k / float(num_examples)  # K * P_n
    positive, negatives = scores[:, 0], scores[:, 1:]  # [B], [B, K]
    log_h_pos = torch.log(positive / (positive + noise + eps))
    log_1_minus_h_neg = torch.log(noise / (negatives + noise + eps))
    return -(log_h_pos.sum() + log_1_minus_h_neg.sum()) / scores.shape[0]


def crd_memory_update(bank: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, momentum: float) -> torch.Tensor:
    """The bank rows after CRD's momentum update: ``normalize(m * bank[rows] + (1 - m) * values)`` ([n, d])."""
    return F.normalize(bank[rows] * momentum + values * (1.0 - momentum), dim=1)


def crd_relax_positives(index: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``relax``: each example's positive is a uniformly drawn example of its class (possibly itself);
    an example whose class is not known (label < 0) is its own positive."""
    own = labels[index]  # [B]
    sorted_labels, order = torch.sort(labels, stable=True)
    first = torch.searchsorted(sorted_labels, own, right=False)  # where the class starts in `order`
    count = torch.searchsorted(sorted_labels, own, right=True) - first  # >= 1: the example is in it
    u = torch.rand(index.shape, generator=generator, device=labels.device)
    offset = torch.minimum((u * count).long(), count - 1)
    return torch.where(own >= 0, order[first + offset], index)


def crd_negatives(
    index: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    generator: torch.Generator | None,
    enough: bool = True,
    max_elements: int = CRD_SAMPLING_ELEMENTS,
) -> torch.Tensor:
    """K negatives per example [B, K], drawn uniformly among the examples of *other* classes.

    An example is never its own negative; an example whose class is not known (label < 0) takes its
    negatives among all other examples, and counts as another class for everyone. Without replacement
    when a row has at least K candidates (random keys, masked, top-K: uniform over K-subsets), else with
    replacement, as the reference's ``np.random.choice(..., replace=k > len(candidates))``.
    ``enough=True`` says every row has at least K candidates (skips the with-replacement path).
    """
    n, b = labels.numel(), index.numel()
    own = labels[index]
    rows_per_chunk = max(1, max_elements // n)
    chunks = []
    for start in range(0, b, rows_per_chunk):
        idx, lab = index[start : start + rows_per_chunk], own[start : start + rows_per_chunk]
        excluded = (labels.unsqueeze(0) == lab.unsqueeze(1)) & (lab.unsqueeze(1) >= 0)  # [r, N] same class
        excluded[torch.arange(idx.numel(), device=idx.device), idx] = True  # never the example itself
        keys = torch.rand(excluded.shape, generator=generator, device=labels.device)
        keys.masked_fill_(excluded, -1.0)
        picked = keys.topk(k, dim=1, sorted=False).indices  # [r, K]
        if not enough:
            allowed = ~excluded
            drawn = torch.multinomial(allowed.float(), k, replacement=True, generator=generator)
            picked = torch.where((allowed.sum(1) >= k).unsqueeze(1), picked, drawn)
        chunks.append(picked)
    return torch.cat(chunks)


@register_loss(
    "crd",
    description="Contrastive Representation Distillation: embedding heads, two memory banks of every training "
    "example's embedding (momentum updates), NCE with K negatives sampled from other classes",
    paper="Contrastive Representation Distillation (Tian, Krishnan, Isola), ICLR 2020, arXiv:1910.10699",
    year=2020,
    reads="features",
    default_tap="features",
    same_shape=False,
    fields=("index", "labels"),
    trainable=True,
)
class CRDLoss(nn.Module):
    """CRD (Tian et al. 2020, Sec. 3), as the authors' code (RepDistiller ``crd/``) implements it.

    Notation: ``s``, ``t`` the student and teacher features of a batch ([B, D_s], [B, D_t]; the
    pooled penultimate features by default, a map is flattened per example), N the number of
    training examples, K = ``nce_k``, tau = ``nce_t``, m = ``nce_m``, d = ``feat_dim``.

    1. Embeddings: ``v_s = g_s(s)``, ``v_t = g_t(t)``, each a linear layer to d dimensions followed by
       L2 normalisation ([B, d]); trained with the student.
    2. Memory banks ``M_s``, ``M_t`` [N, d]: one row per training example, the student's and the
       teacher's embedding of it as last seen. Rows start uniform in ``[-a, a]``, ``a = 1/sqrt(d/3)``
       (expected norm 1), as the reference.
    3. Sampling: for example i (dataset index ``index[i]``) a positive ``p_i`` and K negatives
       ``n_i1..n_iK`` (``mode``, below), giving the rows ``J_i = (p_i, n_i1, .., n_iK)``.
    4. Scores ([B, K+1]): student anchor against the teacher bank ``P_s(i, j) = exp(v_s[i] . M_t[J_ij] / tau) / Z_s``
       and teacher anchor against the student bank ``P_t(i, j) = exp(v_t[i] . M_s[J_ij] / tau) / Z_t``.
       Z is the normalisation constant that makes ``exp(./tau)/Z`` a distribution over the N
       examples; it is estimated once, from the first batch the loss scores (the first training
       step), as ``Z = N * mean(exp(./tau))`` over that batch's [B, K+1] scores, as the reference;
       kept in a buffer, so a resumed run uses the same Z.
    5. Loss: :func:`crd_nce_loss` (the NCE bound of the paper, with uniform noise P_n = 1/N) of both
       sides, summed: ``L = NCE(P_s) + NCE(P_t)``. The paper's beta is the term weight (0.8 in
       RepDistiller's CIFAR-100 command, ``-b 0.8``).
    6. After the loss, in training only and without gradients, the banks take the batch's
       embeddings at the examples' own rows: ``M[idx] <- normalize(m M[idx] + (1 - m) v)``.

    Sampling modes, as the reference dataset ``CIFAR100InstanceSample``:

    - ``exact`` (default; the reference's default and what its tables use): the positive is the
      example itself; the K negatives are drawn uniformly among examples of *other classes*, without
      replacement when a class has at least K such examples, else with replacement.
    - ``relax``: the positive is drawn uniformly among the examples of the example's own class
      (possibly itself); negatives as ``exact``. The banks are still updated at the example's row.

    Sampling by class needs every training example's label before the first step: ``configure``
    makes one pass over the training data (``ctx.term_values()``: the models run once on every
    batch, without gradients) and keeps the labels in a buffer. Examples that pass did not see (a
    dropped last batch), or all of them when ``configure`` is given no data (Python use outside the
    trainer), are learned from the batches as they come; until then such an example counts as
    another class for everyone and takes its negatives among all other examples.

    Several processes: each process sees other examples, so the bank update gathers (index, v_s, v_t)
    from every process and applies the same update everywhere: the banks stay identical on every
    rank (DDP broadcasts rank 0's buffers at each forward). Z is the mean over processes. An index
    seen twice in one step is updated once (its first occurrence).

    Randomness: negatives (and relax positives) come from a generator seeded from a seed drawn at
    ``configure`` (from the run's seeded RNG), the number of sampling calls so far and the rank, all
    in a buffer: a resumed run draws exactly the negatives the uninterrupted run would have drawn,
    whatever else consumed random numbers. The banks, Z, labels and sampling state are buffers, so
    they are in every checkpoint and restored bit-exact on resume.

    Where we differ from the reference, and why:

    - The reference draws each example's negatives in the data loader's workers (NumPy); here they
      are drawn on the device in the loss (same distribution: uniform over other-class examples,
      without replacement when possible), so any dataset with ``labels`` works unchanged.
    - ``nce_k`` must be below N (the bank's rows): a larger value is an error at ``configure`` that
      says which value fits (the reference would sample with replacement; we do not silently
      change the paper's K). With ``exact``/``relax`` a class with fewer than K other-class examples
      samples with replacement, as the reference.
    - Normalisation uses ``F.normalize`` (``x / max(||x||, 1e-12)``) where the reference divides by
      the norm; identical except for a zero vector.
    """

    def __init__(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 mode: str = "exact"):
        super().__init__()
        self.feat_dim = check_number("feat_dim", feat_dim, minimum=1, integer=True)
        self.nce_k = check_number("nce_k", nce_k, minimum=1, integer=True)
        self.nce_t = check_number("nce_t", nce_t, minimum=0, exclusive=True)
        self.nce_m = check_number("nce_m", nce_m, minimum=0, maximum=1)
        self.mode = check_choice("mode", mode, CRD_MODES)
        self.embed_s: CRDEmbed | None = None
        self.embed_t: CRDEmbed | None = None
        self.num_examples: int | None = None
        self._sampling_host = _HostCopy()
        self._z_host = _HostCopy()
        self._labels_host = _HostCopy()

    # ---- set-up ----
    def configure(self, ctx) -> None:
        n = ctx.num_examples
        if n is None:
            raise DistillationError(
                f"crd: the memory banks need the number of training examples (one row each), but the training "
                "dataset has no length (an iterable/streaming dataset); give the trainer a map-style dataset "
                "(a datasets.Dataset or a torch Dataset with __len__)"
            )
        if self.nce_k > n - 1:
            raise DistillationError(
                f"crd: nce_k={self.nce_k} negatives per example, but the training set has only {n} examples "
                f"(memory-bank rows); set params: {{nce_k: {max(1, n - 1)}}} or less (the paper uses 16384 with "
                "50,000 CIFAR-100 examples)"
            )
        d_s = _flat_dim(ctx.student_shape, "crd", "student")
        d_t = _flat_dim(ctx.teacher_shape, "crd", "teacher")
        self.num_examples = n
        self.embed_s = CRDEmbed(d_s, self.feat_dim)
        self.embed_t = CRDEmbed(d_t, self.feat_dim)
        bound = 1.0 / math.sqrt(self.feat_dim / 3.0)  # uniform [-a, a]: E||row||^2 = d a^2 / 3 = 1
        self.register_buffer("memory_s", torch.rand(n, self.feat_dim).mul_(2 * bound).sub_(bound))  # student rows
        self.register_buffer("memory_t", torch.rand(n, self.feat_dim).mul_(2 * bound).sub_(bound))  # teacher rows
        self.register_buffer("labels", torch.full((n,), -1, dtype=torch.long))  # -1: class not known yet
        self.register_buffer("z", torch.full((2,), -1.0))  # [Z_s, Z_t]; -1 until the first training batch
        seed = int(torch.randint(0, 2**31 - 1, ()))  # from the run's seeded RNG: the same on every rank
        self.register_buffer("sampling", torch.tensor([seed, 0], dtype=torch.long))  # [seed, sampling calls]
        self._collect_labels(ctx)

    def _collect_labels(self, ctx) -> None:
        """Every training example's label, from one pass over the training data (all processes)."""
        try:
            batches = ctx.term_values()
        except RuntimeError:  # no data attached (a LossContext made by hand): labels come from the batches
            return
        indices, labels = [], []
        for _, _, batch in batches:
            if "labels" not in batch or "index" not in batch:
                raise DistillationError(
                    f"crd: mode {self.mode!r} samples negatives by class and needs each batch's `labels` and `index`; "
                    f"the training batches have {sorted(batch)}; give the dataset a `labels` column"
                )
            index, label = self._check_index_labels(batch["index"], batch["labels"])
            indices.append(index.to(ctx.device))
            labels.append(label.to(ctx.device))
        if not indices:
            return
        # Gathered on the run's device (NCCL gathers CUDA tensors), stored where the buffer is (CPU until the
        # trainer moves the module).
        index, label = gather_rows(torch.cat(indices)), gather_rows(torch.cat(labels))
        self._store_labels(index.to(self.labels.device), label.to(self.labels.device))
        known = int((self.labels >= 0).sum())
        if known < self.labels.numel():
            logger.info("crd term %r: %d of %d labels seen in the set-up pass; the rest are learned in training",
                        ctx.term, known, self.labels.numel())

    @staticmethod
    def _check_index_labels(index: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(index)
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape != index.shape or labels.is_floating_point():
            raise DistillationError(
                f"crd: samples negatives by class and needs one integer class label per example (shape "
                f"[{index.numel()}]), got labels of shape {tuple(labels.shape)} and dtype {labels.dtype}; CRD's "
                "class sampling is for classification data"
            )
        return index.long(), labels.long()

    @torch.no_grad()
    def _store_labels(self, index: torch.Tensor, labels: torch.Tensor) -> None:
        """Record the classes of examples ``index`` (already gathered from every process); negative labels are ignored."""
        self.labels[index] = torch.where(labels >= 0, labels, self.labels[index])

    # ---- sampling ----
    def _label_stats(self) -> tuple[bool, bool]:
        """(every label known, every row has >= K candidate negatives), re-read when the labels change."""

        def stats(labels: torch.Tensor) -> tuple[bool, bool]:
            n = labels.numel()
            known = labels[labels >= 0]
            complete = known.numel() == n
            largest = int(torch.bincount(known).max()) if known.numel() else 0
            if largest == n:
                raise DistillationError(
                    f"crd: mode {self.mode!r} draws negatives from other classes, but all {n} training examples have "
                    f"class {int(known[0])}; CRD needs at least two classes"
                )
            fewest = min(n - largest, n - 1) if not complete else n - largest  # candidates of the worst row
            return complete, fewest >= self.nce_k

        return self._labels_host.read(self.labels, stats)

    def _generator(self, device: torch.device) -> torch.Generator:
        """This call's generator: seeded from (seed, sampling calls so far, rank); no host sync per step."""
        seed, calls = self._sampling_host.read(self.sampling, lambda b: tuple(int(v) for v in b.tolist()))
        rank, world = _distributed()
        generator = torch.Generator(device=device)
        generator.manual_seed((seed + calls * world + rank) % (2**63 - 1))
        return generator

    def _advance_sampling(self) -> None:
        seed, calls = self._sampling_host.read(self.sampling, lambda b: tuple(int(v) for v in b.tolist()))
        self.sampling[1] = calls + 1
        self._sampling_host.wrote(self.sampling, (seed, calls + 1))

    def contrast_indices(self, index: torch.Tensor) -> torch.Tensor:
        """The bank rows each example is scored against, [B, K+1]: its positive, then K negatives."""
        _, enough = self._label_stats()
        generator = self._generator(index.device)
        positive = crd_relax_positives(index, self.labels, generator) if self.mode == "relax" else index
        negatives = crd_negatives(index, self.labels, self.nce_k, generator, enough=enough)
        return torch.cat([positive.unsqueeze(1), negatives], dim=1)

    # ---- the loss ----
    def _normalisers(self, exp_s: torch.Tensor, exp_t: torch.Tensor) -> torch.Tensor:
        """[Z_s, Z_t]: set once from the first batch, ``Z = N * mean(exp(score / tau))`` (mean over processes)."""
        ready = self._z_host.read(self.z, lambda z: bool((z > 0).all()))
        if not ready:
            with torch.no_grad():
                means = _mean_across_processes(torch.stack([exp_s.mean(), exp_t.mean()]))
                self.z.copy_(means * self.num_examples)
            self._z_host.wrote(self.z, True)
            logger.info("crd: normalisation constants Z_s=%.1f, Z_t=%.1f", *self.z.tolist())
        return self.z

    def forward(self, student, teacher, index, labels) -> torch.Tensor:
        if self.embed_s is None:
            raise RuntimeError(
                "crd: configure(ctx) must be called first; it builds the embedding heads and the memory banks "
                "(the trainer does this; in Python pass hfdistill.terms.LossContext(student_shape=..., "
                "teacher_shape=..., num_examples=...))"
            )
        s = _one_tensor(student, "crd", "student")  # [B, D_s]
        t = _one_tensor(teacher, "crd", "teacher")  # [B, D_t]
        if s.shape[1] != self.embed_s.linear.in_features or t.shape[1] != self.embed_t.linear.in_features:
            raise DistillationError(
                f"crd: got student {tuple(s.shape)} and teacher {tuple(t.shape)} features, but the heads were built "
                f"for {self.embed_s.linear.in_features} and {self.embed_t.linear.in_features} values per example; "
                "configure was called with other shapes"
            )
        device = self.memory_s.device
        index, labels = self._check_index_labels(index, labels)
        index, labels = index.to(device), labels.to(device)
        v_s, v_t = self.embed_s(s), self.embed_t(t)  # [B, d], unit rows

        with torch.no_grad():
            rows = self.contrast_indices(index)  # [B, K+1]
        bank_s, bank_t = self.memory_s[rows], self.memory_t[rows]  # [B, K+1, d] (copies: no gradient)
        exp_s = torch.exp(torch.einsum("bkd,bd->bk", bank_t, v_s) / self.nce_t)  # student anchor, teacher bank
        exp_t = torch.exp(torch.einsum("bkd,bd->bk", bank_s, v_t) / self.nce_t)  # teacher anchor, student bank
        z = self._normalisers(exp_s, exp_t)
        loss = crd_nce_loss(exp_s / z[0], self.num_examples) + crd_nce_loss(exp_t / z[1], self.num_examples)

        if self.training:
            self._update(index, labels, v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def _update(self, index: torch.Tensor, labels: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Momentum update of both banks at the batch's rows (every process's batch), then the next draw."""
        complete, _ = self._label_stats()
        index = gather_rows(index)
        embeddings = gather_rows(torch.cat([v_s, v_t], dim=1))  # [B_all, 2d]
        if not complete:  # learn the labels the set-up pass did not see
            self._store_labels(index, gather_rows(labels))
        first = _first_occurrences(index)
        index, embeddings = index[first], embeddings[first]
        self.memory_s.index_copy_(0, index, crd_memory_update(self.memory_s, index, embeddings[:, : self.feat_dim], self.nce_m))
        self.memory_t.index_copy_(0, index, crd_memory_update(self.memory_t, index, embeddings[:, self.feat_dim :], self.nce_m))
        self._advance_sampling()


# --------------------------------------------------------------------------------------------
# SSKD: Knowledge Distillation Meets Self-Supervision
# --------------------------------------------------------------------------------------------

SSKD_PHASES = ("teacher_head", "student")
ROTATIONS = (1, 2, 3)  # quarter turns of the transformed copies (0 is the normal image)


def sskd_head(dim: int) -> nn.Sequential:
    """SSKD's projection head on a [B, D] feature: Linear(D, D) -> ReLU -> Linear(D, D), as the authors' wrapper."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


def rotated_copies(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [3B, C, H, W]: row ``3b + k - 1`` is image b turned by k quarter turns (k = 1, 2, 3), the
    authors' order (``np.rot90(img, k)`` on an H x W x C image: counter-clockwise)."""
    return torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in ROTATIONS], dim=1).flatten(0, 1)


def rotation_targets(batch: int, device: torch.device | None = None) -> torch.Tensor:
    """[3B]: the normal image each rotated copy comes from (row r -> r // 3)."""
    return torch.arange(batch, device=device).repeat_interleave(len(ROTATIONS))


def rotation_similarity(rotated: torch.Tensor, normal: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[3B, B] cosine similarities between every rotated copy's embedding [3B, D] and every normal one [B, D].

    The reference's ``F.cosine_similarity`` of expanded [3B, D, B] tensors, computed as a product of
    normalised rows (no [3B, B, D] intermediate); the same values except for rows of norm below ``eps``."""
    return F.normalize(rotated, dim=1, eps=eps) @ F.normalize(normal, dim=1, eps=eps).T


def target_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[R]: the rank of ``scores[r, target[r]]`` in its row (0 = the top score), counting strictly larger scores."""
    return (scores > scores.gather(1, target.unsqueeze(1))).sum(1)


def error_aware_selection(rank: torch.Tensor, ratio: float) -> torch.Tensor:
    """SSKD's selection [R] (bool): every row the teacher gets right (rank 0), plus the ``floor(ratio * wrong)``
    wrong rows with the smallest rank (ties: the earlier row). Computed on the device, no host sync."""
    wrong = (rank > 0).sum()
    exact = torch.float64 if rank.device.type != "mps" else torch.float32  # floor(ratio * wrong) as Python's int()
    keep = (rank.numel() - wrong) + torch.floor(wrong.to(exact) * ratio).long()
    order = torch.argsort(rank, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(rank.numel(), device=rank.device)
    return position < keep


def selected_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                keep: torch.Tensor) -> torch.Tensor:
    """``T^2 * (1/|S|) sum_{r in S} KL(softmax(t_r/T) || softmax(s_r/T))`` over the kept rows S ([R, C] inputs);
    0 when no row is kept (the reference's ``kl_div(..., 'batchmean')`` on the selected rows)."""
    per_row = kl_from_log_probs(F.log_softmax(teacher_logits / temperature, dim=1),
                                F.log_softmax(student_logits / temperature, dim=1))  # [R]
    kept = keep.to(per_row.dtype)
    return (per_row * kept).sum() / kept.sum().clamp_min(1.0) * temperature**2


def _image_key(inputs: dict, who: str) -> str:
    for key in ("pixel_values", "x", "inputs"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            if value.shape[-1] != value.shape[-2]:
                raise DistillationError(
                    f"sskd: rotates the images by quarter turns and needs square images, but the {who}'s {key!r} is "
                    f"{tuple(value.shape)}; resize or crop the images to a square (data.image_size)"
                )
            return key
    raise DistillationError(
        f"sskd: runs the {who} on rotated images and needs a [B, C, H, W] image tensor (`pixel_values`) in its "
        f"inputs; it got {sorted(inputs)}. SSKD is an image-classification method"
    )


class _Recorded:
    """A model's taps recorded over one call of the model (hooks attached for the call only)."""

    def __init__(self, taps: ModelTaps):
        self.taps = taps

    def __call__(self, model: nn.Module, inputs: dict, input_names: set[str] | None = None) -> dict:
        self.taps.attach()
        try:
            with self.taps.recording():
                outputs = call_model(model, inputs, input_names, **self.taps.forward_kwargs)
            return self.taps.gather(outputs)
        finally:
            self.taps.remove()


@register_loss(
    "sskd",
    description="SSKD: rotation self-supervision; a teacher-side projection head trained first (teacher frozen), then "
    "KL between student and teacher similarity distributions of rotated vs normal images and KD on rotated images, "
    "each on the rows the teacher gets right (error-aware selection)",
    paper="Knowledge Distillation Meets Self-Supervision (Xu, Liu, Li, Loy), ECCV 2020, arXiv:2006.07114",
    year=2020,
    reads="features",
    default_tap="features",
    same_shape=False,
    fields=("labels", "batch"),
    trainable=True,
)
class SSKDLoss(nn.Module):
    """SSKD (Xu et al. 2020, Sec. 3), the paper's two stages as one loss with a ``phase`` parameter.

    The self-supervised task is contrastive prediction with rotations: every training image ``x_b``
    (the normal image) has three transformed copies, ``x_b`` turned by 90, 180 and 270 degrees
    (:func:`rotated_copies`, [3B, ...]). A projection head ``phi`` (Linear-ReLU-Linear on the pooled
    penultimate feature, the term's tap) maps features to embeddings; the similarity matrix is
    ``A[r, b] = cos(phi(f(x~_r)), phi(f(x_b)))`` ([3B, B]), whose right answer for row r is the
    image it comes from, ``b = r // 3``. The term reads the normal images' features from its taps
    and runs both models on the rotated copies itself (the ``batch`` field).

    - ``phase: teacher_head`` (stage 1): train the teacher-side head alone, with the teacher frozen:
      ``L = CE(A_T, r // 3)`` over the 3B rotated rows (no temperature, as the authors' code). The
      teacher's weights are never touched (contract 5); the head belongs to this module. Every
      training-mode forward sets the persistent buffer ``teacher_head_trained``.
    - ``phase: student`` (stage 2, default): the teacher head is frozen (``requires_grad`` False, run
      without gradients); the student and its own head learn from

      ``ss_weight * L_ss + tf_weight * L_tf``, with

      * ``L_ss = tau^2 * mean_{r in S_ss} KL(softmax(A_T[r] / tau) || softmax(A_S[r] / tau))``, tau =
        ``ss_temperature``: the paper's self-supervision term, the KL between the teacher's and the
        student's similarity distributions (the student's head ``A_S``, the frozen teacher head ``A_T``);
      * ``L_tf = T^2 * mean_{r in S_tf} KL(softmax(z_T(x~_r) / T) || softmax(z_S(x~_r) / T))``, T =
        ``tf_temperature``: the paper's KD on the transformed (rotated) images' class logits;
      * error-aware selection (:func:`error_aware_selection`): a row is kept when the teacher ranks
        its right answer first (``r // 3`` in ``A_T[r]``; its class label in ``z_T(x~_r)``), plus the
        ``floor(ratio * wrong)`` wrong rows whose right answer the teacher ranks highest, ratio
        ``ss_ratio`` / ``tf_ratio`` (the reference's ``--ratio-ss`` / ``--ratio-tf``).

    Defaults are the paper's and the authors' code's (``student.py``): ``ss_weight`` 10, ``tf_weight``
    2.7, tau 0.5, T 4, ``ss_ratio`` 0.75, ``tf_ratio`` 1.0 (every wrong rotated prediction kept).
    The rest of the objective are other recipe terms: the cross-entropy on normal images is the task
    loss (``task_weight`` 0.1, the code's ``--ce-weight``) and KD on normal images a ``kd`` term
    (weight 0.9, ``--kd-weight``, T = 4). A recipe: two stages with the same term name, so the
    trained teacher head carries over::

        stages:
          - name: teacher_head
            terms: [{name: sskd, loss: sskd, params: {phase: teacher_head}}]
            task_weight: 0
            train: [losses.sskd.teacher_head]     # only the head: the student waits
          - name: student
            terms: [{name: kd, loss: kd, weight: 0.9}, {name: sskd, loss: sskd}]
            task_weight: 0.1

    ``on_train_begin`` of the student phase raises a DistillationError when no earlier stage
    trained the teacher head.

    Where we differ from the authors' code, and why:

    - The student sees each step's normal images in the trainer's forward and their rotated copies
      in a second forward here, so batch-norm batch statistics are computed over B and 3B images
      instead of the reference's single forward of 4B (and running statistics move twice per step).
      The engine runs the student's forward (task loss, taps) before the terms; one joint forward
      would need a different engine. The teacher runs in eval mode, where this makes no difference.
    - The copies are rotations of the batch as the data pipeline made it (augmented once); the
      reference augments (random crop) each rotated copy separately.
    - Ranks count strictly larger scores (a tie with the right answer counts as right); the
      reference uses the position in ``argsort``, where ties fall in an arbitrary order. Among wrong
      rows of equal rank the earlier rows are kept (the reference: ``argsort``'s arbitrary order).
    - Under several processes (or gradient accumulation) each process's (micro-)batch has its own
      similarity matrix and selection, as the reference's one GPU; the objective depends on that
      batch size (B candidates per row), not on the global batch.
    """

    # It runs the teacher on inputs of its own, so a cache of teacher outputs cannot stand in for it.
    needs_live_teacher = True

    def __init__(self, phase: str = "student", ss_weight: float = 10.0, tf_weight: float = 2.7,
                 ss_temperature: float = 0.5, tf_temperature: float = 4.0, ss_ratio: float = 0.75,
                 tf_ratio: float = 1.0):
        super().__init__()
        self.phase = check_choice("phase", phase, SSKD_PHASES)
        self.ss_weight = check_number("ss_weight", ss_weight, minimum=0)
        self.tf_weight = check_number("tf_weight", tf_weight, minimum=0)
        self.ss_temperature = check_number("ss_temperature", ss_temperature, minimum=0, exclusive=True)
        self.tf_temperature = check_number("tf_temperature", tf_temperature, minimum=0, exclusive=True)
        self.ss_ratio = check_number("ss_ratio", ss_ratio, minimum=0, maximum=1)
        self.tf_ratio = check_number("tf_ratio", tf_ratio, minimum=0, maximum=1)
        self.student_head: nn.Module | None = None
        self.teacher_head: nn.Module | None = None
        # Set by a training-mode forward of the teacher_head phase; carried to the student stage in the state dict.
        self.register_buffer("teacher_head_trained", torch.zeros((), dtype=torch.bool))
        # (student, frozen teacher, student_inputs, student taps, teacher taps, accelerator): kept in a tuple, not
        # registered, so no model weight is ever part of this module's state.
        self._runtime: tuple = (None, None, None, None, None, None)

    # ---- set-up ----
    def configure(self, ctx) -> None:
        d_s = _flat_dim(ctx.student_shape, "sskd", "student")
        d_t = _flat_dim(ctx.teacher_shape, "sskd", "teacher")
        self.student_head = sskd_head(d_s)
        self.teacher_head = sskd_head(d_t)
        s_tap = ctx.student_taps[0] if ctx.student_taps else "features"
        t_tap = ctx.teacher_taps[0] if ctx.teacher_taps else "features"
        teacher_model = getattr(ctx.frozen_teacher, "model", None)
        s_taps = _Recorded(ModelTaps(ctx.student, [s_tap, "logits"], "student")) if ctx.student is not None else None
        t_taps = _Recorded(ModelTaps(teacher_model, [t_tap, "logits"], "teacher")) if teacher_model is not None else None
        self._taps = (s_tap, t_tap)
        self._runtime = (ctx.student, ctx.frozen_teacher, ctx.student_inputs, s_taps, t_taps, ctx.accelerator)
        self._apply_phase()

    def _apply_phase(self) -> None:
        """What trains in this phase: the teacher head alone, or the student head with the teacher head frozen."""
        if self.teacher_head is None:
            return
        stage_one = self.phase == "teacher_head"
        self.teacher_head.requires_grad_(stage_one)
        self.student_head.requires_grad_(not stage_one)

    def on_train_begin(self, ctx) -> None:
        self._apply_phase()
        if self.phase == "student" and not bool(self.teacher_head_trained):
            term = getattr(ctx, "term", "sskd")
            raise DistillationError(
                f"term {term!r}: SSKD's student phase needs the teacher-side head trained in an earlier stage: add a "
                "stage before this one with the same term name and params {phase: teacher_head} (task_weight: 0, "
                f"train: [losses.{term}.teacher_head])"
            )

    # ---- the models on rotated images ----
    def _require_runtime(self, who: str) -> tuple:
        student, frozen, student_inputs, s_taps, t_taps, accelerator = self._runtime
        if who == "teacher" and t_taps is None:
            raise DistillationError(
                "sskd: runs the teacher on rotated images and needs a live teacher model (not a cache of its outputs); "
                "give the trainer the teacher model (configure(ctx) got none)"
            )
        if who == "student" and (s_taps is None or student_inputs is None):
            raise DistillationError(
                "sskd: runs the student on rotated images and needs the student model and its inputs from the trainer "
                "(configure(ctx) got no ctx.student / ctx.student_inputs)"
            )
        return self._runtime

    def teacher_on_rotations(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen teacher on the rotated copies, without gradients, in eval mode: (features [3B, D_t], logits [3B, C])."""
        _, frozen, _, _, t_taps, _ = self._require_runtime("teacher")
        inputs = dict(frozen.call_inputs(batch))
        key = _image_key(inputs, "teacher")
        inputs[key] = rotated_copies(inputs[key])
        if frozen.dtype is not None and frozen.dtype != torch.float32:  # a half-precision teacher takes half inputs
            inputs = {k: v.to(frozen.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in inputs.items()}
        frozen.model.eval()  # whatever called .train() on it, the teacher runs in eval mode
        with torch.no_grad():
            values = t_taps(frozen.model, inputs, frozen.input_names)
        return _one_tensor(values[self._taps[1]], "sskd", "teacher"), values["logits"].float()

    def student_on_rotations(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The student on the rotated copies, in its current mode, with gradients: (features [3B, D_s], logits [3B, C])."""
        student, _, student_inputs, s_taps, _, accelerator = self._require_runtime("student")
        inputs = dict(student_inputs(batch))
        key = _image_key(inputs, "student")
        inputs[key] = rotated_copies(inputs[key])
        # The student's own forward runs under the run's mixed precision (the terms run in fp32 outside it).
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            values = s_taps(student, inputs)
        return _one_tensor(values[self._taps[0]], "sskd", "student"), values["logits"].float()

    # ---- the loss ----
    def stage_one_loss(self, t_normal: torch.Tensor, t_rotated: torch.Tensor) -> torch.Tensor:
        """``CE(A_T, r // 3)`` with ``A_T`` the cosine similarities of the teacher head's embeddings [3B, B]."""
        similarity = rotation_similarity(self.teacher_head(t_rotated), self.teacher_head(t_normal))
        return F.cross_entropy(similarity, rotation_targets(t_normal.shape[0], t_normal.device))

    def student_parts(self, s_normal: torch.Tensor, t_normal: torch.Tensor, s_rotated: torch.Tensor,
                      t_rotated: torch.Tensor, s_rot_logits: torch.Tensor, t_rot_logits: torch.Tensor,
                      labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"ss": L_ss, "tf": L_tf}`` (unweighted) from features [B, D] / [3B, D] and rotated logits [3B, C]."""
        batch = s_normal.shape[0]
        with torch.no_grad():
            a_t = rotation_similarity(self.teacher_head(t_rotated), self.teacher_head(t_normal))  # [3B, B]
            keep_ss = error_aware_selection(target_rank(a_t, rotation_targets(batch, a_t.device)), self.ss_ratio)
            rotated_labels = labels.to(t_rot_logits.device).long().repeat_interleave(len(ROTATIONS))  # [3B]
            keep_tf = error_aware_selection(target_rank(t_rot_logits, rotated_labels), self.tf_ratio)
        a_s = rotation_similarity(self.student_head(s_rotated), self.student_head(s_normal))  # [3B, B]
        return {
            "ss": selected_kl(a_s, a_t, self.ss_temperature, keep_ss),
            "tf": selected_kl(s_rot_logits, t_rot_logits, self.tf_temperature, keep_tf),
        }

    def forward(self, student, teacher, labels, batch) -> torch.Tensor:
        if self.teacher_head is None:
            raise RuntimeError(
                "sskd: configure(ctx) must be called first; it builds the projection heads from the tapped shapes "
                "(the trainer does this after its dry run)"
            )
        s = _one_tensor(student, "sskd", "student")  # [B, D_s] normal images
        t = _one_tensor(teacher, "sskd", "teacher")  # [B, D_t]
        if self.phase == "teacher_head":
            t_rotated, _ = self.teacher_on_rotations(batch)
            if self.training:
                self.teacher_head_trained.fill_(True)
            return self.stage_one_loss(t, t_rotated)
        t_rotated, t_rot_logits = self.teacher_on_rotations(batch)
        s_rotated, s_rot_logits = self.student_on_rotations(batch)
        parts = self.student_parts(s, t, s_rotated, t_rotated, s_rot_logits, t_rot_logits, labels)
        return self.ss_weight * parts["ss"] + self.tf_weight * parts["tf"]
