#!/usr/bin/env python
"""Peers, side by side: the same distillation work in torchdistill, timm, a plain Trainer and hfdistill.

Every system trains the same student from the same initial weights against the same frozen teacher on
the same data, with the same optimiser, schedule and loss, in one process on the CPU:

- teacher timm ``resnet18`` and student timm ``resnet10t`` (``pretrained=False``, ``in_chans=1``, 10
  classes); the teacher is trained first with cross-entropy for ``--teacher-epochs`` on the same training
  digits (once, not timed) so that its soft labels carry information, then frozen (eval mode);
- ``--examples`` scikit-learn digits (8x8, scaled to uint8, resized to 1x32x32 as hfdistill's data path does,
  normalised with timm's ImageNet statistics averaged to one channel, which is what hfdistill's data path
  derives from the student's config); the other digits are held out for the accuracy column;
- ``--epochs`` epochs, batch 64, AdamW (lr 1e-3, weight decay 0.01, constant rate, no gradient clipping);
- KD: ``loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)``, T = 4, alpha = 0.5;
- FitNet (the feature method): KD plus ``hint_weight * MSE(conv1x1+BN(student.layer3), teacher.layer3)``,
  both features taken by forward hooks, the regressor trained with the student.

Systems (one function each):

(a) torchdistill 1.1.5: a ``DistillationBox`` built from a config dict (``WeightedSumLoss`` of ``KDLoss``,
    plus ``MSELoss`` through ``SimpleLossWrapper`` on a ``Connector4DAB`` connector for FitNet) and driven
    by the loop of its example script (``pre_epoch_process``, ``forward_process``, ``post_forward_process``,
    ``post_epoch_process``). Skipped, with a note, when torchdistill is not installed.
(b) timm's ``timm.task.LogitDistillationTask`` with ``create_optimizer_v2``, driven like timm's
    ``train.py`` (``task(input, target)['loss'].backward()``, ``optimizer.step()``). timm's
    ``FeatureDistillationTask`` matches pooled pre-logits through a Linear, not a hooked layer, and replaces
    KD rather than adding to it, so timm has no FitNet row.
(c) ``transformers.Trainer`` subclass with KD (and FitNet) written by hand in ``compute_loss``, over an
    in-memory torch ``Dataset`` of dicts; (c2) the same over the ``datasets.Dataset`` that (e) reads, the
    peer of (e): the Trainer's own way of reading it.
(d) hfdistill ``DistillationTrainer`` over an in-memory torch ``Dataset`` of dicts.
(e) hfdistill ``DistillationTrainer`` over a ``datasets.Dataset`` in torch format (what a Hugging Face user
    passes), read by hfdistill's trainer (its own batched Arrow reader where it has one).
(f) hfdistill's recipe data path: a recipe and a ``datasets.DatasetDict`` of PIL images (``Image`` feature)
    go through ``hfdistill.run.plan_run`` (what ``hfdistill.run`` and ``hfdistill train`` do first), and
    the stage's trainer comes from ``hfdistill.run.build_trainer`` with this benchmark's teacher and student
    objects put in (so that every system starts from the same weights). What ``hfdistill.run`` does after
    training (saving, evaluation, the summary with its latency measurement, the card) is not run here.
(g) (e) with hfdistill's ``channels_last: true`` (a documented switch, off by default): the student's and the
    teacher's 4-d weights and each batch of images in channels-last (NHWC) memory format, which oneDNN's CPU
    convolutions (and cuDNN's tensor-core kernels) prefer. The other systems could do the same by hand; none
    does it for the user. Same arithmetic in another memory order: accuracy equal within float noise.
(h) (e) with the optimiser hfdistill uses when none is named: the Trainer's default ``optim``,
    ``adamw_torch_fused`` (``torch.optim.AdamW(fused=True)``: the same AdamW update, every parameter in one
    kernel), where every other row uses ``torch.optim.AdamW``'s default (a Python loop over the parameters on
    a CPU; torchdistill's and timm's defaults too). Not the same kernel: this row shows what each system costs
    as it comes; the rows above compare equal kernels. Same update up to float rounding.

Rounds are interleaved (a b c ... a b c ...). The table gives the median time per epoch over all rounds
and epochs, relative to torchdistill (or to (c) when torchdistill is missing), the set-up time before the
first epoch, and the held-out accuracy (mean over rounds, with its range; round r uses seed base + r for
shuffling and the FitNet regressor's initialisation, so the range is the seed noise).

    python benchmarks/peers_speed.py --out benchmarks/results/peers_speed_cpu.md   # the committed run
    python benchmarks/peers_speed.py --tiny --out /tmp/peers.md                    # a few seconds, a smoke test
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import cpu_name, quiet  # noqa: E402  (the offline environment first)

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hfdistill import DistillationConfig, DistillationTrainer, Recipe  # noqa: E402
from hfdistill.run import build_trainer, plan_run  # noqa: E402

TEACHER, STUDENT = "resnet18", "resnet10t"
HINT_LAYER = "layer3"
METHODS = ("kd", "fitnet")
SYSTEMS = {
    "torchdistill": "(a) torchdistill DistillationBox",
    "timm": "(b) timm LogitDistillationTask",
    "trainer": "(c) transformers.Trainer + hand-written KD, torch Dataset",
    "trainer-datasets": "(c2) transformers.Trainer + hand-written KD, datasets.Dataset (torch format)",
    "hfdistill-tensors": "(d) hfdistill DistillationTrainer, torch Dataset",
    "hfdistill-datasets": "(e) hfdistill DistillationTrainer, datasets.Dataset (torch format)",
    "hfdistill-recipe": "(f) hfdistill recipe data path (DatasetDict of images)",
    "hfdistill-channels-last": "(g) hfdistill DistillationTrainer, datasets.Dataset, `channels_last: true`",
    "hfdistill-default-optim": "(h) hfdistill DistillationTrainer, datasets.Dataset, its default optimiser "
                               "(fused AdamW)",
}
NOT_EXPRESSIBLE = {
    ("timm", "fitnet"): "not expressible: timm's FeatureDistillationTask matches pooled pre-logits through a "
                        "Linear projection (no layer hooks) and replaces KD instead of adding to it",
}


# ------------------------------------------------------------------------------------ the work
@dataclass
class Work:
    """What every system does: the same data, models, optimiser, schedule and loss."""

    examples: int = 1024
    epochs: int = 2
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    alpha: float = 0.5  # weight of the cross-entropy; the KD term has 1 - alpha
    temperature: float = 4.0
    hint_weight: float = 1.0
    teacher_epochs: int = 5
    eval_examples: int | None = None  # held-out digits used (None: all that are not training examples)
    size: int = 32


@dataclass
class Digits:
    """scikit-learn digits as uint8 [N, 1, size, size] images (train / held out) and the normalisation."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: float
    std: float

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std

    @property
    def train_pixels(self) -> torch.Tensor:
        return self.normalise(self.train_images)

    @property
    def test_pixels(self) -> torch.Tensor:
        return self.normalise(self.test_images)


