"""Dense-prediction distillation losses: semantic segmentation (pixel-wise KD, SKD's pair-wise affinity) and
DETR-family object detection (logit and box distillation on Hungarian-matched queries).

Shapes:
    segmentation logits   [B, K, H, W]  (K classes; student and teacher may differ in H, W)
    feature maps          [B, C, H, W]  (C, H and W may differ between student and teacher)
    detection logits      [B, Q, K]     (Q queries; K classes, DETR's softmax adds a last "no object" class)
    detection boxes       [B, Q, 4]     (cx, cy, w, h), normalised to [0, 1] by the image size

Every loss casts its inputs to float32 first and returns a scalar.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..errors import DistillationError
from .common import check_choice, check_number, kl_from_log_probs
from .registry import as_list, register_loss

SKD_PAPER = (
    "Structured Knowledge Distillation for Dense Prediction (Liu, Shu, Wang, Shen), IEEE TPAMI 2020; first at "
    "CVPR 2019 as Structured Knowledge Distillation for Semantic Segmentation (Liu, Chen, Liu, Qin, Luo, Wang), "
    "arXiv:1903.04197"
)


# --------------------------------------------------------------------------------------------
# Input checks shared by the dense losses
# --------------------------------------------------------------------------------------------


def _one_tensor(x, loss: str, who: str) -> torch.Tensor:
    """A single-tap loss accepts a tensor or a list holding exactly one tensor."""
    if isinstance(x, (list, tuple)):
        if len(x) != 1:
            raise DistillationError(f"{loss}: reads one tap, got a list of {len(x)} {who} tensors; give the term one "
                                    f"{who} tap")
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise DistillationError(f"{loss}: expected a {who} tensor, got {type(x).__name__}")
    return x


def _map(x, loss: str, who: str, what: str) -> torch.Tensor:
    """A [B, C, H, W] map in float32, or a DistillationError naming the shape and the fix."""
    x = _one_tensor(x, loss, who)
    if x.dim() != 4:
        raise DistillationError(f"{loss}: {who} {what} must be [B, C, H, W], got shape {tuple(x.shape)}; tap a "
                                "layer or output that gives a spatial map")
    return x.float()


def _zero(x: torch.Tensor) -> torch.Tensor:
    """A zero scalar still attached to ``x``'s graph (backward() works when nothing counts)."""
    return x.sum() * 0.0


# --------------------------------------------------------------------------------------------
# Pixel-wise distillation (SKD's pixel-wise term; Hinton's KD at every pixel)
# --------------------------------------------------------------------------------------------


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, K, h, w] -> [B, K, H, W] by bilinear interpolation (``align_corners=False``, as transformers'
    segmentation models upsample their logits); unchanged when the size already matches."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def kept_pixels(labels: torch.Tensor, size: tuple[int, int], ignore_index: int, loss: str) -> torch.Tensor:
    """[B, H', W'] (or [B, 1, H', W']) label map -> [B, H, W] bool: True where the label (resized with nearest
    neighbour to the logits' size) is not ``ignore_index``."""
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 3:
        raise DistillationError(f"{loss}: labels must be a [B, H, W] segmentation map, got shape "
                                f"{tuple(labels.shape)}; set ignore_index: null to distil every pixel without labels")
    if tuple(labels.shape[1:]) != tuple(size):
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
    return labels.long() != ignore_index


