"""Gradient-based distillation: Sobolev / Jacobian matching, LwM (Grad-CAM attention), BSS (boundary supporting samples).

These methods need more than two tapped tensors: gradients of the models' outputs with respect to their
inputs or to a middle layer (Sobolev, LwM), or new inputs made by attacking the teacher (BSS). They keep the
models they run in a plain dict set by ``configure(ctx)`` (never as submodules: the student's weights are not
the loss's state, and the teacher stays frozen and bit-identical) and read the training batch (``batch`` field).

Gradients through the teacher. The frozen teacher's parameters have ``requires_grad`` False, so a backward
through it accumulates nothing on them; it is run in eval mode (as the engine keeps it) under
``torch.enable_grad()``, from a copy of the student's input (mapped to the teacher's input as the engine maps
it) or with a feature made to require grad, in its own dtype (bf16/fp16 teachers included: the gradient is
cast to fp32 afterwards). Every value is computed in fp32.
Because the engine's teacher forward runs without gradients, these methods run the teacher a second time
per step (with gradients); there is no way around that without keeping the teacher's graph for every term.
A teacher read from a cache cannot be used (there is no model to differentiate or attack).

Gradients through the student are taken with ``create_graph=True`` (double backprop), so the loss's gradient
reaches the student's parameters through the gradient itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge

from ..errors import DistillationError, LossParamError
from ..taps import Tap, resolve_module
from ..teacher import POSITIONAL_INPUTS, call_model, ensure_eval, logits_of
from .common import check_bool, check_choice, check_number, pool_to_smaller
from .logits import soft_kl
from .registry import register_loss

# Continuous inputs a gradient can be taken with respect to, in order of preference.
CONTINUOUS_INPUTS = ("pixel_values", "input_values", *(k for k in POSITIONAL_INPUTS if k != "input_ids"))


# --------------------------------------------------------------------------------------------
# Shared helpers: the models a loss keeps, their main inputs, their logits.
# --------------------------------------------------------------------------------------------


def _teacher_model(loss: nn.Module, name: str) -> tuple[Any, nn.Module]:
    """The :class:`~hfdistill.teacher.Teacher` a loss keeps and its model; a DistillationError when absent."""
    frozen = getattr(loss, "_models", {}).get("teacher")
    if frozen is None:
        raise DistillationError(
            f"{name}: needs the teacher model, and none was attached: the trainer attaches it in configure(ctx) "
            "(give the trainer a teacher); outside a trainer call loss.configure(LossContext(frozen_teacher="
            "hfdistill.teacher.Teacher(model), ...)) first"
        )
    model = getattr(frozen, "model", None)
    if not isinstance(model, nn.Module):
        raise DistillationError(
            f"{name}: needs the teacher model itself (it takes gradients through it or attacks it), but the "
            "teacher here has no model (a cache of its outputs?); give the trainer the live teacher model"
        )
    return frozen, model


def _attach(loss: nn.Module, ctx) -> None:
    """Keep what the forward runs in a plain dict: nn.Module registers no submodule held in a dict, so the
    models' weights are neither in the loss's state dict nor moved or re-moded with it."""
    loss._models = {"student": ctx.student, "teacher": ctx.frozen_teacher, "student_inputs": ctx.student_inputs}


def _check_teacher_at_start(loss: nn.Module, name: str, ctx) -> None:
    """on_train_begin: fail before the first step when the teacher cannot be run with gradients."""
    _teacher_model(loss, f"term {getattr(ctx, 'term', name)!r} ({name})")


def _main_input_key(inputs: dict, who: str, loss: str) -> str:
    """The name of the main continuous input tensor among a model's inputs (``pixel_values`` first)."""
    for key in CONTINUOUS_INPUTS:
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return key
    raise DistillationError(
        f"{loss}: needs the {who}'s continuous input (one of {', '.join(CONTINUOUS_INPUTS)}), but its inputs are "
        f"{sorted(inputs)}; gradients with respect to the input and adversarial samples need images or other "
        "continuous inputs, not token ids"
    )


def _run_teacher(frozen: Any, model: nn.Module, inputs: dict, key: str, x: torch.Tensor) -> torch.Tensor:
    """The teacher's fp32 logits for ``inputs`` with ``inputs[key] = x`` (cast to the teacher's dtype).

    Eval mode, as the engine keeps it. Gradients flow to ``x`` when it requires grad and grad mode is on; the
    parameters get none.
    """
    ensure_eval(model)
    dtype = getattr(frozen, "dtype", None)
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    outputs = call_model(model, {**inputs, key: x}, getattr(frozen, "input_names", None))
    return logits_of(outputs).float()


