"""Taps: the tensors a loss term reads, taken from a model without editing it.

A tap is either
- a dotted module path relative to the model object the user passed (``layer3``,
  ``encoder.layer.5.output``; ``-1`` indexes from the end of a ModuleList), captured with a
  forward hook; by default the module's output (the first element when it returns a tuple),
  with ``:input`` its first input; or
- a named output read from what the model returns: ``logits``, ``hidden_states`` (all, a list)
  or ``hidden_states.N``, ``attentions`` / ``attentions.N``, any other field of a transformers
  ``ModelOutput`` (``distillation_logits``), and ``pooled`` / ``features``: the input of the
  classification head (the pre-logits features of a timm model, the pooled output of a
  transformers classifier).

Hooks record only inside :meth:`ModelTaps.recording`, overwrite rather than append (gradient
checkpointing runs forwards twice), and hold their tensors until :meth:`ModelTaps.clear`.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .errors import DistillationError, TapError  # noqa: F401 - TapError re-exported

HEAD_TAPS = ("pooled", "features")
SEQUENCE_OUTPUTS = ("hidden_states", "attentions")
HEAD_ATTRIBUTES = ("classifier", "score", "head", "fc", "lm_head")


@dataclass(frozen=True)
class Tap:
    text: str  # as written in the recipe, e.g. "layer3:input"
    path: str  # "layer3"
    capture: str  # "output" or "input"

    @classmethod
    def parse(cls, text: str) -> "Tap":
        path, _, capture = text.partition(":")
        capture = capture or "output"
        if capture not in ("input", "output"):
            raise TapError(f"tap {text!r}: the part after ':' must be 'input' or 'output'")
        return cls(text=text, path=path, capture=capture)


def resolve_module(root: nn.Module, path: str) -> nn.Module | None:
    """``root``'s submodule at dotted ``path`` (negative indices count from the end), or None."""
    module = root
    for part in path.split("."):
        if part.lstrip("-").isdigit() and isinstance(module, (nn.ModuleList, nn.Sequential)):
            index = int(part)
            if not -len(module) <= index < len(module):
                return None
            module = module[index]
        elif part in getattr(module, "_modules", {}):
            module = module._modules[part]
        else:
            return None
        if module is None:
            return None
    return module


def head_module(model: nn.Module) -> nn.Module | None:
    """The classification head whose input is the pooled / pre-logits representation."""
    if hasattr(model, "get_classifier"):  # timm
        head = model.get_classifier()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return head
    for name in HEAD_ATTRIBUTES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def closest_paths(root: nn.Module, path: str, n: int = 5) -> list[str]:
    names = [name for name, _ in root.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=n, cutoff=0.4)
    if not close:  # fall back to paths sharing the first component, then to top-level modules
        head = path.split(".")[0]
        close = [name for name in names if name.split(".")[0] == head][:n] or [
            name for name, _ in root.named_children()
        ][:n]
    return close


