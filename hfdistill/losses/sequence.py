"""sequence losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DistillationError, LossParamError
from .common import check_choice, check_number
from .logits import soft_kl
from .registry import as_list, register_loss

# --------------------------------------------------------------------------------------------------
# Shared helpers: layer mapping, padding masks, per-example reductions.
# --------------------------------------------------------------------------------------------------

LAYER_MAPS = ("uniform", "last")
_EPS = 1e-12  # floor for log(probability) when only probabilities are available


def check_layer_map(loss_name: str, layer_map) -> str | tuple[int, ...]:
    """Validate a ``layer_map`` parameter: "uniform", "last", or a non-empty list of ints (LossParamError)."""
    if isinstance(layer_map, str) and layer_map in LAYER_MAPS:
        return layer_map
    if isinstance(layer_map, (list, tuple)) and layer_map and all(
        isinstance(i, int) and not isinstance(i, bool) for i in layer_map
    ):
        return tuple(layer_map)
    raise LossParamError(
        "layer_map",
        f"must be 'uniform', 'last' or a non-empty list of integer teacher layer indices, got {layer_map!r}",
    )


def map_layers(
    n_student: int,
    n_teacher: int,
    layer_map: str | tuple[int, ...],
    *,
    with_embeddings: bool,
    loss_name: str,
) -> list[tuple[int, int]]:
    """Pairs ``(student_index, teacher_index)`` into the student's and the teacher's lists of taps.

    * ``"uniform"``: TinyBERT's g(m) = m * N / M between an M-layer student and an N-layer teacher.
      With ``with_embeddings=True`` the lists are transformers' ``hidden_states`` tuples (index 0 is
      the embedding output, index m the output of layer m; lengths M+1 and N+1), so index m maps to
      teacher index m * N / M and 0 -> 0. With ``with_embeddings=False`` they are ``attentions``
      tuples (index i is layer i+1; lengths M and N), so index i maps to (i+1) * N / M - 1, which is
      the authors' ``teacher_atts[i * k + k - 1]``. When N is not a multiple of M we use the floor
      of m * N / M (the last layer still maps to the last layer), where the authors' code floors k.
    * ``"last"``: only the last student tap against the last teacher tap.
    * a list: ``layer_map[i]`` is the teacher index for student tap i (negative indices count
      from the end, as in Python).
    """
    if n_student < 1 or n_teacher < 1:
        raise DistillationError(f"{loss_name}: got {n_student} student and {n_teacher} teacher tensors; need at least one each")
    if layer_map == "last":
        return [(n_student - 1, n_teacher - 1)]
    if layer_map == "uniform":
        offset = 1 if with_embeddings else 0
        m_layers, n_layers = n_student - offset, n_teacher - offset
        if m_layers == 0 and n_layers == 0:  # only embedding outputs
            return [(0, 0)]
        if m_layers < 1 or n_layers < m_layers:
            raise DistillationError(
                f"{loss_name}: layer_map='uniform' needs at least as many teacher layers as student layers "
                f"(got {n_student} student and {n_teacher} teacher tensors"
                f"{', each list starting with the embedding output' if with_embeddings else ''}); "
                "pass the full tuples, or use layer_map='last' or an explicit list"
            )
        if with_embeddings:
            return [(m, m * n_layers // m_layers) for m in range(n_student)]
        return [(i, (i + 1) * n_layers // m_layers - 1) for i in range(n_student)]
    # explicit list of teacher indices, one per student tap
    if len(layer_map) != n_student:
        raise DistillationError(
            f"{loss_name}: layer_map lists {len(layer_map)} teacher indices but the student gave {n_student} tensors; "
            "give one teacher index per student tensor"
        )
    pairs = []
    for i, j in enumerate(layer_map):
        if not -n_teacher <= j < n_teacher:
            raise DistillationError(f"{loss_name}: layer_map[{i}]={j} is out of range for {n_teacher} teacher tensors")
        pairs.append((i, j % n_teacher))
    return pairs


def token_mask(attention_mask: torch.Tensor | None, batch: int, length: int, loss_name: str) -> torch.Tensor | None:
    """``attention_mask`` [B, T] (1 = real token) as a float32 [B, T] mask, checked against the tensors."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape != (batch, length):
        raise DistillationError(
            f"{loss_name}: attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {length}) "
            "to match the tapped tensors"
        )
    return (attention_mask > 0).float()


def masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-example mean over tokens (real ones only when ``mask`` [B, T] is given), then batch mean.

    ``per_token`` is [B, T] or [B, heads, T] (then the per-example mean runs over heads too).
    """
    if mask is None:
        return per_token.flatten(1).mean(1).mean()
    if per_token.dim() == 3:
        mask = mask[:, None, :].expand_as(per_token)
    count = mask.flatten(1).sum(1).clamp_min(1.0)
    return ((per_token * mask).flatten(1).sum(1) / count).mean()


def row_kl(p_teacher: torch.Tensor, log_p_student: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """KL(p_T || p_S) of each row over the last dim (keys): [..., T, T] -> [..., T].

    ``key_mask`` [B, T] leaves out padded keys; 0 * log 0 is taken as 0.
    """
    terms = torch.xlogy(p_teacher, p_teacher) - p_teacher * log_p_student
    if key_mask is not None:
        terms = terms * key_mask[:, None, None, :]
    return terms.sum(-1)


def _check_same_tokens(s: torch.Tensor, t: torch.Tensor, loss_name: str, what: str) -> None:
    if s.shape[0] != t.shape[0] or (s.dim() >= 3 and s.shape[-2] != t.shape[-2]):
        raise DistillationError(
            f"{loss_name}: student {what} {tuple(s.shape)} and teacher {what} {tuple(t.shape)} must share the batch "
            "and sequence dimensions (same inputs and tokenizer)"
        )


# --------------------------------------------------------------------------------------------------
# TinyBERT: hidden states, embeddings, attention matrices.
# --------------------------------------------------------------------------------------------------


@register_loss(
    "hidden_mse",
    description="TinyBERT hidden-state MSE: MSE(h_S W_h, h_T) summed over uniformly mapped layers, with a learned projection",
    paper="TinyBERT: Distilling BERT for Natural Language Understanding (Jiao et al.), Findings of EMNLP 2020, arXiv:1909.10351",
    year=2020,
    reads="hidden_states",
    same_shape=False,
    fields=("attention_mask",),
    trainable=True,
    multi_layer=True,
)
class HiddenMSE(nn.Module):
    """TinyBERT's Transformer-layer (hidden-state) loss: ``sum_m MSE(H^S_m W_h, H^T_g(m))``.

    Inputs: lists of [B, T, D] hidden states (a single tensor is one pair), typically the whole
    ``hidden_states`` tuple of each model (embedding output + one per layer). ``layer_map`` pairs
    them (see ``map_layers``): "uniform" is TinyBERT's g(m) = m * N / M with 0 -> 0, so on the full
    tuples this is L_embd + sum_m L_hidn of the paper; "last"; or a list of teacher indices.

    When the hidden sizes differ, one ``nn.Linear(d_S, d_T)`` (W_h) is learned and shared by every
    layer; it is built in ``configure``. With equal sizes no projection is used.

    Reduction: squared error averaged over the hidden dim and the tokens of each example (its real
    tokens only when ``attention_mask`` is given), then over the batch; summed over layer pairs as
    in the paper's L_model = sum_m L_layer. Without a mask each pair equals ``nn.MSELoss()``.

    Paper vs authors' code (huawei-noah/Pretrained-Language-Model, TinyBERT): the paper has W_h
    without a bias and a separate W_e for the embedding layer; the code uses one ``fit_dense``
    Linear (with bias) for the embedding output and all layers, and no padding mask. We follow the
    code for the projection (shared, with bias; use ``embedding_mse`` on ``hidden_states.0`` plus
    this loss on layers 1.. for the paper's separate W_e) and mask padding, which only removes
    positions that carry no input.
    """

    def __init__(self, layer_map: str | list[int] = "uniform"):
        super().__init__()
        self.layer_map = check_layer_map(self.loss_name, layer_map)
        self.proj: nn.Linear | None = None
        self._configured = False

    def configure(self, ctx) -> None:
        self._configure_shapes(ctx.student_shape, ctx.teacher_shape)

    def _configure_shapes(self, student_shape, teacher_shape) -> None:
        if teacher_shape is None:
            raise DistillationError(
                f"{self.loss_name}: needs teacher hidden states; the term has no teacher tap (a teacher model is required)"
            )
        d_s = self._hidden_dim(student_shape, "student")
        d_t = self._hidden_dim(teacher_shape, "teacher")
        if d_s == d_t:
            self.proj = None
        elif self.proj is None or (self.proj.in_features, self.proj.out_features) != (d_s, d_t):
            self.proj = nn.Linear(d_s, d_t)
        self._configured = True

    def _hidden_dim(self, shapes, who: str) -> int:
        shapes = [shapes] if isinstance(shapes, torch.Size) else list(shapes)
        if shapes and isinstance(shapes[0], int):  # a single shape given as a plain tuple
            shapes = [torch.Size(shapes)]
        dims = {int(s[-1]) for s in shapes}
        if len(dims) != 1:
            raise DistillationError(f"{self.loss_name}: the {who} tensors have different hidden sizes {sorted(dims)}")
        return dims.pop()

    def pairs(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[tuple[int, int]]:
        return map_layers(len(students), len(teachers), self.layer_map, with_embeddings=True, loss_name=self.loss_name)

    def pair_loss(self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        s, t = s.float(), t.float()
        if s.shape[-1] != t.shape[-1]:
            if self.proj is None:
                raise RuntimeError(
                    f"{self.loss_name}: configure(ctx) must be called first: student hidden "
                    f"size {s.shape[-1]} differs from teacher {t.shape[-1]}, so the W_h projection has to be built"
                )
            s = self.proj(s)
        if s.shape != t.shape:
            _check_same_tokens(s, t, self.loss_name, "hidden states")
            raise DistillationError(f"{self.loss_name}: student {tuple(s.shape)} vs teacher {tuple(t.shape)} after projection")
        sq = (s - t).pow(2)
        if s.dim() == 3:
            return masked_token_mean(sq.mean(-1), token_mask(mask, s.shape[0], s.shape[1], self.loss_name))
        return sq.flatten(1).mean(1).mean()

    def forward(self, student, teacher, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        students, teachers = as_list(student), as_list(teacher)
        total = students[0].new_zeros((), dtype=torch.float32)
        for i, j in self.pairs(students, teachers):
            total = total + self.pair_loss(students[i], teachers[j], attention_mask)
        return total


@register_loss(
    "embedding_mse",
    description="TinyBERT embedding-layer loss: MSE(E_S W_e, E_T) with a learned projection when sizes differ",
    paper="TinyBERT: Distilling BERT for Natural Language Understanding (Jiao et al.), Findings of EMNLP 2020, arXiv:1909.10351",
    year=2020,
    reads="hidden_states",
    same_shape=False,
    fields=("attention_mask",),
    trainable=True,
)
class EmbeddingMSE(HiddenMSE):
    """TinyBERT's embedding-layer loss ``L_embd = MSE(E^S W_e, E^T)``.

    Taps: the embedding outputs, i.e. ``hidden_states.0`` on both sides (given whole
    ``hidden_states`` lists, element 0 of each is used). W_e is an ``nn.Linear(d_S, d_T)`` built in
    ``configure`` when the sizes differ (its own matrix, as in the paper; the authors' code shares
    one ``fit_dense`` with the hidden layers, which ``hidden_mse`` on the full tuples reproduces).
    Same machinery and reduction as ``hidden_mse``: per-example mean over real tokens and the
    hidden dim, batch mean.
    """

    def __init__(self):
        super().__init__(layer_map="uniform")

    def pairs(self, students, teachers):
        return [(0, 0)]

    def configure(self, ctx) -> None:
        def first(shapes):
            if shapes is None or isinstance(shapes, torch.Size) or isinstance(shapes[0], int):
                return shapes
            return shapes[0]

        self._configure_shapes(first(ctx.student_shape), first(ctx.teacher_shape))


def _attention_pairs(loss, student, teacher) -> list[tuple[torch.Tensor, torch.Tensor]]:
    students, teachers = as_list(student), as_list(teacher)
    pairs = map_layers(len(students), len(teachers), loss.layer_map, with_embeddings=False, loss_name=loss.loss_name)
    out = []
    for i, j in pairs:
        s, t = students[i], teachers[j]
        if s.dim() != 4 or t.dim() != 4:
            raise DistillationError(
                f"{loss.loss_name}: expected attention maps [B, heads, T, T], got student {tuple(s.shape)} "
                f"and teacher {tuple(t.shape)}"
            )
        if s.shape[1] != t.shape[1]:
            raise DistillationError(
                f"{loss.loss_name}: student layer {i} has {s.shape[1]} attention heads and teacher layer {j} has "
                f"{t.shape[1]}; this loss compares head by head, so the head counts must match "
                "(use minilm_value_relation with num_relation_heads for models with different head counts)"
            )
        if s.shape != t.shape:
            _check_same_tokens(s, t, loss.loss_name, "attention maps")
            raise DistillationError(f"{loss.loss_name}: student {tuple(s.shape)} vs teacher {tuple(t.shape)} attention maps")
        out.append((s.float(), t.float()))
    return out


@register_loss(
    "attention_kl",
    description="MiniLM attention transfer: KL(teacher || student) of attention distributions per head and query",
    paper="MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers "
    "(Wang et al.), NeurIPS 2020, arXiv:2002.10957",
    year=2020,
    reads="attention",
    same_shape=False,
    fields=("attention_mask",),
    multi_layer=True,
)
class AttentionKL(nn.Module):
    """MiniLM's self-attention distribution transfer.

    ``L_AT = 1/(A_h |x|) sum_a sum_t KL(A^T_{a,t} || A^S_{a,t})``: for each head a and query t, the
    KL between the teacher's and the student's attention distributions over the keys.

    Reduction: summed over keys, averaged over heads and (real) queries of each example, then over
    the batch; summed over layer pairs. With ``attention_mask``, padded queries are left out and
    padded keys contribute nothing. Student probabilities are floored at 1e-12 before the log.
    ``layer_map`` as in ``hidden_mse`` but on ``attentions`` tuples (no embedding entry); the
    default "last" is MiniLM (last teacher layer -> last student layer); "uniform" gives a
    TinyBERT-style layer-wise variant. Head counts must match (MiniLM's requirement).

    Inputs are what transformers returns with ``output_attentions=True`` (needs
    ``attn_implementation="eager"``): post-softmax probabilities taken after attention dropout. The
    teacher runs in eval mode (no dropout), but a student in train mode with
    ``attention_probs_dropout_prob > 0`` hands over dropout-zeroed, rescaled maps; set that
    probability to 0 in the student config when distilling attention (the papers match the maps
    before dropout).
    """

    def __init__(self, layer_map: str | list[int] = "last"):
        super().__init__()
        self.layer_map = check_layer_map(self.loss_name, layer_map)

    def forward(self, student, teacher, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for s, t in _attention_pairs(self, student, teacher):
            mask = token_mask(attention_mask, s.shape[0], s.shape[-1], self.loss_name)
            kl = row_kl(t, torch.log(s.clamp_min(_EPS)), mask)  # [B, heads, T]
            term = masked_token_mean(kl, mask)
            total = term if total is None else total + term
        return total


@register_loss(
    "attention_mse",
    description="TinyBERT attention loss: MSE between student and teacher attention maps per head, over mapped layers",
    paper="TinyBERT: Distilling BERT for Natural Language Understanding (Jiao et al.), Findings of EMNLP 2020, arXiv:1909.10351",
    year=2020,
    reads="attention",
    same_shape=False,
    fields=("attention_mask",),
    multi_layer=True,
)
class AttentionMSE(nn.Module):
    """TinyBERT's attention-based loss ``L_attn = 1/h sum_i MSE(A^S_i, A^T_i)``, summed over layers.

    Difference from the paper: TinyBERT matches the *unnormalised* attention scores QK^T/sqrt(d)
    (it reports faster convergence than with softmax outputs; its code also zeroes the masked
    scores). transformers models only expose the softmax probabilities (``attentions``), and the
    scores are not the output of any module a tap could hook, so we compute the MSE on the
    probabilities. Values are therefore on a [0, 1] scale and much smaller than score MSEs: raise
    the term weight accordingly.

    Reduction: mean over heads and (query, key) pairs of each example (real tokens only with
    ``attention_mask``), then over the batch; summed over layer pairs. Without a mask each pair
    equals ``nn.MSELoss()``. ``layer_map`` as in ``attention_kl``; default "uniform" is
    TinyBERT's g(m) = m * N / M (student layer m -> teacher layer m*k). Head counts must match.

    Inputs are what transformers returns with ``output_attentions=True`` (needs
    ``attn_implementation="eager"``): post-softmax probabilities taken after attention dropout. The
    teacher runs in eval mode (no dropout), but a student in train mode with
    ``attention_probs_dropout_prob > 0`` hands over dropout-zeroed, rescaled maps; set that
    probability to 0 in the student config when distilling attention (the papers match the maps
    before dropout).
    """

    def __init__(self, layer_map: str | list[int] = "uniform"):
        super().__init__()
        self.layer_map = check_layer_map(self.loss_name, layer_map)

    def forward(self, student, teacher, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for s, t in _attention_pairs(self, student, teacher):
            sq = (s - t).pow(2)  # [B, heads, T, T]
            mask = token_mask(attention_mask, s.shape[0], s.shape[-1], self.loss_name)
            if mask is None:
                term = sq.flatten(1).mean(1).mean()
            else:
                pair = mask[:, None, :, None] * mask[:, None, None, :]  # [B, 1, T, T]
                count = pair.flatten(1).sum(1).clamp_min(1.0) * s.shape[1]
                term = ((sq * pair).flatten(1).sum(1) / count).mean()
            total = term if total is None else total + term
        return total


# --------------------------------------------------------------------------------------------------
# MiniLM: value relation.
# --------------------------------------------------------------------------------------------------


def _check_heads(loss_name: str, name: str, value) -> int | None:
    return check_number(name, value, minimum=1, integer=True, allow_none=True)


@register_loss(
    "minilm_value_relation",
    description="MiniLM value-relation transfer: KL between teacher and student softmax(V V^T / sqrt(d)) per head",
    paper="MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers "
    "(Wang et al.), NeurIPS 2020, arXiv:2002.10957",
    year=2020,
    reads="relations",
    same_shape=False,
    fields=("attention_mask",),
)
class MiniLMValueRelation(nn.Module):
    """MiniLM's value-relation transfer.

    Taps: the value projection outputs [B, T, D] of the chosen layer on each side (e.g.
    ``encoder.layer.11.attention.self.value``; MiniLM uses the last layer of both). Each is split
    into heads, ``V_a`` [B, T, d_a], and ``VR_a = softmax(V_a V_a^T / sqrt(d_a))`` (each model with its
    own head size d_a). ``L_VR = 1/(A_h |x|) sum_a sum_t KL(VR^T_{a,t} || VR^S_{a,t})``.

    Heads: MiniLM (v1) needs the same number of heads in both models; give ``student_heads`` and
    ``teacher_heads`` (the models' ``num_attention_heads``), which must be equal. For models whose
    head counts differ, give ``num_relation_heads`` instead: as in MiniLMv2 (Wang et al., Findings
    of ACL 2021, arXiv:2012.15828) the D-dim values of each model are split into that many relation
    heads (d_r = D / num_relation_heads per model, so both D must divide by it) and relations are
    compared per relation head; when it is given, ``student_heads``/``teacher_heads`` are ignored.

    Reduction: KL summed over keys, averaged over heads and real queries of each example, then over
    the batch. With ``attention_mask``, padded keys are excluded from the softmax (as attention
    excludes them) and padded queries from the mean. Not multi-layer: one value tap per side.
    """

    def __init__(
        self,
        student_heads: int | None = None,
        teacher_heads: int | None = None,
        num_relation_heads: int | None = None,
    ):
        super().__init__()
        for name, value in (
            ("student_heads", student_heads),
            ("teacher_heads", teacher_heads),
            ("num_relation_heads", num_relation_heads),
        ):
            _check_heads(self.loss_name, name, value)
        if num_relation_heads is None:
            if student_heads is None or teacher_heads is None:
                raise LossParamError(
                    "student_heads" if student_heads is None else "teacher_heads",
                    "is missing: give student_heads and teacher_heads (equal, as MiniLM requires), "
                    "or num_relation_heads (MiniLMv2 relation heads)",
                )
            if student_heads != teacher_heads:
                raise LossParamError(
                    "teacher_heads",
                    f"must equal student_heads ({student_heads}) for MiniLM, got {teacher_heads}; set "
                    "num_relation_heads to split both into that many relation heads (MiniLMv2)",
                )
        self.student_heads = student_heads
        self.teacher_heads = teacher_heads
        self.num_relation_heads = num_relation_heads

    def log_relation(self, v: torch.Tensor, heads: int, key_mask: torch.Tensor | None, who: str) -> torch.Tensor:
        """log softmax(V_a V_a^T / sqrt(d_a)) per head: [B, T, D] -> [B, heads, T, T]."""
        if v.dim() != 3:
            raise DistillationError(f"{self.loss_name}: expected the {who} value projection [B, T, D], got {tuple(v.shape)}")
        b, t, d = v.shape
        if d % heads:
            raise DistillationError(f"{self.loss_name}: the {who} value size {d} is not divisible by {heads} heads")
        vh = v.float().reshape(b, t, heads, d // heads).transpose(1, 2)  # [B, heads, T, d_a]
        scores = vh @ vh.transpose(-1, -2) / math.sqrt(d // heads)
        if key_mask is not None:
            scores = scores.masked_fill(key_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None = None):
        _check_same_tokens(student, teacher, self.loss_name, "values")
        mask = token_mask(attention_mask, student.shape[0], student.shape[1], self.loss_name)
        if self.num_relation_heads is not None:
            heads_s = heads_t = self.num_relation_heads
        else:
            heads_s, heads_t = self.student_heads, self.teacher_heads
        log_s = self.log_relation(student, heads_s, mask, "student")
        log_t = self.log_relation(teacher, heads_t, mask, "teacher")
        kl = row_kl(log_t.exp(), log_s, mask)  # [B, heads, T]
        return masked_token_mean(kl, mask)


# --------------------------------------------------------------------------------------------------
# DeiT: distillation token.
# --------------------------------------------------------------------------------------------------


@register_loss(
    "deit",
    description="DeiT distillation-token loss: CE with the teacher's argmax (hard) or tau^2 KL (soft) on the distillation head",
    paper="Training data-efficient image transformers & distillation through attention (Touvron et al.), ICML 2021, "
    "arXiv:2012.12877",
    year=2021,
    reads="logits",
    default_tap="logits",
)
class DeiTLoss(nn.Module):
    """DeiT's distillation objective for the distillation token's head.

    * ``mode="hard"`` (the paper's choice): ``CE(Z_dist, y_t)`` with ``y_t = argmax_c Z_t(c)``.
    * ``mode="soft"``: ``tau^2 * KL(softmax(Z_t/tau) || softmax(Z_dist/tau))``.
    Batch mean over rows ([B, C]; [B, T, C] rows are every leading position).

    Taps: the student tap must be the distillation head's logits: ``distillation_logits`` of
    transformers' ``DeiTForImageClassificationWithTeacher`` (recipes set ``student:
    distillation_logits``); the teacher tap is the teacher's ``logits``. The default "logits" tap
    of that model is the average of both heads, which is the inference output, not a training
    target.

    The class-token head is trained by the task loss, not by this term: the paper's objective is
    ``1/2 CE(Z_cls, y) + 1/2 CE(Z_dist, y_t)`` (hard) or ``(1 - lambda) CE(Z_cls, y) + lambda * soft``
    (soft, lambda = 0.1), i.e. the task term on ``cls_logits`` with weight 1/2 (or 1 - lambda) and this
    term with weight 1/2 (or lambda). ``DeiTForImageClassificationWithTeacher.forward`` takes no
    labels and returns no loss, so the task cross-entropy has to be computed on its ``cls_logits``
    output; a cross-entropy on its ``logits`` (the average of both heads) would also push the
    distillation head towards the true labels, which the paper does not do.
    At test time the paper averages the two heads (the model's ``logits``).

    Reference code (facebookresearch/deit ``DistillationLoss``) differs in soft mode: it divides the
    summed KL by ``B * C`` (``numel``) instead of B, and its default tau is 1.0. We follow the
    paper: per-example KL, batch mean, tau = 3.0 (the paper's soft-distillation setting).
    """

    def __init__(self, mode: str = "hard", tau: float = 3.0):
        super().__init__()
        self.mode = check_choice("mode", mode, ("hard", "soft"))
        self.tau = check_number("tau", tau, minimum=0, exclusive=True)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise DistillationError(
                f"deit: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} must have the same shape"
            )
        if self.mode == "hard":
            target = teacher.argmax(-1).reshape(-1)
            return F.cross_entropy(student.float().reshape(-1, student.shape[-1]), target)
        return soft_kl(student, teacher, self.tau) * self.tau**2
