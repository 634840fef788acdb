"""Models: recognising and wrapping teacher and student models.

A timm student is wrapped into transformers' ``TimmWrapperForImageClassification`` so that it
saves, reloads and runs in ``pipeline()`` like any transformers model. The wrapper holds the
very module the user passed (no copy), so the user's object is the one that gets trained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TimmWrapperConfig, TimmWrapperForImageClassification


def is_timm_model(model: Any) -> bool:
    """A model built by ``timm.create_model`` (not yet wrapped for transformers)."""
    return (
        isinstance(model, nn.Module)
        and not isinstance(model, PreTrainedModel)
        and hasattr(model, "pretrained_cfg")
        and hasattr(model, "forward_features")
    )


def wrap_timm_model(
    model: nn.Module,
    id2label: dict[int, str] | None = None,
    model_args: dict[str, Any] | None = None,
) -> TimmWrapperForImageClassification:
    """Wrap a timm classifier so it saves in transformers format with its ``pretrained_cfg`` and labels.

    ``model_args`` are the keyword arguments the timm model was created with beyond its name and
    class count (``in_chans``, ``drop_rate``, ...); they go into ``config.json`` so that
    ``from_pretrained`` rebuilds the same architecture.
    """
    pretrained_cfg = dict(model.pretrained_cfg)
    architecture = pretrained_cfg.get("architecture") or type(model).__name__.lower()
    num_classes = model.num_classes
    if num_classes == 0:
        raise ValueError(f"timm model {architecture!r} has no classifier (num_classes=0); create it with num_classes")
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
    if len(id2label) != num_classes:
        raise ValueError(f"{len(id2label)} label names for a timm model with {num_classes} classes")
    pretrained_cfg["num_classes"] = num_classes
    config = TimmWrapperConfig(
        architecture=architecture,
        model_args=dict(model_args) if model_args else None,
        num_labels=num_classes,
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
    )
    config.pretrained_cfg = pretrained_cfg
    # Build the wrapper's own timm model on the meta device (no memory, no init), then put the user's model in.
    with torch.device("meta"):
        wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model = model
    wrapper.to(next(model.parameters()).device)
    return wrapper


def student_tap_root(model: nn.Module) -> nn.Module:
    """The module tap paths are relative to: the timm model inside our wrapper, else the model itself."""
    if isinstance(model, TimmWrapperForImageClassification):
        return model.timm_model
    return model
