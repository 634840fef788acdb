"""Token-level distillation losses for causal language models: forward KL, reverse KL, generalised JSD, TVD,
skew KL, skew reverse KL, and the Universal Logit Distillation loss for teachers with another vocabulary.

Inputs (every loss here)
    ``student`` [B, T, V] and ``teacher`` [B, T, V] are the models' logits (the ``logits`` tap, the default),
    in any dtype; the field ``labels`` [B, T] (-100: not a completion token) is required and
    ``num_items_in_batch`` is optional. Position t's logits predict token t+1, exactly as transformers' causal-LM
    loss shifts them (``logits[:, :-1]`` against ``labels[:, 1:]``): the tokens that count are the positions
    t = 0..T-2 with ``labels[:, t+1] != -100``. The token losses and the model's own loss count the same tokens.

Normalisation (``normalised_by_items = True`` on every class here)
    Each loss is the SUM over the counted tokens of a per-token divergence, divided by ``num_items_in_batch``
    when it is given (the number of counted tokens in the whole optimisation step, over gradient accumulation
    and processes, as transformers' Trainer passes it: an int or a 0-d tensor, counted over ``labels[..., 1:]``),
    else by the number of counted tokens in this batch (at least 1: a batch without one gives 0, not NaN). The
    value is therefore already divided by the step's token count: the trainer must NOT divide it again by the
    gradient-accumulation steps, and multiplies it by the number of processes to undo DDP's gradient averaging,
    as transformers does for a model's own loss. Summed over the micro-batches (and processes) of a step, it is
    the per-token mean over the whole step, so 4 x 8 accumulation equals one batch of 32.

Temperature
    ``temperature`` T (default 1) divides both models' logits before the softmax: p = softmax(z / T). No T^2
    factor is applied. Hinton's T^2 keeps soft-target gradients comparable in size to a hard-label loss as T
    grows; the token-level LLM papers implemented here (MiniLLM, GKD, DistiLLM, ULD) and TRL's GKD
    ``generalized_jsd_loss`` use no T^2 (GKD and TRL divide by T only), and at the default T = 1 the question
    does not arise. For Hinton's scaling set the term's ``weight`` to T^2.

Precision and memory
    Everything is computed in fp32 whatever the input dtype, but the vocabulary-size logits of a whole sequence
    are never held in fp32. The counted positions are processed in chunks of ``chunk_size`` rows (None, the
    default: ``2**24 // V`` rows, so that one [chunk, V] fp32 temporary is 64 MiB: 512 tokens at a 32k
    vocabulary, 128 at 128k; a chunk's peak is a few such temporaries); each chunk is gathered from the inputs
    and cast to fp32 inside the chunk, and a custom autograd function (:class:`_ChunkedRowLoss`) keeps only the
    inputs for backward, where it recomputes each chunk and writes its gradient into a gradient of the input's
    dtype. The inputs should reach the loss in the models' dtype (``accepts_half_inputs = True`` tells the
    trainer: casting whole [B, T, V] logits to fp32 before the call would undo the saving).
    :func:`fused_linear_token_loss` goes further and never materialises the logits: from the final hidden states
    and the ``lm_head`` weights it computes, per chunk, both models' logits, the loss and the gradients for the
    student's hidden states, weight and bias (Liger-Kernel's fused linear JSD idea, in plain PyTorch). In a
    recipe, ``params: {from_hidden: true}`` with both taps ``hidden_states.-1`` (the final hidden states, the
    output layer's input) uses it: the loss finds both output layers at set-up, the widths may differ, and since
    no tap then reads the logits the trainer runs each model's output layer on the last position only
    (``logits_to_keep=1``): the teacher's vocabulary-size logits are never made, nor the student's when its own
    loss is off (``task_weight: 0``; with it, the student's loss needs its logits).

Other vocabularies
    ``uld`` (Universal Logit Distillation) is registered with ``same_shape=False``: the teacher's logits may be
    [B, Tt, Vt] with another vocabulary and, with its own tokenisation, another length; it aligns the k-th
    completion token of each side and reads the teacher's labels from the optional ``teacher_labels`` argument
    (falling back to ``labels``). The other losses need one shared vocabulary and tokenisation (equal shapes).

Cached top-k teachers (``accepts_sparse_logits = True`` on every same-vocabulary loss here)
    A teacher cache built with ``logits_top_k: k`` keeps, per token position, the teacher's k largest logits and
    the log of the probability mass m of all other tokens (:class:`~hfdistill.losses.common.SparseLogits`; about
    8 k + 4 bytes per token). The losses read it without rebuilding vocabulary-size teacher logits: both
    distributions are taken over k + 1 outcomes, the teacher's k kept tokens and one bucket "any other token"
    (teacher: p_1..p_k and m; student: its own q_1..q_k on the same tokens and 1 - sum q_i, from its full
    logits), and the divergence is computed between those. At temperature 1 this is exact on the kept tokens:
    every kept token's term is the one of the full loss, and the tail is one term instead of V - k. For KL,
    JSD, TVD and the skew KLs (all f-divergences) merging outcomes can only lower the value (data-processing
    inequality), so the cached loss is a lower bound of the full one that is tight when the teacher's tail is
    small or the student's tail has the same shape as the teacher's; gradients push the student's mass on each
    kept token and on the tail as a whole, never how it spreads its tail. At another temperature the teacher's
    tail logits are unknown; they are taken as all equal (the value that spreads m evenly), which makes the
    kept tokens' probabilities an approximation too: prefer T = 1 with a cache. Choose k so that m is small
    (k = 64 holds most of the mass of a trained LM's next-token distribution; the cache reports it).

Masked vocabulary entries (logit -inf, in both models) have probability 0 and contribute 0 (0 log 0 = 0), with
finite gradients; the value equals the loss computed without those entries.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DistillationError, LossParamError
from .common import SparseLogits, check_bool, check_number
from .registry import register_loss

IGNORE_INDEX = -100  # Hugging Face's label for positions that carry no target (prompt, padding)
CHUNK_LOGITS = 2**24  # default chunk: this many logits (64 MiB in fp32) per [chunk, V] temporary


def chunk_rows(chunk_size: int | None, vocab: int) -> int:
    """Rows (token positions) per chunk: ``chunk_size``, or ``CHUNK_LOGITS // vocab`` (at least 1) when None."""
    return int(chunk_size) if chunk_size is not None else max(1, CHUNK_LOGITS // max(vocab, 1))


RowLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # fp32 [n, Vs], fp32 [n, Vt] -> [n]


# =============================================================================================== tokens
def causal_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T] bool: position t counts when ``labels[:, t+1] != -100`` (the last position never).

    The same tokens as transformers' causal-LM loss (``logits[:, :-1]`` against ``labels[:, 1:]``) and as the
    Trainer's ``num_items_in_batch`` (``labels[..., 1:].ne(-100).sum()``).
    """
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def _normaliser(num_items_in_batch, counted: int, device: torch.device):
    """What the summed loss is divided by: ``num_items_in_batch`` when given (int or 0-d tensor), else ``counted``.

    At least 1, so a step (or batch) without a counted token gives 0 rather than 0/0.
    """
    if num_items_in_batch is None:
        return float(max(counted, 1))
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise DistillationError(
                f"num_items_in_batch must be a number or a 0-d tensor, got a tensor of shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        return num_items_in_batch.reshape(()).to(device=device, dtype=torch.float32).clamp_min(1.0)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise DistillationError(f"num_items_in_batch must be a number or a 0-d tensor, got {num_items_in_batch!r}")
    return float(max(num_items_in_batch, 1))


def _check_logits(loss: str, student: torch.Tensor, teacher: torch.Tensor | SparseLogits | None,
                  labels: torch.Tensor, same_vocab: bool = True) -> None:
    if teacher is None:
        raise DistillationError(f"{loss}: needs the teacher's logits; give the recipe a teacher model")
    for who, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, (torch.Tensor, SparseLogits)) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DistillationError(
                f"{loss}: expects the {who}'s causal-LM logits of shape [B, T, V] (the `logits` tap), got {shape}"
            )
    if labels is None or labels.shape != student.shape[:2]:
        got = None if labels is None else tuple(labels.shape)
        raise DistillationError(
            f"{loss}: labels of shape {got} do not match the student's logits {tuple(student.shape)}; expected "
            f"{tuple(student.shape[:2])} (the unshifted causal-LM labels, -100 where no token counts)"
        )
    if same_vocab and teacher.shape != student.shape:
        raise DistillationError(
            f"{loss}: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ; this "
            "loss compares the two distributions token by token over one shared vocabulary and tokenisation (for a "
            "teacher with another tokenizer use `uld`)"
        )


# =============================================================================================== chunking
class _ChunkedRowLoss(torch.autograd.Function):
    """``sum_i row_loss(student_rows[i], teacher_rows[i])`` over gathered rows, computed in chunks.

    Forward: for each chunk of row indices, gather the rows of both inputs ([n, V] in their own dtype), cast
    them to fp32 and add up the per-row losses; nothing of the chunk is kept. Backward: recompute every chunk
    with autograd enabled and write d(loss)/d(rows) into a zero gradient of the input's shape and dtype. Peak
    extra memory: one chunk's fp32 temporaries plus the gradient of the inputs themselves.

    The teacher's input is kept without ``save_for_backward`` when it does not require grad, so the teacher's
    inference-mode tensors can be passed without a copy. It may be a :class:`SparseLogits` (a cached top-k,
    never differentiated): its rows are gathered the same way and ``row_loss`` receives them as one.
    """

    @staticmethod
    def forward(ctx, student, teacher, s_rows, t_rows, row_loss: RowLoss, chunk_size: int):
        s2 = student.reshape(-1, student.shape[-1])  # [B*T, Vs], a view for contiguous logits
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, s_rows.numel(), chunk_size):
            rs, rt = s_rows[start:start + chunk_size], t_rows[start:start + chunk_size]
            total += row_loss(s2.index_select(0, rs).float(), _teacher_rows(teacher, rt)).sum()
        ctx.row_loss, ctx.chunk_size = row_loss, chunk_size
        if teacher.requires_grad:
            ctx.save_for_backward(student, teacher, s_rows, t_rows)
        else:
            ctx.save_for_backward(student, s_rows, t_rows)
            ctx.constant_teacher = teacher
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if hasattr(ctx, "constant_teacher"):
            student, s_rows, t_rows = ctx.saved_tensors
            teacher = ctx.constant_teacher
        else:
            student, teacher, s_rows, t_rows = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        s2 = student.reshape(-1, student.shape[-1])
        t2 = teacher.reshape(-1, teacher.shape[-1]) if need_t else None  # a SparseLogits teacher never needs one
        grad_s = torch.zeros(s2.shape, dtype=student.dtype, device=student.device) if need_s else None
        grad_t = torch.zeros(t2.shape, dtype=teacher.dtype, device=teacher.device) if need_t else None
        for start in range(0, s_rows.numel(), ctx.chunk_size):
            rs, rt = s_rows[start:start + ctx.chunk_size], t_rows[start:start + ctx.chunk_size]
            with torch.enable_grad():
                s = s2.index_select(0, rs).detach().float().requires_grad_(need_s)
                t = (t2.index_select(0, rt).detach().float().requires_grad_(True) if need_t
                     else _teacher_rows(teacher, rt))
                inputs = [x for x, need in ((s, need_s), (t, need_t)) if need]
                grads = iter(torch.autograd.grad(ctx.row_loss(s, t).sum() * grad_total, inputs))
            if need_s:
                grad_s.index_copy_(0, rs, next(grads).to(grad_s.dtype))  # rows are distinct
            if need_t:
                grad_t.index_add_(0, rt, next(grads).to(grad_t.dtype))
        grad_s = grad_s.view(student.shape) if need_s else None
        grad_t = grad_t.view(teacher.shape) if need_t else None
        return grad_s, grad_t, None, None, None, None


def _teacher_rows(teacher: torch.Tensor | SparseLogits, rows: torch.Tensor) -> torch.Tensor | SparseLogits:
    """Rows ``rows`` of the teacher's flattened logits: fp32 [n, Vt], or a :class:`SparseLogits` of n rows."""
    if isinstance(teacher, SparseLogits):
        return teacher.flat_rows(rows)
    return teacher.reshape(-1, teacher.shape[-1]).index_select(0, rows).float()


