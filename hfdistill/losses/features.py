"""Feature-based distillation losses: hint (FitNets), cosine, AT, NST, FT, OFD, AFD, ReviewKD, SRD, ICKD, CWD, AB, PAD."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DistillationError, LossParamError
from .common import channels, check_choice, check_number, kl_from_log_probs, pool_to_smaller, require_batch_for_bn
from .registry import as_list, register_loss

# --------------------------------------------------------------------------------------------
# Shape helpers shared by the feature methods.
#   CNN features     [B, C, H, W]  (channels C, positions H*W)
#   transformer hid. [B, T, D]     (channels D, positions T)
# Every loss casts its inputs to float32 first (teacher features may be bf16/fp16).
# --------------------------------------------------------------------------------------------


def _single(x, loss: str) -> torch.Tensor:
    """A single-layer method accepts a tensor or a list holding exactly one tensor."""
    if isinstance(x, (list, tuple)):
        if len(x) != 1:
            raise DistillationError(f"{loss}: reads one layer, got a list of {len(x)} tensors; give the term one tap per side")
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise DistillationError(f"{loss}: expected a tensor, got {type(x).__name__}")
    return x


def _is_shape_list(shape) -> bool:
    return isinstance(shape, (list, tuple)) and len(shape) > 0 and isinstance(shape[0], (list, tuple))


def _no_shape(loss: str, who: str) -> DistillationError:
    why = "; give the recipe a teacher model" if who == "teacher" else ""
    return DistillationError(f"{loss}: needs a {who} feature, but the term has no {who} tap{why}")


def _single_shape(shape, loss: str, who: str = "student") -> torch.Size:
    if shape is None:
        raise _no_shape(loss, who)
    if _is_shape_list(shape):
        if len(shape) != 1:
            raise DistillationError(f"{loss}: reads one layer, the term gives {len(shape)} {who} taps; give it one")
        shape = shape[0]
    return torch.Size(shape)


def _shape_list(shapes, loss: str, who: str = "student") -> list[torch.Size]:
    if shapes is None:
        raise _no_shape(loss, who)
    if not _is_shape_list(shapes):
        shapes = [shapes]
    return [torch.Size(s) for s in shapes]


def _check_same_shape(s: torch.Tensor, t: torch.Tensor, loss: str) -> None:
    if s.shape != t.shape:
        raise DistillationError(
            f"{loss}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must have the same shape "
            "(set an adapter on the term to map the student feature to the teacher's shape)"
        )


def _require_dims(x: torch.Tensor | torch.Size, dims: tuple[int, ...], loss: str, who: str) -> None:
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)
    if len(shape) not in dims:
        layouts = {2: "[B, D]", 3: "[B, T, D]", 4: "[B, C, H, W]"}
        want = " or ".join(layouts[d] for d in dims)
        raise DistillationError(f"{loss}: {who} feature must be {want}, got shape {shape}; tap a layer of that kind")


def _to_bcn(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H*W]; [B, T, D] -> [B, D, T] (channels first, positions last)."""
    if x.dim() == 4:
        return x.flatten(2)
    return x.transpose(1, 2)


def _require_configured(module: nn.Module, attr: str, loss: str) -> None:
    if getattr(module, attr, None) is None:
        raise RuntimeError(
            f"{loss}: configure(ctx) must be called first; it builds the method's trainable modules from the "
            "tapped shapes (the trainer does this after its dry-run forward; in Python pass "
            "hfdistill.terms.LossContext(student_shape=..., teacher_shape=...))"
        )


_BN_FIX = "use a per-device batch of at least 2 (per_device_train_batch_size), or drop the last incomplete batch"


