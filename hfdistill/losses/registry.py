"""The loss registry (DESIGN.md, contract 1).

Every distillation method is an ``nn.Module`` registered here with its description and paper.
A built loss module whose ``needs_teacher`` attribute is False (Tf-KD's virtual teacher) can
run in a term without a teacher model.

``forward(student, teacher, **fields)`` takes what the term's taps selected (a tensor, or a list
of tensors when the term reads several layers) plus the batch fields the method declared in
``fields=`` (``labels``, ``index``, ``epoch``, ...), and returns a scalar tensor computed in fp32
whatever the dtype of its inputs (cast with ``.float()`` first; the engine also runs terms outside
autocast).

The constructor checks its parameters and raises :class:`hfdistill.errors.LossParamError`
(``param`` names the parameter; helpers in ``losses/common.py``) for a value out of its domain or of
the wrong type; :func:`build` raises it too for a parameter the loss does not have. The recipe
validator builds every term's loss and reports such an error at ``terms[i].params.<param>``.

Set-up and hooks. A method with state of its own (VID's regressors, CRD's memory bank, FT's
paraphraser and translator) creates it in ``configure(self, ctx)``, which the trainer calls once,
after its dry-run forward and before the optimiser exists. ``ctx`` is a
:class:`hfdistill.terms.LossContext`: ``ctx.student_shape`` / ``ctx.teacher_shape`` are the tapped
shapes (a ``torch.Size``, or a list of them for a term that reads several taps; the teacher's is
None without a teacher model), plus the number of training examples, the world size, the models,
the device and a way to iterate over training batches (``ctx.term_values()``). That state is
optimised with the student when trainable, saved in Trainer checkpoints (and carried from stage to
stage for a term with the same name), never in the saved student.

A loss module may also implement any of these hooks, each given the same kind of context with the
current ``epoch`` / ``step``; the trainer calls them through one generic callback that walks the
loss modules:

- ``on_train_begin(ctx)``: once when a stage's training starts (after the module's state from an
  earlier stage is loaded); check preconditions there (FT's transfer phase needs a trained
  paraphraser) and raise :class:`hfdistill.errors.DistillationError` with the fix;
- ``on_epoch_begin(ctx)``: at the start of every epoch (e.g. MGD's matching from a pass over data);
- ``on_step_end(ctx)``: after every optimiser step (e.g. momentum updates of a memory bank).

Methods that run the models themselves (BSS's adversarial samples, SSKD's rotations, Sobolev's input
gradients, DML's peers) declare the ``batch`` field (the whole training batch) and use
``ctx.student`` / ``ctx.student_inputs(batch)`` and ``ctx.frozen_teacher`` (``call_inputs(batch)``,
``model``), kept in a tuple or plain object, never as submodules. The ``student_input`` field is the
student's main input made to require grad before the one training forward (input gradients without a
second forward). Such a loss class sets ``needs_live_teacher = True`` when it runs the teacher: a cache
of teacher outputs (:mod:`hfdistill.cache`) cannot stand in for it, and the trainer says so.

A loss class that compares examples within a batch sets ``min_batch_size`` (RKD: 2); the trainer then
drops an epoch's last batch when it would be smaller (as it does for batch-norm in adapters and loss
modules), and says so once.

A loss module that trains whole networks to publish beside the student (DML's peers) returns them from
``extra_students() -> {name: model}``; the run saves each as a student folder of its own.
"""

from __future__ import annotations

import inspect
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import LossParamError, RecipeError

# Fields the trainer can supply to a loss besides what is in the batch.
TRAINER_FIELDS = ("epoch", "step")

# What a method reads; shown by `hfdistill losses` and used to pick default taps.
READS = ("logits", "features", "relations", "attention", "hidden_states")


@dataclass(frozen=True)
class LossInfo:
    """What the registry knows about a method, shown by ``hfdistill losses``."""

    name: str
    cls: type[nn.Module]
    description: str
    paper: str
    year: int
    reads: str
    # Taps used when a term gives none ("logits" for logit methods); None means the term must name them.
    default_tap: str | None = None
    # True when student and teacher tensors must have the same shape (an adapter must make it so).
    same_shape: bool = True
    # Batch fields the method needs by name, passed as keyword arguments to forward.
    fields: tuple[str, ...] = ()
    # True when the method owns trainable modules (optimised with the student).
    trainable: bool = False
    # True when the method reads several layers (a list of taps) at once, e.g. FSP or ReviewKD.
    multi_layer: bool = False
    # The names of the constructor's parameters, for recipe validation.
    params: tuple[str, ...] = field(default=())
    # For an alias (`fitnet`), the name it stands for (`mse`); None for the method's own name.
    alias_of: str | None = None