@register_loss(
    "pixel_kd",
    description="Pixel-wise KD for dense prediction: KL between the teacher's and the student's class distributions "
    "at every pixel (temperature T, x T^2), averaged over the pixels whose label is not ignore_index; logits of "
    "another size are resized (bilinear) to a common one",
    paper=SKD_PAPER,
    year=2019,
    reads="logits",
    default_tap="logits",
    same_shape=False,
    fields=("labels",),
)
class PixelKDLoss(nn.Module):
    """``T^2 * (1/|P|) sum_{p in P} KL(softmax(t_p / T) || softmax(s_p / T))``.

    ``s_p``, ``t_p`` are the K class logits of pixel ``p`` ([B, K, H, W] maps); ``P`` is every pixel of every
    image whose label is not ``ignore_index``.

    - The paper's pixel-wise term (SKD, Eq. 1) is this KL over the W' x H' pixels of the score map, with the
      teacher's distribution as the target (the authors' code, irfanICMLL/structure_knowledge_distillation
      ``CriterionPixelWise``, computes ``-sum p_t log p_s``: the same gradients). Their teacher and student both
      predict at 1/8 of the input and T = 1 (no temperature), the default here; T^2 keeps the gradient's size
      independent of T, as in Hinton's KD.
    - Normalisation: the authors sum over the batch and divide by W' x H'; we average over the batch too (the
      mean over kept pixels), so the weight does not depend on the batch size (their weight 10 at batch 8 is
      about 80 here).
    - Resolution (``align``). The paper's networks share an output size; transformers' segmentation models often
      do not (SegFormer predicts at 1/4, UperNet at full size). ``align: student`` (default) resizes the
      teacher's logits to the student's map, so the loss is taken at the student's own resolution, as the paper
      takes it over the student's score map; ``align: teacher`` upsamples the student's logits to the teacher's
      size (finer, costs more memory). Bilinear on the logits, ``align_corners=False``.
    - ``ignore_index`` (default 255, the value segmentation datasets and transformers' ``semantic_loss_ignore_index``
      use; -100 for datasets labelled the Hugging Face way; null: every pixel counts) drops the pixels with that
      label: the ``labels`` field ([B, H', W'], usually the input's size) is resized with nearest neighbour to the
      common size. Without labels (from Python, or a training batch without them: ``labels`` is an optional
      field) every pixel counts. When every pixel is ignored the loss is 0.
    """

    optional_fields = ("labels",)  # the trainer passes None when the batch has no labels

    def __init__(self, temperature: float = 1.0, align: str = "student", ignore_index: int | None = 255):
        super().__init__()
        self.temperature = check_number("temperature", temperature, minimum=0, exclusive=True)
        self.align = check_choice("align", align, ("student", "teacher"))
        self.ignore_index = check_number("ignore_index", ignore_index, integer=True, allow_none=True)

    def forward(self, student, teacher, labels: torch.Tensor | None = None) -> torch.Tensor:
        s = _map(student, "pixel_kd", "student", "logits")  # [B, K, Hs, Ws]
        t = _map(teacher, "pixel_kd", "teacher", "logits").detach()  # [B, K, Ht, Wt]; a target, never trained
        if s.shape[:2] != t.shape[:2]:
            raise DistillationError(
                f"pixel_kd: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} must agree in batch "
                "size and number of classes ([B, K, H, W]; only H and W may differ); give both models the same "
                "label set"
            )
        size = tuple(s.shape[2:]) if self.align == "student" else tuple(t.shape[2:])
        s, t = resize_logits(s, size), resize_logits(t, size)  # [B, K, H, W] each
        log_p_s = F.log_softmax(s / self.temperature, dim=1)
        log_p_t = F.log_softmax(t / self.temperature, dim=1)
        kl = kl_from_log_probs(log_p_t, log_p_s, dim=1)  # [B, H, W]
        if labels is None or self.ignore_index is None:
            return kl.mean() * self.temperature**2
        keep = kept_pixels(labels.to(kl.device), size, self.ignore_index, "pixel_kd")  # [B, H, W]
        if keep.shape != kl.shape:
            raise DistillationError(f"pixel_kd: labels of shape {tuple(labels.shape)} are for {keep.shape[0]} "
                                    f"images but the logits for {kl.shape[0]}; give one label map per image")
        total = torch.where(keep, kl, kl.new_zeros(())).sum()  # an ignored pixel's KL never reaches the sum
        return total / keep.sum().clamp_min(1) * self.temperature**2


# --------------------------------------------------------------------------------------------
# Pair-wise affinity distillation (SKD)
# --------------------------------------------------------------------------------------------


def node_grid(height: int, width: int, scale: float) -> tuple[int, int]:
    """The graph's node grid for a map of ``height x width``: the authors' max-pooling with kernel = stride =
    ``int(scale * side)`` (at least 1) and ``ceil_mode``, i.e. ``ceil(side / kernel)`` nodes per side."""
    def nodes(side: int) -> int:
        kernel = max(1, int(side * scale))
        return math.ceil(side / kernel)

    return nodes(height), nodes(width)


def affinity(feature: torch.Tensor) -> torch.Tensor:
    """[B, C, N] node features -> [B, N, N] cosine similarities ``a_ij = f_i . f_j / (|f_i| |f_j|)``."""
    f = F.normalize(feature, dim=1)  # unit vectors along the channels (a zero vector stays 0)
    return f.transpose(1, 2) @ f