def chunked_row_loss(student: torch.Tensor, teacher: torch.Tensor | SparseLogits, s_rows: torch.Tensor,
                     t_rows: torch.Tensor, row_loss: RowLoss, chunk_size: int | None = None) -> torch.Tensor:
    """``sum_i row_loss(student.flat[s_rows[i]].float(), teacher.flat[t_rows[i]].float())`` (fp32 scalar).

    ``student`` [..., Vs] and ``teacher`` [..., Vt] are flattened to rows; ``s_rows`` / ``t_rows`` [N] pair
    them. Processed ``chunk_size`` rows at a time (None: :func:`chunk_rows` of the larger vocabulary), forward and
    backward (see :class:`_ChunkedRowLoss`).
    """
    rows = chunk_rows(chunk_size, max(student.shape[-1], teacher.shape[-1]))
    return _ChunkedRowLoss.apply(student, teacher, s_rows, t_rows, row_loss, rows)


# =============================================================================================== divergences
# Per-row divergences on fp32 logits already divided by the temperature: s [n, V] (student), t [n, V]
# (teacher) -> [n]. With p = softmax(t) (teacher) and q = softmax(s) (student):


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) per row, from log-probabilities [n, V] -> [n].

    Entries with a_v = 0 contribute 0 (0 log 0 = 0) and pass no gradient (no 0 * inf); where a has mass and b
    none the KL is +inf, as it is. The values of ``common.kl_from_log_probs`` with two fewer [n, V] temporaries
    (the difference is masked in place).
    """
    a = log_a.exp()
    diff = (log_a - log_b).masked_fill_(a == 0, 0.0)  # -inf - -inf = NaN where a has no mass: replaced by 0
    return (a * diff).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` elementwise from log-probabilities; -inf (with finite gradients) where a = b = 0."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = log_a.new_zeros(())
    mixed = torch.logaddexp(torch.where(both_zero, zero, log_a) + math.log(w),
                            torch.where(both_zero, zero, log_b) + math.log1p(-w))
    return mixed.masked_fill(both_zero, float("-inf"))


def forward_kl_rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    return _kl(F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1))


def reverse_kl_rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_v q_v (log q_v - log p_v)."""
    return _kl(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1))


