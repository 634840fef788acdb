#!/usr/bin/env python
"""What a distillation step costs in time and memory, live and from a teacher cache, for three model pairs.

For each pair, in one run on one machine, per optimisation step (median after warm-up steps):

  A. student-only step: ``DistillationTrainer`` with no teacher and no terms,
  B. teacher forward alone: the frozen teacher (eval mode, ``no_grad``) on the same batches,
  C. live KD step: ``DistillationTrainer`` with the teacher and one ``kd`` term,
  D. cached KD step: the same from ``hfdistill.cache.build_cache`` + ``TeacherCache`` (the cache is built
     first; its build time is reported apart),

and the ratios C / (A + B) (1.00: distilling costs exactly the student's step plus the teacher's forward)
and D / A (1.00: reading the cache costs nothing). On CUDA also

  E. the teacher ahead on a second stream: whether running the teacher's forward for the next batch on its own
     CUDA stream, while the student trains on this batch, brings a live step below the sequential floor
     (hand-written loops, in sequence and overlapped, the same work: :func:`overlap_loops`).

Memory, measured in the same phases: the peak above the phase's starting point, with every model of the
phase created inside it (so weights count). On a GPU: ``torch.cuda.max_memory_allocated`` (exact). On the
CPU: the process's resident set size sampled every 2 ms by a thread (psutil/``/proc``), after
returning freed heap to the OS (``malloc_trim``); resident memory includes the allocator's slack, so
differences below a few MB are noise. The live KD peak is compared with A's peak + B's peak (teacher
weights + one batch of no-grad activations), the cached peak with A's + the cache's size.

Leak check: live and cached KD on the small pair for ``--leak-steps`` steps; memory (RSS, or CUDA allocated)
at the end of every step; reports its growth from the first tenth to the last tenth of the run.

Pairs:
  cnn-small   timm resnet18 -> resnet10t, 1x32x32 inputs, 10 classes, batch 64 (the peers benchmark's pair)
  cnn-224     timm resnet50 -> resnet18, 3x224x224 inputs, 1000 classes, batch 8
  r34-224     timm resnet34 -> resnet18, 3x224x224 inputs, 1000 classes, batch 8 (the GPU measurement's pair: run
              it with --device cuda --bf16 and a GPU-sized --batch; not in the default pairs)
  bert        BERT-base (transformers BertConfig defaults, 12 layers) -> 4-layer BERT (same width), sequence
              classification (2 labels), random token ids of length 128, batch 8
All weights are random (no download); the timing does not depend on them.

    python benchmarks/step_overhead.py --out benchmarks/results/step_overhead_cpu.md
    python benchmarks/step_overhead.py --device cuda --out benchmarks/results/step_overhead_gpu.md
    python benchmarks/step_overhead.py --device cuda --bf16 --pairs r34-224 --batch 128 --leak-steps 0 \
        --out benchmarks/results/step_overhead_gpu_r34_bf16.md             # resnet34 -> resnet18, bf16, throughput
    python benchmarks/step_overhead.py --tiny --out /tmp/step.md        # seconds: shrunken models, a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import cpu_name, quiet  # noqa: E402  (the offline environment first)

import timm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import TrainerCallback, default_data_collator  # noqa: E402

from hfdistill import DistillationConfig, DistillationTrainer  # noqa: E402
from hfdistill.cache import TeacherCache, build_cache  # noqa: E402
from hfdistill.teacher import call_model, logits_of  # noqa: E402

KD = {"terms": [{"loss": "kd"}]}
MB = 2**20


# ------------------------------------------------------------------------------------ pairs and data
@dataclass
class Pair:
    """A teacher/student pair, its inputs and batch size (models are made fresh by the factories)."""

    name: str
    description: str
    teacher: Callable[[], nn.Module]
    student: Callable[[], nn.Module]
    dataset: Callable[[int], Dataset]  # n examples -> a map-style dataset of dicts
    batch: int


class RandomImages(Dataset):
    """Pre-tensorised random images and labels, so the data path costs nothing."""

    def __init__(self, n: int, channels: int, size: int, classes: int):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, channels, size, size, generator=generator)
        self.y = torch.randint(0, classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class RandomTokens(Dataset):
    """Random token ids of a fixed length (full attention masks) and labels."""

    def __init__(self, n: int, length: int, vocab: int, classes: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=generator)
        self.y = torch.randint(0, classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.y[i]}


def timm_factory(name: str, seed: int, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, **kwargs)

    return make


def bert_factory(seed: int, **config) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(seed)
        return BertForSequenceClassification(BertConfig(num_labels=2, **config))

    return make


def make_pairs(tiny: bool, batch: int | None = None) -> dict[str, Pair]:
    """The pairs; ``tiny`` shrinks inputs, batches and BERT's width so that each phase takes a moment; ``batch``
    replaces every pair's batch size."""
    if tiny:
        size224, batch224, cnn_batch = 64, 2, 8
        bert_teacher = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        bert_student = dict(bert_teacher, num_hidden_layers=1)
        length, bert_batch = 16, 2
    else:
        size224, batch224, cnn_batch = 224, 8, 64
        bert_teacher, bert_student = {}, dict(num_hidden_layers=4)
        length, bert_batch = 128, 8
    if batch is not None:
        batch224 = cnn_batch = bert_batch = batch
    vocab = 30522  # BertConfig's default
    return {
        "cnn-small": Pair("cnn-small", f"timm resnet18 -> resnet10t, 1x32x32, 10 classes, batch {cnn_batch}",
                          timm_factory("resnet18", 1, in_chans=1, num_classes=10),
                          timm_factory("resnet10t", 0, in_chans=1, num_classes=10),
                          lambda n: RandomImages(n, 1, 32, 10), cnn_batch),
        "cnn-224": Pair("cnn-224", f"timm resnet50 -> resnet18, 3x{size224}x{size224}, 1000 classes, batch {batch224}",
                        timm_factory("resnet50", 1, num_classes=1000), timm_factory("resnet18", 0, num_classes=1000),
                        lambda n: RandomImages(n, 3, size224, 1000), batch224),
        "r34-224": Pair("r34-224", f"timm resnet34 -> resnet18, 3x{size224}x{size224}, 1000 classes, batch {batch224}",
                        timm_factory("resnet34", 1, num_classes=1000), timm_factory("resnet18", 0, num_classes=1000),
                        lambda n: RandomImages(n, 3, size224, 1000), batch224),
        "bert": Pair("bert", f"BERT {'(tiny config) ' if tiny else 'base (12 layers) '}-> "
                             f"{bert_student.get('num_hidden_layers', 4)}-layer BERT, sequence length {length}, "
                             f"2 labels, batch {bert_batch}",
                     bert_factory(1, **bert_teacher), bert_factory(0, **bert_student),
                     lambda n: RandomTokens(n, length, vocab, 2), bert_batch),
    }