@register_loss(
    "pairwise_affinity",
    description="SKD pair-wise distillation: the student's cosine-similarity graph between spatial nodes "
    "(max-pooled patches of a feature map) matches the teacher's, squared error averaged over node pairs",
    paper=SKD_PAPER,
    year=2019,
    reads="features",
    same_shape=False,
)
class PairwiseAffinityLoss(nn.Module):
    """``mean_{b, i, j} (a^s_ij - a^t_ij)^2`` with ``a_ij = f_i . f_j / (|f_i| |f_j|)``.

    ``f_i`` is the C-dimensional feature of node ``i``: the feature map [B, C, H, W] max-pooled to a grid of
    nodes, each a patch of the map. The affinity graph is N x N whatever C is, so student and teacher may
    have different channel counts (no adapter needed).

    - Nodes. The authors' code (irfanICMLL/structure_knowledge_distillation,
      ``CriterionPairWiseforWholeFeatAfterPool``) max-pools with kernel = stride = ``int(scale * side)`` and
      ``ceil_mode``, with ``scale = 0.5`` by default (their ``--pool-scale``): a 2 x 2 grid of nodes, each a
      quarter of the map. A smaller ``scale`` gives a finer graph (``scale <= 1/side``: one node per position,
      the paper's fully connected graph over pixels, N^2 pairs).
    - Grids of different sizes. When the two maps differ in size, the grid is that of the smaller side on each
      axis (:func:`node_grid`), and each map is max-pooled to it with ``adaptive_max_pool2d``, so node ``i``
      covers the same part of the image on both sides. For a side that is a multiple of the kernel this is the
      authors' pooling exactly; otherwise the adaptive bins overlap by a position where theirs leave a short last
      bin.
    - Normalisation. The authors divide each feature by its norm computed without gradient (``.detach()``); we
      differentiate the cosine similarity itself. Their ``sum / N^2 / B`` is this mean over pairs and images.
    """

    def __init__(self, scale: float = 0.5):
        super().__init__()
        self.scale = check_number("scale", scale, minimum=0, maximum=1, exclusive=True)

    def forward(self, student, teacher) -> torch.Tensor:
        s = _map(student, "pairwise_affinity", "student", "feature")  # [B, Cs, Hs, Ws]
        t = _map(teacher, "pairwise_affinity", "teacher", "feature").detach()  # [B, Ct, Ht, Wt]
        if s.shape[0] != t.shape[0]:
            raise DistillationError(f"pairwise_affinity: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                                    "have different batch sizes; tap the same examples on both sides")
        grid = node_grid(min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]), self.scale)
        a_s = affinity(F.adaptive_max_pool2d(s, grid).flatten(2))  # [B, N, N]
        a_t = affinity(F.adaptive_max_pool2d(t, grid).flatten(2))  # [B, N, N]
        return (a_s - a_t).pow(2).mean()


# --------------------------------------------------------------------------------------------
# DETR-family logit (and box) distillation on Hungarian-matched queries (DETRDistill)
# --------------------------------------------------------------------------------------------


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def class_divergence(s: torch.Tensor, t: torch.Tensor, activation: str) -> torch.Tensor:
    """Per query pair, [..., K] logits -> [...]: how far the student's class prediction is from the teacher's.

    - softmax: ``KL(softmax(t) || softmax(s))`` over the K classes (DETR's include "no object");
    - sigmoid: ``sum_k KL(Bern(sigmoid(t_k)) || Bern(sigmoid(s_k)))``, the binary cross-entropy with the
      teacher's probabilities as soft targets minus the teacher's own entropy (a constant: the same gradients
      as DETRDistill's soft BCE, and 0 when the student matches).
    """
    if activation == "softmax":
        return kl_from_log_probs(F.log_softmax(t, -1), F.log_softmax(s, -1))
    p_t = torch.sigmoid(t)
    bce = -(p_t * F.logsigmoid(s) + (1 - p_t) * F.logsigmoid(-s))  # soft-target BCE per class
    entropy = -(p_t * F.logsigmoid(t) + (1 - p_t) * F.logsigmoid(-t))
    return (bce - entropy).sum(-1)