def jsd_rows(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's generalised JSD with TRL's convention: m = beta p + (1 - beta) q,
    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m); beta = 0 is KL(p || q), beta = 1 is KL(q || p)."""
    log_p, log_q = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def tvd_rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """TVD(p, q) = 1/2 sum_v |p_v - q_v|."""
    return 0.5 * (F.softmax(t, dim=-1) - F.softmax(s, dim=-1)).abs().sum(-1)


def skew_kl_rows(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's alpha-skew KL: KL(p || alpha p + (1 - alpha) q) (the teacher mixed into the student)."""
    log_p, log_q = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl_rows(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's alpha-skew reverse KL: KL(q || alpha q + (1 - alpha) p) (the student mixed into the teacher)."""
    log_p, log_q = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


def uld_rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ULD: sum_i |q_(i) - p_(i)| over both distributions sorted in decreasing order, the smaller vocabulary
    padded with zeros to the larger: s [n, Vs], t [n, Vt] -> [n]."""
    q = F.softmax(s, dim=-1).sort(dim=-1, descending=True).values  # [n, Vs]
    p = F.softmax(t, dim=-1).sort(dim=-1, descending=True).values  # [n, Vt]
    width = max(q.shape[-1], p.shape[-1])
    q, p = F.pad(q, (0, width - q.shape[-1])), F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


# =============================================================================================== the losses
_SHARED_DOC = """

    Shapes: ``student``, ``teacher`` [B, T, V] logits (any dtype); ``labels`` [B, T]; optional
    ``num_items_in_batch``. Summed over the counted tokens (positions t with ``labels[:, t+1] != -100``) and
    divided by ``num_items_in_batch`` or the count (module docstring); logits divided by ``temperature``
    (no T^2 factor); computed in fp32 in chunks of ``chunk_size`` counted positions (None: 2**24 // V).
"""


class _TokenLoss(nn.Module):
    """Base of the same-vocabulary token losses: token selection, chunking, normalisation.

    Subclasses implement ``divergence(s, t) -> [n]`` on fp32 rows of logits already divided by the temperature.
    """

    normalised_by_items = True  # already divided by the step's token count (module docstring)
    accepts_half_inputs = True  # casts chunk by chunk: pass the logits in the models' dtype
    accepts_sparse_logits = True  # a cached top-k teacher is read as it is (module docstring)

    def __init__(self, temperature: float = 1.0, chunk_size: int | None = None, from_hidden: bool = False):
        super().__init__()
        self.temperature = check_number("temperature", temperature, minimum=0, exclusive=True)
        self.chunk_size = check_number("chunk_size", chunk_size, minimum=1, integer=True, allow_none=True)
        self.from_hidden = check_bool("from_hidden", from_hidden)
        self._heads: tuple[nn.Linear, nn.Linear] | None = None  # (student, teacher) output layers: not submodules

    @property
    def same_shape(self) -> bool:
        """Logits must have equal shapes; final hidden states (``from_hidden``) may have two widths."""
        return not self.from_hidden

    def configure(self, ctx) -> None:
        """``from_hidden``: find both models' output layers (``get_output_embeddings``) and check that the taps
        are their inputs' width (the final hidden states)."""
        if not self.from_hidden:
            return
        name = self.loss_name
        if ctx.teacher is None:
            raise DistillationError(f"{name}: from_hidden computes the teacher's logits from its final hidden states "
                                    "and output layer, so it needs the teacher model, not a cache of its outputs")
        heads = []
        for who, model, shape, taps in (("student", ctx.student, ctx.student_shape, ctx.student_taps),
                                        ("teacher", ctx.teacher, ctx.teacher_shape, ctx.teacher_taps)):
            get = getattr(model, "get_output_embeddings", None)
            head = get() if callable(get) else None
            if not isinstance(head, nn.Linear):
                raise DistillationError(f"{name}: from_hidden needs the {who}'s output layer (a causal LM's lm_head, "
                                        f"from get_output_embeddings()); {type(model).__name__} has none")
            if shape is None or shape[-1] != head.in_features:
                raise DistillationError(
                    f"{name}: with from_hidden the {who} tap {taps} must be the final hidden states, the input of "
                    f"its output layer ({head.in_features} wide), got shape {None if shape is None else tuple(shape)}; "
                    "tap `hidden_states.-1`"
                )
            heads.append(head)
        if heads[0].out_features != heads[1].out_features:
            raise DistillationError(f"{name}: the student's output layer has {heads[0].out_features} tokens and the "
                                    f"teacher's {heads[1].out_features}: one shared vocabulary is needed")
        self._heads = (heads[0], heads[1])

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def row_loss(self, s: torch.Tensor, t: torch.Tensor | SparseLogits) -> torch.Tensor:
        """Per-token loss from fp32 logits rows: ``divergence(s / T, t / T)`` -> [n]; for a top-k teacher, the
        same divergence between the two distributions over the teacher's kept tokens plus one "other" bucket."""
        if isinstance(t, SparseLogits):
            return self.divergence(t.student_bucket_logits(s, self.temperature), t.bucket_logits(self.temperature))
        if self.temperature != 1.0:
            s, t = s / self.temperature, t / self.temperature
        return self.divergence(s, t)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                num_items_in_batch=None) -> torch.Tensor:
        if self.from_hidden:
            if self._heads is None:
                raise DistillationError(f"{self.loss_name}: from_hidden is set up by the trainer (configure); outside "
                                        "a trainer call fused_linear_token_loss with the output layers' weights")
            s_head, t_head = self._heads
            return fused_linear_token_loss(
                student, s_head.weight, teacher, t_head.weight, self.loss_name, labels=labels,
                num_items_in_batch=num_items_in_batch, student_bias=s_head.bias, teacher_bias=t_head.bias,
                temperature=self.temperature, beta=getattr(self, "beta", 0.5), alpha=getattr(self, "alpha", 0.1),
                chunk_size=self.chunk_size)
        _check_logits(self.loss_name, student, teacher, labels)
        rows = causal_token_mask(labels).flatten().nonzero().squeeze(1).to(student.device)  # [N] of the B*T positions
        total = chunked_row_loss(student, teacher, rows, rows, self.row_loss, self.chunk_size)
        return total / _normaliser(num_items_in_batch, rows.numel(), total.device)


_LOGITS = dict(reads="logits", default_tap="logits", fields=("labels", "num_items_in_batch"))


@register_loss(
    "forward_kl",
    description="Token-level KD for causal LMs: forward KL(p_teacher || p_student) per completion token, summed and "
    "divided by the step's token count; chunked fp32",
    paper="Sequence-Level Knowledge Distillation (Kim, Rush), EMNLP 2016, arXiv:1606.07947 (word-level KD)",
    year=2016,
    **_LOGITS,
)
class ForwardKLLoss(_TokenLoss):
    """``sum_tokens KL(p || q) / N``, p = softmax(z_teacher / T), q = softmax(z_student / T): the standard
    token-level (word-level) KD, Hinton's soft targets at every position, without the T^2 factor.""" + _SHARED_DOC

    def divergence(self, s, t):
        return forward_kl_rows(s, t)


@register_loss(
    "reverse_kl",
    description="Token-level reverse KL(p_student || p_teacher) per completion token (mode-seeking), summed and "
    "divided by the step's token count; chunked fp32",
    paper="MiniLLM: Knowledge Distillation of Large Language Models (Gu, Dong, Wei, Huang), ICLR 2024, "
    "arXiv:2306.08543",
    year=2024,
    **_LOGITS,
)
class ReverseKLLoss(_TokenLoss):
    """``sum_tokens KL(q || p) / N``, q the student's and p the teacher's softmax at temperature T.

    MiniLLM minimises the sequence-level reverse KL with policy gradients on student samples; this is its
    per-step term (the token-level reverse KL on the given sequences, the "reverse_kl" of DistiLLM's and
    MiniLLM's code), which on student-generated completions is the on-policy reverse-KL objective.""" + _SHARED_DOC

    def divergence(self, s, t):
        return reverse_kl_rows(s, t)


@register_loss(
    "jsd",
    description="Generalised Jensen-Shannon divergence of GKD per completion token: beta KL(p_T || m) + (1 - beta) "
    "KL(p_S || m), m = beta p_T + (1 - beta) p_S (TRL's convention: beta 0 = forward KL, 1 = reverse KL)",
    paper="On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes (Agarwal, Vieillard, "
    "Zhou, Stanczyk, Ramos, Geist, Bachem), ICLR 2024, arXiv:2306.13649",
    year=2024,
    **_LOGITS,
)
class JSDLoss(_TokenLoss):
    """``sum_tokens JSD_beta(p, q) / N`` with p the teacher's and q the student's softmax at temperature T:

        m = beta p + (1 - beta) q
        JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m)        (0 < beta < 1)
        beta = 0: KL(p || q) (forward KL);   beta = 1: KL(q || p) (reverse KL)

    This is GKD's Eq. (1) with P = teacher, Q = student, and exactly TRL's ``generalized_jsd_loss``
    (``trl.experimental.gkd``, TRL 1.16: the mixture puts ``beta`` on the teacher, and beta = 0 / 1 are
    special-cased to the two KLs). Between the ends the value tends to 0 like ``beta KL(p || q)`` as beta -> 0
    and ``(1 - beta) KL(q || p)`` as beta -> 1, so the end points are these limits divided by the vanishing
    weight (the paper's "behaves like forward / reverse KL"), not continuous in value. Default beta = 0.5, TRL's
    default (the symmetric JSD).""" + _SHARED_DOC

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, chunk_size: int | None = None,
                 from_hidden: bool = False):
        super().__init__(temperature=temperature, chunk_size=chunk_size, from_hidden=from_hidden)
        self.beta = check_number("beta", beta, minimum=0, maximum=1)

    def divergence(self, s, t):
        return jsd_rows(s, t, self.beta)