# ------------------------------------------------------------------------------------ measuring
def _malloc_trim() -> None:
    """Give freed heap back to the OS (glibc), so that resident memory starts each phase from what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    """The process's resident set size."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import psutil

        return psutil.Process().memory_info().rss


class MemoryProbe:
    """Peak memory above the starting point of a ``with`` block: CUDA allocator peak, or sampled RSS on the CPU."""

    def __init__(self, device: str, interval: float = 0.002):
        self.cuda = device.startswith("cuda")
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._highest = 0

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else resident_bytes()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._highest = max(self._highest, resident_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "MemoryProbe":
        gc.collect()
        _malloc_trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.start = self.current()
        self._highest = self.start
        if not self.cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self._thread.join()
            self._highest = max(self._highest, resident_bytes())
            self.peak_bytes = self._highest - self.start


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of each optimisation step (``on_step_begin`` to ``on_step_end``), and memory after it."""

    def __init__(self, device: str, probe: MemoryProbe | None = None):
        self.device = device
        self.probe = probe
        self.times: list[float] = []
        self.memory: list[int] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)
        if self.probe is not None:
            self.memory.append(self.probe.current())


@dataclass
class Phase:
    """One measured phase: median step time and peak memory above its start."""

    step_s: float
    peak_bytes: int
    extra: dict = field(default_factory=dict)


def config(args: argparse.Namespace, output_dir: str, steps: int, batch: int) -> DistillationConfig:
    """Training arguments of every trainer here: fixed steps, nothing saved, logged or evaluated."""
    return DistillationConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=args.device == "cpu", dataloader_num_workers=0, dataloader_pin_memory=False, evaluate_teacher=False,
        seed=0, max_grad_norm=0.0, bf16=args.bf16, teacher_dtype="bfloat16" if args.bf16 else "auto",
    )


def train_steps(args: argparse.Namespace, pair: Pair, dataset: Dataset, teacher, recipe: dict | None,
                steps: int, probe: MemoryProbe | None = None) -> StepTimer:
    """Train a fresh student for ``steps`` steps with ``teacher`` (a model, a cache or None) and ``recipe``."""
    timer = StepTimer(args.device, probe)
    with tempfile.TemporaryDirectory() as out:
        trainer = DistillationTrainer(model=pair.student(), teacher=teacher, recipe=recipe,
                                      args=config(args, out, steps, pair.batch), train_dataset=dataset,
                                      callbacks=[timer])
        trainer.train()
    return timer


def weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def student_phase(args: argparse.Namespace, pair: Pair, dataset: Dataset) -> tuple[list[float], int]:
    """A. The student trained alone: its timed steps and the phase's peak memory."""
    with MemoryProbe(args.device) as probe:
        timer = train_steps(args, pair, dataset, None, None, args.warmup + args.steps)
    return timer.times[args.warmup:], probe.peak_bytes


def step_batch(pair: Pair, dataset: Dataset, step: int) -> dict:
    """The batch a trainer reads at ``step`` (the dataset in order, cycled), collated."""
    start = (step * pair.batch) % len(dataset)
    return default_data_collator([dataset[i % len(dataset)] for i in range(start, start + pair.batch)])


def teacher_phase(args: argparse.Namespace, pair: Pair, dataset: Dataset) -> tuple[list[float], int]:
    """B. The teacher's forward alone (eval mode, no_grad) on the batches the trainers read."""
    dtype = torch.bfloat16 if args.bf16 else None
    times = []
    with MemoryProbe(args.device) as probe:
        teacher = pair.teacher().to(args.device, dtype).eval()
        for step in range(args.warmup + args.steps):
            batch = {k: v.to(args.device) for k, v in step_batch(pair, dataset, step).items() if k != "labels"}
            synchronize(args.device)
            begin = time.perf_counter()
            with torch.no_grad():
                call_model(teacher, batch)
            synchronize(args.device)
            times.append(time.perf_counter() - begin)
        del teacher
    return times[args.warmup:], probe.peak_bytes


def live_phase(args: argparse.Namespace, pair: Pair, dataset: Dataset) -> tuple[list[float], int]:
    """C. KD with the live teacher (created inside the phase: its weights count)."""
    with MemoryProbe(args.device) as probe:
        timer = train_steps(args, pair, dataset, pair.teacher(), KD, args.warmup + args.steps)
    return timer.times[args.warmup:], probe.peak_bytes


def make_cache(args: argparse.Namespace, pair: Pair, dataset: Dataset, folder: str) -> tuple[str, float, int]:
    """The teacher's outputs over ``dataset`` (what KD reads: logits); returns folder, build seconds, size."""
    teacher = pair.teacher()
    started = time.perf_counter()
    path = build_cache(teacher, dataset, KD, folder, batch_size=pair.batch, device=args.device, progress=False,
                       teacher_dtype="bfloat16" if args.bf16 else "auto")
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return path, seconds, size


def cached_phase(args: argparse.Namespace, pair: Pair, dataset: Dataset, cache: str) -> tuple[list[float], int]:
    """D. KD from the cache of the teacher's outputs (opened inside the phase: its shards count)."""
    # The cache compares the inputs' checksums on its first batches (16 by default): in the warm-up steps here,
    # so that the timed steps are the steady state.
    with MemoryProbe(args.device) as probe:
        timer = train_steps(args, pair, dataset, TeacherCache(cache, check_batches=args.warmup), KD,
                            args.warmup + args.steps)
    return timer.times[args.warmup:], probe.peak_bytes


def overlap_loops(args: argparse.Namespace, pair: Pair, dataset: Dataset) -> dict[str, tuple[float, nn.Module]]:
    """E. Does the teacher's forward for the next batch, on a second CUDA stream while the student trains on this
    one, bring a live step below the sequential floor?

    Two hand-written loops doing the same work from the same student (teacher forward under inference mode,
    student forward, 0.5 x cross-entropy + 0.5 x T^2 KL at T = 4, backward, AdamW): ``sequential``, and
    ``overlapped``, which launches the teacher on batch i + 1 on a side stream before the student's step on
    batch i. Seconds per step of each (timed over all steps together: a synchronisation per step would end the
    overlap) and the trained student. Off CUDA there is no second stream and both run in sequence: the code is
    exercised (both students must come out equal), the question is not measured."""
    from hfdistill.losses.logits import soft_kl

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    teacher = pair.teacher().to(device, torch.bfloat16 if args.bf16 else None).eval().requires_grad_(False)
    batches = []
    for step in range(args.warmup + args.steps):  # on the device before timing: no copy in the loops
        batches.append({k: v.to(device) for k, v in step_batch(pair, dataset, step).items()})
    side = torch.cuda.Stream(device) if cuda else None

    def on_side():
        return torch.cuda.stream(side) if cuda else contextlib.nullcontext()

    def teacher_logits(batch: dict) -> torch.Tensor:
        with torch.inference_mode():
            logits = logits_of(call_model(teacher, batch)).float()
        return logits.clone()  # an ordinary tensor, as hfdistill's Teacher hands over

    def run(overlapped: bool) -> tuple[float, nn.Module]:
        student = pair.student().to(device).train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=cuda or None)

        def student_step(batch: dict, target: torch.Tensor) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = logits_of(call_model(student, batch)).float()
            loss = (0.5 * torch.nn.functional.cross_entropy(logits, batch["labels"])
                    + 0.5 * 16 * soft_kl(logits, target, 4.0))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def loop(steps: list[dict]) -> None:
            if not overlapped:
                for batch in steps:
                    student_step(batch, teacher_logits(batch))
                return
            main = torch.cuda.current_stream(device) if cuda else None
            with on_side():
                ahead = teacher_logits(steps[0])
            for i, batch in enumerate(steps):
                if cuda:
                    main.wait_stream(side)  # this batch's teacher logits are ready
                    ahead.record_stream(main)  # made on the side stream, freed on the main one
                target = ahead
                if i + 1 < len(steps):
                    with on_side():
                        ahead = teacher_logits(steps[i + 1])  # runs while the student's step below does
                student_step(batch, target)

        loop(batches[:args.warmup] or batches[:1])
        synchronize(args.device)
        begin = time.perf_counter()
        loop(batches[args.warmup:])
        synchronize(args.device)
        return (time.perf_counter() - begin) / max(1, len(batches) - args.warmup), student

    return {"sequential": run(False), "overlapped": run(True)}