def class_divergence_matrix(s: torch.Tensor, t: torch.Tensor, activation: str) -> torch.Tensor:
    """:func:`class_divergence` for every (student query, teacher query) pair: [B, Qs, K], [B, Qt, K] ->
    [B, Qs, Qt], as ``-H(p_t) - sum_k p_t log p_s`` with the sum a matrix product (no [B, Qs, Qt, K] tensor)."""
    if activation == "softmax":
        log_p_s, log_p_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        p_t = log_p_t.exp()
        neg_entropy = (p_t * torch.where(p_t > 0, log_p_t, log_p_t.new_zeros(()))).sum(-1)  # [B, Qt]
        cross = log_p_s @ p_t.transpose(1, 2)  # [B, Qs, Qt]: sum_k p_t log p_s
    else:
        p_t = torch.sigmoid(t)
        neg_entropy = (p_t * F.logsigmoid(t) + (1 - p_t) * F.logsigmoid(-t)).sum(-1)  # [B, Qt]
        cross = F.logsigmoid(s) @ p_t.transpose(1, 2) + F.logsigmoid(-s) @ (1 - p_t).transpose(1, 2)
    return neg_entropy[:, None, :] - cross


def real_queries(tensor: torch.Tensor, num_queries: int | None) -> torch.Tensor:
    """The last ``num_queries`` rows of a ``[B, Q', ...]`` detector output (all of them when ``num_queries`` is None
    or ``Q' <= num_queries``): RT-DETR training with labels puts its denoising queries (noised copies of the ground
    truth, a number that changes with the batch's objects) before its ``num_queries`` real ones."""
    return tensor[:, -num_queries:] if num_queries and tensor.shape[1] > num_queries else tensor


def detector_queries(model: Any) -> int | None:
    """A DETR-family model's ``num_queries`` (from its config), or None for anything else."""
    queries = getattr(getattr(model, "config", None), "num_queries", None)
    return int(queries) if isinstance(queries, int) and queries > 0 else None