def load_data(work: Work) -> Digits:
    """The digits, shuffled once (seed 0): the first ``work.examples`` train, the rest are held out."""
    from sklearn.datasets import load_digits
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    digits = load_digits()
    images = torch.tensor(np.round(digits.images * (255.0 / 16.0)), dtype=torch.uint8).unsqueeze(1)
    # Bilinear with antialias, rounded back to uint8: what hfdistill's data path does to images of another size.
    images = F.interpolate(images.float(), size=(work.size, work.size), mode="bilinear", antialias=True,
                           align_corners=False).round().clamp(0, 255).to(torch.uint8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    n = min(work.examples, len(labels) - 100)
    held_out = slice(n, len(labels) if work.eval_examples is None else min(len(labels), n + work.eval_examples))
    # A one-channel model's statistics: ImageNet's averaged over the channels (hfdistill.models does the same).
    mean = sum(IMAGENET_DEFAULT_MEAN) / 3
    std = sum(IMAGENET_DEFAULT_STD) / 3
    return Digits(images[:n], labels[:n], images[held_out], labels[held_out], mean, std)


def make_models(work: Work, data: Digits) -> tuple[nn.Module, nn.Module]:
    """The teacher (trained ``work.teacher_epochs`` with cross-entropy, then frozen) and the student's initial state."""
    torch.manual_seed(0)
    teacher = timm.create_model(TEACHER, pretrained=False, in_chans=1, num_classes=10)
    student = timm.create_model(STUDENT, pretrained=False, in_chans=1, num_classes=10)
    if work.teacher_epochs > 0:
        optimizer = torch.optim.AdamW(teacher.parameters(), lr=work.lr, weight_decay=work.weight_decay)
        loader = DataLoader(TensorDataset(data.train_pixels, data.train_labels), batch_size=work.batch, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        teacher.train()
        for _ in range(work.teacher_epochs):
            for x, y in loader:
                F.cross_entropy(teacher(x), y).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    teacher.eval()
    return teacher, student


def recipe_terms(work: Work, method: str) -> list[dict]:
    """The hfdistill recipe terms of a method (names as ``hfdistill losses`` lists them)."""
    terms = [{"loss": "kd", "weight": 1 - work.alpha, "params": {"temperature": work.temperature}}]
    if method == "fitnet":
        terms.append({"loss": "fitnet", "weight": work.hint_weight, "student": HINT_LAYER, "teacher": HINT_LAYER,
                      "adapter": "conv1x1"})
    return terms


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            work: Work) -> torch.Tensor:
    """``alpha * CE + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean (hand-written peers)."""
    t = work.temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean")
    return work.alpha * F.cross_entropy(student_logits, labels) + (1 - work.alpha) * t * t * soft


def regressor(channels_in: int, channels_out: int) -> nn.Module:
    """FitNet's regressor as every system builds it here: 1x1 conv (no bias) + BatchNorm."""
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, kernel_size=1, bias=False), nn.BatchNorm2d(channels_out))