def combine(runs: list[tuple[list[float], int]]) -> Phase:
    """Rounds of one phase: the median of all their timed steps, the median of their peaks."""
    return Phase(statistics.median([t for times, _ in runs for t in times]),
                 int(statistics.median(peak for _, peak in runs)))


@dataclass
class PairResult:
    pair: str
    description: str
    student: Phase
    teacher: Phase
    live: Phase
    cached: Phase
    cache_build_s: float
    cache_bytes: int
    round_ratios: list[tuple[float, float]]  # (C / (A + B), D / A) of each round's medians: the spread
    batch: int
    overlap: tuple[float, float] | None = None  # E (CUDA only): seconds per step, in sequence and overlapped


def measure_pair(args: argparse.Namespace, pair: Pair) -> PairResult:
    """A, B, C and D for one pair on the same batches, in ``--rounds`` interleaved rounds (A B C D A B C D ...)."""
    dataset = pair.dataset(pair.batch * (args.warmup + args.steps))
    runs: dict[str, list] = {"student": [], "teacher": [], "live": [], "cached": []}
    overlaps = []
    with tempfile.TemporaryDirectory() as folder:
        cache, build_s, cache_bytes = make_cache(args, pair, dataset, os.path.join(folder, "cache"))
        for _ in range(args.rounds):
            runs["student"].append(student_phase(args, pair, dataset))
            runs["teacher"].append(teacher_phase(args, pair, dataset))
            runs["live"].append(live_phase(args, pair, dataset))
            runs["cached"].append(cached_phase(args, pair, dataset, cache))
            if args.device.startswith("cuda"):
                loops = overlap_loops(args, pair, dataset)
                overlaps.append((loops["sequential"][0], loops["overlapped"][0]))
    phases = {name: combine(found) for name, found in runs.items()}
    medians = {name: [statistics.median(times) for times, _ in found] for name, found in runs.items()}
    round_ratios = [(c / (a + b), d / a) for a, b, c, d in
                    zip(medians["student"], medians["teacher"], medians["live"], medians["cached"])]
    with torch.device("meta"):
        phases["teacher"].extra["weights_bytes"] = weights_bytes(pair.teacher())
    result = PairResult(pair.name, pair.description, phases["student"], phases["teacher"], phases["live"],
                        phases["cached"], build_s, cache_bytes, round_ratios, pair.batch,
                        tuple(statistics.median(x) for x in zip(*overlaps)) if overlaps else None)
    log(f"{pair.name}: student {result.student.step_s * 1e3:.1f} ms, teacher {result.teacher.step_s * 1e3:.1f} ms, "
        f"live KD {result.live.step_s * 1e3:.1f} ms, cached KD {result.cached.step_s * 1e3:.1f} ms")
    return result