def _through_own_module(module: nn.Module, attr: str, loss: str, student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] student map through the method's own module (OFD's connector), and the teacher map.

    The larger map is pooled to the smaller size first; both come back in float32 with equal shapes.
    """
    _require_configured(module, attr, loss)
    s, t = _single(student, loss), _single(teacher, loss)
    _require_dims(s, (4,), loss, "student")
    _require_dims(t, (4,), loss, "teacher")
    s, t = pool_to_smaller(s.float(), t.float())
    require_batch_for_bn(loss, module.training, s, "the student map", _BN_FIX)
    mapped = getattr(module, attr)(s).float()
    if mapped.shape != t.shape:
        raise DistillationError(
            f"{loss}: the student through its {attr} is {tuple(mapped.shape)} but the teacher is {tuple(t.shape)}; "
            "configure was called with other shapes"
        )
    return mapped, t


# --------------------------------------------------------------------------------------------
# FitNets hint loss
# --------------------------------------------------------------------------------------------


@register_loss(
    "mse",
    description="FitNets hint loss: mean squared error between the (adapted) student feature and the teacher feature",
    paper="FitNets: Hints for Thin Deep Nets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio), ICLR 2015, arXiv:1412.6550",
    year=2015,
    reads="features",
    same_shape=True,
    aliases=("fitnet",),
)
class HintLoss(nn.Module):
    """``mean((s - t)^2)`` over every element (batch, channels, positions).

    The paper writes ``1/2 ||u_h - r(v_g)||^2`` summed over the hint; like RepDistiller and
    torchdistill we average over elements, so the weight does not depend on the feature size
    (RepDistiller trains FitNets with weight 100 on this mean). The paper's regressor ``r``
    (RepDistiller's ``ConvReg``) is the term's adapter, chosen in the recipe, not part of the loss.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = _single(student, "mse").float(), _single(teacher, "mse").float()
        _check_same_shape(s, t, "mse")
        return F.mse_loss(s, t)


# --------------------------------------------------------------------------------------------
# Cosine embedding loss
# --------------------------------------------------------------------------------------------


@register_loss(
    "cosine",
    description="1 - cosine similarity of student and teacher features along the channel/hidden dimension, mean over positions",
    paper="DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter (Sanh, Debut, Chaumond, Wolf), "
    "NeurIPS EMC^2 Workshop 2019, arXiv:1910.01108",
    year=2019,
    reads="features",
    same_shape=True,
)
class CosineLoss(nn.Module):
    """``mean over positions and batch of 1 - cos(s_i, t_i)``.

    The vectors compared are the channel vectors: dim 1 of ``[B, C, H, W]`` (one per pixel), the
    last dim of ``[B, T, D]`` (one per token) and of ``[B, D]``. This is DistilBERT's cosine
    embedding loss (``nn.CosineEmbeddingLoss`` with target 1) between student and teacher hidden
    states. DistilBERT averages over non-padding tokens only; here every position counts
    (pad-free inputs, or an attention-mask-aware variant in the sequence family, are needed for
    exact parity on padded batches). ``eps`` guards zero vectors as in ``F.cosine_similarity``.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = check_number("eps", eps, minimum=0, exclusive=True)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = _single(student, "cosine").float(), _single(teacher, "cosine").float()
        _check_same_shape(s, t, "cosine")
        if s.dim() < 2:
            raise DistillationError(f"cosine: features need a batch and a feature dimension, got shape {tuple(s.shape)}")
        dim = 1 if s.dim() == 4 else -1
        return (1.0 - F.cosine_similarity(s, t, dim=dim, eps=self.eps)).mean()


# --------------------------------------------------------------------------------------------
# Attention Transfer
# --------------------------------------------------------------------------------------------


def _spatial_attention(x: torch.Tensor, p: float) -> torch.Tensor:
    """AT's activation-based attention: mean over channels of |A|^p, flattened, L2-normalised -> [B, N]."""
    a = _to_bcn(x).abs().pow(p).mean(1)  # [B, N]; mean instead of sum: identical after normalisation
    return F.normalize(a, dim=1)


@register_loss(
    "at",
    description="Attention Transfer: match L2-normalised spatial attention maps (sum over channels of |A|^p) over layer pairs",
    paper="Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks via "
    "Attention Transfer (Zagoruyko, Komodakis), ICLR 2017, arXiv:1612.03928",
    year=2017,
    reads="features",
    same_shape=False,
    multi_layer=True,
)
class ATLoss(nn.Module):
    """``beta/2 * sum_j mean_{b,i} (Q_s^j/||Q_s^j||_2 - Q_t^j/||Q_t^j||_2)_i^2``.

    ``Q = vec(sum_c |A_c|^p)`` is the attention map of one layer (``p = 2`` in the paper), for
    ``[B, C, H, W]`` maps and for ``[B, T, D]`` hidden states (one attention value per token).
    Layer pairs ``j`` come as lists (``student: [layer1, layer2, layer3]``); the loss is summed over
    pairs. Channels may differ; when spatial sizes differ the larger *feature map* is
    average-pooled to the smaller one before the maps are formed (as mdistiller does).

    Paper vs reference: Eq. 2 of the paper writes ``beta/2 * ||.||_p`` (an unsquared norm), but the
    paper also says beta (10^3) is divided by the number of attention-map elements and the batch
    size, and the authors' code (szagoruyko/attention-transfer, ``at_loss``) uses
    ``(at(x) - at(y)).pow(2).mean()`` times ``beta/2`` with ``beta = 1e3``. We follow the authors'
    code, which produced the reported numbers: squared differences, averaged over batch and map
    elements, times ``beta / 2``. RepDistiller uses the same mean without the 1/2 and weight 1000,
    which equals ``beta = 2000`` here.
    """

    def __init__(self, p: float = 2.0, beta: float = 1000.0):
        super().__init__()
        self.p = check_number("p", p, minimum=0, exclusive=True)
        self.beta = check_number("beta", beta, minimum=0, exclusive=True)

    def forward(self, student, teacher) -> torch.Tensor:
        s_list, t_list = as_list(student), as_list(teacher)
        if len(s_list) != len(t_list) or not s_list:
            raise DistillationError(
                f"at: needs as many student as teacher layers (>= 1), got {len(s_list)} and {len(t_list)}; "
                "list the same number of student and teacher taps"
            )
        total = s_list[0].new_zeros((), dtype=torch.float32)
        for s, t in zip(s_list, t_list):
            _require_dims(s, (3, 4), "at", "student")
            _require_dims(t, (3, 4), "at", "teacher")
            if s.shape[0] != t.shape[0]:
                raise DistillationError(f"at: batch sizes differ: {s.shape[0]} vs {t.shape[0]}")
            s, t = pool_to_smaller(s.float(), t.float())
            total = total + (_spatial_attention(s, self.p) - _spatial_attention(t, self.p)).pow(2).mean()
        return self.beta / 2 * total


# --------------------------------------------------------------------------------------------
# Neuron Selectivity Transfer
# --------------------------------------------------------------------------------------------


@register_loss(
    "nst",
    description="Neuron Selectivity Transfer: squared MMD between student and teacher channel maps with a polynomial kernel",
    paper="Like What You Like: Knowledge Distill via Neuron Selectivity Transfer (Huang, Wang), arXiv 2017, arXiv:1707.01219",
    year=2017,
    reads="features",
    same_shape=False,
)
class NSTLoss(nn.Module):
    """Per example, with ``f^i`` the L2-normalised spatial map of channel ``i`` (a vector over positions)::

        MMD^2 = 1/C_t^2 sum_{i,i'} k(f_t^i, f_t^i') + 1/C_s^2 sum_{j,j'} k(f_s^j, f_s^j')
                - 2/(C_t C_s) sum_{i,j} k(f_t^i, f_s^j),        k(x, y) = (x . y + c)^d

    averaged over the batch. The paper's best kernel is the polynomial one with ``d = 2, c = 0``
    (``d = 1`` gives the linear kernel). Channel counts may differ; spatial sizes (or token counts
    for ``[B, T, D]``) must match, else the larger map is average-pooled to the smaller one, as in
    RepDistiller. The paper weights the term with ``lambda/2`` (RepDistiller uses weight 50); that
    weight is the term's ``weight``. RepDistiller computes exactly this (including the teacher-teacher
    term, which is constant for the student).
    """

    def __init__(self, d: int = 2, c: float = 0.0):
        super().__init__()
        self.d = check_number("d", d, minimum=1, integer=True)  # polynomial kernel degree
        self.c = check_number("c", c, minimum=0)  # polynomial kernel constant

    def _kernel_mean(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.bmm(a, b.transpose(1, 2)) + self.c).pow(self.d).mean((1, 2))  # [B]

    def forward(self, student, teacher) -> torch.Tensor:
        s, t = _single(student, "nst"), _single(teacher, "nst")
        _require_dims(s, (3, 4), "nst", "student")
        _require_dims(t, (3, 4), "nst", "teacher")
        s, t = pool_to_smaller(s.float(), t.float())
        fs = F.normalize(_to_bcn(s), dim=2)  # [B, Cs, N]
        ft = F.normalize(_to_bcn(t), dim=2)  # [B, Ct, N]
        mmd = self._kernel_mean(ft, ft) + self._kernel_mean(fs, fs) - 2 * self._kernel_mean(fs, ft)
        return mmd.mean()


# --------------------------------------------------------------------------------------------
# Factor Transfer
# --------------------------------------------------------------------------------------------


def _conv_bn_lrelu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]


def _deconv_bn_lrelu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]


