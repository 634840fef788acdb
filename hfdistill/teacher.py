"""The frozen teacher behind one interface (DESIGN.md, contract 5).

Every teacher call goes through a :class:`Teacher`: the trainer's training step, its dry run, the
teacher's evaluation and the run's latency summary. It owns the frozen model, its taps, the
conversion of a batch into the teacher's inputs, its dtype and its eval-mode guard.

The interface the trainer relies on is small, so that a cache of teacher outputs (which reads
stored features by example index instead of running a model) can stand in for a live model:

- ``features(batch) -> {tap: fp32 tensor}``: what the loss terms read;
- ``outputs(batch)``: the model's own outputs (evaluation, latency);
- ``attach()`` / ``remove()``: install and remove the taps' hooks around training;
- ``model``: the ``nn.Module`` (None for a cache), ``dtype``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import DistillationError
from .taps import ModelTaps, use_eager_attention_if_needed

# Batch fields named `teacher_<x>` go to the teacher as `<x>` (its own tokenisation or resolution).
TEACHER_INPUT_PREFIX = "teacher_"
TEACHER_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a timm or plain module takes positionally, in order of preference.
POSITIONAL_INPUTS = ("pixel_values", "input_ids", "inputs", "x")


def to_float(value: Any) -> Any:
    """Half-precision tensors (and lists of them) as fp32; everything else unchanged.

    Called outside inference mode on what the teacher computed inside it, it also makes ordinary tensors of
    inference tensors (which autograd cannot save for the losses' backward): the fp32 cast does it for half
    precision, a clone for the rest (the only copy between the teacher and the losses).
    """
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != torch.float32:
            return value.float()
        return value.clone() if value.is_inference() else value
    if isinstance(value, (list, tuple)):
        return [to_float(v) for v in value]
    return value


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of a model's floating-point parameters (None when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def cast_inputs(inputs: dict, dtype: torch.dtype | None) -> dict:
    """Floating-point input tensors in a half-precision model's dtype (a bf16 model takes bf16 pixels)."""
    if dtype is None or dtype == torch.float32:
        return inputs
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype else v
            for k, v in inputs.items()}


def call_model(model: nn.Module, inputs: dict, input_names: set[str] | None = None, **forward_kwargs) -> Any:
    """Call a transformers model with the inputs it accepts (never ``labels``), a timm or plain module
    with its main input tensor (positionally); floating-point inputs in the model's dtype."""
    inputs = cast_inputs(inputs, model_dtype(model))
    if isinstance(model, PreTrainedModel):
        accepted = input_names if input_names is not None else set(inspect.signature(model.forward).parameters)
        return model(**{k: v for k, v in inputs.items() if k in accepted and k != "labels"}, **forward_kwargs)
    for key in POSITIONAL_INPUTS:
        if key in inputs:
            return model(inputs[key])
    raise DistillationError(
        f"cannot tell which input {type(model).__name__} takes from {sorted(inputs)}; "
        "pass `teacher_inputs=` to DistillationTrainer"
    )


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in what a model returned: the tensor itself (timm), ``outputs['logits']`` or the first item."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and outputs.get("logits") is not None:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise DistillationError(f"cannot find logits in the model's output ({type(outputs).__name__})")


def ensure_eval(model: nn.Module) -> None:
    """A frozen model in eval mode, whatever called ``.train()`` on it (or on a module holding it). Any such call
    sets the root's flag, so the root is checked, not every module at each call (a walk over all of them costs
    up to a millisecond a step for a large teacher)."""
    if model.training:
        model.eval()


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor (or a list or tuple of them, as a list) on ``device``; tensors already there are not copied."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, (list, tuple)):
        return [to_device(v, device) for v in value]
    return value