def _student_input_key(loss: nn.Module, batch: dict, name: str) -> str:
    """The batch field holding the student's main input (``pixel_values``), as the student's inputs show it."""
    student_inputs = getattr(loss, "_models", {}).get("student_inputs")
    return _main_input_key(student_inputs(batch) if student_inputs is not None else batch, "student", name)


def _teacher_logits_from(frozen: Any, model: nn.Module, batch: dict, name: str) -> torch.Tensor:
    """The teacher's fp32 logits for a batch, its inputs made by its own mapping (``call_inputs``).

    That mapping is the identity when the models share their input, or a differentiable function of the
    student's pixels (another normalisation or size, ``hfdistill.data.teacher_image_inputs``), so gradients
    flow back to the batch's student input.
    """
    inputs = frozen.call_inputs(batch)
    key = _main_input_key(inputs, "teacher", name)
    return _run_teacher(frozen, model, inputs, key, inputs[key])


def _unshared_input(name: str, why: str) -> DistillationError:
    return DistillationError(
        f"{name}: the teacher's input does not come from the student's (the batch has its own `teacher_*` inputs); "
        f"{name} {why}, so the teacher must take the student's input, or one computed from it (another "
        "normalisation or size)"
    )


def _rows(logits: torch.Tensor, who: str, loss: str) -> torch.Tensor:
    if logits.dim() != 2:
        raise DistillationError(
            f"{loss}: the {who} logits must be [batch, classes] (image classification), got {tuple(logits.shape)}"
        )
    return logits


def _labels_from(batch: dict | None, n: int, loss: str) -> torch.Tensor:
    labels = None if batch is None else batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
        got = "none" if labels is None else (tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__)
        raise DistillationError(
            f"{loss}: needs one class label per example in the batch (`labels` of shape ({n},)), got {got}; "
            "give the dataset a labels column"
        )
    return labels.long()


def _select_rows(inputs: dict, index: torch.Tensor, n: int) -> dict:
    """The rows ``index`` of every per-example tensor in ``inputs`` (first dimension ``n``); the rest unchanged."""
    return {k: v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in inputs.items()}


def _grad_wrt_tap(output: torch.Tensor, tapped: torch.Tensor, create_graph: bool, loss: str, who: str) -> torch.Tensor:
    """``d output / d tapped`` for a tensor the engine tapped during the forward.

    The engine hands a loss fp32 copies of half-precision taps (``tapped`` is then ``source.float()``, which
    the rest of the model never used); the gradient is then taken with respect to the source tensor (its
    autograd edge), which has the same values.
    """
    if not tapped.requires_grad:
        raise DistillationError(
            f"{loss}: the {who}'s tapped feature does not require grad (no trainable parameter before it?); "
            "tap a layer with trainable parameters before it, or train the student's early layers"
        )
    (grad,) = torch.autograd.grad(output, tapped, create_graph=create_graph, allow_unused=True)
    if grad is None and tapped.grad_fn is not None and type(tapped.grad_fn).__name__ == "ToCopyBackward0":
        source = GradientEdge(*tapped.grad_fn.next_functions[0])
        (grad,) = torch.autograd.grad(output, source, create_graph=create_graph, allow_unused=True)
    if grad is None:
        raise DistillationError(
            f"{loss}: the {who}'s logits do not depend on the tapped feature: tap a layer on the path to the "
            "logits, and give the term no adapter (the gradient is taken with respect to the layer itself)"
        )
    return grad.float()


# --------------------------------------------------------------------------------------------
# Sobolev training / Jacobian matching
# --------------------------------------------------------------------------------------------

SOBOLEV_PROJECTIONS = ("random", "label")