_LOSSES: dict[str, LossInfo] = {}


def register_loss(
    name: str,
    *,
    description: str,
    paper: str,
    year: int,
    reads: str,
    default_tap: str | None = None,
    same_shape: bool = True,
    fields: tuple[str, ...] = (),
    trainable: bool = False,
    multi_layer: bool = False,
    aliases: tuple[str, ...] = (),
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a distillation loss under ``name`` (and any ``aliases``)."""
    if reads not in READS:
        raise ValueError(f"register_loss({name!r}): reads={reads!r}, expected one of {READS}")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        signature = inspect.signature(cls.__init__)
        params = tuple(
            p.name
            for p in signature.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )
        for registered_name in (name, *aliases):
            if registered_name in _LOSSES:
                raise ValueError(f"loss {registered_name!r} is registered twice")
            _LOSSES[registered_name] = LossInfo(
                name=registered_name,
                cls=cls,
                description=description,
                paper=paper,
                year=year,
                reads=reads,
                default_tap=default_tap,
                same_shape=same_shape,
                fields=tuple(fields),
                trainable=trainable,
                multi_layer=multi_layer,
                params=params,
                alias_of=None if registered_name == name else name,
            )
        cls.loss_name = name
        return cls

    return decorator


def available() -> list[str]:
    """The names of all registered losses, sorted."""
    return sorted(_LOSSES)


def get_info(name: str) -> LossInfo:
    """The registry entry for ``name``; a KeyError lists the registered names when it is unknown."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; registered losses: {', '.join(available())}") from None


def build(name: str, **params) -> nn.Module:
    """Instantiate the registered loss ``name`` with ``params`` (the term's ``params:`` mapping)."""
    info = get_info(name)
    unknown = sorted(set(params) - set(info.params))
    if unknown:
        allowed = ", ".join(info.params) or "none"
        raise LossParamError(
            unknown[0],
            f"loss {name!r} has no parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"its parameters are: {allowed}",
        )
    return info.cls(**params)


def as_list(x: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Normalise a single tap or a list of taps to a list (multi-layer methods accept both)."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def needs_teacher(name: str, params: dict | None = None) -> bool:
    """Whether a term with this loss and parameters reads a teacher model (Tf-KD's virtual teacher does not)."""
    return getattr(build(name, **(params or {})), "needs_teacher", True)


# ------------------------------------------------------------------------------- the table of methods
METHODS_START, METHODS_END = "<!-- methods:start -->", "<!-- methods:end -->"  # the README's generated table


def losses_table(markdown: bool = False) -> str:
    """Every registered loss: name, description, paper and year, what it reads, trainable modules."""
    rows = []
    for name in available():
        info = get_info(name)
        paper = info.paper if str(info.year) in info.paper else f"{info.paper} ({info.year})"
        rows.append([name, info.description, paper, info.reads, "yes" if info.trainable else "no"])
    header = ["name", "description", "paper", "reads", "trains extra modules"]
    if markdown:
        def cell(text: str) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    out = []
    for row in rows:
        out.append(f"{row[0]}  [{row[3]}; trains extra modules: {row[4]}]")
        out.append(textwrap.fill(row[1], 100, initial_indent="    ", subsequent_indent="    "))
        out.append(textwrap.fill(row[2], 100, initial_indent="    paper: ", subsequent_indent="           "))
    return f"{len(rows)} registered losses (`--markdown` for a table)\n\n" + "\n".join(out)


def update_readme_methods(readme: str | os.PathLike) -> bool:
    """Replace the methods table between the README's markers; returns whether it changed."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    if METHODS_START not in text or METHODS_END not in text:
        raise RecipeError("", f"{path} has no {METHODS_START} ... {METHODS_END} markers")
    head, rest = text.split(METHODS_START, 1)
    _, tail = rest.split(METHODS_END, 1)
    new = f"{head}{METHODS_START}\n{losses_table(markdown=True)}\n{METHODS_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text