@dataclass
class LeakResult:
    run: str
    steps: int
    start_bytes: float
    end_bytes: float
    growth_bytes: float
    per_1000_bytes: float
    flat: bool


def leak_check(args: argparse.Namespace, pair: Pair, name: str, teacher_of: Callable[[Dataset], object]) -> LeakResult:
    """Memory at the end of every step over ``--leak-steps`` steps; flat when it grows less than a threshold.

    The threshold is 16 MB on the CPU (resident memory moves by a few MB with the allocator) and 1 MB on a GPU
    (allocated bytes are exact); both are far below what keeping one batch's activations per step would add.
    """
    dataset = pair.dataset(pair.batch * 8)  # 8 batches, cycled: every 8 steps a new epoch and a new loader iterator
    teacher = teacher_of(dataset)
    probe = MemoryProbe(args.device)
    timer = train_steps(args, pair, dataset, teacher, KD, args.leak_steps, probe)
    memory = timer.memory
    window = max(1, len(memory) // 10)
    start = statistics.median(memory[window:2 * window] or memory[:window])
    end = statistics.median(memory[-window:])
    distance = max(1, len(memory) - 2.5 * window)  # between the centres of the two windows
    threshold = (1 if probe.cuda else 16) * MB
    return LeakResult(name, len(memory), start, end, end - start, (end - start) / distance * 1000,
                      end - start < threshold)


# ------------------------------------------------------------------------------------ report
def log(text: str) -> None:
    print(text, flush=True)


def machine(device: str) -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "no GPU used"
    return (f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; {gpu}; python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"timm {timm.__version__}")


def mb(value: float) -> str:
    return f"{value / MB:.2f}" if abs(value) < 10 * MB else f"{value / MB:.1f}"


def report(results: list[PairResult], leaks: list[LeakResult], args: argparse.Namespace, command: str,
           started: float) -> str:
    memory_kind = ("`torch.cuda.max_memory_allocated` above the phase's start" if args.device.startswith("cuda")
                   else "peak resident memory (RSS, sampled every 2 ms) above the phase's start")
    lines = [
        "# Step overhead: distillation steps against their parts, live and cached",
        "",
        f"Machine: {machine(args.device)}. Device: {args.device}" + (", bf16" if args.bf16 else "") + ".",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}. Run time: "
        f"{time.perf_counter() - started:.0f} s.",
        f"Command: `{command}`",
        "",
    ]
    if args.tiny:
        lines += ["**Tiny run (`--tiny`): shrunken models and inputs, a smoke test; the numbers mean nothing.**", ""]
    lines += [
        f"## Time per optimisation step (ms; median over {args.rounds} interleaved round(s) of {args.steps} steps, "
        f"each phase after {args.warmup} warm-up steps)",
        "",
        "| pair | A. student alone | B. teacher forward | C. live KD | D. cached KD | C / (A + B) | D / A | "
        "per round: C / (A + B), D / A | examples / s: A, C, D | cache build s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        a, b, c, d = r.student.step_s, r.teacher.step_s, r.live.step_s, r.cached.step_s
        spread = "; ".join(f"{live:.2f}, {cached:.2f}" for live, cached in r.round_ratios)
        throughput = ", ".join(f"{r.batch / t:.1f}" for t in (a, c, d))
        lines.append(f"| {r.pair}: {r.description} | {a * 1e3:.1f} | {b * 1e3:.1f} | {c * 1e3:.1f} | {d * 1e3:.1f} | "
                     f"{c / (a + b):.2f} | {d / a:.2f} | {spread} | {throughput} | {r.cache_build_s:.1f} |")
    lines += [
        "",
        "C / (A + B) = 1.00: a live distillation step costs the student's step plus the teacher's forward, nothing "
        "more. D / A = 1.00: training from the cache costs what training alone does. Examples per second: the "
        "student trained alone, with the live teacher and from the cache (batch / median step). The per-round "
        "ratios (of each round's medians) show the machine's noise. The cache compares its inputs' checksums on "
        "its first batches (16 in a user's run); here on the warm-up batches, so that the timed steps are the "
        "steady state.",
        "",
        "## E. The teacher's next batch on a second CUDA stream (ms per step; hand-written loops, the same work)",
        "",
    ]
    if any(r.overlap for r in results):
        lines += ["| pair | in sequence | teacher on batch i + 1 overlapped with the student's step on batch i | "
                  "overlapped / in sequence |", "|---|---:|---:|---:|"]
        lines += [f"| {r.pair} | {r.overlap[0] * 1e3:.1f} | {r.overlap[1] * 1e3:.1f} | {r.overlap[1] / r.overlap[0]:.2f} |"
                  for r in results if r.overlap]
        lines += ["", "Below 1.00: running the teacher ahead on its own stream hides part of its forward behind the "
                  "student's step (the GPU had room for both); 1.00: it had none.", ""]
    else:
        lines += ["Not measured: no CUDA device here (it needs a second CUDA stream; run with `--device cuda`).", ""]
    lines += [
        f"## Peak memory of a step (MB; {memory_kind}, the phase's models created inside it; median over rounds)",
        "",
        "| pair | A. student alone | teacher weights | B. teacher forward (weights + activations) | C. live KD | "
        "C / (A + B) | cache size | D. cached KD | D / (A + cache) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        a, b, c, d = r.student.peak_bytes, r.teacher.peak_bytes, r.live.peak_bytes, r.cached.peak_bytes
        lines.append(f"| {r.pair} | {mb(a)} | {mb(r.teacher.extra['weights_bytes'])} | {mb(b)} | {mb(c)} | "
                     f"{c / max(a + b, 1):.2f} | {mb(r.cache_bytes)} | {mb(d)} | {d / max(a + r.cache_bytes, 1):.2f} |")
    lines += [
        "",
        "C / (A + B) at or below 1.00 means the live teacher adds no more than its weights and one batch of no-grad "
        "activations (no graph kept, no second copy); above 1.00 (beyond the noise of a few MB) means it adds more. "
        "Below 1.00 is expected: the student's and the teacher's peaks do not coincide.",
        "",
    ]
    if leaks:
        threshold = ("1 MB (allocated bytes are exact)" if args.device.startswith("cuda")
                     else "16 MB (resident memory moves by a few MB with the allocator)")
        lines += [
            f"## Leak check ({'CUDA allocated' if args.device.startswith('cuda') else 'RSS'} at the end of each step)",
            "",
            "| run | steps | MB at 10-20 % of the run | MB over the last 10 % | growth MB | MB per 1000 steps | flat |",
            "|---|---:|---:|---:|---:|---:|---|",
            *[f"| {x.run} | {x.steps} | {mb(x.start_bytes)} | {mb(x.end_bytes)} | {mb(x.growth_bytes)} | "
              f"{mb(x.per_1000_bytes)} | {'yes' if x.flat else 'NO'} |" for x in leaks],
            "",
            f"Flat: grew less than {threshold} between the two windows. The data is 8 batches, cycled, so the run "
            "crosses many epochs (new loader iterators each time).",
            "",
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--pairs", nargs="+", default=["cnn-small", "cnn-224", "bert"],
                        choices=["cnn-small", "cnn-224", "r34-224", "bert"])
    parser.add_argument("--batch", type=int, default=None, help="every pair's batch size (default: each pair's own)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the four phases per pair")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per phase and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each phase")
    parser.add_argument("--leak-steps", type=int, default=1000, help="steps of each leak-check run (0: no leak check)")
    parser.add_argument("--bf16", action="store_true", help="student in bf16 autocast, teacher in bf16")
    parser.add_argument("--tiny", action="store_true", help="shrunken models, 2 steps, 10 leak steps: seconds")
    parser.add_argument("--out", default=None, help="markdown file for the results (a .json beside it)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rounds, args.steps, args.warmup, args.leak_steps = 1, 2, 1, min(args.leak_steps, 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no GPU is available here", file=sys.stderr)
        return 2
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else list(argv)))
    with quiet():
        return benchmark(args, command)


def benchmark(args: argparse.Namespace, command: str) -> int:
    """Everything measured, the report printed and written."""
    started = time.perf_counter()
    pairs = make_pairs(args.tiny, args.batch)
    results = [measure_pair(args, pairs[name]) for name in args.pairs]
    leaks = []
    if args.leak_steps > 0:
        small = pairs["cnn-small"]
        leaks.append(leak_check(args, small, "cnn-small, live KD", lambda dataset: small.teacher()))
        with tempfile.TemporaryDirectory() as folder:
            def cached(dataset: Dataset) -> TeacherCache:
                return TeacherCache(make_cache(args, small, dataset, os.path.join(folder, "cache"))[0])

            leaks.append(leak_check(args, small, "cnn-small, cached KD", cached))
        for x in leaks:
            log(f"{x.run}: {mb(x.start_bytes)} -> {mb(x.end_bytes)} MB over {x.steps} steps")
    text = report(results, leaks, args, command, started)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        raw = {"command": command, "machine": machine(args.device), "pairs": [asdict(r) for r in results],
               "leaks": [asdict(x) for x in leaks]}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