def _first_tensor(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # ModelOutput
        return next(iter(value.values()))
    if isinstance(value, (tuple, list)) and value:
        return value[0]
    return value


def read_output(outputs: Any, path: str) -> Any:
    """A named output from what a model returned; KeyError when it is not there."""
    name, _, index = path.partition(".")
    if isinstance(outputs, torch.Tensor):
        if path == "logits":
            return outputs
        raise KeyError(path)
    if isinstance(outputs, dict):
        value = outputs.get(name)
    elif isinstance(outputs, (tuple, list)) and name == "logits":
        value = outputs[0]
    else:
        value = None
    if value is None:
        raise KeyError(path)
    if index:
        try:
            return value[int(index)]
        except (ValueError, IndexError, TypeError):
            raise KeyError(path) from None
    return list(value) if isinstance(value, tuple) else value


def output_names(outputs: Any) -> list[str]:
    if isinstance(outputs, torch.Tensor):
        return ["logits"]
    if isinstance(outputs, dict):
        return [k for k, v in outputs.items() if v is not None]
    return ["logits"]


class ModelTaps:
    """The taps of one model (the student or the teacher), with their hooks."""

    def __init__(self, root: nn.Module, taps: Iterable[str], role: str):
        self.root = root
        self.role = role
        self.taps = {text: Tap.parse(text) for text in dict.fromkeys(taps)}
        self._modules: dict[str, nn.Module] = {}  # tap text -> hooked module
        self._outputs: list[Tap] = []  # read from the model's return value
        for text, tap in self.taps.items():
            module = resolve_module(root, tap.path)
            if module is None and tap.path in HEAD_TAPS:
                module = head_module(root)
                if module is None:
                    raise TapError(f"{role} tap {text!r}: the {role} has no classification head to read it from")
                tap = self.taps[text] = Tap(text=text, path=tap.path, capture="input")
            if module is not None:
                self._modules[text] = module
            else:
                self._outputs.append(tap)
        # What the model's forward must be asked for (fixed with the taps, so computed once).
        self.forward_kwargs: dict[str, bool] = {}
        for tap in self._outputs:
            name = tap.path.split(".")[0]
            if name == "hidden_states":
                self.forward_kwargs["output_hidden_states"] = True
            elif name == "attentions":
                self.forward_kwargs["output_attentions"] = True
        self.logits_unread = self._logits_unread(root)
        self._store: dict[str, torch.Tensor] = {}
        self._recording = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _logits_unread(self, root: nn.Module) -> bool:
        """Whether a causal LM may compute its output layer on the last position only (``logits_to_keep=1``):
        no tap reads its logits or its output layer, and its forward takes the argument. Its vocabulary-size
        logits of the whole sequence are then never made (the largest tensor of its forward)."""
        try:
            accepts = "logits_to_keep" in inspect.signature(root.forward).parameters
        except (TypeError, ValueError):
            return False
        get_head = getattr(root, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        reads_head = any(module is head for module in self._modules.values()) if head is not None else False
        reads_logits = any(tap.path.split(".")[0] == "logits" for tap in self._outputs)
        return accepts and not reads_head and not reads_logits

    def call_kwargs(self, has_labels: bool = False) -> dict:
        """Keyword arguments of a forward whose taps are recorded: what the named outputs need, and
        ``logits_to_keep=1`` when nothing reads the logits (never with labels: the model's loss needs them all)."""
        if self.logits_unread and not has_labels:
            return {**self.forward_kwargs, "logits_to_keep": 1}
        return self.forward_kwargs

    # ---- hooks ----
    def attach(self) -> None:
        if self._handles:
            return
        for text, module in self._modules.items():
            if self.taps[text].capture == "input":
                # Read the input before the module runs: an in-place module (timm's `ReLU(inplace=True)`)
                # would otherwise have overwritten it, and a pre-ReLU tap would read post-ReLU values.
                self._handles.append(module.register_forward_pre_hook(self._make_input_hook(text), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._make_hook(text), with_kwargs=True))

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _make_hook(self, text: str):
        def hook(module, args, kwargs, output):
            if self._recording:
                self._store[text] = _first_tensor(output)  # overwrite: a re-run forward (checkpointing) must not append

        return hook

    def _make_input_hook(self, text: str):
        def hook(module, args, kwargs):
            if not self._recording:
                return None
            value = args[0] if args else next(iter(kwargs.values()), None)
            if getattr(module, "inplace", False) and isinstance(value, torch.Tensor):
                value = value.clone()  # the module will overwrite its input; the clone keeps the graph
            self._store[text] = value
            return None

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    # ---- reading ----
    def gather(self, outputs: Any) -> dict[str, Any]:
        """Every tap's tensor (or list of tensors) after a recorded forward that returned ``outputs``."""
        features = {}
        for text in self._modules:
            if text not in self._store:
                raise TapError(
                    f"{self.role} tap {text!r}: module {self.taps[text].path!r} exists but did not run in the "
                    f"{self.role}'s forward pass; pick a module on the forward path"
                )
            value = self._store[text]
            if self.taps[text].path in HEAD_TAPS and value.dim() == 4 and value.shape[-2:] == (1, 1):
                value = value.flatten(1)  # a head that flattens itself (transformers ResNet): pooled is [B, D]
            features[text] = value
        for tap in self._outputs:
            try:
                features[tap.text] = read_output(outputs, tap.path)
            except KeyError:
                raise TapError(self._missing_message(tap, outputs)) from None
        return features

    def clear(self) -> None:
        self._store.clear()

    def _missing_message(self, tap: Tap, outputs: Any) -> str:
        close = closest_paths(self.root, tap.path)
        return (
            f"{self.role} tap {tap.text!r} is neither a module of the {self.role} ({type(self.root).__name__}) "
            f"nor an output it returns. Closest module paths: {', '.join(close) or 'none'}. "
            f"Named outputs it returns: {', '.join(output_names(outputs))}"
            + (", pooled/features" if head_module(self.root) is not None else "")
            + ". Write module paths relative to the model object you passed."
        )

    def check_paths(self) -> None:
        """Fail early (before any forward) on taps that are neither modules nor plausible named outputs."""
        for tap in self._outputs:
            name = tap.path.split(".")[0]
            if "." in tap.path and name not in SEQUENCE_OUTPUTS and not tap.path.split(".")[-1].lstrip("-").isdigit():
                raise TapError(
                    f"{self.role} tap {tap.text!r} is not a module of the {self.role} ({type(self.root).__name__}). "
                    f"Closest module paths: {', '.join(closest_paths(self.root, tap.path)) or 'none'}. "
                    "Write module paths relative to the model object you passed."
                )


def use_eager_attention_if_needed(model: nn.Module, taps: ModelTaps) -> None:
    """Attention maps come back only from the eager attention implementation: switch to it when tapped."""
    from transformers import PreTrainedModel

    if taps.forward_kwargs.get("output_attentions") and isinstance(model, PreTrainedModel):
        if getattr(model.config, "_attn_implementation", "eager") != "eager":
            model.set_attn_implementation("eager")