@register_loss(
    "tvd",
    description="Total variation distance 1/2 sum |p_T - p_S| per completion token, summed and divided by the "
    "step's token count; chunked fp32",
    paper="f-Divergence Minimization for Sequence-Level Knowledge Distillation (Wen, Li, Du, Mou), ACL 2023, "
    "arXiv:2307.15190",
    year=2023,
    **_LOGITS,
)
class TVDLoss(_TokenLoss):
    """``sum_tokens 1/2 sum_v |p_v - q_v| / N`` (the total variation distance, in [0, 1] per token), as in
    f-distill's token-level TVD and DistiLLM's ``tv_distance``.""" + _SHARED_DOC

    def divergence(self, s, t):
        return tvd_rows(s, t)


def _check_alpha(alpha) -> float:
    alpha = check_number("alpha", alpha, minimum=0, maximum=1)
    if alpha == 1.0:  # the mixture is then the first distribution itself: the loss is identically 0
        raise LossParamError("alpha", "must be a finite number in [0, 1) (alpha = 1 makes the loss 0), got 1.0")
    return alpha


@register_loss(
    "skew_kl",
    description="DistiLLM's alpha-skew KL per completion token: KL(p_T || alpha p_T + (1 - alpha) p_S), bounded "
    "and stable where the student puts no mass; chunked fp32",
    paper="DistiLLM: Towards Streamlined Distillation for Large Language Models (Ko, Kim, Chen, Yun), ICML 2024, "
    "arXiv:2402.03898",
    year=2024,
    **_LOGITS,
)
class SkewKLLoss(_TokenLoss):
    """``sum_tokens KL(p || alpha p + (1 - alpha) q) / N``: the teacher p is mixed into the student q.

    The paper's alpha-skew KL, D_SKL^alpha(p, q_theta) = D_KL(p || alpha p + (1 - alpha) q_theta); alpha = 0 is
    the forward KL, and the value is at most log(1 / alpha). The authors' ``skewed_forward_kl`` computes the
    cross-entropy ``-sum p log(mixture)``, which is this KL plus the teacher's entropy (a constant: the same
    gradients); we return the KL itself (0 when the student equals the teacher). Default alpha = 0.1, the
    paper's and the code's (``lam=0.1``).""" + _SHARED_DOC

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, chunk_size: int | None = None,
                 from_hidden: bool = False):
        super().__init__(temperature=temperature, chunk_size=chunk_size, from_hidden=from_hidden)
        self.alpha = _check_alpha(alpha)

    def divergence(self, s, t):
        return skew_kl_rows(s, t, self.alpha)


