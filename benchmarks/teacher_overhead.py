"""Does a frozen teacher cost more than its forward pass?

Measures, in one run on one machine, the wall time per optimisation step of
  A. the student trained alone (DistillationTrainer without a teacher),
  B. the teacher's forward pass alone (no_grad, eval mode, same batches),
  C. distillation with KD on logits,
  D. distillation with KD + a FitNet hint through a conv adapter (hooks on both models),
and reports the overhead ratio C / (A + B) and D / (A + B): 1.0 means the teacher costs exactly its
forward pass. Run: python benchmarks/teacher_overhead.py [--device cuda] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import timm
import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from hfdistill import DistillationConfig, DistillationTrainer


class RandomImages(Dataset):
    """Pre-tensorised random images and labels, so the data path costs nothing."""

    def __init__(self, n: int, size: int, classes: int):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=generator)
        self.y = torch.randint(0, classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class StepTimer(TrainerCallback):
    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def make_models(args):
    torch.manual_seed(0)
    teacher = timm.create_model(args.teacher, num_classes=args.classes)
    student = timm.create_model(args.student, num_classes=args.classes, **json.loads(args.student_kwargs))
    return teacher, student


def time_training(args, dataset, teacher, student, recipe) -> float:
    timer = StepTimer(args.device)
    with tempfile.TemporaryDirectory() as out:
        config = DistillationConfig(
            output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
            learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=10**6,
            use_cpu=args.device == "cpu", dataloader_num_workers=0, evaluate_teacher=False, seed=0,
            bf16=args.bf16, teacher_dtype="bfloat16" if args.bf16 else "auto",
        )
        trainer = DistillationTrainer(model=student, teacher=teacher, recipe=recipe, args=config,
                                      train_dataset=dataset, callbacks=[timer])
        trainer.train()
    return statistics.median(timer.times[args.warmup:])


def time_teacher_forward(args, dataset, teacher) -> float:
    teacher = teacher.to(args.device).eval()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    teacher = teacher.to(dtype)
    times = []
    for step in range(args.warmup + args.steps):
        x = dataset.x[(step * args.batch) % len(dataset):][: args.batch].to(args.device, dtype)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            teacher(x)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[args.warmup:])


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} x{len(names)} logical cores"
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "no GPU"
    return f"{cpu}; {gpu}; torch {torch.__version__}, timm {timm.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--student-kwargs", default='{"channels": [16, 32, 64, 128]}')
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", default=None, help="Markdown file to write the results to")
    args = parser.parse_args()

    dataset = RandomImages(args.batch * (args.steps + args.warmup), args.size, args.classes)
    started = time.time()
    teacher, student = make_models(args)
    alone = time_training(args, dataset, None, student, None)
    teacher_forward = time_teacher_forward(args, dataset, teacher)
    teacher, student = make_models(args)
    kd = time_training(args, dataset, teacher, student, {"terms": [{"loss": "kd"}]})
    teacher, student = make_models(args)
    hint = {"terms": [{"loss": "kd"}, {"loss": "fitnet", "student": "layer3", "teacher": "layer3", "adapter": "conv1x1"}]}
    kd_fitnet = time_training(args, dataset, teacher, student, hint)

    rows = [
        ("A. student alone (train step)", alone, ""),
        ("B. teacher forward alone", teacher_forward, ""),
        ("C. KD (train step)", kd, f"{kd / (alone + teacher_forward):.2f}"),
        ("D. KD + FitNet hint, conv1x1 adapter", kd_fitnet, f"{kd_fitnet / (alone + teacher_forward):.2f}"),
    ]
    lines = [
        "# Teacher overhead",
        "",
        f"Machine: {machine(args.device)}. Device: {args.device}. Run time: {time.time() - started:.0f} s.",
        f"Command: `python benchmarks/teacher_overhead.py {' '.join(os.sys.argv[1:])}`",
        f"Teacher {args.teacher}, student {args.student} {args.student_kwargs}, batch {args.batch}, "
        f"{args.size}x{args.size} inputs, median of {args.steps} steps after {args.warmup} warm-up steps"
        + (", bf16" if args.bf16 else "") + ".",
        "",
        "| configuration | ms / step | ratio to A + B |",
        "|---|---:|---:|",
        *[f"| {name} | {seconds * 1000:.1f} | {ratio} |" for name, seconds, ratio in rows],
        "",
        "A ratio of 1.00 means distillation costs exactly the student's step plus the teacher's forward pass.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