def input_device(model: nn.Module) -> torch.device:
    """Where a model takes its inputs: the device of its first parameter that holds data (a model dispatched by
    ``device_map`` keeps its offloaded weights on ``meta``); the CPU for a model without parameters."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def place_frozen_model(model: nn.Module, device: torch.device | str, dtype: str = "auto") -> bool:
    """Move a frozen model to ``device`` and cast it to ``dtype`` (:data:`TEACHER_DTYPES`). A model spread by
    ``device_map`` (Accelerate's big-model inference) stays where it is, cast when Accelerate allows it; returns
    whether it is such a model."""
    cast = TEACHER_DTYPES[dtype]
    if getattr(model, "hf_device_map", None) is None:
        model.to(device=device, dtype=cast) if cast else model.to(device)
        return False
    if cast is not None and model_dtype(model) != cast:
        try:
            model.to(dtype=cast)
        except RuntimeError as error:  # Accelerate does not move or cast a model with offloaded weights
            raise DistillationError(
                f"the teacher is placed by device_map with weights offloaded to CPU or disk, and cannot be cast "
                f"to {dtype} after loading ({error}); load it in that dtype (a recipe: the teacher's "
                f"`kwargs: {{dtype: {dtype}}}`; Python: `from_pretrained(..., dtype=torch.{dtype})`) and leave "
                "teacher_dtype at auto"
            ) from None
    return True


class Teacher:
    """A frozen teacher model and the taps the loss terms read from it.

    Args:
        model: a transformers model, a timm model, or any ``nn.Module`` whose forward takes the main
            input tensor. It is frozen here: ``requires_grad=False``, eval mode at every call (put back
            whenever something calls ``.train()`` on it).
        taps: the tap texts the terms read (module paths or named outputs).
        device: where it runs, and where its outputs go. A model spread by ``device_map`` (Accelerate's big-model
            inference: over several GPUs, or offloaded to CPU or disk) stays where it is, and what it hands to
            the losses comes back to ``device`` from whichever device computed it.
        dtype: ``auto`` (as loaded), ``float32``, ``bfloat16`` or ``float16``.
        inputs_fn: optional ``batch -> teacher inputs``; by default the batch's ``teacher_*`` fields
            (prefix removed) and otherwise the student's inputs (``shared_input_names``).
        shared_input_names: batch fields the teacher may take from the student's inputs.
        compile_options: ``torch.compile`` arguments (``backend``, ``mode``) to compile the teacher with,
            in place (``nn.Module.compile``: it stays the same object, with its taps' hooks traced in).
        channels_last: put its 4-d weights in channels-last memory format (NHWC).
    """

    def __init__(
        self,
        model: nn.Module,
        taps: Iterable[str] = (),
        *,
        device: torch.device | str = "cpu",
        dtype: str = "auto",
        inputs_fn: Callable[[dict], dict] | None = None,
        shared_input_names: Iterable[str] = (),
        compile_options: dict | None = None,
        channels_last: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise DistillationError(f"the teacher must be an nn.Module, got {type(model).__name__}")
        if dtype not in TEACHER_DTYPES:
            raise DistillationError(f"teacher dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
        model.requires_grad_(False)
        model.eval()
        self.device = torch.device(device)
        self.spread = place_frozen_model(model, self.device, dtype)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        # Taps read only by losses that cast piece by piece (token losses over vocabulary-size logits): handed
        # over in the teacher's dtype, as the inference tensors they are (those losses save no teacher tensor
        # for their backward), instead of as whole fp32 copies.
        self.keep_dtype: set[str] = set()
        self.dtype = model_dtype(model)
        self.inputs_fn = inputs_fn
        self.shared_input_names = set(shared_input_names)
        self.input_names = set(inspect.signature(model.forward).parameters)
        self.taps = ModelTaps(model, taps, "teacher")
        self.taps.check_paths()
        use_eager_attention_if_needed(model, self.taps)
        if compile_options is not None:
            model.compile(**{k: v for k, v in compile_options.items() if v is not None})

    # ---- inputs ----
    def call_inputs(self, batch: dict) -> dict:
        """The teacher's inputs for a batch: ``inputs_fn``, else ``teacher_*`` fields over the shared inputs."""
        if self.inputs_fn is not None:
            return self.inputs_fn(batch)
        own = {k[len(TEACHER_INPUT_PREFIX):]: v for k, v in batch.items() if k.startswith(TEACHER_INPUT_PREFIX)}
        shared = {k: v for k, v in batch.items() if k in self.shared_input_names}
        return {**shared, **own}

    def _forward(self, inputs: dict, forward_kwargs: dict) -> Any:
        return call_model(self.model, inputs, self.input_names, **forward_kwargs)  # half inputs for a half teacher

    # ---- the interface ----
    # The teacher runs under inference mode: no autograd bookkeeping at all (no version counters, no views
    # tracked), which no_grad still does. Its outputs are then inference tensors, for evaluation only.
    @torch.inference_mode()
    def outputs(self, batch: dict) -> Any:
        """The teacher's own outputs for a batch (no taps recorded); inference tensors, not for a backward."""
        ensure_eval(self.model)
        return self._forward(self.call_inputs(batch), {})

    def features(self, batch: dict) -> dict[str, Any]:
        """The tapped teacher values for a batch, in fp32 (the terms compute in fp32), as ordinary tensors
        the losses may keep for their backward."""
        ensure_eval(self.model)
        with self.taps.recording():
            with torch.inference_mode():
                outputs = self._forward(self.call_inputs(batch), self.taps.call_kwargs())
                tapped = self.taps.gather(outputs)
        if self.spread:  # a tapped layer's output lies on the device that layer runs on
            tapped = {k: to_device(v, self.device) for k, v in tapped.items()}
        try:
            return {k: v if k in self.keep_dtype else to_float(v) for k, v in tapped.items()}
        finally:
            self.taps.clear()

    def logits(self, batch: dict) -> torch.Tensor:
        logits = logits_of(self.outputs(batch))
        return to_device(logits, self.device) if self.spread else logits

    def attach(self) -> None:
        self.taps.attach()

    def remove(self) -> None:
        self.taps.remove()