@register_loss(
    "skew_reverse_kl",
    description="DistiLLM's alpha-skew reverse KL per completion token: KL(p_S || alpha p_S + (1 - alpha) p_T); "
    "chunked fp32",
    paper="DistiLLM: Towards Streamlined Distillation for Large Language Models (Ko, Kim, Chen, Yun), ICML 2024, "
    "arXiv:2402.03898",
    year=2024,
    **_LOGITS,
)
class SkewReverseKLLoss(_TokenLoss):
    """``sum_tokens KL(q || alpha q + (1 - alpha) p) / N``: the student q is mixed into the teacher p.

    The paper's alpha-skew reverse KL, D_SRKL^alpha(p, q_theta) = D_KL(q_theta || (1 - alpha) p + alpha q_theta),
    identical to the authors' ``skewed_reverse_kl`` (``mixed = (1 - lam) teacher + lam student``); alpha = 0 is
    the reverse KL. Default alpha = 0.1.""" + _SHARED_DOC

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, chunk_size: int | None = None,
                 from_hidden: bool = False):
        super().__init__(temperature=temperature, chunk_size=chunk_size, from_hidden=from_hidden)
        self.alpha = _check_alpha(alpha)

    def divergence(self, s, t):
        return skew_reverse_kl_rows(s, t, self.alpha)


