"""Mutual learning: the student is trained together with peer networks, each learning from the others.

``dml`` (Deep Mutual Learning) has no frozen teacher: its peers are fresh networks of the student's own
architecture that live in the loss module (created in ``configure``, optimised with the student, saved
in checkpoints, never in the saved student). After training they are students in their own right:
:meth:`DMLLoss.extra_students` hands them to the run, which saves, evaluates and lists each one
(:func:`hfdistill.run.save_extra_students`).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DistillationError
from .common import check_number, kl_from_log_probs
from .registry import register_loss

IGNORE_INDEX = -100  # labels of rows the task loss skips (padding tokens), as in transformers


# ---------------------------------------------------------------------------------------- fresh peers
def fresh_like(model: nn.Module) -> nn.Module:
    """A new network of ``model``'s architecture with its own, independent initialisation.

    The architecture's own initialisation, not a generic one: a transformers model is rebuilt from a copy
    of its config (``_from_config`` runs the model's ``_init_weights``); a timm model with
    ``timm.create_model`` and the arguments it was created with (timm's ResNets, e.g., zero the last
    BatchNorm of each block, which ``reset_parameters`` would not), keeping its ``pretrained_cfg`` (input
    size, normalisation), so the copy preprocesses and saves as the student does. Any other module is
    deep-copied and every submodule with ``reset_parameters`` is reset. Nothing is shared with
    ``model``: not its weights or its hooks. The copy has ``model``'s dtype, device, train/eval mode and
    ``requires_grad`` flags. Weights draw from torch's global generator: seed it apart from the seed
    ``model`` was made with, or the copy gets the same initial values (:func:`seeded_peers` does).
    """
    from transformers import PreTrainedModel

    from ..models import is_timm_model

    if isinstance(model, PreTrainedModel):
        # In the student's dtype, built the model's own way (modules it keeps in fp32 stay so).
        peer = type(model)._from_config(copy.deepcopy(model.config), dtype=model.dtype)
    elif is_timm_model(model):
        peer = _fresh_timm(model)
    else:
        peer = copy.deepcopy(model)
        for module in peer.modules():  # no hook of the student's (taps) may fire on the copy
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        reset = [m for m in peer.modules() if callable(getattr(m, "reset_parameters", None))]
        if not reset:
            raise DistillationError(
                f"dml: cannot initialise a new {type(model).__name__}: it is neither a transformers nor a timm model, "
                "and none of its modules has reset_parameters(); use a transformers or timm student"
            )
        for module in reset:
            module.reset_parameters()
    own = dict(model.named_parameters())
    first = next(iter(own.values()), None)
    if isinstance(peer, PreTrainedModel) and first is not None:
        peer.to(first.device)  # already in its dtype(s)
    elif first is not None:
        peer.to(first.device, first.dtype)
    for name, parameter in peer.named_parameters():
        if name in own:
            parameter.requires_grad_(own[name].requires_grad)
    return peer.train(model.training)


def seeded_peers(model: nn.Module, count: int) -> list[nn.Module]:
    """``count`` fresh networks of ``model``'s architecture (:func:`fresh_like`), each with its own seed.

    A run seeds torch, makes the student, and the Trainer seeds torch again with the same seed before the
    loss set-up: a peer drawn from that stream would start with the student's very weights (and DML between
    identical networks is plain training). So peer k is drawn under the seed ``initial_seed + 7919 k``
    (deterministic for a seeded run, the same on every process), in a forked random state, so the run's
    own stream (dropout, augmentation) is left as it was. A peer that still starts equal to ``model`` (an
    architecture whose initialisation draws nothing random) is an error.
    """
    base = torch.initial_seed()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    peers = []
    for k in range(1, count + 1):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((base + 7919 * k) % 2**63)
            peers.append(fresh_like(model))
    own = [p.detach() for p in model.parameters() if p.is_floating_point()]
    for k, peer in enumerate(peers, 1):
        theirs = [p.detach() for p in peer.parameters() if p.is_floating_point()]
        if own and all(torch.equal(a, b) for a, b in zip(own, theirs)):
            raise DistillationError(
                f"dml: peer{k} starts with exactly the student's weights ({type(model).__name__} initialises "
                "without randomness, or the student was never initialised at random); mutual learning needs "
                "networks that start apart"
            )
    return peers


def _fresh_timm(model: nn.Module) -> nn.Module:
    import timm

    from ..models import timm_model_args

    pretrained_cfg = copy.deepcopy(dict(model.pretrained_cfg))
    architecture = pretrained_cfg.get("architecture") or type(model).__name__.lower()
    # The arguments that rebuild these weights (read off the model, as when it is saved), plus the drop rates
    # it was created with: they change no weight, but the peer should train with the student's regularisation.
    recorded = getattr(model, "_model_args", None) or {}
    drop_rates = {k: v for k, v in recorded.items() if k.endswith("drop_rate")}
    args = {**drop_rates, **timm_model_args(model, check=False)}
    try:
        peer = timm.create_model(architecture, pretrained=False, num_classes=model.num_classes, **args)
    except Exception as error:  # noqa: BLE001 - whatever timm raises, say what was tried
        raise DistillationError(
            f"dml: timm.create_model({architecture!r}, num_classes={model.num_classes}, **{args}) failed ({error}); "
            "the peers are built like the student, so the student must be a model timm can create by name"
        ) from None
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    built = {k: tuple(v.shape) for k, v in peer.state_dict().items()}
    if have != built:
        differ = sorted(k for k in have.keys() | built.keys() if have.get(k) != built.get(k))
        raise DistillationError(
            f"dml: timm.create_model({architecture!r}, **{args}) does not rebuild the student's architecture "
            f"(differs in {', '.join(differ[:3])}); the student was changed after creation in a way its creation "
            "arguments do not record, so no peer of the same architecture can be made"
        )
    peer.pretrained_cfg = pretrained_cfg
    if hasattr(peer, "default_cfg"):
        peer.default_cfg = pretrained_cfg
    return peer


def _logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor (timm), a ModelOutput / dict with ``logits``, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DistillationError(f"dml: a peer returned {type(output).__name__}, which holds no logits")


# ---------------------------------------------------------------------------------------- the loss
@register_loss(
    "dml",
    description="Deep mutual learning: the student and peer networks of its architecture, trained together, each "
    "with cross-entropy plus KL to the others' predictions; no teacher; each peer is saved as a student",
    paper="Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu), CVPR 2018, arXiv:1706.00384",
    year=2018,
    reads="logits",
    default_tap="logits",
    same_shape=False,
    fields=("labels", "batch"),
    trainable=True,
)
class DMLLoss(nn.Module):
    """DML: the student and ``peers`` networks of its architecture learn the task and from each other.

    The paper trains a cohort of K networks, each on its own objective (Sec. 3.1 for two networks,
    ``L_Θ1 = L_C1 + D_KL(p2 || p1)``; Sec. 3.3 for K of them):

        L_Θk = L_Ck + 1/(K-1) * sum_{l != k} D_KL(p_l || p_k),     p_k = softmax(z_k)

    with ``L_Ck`` the cross-entropy of network k and ``D_KL(p_l || p_k) = sum_m p_l^m log(p_l^m / p_k^m)``
    summed over classes and averaged over the batch rows. Network 1 is the student (its cross-entropy is the
    recipe's task loss); networks 2..K are this module's peers (``K = peers + 1``). One forward returns

        student:  1/(K-1) * sum_{l peer} KL(p_l.detach() || p_s)                      (the student's mimicry)
        peers:    sum_k [ CE(z_k, y) + 1/(K-1) * sum_{l != k} KL(p_l.detach() || p_k) ]   (each peer's L_Θk)

    The ``detach`` makes the target of every KL a constant, so each network's parameters get the gradient
    of its own L_Θk only (the student of its mimicry here plus its task loss); summing the K objectives
    into one loss and taking one optimiser step then updates every network as the paper does.

    Weights. The trainer's loss is ``task_weight * CE_student + weight * (this value)``: with the paper's
    objective ``task_weight = 1`` and ``weight = 1`` (the recipes' values). ``weight`` scales the peers'
    whole objective (their cross-entropy too), not only the student's mimicry: with another weight the
    peers train with that factor on their gradients (for SGD, a scaled learning rate), so keep 1 unless
    that is what you want. The logged ``loss_<term>`` is this whole value, the peers' cross-entropies
    included.

    Temperature. The paper uses plain softmax (``T = 1``, the default). With ``temperature`` T the KLs
    compare ``softmax(z / T)`` and are multiplied by ``T^2`` (as in KD, so their gradients keep their
    scale); the peers' cross-entropy always uses the raw logits.

    Choices and differences from the references:

    - Update order. The paper's Algorithm 1 updates the networks one after another, recomputing the
      predictions between updates. We compute every network's prediction once per batch and step them all
      together, as AberHu/Knowledge-Distillation-Zoo (``train_dml.py``: both losses from the same forward,
      the other net's output detached) and torchdistill do; it costs one forward per network per step.
    - KL direction and reduction: ``KL(other || this)`` with the other detached, summed over classes and
      averaged over rows (``F.kl_div(log_softmax(this), softmax(other).detach(), reduction="batchmean")``
      in the Zoo's ``DML`` loss), as the paper's Eq. for ``D_KL(p2 || p1)``.
    - Cohorts of K > 2 use the paper's mean over the other K-1 networks (Sec. 3.3), not the variant that
      distils from the ensemble of the others (which the paper finds worse).
    - Initialisation: every peer is a new network with the architecture's own initialisation
      (:func:`fresh_like`), independent of the student's initial weights, as in the paper's CIFAR-100
      experiments (networks trained from scratch). A pretrained student's peers start from scratch too.
    - The peers run on the student's inputs of the batch, in the precision the student's forward uses
      (the run's mixed-precision autocast, re-entered here because loss terms run outside it); their
      BatchNorm statistics and dropout follow the training mode; gradient clipping
      (``max_grad_norm``) applies to student and peers together (the recipes switch it off, as the
      references do not clip).
    - Rows whose label is -100 (padding tokens) are left out of every term. Logits may be [B, C] or
      [B, T, C] (one row per position).

    Parameters:
        peers: how many peer networks train with the student (the paper's main setting is two networks:
            ``peers: 1``; it also reports cohorts of up to 4 networks).
        temperature: softmax temperature of the KL terms (the paper's is 1).

    After training, :meth:`extra_students` returns the peers (``peer1``, ``peer2``, ...); ``hfdistill.run``
    saves each as a complete student folder (``<output_dir>-peers/<name>``), evaluates it and lists it
    in the summary and the student's model card.
    """

    needs_teacher = False  # the peers are trained here; no frozen teacher is read

    def __init__(self, peers: int = 1, temperature: float = 1.0):
        super().__init__()
        self.num_peers = check_number("peers", peers, minimum=1, integer=True)
        self.temperature = check_number("temperature", temperature, minimum=0, exclusive=True)
        self.peers = nn.ModuleList()  # filled by configure(); trainable state of the loss module
        self._runtime: tuple = (None, None)  # (batch -> student inputs, accelerator): not submodules

    def configure(self, ctx) -> None:
        if ctx.student is None:
            raise DistillationError(
                "dml: the loss context has no student model to build the peers from; dml runs inside "
                "DistillationTrainer (or hfdistill.run), which gives it the student"
            )
        self.peers = nn.ModuleList(seeded_peers(ctx.student, self.num_peers))
        self._runtime = (ctx.student_inputs, ctx.accelerator)

    def extra_students(self) -> dict[str, nn.Module]:
        """The peers, by name (``peer1``, ...): models of the student's class, saved by the run as students."""
        return {f"peer{i + 1}": peer for i, peer in enumerate(self.peers)}

    def peer_logits(self, batch: dict) -> list[torch.Tensor]:
        """Every peer's logits on the batch's student inputs (with gradients, in the student's precision)."""
        from ..teacher import call_model

        student_inputs, accelerator = self._runtime
        inputs = student_inputs(batch) if student_inputs is not None else batch
        inputs = {k: v for k, v in inputs.items() if k != "labels"}  # the peers' loss is computed here
        autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        with autocast:
            return [_logits(call_model(peer, inputs)) for peer in self.peers]

    def forward(self, student: torch.Tensor, teacher: Any = None, labels: torch.Tensor | None = None,
                batch: dict | None = None) -> torch.Tensor:
        if len(self.peers) == 0:
            raise DistillationError("dml: the loss has no peers yet; configure(ctx) builds them (the trainer calls it)")
        if batch is None or labels is None:
            raise DistillationError(
                "dml: needs the batch (to run its peers) and the labels (for their cross-entropy); the trainer "
                "supplies both when the dataset has a label column"
            )
        peer_logits = self.peer_logits(batch)
        for k, z in enumerate(peer_logits, 1):
            if z.shape != student.shape:
                raise DistillationError(
                    f"dml: peer{k} gives logits of shape {tuple(z.shape)} but the term's student tap is "
                    f"{tuple(student.shape)}; dml reads the student's `logits` (leave the term's taps unset)"
                )
        return self.objective(student, peer_logits, labels)

    def objective(self, student: torch.Tensor, peers: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The DML value from the student's and the peers' logits (see the class docstring)."""
        if labels.is_floating_point():
            raise DistillationError("dml: needs integer class labels (its peers learn with cross-entropy)")
        classes = student.shape[-1]
        y = labels.reshape(-1)  # [N]
        networks = [z.reshape(-1, classes).float() for z in [student, *peers]]  # K x [N, C]
        if y.numel() != networks[0].shape[0]:
            raise DistillationError(
                f"dml: {y.numel()} labels for {networks[0].shape[0]} rows of logits {tuple(student.shape)}; "
                "the labels must have the logits' shape without the class dimension"
            )
        keep = y != IGNORE_INDEX
        if not bool(keep.all()):
            y, networks = y[keep], [z[keep] for z in networks]
        if y.numel() == 0:  # nothing labelled in this batch: zero, still on every network's graph
            return sum(z.sum() for z in networks) * 0.0
        t = self.temperature
        log_p = [F.log_softmax(z / t, dim=-1) for z in networks]  # K x [N, C]
        targets = [lp.detach() for lp in log_p]  # each network's prediction as the others' constant target

        def mimicry(k: int) -> torch.Tensor:
            # 1/(K-1) sum_{l != k} KL(p_l || p_k): summed over classes, mean over rows, x T^2
            others = [kl_from_log_probs(targets[l], log_p[k]).mean() for l in range(len(log_p)) if l != k]
            return torch.stack(others).mean() * t**2

        student_part = mimicry(0)  # the student's CE is the recipe's task loss
        peer_parts = [F.cross_entropy(networks[k], y) + mimicry(k) for k in range(1, len(networks))]
        return student_part + torch.stack(peer_parts).sum()