def _detection_outputs(x, loss: str, who: str, num_queries: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A term's ``[logits, pred_boxes]`` taps (or ``logits`` alone) -> float32 [B, Q, K] and [B, Q, 4] (or None), the
    real queries only when the model's ``num_queries`` is known (:func:`real_queries`)."""
    items = as_list(x)
    if len(items) not in (1, 2) or not all(isinstance(v, torch.Tensor) for v in items):
        raise DistillationError(
            f"{loss}: the {who} taps must be [logits, pred_boxes] (or logits alone), got "
            f"{len(items)} value(s); write the term's {who} as `[logits, pred_boxes]`"
        )
    logits = items[0].float()
    if logits.dim() != 3:
        raise DistillationError(f"{loss}: {who} logits must be [B, Q, K] (one row of class logits per query), got "
                                f"shape {tuple(logits.shape)}; tap the detector's `logits` output first")
    boxes = items[1].float() if len(items) == 2 else None
    if boxes is not None and (boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[:2] != logits.shape[:2]):
        raise DistillationError(
            f"{loss}: {who} pred_boxes must be [B, Q, 4] (cx, cy, w, h) for the logits' {tuple(logits.shape[:2])} "
            f"queries, got shape {tuple(boxes.shape)}; give the taps in the order [logits, pred_boxes]"
        )
    return real_queries(logits, num_queries), None if boxes is None else real_queries(boxes, num_queries)


@register_loss(
    "detection_logit_kd",
    description="DETR-family detection KD: student queries matched one-to-one to the teacher's (Hungarian, on the "
    "loss itself), then class KL (softmax) or soft-target BCE (sigmoid) plus L1 and GIoU box terms on the pairs; "
    "taps [logits, pred_boxes]",
    paper="DETRDistill: A Universal Knowledge Distillation Framework for DETR-families (Chang, Wang, Xu, Chen, Yang, "
    "Zhao), ICCV 2023, arXiv:2211.10156",
    year=2023,
    reads="logits",
    same_shape=False,
    multi_layer=True,
)
class DetectionLogitKDLoss(nn.Module):
    """``(1/|M|) sum_{(i,j) in M} [D(s_i, t_j) + box_weight |b^s_i - b^t_j|_1 + giou_weight (1 - GIoU(b^s_i, b^t_j))]``.

    ``s_i`` / ``t_j`` are the class logits of student query ``i`` and teacher query ``j`` of an image, ``b`` their
    boxes (cx, cy, w, h, normalised), ``D`` the class divergence (:func:`class_divergence`: KL for ``softmax``,
    summed per-class binary KL for ``sigmoid``), and ``M`` the one-to-one matching of the image's student queries
    to its teacher queries that minimises the sum of these same per-pair costs (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``), over all images of the batch.

    This is DETRDistill's Hungarian-matching logits distillation as its released code does it
    (BIVLab-USTC/DETRDistill: ``DistillHungarianAssigner`` and the ``*_distill`` losses of its Deformable-DETR head):

    - every teacher prediction is a target, background ones included (the paper's point: the few confident
      queries carry too little); ``score_threshold`` > 0 keeps only teacher queries whose top class probability
      (the no-object class left out for softmax) reaches it, the usual pseudo-label filter, not DETRDistill's;
    - the matching cost is the class cost + L1 + GIoU, as in DETR's matcher, with the class cost the
      soft-target BCE between the student's logits and the teacher's sigmoid probabilities (their
      ``DistillCrossEntropyLossCost``), not DETR's ``-p(class)``;
    - the loss is the soft-target BCE, L1 and GIoU on every matched pair, each divided by the number of pairs
      (their ``avg_factor``), with no weighting by teacher confidence.

    Here the matching cost *is* the loss per pair (one set of weights, as DETR and mmdet require the matcher's and
    the loss's weights to agree), and the sigmoid class term is the binary KL (BCE minus the teacher's entropy,
    the same gradients and the same matching when every teacher query is matched). Defaults are DETR's loss
    weights (class 1, L1 5, GIoU 2). ``activation: sigmoid`` (default) is for detectors trained with sigmoid
    focal loss (Deformable / Conditional DETR, DINO, RT-DETR, and DETRDistill's students); ``softmax`` for DETR,
    whose last logit is "no object".

    Taps. The term reads the detector's outputs as a list, ``student: [logits, pred_boxes]`` and
    ``teacher: [logits, pred_boxes]`` (there is no default tap: name both). Student and teacher may have
    different numbers of queries (each image matches ``min(Qs, Qt)`` pairs); their class counts must agree. An
    RT-DETR student training with denoising queries (``num_denoising`` > 0) is distilled on its real queries only:
    at set-up the term reads each model's ``num_queries`` from its config and keeps the last ``num_queries`` rows
    of its outputs (the denoising queries come first and their number changes with each batch's objects).
    With ``logits`` alone (one tap each side) the matching uses the class term only, and ``box_weight`` and
    ``giou_weight`` must be 0. DETRDistill also distils every decoder layer's predictions (tap them as further
    terms) and adds feature and query-assignment terms, which are not this loss.
    """

    def __init__(self, activation: str = "sigmoid", box_weight: float = 5.0, giou_weight: float = 2.0,
                 score_threshold: float = 0.0):
        super().__init__()
        self.activation = check_choice("activation", activation, ("sigmoid", "softmax"))
        self.box_weight = check_number("box_weight", box_weight, minimum=0)
        self.giou_weight = check_number("giou_weight", giou_weight, minimum=0)
        self.score_threshold = check_number("score_threshold", score_threshold, minimum=0, maximum=1)
        self.num_queries: tuple[int | None, int | None] = (None, None)  # (student, teacher), from configure

    def configure(self, ctx: Any) -> None:
        """Each model's ``num_queries`` (None for a model without one, or a cached teacher): see :func:`real_queries`."""
        self.num_queries = (detector_queries(ctx.student), detector_queries(ctx.teacher))

    # ---- the pieces ----
    def teacher_confidence(self, t_logits: torch.Tensor) -> torch.Tensor:
        """[B, Qt, K] -> [B, Qt]: the top class probability of each teacher query (no-object left out)."""
        if self.activation == "softmax":
            return F.softmax(t_logits, -1)[..., :-1].max(-1).values
        return torch.sigmoid(t_logits).max(-1).values

    def cost_matrix(self, s_logits, s_boxes, t_logits, t_boxes) -> torch.Tensor:
        """[B, Qs, Qt]: the loss of every (student query, teacher query) pair of each image."""
        cost = class_divergence_matrix(s_logits, t_logits, self.activation)
        if s_boxes is not None and (self.box_weight or self.giou_weight):
            from torchvision.ops import generalized_box_iou

            l1 = (s_boxes[:, :, None, :] - t_boxes[:, None, :, :]).abs().sum(-1)  # [B, Qs, Qt]
            giou = generalized_box_iou(cxcywh_to_xyxy(s_boxes), cxcywh_to_xyxy(t_boxes))  # [B, Qs, Qt]
            cost = cost + self.box_weight * l1 + self.giou_weight * (1 - giou)
        return cost

    def pair_losses(self, s_logits, s_boxes, t_logits, t_boxes) -> torch.Tensor:
        """[N, K] and [N, 4] aligned pairs -> [N]: the same per-pair loss as :meth:`cost_matrix`, with gradients."""
        loss = class_divergence(s_logits, t_logits, self.activation)
        if s_boxes is not None and (self.box_weight or self.giou_weight):
            from torchvision.ops import generalized_box_iou_loss

            l1 = (s_boxes - t_boxes).abs().sum(-1)
            giou_loss = generalized_box_iou_loss(cxcywh_to_xyxy(s_boxes), cxcywh_to_xyxy(t_boxes))  # 1 - GIoU
            loss = loss + self.box_weight * l1 + self.giou_weight * giou_loss
        return loss

    def match(self, student, teacher) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, the matched ``(student query indices, teacher query indices)`` (long tensors of equal length)."""
        (s_logits, s_boxes), (t_logits, t_boxes) = self._inputs(student, teacher)
        return self._match(s_logits, s_boxes, t_logits, t_boxes)

    @torch.no_grad()
    def _match(self, s_logits, s_boxes, t_logits, t_boxes) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cost = self.cost_matrix(s_logits, s_boxes, t_logits, t_boxes)  # [B, Qs, Qt]
        # NaN (a zero-area box's GIoU) or inf (a class the student rules out) must not stop the assignment.
        cost = torch.nan_to_num(cost, nan=1e12, posinf=1e12, neginf=-1e12).double().cpu().numpy()
        kept = (self.teacher_confidence(t_logits) >= self.score_threshold).cpu().numpy()  # [B, Qt]
        pairs = []
        for b in range(cost.shape[0]):
            columns = np.flatnonzero(kept[b])  # the teacher queries that are targets
            rows, cols = linear_sum_assignment(cost[b][:, columns])
            pairs.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(columns[cols], dtype=torch.long)))
        return pairs

    def _inputs(self, student, teacher):
        s_logits, s_boxes = _detection_outputs(student, "detection_logit_kd", "student", self.num_queries[0])
        t_logits, t_boxes = _detection_outputs(teacher, "detection_logit_kd", "teacher", self.num_queries[1])
        t_logits, t_boxes = t_logits.detach(), None if t_boxes is None else t_boxes.detach()  # targets only
        if s_logits.shape[0] != t_logits.shape[0] or s_logits.shape[2] != t_logits.shape[2]:
            raise DistillationError(
                f"detection_logit_kd: student logits {tuple(s_logits.shape)} and teacher logits "
                f"{tuple(t_logits.shape)} must agree in batch size and classes ([B, Q, K]; only Q may differ); give "
                "both detectors the same label set"
            )
        if (s_boxes is None) != (t_boxes is None):
            raise DistillationError("detection_logit_kd: give pred_boxes on both sides or on neither: "
                                    "student: [logits, pred_boxes], teacher: [logits, pred_boxes]")
        if s_boxes is None and (self.box_weight or self.giou_weight):
            raise DistillationError(
                "detection_logit_kd: box_weight and giou_weight need the boxes: write the taps as "
                "`student: [logits, pred_boxes]` and `teacher: [logits, pred_boxes]`, or set both weights to 0"
            )
        if self.activation == "softmax" and s_logits.shape[2] < 2:
            raise DistillationError("detection_logit_kd: softmax logits need at least one class and the no-object "
                                    f"class, got {s_logits.shape[2]} logit(s) per query")
        return (s_logits, s_boxes), (t_logits, t_boxes)

    def forward(self, student, teacher) -> torch.Tensor:
        (s_logits, s_boxes), (t_logits, t_boxes) = self._inputs(student, teacher)
        pairs = self._match(s_logits, s_boxes, t_logits, t_boxes)
        device = s_logits.device
        image = torch.cat([torch.full_like(rows, b) for b, (rows, _) in enumerate(pairs)]).to(device)
        s_idx = torch.cat([rows for rows, _ in pairs]).to(device)
        t_idx = torch.cat([cols for _, cols in pairs]).to(device)
        if s_idx.numel() == 0:  # no teacher query reaches score_threshold
            return _zero(s_logits)
        losses = self.pair_losses(
            s_logits[image, s_idx], None if s_boxes is None else s_boxes[image, s_idx],
            t_logits[image, t_idx], None if t_boxes is None else t_boxes[image, t_idx],
        )  # [N]
        return losses.sum() / s_idx.numel()