def sobolev_projection(logits: torch.Tensor, mode: str, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The output projection ``v`` [B, C]: a random unit vector per example, or the label's one-hot vector.

    ``random``: ``v_b = u_b / ||u_b||`` with ``u_b ~ N(0, I_C)`` (uniform on the unit sphere), drawn from the
    global generator afresh at every call (Czarnecki et al.'s stochastic Sobolev training).
    """
    if mode == "label":
        return F.one_hot(labels, logits.shape[1]).to(torch.float32)
    return F.normalize(torch.randn(logits.shape, device=logits.device, dtype=torch.float32), dim=1)


@register_loss(
    "sobolev",
    description="Sobolev / Jacobian matching: squared distance of the L2-normalised input gradients of a projection "
    "(random, or the label's logit) of the student's and teacher's logits; double backprop through the student",
    paper="Sobolev Training for Neural Networks (Czarnecki, Osindero, Jaderberg, Swirszcz, Pascanu), NeurIPS 2017, "
    "arXiv:1706.04859; Knowledge Transfer with Jacobian Matching (Srinivas, Fleuret), ICML 2018, arXiv:1803.00443",
    year=2017,
    reads="logits",
    default_tap="logits",
    fields=("batch", "student_input"),
)
class SobolevLoss(nn.Module):
    """``mean_{b,i} (g_s(x_b)_i / ||g_s(x_b)|| - g_t(x_b)_i / ||g_t(x_b)||)^2`` with ``g(x) = d(v^T z(x)) / dx``.

    ``z`` are the logits ([B, C]), ``x`` the input ([B, ...], D values per example) and ``v_b`` [C] the output
    projection. Matching ``v^T J`` rather than the full Jacobian ``J = dz/dx`` ([C, D] per example) costs one
    backward pass per model instead of C:

    - ``projection: random`` (default): ``v_b`` uniform on the unit sphere, fresh at every step, the same for
      both models: Czarnecki et al.'s stochastic Sobolev training (their Fig. 1b); without normalisation,
      ``E_v ||v^T (J_s - J_t)||^2 = ||J_s - J_t||_F^2 / C``, so it matches the whole Jacobian on average;
    - ``projection: label``: ``v_b`` the one-hot vector of the example's label, i.e. the gradient of the true
      class's logit, as Knowledge-Distillation-Zoo (``kd_losses/sobolev.py``).

    ``normalize: true`` (default) divides each example's gradient by its L2 norm before the squared
    distance: Srinivas & Fleuret's normalised Jacobian-matching loss (the two networks' gradients need not
    have the same scale), and the Zoo's; ``normalize: false`` gives Czarnecki et al.'s plain squared error of
    the projected derivatives. The reduction is the mean over the B x D elements, as the Zoo's ``F.mse_loss``
    (the paper's per-example squared norm is D times this), so the Zoo's weight (``--lambda_kd 20``) keeps
    its meaning; the student side is differentiated with ``create_graph=True`` (double backprop), the
    teacher side is a constant target.

    Mechanism. The term declares the ``student_input`` field: the engine makes the student's main input
    (``pixel_values``) require grad before its one training forward and passes that tensor here, so
    ``g_s`` is ``autograd.grad(z_s, x, v, create_graph=True)`` on the training forward's own graph, as the
    Zoo's ``img.requires_grad = True`` before the forward. We chose that over re-running the student on a
    copy of the input inside the loss: it saves a student forward per step and leaves batch-norm running
    statistics updated once per step, as in the reference. In training mode, batch norm couples the
    examples of a batch, so ``g_s`` of an example also carries the other examples' logits' dependence on it
    through the batch statistics (as in the Zoo); the teacher runs in eval mode, where examples are
    independent. The teacher is run again (the engine's teacher forward keeps no graph) from a copy of the
    student's input that requires grad, through the teacher's input mapping: the same tensor when the models
    share their input, or the teacher's own normalisation / size computed from the student's pixels
    (``hfdistill.data.teacher_image_inputs``). Both gradients are thus with respect to the same input; a
    batch with ``teacher_*`` inputs of its own (not computed from the student's) is an error.

    The term's teacher value (its logits) is not used: the re-run gives them with the graph.
    """

    # It runs the teacher on inputs of its own, so a cache of teacher outputs cannot stand in for it.
    needs_live_teacher = True

    def __init__(self, projection: str = "random", normalize: bool = True):
        super().__init__()
        self.projection = check_choice("projection", projection, SOBOLEV_PROJECTIONS)
        self.normalize = check_bool("normalize", normalize)

    def configure(self, ctx) -> None:
        _attach(self, ctx)

    def on_train_begin(self, ctx) -> None:
        _check_teacher_at_start(self, "sobolev", ctx)

    def forward(self, student: torch.Tensor, teacher: Any, batch: dict, student_input: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(student_input, torch.Tensor) or not student_input.requires_grad:
            raise DistillationError(
                "sobolev: needs `student_input`, the student's input tensor that requires grad and that the student's "
                "logits were computed from (the trainer supplies it: the term declares the field)"
            )
        frozen, model = _teacher_model(self, "sobolev")
        z_s = _rows(student, "student", "sobolev").float()  # [B, C]
        labels = _labels_from(batch, z_s.shape[0], "sobolev") if self.projection == "label" else None
        v = sobolev_projection(z_s, self.projection, labels)  # [B, C], the same for both models

        # g_s = d(sum_b v_b . z_s,b) / dx  [B, ...], kept in the graph (double backprop reaches the student).
        (g_s,) = torch.autograd.grad(z_s, student_input, grad_outputs=v, create_graph=True, allow_unused=True)
        if g_s is None:
            raise DistillationError(
                "sobolev: the student's logits do not depend on `student_input`; pass the tensor the student ran on"
            )

        # g_t: the frozen teacher re-run from a copy of the student's input that requires grad, through the
        # teacher's input mapping (identity, or another normalisation / size): a constant target.
        key = _student_input_key(self, batch, "sobolev")
        x = batch[key].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            z_t = _rows(_teacher_logits_from(frozen, model, {**batch, key: x}, "sobolev"), "teacher", "sobolev")
            if z_t.shape != z_s.shape:
                raise DistillationError(
                    f"sobolev: student logits {tuple(z_s.shape)} and teacher logits {tuple(z_t.shape)} differ; "
                    "both models must predict the same classes"
                )
            g_t = torch.autograd.grad(z_t, x, grad_outputs=v, allow_unused=True)[0] if z_t.requires_grad else None
        if g_t is None:
            raise _unshared_input("sobolev", "compares gradients with respect to one input")
        g_s, g_t = g_s.float().flatten(1), g_t.detach().float().flatten(1)  # [B, D]
        if g_s.shape != g_t.shape:
            raise DistillationError(
                f"sobolev: `student_input` has {g_s.shape[1]} values per example but the batch's {key!r} "
                f"{g_t.shape[1]}; pass the student's input tensor"
            )
        if self.normalize:
            g_s, g_t = F.normalize(g_s, dim=1), F.normalize(g_t, dim=1)  # per example, / max(||g||, 1e-12)
        return (g_s - g_t).pow(2).mean()


# --------------------------------------------------------------------------------------------
# Learning without Memorizing: Grad-CAM attention distillation
# --------------------------------------------------------------------------------------------

LWM_CLASSES = ("teacher", "label")


def grad_cam(feature: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of a feature from the gradient of a class score with respect to it.

    ``[B, K, H, W]`` maps: ``alpha_k = mean_{h,w} grad_k`` and ``cam = ReLU(sum_k alpha_k A_k)``, [B, H, W]
    (Selvaraju et al., Eqs. 1-2). ``[B, T, D]`` token features: channels are the last dimension, positions
    the tokens: [B, T].
    """
    if feature.dim() == 4:
        alpha = grad.mean(dim=(2, 3), keepdim=True)  # [B, K, 1, 1]
        return F.relu((alpha * feature).sum(dim=1))  # [B, H, W]
    if feature.dim() == 3:
        alpha = grad.mean(dim=1, keepdim=True)  # [B, 1, D]
        return F.relu((alpha * feature).sum(dim=2))  # [B, T]
    raise DistillationError(
        f"lwm: the feature must be a [B, C, H, W] map or [B, T, D] tokens, got {tuple(feature.shape)}; tap a "
        "convolutional stage or a transformer layer"
    )


class _FeatureLeaf:
    """A temporary hook that makes a module's output (or input) a tensor requiring grad, and keeps it.

    The leaf is ``value.detach().requires_grad_()``; the model continues with ``leaf.clone()`` (so an in-place
    operation downstream, e.g. timm's ``ReLU(inplace=True)``, does not touch the leaf). A frozen teacher's
    feature thus has a gradient although none of its parameters requires grad.
    """

    def __init__(self, module: nn.Module, capture: str):
        self.leaf: torch.Tensor | None = None
        if capture == "input":
            self.handle = module.register_forward_pre_hook(self._pre_hook)
        else:
            self.handle = module.register_forward_hook(self._hook)

    def _make(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            raise DistillationError(f"lwm: the teacher's tapped layer gave a {type(value).__name__}, not a tensor")
        self.leaf = value.detach().requires_grad_(True)
        return self.leaf.clone()

    def _hook(self, module, args, output):
        if isinstance(output, (tuple, list)) and output:
            return type(output)([self._make(output[0]), *output[1:]])
        return self._make(output)

    def _pre_hook(self, module, args):
        if not args:
            raise DistillationError("lwm: the teacher's tapped module takes its input by keyword; tap its output instead")
        return (self._make(args[0]), *args[1:])

    def remove(self) -> None:
        self.handle.remove()


@register_loss(
    "lwm",
    description="Learning without Memorizing: L1 distance of the L2-normalised Grad-CAM maps of student and teacher "
    "at a middle layer for the teacher's top class; double backprop through the student",
    paper="Learning without Memorizing (Dhar, Singh, Peng, Wu, Chellappa), CVPR 2019, arXiv:1811.08051",
    year=2019,
    reads="features",
    same_shape=False,
    multi_layer=True,
    fields=("batch",),
)
class LwMLoss(nn.Module):
    """``mean_{b,j} | q_s(b)_j - q_t(b)_j |`` with ``q = vec(Grad-CAM) / ||vec(Grad-CAM)||_2`` (LwM's L_AD).

    A term reads two taps per side, the layer and the logits::

        - loss: lwm
          weight: 0.4
          student: [layer2, logits]
          teacher: [layer2, logits]

    For each example, the class score ``y^c`` (the logit) of class ``c`` is differentiated with respect to the
    layer's map ``A`` ([B, K, H, W]); Grad-CAM is ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k = mean_{h,w}
    dy^c/dA_k`` (:func:`grad_cam`); each map is vectorised and L2-normalised, and the loss is the L1 distance
    of the student's and teacher's vectors (LwM's attention distillation loss L_AD). ``c`` is the teacher's
    top-scoring class (``classes: teacher``, default: the paper computes both maps for the class the
    teacher, the previous model, predicts), or the example's label (``classes: label``, the Zoo's choice).
    When the maps differ in size, the larger is average-pooled to the smaller before normalising (channels
    may differ: Grad-CAM sums them away).

    The student's gradient ``dy^c/dA`` is taken with ``create_graph=True`` on the training forward's graph, so
    the loss reaches the student's parameters both before the layer (through ``A``) and after it (through
    ``alpha``). The teacher is run again with a temporary hook on its layer that makes the layer's output a
    tensor requiring grad (:class:`_FeatureLeaf`), so its Grad-CAM exists although its parameters do not
    require grad; the term's tapped teacher values are not used.

    Reduction: the mean over the B x H*W elements, as the Zoo's ``F.l1_loss`` with weight 0.4 (the paper's
    L1 norm of an example's difference is H*W times that example's mean here). Where the references differ, and what we follow:

    - the Zoo's ``kd_losses/lwm.py`` builds its map as ``sum_k alpha_k * dy/dA_k`` (the gradient in place of the
      feature map); we follow Grad-CAM and the paper (``alpha_k * A_k``). The Zoo applies LwM to a middle
      stage because, after its last stage (global pooling + a linear classifier), ``dy/dA`` is constant
      over positions; with ``A`` in the map the last stage gives the class activation map, but we keep a
      middle stage in the recipes, as the Zoo;
    - the Zoo takes the label's class; the paper the teacher's prediction (our default; see ``classes``).

    LwM the incremental-learning method also has classification and logit distillation terms: in a recipe,
    the task loss and a ``kd`` term.
    """

    # It runs the teacher on inputs of its own, so a cache of teacher outputs cannot stand in for it.
    needs_live_teacher = True

    def __init__(self, classes: str = "teacher"):
        super().__init__()
        self.classes = check_choice("classes", classes, LWM_CLASSES)
        self._teacher_tap: Tap | None = None

    def configure(self, ctx) -> None:
        for who, taps, shapes in (("student", ctx.student_taps, ctx.student_shape),
                                  ("teacher", ctx.teacher_taps, ctx.teacher_shape)):
            if taps and len(taps) != 2:
                raise DistillationError(
                    f"lwm: a term reads two {who} taps, the layer and the logits (e.g. `{who}: [layer2, logits]`), "
                    f"got {list(taps)}"
                )
            if isinstance(shapes, (list, tuple)) and len(shapes) == 2 and shapes[1] is not None and len(shapes[1]) != 2:
                raise DistillationError(
                    f"lwm: the second {who} tap must be the logits ([batch, classes]), got shape {tuple(shapes[1])}"
                )
        if ctx.teacher_taps:
            self._teacher_tap = Tap.parse(ctx.teacher_taps[0])
        _attach(self, ctx)

    def on_train_begin(self, ctx) -> None:
        _check_teacher_at_start(self, "lwm", ctx)
        self._teacher_layer()

    def _teacher_layer(self) -> tuple[Any, nn.Module, nn.Module]:
        frozen, model = _teacher_model(self, "lwm")
        if self._teacher_tap is None:
            raise DistillationError("lwm: no teacher layer: configure(ctx) reads it from the term's teacher taps")
        module = resolve_module(model, self._teacher_tap.path)
        if module is None:
            raise DistillationError(
                f"lwm: the teacher tap {self._teacher_tap.text!r} must be a module path (Grad-CAM hooks the layer), "
                "e.g. `layer2`"
            )
        return frozen, model, module

    def teacher_cam(self, batch: dict, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's Grad-CAM maps (fp32, no graph) and the classes ``c`` [B] they are for."""
        frozen, model, module = self._teacher_layer()
        inputs = frozen.call_inputs(batch)
        key = _main_input_key(inputs, "teacher", "lwm")
        leaf = _FeatureLeaf(module, self._teacher_tap.capture)
        try:
            with torch.enable_grad():
                z_t = _rows(_run_teacher(frozen, model, inputs, key, inputs[key].detach()), "teacher", "lwm")
                classes = z_t.argmax(dim=1) if labels is None else labels
                feature = leaf.leaf
                if feature is None:
                    raise DistillationError(f"lwm: the teacher layer {self._teacher_tap.text!r} did not run in its forward")
                (grad,) = torch.autograd.grad(z_t.gather(1, classes[:, None]).sum(), feature)
        finally:
            leaf.remove()
        return grad_cam(feature.detach().float(), grad.float()), classes

    def forward(self, student: list[torch.Tensor], teacher: Any, batch: dict) -> torch.Tensor:
        if not isinstance(student, (list, tuple)) or len(student) != 2:
            raise DistillationError("lwm: the term must read two student taps, the layer and the logits: `[layer2, logits]`")
        feature_s, logits_s = student
        z_s = _rows(logits_s, "student", "lwm").float()
        labels = _labels_from(batch, z_s.shape[0], "lwm") if self.classes == "label" else None
        cam_t, classes = self.teacher_cam(batch, labels)  # [B, H, W] (or [B, T]); c from the teacher or labels

        # Student: d y_s^c / dA_s with create_graph (alpha depends on the parameters after the layer).
        score = z_s.gather(1, classes[:, None].to(z_s.device)).sum()
        grad_s = _grad_wrt_tap(score, feature_s, True, "lwm", "student")
        cam_s = grad_cam(feature_s.float(), grad_s)
        if cam_s.shape != cam_t.shape:  # the larger map average-pooled to the smaller one
            cam_s, cam_t = pool_to_smaller(_as_feature(cam_s), _as_feature(cam_t))
        q_s = F.normalize(cam_s.flatten(1), dim=1)  # [B, H*W]
        q_t = F.normalize(cam_t.flatten(1), dim=1)
        return (q_s - q_t).abs().mean()


def _as_feature(cam: torch.Tensor) -> torch.Tensor:
    """A map [B, H, W] as [B, 1, H, W], a token map [B, T] as [B, T, 1] (the layouts pool_to_smaller pools)."""
    return cam[:, None] if cam.dim() == 3 else cam[:, :, None]


# --------------------------------------------------------------------------------------------
# Boundary supporting samples
# --------------------------------------------------------------------------------------------


def bss_select(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """The indices of the examples to attack (the authors' "base sample selection").

    The examples both models classify correctly; when there are more than ``size``, the ``size`` with the
    largest ``sum_{k != y} (p_t,k - p_s,k)^2`` (softmax at T = 1: where the student's view of the other classes
    differs most from the teacher's), largest first.
    """
    correct = (teacher_logits.argmax(1) == labels) & (student_logits.argmax(1) == labels)
    index = correct.nonzero().squeeze(1)
    if index.numel() > size:
        diff = (F.softmax(teacher_logits[index].float(), 1) - F.softmax(student_logits[index].float(), 1)).pow(2)
        score = diff.sum(1) - diff.gather(1, labels[index, None]).squeeze(1)
        index = index[score.sort(descending=True, stable=True).indices[:size]]
    return index


def bss_target_classes(teacher_logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A class per example to attack toward, sampled from the teacher's softmax over its other classes.

    ``P(k) = p_t,k / sum_{j != top} p_t,j`` for ``k != top`` (top = the teacher's prediction), as the authors'
    cumulative-sum sampling. A row whose other classes all have probability 0 (fp32 underflow) gets the
    teacher's second class, as the authors' code does then.
    """
    p = F.softmax(teacher_logits.float(), dim=1)
    top = p.argmax(1, keepdim=True)
    others = p.scatter(1, top, 0.0)
    second = teacher_logits.float().scatter(1, top, float("-inf")).argmax(1, keepdim=True)
    empty = others.sum(1, keepdim=True) <= 0
    others = torch.where(empty, torch.zeros_like(others).scatter(1, second, 1.0), others)
    return torch.multinomial(others, 1, generator=generator).squeeze(1)


class _NoInputGradient(DistillationError):
    """bss_attack's model does not depend on the input it attacks."""


def bss_attack(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    base: torch.Tensor,
    target: torch.Tensor,
    *,
    num_steps: int = 10,
    step_size: float = 0.3,
    eps: float = 1e-4,
    clip: float | None = 2.5,
) -> torch.Tensor:
    """Move each ``x_b`` from its base class toward ``target_b`` across the model's decision boundary.

    With ``f = z_target - z_base`` (logits of ``logits_fn``) and ``g = df/dx`` per example, each step is

        ``x <- clip(x + eta * (z_base - z_target + eps) * g / ||g||_2)``

    (the authors' ``attacks/attack_BSS.py``, ``norm=2``: a DeepFool-like step scaled by the remaining margin,
    ``eta`` = ``step_size`` = 0.3, ``eps`` = 1e-4, 10 steps, values clipped to [-2.5, 2.5]), applied only to
    the examples the model still assigns to the base class (the per-sample stopping rule); the loop ends
    early when none is left. ``logits_fn`` must treat examples independently (eval mode). Returns the fp32
    samples, detached.
    """
    x_adv = x.detach().float().clone()
    view = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(num_steps):
        x_var = x_adv.clone().requires_grad_(True)
        with torch.enable_grad():
            z = logits_fn(x_var).float()
            z_base = z.gather(1, base[:, None]).squeeze(1)
            z_target = z.gather(1, target[:, None]).squeeze(1)
            f = (z_target - z_base).sum()
            g = torch.autograd.grad(f, x_var, allow_unused=True)[0] if f.requires_grad else None
        if g is None:
            raise _NoInputGradient("the model's logits do not depend on the attacked input")
        active = (z.argmax(1) == base).float()  # still on the base side
        if not bool(active.any()):
            break
        margin = (z_base - z_target).detach()
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)  # the authors divide by ||g|| unguarded
        x_adv = x_adv + (step_size * active * (margin + eps) / norm).view(view) * g
        if clip is not None:
            x_adv = x_adv.clamp(-clip, clip)
    return x_adv.detach()


@register_loss(
    "bss",
    description="Boundary Supporting Samples: KD (KL at temperature T) on adversarial samples made by attacking the "
    "teacher from correctly classified examples toward a sampled other class, weight decaying linearly",
    paper="Knowledge Distillation with Adversarial Samples Supporting Decision Boundary (Heo, Lee, Yun, Choi), "
    "AAAI 2019, arXiv:1805.05532",
    year=2019,
    reads="logits",
    default_tap="logits",
    fields=("labels", "batch", "epoch"),
)
class BSSLoss(nn.Module):
    """``w(epoch) * KL(softmax(t(x_adv) / T) || softmax(s(x_adv) / T))``, mean over the attacked examples.

    Every step, following the authors' ``train_BSS_distillation.py`` (and Knowledge-Distillation-Zoo's
    ``train_bss.py``, which is derived from it):

    1. base samples: the examples both teacher and student classify correctly; at most ``attack_size``,
       those with the largest distance between the two models' non-true-class probabilities
       (:func:`bss_select`);
    2. target classes: one per example, sampled from the teacher's softmax over its other classes
       (:func:`bss_target_classes`);
    3. the attack: ``num_steps`` steps of :func:`bss_attack` on the frozen teacher (eval mode, from a copy
       of the examples' input that requires grad), with the per-sample stopping rule. It differentiates the teacher's logits, as
       the authors' ``attacks/attack_BSS.py``; the Zoo's attacker differentiates softmax probabilities;
    4. KD on the adversarial samples: the student (in training mode, as in both references, so its batch
       norm sees them) and the teacher (no gradient) are run on them; the loss is the KL divergence of the
       temperature-softened distributions (``temperature`` 3), summed over classes and averaged over the
       attacked examples, without a T^2 factor (neither reference has one). The authors write it as a
       cross-entropy, which differs from the KL by the teacher's entropy (a constant: same gradient); the
       Zoo writes the KL;
    5. the weight schedule ``w(e) = 0`` for ``e < start_epoch``, else ``max(1 - e / end_epoch, 0)`` (1 when
       ``end_epoch`` is null), ``e`` the trainer's fractional epoch from 0 (a continuous decay; the references
       change the weight once per epoch). The Zoo: weight 2, nothing for the first 10 epochs
       (``start_epoch`` 10; its "warm-up" is this hard start, not a ramp, and the decay is not renormalised
       after it), zero from 80% of the epochs (``end_epoch`` = 0.8 x epochs); the authors: weight 2
       reaching 0 at 75% of the epochs (and an ordinary KD term next to it, weight 4 -> 1, T 3). Put the 2
       in the term weight. When ``w`` is 0 nothing is attacked (no cost).

    When no example qualifies (or only one, with the student in training mode: its batch norm cannot
    normalise a batch of one example when a stage's maps are 1x1), the term is 0 (still attached to the
    graph). The attack moves the student's input (``pixel_values``); the teacher sees it through its input
    mapping (the same tensor, or its own normalisation / size computed from it), so both models get the
    same adversarial image; a batch with ``teacher_*`` inputs of its own is an error. ``clip`` bounds the
    adversarial values to [-clip, clip] (the authors' 2.5, for inputs normalised by the dataset's mean and
    std; null: no bound). The randomness (target classes) comes from torch's global generator,
    which the trainer seeds.

    Defaults are the authors': ``attack_size`` 64 (of a batch of 256; the Zoo 32 of 128), ``num_steps``
    10, ``step_size`` 0.3, ``eps`` 1e-4, ``temperature`` 3, ``clip`` 2.5; ``start_epoch`` 0 and ``end_epoch``
    null (a constant weight) because the schedule depends on the run's length: set them in the recipe.
    """

    # It runs the teacher on inputs of its own, so a cache of teacher outputs cannot stand in for it.
    needs_live_teacher = True

    def __init__(
        self,
        temperature: float = 3.0,
        attack_size: int = 64,
        num_steps: int = 10,
        step_size: float = 0.3,
        eps: float = 1e-4,
        clip: float | None = 2.5,
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
    ):
        super().__init__()
        self.temperature = check_number("temperature", temperature, minimum=0, exclusive=True)
        self.attack_size = check_number("attack_size", attack_size, minimum=1, integer=True)
        self.num_steps = check_number("num_steps", num_steps, minimum=1, integer=True)
        self.step_size = check_number("step_size", step_size, minimum=0, exclusive=True)
        self.eps = check_number("eps", eps, minimum=0)
        self.clip = check_number("clip", clip, minimum=0, exclusive=True, allow_none=True)
        self.start_epoch = check_number("start_epoch", start_epoch, minimum=0)
        self.end_epoch = check_number("end_epoch", end_epoch, minimum=0, exclusive=True, allow_none=True)
        if self.end_epoch is not None and self.end_epoch <= self.start_epoch:
            raise LossParamError(
                "end_epoch",
                f"must be later than start_epoch ({self.start_epoch:g}) or null, got {self.end_epoch:g} (the weight "
                "would be 0 throughout)",
            )

    def configure(self, ctx) -> None:
        _attach(self, ctx)

    def on_train_begin(self, ctx) -> None:
        _check_teacher_at_start(self, "bss", ctx)
        if getattr(self, "_models", {}).get("student") is None:
            raise DistillationError("bss: needs the student model (configure(ctx) attaches ctx.student)")

    def schedule(self, epoch: float) -> float:
        """The weight factor ``w(epoch)``: 0 before ``start_epoch``, then ``1 - epoch / end_epoch`` down to 0."""
        epoch = float(epoch)
        if epoch < self.start_epoch:
            return 0.0
        return 1.0 if self.end_epoch is None else max(1.0 - epoch / self.end_epoch, 0.0)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, batch: dict,
                epoch: float) -> torch.Tensor:
        z_s = _rows(student, "student", "bss").float()
        zero = z_s.sum() * 0.0  # keeps the graph when there is nothing to distil
        factor = self.schedule(epoch)
        if factor == 0.0:
            return zero
        z_t = _rows(teacher, "teacher", "bss").float().to(z_s.device)
        if labels.shape != z_s.shape[:1]:
            raise DistillationError(f"bss: labels must be [batch] ({z_s.shape[0]},), got {tuple(labels.shape)}")
        labels = labels.long().to(z_s.device)
        frozen, teacher_model = _teacher_model(self, "bss")
        student_model, student_inputs_fn = self._models.get("student"), self._models.get("student_inputs")
        if student_model is None or student_inputs_fn is None:
            raise DistillationError("bss: needs the student model and its inputs (configure(ctx) attaches them)")
        index = bss_select(z_s.detach(), z_t, labels, self.attack_size)
        if index.numel() < (2 if student_model.training else 1):
            return zero  # a training-mode batch norm cannot normalise one example at 1x1 maps
        target = bss_target_classes(z_t[index])
        # The attack is in the student's input space: the teacher sees each step through its input mapping.
        key = _student_input_key(self, batch, "bss")
        rows = _select_rows(batch, index, z_s.shape[0])
        x = rows[key]

        def teacher_logits(x_var: torch.Tensor) -> torch.Tensor:
            return _teacher_logits_from(frozen, teacher_model, {**rows, key: x_var}, "bss")

        try:
            x_adv = bss_attack(teacher_logits, x, labels[index], target, num_steps=self.num_steps,
                               step_size=self.step_size, eps=self.eps, clip=self.clip)
        except _NoInputGradient:
            raise _unshared_input("bss", "gives both models the same adversarial image") from None
        with torch.no_grad():
            t_adv = teacher_logits(x_adv)
        s_adv = logits_of(call_model(student_model, {key: x_adv.to(x.dtype)})).float()
        return factor * soft_kl(s_adv, t_adv, self.temperature)
