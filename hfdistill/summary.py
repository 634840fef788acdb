"""The table printed at the end of ``hfdistill train``: size, quality and speed of each model.

Latency is measured here, on this machine: a few warm-up calls, then the median of timed calls,
reported per example for batch size 1 and for a larger batch.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass
class ModelRow:
    """One line of the summary."""

    role: str  # "teacher", "student (no teacher)", "student (distilled)"
    name: str
    params: int
    size_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> ms per example
    folder: str | None = None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_on_disk(model: nn.Module, folder: str | None = None) -> int:
    """Bytes of the weight files in ``folder``; without one, the bytes its weights would take."""
    if folder and os.path.isdir(folder):
        files = [f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin"))]
        if files:
            return sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:  # tied weights are stored once
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def call_model(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """Call a transformers model with the inputs it accepts, a timm/plain module with its main input."""
    if isinstance(model, PreTrainedModel):
        accepted = set(inspect.signature(model.forward).parameters)
        return model(**{k: v for k, v in inputs.items() if k in accepted and k != "labels"})
    return model(inputs["pixel_values"] if "pixel_values" in inputs else inputs["input_ids"])


def _slice(inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in inputs.items() if isinstance(v, torch.Tensor)}


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    batch_sizes: tuple[int, ...] = (1, 32),
    warmup: int = 3,
    min_seconds: float = 0.3,
    max_repeats: int = 30,
    call: Callable[[nn.Module, dict], Any] = call_model,
) -> dict[int, float]:
    """Median milliseconds per example for each batch size (bounded by the examples in ``inputs``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    available = min(len(v) for v in inputs.values() if isinstance(v, torch.Tensor))
    results = {}
    try:
        for requested in batch_sizes:
            batch = min(requested, available)
            sample = {k: v.to(device) for k, v in _slice(inputs, batch).items()}
            for _ in range(warmup):
                call(model, sample)
            times = []
            start = time.perf_counter()
            while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() - start < min_seconds):
                t0 = time.perf_counter()
                call(model, sample)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            results[batch] = 1000.0 * statistics.median(times) / batch
    finally:
        model.train(was_training)
    return results


def _human_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_summary(rows: list[ModelRow], metric: str = "accuracy") -> str:
    """A plain-text table, one row per model."""
    batch_sizes = sorted({b for row in rows for b in row.latency_ms})
    header = ["model", "name", "params", "size on disk", metric]
    header += [f"latency b={b} (ms/ex)" for b in batch_sizes]
    table = [header]
    for row in rows:
        value = row.metrics.get(metric)
        line = [row.role, _short(row.name), _human_count(row.params), _human_bytes(row.size_bytes)]
        line.append(f"{value:.4f}" if value is not None else "-")
        line += [f"{row.latency_ms[b]:.3f}" if b in row.latency_ms else "-" for b in batch_sizes]
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