# ----------------------------------------------------------------------------------------------- ULD
def _first_k(mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the first ``k[b]`` True entries of each row of ``mask`` [B, T]."""
    rank = mask.long().cumsum(1) - 1  # rank of each counted position among its row's counted positions
    return mask & (rank < k[:, None])


@register_loss(
    "uld",
    description="Universal Logit Distillation for teachers with another tokenizer/vocabulary: L1 (Wasserstein-1) "
    "between sorted token distributions, aligned on the k-th completion token of each side",
    paper="Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs (Boizard, El Haddad, "
    "Hudelot, Colombo), arXiv:2402.12030",
    year=2024,
    same_shape=False,
    **{**_LOGITS, "fields": ("labels", "num_items_in_batch", "teacher_labels")},
)
class ULDLoss(nn.Module):
    """``sum_pairs sum_i |q_(i) - p_(i)| / N``: per aligned pair of positions, the L1 distance between the
    student's and the teacher's probabilities sorted in decreasing order, the smaller vocabulary padded with
    zeros (the paper's closed form of the Wasserstein-1 distance with a uniform transport cost).

    Vocabularies need not match (``same_shape=False``): ``student`` [B, Ts, Vs] and ``teacher`` [B, Tt, Vt]
    with any Vs, Vt, and Tt != Ts when the teacher has its own tokenisation.

    Alignment (the paper's code and TRL's GOLD ``ULDLoss`` without its extensions): in each example the k-th
    counted position of the student is paired with the k-th counted position of the teacher, for
    k < min(n_student, n_teacher) (both sides' completions left-aligned, the longer one truncated). A side's
    counted positions are those predicting its completion tokens, with the causal shift of every loss here
    (position t when ``labels[:, t+1] != -100``; the paper's code also starts one position before the first
    answer token; TRL's default ``observed`` strategy slices at the label positions themselves). The teacher's
    positions come from the optional ``teacher_labels`` [B, Tt] (a batch field ``teacher_labels``: the labels of
    the teacher's own tokenisation, like ``teacher_input_ids``), else from ``labels`` (then Tt must equal Ts).

    Normalisation: summed over the aligned pairs and divided by ``num_items_in_batch`` when given, else by the
    number of the STUDENT's counted tokens in the batch, so that both agree on one batch (``num_items_in_batch``
    counts the student's labels); student tokens beyond the teacher's completion add 0. The paper's code takes a
    mean over [B, longest completion] instead (padding included) and TRL's a per-sequence mean then a batch
    mean: a per-token scale factor that the term weight absorbs. ``temperature`` divides both models' logits
    (the paper's code has one per model, default 1); no T^2. Skipping EOS tokens, the hybrid exact-match vocabulary
    term and byte-offset merging of GOLD are not implemented.
    """

    normalised_by_items = True
    accepts_half_inputs = True

    def __init__(self, temperature: float = 1.0, chunk_size: int | None = None):
        super().__init__()
        self.temperature = check_number("temperature", temperature, minimum=0, exclusive=True)
        self.chunk_size = check_number("chunk_size", chunk_size, minimum=1, integer=True, allow_none=True)

    def row_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            s, t = s / self.temperature, t / self.temperature
        return uld_rows(s, t)

    def aligned_rows(self, labels: torch.Tensor, teacher_labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(student rows, teacher rows, student's counted tokens): flat position indices, paired in order."""
        ms, mt = causal_token_mask(labels), causal_token_mask(teacher_labels)  # [B, Ts], [B, Tt]
        k = torch.minimum(ms.sum(1), mt.sum(1))  # [B] aligned pairs per example
        s_rows = _first_k(ms, k).flatten().nonzero().squeeze(1)
        t_rows = _first_k(mt, k).flatten().nonzero().squeeze(1)
        return s_rows, t_rows, int(ms.sum())

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                num_items_in_batch=None, teacher_labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_logits("uld", student, teacher, labels, same_vocab=False)
        if teacher.shape[0] != student.shape[0]:
            raise DistillationError(f"uld: the teacher's logits {tuple(teacher.shape)} and the student's "
                                    f"{tuple(student.shape)} have different batch sizes")
        if teacher_labels is None:
            if teacher.shape[:2] != student.shape[:2]:
                raise DistillationError(
                    f"uld: the teacher's logits {tuple(teacher.shape)} have another length than the student's "
                    f"{tuple(student.shape)}; give the batch `teacher_labels` (the labels of the teacher's own "
                    "tokenisation) so the completion tokens of each side can be aligned"
                )
            teacher_labels = labels
        elif teacher_labels.shape != teacher.shape[:2]:
            raise DistillationError(
                f"uld: teacher_labels of shape {tuple(teacher_labels.shape)} do not match the teacher's logits "
                f"{tuple(teacher.shape)}; expected {tuple(teacher.shape[:2])}"
            )
        s_rows, t_rows, counted = self.aligned_rows(labels, teacher_labels.to(labels.device))
        s_rows, t_rows = s_rows.to(student.device), t_rows.to(teacher.device)
        total = chunked_row_loss(student, teacher, s_rows, t_rows, self.row_loss, self.chunk_size)
        return total / _normaliser(num_items_in_batch, counted, total.device)


# =============================================================================================== fused linear
TOKEN_LOSSES: dict[str, type[_TokenLoss]] = {
    "forward_kl": ForwardKLLoss,
    "reverse_kl": ReverseKLLoss,
    "jsd": JSDLoss,
    "tvd": TVDLoss,
    "skew_kl": SkewKLLoss,
    "skew_reverse_kl": SkewReverseKLLoss,
}


def _linear_fp32(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The lm_head on a chunk, as the model computes it (in the weight's dtype), then fp32: [n, H] -> [n, V]."""
    return F.linear(hidden.to(weight.dtype), weight, bias).float()


class _FusedLinearRowLoss(torch.autograd.Function):
    """``sum_i row_loss(h_s[i] W_s^T + b_s, h_t[i] W_t^T + b_t)`` over gathered rows, chunk by chunk.

    Forward computes, per chunk of ``n`` rows, both models' logits ([n, V], fp32), the per-row loss and (when a
    gradient is wanted) dL/dz by autograd on the chunk alone, then
        dL/dh_s[rows] = dz @ W_s            [n, H]
        dL/dW_s      += dz^T @ h_s[rows]    [V, H]  (in fp32, accumulated in place)
        dL/db_s      += sum_rows dz         [V]
    so no [N, V] tensor ever exists. Backward only scales the stored gradients by the incoming one. The teacher's
    side gets no gradient (it is frozen).
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, row_loss: RowLoss,
                chunk_size: int, want_grad: bool):
        need_h, need_w = want_grad and s_hidden.requires_grad, want_grad and s_weight.requires_grad
        need_b = want_grad and s_bias is not None and s_bias.requires_grad
        grad_h = torch.zeros_like(s_hidden) if need_h else None  # [M, H]
        grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if need_w else None
        grad_b = torch.zeros(s_bias.shape, dtype=torch.float32, device=s_bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start:start + chunk_size]
            h = s_hidden.index_select(0, idx)  # [n, H]
            z_t = _linear_fp32(t_hidden.index_select(0, idx), t_weight, t_bias)  # [n, Vt] fp32
            z_s = _linear_fp32(h, s_weight, s_bias)  # [n, Vs] fp32
            if not (need_h or need_w or need_b):
                total += row_loss(z_s, z_t).sum()
                continue
            with torch.enable_grad():
                z_s.requires_grad_(True)
                chunk_loss = row_loss(z_s, z_t).sum()
                (dz,) = torch.autograd.grad(chunk_loss, z_s)  # [n, Vs] fp32
            total += chunk_loss.detach()
            if need_h:
                grad_h.index_copy_(0, idx, (dz.to(s_weight.dtype) @ s_weight).to(grad_h.dtype))
            if need_w:
                grad_w.addmm_(dz.t(), h.float())  # in fp32, in place: no [V, H] temporary
            if need_b:
                grad_b += dz.sum(0)
        # The gradients are kept on ctx (not save_for_backward: they are scaled in place, without a copy of the
        # [V, H] weight gradient), so this backward can run once (no retain_graph).
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (s_weight.dtype, None if s_bias is None else s_bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_token_loss: backward can run only once (its gradients were computed "
                               "in the forward and handed over); recompute the loss for another backward")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        grad_h = None if grad_h is None else grad_h.mul_(grad_total)
        grad_w = None if grad_w is None else grad_w.mul_(grad_total).to(ctx.dtypes[0])
        grad_b = None if grad_b is None else grad_b.mul_(grad_total).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def fused_linear_token_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    kind: str = "forward_kl",
    *,
    labels: torch.Tensor | None = None,
    num_items_in_batch=None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """A token loss from the final hidden states and the ``lm_head`` weights, without materialising the logits.

    Args:
        student_hidden: [B, T, H] or [N, H], the student's final hidden states (the lm_head's input).
        student_lm_head_weight: [V, H]; ``student_bias`` [V] optional.
        teacher_hidden: the teacher's, with the same leading shape: [B, T, Ht] or [N, Ht].
        teacher_lm_head_weight: [V, Ht] (the same vocabulary V); ``teacher_bias`` [V] optional.
        kind: ``forward_kl``, ``reverse_kl``, ``jsd`` (with ``beta``), ``tvd``, ``skew_kl`` or ``skew_reverse_kl``
            (with ``alpha``): the registered losses of the same names, same formulas and conventions.
        labels: with [B, T, H] hidden states, the [B, T] causal-LM labels (required): position t counts when
            ``labels[:, t+1] != -100``, exactly as the loss modules. With [N, H] rows, optional [N] labels already
            aligned with the rows (a row counts when its label is not -100; None: every row counts).
        num_items_in_batch: divide the sum by it (the step's token count), else by the counted rows.
        chunk_size: rows per chunk (None: ``2**24 // V``): the largest temporaries are a few [chunk_size, V] fp32
            tensors.

    Returns the fp32 scalar ``sum_tokens divergence(z_s / T, z_t / T) / N`` with ``z = h W^T (+ b)`` computed in
    the weight's dtype, as the model's lm_head would: the same value as the registered loss on the models'
    logits. Gradients reach ``student_hidden``, the student's weight and bias (computed during the forward,
    chunk by chunk, and only scaled in backward); the teacher's tensors get none.
    """
    if kind not in TOKEN_LOSSES:
        raise LossParamError("kind", f"must be one of {', '.join(map(repr, TOKEN_LOSSES))}, got {kind!r}")
    params = {"temperature": temperature, "chunk_size": chunk_size}
    if kind == "jsd":
        params["beta"] = beta
    elif kind in ("skew_kl", "skew_reverse_kl"):
        params["alpha"] = alpha
    loss = TOKEN_LOSSES[kind](**params)  # checks the parameters (LossParamError)

    lead = student_hidden.shape[:-1]
    if student_hidden.dim() not in (2, 3) or teacher_hidden.shape[:-1] != lead:
        raise DistillationError(
            f"fused_linear_token_loss: hidden states must be [B, T, H] or [N, H] with the same leading shape, got "
            f"student {tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)}"
        )
    if student_lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0]:
        raise DistillationError(
            f"fused_linear_token_loss: the vocabularies differ (student lm_head {tuple(student_lm_head_weight.shape)}, "
            f"teacher {tuple(teacher_lm_head_weight.shape)}); these losses need one shared vocabulary"
        )
    if student_hidden.dim() == 3:
        if labels is None or labels.shape != lead:
            raise DistillationError(
                f"fused_linear_token_loss: [B, T, H] hidden states need labels of shape {tuple(lead)}, got "
                f"{None if labels is None else tuple(labels.shape)}"
            )
        mask = causal_token_mask(labels)
    elif labels is None:
        mask = torch.ones(lead, dtype=torch.bool, device=student_hidden.device)
    else:
        if labels.shape != lead:
            raise DistillationError(
                f"fused_linear_token_loss: labels {tuple(labels.shape)} do not match the rows {tuple(lead)}"
            )
        mask = labels != IGNORE_INDEX
    rows = mask.flatten().nonzero().squeeze(1).to(student_hidden.device)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    t_weight = teacher_lm_head_weight.detach()
    t_bias = None if teacher_bias is None else teacher_bias.detach()
    total = _FusedLinearRowLoss.apply(s_hidden, student_lm_head_weight, student_bias, t_hidden, t_weight, t_bias,
                                      rows, loss.row_loss, chunk_rows(loss.chunk_size, student_lm_head_weight.shape[0]),
                                      torch.is_grad_enabled())
    return total / _normaliser(num_items_in_batch, rows.numel(), total.device)