class FTParaphraser(nn.Module):
    """FT's paraphraser: a convolutional autoencoder on the teacher's map, sizes kept (3x3, stride 1, padding 1).

    encoder: C -> C -> k -> k (conv + BN + LeakyReLU(0.1)); its output is the teacher factor [B, k, H, W].
    decoder: k -> k -> C -> C (transposed conv + BN + LeakyReLU(0.1)); it reconstructs the map.
    """

    def __init__(self, c: int, k: int):
        super().__init__()
        self.encoder = nn.Sequential(*_conv_bn_lrelu(c, c), *_conv_bn_lrelu(c, k), *_conv_bn_lrelu(k, k))
        self.decoder = nn.Sequential(*_deconv_bn_lrelu(k, k), *_deconv_bn_lrelu(k, c), *_deconv_bn_lrelu(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


FT_PHASES = ("paraphraser", "transfer")
FT_TEACHER_FACTORS = ("paraphraser", "raw")


@register_loss(
    "ft",
    description="Factor Transfer: a paraphraser (autoencoder) extracts the teacher's factor in a first stage; a translator "
    "maps the student feature to a factor matched to it (L1 of L2-normalised factors)",
    paper="Paraphrasing Complex Network: Network Compression via Factor Transfer (Kim, Park, Kwak), NeurIPS 2018, arXiv:1802.04977",
    year=2018,
    reads="features",
    same_shape=False,
    trainable=True,
)
class FTLoss(nn.Module):
    """Factor Transfer, the paper's two stages as one loss with a ``phase`` parameter.

    The paper (Sec. 3): a *paraphraser* ``P`` -- a convolutional autoencoder on the teacher's feature
    map ``x`` ([B, C, H, W], the last group of the teacher in the paper) -- is trained first, alone
    and without labels, on the reconstruction loss ``L_rec = ||x - P(x)||^2``. Its encoder output,
    with ``k * C`` channels (``k`` the *paraphrase rate*; 0.5 in the authors' code), is the teacher
    factor ``F_T``. Then, with the paraphraser frozen, a *translator* (three 3x3 conv layers,
    C_s -> C_s -> k*C -> k*C) maps the student's feature to the student factor ``F_S``, and the student
    and translator are trained on ``L_cls + beta * L_FT`` with

        ``L_FT = || F_T / ||F_T||_2 - F_S / ||F_S||_2 ||_p``,  p = 1,

    factors flattened per example. In a recipe: two stages, the same term ``name`` and the same
    ``rate`` in both (the engine carries the module's state from the first stage to the second)::

        stages:
          - name: paraphraser
            terms: [{name: ft, loss: ft, weight: 1, student: layer4, teacher: layer4, params: {phase: paraphraser}}]
            task_weight: 0
            train: [losses.ft.paraphraser]
          - name: transfer
            terms: [{name: ft, loss: ft, weight: 500, student: layer4, teacher: layer4}]

    - ``phase: paraphraser``: ``forward`` returns ``mean((P(t) - t)^2)`` (the student value is not
      used); only the paraphraser is trainable (the translator has ``requires_grad`` False). Every
      training-mode forward sets the persistent buffer ``paraphraser_trained``.
    - ``phase: transfer`` (default): the paraphraser is frozen (``requires_grad`` False, kept in eval
      mode whatever ``train()`` is called with, its encoder run without gradients); ``forward``
      returns ``mean_{b,i} |u_S - u_T|_i^p`` with ``u = F / ||F||_2`` (flattened per example); the
      translator is trainable. ``on_train_begin`` raises a DistillationError when the paraphraser
      was not trained in an earlier stage (the buffer is unset).
    - ``teacher_factor: raw``: the earlier variant of this package, without a paraphraser: the
      teacher factor is the raw teacher feature (k = C) and the translator maps C_s -> C. One stage;
      ``phase`` must stay ``transfer``. It is kept because it is FT's translator-and-normalised-L1
      matching without the extra stage (this package's one-stage FT recipes used it), but it is not
      the paper's method.

    ``configure(ctx)`` builds the paraphraser (with ``teacher_factor: paraphraser``) and the translator
    in both phases, so the state dict is the same in both and carries over. Factor channels are
    ``max(1, round(k * C))``. When student and teacher maps differ in size, the larger *factor* is
    average-pooled to the smaller one. Defaults: ``rate`` (k) 0.5 and ``p`` 1, the paper's and the
    authors' code's; beta (500 in the authors' code) is the term weight.

    Where the references differ, and what we follow:

    - Layers. torchdistill's ``Paraphraser4FactorTransfer`` (documented as the paraphraser of the
      paper's supplementary material; ``uses_bn=True`` by default) and Knowledge-Distillation-Zoo put
      BatchNorm and LeakyReLU(0.1) after every conv of the paraphraser (three convs, three transposed
      convs) and of the translator; the authors' released code (Jangho-Kim/Factor-Transfer-pytorch) has
      the BN lines commented out (LeakyReLU only). We follow the former (with BN); the frozen
      paraphraser's BN then uses the running statistics of the paraphraser stage.
    - Reconstruction loss. The paper's squared L2 norm; we take its mean over elements (the paper's
      sum divided by B*C*H*W, a constant factor), as Knowledge-Distillation-Zoo's ``nn.MSELoss``; the
      authors' paraphraser script uses ``nn.L1Loss``.
    - Transfer reduction. The paper's ``||.||_1`` sums over factor elements; the authors' code uses
      ``nn.L1Loss()`` (the mean over batch and elements) with beta = 500, as torchdistill's
      ``FTLoss(reduction='mean')``. We follow the code, so beta = 500 keeps its meaning: the mean of
      ``|.|^p`` over elements (``p = 2`` gives the mean squared error of the normalised factors).
    - Factor channels: ``round(k * C)`` as the authors' code; Knowledge-Distillation-Zoo floors.
    - Normalisation: ``F.normalize`` (``x / max(||x||, 1e-12)``) as the authors' code;
      Knowledge-Distillation-Zoo divides by ``||x|| + 1e-5``.
    """

    def __init__(self, phase: str = "transfer", rate: float = 0.5, p: float = 1.0, teacher_factor: str = "paraphraser"):
        super().__init__()
        self.phase = check_choice("phase", phase, FT_PHASES)
        self.rate = check_number("rate", rate, minimum=0, exclusive=True)  # the paper's paraphrase rate k
        self.p = check_number("p", p, minimum=0, exclusive=True)
        self.teacher_factor = check_choice("teacher_factor", teacher_factor, FT_TEACHER_FACTORS)
        if self.teacher_factor == "raw" and self.phase == "paraphraser":
            raise LossParamError(
                "phase",
                "must be 'transfer' with teacher_factor: raw (the raw teacher feature needs no paraphraser to train), "
                "got 'paraphraser'; drop teacher_factor: raw to train the paper's paraphraser",
            )
        self.paraphraser: FTParaphraser | None = None
        self.translator: nn.Module | None = None
        # Set by a training-mode forward of the paraphraser phase; carried to the transfer stage in the state dict.
        self.register_buffer("paraphraser_trained", torch.zeros((), dtype=torch.bool))

    def configure(self, ctx) -> None:
        s_shape = _single_shape(ctx.student_shape, "ft", "student")
        t_shape = _single_shape(ctx.teacher_shape, "ft", "teacher")
        _require_dims(s_shape, (4,), "ft", "student")
        _require_dims(t_shape, (4,), "ft", "teacher")
        cs, ct = s_shape[1], t_shape[1]
        if self.teacher_factor == "raw":
            k = ct
        else:
            k = max(1, round(ct * self.rate))
            self.paraphraser = FTParaphraser(ct, k)
        self.translator = nn.Sequential(*_conv_bn_lrelu(cs, cs), *_conv_bn_lrelu(cs, k), *_conv_bn_lrelu(k, k))
        self._channels = (cs, ct)
        self._apply_phase()

    def _apply_phase(self) -> None:
        """What trains in this phase: the paraphraser alone, or the translator with the paraphraser frozen."""
        if self.translator is None:
            return
        paraphrasing = self.phase == "paraphraser"
        self.translator.requires_grad_(not paraphrasing)
        if self.paraphraser is not None:
            self.paraphraser.requires_grad_(paraphrasing)
            if not paraphrasing:
                self.paraphraser.eval()

    def train(self, mode: bool = True) -> "FTLoss":
        super().train(mode)
        if self.phase == "transfer" and self.paraphraser is not None:
            self.paraphraser.eval()  # frozen: its BatchNorm keeps the statistics of the paraphraser stage
        return self

    def on_train_begin(self, ctx) -> None:
        self._apply_phase()
        if self.phase == "transfer" and self.teacher_factor == "paraphraser" and not bool(self.paraphraser_trained):
            term = getattr(ctx, "term", "ft")
            raise DistillationError(
                f"term {term!r}: FT's transfer phase needs a paraphraser trained in an earlier stage: add a stage with "
                "the same term name and params {phase: paraphraser} before this one (task_weight: 0, train: "
                f"[losses.{term}.paraphraser]); or set params {{teacher_factor: raw}} to match the raw teacher feature "
                "instead (not the paper's method)"
            )

    @staticmethod
    def _check_channels(who: str, x: torch.Tensor, expected: int) -> None:
        if x.shape[1] != expected:
            raise DistillationError(
                f"ft: the {who} map has {x.shape[1]} channels, {tuple(x.shape)}, but the loss was configured for "
                f"{expected}; configure was called with other shapes"
            )

    def teacher_factor_of(self, t: torch.Tensor) -> torch.Tensor:
        """The teacher factor F_T: the frozen paraphraser's encoder output [B, k, H, W], or the raw map."""
        if self.paraphraser is None:
            return t
        with torch.no_grad():
            return self.paraphraser.encoder(t).float()

    def forward(self, student, teacher) -> torch.Tensor:
        _require_configured(self, "translator", "ft")
        t = _single(teacher, "ft").float()
        _require_dims(t, (4,), "ft", "teacher")
        self._check_channels("teacher", t, self._channels[1])
        if self.phase == "paraphraser":
            require_batch_for_bn("ft", self.training, t, "the teacher map", _BN_FIX)
            if self.training:
                self.paraphraser_trained.fill_(True)
            return F.mse_loss(self.paraphraser(t).float(), t)  # L_rec, mean over elements
        s = _single(student, "ft").float()
        _require_dims(s, (4,), "ft", "student")
        self._check_channels("student", s, self._channels[0])
        require_batch_for_bn("ft", self.training, s, "the student map", _BN_FIX)
        factor_s = self.translator(s).float()  # [B, k, Hs, Ws]
        factor_t = self.teacher_factor_of(t)  # [B, k, Ht, Wt]
        factor_s, factor_t = pool_to_smaller(factor_s, factor_t)
        u_s = F.normalize(factor_s.flatten(1), dim=1)  # [B, k*H*W]
        u_t = F.normalize(factor_t.flatten(1), dim=1)
        return (u_s - u_t).abs().pow(self.p).mean()


# --------------------------------------------------------------------------------------------
# Overhaul of Feature Distillation
# --------------------------------------------------------------------------------------------


def ofd_margin_from_bn(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """OFD's margin per channel: E[x | x < 0] for x ~ N(bias, weight^2) (the teacher BN's affine output).

    ``m - s * phi(m/s) / Phi(-m/s)`` with ``s = |weight|``, ``m = bias``; ``-3 s`` where
    ``Phi(-m/s) <= 0.001`` (almost no negative responses), as in the authors' ``get_margin_from_BN``.
    """
    s = weight.detach().double().abs()
    m = bias.detach().double()
    safe_s = s.clamp_min(1e-12)
    cdf = torch.special.ndtr(-m / safe_s)
    pdf = torch.exp(-((m / safe_s) ** 2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > 0.001, m - safe_s * pdf / cdf.clamp_min(1e-300), -3 * s)
    margin = torch.where(s > 0, margin, m.clamp(max=0.0))  # a constant channel: its value if negative, else 0
    return margin.float()


@register_loss(
    "ofd",
    description="Overhaul of Feature Distillation: pre-ReLU teacher features with a margin, connector (1x1 conv + BN), partial L2",
    paper="A Comprehensive Overhaul of Feature Distillation (Heo, Kim, Yun, Park, Kwak, Choi), ICCV 2019, arXiv:1904.01866",
    year=2019,
    reads="features",
    same_shape=False,
    trainable=True,
)
class OFDLoss(nn.Module):
    """``mean_b sum_{c,h,w} d_p(max(t, m_c), r(s))`` with the partial L2 distance
    ``d_p(T, S) = 0 if S <= T <= 0 else (T - S)^2`` and ``r`` = 1x1 conv + BN (the connector).

    Both taps should be *pre-ReLU* features. ``m_c`` (<= 0) is the margin of teacher channel ``c``:
    the expected value of its negative responses. Where it comes from, in order of precedence:

    1. ``margin=`` parameter (plain data, usable in a recipe): one number for every channel, or a
       list with one number per teacher channel (all <= 0);
    2. ``set_teacher_bn(weight, bias)``: the paper's formula from the teacher BN that produces the
       tapped feature, E[x | x < 0] for x ~ N(bias, weight^2) (call it from Python, e.g. with
       ``teacher.layer3[-1].bn3.weight, .bias``);
    3. otherwise (default), an estimate from the data: per channel, the running mean of the negative
       teacher responses over every training batch seen so far (kept in buffers, so it is saved in
       checkpoints; the teacher is frozen, so the estimate converges). This measures E[x | x < 0]
       directly instead of assuming a Gaussian; the current batch is folded in before it is used.
       Channels with no negative response yet get margin 0. Each process keeps its own estimate.

    The reduction follows the authors' code: summed over channels and positions, averaged over the
    batch. The authors then scale it by 1/1000 (CIFAR) or 1/10000 (ImageNet) and weight layer ``i``
    of ``n`` by ``1/2^(n-i-1)``; put those factors in the term weights (one term per layer).
    Spatial sizes must match (the connector is 1x1), else the larger map is average-pooled.
    """

    def __init__(self, margin: float | Sequence[float] | None = None):
        super().__init__()
        if isinstance(margin, (list, tuple)):
            if not margin:
                raise LossParamError("margin", "must be a number <= 0 or a list of them (one per teacher channel), got []")
            margin = [check_number("margin", v, maximum=0) for v in margin]
        elif margin is not None:
            margin = check_number("margin", margin, maximum=0)
        self.margin = margin
        self.connector: nn.Module | None = None
        self._pending_bn_margin: torch.Tensor | None = None

    def configure(self, ctx) -> None:
        s_shape = _single_shape(ctx.student_shape, "ofd", "student")
        t_shape = _single_shape(ctx.teacher_shape, "ofd", "teacher")
        _require_dims(s_shape, (4,), "ofd", "student")
        _require_dims(t_shape, (4,), "ofd", "teacher")
        cs, ct = s_shape[1], t_shape[1]
        if isinstance(self.margin, (list, tuple)) and len(self.margin) != ct:
            raise LossParamError(
                "margin",
                f"has {len(self.margin)} values but the teacher feature has {ct} channels; give one number for "
                "every channel or one per channel",
            )
        conv = nn.Conv2d(cs, ct, kernel_size=1, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / ct))  # the authors' init: N(0, 2 / (k*k*out))
        bn = nn.BatchNorm2d(ct)
        self.connector = nn.Sequential(conv, bn)
        self.register_buffer("neg_mean", torch.zeros(ct))  # running E[t | t < 0] per channel
        self.register_buffer("neg_count", torch.zeros(ct))  # negatives seen per channel
        self.register_buffer("bn_margin", torch.zeros(ct))
        self.register_buffer("has_bn_margin", torch.zeros((), dtype=torch.bool))
        if self._pending_bn_margin is not None:
            self._store_bn_margin(self._pending_bn_margin)
            self._pending_bn_margin = None

    def set_teacher_bn(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Use the paper's margin, computed from the teacher BN (weight = gamma, bias = beta) before the tap."""
        margin = ofd_margin_from_bn(weight, bias)
        if self.connector is None:
            self._pending_bn_margin = margin
        else:
            self._store_bn_margin(margin)

    def _store_bn_margin(self, margin: torch.Tensor) -> None:
        if margin.numel() != self.bn_margin.numel():
            raise DistillationError(
                f"ofd: the teacher BN has {margin.numel()} channels but the teacher feature {self.bn_margin.numel()}; "
                "pass the BN that produces the tapped feature"
            )
        self.bn_margin.copy_(margin.to(self.bn_margin.device))
        self.has_bn_margin.fill_(True)

    @torch.no_grad()
    def _current_margin(self, t: torch.Tensor) -> torch.Tensor:
        if self.margin is not None:
            return torch.as_tensor(self.margin, dtype=torch.float32, device=t.device).expand(t.shape[1]).clone()
        if bool(self.has_bn_margin):
            return self.bn_margin.to(t.device).float()
        neg = (t < 0).float()
        n_batch = neg.sum((0, 2, 3))
        sum_batch = (t * neg).sum((0, 2, 3))
        if self.training:
            count = self.neg_count + n_batch
            # running mean update: mean += (batch_sum - n * mean) / (count)
            update = (sum_batch - n_batch * self.neg_mean) / count.clamp_min(1.0)
            self.neg_mean.add_(torch.where(count > 0, update, torch.zeros_like(update)))
            self.neg_count.copy_(count)
            return self.neg_mean.clone()
        batch_mean = sum_batch / n_batch.clamp_min(1.0)
        return torch.where(self.neg_count > 0, self.neg_mean, batch_mean)

    def forward(self, student, teacher) -> torch.Tensor:
        source, t = _through_own_module(self, "connector", "ofd", student, teacher)
        margin = self._current_margin(t).view(1, -1, 1, 1)
        target = torch.maximum(t, margin)
        keep = (source > target) | (target > 0)
        return ((source - target).pow(2) * keep).sum((1, 2, 3)).mean()


# --------------------------------------------------------------------------------------------
# Attention-based Feature Distillation (AFD)
# --------------------------------------------------------------------------------------------


class _LinearBN(nn.Module):
    """Linear -> BatchNorm1d (-> ReLU), the query/key blocks of AFD."""

    def __init__(self, n_in: int, n_out: int, relu: bool):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.bn = nn.BatchNorm1d(n_out)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.linear(x))
        return F.relu(x) if self.relu else x


@register_loss(
    "afd",
    description="Attention-based Feature Distillation: learned attention weighs every teacher-student layer pair's attention-map distance",
    paper="Show, Attend and Distill: Knowledge Distillation via Attention-based Feature Matching (Ji, Heo, Park), "
    "AAAI 2021, arXiv:2102.02973",
    year=2021,
    reads="features",
    same_shape=False,
    trainable=True,
    multi_layer=True,
)
class AFDLoss(nn.Module):
    """``sum_t mean_b sum_s alpha_{t,s} * mean_i (v_s^{(t)} - v_t)_i^2``.

    For each teacher layer t and student layer s (lists of ``[B, C, H, W]`` maps, any number of each):

    * query ``q_t = BN(W_t GAP(h_t))`` (no ReLU), key ``k_s = ReLU(BN(W_s GAP(h_s)))``, both of size
      ``qk_dim``; a bilinear map (Linear + BN) turns each key into one vector per teacher layer,
      ``k_{s,t}``; positional parameters ``p_t``, ``p_s`` add ``p_t . p_s``;
    * ``alpha_{t,s} = softmax_s((q_t . k_{s,t} + p_t . p_s) / sqrt(qk_dim))``;
    * ``v_t`` = L2-normalised spatial attention map of ``h_t`` (channel mean of h^2);
      ``v_s^{(t)}`` = the same for ``h_s`` after average-pooling its map to ``h_t``'s size.

    All those layers are trainable and built in ``configure`` from the shapes; the teacher-side
    query layers get gradients through the attention weights. This follows the authors' code
    (clovaai/attention-feature-distillation), including its reduction (mean over map positions,
    sum over student layers weighted by alpha, mean over batch, sum over teacher layers); the
    authors use ``qk_dim = 128`` and weight beta = 200 on CIFAR-100. Needs a batch of >= 2 in
    training (BatchNorm over the batch).
    """

    def __init__(self, qk_dim: int = 128):
        super().__init__()
        self.qk_dim = check_number("qk_dim", qk_dim, minimum=1, integer=True)
        self.query: nn.ModuleList | None = None

    def configure(self, ctx) -> None:
        s_shapes = _shape_list(ctx.student_shape, "afd", "student")
        t_shapes = _shape_list(ctx.teacher_shape, "afd", "teacher")
        for shape in (*s_shapes, *t_shapes):
            _require_dims(shape, (4,), "afd", "every")
        n_s, n_t, d = len(s_shapes), len(t_shapes), self.qk_dim
        self.query = nn.ModuleList([_LinearBN(shape[1], d, relu=False) for shape in t_shapes])
        self.key = nn.ModuleList([_LinearBN(shape[1], d, relu=True) for shape in s_shapes])
        self.bilinear = _LinearBN(d, d * n_t, relu=False)
        self.pos_t = nn.Parameter(torch.empty(n_t, d))
        self.pos_s = nn.Parameter(torch.empty(n_s, d))
        nn.init.xavier_normal_(self.pos_t)
        nn.init.xavier_normal_(self.pos_s)

    def attention(self, s_list: list[torch.Tensor], t_list: list[torch.Tensor]) -> torch.Tensor:
        """alpha: [B, n_teacher, n_student], softmax over student layers."""
        b, n_s, n_t = s_list[0].shape[0], len(s_list), len(t_list)
        query = torch.stack([layer(t.mean((2, 3))) for layer, t in zip(self.query, t_list)], 1)  # [B, T, d]
        key = torch.stack([layer(s.mean((2, 3))) for layer, s in zip(self.key, s_list)], 1)  # [B, S, d]
        key = self.bilinear(key.reshape(b * n_s, self.qk_dim)).view(b, n_s, n_t, self.qk_dim)
        logits = torch.einsum("bstd,btd->bts", key, query) + self.pos_t @ self.pos_s.t()
        return F.softmax(logits.float() / math.sqrt(self.qk_dim), dim=2)

    def forward(self, student, teacher) -> torch.Tensor:
        _require_configured(self, "query", "afd")
        s_list = [x.float() for x in as_list(student)]
        t_list = [x.float() for x in as_list(teacher)]
        if len(s_list) != len(self.key) or len(t_list) != len(self.query):
            raise DistillationError(f"afd: configured for {len(self.key)} student and {len(self.query)} teacher layers, "
                             f"got {len(s_list)} and {len(t_list)}")
        for x in (*s_list, *t_list):
            _require_dims(x, (4,), "afd", "every")
        b, c = s_list[0].shape[:2]
        require_batch_for_bn("afd", self.training, (b, c), "the pooled student feature", _BN_FIX)  # BatchNorm1d, [B, d]
        alpha = self.attention(s_list, t_list)
        s_maps = [s.pow(2).mean(1, keepdim=True) for s in s_list]  # [B, 1, H, W]
        loss = s_list[0].new_zeros(())
        for i, t in enumerate(t_list):
            v_t = F.normalize(t.pow(2).mean(1).flatten(1), dim=1)  # [B, N_t]
            v_s = torch.stack(
                [F.normalize(F.adaptive_avg_pool2d(m, t.shape[2:]).flatten(1), dim=1) for m in s_maps], 1
            )  # [B, S, N_t]
            dist = (v_s - v_t.unsqueeze(1)).pow(2).mean(2)  # [B, S]
            loss = loss + (alpha[:, i] * dist).sum(1).mean()
        return loss


# --------------------------------------------------------------------------------------------
# Knowledge Review (ReviewKD)
# --------------------------------------------------------------------------------------------


class _ABF(nn.Module):
    """ReviewKD's attention-based fusion block."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.conv2 = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _hcl(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Hierarchical context loss: MSE at full size plus MSE of 4x4, 2x2, 1x1 average pools (weights 1/2, 1/4, 1/8,
    only the levels smaller than the map), divided by the sum of the weights used."""
    loss = F.mse_loss(fs, ft)
    weight, total = 1.0, 1.0
    for level in (4, 2, 1):
        if level >= min(fs.shape[2], fs.shape[3]):
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
        total += weight
    return loss / total


def _as_map(x: torch.Tensor, loss: str) -> torch.Tensor:
    """[B, C] pooled features -> [B, C, 1, 1]; 4-D maps pass through."""
    if x.dim() == 2:
        return x[:, :, None, None]
    _require_dims(x, (2, 4), loss, "every")
    return x


@register_loss(
    "kr",
    description="Knowledge Review (ReviewKD): student stages fused deep-to-shallow by attention (ABF), matched to teacher stages with the hierarchical context loss",
    paper="Distilling Knowledge via Knowledge Review (Chen, Liu, Zhao, Jia), CVPR 2021, arXiv:2104.09044",
    year=2021,
    reads="features",
    same_shape=False,
    fields=("epoch",),
    trainable=True,
    multi_layer=True,
    aliases=("reviewkd",),
)
class ReviewKDLoss(nn.Module):
    """``min(1, epoch / warmup_epochs) * sum_i HCL(ABF_i(s_i, r_{i+1}), t_i)``.

    Taps: lists of student and teacher stages, same length, shallow to deep; ``[B, C, H, W]`` maps,
    or ``[B, C]`` pooled features (as ``[B, C, 1, 1]``; the authors include the pooled feature as the
    deepest stage). The deepest student stage goes through its ABF alone (1x1 conv + BN to
    ``mid_channel``, resized to the teacher stage's size, 3x3 conv + BN to the teacher's channels);
    each shallower stage is fused with the residual ``r`` of the deeper one (upsampled, nearest) by
    a learned 2-channel sigmoid attention, then resized and projected the same way. HCL is the MSE at
    full size plus pooled 4x4/2x2/1x1 MSEs with weights 1/2, 1/4, 1/8 (levels smaller than the map
    only), normalised by the total weight; it is a mean over elements, so a batch mean.

    Follows the authors' code (dvlab-research/ReviewKD): ``mid_channel`` defaults to
    ``min(512, channels of the deepest student stage)`` (mdistiller's rule), init kaiming-uniform(a=1).
    ``warmup_epochs`` ramps the loss linearly over the first epochs as the authors' training script does
    (they use 20 on CIFAR-100); the paper does not describe it, so the default 0 disables it.
    """

    def __init__(self, mid_channel: int | None = None, warmup_epochs: float = 0.0):
        super().__init__()
        self.mid_channel = check_number("mid_channel", mid_channel, minimum=1, integer=True, allow_none=True)
        self.warmup_epochs = check_number("warmup_epochs", warmup_epochs, minimum=0)
        self.abfs: nn.ModuleList | None = None

    def configure(self, ctx) -> None:
        s_shapes = _shape_list(ctx.student_shape, "kr", "student")
        t_shapes = _shape_list(ctx.teacher_shape, "kr", "teacher")
        if len(s_shapes) != len(t_shapes):
            raise DistillationError(
                f"kr: needs as many student as teacher stages, got {len(s_shapes)} and {len(t_shapes)}; "
                "list the same number of student and teacher taps"
            )
        for shape in (*s_shapes, *t_shapes):
            _require_dims(shape, (2, 4), "kr", "every")
        mid = self.mid_channel or min(512, s_shapes[-1][1])
        n = len(s_shapes)
        self.abfs = nn.ModuleList(
            [_ABF(s[1], mid, t[1], fuse=i < n - 1) for i, (s, t) in enumerate(zip(s_shapes, t_shapes))]
        )

    def forward(self, student, teacher, epoch: float | None = None) -> torch.Tensor:
        _require_configured(self, "abfs", "kr")
        s_list = [_as_map(x, "kr").float() for x in as_list(student)]
        t_list = [_as_map(x, "kr").float() for x in as_list(teacher)]
        n = len(self.abfs)
        if len(s_list) != n or len(t_list) != n:
            raise DistillationError(f"kr: configured for {n} stages, got {len(s_list)} student and {len(t_list)} teacher")
        if self.training:
            self._check_batch(s_list, t_list)
        outs: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        residual = None
        for i in reversed(range(n)):  # deep -> shallow
            outs[i], residual = self.abfs[i](s_list[i], residual, t_list[i].shape[2:])
        loss = sum(_hcl(o.float(), t) for o, t in zip(outs, t_list))
        if self.warmup_epochs > 0 and epoch is not None:
            loss = loss * min(1.0, float(epoch) / self.warmup_epochs)
        return loss

    @staticmethod
    def _check_batch(s_list: list[torch.Tensor], t_list: list[torch.Tensor]) -> None:
        """Each ABF's BatchNorms see the student stage's positions and the teacher stage's: a batch of one
        on a 1x1 (pooled) stage leaves one value per channel."""
        for i, (s, t) in enumerate(zip(s_list, t_list)):
            smallest = s if s.shape[2] * s.shape[3] <= t.shape[2] * t.shape[3] else t
            require_batch_for_bn(
                "kr",
                True,
                smallest,
                f"stage {i} (student {tuple(s.shape)}, teacher {tuple(t.shape)}, as maps) has 1x1 positions",
                "use a per-device batch of at least 2 (per_device_train_batch_size) or drop the last incomplete "
                "batch, or leave the pooled / 1x1 stage out of the term's taps",
            )


# --------------------------------------------------------------------------------------------
# SRD: projector + batch-normalised features + log-sum distance
# --------------------------------------------------------------------------------------------


def _pooled_vector(x: torch.Tensor, loss: str, who: str) -> torch.Tensor:
    """[B, D] as is; [B, C, H, W] -> global average pool; [B, T, D] -> mean over tokens."""
    _require_dims(x, (2, 3, 4), loss, who)
    if x.dim() == 4:
        return x.mean((2, 3))
    if x.dim() == 3:
        return x.mean(1)
    return x


@register_loss(
    "srd",
    description="Projector-based feature distillation: linear projector, batch-normalised student and teacher embeddings, log of the summed |difference|^4",
    paper="Understanding the Role of the Projector in Knowledge Distillation (Miles, Mikolajczyk), AAAI 2024, arXiv:2303.11098",
    year=2024,
    reads="features",
    same_shape=False,
    trainable=True,
)
class SRDLoss(nn.Module):
    """``log mean_{b,d} |BN(W z_s + b)_{bd} - BN(z_t)_{bd}|^exponent`` (exponent 4).

    ``z`` are the final (pooled) embeddings: ``[B, D]``, or ``[B, C, H, W]`` globally average-pooled,
    or ``[B, T, D]`` averaged over tokens. ``W`` is a trainable linear projector (student dim ->
    teacher dim, always present, even when the dims agree: it is one of the paper's findings); both
    sides are normalised by a BatchNorm1d without affine parameters (eps 1e-4). ``log`` of the power
    sum is the paper's "soft maximum" that copes with a large capacity gap.

    Follows the authors' ImageNet (ResNet) code (roymiles/Simple-Recipe-Distillation,
    ``OurDistillationLoss``), which uses ``log(sum(...))`` with weight 2 next to a KD term with T = 1
    (add that as a separate ``kd`` term). We take the log of the *mean* instead: it differs by the
    constant ``log(B * D)``, so gradients are identical, and the value does not depend on the batch
    size. The authors' DeiT code uses a cross-correlation variant (``log sum |1 - C_dd|^4`` with
    ``C = BN(zs)^T BN(zt) / B``), not implemented here. Needs a batch of >= 2 in training.
    """

    _BN_EPS = 1e-4

    def __init__(self, exponent: float = 4.0):
        super().__init__()
        self.exponent = check_number("exponent", exponent, minimum=0, exclusive=True)
        self.projector: nn.Module | None = None

    def configure(self, ctx) -> None:
        s_shape = _single_shape(ctx.student_shape, "srd", "student")
        t_shape = _single_shape(ctx.teacher_shape, "srd", "teacher")
        ds, dt = channels(s_shape), channels(t_shape)
        self.projector = nn.Linear(ds, dt)
        self.bn_s = nn.BatchNorm1d(dt, eps=self._BN_EPS, affine=False)
        self.bn_t = nn.BatchNorm1d(dt, eps=self._BN_EPS, affine=False)

    def forward(self, student, teacher) -> torch.Tensor:
        _require_configured(self, "projector", "srd")
        z_s = _pooled_vector(_single(student, "srd").float(), "srd", "student")
        z_t = _pooled_vector(_single(teacher, "srd").float(), "srd", "teacher")
        require_batch_for_bn("srd", self.training, z_s, "the pooled student embedding", _BN_FIX)
        f_s = self.bn_s(self.projector(z_s).float())
        f_t = self.bn_t(z_t)
        power = (f_s - f_t).abs().pow(self.exponent).mean()
        return torch.log(power.clamp_min(torch.finfo(torch.float32).tiny))


# --------------------------------------------------------------------------------------------
# Inter-Channel Correlation KD
# --------------------------------------------------------------------------------------------


@register_loss(
    "ickd",
    description="Inter-Channel Correlation KD: match row-normalised channel Gram matrices after a trainable 1x1 embedding of the student",
    paper="Exploring Inter-Channel Correlation for Diversity-preserved Knowledge Distillation (Liu, Huang, Lin, Xie, "
    "Wang, Chang, Liang), ICCV 2021, arXiv:2202.03680",
    year=2021,
    reads="features",
    same_shape=False,
    trainable=True,
)
class ICKDLoss(nn.Module):
    """``mean_b (1/C) sum_{m,n} (G_s - G_t)_{mn}^2`` with ``G = rownorm(f f^T)``, ``f`` the ``[C, N]``
    channel-by-position matrix of one example and ``rownorm`` L2-normalising each row.

    The student goes through a trainable embedding (1x1 conv without bias + BN) to the teacher's
    channel count C, built in ``configure``. The C x C matrices do not depend on the number of
    positions, so spatial sizes may differ. ``[B, T, D]`` hidden states are read as D channels over
    T positions. This is the authors' code (ADLab-AutoDrive/ICKD, ``ICKDLoss.batch_loss``): row
    normalisation and the division by C and B are theirs. The grid-level variant for dense
    prediction (correlations per spatial patch) is not implemented. torchdistill calls this method
    ``ChSimLoss``; there is no ``chsim`` name here (it once named CWD), use ``ickd``.
    """

    def __init__(self):
        super().__init__()
        self.embed: nn.Module | None = None

    def configure(self, ctx) -> None:
        s_shape = _single_shape(ctx.student_shape, "ickd", "student")
        t_shape = _single_shape(ctx.teacher_shape, "ickd", "teacher")
        _require_dims(s_shape, (3, 4), "ickd", "student")
        _require_dims(t_shape, (3, 4), "ickd", "teacher")
        cs, ct = channels(s_shape), channels(t_shape)
        self.embed = nn.Sequential(nn.Conv2d(cs, ct, kernel_size=1, bias=False), nn.BatchNorm2d(ct))

    @staticmethod
    def gram(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2)  # [B, C, C]

    def forward(self, student, teacher) -> torch.Tensor:
        _require_configured(self, "embed", "ickd")
        s, t = _single(student, "ickd"), _single(teacher, "ickd")
        _require_dims(s, (3, 4), "ickd", "student")
        _require_dims(t, (3, 4), "ickd", "teacher")
        s_map = s.float() if s.dim() == 4 else s.float().transpose(1, 2).unsqueeze(-1)  # [B, D, T, 1]
        require_batch_for_bn("ickd", self.training, s_map, "the student map", _BN_FIX)
        fs = self.embed(s_map).float().flatten(2)  # [B, C, Ns]
        ft = _to_bcn(t.float())  # [B, C, Nt]
        if fs.shape[1] != ft.shape[1]:
            raise DistillationError(f"ickd: embedded student has {fs.shape[1]} channels, teacher {ft.shape[1]}; "
                                    "configure was called with other shapes")
        diff = self.gram(fs) - self.gram(ft)
        return (diff.pow(2).sum((1, 2)) / ft.shape[1]).mean()


# --------------------------------------------------------------------------------------------
# Channel-wise distillation
# --------------------------------------------------------------------------------------------


@register_loss(
    "cwd",
    description="Channel-wise distillation: KL between per-channel spatial softmax distributions of teacher and student, x T^2",
    paper="Channel-wise Knowledge Distillation for Dense Prediction (Shu, Liu, Gao, Yan, Shen), ICCV 2021, arXiv:2011.13256",
    year=2021,
    reads="features",
    same_shape=True,
)
class CWDLoss(nn.Module):
    """``T^2 * mean_{b,c} KL(softmax_i(t_{c,i}/T) || softmax_i(s_{c,i}/T))``.

    Each channel's map (positions ``i`` = H*W of ``[B, C, H, W]``, or the T tokens of ``[B, T, D]``
    with D channels) becomes a distribution over positions; the KL is summed over positions and
    averaged over channels and batch, as in the paper (``T^2 / C`` normalisation) and mmrazor's
    ``ChannelWiseDivergence`` (``sum / (N * C) * tau^2``). Student and teacher must have the same
    shape (the paper uses a 1x1 conv adapter on the student when channels differ: the term's adapter).
    Positions where the teacher's probability is 0 (a map value of -inf) contribute 0. Not torchdistill's
    ``ChSimLoss``, which is ICKD (``ickd``).
    """

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = check_number("temperature", temperature, minimum=0, exclusive=True)

    def forward(self, student, teacher) -> torch.Tensor:
        s, t = _single(student, "cwd").float(), _single(teacher, "cwd").float()
        _check_same_shape(s, t, "cwd")
        _require_dims(s, (3, 4), "cwd", "student")
        log_p_s = F.log_softmax(_to_bcn(s) / self.temperature, dim=2)
        log_p_t = F.log_softmax(_to_bcn(t) / self.temperature, dim=2)
        kl = kl_from_log_probs(log_p_t, log_p_s, dim=2)  # [B, C]
        return kl.mean() * self.temperature**2


# --------------------------------------------------------------------------------------------
# Activation Boundaries (AB)
# --------------------------------------------------------------------------------------------


def ab_alternative_l2(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """AB's alternative (piecewise-differentiable) activation-transfer loss, per element.

    ``rho(t) * ReLU(m - s)^2 + (1 - rho(t)) * ReLU(m + s)^2`` with ``rho(t) = 1[t > 0]``: where the teacher
    neuron is active the student's pre-activation must reach ``+m``, where it is inactive it must fall to
    ``-m``. This is the reference code's ``(s + m)^2 * 1[s > -m, t <= 0] + (s - m)^2 * 1[s <= m, t > 0]``
    written with ReLU (the same values and gradients, also at ``s = +-m``).
    """
    return torch.where(t > 0, F.relu(margin - s), F.relu(margin + s)).pow(2)


@register_loss(
    "ab",
    description="Activation Boundaries: the student's pre-ReLU features (through a connector) learn on which side of "
    "zero each teacher neuron is, with a margin (alternative L2), over several layers",
    paper="Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons (Heo, Lee, Yun, Choi), "
    "AAAI 2019, arXiv:1811.03233",
    year=2019,
    reads="features",
    same_shape=True,
    multi_layer=True,
)
class ABLoss(nn.Module):
    """``sum_i 2^(i - n + 1) * mean_b sum_{c,h,w} [rho(t_i) ReLU(m - s_i)^2 + (1 - rho(t_i)) ReLU(m + s_i)^2]``.

    ``s_i`` / ``t_i`` (``i = 0 .. n-1``, shallow to deep) are the student's and the teacher's *pre-ReLU*
    features of layer pair ``i``, the student's after its connector; ``rho(t) = 1[t > 0]`` is the teacher
    neuron's activation; ``m`` is the margin (the paper's mu; 1 in the authors' code and every port).

    - The per-element term is the paper's alternative loss, which replaces the non-differentiable
      activation-transfer loss ``||rho(T) - rho(S)||_1`` (:func:`ab_alternative_l2`).
    - Reduction and layer weights follow the authors' code (bhheo/AB_distillation) and its ports
      (RepDistiller's ``ABLoss``, which Knowledge-Distillation-Zoo's ``ABLoss`` mirrors): the sum over
      elements of a layer divided by the batch size, layer ``i`` weighted ``2^(i - n + 1)`` (the deepest layer
      1, each shallower one half of the next; KD_methods_with_TF's ``2^i`` has the same ratios). They also
      multiply by ``3 / 1000`` (the authors' CIFAR code, RepDistiller, KD_methods_with_TF; the authors'
      ImageNet code by ``1 / 1000``): that factor is the term weight in the recipes (``weight: 0.003``).
    - Connectors. The paper maps the student's feature to the teacher's width with a connector, 1x1 conv
      + BatchNorm in the authors' code (none where the widths agree). Here it is the term's adapter
      (``adapter: conv1x1``, BatchNorm on by default), one per layer pair; the engine checks that the adapted
      student and the teacher have the same shape. The authors initialise the conv with
      ``N(0, sqrt(2 / out_channels))``; the adapter keeps PyTorch's default init.
    - Taps. Pre-ReLU features, e.g. ``layer3.-1.act2:input`` for a timm ResNet (the sum before the last
      block's ReLU), as the paper's "hidden neurons" are the pre-activations and the authors' code taps them.
      torchdistill's ``AltActTransferLoss`` sample (``dab``) differs from the authors: it reads the stages'
      post-ReLU outputs and weights every layer 1; we follow the authors.
    - Training. The paper (and Knowledge-Distillation-Zoo, RepDistiller) use AB as an *initialisation*: a
      first stage trains the connectors and the student's layers with this loss alone, then the student is
      trained with cross-entropy (the authors' CIFAR-10 code: KD at T = 3). Write it as two recipe stages
      (recipes/fashion_mnist/ab.yaml).

    Student and teacher lists must have the same length; a single tensor is one layer (weight 1).
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = check_number("margin", margin, minimum=0)

    def forward(self, student, teacher) -> torch.Tensor:
        s_list, t_list = as_list(student), as_list(teacher)
        if len(s_list) != len(t_list) or not s_list:
            raise DistillationError(
                f"ab: needs as many student as teacher layers (>= 1), got {len(s_list)} and {len(t_list)}; "
                "list the same number of student and teacher taps"
            )
        n = len(s_list)
        total = s_list[0].new_zeros((), dtype=torch.float32)
        for i, (s, t) in enumerate(zip(s_list, t_list)):
            s, t = s.float(), t.float()
            _check_same_shape(s, t, "ab")
            per_example = ab_alternative_l2(s, t, self.margin).flatten(1).sum(1)  # [B]: sum over c, h, w
            total = total + 2.0 ** (i - n + 1) * per_example.mean()
        return total


# --------------------------------------------------------------------------------------------
# Prime-Aware Adaptive Distillation (PAD)
# --------------------------------------------------------------------------------------------


@register_loss(
    "pad",
    description="Prime-Aware Adaptive Distillation: L2 between student and teacher embeddings, weighted per example "
    "and dimension by a learned uncertainty (a variance branch on the student embedding), plus its log-variance",
    paper="Prime-Aware Adaptive Distillation (Zhang, Lan, Dai, Zeng, Bai, Chang, Wei), ECCV 2020, arXiv:2008.01458",
    year=2020,
    reads="features",
    same_shape=True,
    trainable=True,
)
class PADLoss(nn.Module):
    """``mean_{b,d} [ (t_bd - s_bd)^2 / (eps + exp(v_bd)) + v_bd ]``, ``v = BN(W s + b)``.

    ``s`` / ``t`` ([B, D]; other shapes are flattened per example) are the student's (after the term's
    adapter) and the teacher's embeddings, e.g. the pooled penultimate features (``features`` tap). ``v`` is
    the predicted log-variance ``log sigma^2``, one per example and dimension, from the *variance branch*:
    a Linear(D, D) followed by BatchNorm1d(D) on the student embedding, built in ``configure`` (trainable,
    saved in checkpoints, not in the student).

    The paper's idea: examples whose features the student cannot fit (large uncertainty sigma) get a
    small weight ``1 / sigma^2``, the "prime" examples (small sigma) a large one; the ``log sigma^2`` term
    keeps sigma from growing without bound (the loss is the Gaussian negative log-likelihood of the teacher
    feature, up to a constant and a factor 2). The paper's full text was not available to us; what we
    follow, line by line, is torchdistill's
    ``PADL2Loss`` and its ``VarianceBranch4PAD`` (whose comment says the averaging follows the authors'
    code): the branch architecture (Linear + BatchNorm1d on the student embedding, no detach, so the
    student also receives the branch's gradient), the per-dimension log-variance, ``eps = 1e-6`` added to
    ``exp(v)``, and the mean over dimensions and examples. With ``v = 0`` the loss is the MSE, so the L2
    warm-up stage of the method (torchdistill's ``PAD-L2``: train with cross-entropy + L2 first, then switch
    to this loss) is an ``mse`` term on the same taps (recipes/fashion_mnist/pad.yaml).

    Needs a batch of >= 2 in training (BatchNorm over the batch).
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = check_number("eps", eps, minimum=0, exclusive=True)
        self.variance_branch: nn.Module | None = None

    def configure(self, ctx) -> None:
        s_shape = _single_shape(ctx.student_shape, "pad", "student")
        t_shape = _single_shape(ctx.teacher_shape, "pad", "teacher")
        d_s, d_t = math.prod(s_shape[1:]), math.prod(t_shape[1:])
        if d_s != d_t:
            raise DistillationError(
                f"pad: the student embedding {tuple(s_shape)} and the teacher's {tuple(t_shape)} have different sizes "
                f"({d_s} vs {d_t}); add `adapter: linear` to the term to map the student to the teacher's size"
            )
        self.variance_branch = nn.Sequential(nn.Linear(d_s, d_s), nn.BatchNorm1d(d_s))
        self._dim = d_s

    def log_variance(self, s: torch.Tensor) -> torch.Tensor:
        """The variance branch: [B, D] student embedding -> [B, D] predicted log sigma^2."""
        _require_configured(self, "variance_branch", "pad")
        return self.variance_branch(s).float()

    def forward(self, student, teacher) -> torch.Tensor:
        _require_configured(self, "variance_branch", "pad")
        s_raw, t_raw = _single(student, "pad"), _single(teacher, "pad")
        if s_raw.shape[0] != t_raw.shape[0]:
            raise DistillationError(f"pad: batch sizes differ: {s_raw.shape[0]} vs {t_raw.shape[0]}")
        s, t = s_raw.float().flatten(1), t_raw.float().flatten(1)  # [B, D]
        if s.shape[1] != self._dim or t.shape[1] != self._dim:
            raise DistillationError(
                f"pad: configured for {self._dim}-dimensional embeddings, got student {tuple(s_raw.shape)} and "
                f"teacher {tuple(t_raw.shape)}; configure was called with other shapes"
            )
        require_batch_for_bn("pad", self.training, s, "the student embedding", _BN_FIX)
        log_var = self.log_variance(s)  # [B, D]
        return ((t - s).pow(2) / (self.eps + torch.exp(log_var)) + log_var).mean()