def layer_channels(model: nn.Module, layer: str, size: int) -> int:
    """Output channels of a layer, from one forward of a dummy batch."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, 1, size, size))
    model.train(was_training)
    handle.remove()
    return seen[0]


class Output:
    """The output of a module, recorded by a forward hook at each call."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.value = output

    def remove(self) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------ timing
class Skipped(Exception):
    """A system that cannot run here (its package is missing, or it cannot express the method)."""


@dataclass
class Trained:
    """One run: wall times of its epochs, the time before the first epoch, and the trained student."""

    epoch_s: list[float]
    setup_s: float
    student: nn.Module
    data_s: float | None = None  # one pass over the system's own training loader, no model


def loader_pass(loader) -> float:
    """Seconds to draw every batch of a training loader once, with no model: the data path's own cost."""
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


class EpochClock:
    """Wall time of each epoch, and of everything before the first one."""

    def __init__(self) -> None:
        self.created = time.perf_counter()
        self.epoch_s: list[float] = []
        self.first_start: float | None = None
        self._start = 0.0

    def begin(self) -> None:
        self._start = time.perf_counter()
        if self.first_start is None:
            self.first_start = self._start

    def end(self) -> None:
        self.epoch_s.append(time.perf_counter() - self._start)

    @property
    def setup_s(self) -> float:
        return (self.first_start or time.perf_counter()) - self.created

    def result(self, student: nn.Module, data_s: float | None = None) -> Trained:
        return Trained(list(self.epoch_s), self.setup_s, student, data_s)


class EpochTimer(TrainerCallback):
    """The Trainer's epochs on an :class:`EpochClock` (between ``on_epoch_begin`` and ``on_epoch_end``)."""

    def __init__(self, clock: EpochClock):
        self.clock = clock

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.clock.begin()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.clock.end()


# ------------------------------------------------------------------------------------ (a) torchdistill
def run_torchdistill(work: Work, data: Digits, teacher: nn.Module, student: nn.Module, method: str,
                     seed: int) -> Trained:
    """torchdistill's DistillationBox from a config dict, driven by the loop of its example script."""
    try:
        from torchdistill.common.constant import def_logger
        from torchdistill.core.distillation import get_distillation_box
    except ImportError:
        raise Skipped("torchdistill is not installed (`pip install torchdistill==1.1.5` to include it)") from None
    def_logger.setLevel(logging.WARNING)
    clock = EpochClock()
    torch.manual_seed(seed)
    kd = {"criterion": {"key": "KDLoss", "kwargs": {
        "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
        "teacher_module_io": "output", "temperature": work.temperature, "alpha": work.alpha, "reduction": "batchmean"}},
        "weight": 1.0}
    teacher_config: dict = {"forward_proc": "forward_batch_only", "requires_grad": False}
    student_config: dict = {"forward_proc": "forward_batch_only", "requires_grad": True}
    sub_terms = {"kd": kd}
    if method == "fitnet":
        channels_in = layer_channels(student, HINT_LAYER, work.size)
        channels_out = layer_channels(teacher, HINT_LAYER, work.size)
        teacher_config["forward_hook"] = {"input": [], "output": [HINT_LAYER]}
        # Connector4DAB: the student plus 1x1 conv + BN connectors applied to hooked features (secondary_forward).
        student_config["auxiliary_model_wrapper"] = {"key": "Connector4DAB", "kwargs": {"connectors": {"hint": {
            "io": "output", "path": f"student_model.{HINT_LAYER}",
            "conv2d_kwargs": {"in_channels": channels_in, "out_channels": channels_out, "kernel_size": 1, "stride": 1,
                              "padding": 0, "bias": False},
            "bn2d_kwargs": {"num_features": channels_out}}}}}
        student_config["forward_hook"] = {"input": [], "output": [f"student_model.{HINT_LAYER}", "connector_dict.hint"]}
        sub_terms["fitnet"] = {
            "criterion": {"key": "MSELoss", "kwargs": {"reduction": "mean"}},
            "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                "input": {"is_from_teacher": False, "module_path": "connector_dict.hint", "io": "output"},
                "target": {"is_from_teacher": True, "module_path": HINT_LAYER, "io": "output"}}},
            "weight": work.hint_weight,
        }
    train_config = {
        "num_epochs": work.epochs,
        "train_data_loader": {
            "dataset_id": "digits/train",
            "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
            "kwargs": {"batch_size": work.batch, "num_workers": 0, "pin_memory": False, "drop_last": False},
        },
        "teacher": teacher_config,
        "student": student_config,
        "optimizer": {"key": "AdamW", "kwargs": {"lr": work.lr, "weight_decay": work.weight_decay}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": sub_terms}},
    }
    datasets_by_id = {"digits/train": TensorDataset(data.train_pixels, data.train_labels)}
    device = torch.device("cpu")
    box = get_distillation_box(teacher, student, datasets_by_id, train_config, device, None, False, 1)
    for epoch in range(work.epochs):
        clock.begin()
        box.pre_epoch_process(epoch=epoch)
        # examples/torchvision/image_classification.py::train_one_epoch, without its metric logger.
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            if not torch.isfinite(loss):
                raise ValueError(f"The training loop was broken due to loss = {loss}")
        box.post_epoch_process()
        clock.end()
    box.clean_modules()
    return clock.result(student, loader_pass(box.train_data_loader))


# ------------------------------------------------------------------------------------ (b) timm
def run_timm(work: Work, data: Digits, teacher: nn.Module, student: nn.Module, method: str, seed: int) -> Trained:
    """timm's LogitDistillationTask and create_optimizer_v2, in the loop of timm's train.py (single process)."""
    if method != "kd":
        raise Skipped(NOT_EXPRESSIBLE[("timm", method)])
    from timm.optim import create_optimizer_v2
    from timm.task import LogitDistillationTask

    clock = EpochClock()
    torch.manual_seed(seed)
    task = LogitDistillationTask(student_model=student, teacher_model=teacher, criterion=nn.CrossEntropyLoss(),
                                 task_loss_weight=work.alpha, distill_loss_weight=1 - work.alpha,
                                 temperature=work.temperature, device=torch.device("cpu"), verbose=False)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=work.lr,
                                    weight_decay=work.weight_decay)
    loader = DataLoader(TensorDataset(data.train_pixels, data.train_labels), batch_size=work.batch, shuffle=True,
                        num_workers=0)
    task.train()
    for _ in range(work.epochs):
        clock.begin()
        for x, y in loader:
            result = task(x, y)
            result["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
        clock.end()
    return clock.result(student, loader_pass(loader))


# ------------------------------------------------------------------------------------ (c) plain Trainer
class PixelDataset(Dataset):
    """Pre-tensorised digits as dicts (``pixel_values``, ``labels``): the data path costs (almost) nothing."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


class HintedStudent(nn.Module):
    """The student and FitNet's regressor in one module, so that the Trainer's optimiser trains both."""

    def __init__(self, student: nn.Module, hint: nn.Module):
        super().__init__()
        self.student = student
        self.hint = hint
        self.feature = Output(student.get_submodule(HINT_LAYER))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.student(pixel_values)
        return logits, self.hint(self.feature.value)


class HandKDTrainer(Trainer):
    """A plain ``transformers.Trainer`` whose ``compute_loss`` does KD (and FitNet's hint) by hand."""

    def __init__(self, *args, teacher: nn.Module, work: Work, hinted: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.work = work
        self.teacher_feature = Output(teacher.get_submodule(HINT_LAYER)) if hinted else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixels, labels = inputs["pixel_values"], inputs["labels"]
        with torch.no_grad():
            teacher_logits = self.teacher(pixels)
        if self.teacher_feature is None:
            logits = model(pixels)
            loss = kd_loss(logits, teacher_logits, labels, self.work)
        else:
            logits, hint = model(pixels)
            loss = kd_loss(logits, teacher_logits, labels, self.work)
            loss = loss + self.work.hint_weight * F.mse_loss(hint, self.teacher_feature.value)
        return (loss, logits) if return_outputs else loss


def trainer_arguments(work: Work, output_dir: str, seed: int) -> dict:
    """The TrainingArguments every Trainer-based system gets: the shared schedule, nothing saved or logged."""
    return dict(
        output_dir=output_dir, num_train_epochs=work.epochs, per_device_train_batch_size=work.batch,
        learning_rate=work.lr, weight_decay=work.weight_decay, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=0.0, optim="adamw_torch", report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, seed=seed,
    )


def run_trainer(work: Work, data: Digits, teacher: nn.Module, student: nn.Module, method: str, seed: int,
                dataset=None) -> Trained:
    """A plain transformers.Trainer subclass with hand-written KD in compute_loss (over ``dataset`` when given)."""
    dataset = dataset if dataset is not None else PixelDataset(data.train_pixels, data.train_labels)
    clock = EpochClock()
    torch.manual_seed(seed)
    model = student
    if method == "fitnet":
        hint = regressor(layer_channels(student, HINT_LAYER, work.size), layer_channels(teacher, HINT_LAYER, work.size))
        model = HintedStudent(student, hint)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**trainer_arguments(work, out, seed), label_names=["labels"],
                                 remove_unused_columns=False)
        trainer = HandKDTrainer(model=model, args=args, train_dataset=dataset, teacher=teacher, work=work,
                                hinted=method == "fitnet", callbacks=[EpochTimer(clock)])
        trainer.train()
        data_s = loader_pass(trainer.get_train_dataloader())
    return clock.result(student, data_s)


# ------------------------------------------------------------------------------------ (d), (e), (f) hfdistill
def _distill(work: Work, train_dataset, teacher: nn.Module, student: nn.Module, method: str, seed: int,
             clock: EpochClock, **options) -> Trained:
    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(**{**trainer_arguments(work, out, seed), "evaluate_teacher": False, **options})
        trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=train_dataset,
                                      recipe={"task_weight": work.alpha, "terms": recipe_terms(work, method)},
                                      callbacks=[EpochTimer(clock)])
        trainer.train()
        data_s = loader_pass(trainer.get_train_dataloader())
    return clock.result(student, data_s)


def run_hfdistill_tensors(work: Work, data: Digits, teacher: nn.Module, student: nn.Module, method: str,
                          seed: int) -> Trained:
    """hfdistill's DistillationTrainer over the torch Dataset of dicts that (c) reads."""
    clock = EpochClock()
    torch.manual_seed(seed)
    return _distill(work, PixelDataset(data.train_pixels, data.train_labels), teacher, student, method, seed, clock)


def pixel_dataset(data: Digits):
    """The training digits as a ``datasets.Dataset`` (``pixel_values``, ``labels``) in torch format."""
    import datasets

    return datasets.Dataset.from_dict(
        {"pixel_values": data.train_pixels.numpy(), "labels": data.train_labels.numpy()}
    ).with_format("torch")


def run_hfdistill_datasets(work: Work, data: Digits, teacher: nn.Module, student: nn.Module, method: str,
                           seed: int, dataset=None, **options) -> Trained:
    """hfdistill's DistillationTrainer over a torch-formatted ``datasets.Dataset`` (built before the clock starts);
    ``options``: DistillationConfig fields of the rows beside (e)."""
    dataset = dataset if dataset is not None else pixel_dataset(data)
    clock = EpochClock()
    torch.manual_seed(seed)
    return _distill(work, dataset, teacher, student, method, seed, clock, **options)


def run_hfdistill_channels_last(*args, **kwargs) -> Trained:
    """(e) with hfdistill's ``channels_last`` switch: both models' conv weights and the images in NHWC."""
    return run_hfdistill_datasets(*args, **kwargs, channels_last=True)


def run_hfdistill_default_optim(*args, **kwargs) -> Trained:
    """(e) with the optimiser a DistillationConfig gets when none is named (the Trainer's ``adamw_torch_fused``)."""
    default_optim = DistillationConfig(output_dir=tempfile.gettempdir(), use_cpu=True).optim
    return run_hfdistill_datasets(*args, **kwargs, optim=default_optim)


def image_dataset_dict(data: Digits):
    """Train and held-out digits as a ``DatasetDict`` of PIL images (``Image`` feature) and class labels."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})

    def split(images: torch.Tensor, labels: torch.Tensor):
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(image[0].numpy(), mode="L") for image in images], "label": labels.tolist()},
            features=features)

    return datasets.DatasetDict({"train": split(data.train_images, data.train_labels),
                                 "test": split(data.test_images, data.test_labels)})


def run_hfdistill_recipe(work: Work, data: Digits, teacher: nn.Module, student: nn.Module, method: str, seed: int,
                         dataset_dict=None) -> Trained:
    """hfdistill's recipe path: plan_run (data and models from the recipe) and build_trainer, our models put in."""
    dataset_dict = dataset_dict if dataset_dict is not None else image_dataset_dict(data)
    clock = EpochClock()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as out:
        training = trainer_arguments(work, out, seed)
        recipe = Recipe.from_dict({
            "task": "image-classification",
            "teacher": {"name": f"timm:{TEACHER}", "pretrained": False, "kwargs": {"in_chans": 1}},
            "student": {"name": f"timm:{STUDENT}", "pretrained": False, "kwargs": {"in_chans": 1}},
            "data": {"name": "digits (benchmark DatasetDict)", "image_size": work.size, "augment": "none"},
            "task_weight": work.alpha,
            "terms": recipe_terms(work, method),
            "training": {**training, "evaluate_teacher": False},
        })
        plan = plan_run(recipe, dataset=dataset_dict)
        job = plan.final
        check_same_inputs(job.data.eval, data)
        trainer = build_trainer(job, plan, job.stages[0], model=student, teacher=teacher)
        trainer.add_callback(EpochTimer(clock))
        trainer.train()
        data_s = loader_pass(trainer.get_train_dataloader())
    return clock.result(student, data_s)


def check_same_inputs(eval_dataset, data: Digits, n: int = 16) -> None:
    """The recipe path's preprocessing must give the tensors the other systems read (equal work)."""
    batch = eval_dataset.__getitems__(list(range(min(n, len(eval_dataset)))))
    theirs = torch.stack([example["pixel_values"] for example in batch])
    ours = data.test_pixels[: len(theirs)]
    if theirs.shape != ours.shape:
        raise RuntimeError(f"the recipe data path gives inputs of shape {tuple(theirs.shape[1:])}, the other systems "
                           f"{tuple(ours.shape[1:])}")
    if not torch.allclose(theirs, ours, atol=1e-5):
        raise RuntimeError("the recipe data path preprocesses the digits differently from the other systems (max "
                           f"difference {float((theirs - ours).abs().max()):.2e})")


RUNNERS: dict[str, Callable[..., Trained]] = {
    "torchdistill": run_torchdistill,
    "timm": run_timm,
    "trainer": run_trainer,
    "trainer-datasets": run_trainer,
    "hfdistill-tensors": run_hfdistill_tensors,
    "hfdistill-datasets": run_hfdistill_datasets,
    "hfdistill-recipe": run_hfdistill_recipe,
    "hfdistill-channels-last": run_hfdistill_channels_last,
    "hfdistill-default-optim": run_hfdistill_default_optim,
}


# ------------------------------------------------------------------------------------ evaluation and report
def accuracy(student: nn.Module, data: Digits, batch: int = 256) -> float:
    """Held-out accuracy, the same function for every system."""
    student.eval()
    pixels, labels = data.test_pixels, data.test_labels
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            correct += int((student(pixels[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum())
    return correct / len(labels)


@dataclass
class Row:
    """One system and method over all rounds."""

    method: str
    system: str
    epoch_s: list[float] = field(default_factory=list)
    setup_s: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    @property
    def median_epoch_s(self) -> float | None:
        return statistics.median(self.epoch_s) if self.epoch_s else None

    def round_medians(self, epochs: int) -> list[float]:
        """The median time per epoch of each round (``epoch_s`` holds ``epochs`` times per round, in order)."""
        return [statistics.median(self.epoch_s[i:i + epochs]) for i in range(0, len(self.epoch_s), epochs)]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "timm": timm.__version__}
    for name in ("datasets", "torchdistill", "hfdistill"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            found[name] = "not installed"
    return found


def machine() -> str:
    """CPU model, logical cores, torch threads and the library versions."""
    cpu, cores = cpu_name(), os.cpu_count()
    found = ", ".join(f"{k} {v}" for k, v in versions().items())
    return f"{cpu}, {cores} logical cores, torch threads {torch.get_num_threads()}; {found}"


def _has_arrow_reader() -> bool:
    import hfdistill.data

    return hasattr(hfdistill.data, "ArrowBatchReader")


def reference_system(rows: list[Row], method: str) -> str:
    """torchdistill when it ran this method, else the plain Trainer (c)."""
    ran = {r.system for r in rows if r.method == method and r.epoch_s}
    return "torchdistill" if "torchdistill" in ran else "trainer"


def accuracy_note(row: Row, ref: Row | None) -> str:
    """Says when a system's accuracy differs from the reference's by more than the seed noise (or 0.03)."""
    if ref is None or row is ref or not row.accuracy or not ref.accuracy:
        return ""
    gap = statistics.mean(row.accuracy) - statistics.mean(ref.accuracy)
    if min(len(row.accuracy), len(ref.accuracy)) < 2:  # one round: no estimate of the seed noise
        return f"accuracy {gap:+.3f} vs the reference (one round: no noise estimate)" if abs(gap) > 0.05 else ""
    spread = max(max(r.accuracy) - min(r.accuracy) for r in (row, ref))
    if abs(gap) > max(0.03, 2 * spread):
        return f"accuracy {gap:+.3f} vs the reference: beyond the seed noise (range {spread:.3f})"
    return ""


def report(rows: list[Row], work: Work, args: argparse.Namespace, command: str, started: float) -> str:
    lines = [
        "# Peers, side by side: the same distillation work in each system",
        "",
        f"Machine: {machine()}.",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}. Run time: "
        f"{time.perf_counter() - started:.0f} s. Device: CPU, one process, DataLoader workers 0.",
        f"Command: `{command}`",
        "",
        f"Work: teacher timm `{TEACHER}` (random init, trained {work.teacher_epochs} epochs with cross-entropy on the "
        f"training digits before the runs, not timed; frozen; held-out accuracy {args.teacher_accuracy:.3f}) -> "
        f"student timm `{STUDENT}` (same initial weights in every run), both `in_chans=1`, 10 classes; "
        f"{work.examples} scikit-learn digits at 1x{work.size}x{work.size} "
        f"for training, {args.held_out} held out; {work.epochs} epochs, batch {work.batch}, AdamW lr {work.lr:g}, "
        f"weight decay {work.weight_decay:g}, constant rate, no clipping; KD: {work.alpha:g} x CE + "
        f"{1 - work.alpha:g} x T^2 x KL at T = {work.temperature:g}; FitNet: KD + {work.hint_weight:g} x "
        f"MSE(conv1x1 + BN(student {HINT_LAYER}), teacher {HINT_LAYER}), features by forward hooks. "
        f"{args.rounds} interleaved round(s); s / epoch is the median over all rounds and epochs; set-up is the "
        "median time from the system's first call to its first epoch; data path alone is one pass over the "
        "system's own training loader after training, with no model (median over rounds); accuracy is on the "
        "held-out digits, mean over rounds [min, max] (round r shuffles with seed base + r). Each round's ratio "
        "(its median epoch against the reference's in the same round) shows how much the machine moves the "
        "numbers from one round to the next.",
        "",
    ]
    if args.tiny:
        lines += ["**Tiny run (`--tiny`): a smoke test, the numbers mean nothing.**", ""]
    for method in METHODS:
        chosen = [r for r in rows if r.method == method]
        if not chosen:
            continue
        ref_name = reference_system(rows, method)
        ref = next((r for r in chosen if r.system == ref_name and r.epoch_s), None)
        label = "KD (logits)" if method == "kd" else f"FitNet hint on {HINT_LAYER} + KD"
        lines += [f"## {label}", "",
                  f"| system | s / epoch | vs {ref_name} | vs {ref_name}, each round | data path alone, s / epoch | "
                  "set-up s | accuracy | note |",
                  "|---|---:|---:|---|---:|---:|---|---|"]
        for row in chosen:
            name = SYSTEMS[row.system]
            if row.skipped or row.error:
                why = f"skipped: {row.skipped}" if row.skipped else f"failed: {row.error}"
                lines.append(f"| {name} | - | - | - | - | - | - | {why} |")
                continue
            ratio = f"{row.median_epoch_s / ref.median_epoch_s:.2f}" if ref is not None else "-"
            rounds = ", ".join(f"{mine / theirs:.2f}" for mine, theirs in
                               zip(row.round_medians(work.epochs), ref.round_medians(work.epochs))) if ref else "-"
            acc = statistics.mean(row.accuracy)
            spread = f" [{min(row.accuracy):.3f}, {max(row.accuracy):.3f}]" if len(row.accuracy) > 1 else ""
            data_s = f"{statistics.median(row.data_s):.3f}" if row.data_s else "-"
            setup_s = statistics.median(row.setup_s)
            lines.append(f"| {name} | {row.median_epoch_s:.2f} | {ratio} | {rounds} | {data_s} | {setup_s:.2f} | "
                         f"{acc:.3f}{spread} | {accuracy_note(row, ref)} |")
        lines.append("")
    lines += [
        "How each system was set up (details in the docstring of `benchmarks/peers_speed.py`): (a) torchdistill's "
        "`DistillationBox` from a config dict (`WeightedSumLoss` of `KDLoss`; FitNet: a `Connector4DAB` 1x1 conv + "
        "BN connector on the hooked `student_model.layer3` and `MSELoss` through `SimpleLossWrapper`), driven by "
        "the loop of its example script; (b) `timm.task.LogitDistillationTask` with `timm.optim.create_optimizer_v2`, "
        "in the loop of timm's `train.py`; (c) a `transformers.Trainer` subclass, KD and the hint by hand in "
        "`compute_loss`; (d)-(h) hfdistill with the recipe terms "
        f"`{json.dumps(recipe_terms(work, 'fitnet'))}` (FitNet; KD is the first term) and `task_weight` "
        f"{work.alpha:g}. Which parameters get weight decay is each system's own rule: torchdistill all, timm none "
        "of the biases and norm weights, the Trainer-based ones all but the biases. (c2) and (e) read the same "
        "`datasets.Dataset` (torch format): the plain Trainer through datasets' own torch formatter "
        "(`Dataset.__getitems__`, a batch per call), hfdistill " + ("through its `hfdistill.data.ArrowBatchReader` "
        "(one Arrow take per batch, columns converted as arrays)" if _has_arrow_reader() else "as the Trainer does") +
        "; (f) decodes PNG-encoded images and normalises them in "
        "batches (`with_transform`), and its inputs are checked equal to the others' tensors.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the systems")
    parser.add_argument("--examples", type=int, default=1024, help="training digits (the rest are held out)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=5, help="cross-entropy epochs of the teacher first")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=0, help="round r uses seed + r")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds: 64 digits (one batch), 1 epoch, 1 round, untrained teacher")
    parser.add_argument("--out", default=None,
                        help="markdown file for the results (a .json of the raw times beside it)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.examples, args.epochs, args.rounds, args.teacher_epochs = 64, 1, 1, 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else list(argv)))
    with quiet():
        return benchmark(args, command)


def benchmark(args: argparse.Namespace, command: str) -> int:
    """Everything measured, the report printed and written."""
    started = time.perf_counter()
    work = Work(examples=args.examples, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                eval_examples=128 if args.tiny else None)
    data = load_data(work)
    work.examples = len(data.train_labels)
    args.held_out = len(data.test_labels)
    teacher, student = make_models(work, data)
    args.teacher_accuracy = accuracy(teacher, data)
    # What a user has before training starts, built once and outside the clocks.
    rows_dataset = pixel_dataset(data)
    prebuilt = {"trainer-datasets": {"dataset": rows_dataset}, "hfdistill-datasets": {"dataset": rows_dataset},
                "hfdistill-channels-last": {"dataset": rows_dataset},
                "hfdistill-default-optim": {"dataset": rows_dataset},
                "hfdistill-recipe": {"dataset_dict": image_dataset_dict(data)}}
    rows = {(m, s): Row(m, s) for m in args.methods for s in args.systems}
    for r in range(args.rounds):
        for method in args.methods:
            for system in args.systems:
                row = rows[(method, system)]
                if row.skipped or row.error:
                    continue
                try:
                    trained = RUNNERS[system](work, data, copy.deepcopy(teacher), copy.deepcopy(student), method,
                                              args.seed + r, **prebuilt.get(system, {}))
                except Skipped as exc:
                    row.skipped = str(exc)
                    continue
                except Exception as exc:  # one failing system must not lose the others' results
                    row.error = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                    print(f"[{system} {method}] failed: {row.error}", file=sys.stderr)
                    continue
                row.epoch_s += trained.epoch_s
                row.setup_s.append(trained.setup_s)
                row.accuracy.append(accuracy(trained.student, data))
                if trained.data_s is not None:
                    row.data_s.append(trained.data_s)
                epochs = ", ".join(f"{t:.2f}" for t in trained.epoch_s)
                print(f"round {r + 1}/{args.rounds} {method:6s} {system:18s} epochs {epochs} s, set-up "
                      f"{trained.setup_s:.2f} s, accuracy {row.accuracy[-1]:.3f}", flush=True)
    text = report(list(rows.values()), work, args, command, started)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        raw = {"command": command, "machine": machine(), "work": asdict(work),
               "teacher_accuracy": args.teacher_accuracy, "rows": [asdict(r) for r in rows.values()]}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
