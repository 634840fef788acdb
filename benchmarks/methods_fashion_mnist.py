#!/usr/bin/env python
"""Every single-stage distillation method that applies to a CNN pair, on Fashion-MNIST.

Teacher: timm ``resnet18`` (1 input channel, 10 classes, 11.2M parameters), trained from scratch once
and cached. Student: the same architecture with ``channels=[16, 32, 64, 128]`` (0.71M parameters, same
module names ``layer1..layer4``, narrower, so feature methods need adapters). Inputs are the native
28x28 images (no resizing). Every row uses the same teacher, the same student initialisation (seeded),
the same data (a fixed, seeded subset of the 60k training images), the same schedule and the same
seeds; the student is evaluated on the full 10k test set.

Each method is trained as a typical recipe: its term(s) with the taps, adapter, parameters and weights
that the paper or the reference implementations (RepDistiller, mdistiller, Knowledge-Distillation-Zoo)
use for CNNs, plus the task cross-entropy with the weight they use. ``METHODS`` below is the single
source of those settings; ``recipes/fashion_mnist/*.yaml`` holds the same terms for the CLI (a test
checks that they agree).

    python benchmarks/methods_fashion_mnist.py                      # the committed results (~40 min, 2 CPU cores)
    python benchmarks/methods_fashion_mnist.py --methods kd at --seeds 1
    python benchmarks/methods_fashion_mnist.py --dry-run            # every method for a few steps (~3 min)

Results go to ``--out`` (markdown) and a ``.jsonl`` of the runs next to it, rewritten after every run,
so partial results survive an interruption; ``--resume`` skips runs already in the ``.jsonl`` with the
same settings. The teacher is cached in ``--cache-dir`` and reused when present.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hfdistill.cli import accuracy  # noqa: E402

TASK = "image-classification"
IMAGE_SIZE = 28
# Three input channels (the grey image repeated): pipeline() feeds RGB images to the saved student.
TEACHER_KWARGS: dict = {}
STUDENT_KWARGS = {"channels": [16, 32, 64, 128]}
MODEL_NAME = "timm:resnet18"
FIRST_SEED = 42
DATA_SEED = 42

# Methods that read transformer-only outputs (hidden states, attention maps, a distillation token).
TRANSFORMER_ONLY = {
    "hidden_mse": "TinyBERT hidden-state MSE with a layer map: reads transformer hidden states",
    "attention_kl": "MiniLM attention-distribution KL: reads self-attention maps",
    "attention_mse": "TinyBERT attention MSE: reads self-attention maps",
    "embedding_mse": "TinyBERT embedding-layer MSE: reads the embedding output",
    "minilm_value_relation": "MiniLM value relation: reads self-attention values",
    "deit": "DeiT hard/soft distillation: needs a ViT student with a distillation token",
}
# Registered names that are another name of a method benchmarked under its main name.
ALIASES = {"mse": "fitnet", "chsim": "cwd", "reviewkd": "kr"}
NOT_IMPLEMENTED = {
    "crd": "Contrastive Representation Distillation (Tian et al., ICLR 2020) is not implemented yet "
    "(it is in the contrastive family, a later issue), so it has no row",
}
# 3 seeds for these (issue 5), 1 for the rest.
MAIN_METHODS = ("baseline", "kd", "dkd", "fitnet", "at")


def warmup_epochs(epochs: float) -> float:
    """mdistiller ramps DKD and ReviewKD over 20 of 240 CIFAR epochs; keep that fraction of our schedule."""
    return round(epochs * 20 / 240, 2)


def methods(epochs: float) -> dict[str, dict]:
    """The term set of every method: ``terms`` and ``task_weight`` as in a recipe, plus where they come from.

    ``teacher``: "teacher" (the ResNet-18), "self" (a pre-trained copy of the student: Tf-KD's self
    teacher) or "virtual" (Tf-KD's hand-made teacher; the loss ignores the teacher model's outputs).
    """
    warm = warmup_epochs(epochs)
    ofd_layers = ["layer1", "layer2", "layer3", "layer4"]
    fsp_pairs = [("layer1", 64 * 64), ("layer2", 64 * 128), ("layer3", 128 * 256)]  # teacher C1 x C2 per pair
    return {
        "baseline": dict(
            task_weight=1.0, terms=[], teacher=None,
            source="the student alone: cross-entropy on the labels",
        ),
        # ---------------------------------------------------------------- logits
        "kd": dict(
            task_weight=0.1, terms=[{"loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}}],
            source="Hinton et al. 2015; RepDistiller/mdistiller CIFAR-100: 0.1 CE + 0.9 KD, T=4",
        ),
        "dkd": dict(
            task_weight=1.0,
            terms=[{"loss": "dkd", "weight": 1.0,
                    "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": warm}}],
            source=f"Zhao et al. 2022; mdistiller CIFAR-100: CE 1, alpha 1, beta 8, T 4, warm-up 20 of 240 epochs "
            f"(here {warm} of {epochs:g})",
        ),
        "dist": dict(
            task_weight=1.0,
            terms=[{"loss": "dist", "weight": 1.0, "params": {"beta": 2.0, "gamma": 2.0, "temperature": 4.0}}],
            source="Huang et al. 2022, CIFAR-100 setting as we read the paper: CE 1, beta = gamma = 2, tau 4",
        ),
        "logit_std_kd": dict(
            task_weight=0.1, terms=[{"loss": "logit_std_kd", "weight": 9.0, "params": {"temperature": 2.0}}],
            source="Sun et al. 2024, CIFAR-100 KD+ls: lambda_CE 0.1, lambda_KD 9, base temperature 2",
        ),
        "logits_mse": dict(
            task_weight=1.0, terms=[{"loss": "logits_mse", "weight": 0.1}],
            source="Ba & Caruana 2014 (logit regression); Knowledge-Distillation-Zoo: CE 1 + 0.1 MSE",
        ),
        "tf_kd_self": dict(
            task_weight=0.05,
            terms=[{"loss": "tf_kd", "weight": 0.95, "params": {"mode": "self", "temperature": 20.0}}],
            teacher="self",
            source="Yuan et al. 2020, Tf-KD_self: the teacher is the pre-trained student (the baseline, seed 42); "
            "authors' CIFAR-100 alpha 0.95, T 20",
        ),
        "tf_kd_virtual": dict(
            task_weight=0.9,
            terms=[{"loss": "tf_kd", "weight": 0.1, "params": {"mode": "virtual", "temperature": 20.0, "a": 0.99}}],
            teacher="virtual",
            source="Yuan et al. 2020, Tf-KD_reg (virtual teacher, no trained teacher used): alpha 0.1, T 20, a 0.99",
        ),
        # -------------------------------------------------------------- features
        "fitnet": dict(
            task_weight=1.0,
            terms=[{"loss": "fitnet", "weight": 100.0, "student": "layer2", "teacher": "layer2", "adapter": "conv_reg"}],
            source="Romero et al. 2015; RepDistiller/mdistiller CIFAR-100: hint at the middle stage (layer2) "
            "through a conv regressor, weight 100, CE 1",
        ),
        "at": dict(
            task_weight=1.0,
            terms=[{"loss": "at", "weight": 1.0, "student": ["layer1", "layer2", "layer3"],
                    "teacher": ["layer1", "layer2", "layer3"], "params": {"p": 2.0, "beta": 2000.0}}],
            source="Zagoruyko & Komodakis 2017; RepDistiller/mdistiller CIFAR-100: layers 1-3, p 2, weight 1000 "
            "on the mean without the 1/2 (= beta 2000 here), CE 1",
        ),
        "nst": dict(
            task_weight=1.0,
            terms=[{"loss": "nst", "name": f"nst_{layer}", "weight": 50.0, "student": layer, "teacher": layer}
                   for layer in ("layer1", "layer2", "layer3")],
            source="Huang & Wang 2017 (polynomial kernel d 2, c 0); RepDistiller CIFAR-100: every middle stage, "
            "weight 50 each, CE 1",
        ),
        "ft": dict(
            task_weight=1.0,
            terms=[{"loss": "ft", "weight": 200.0, "student": "layer4", "teacher": "layer4", "params": {"p": 1.0}}],
            source="Kim et al. 2018; RepDistiller CIFAR-100 weight 200 on the last stage, CE 1; the teacher factor "
            "is the raw layer4 feature (the paraphraser stage is issue 5 part 2)",
        ),
        "ofd": dict(
            task_weight=1.0,
            terms=[{"loss": "ofd", "name": f"ofd_{layer}", "weight": 1e-3 / 2 ** (len(ofd_layers) - i - 1),
                    "student": f"{layer}.-1.act2:input", "teacher": f"{layer}.-1.act2:input"}
                   for i, layer in enumerate(ofd_layers)],
            source="Heo et al. 2019; authors/mdistiller CIFAR: pre-ReLU ends of every stage, 1e-3 x 1/2^(n-i-1), "
            "CE 1; margin estimated from the teacher's negative responses (the loss's default)",
        ),
        "afd": dict(
            task_weight=1.0,
            terms=[{"loss": "afd", "weight": 200.0, "student": ["layer1", "layer2", "layer3"],
                    "teacher": ["layer1", "layer2", "layer3"], "params": {"qk_dim": 128}}],
            source="Ji et al. 2021; authors' CIFAR-100: weight 200, qk_dim 128, CE 1 (stages 1-3: layer4 is 1x1 here)",
        ),
        "kr": dict(
            task_weight=1.0,
            terms=[{"loss": "kr", "weight": 1.0,
                    "student": ["layer1", "layer2", "layer3", "layer4", "features"],
                    "teacher": ["layer1", "layer2", "layer3", "layer4", "features"],
                    "params": {"warmup_epochs": warm}}],
            source=f"Chen et al. 2021 (ReviewKD); mdistiller CIFAR-100: all stages plus the pooled feature, "
            f"weight 1, CE 1, warm-up 20 of 240 epochs (here {warm})",
        ),
        "srd": dict(
            task_weight=1.0,
            terms=[{"loss": "srd", "weight": 2.0, "student": "features", "teacher": "features"},
                   {"loss": "kd", "weight": 1.0, "params": {"temperature": 1.0}}],
            source="Miles & Mikolajczyk 2024; authors' ResNet code: projector + BN on pooled features, weight 2, "
            "with KD (T 1, weight 1) and CE 1",
        ),
        "ickd": dict(
            task_weight=1.0,
            terms=[{"loss": "ickd", "weight": 2.5, "student": "layer4", "teacher": "layer4"}],
            source="Liu et al. 2021; last stage before pooling, CE 1; weight 2.5 is our reading of the authors' "
            "CIFAR scripts (not verified offline)",
        ),
        "cwd": dict(
            task_weight=1.0,
            terms=[{"loss": "cwd", "weight": 3.0, "student": "layer3", "teacher": "layer3", "adapter": "conv1x1",
                    "params": {"temperature": 4.0}}],
            source="Shu et al. 2021 (a dense-prediction method; its segmentation setting tau 4, weight 3) on "
            "layer3 (2x2 maps here) through a 1x1 conv adapter, CE 1",
        ),
        "cosine": dict(
            task_weight=1.0,
            terms=[{"loss": "cosine", "weight": 1.0, "student": "features", "teacher": "features", "adapter": "linear"}],
            source="Sanh et al. 2019 (DistilBERT's cosine term, weight 1) on the pooled features through a linear "
            "adapter, CE 1",
        ),
        # ------------------------------------------------------------- relations
        "rkd": dict(
            task_weight=1.0,
            terms=[{"loss": "rkd", "weight": 1.0, "student": "features", "teacher": "features",
                    "params": {"distance_weight": 25.0, "angle_weight": 50.0}}],
            source="Park et al. 2019; RepDistiller CIFAR-100: pooled features, distance 25, angle 50, weight 1, CE 1",
        ),
        "pkt": dict(
            task_weight=1.0,
            terms=[{"loss": "pkt", "weight": 30000.0, "student": "features", "teacher": "features"}],
            source="Passalis & Tefas 2018; RepDistiller CIFAR-100: pooled features, weight 30000, CE 1",
        ),
        "sp": dict(
            task_weight=1.0,
            terms=[{"loss": "sp", "weight": 3000.0, "student": "layer4", "teacher": "layer4"}],
            source="Tung & Mori 2019; RepDistiller CIFAR-100: last stage, weight 3000, CE 1",
        ),
        "vid": dict(
            task_weight=1.0,
            terms=[{"loss": "vid", "name": f"vid_{layer}", "weight": 1.0, "student": layer, "teacher": layer,
                    "params": {"init_pred_var": 5.0}}
                   for layer in ("layer1", "layer2", "layer3")],
            source="Ahn et al. 2019; RepDistiller CIFAR-100: every middle stage, weight 1 each, CE 1",
        ),
        "cc": dict(
            task_weight=1.0,
            terms=[{"loss": "cc", "weight": 100.0, "student": "features", "teacher": "features",
                    "params": {"gamma": 0.4, "p_order": 2, "embed_dim": None}}],
            source="Peng et al. 2019 (Gaussian RBF, 2nd-order Taylor, gamma 0.4); Knowledge-Distillation-Zoo: "
            "pooled features without embedding heads, weight 100, CE 1",
        ),
        "irg": dict(
            task_weight=1.0,
            terms=[{"loss": "irg", "weight": 1.0, "student": ["layer3", "features", "logits"],
                    "teacher": ["layer3", "features", "logits"],
                    "params": {"vertex_weight": 0.1, "edge_weight": 5.0, "transform_weight": 0.0}}],
            source="Liu et al. 2019; Knowledge-Distillation-Zoo weights (vertex 0.1, edge 5), weight 1, CE 1; "
            "transformation term off: no two taps of this pair have equal widths",
        ),
        "fsp": dict(
            task_weight=1.0,
            terms=[{"loss": "fsp", "name": f"fsp_{layer}", "weight": round(50.0 / size, 6),
                    "student": [f"{layer}:input", layer], "teacher": [f"{layer}:input", layer], "adapter": "conv1x1"}
                   for layer, size in fsp_pairs],
            source="Yim et al. 2017, single stage (the pre-training stage is part 2); RepDistiller CIFAR: stage "
            "input/output pairs, weight 50 on the mean over C1*C2 entries (= 50/(C1*C2) on our sum), CE 1; "
            "1x1 conv adapters map the student's widths to the teacher's",
        ),
    }


# ------------------------------------------------------------------------------------ helpers
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm
    import transformers

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)",
    }


def make_args(output_dir: str, settings: dict, seed: int, epochs: float, max_grad_norm: float):
    from hfdistill import DistillationConfig

    extra = {"max_steps": settings["max_steps"]} if settings.get("max_steps") else {}
    return DistillationConfig(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=512,
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=settings["lr"],
        weight_decay=settings["weight_decay"],
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="cosine",
        logging_steps=20,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        evaluate_teacher=False,
        seed=seed,
        **extra,
    )


class Bench:
    def __init__(self, args: argparse.Namespace):
        from hfdistill.data import load_raw_data
        from hfdistill.recipe import DataSpec

        self.args = args
        self.settings = {
            "train_samples": args.train_samples,
            "eval_samples": args.eval_samples,
            "epochs": args.epochs,
            "teacher_epochs": args.teacher_epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "max_steps": args.max_steps,
            "max_grad_norm": args.max_grad_norm,
            "teacher_max_grad_norm": args.teacher_max_grad_norm,
            "image_size": IMAGE_SIZE,
            "data_seed": DATA_SEED,
        }
        spec = DataSpec(name="fashion-mnist", image_size=IMAGE_SIZE, max_train_samples=args.train_samples,
                        max_eval_samples=args.eval_samples)
        self.raw = load_raw_data(spec, TASK, seed=DATA_SEED)
        self.id2label = dict(enumerate(self.raw.label_names))
        self.workdir = tempfile.mkdtemp(prefix="hfdistill-bench-")
        self.cache = Path(args.cache_dir)
        self._data = None

    # ---- models and data ----
    def load(self, name: str, role: str, kwargs: dict | None = None, seed: int = FIRST_SEED):
        from hfdistill.models import load_model
        from hfdistill.recipe import ModelSpec
        from transformers import set_seed

        set_seed(seed)
        spec = ModelSpec(name=name, pretrained=False, kwargs=dict(kwargs or {})) if name.startswith("timm:") else ModelSpec(name=name)
        return load_model(spec, role, TASK, self.raw.num_labels, self.id2label, image_size=IMAGE_SIZE)

    def data(self, student):
        from hfdistill.data import build_task_data

        if self._data is None:  # the same uint8 tensors and transforms for every run (all inputs are 1x28x28)
            self._data = build_task_data(self.raw, TASK, student)
        return self._data

    def train_plain(self, loaded, seed: int, epochs: float, folder: str | None, max_grad_norm: float):
        """Train a model alone (cross-entropy); returns (trainer, test accuracy, train seconds)."""
        from hfdistill import DistillationTrainer

        data = self.data(loaded)
        trainer = DistillationTrainer(
            model=loaded.model, args=make_args(os.path.join(self.workdir, "plain"), self.settings, seed, epochs, max_grad_norm),
            train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
            compute_metrics=accuracy, id2label=self.id2label, timm_model_args=loaded.timm_model_args,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate()
        if folder is not None:
            trainer.save_model(folder)
            Path(folder, "benchmark_metrics.json").write_text(json.dumps(
                {"eval_accuracy": metrics["eval_accuracy"], "train_seconds": seconds, "settings": self.settings}, indent=2))
        return trainer, metrics["eval_accuracy"], seconds

    def cached_model(self, folder: Path, what: str, name: str, kwargs: dict, epochs: float, max_grad_norm: float):
        """Load a model trained alone from ``folder``, or train it there first. Returns (LoadedModel, accuracy, seconds)."""
        marker = folder / "benchmark_metrics.json"
        if marker.is_file():
            info = json.loads(marker.read_text())
            if info.get("settings") != self.settings:
                log(f"note: {folder} was trained with other settings ({info.get('settings')}); reusing it anyway")
            log(f"{what}: reusing {folder} (test accuracy {info['eval_accuracy']:.4f})")
            return self.load(str(folder), "teacher"), info["eval_accuracy"], info.get("train_seconds")
        log(f"{what}: training {name} {kwargs} for {epochs:g} epochs -> {folder}")
        loaded = self.load(name, "student", kwargs, seed=FIRST_SEED)
        _, acc, seconds = self.train_plain(loaded, FIRST_SEED, epochs, str(folder), max_grad_norm)
        log(f"{what}: test accuracy {acc:.4f}, {seconds:.0f} s")
        return self.load(str(folder), "teacher"), acc, seconds

    def teacher(self):
        if not hasattr(self, "_teacher"):
            self._teacher = self.cached_model(self.cache / "teacher", "teacher", MODEL_NAME, TEACHER_KWARGS,
                                              self.args.teacher_epochs, self.args.teacher_max_grad_norm)
            self._teacher[0].model.eval()
        return self._teacher

    def self_teacher(self):
        if not hasattr(self, "_self_teacher"):
            self._self_teacher = self.cached_model(self.cache / "self_teacher", "self-teacher (pre-trained student)",
                                                   MODEL_NAME, STUDENT_KWARGS, self.args.epochs, self.args.max_grad_norm)
            self._self_teacher[0].model.eval()
        return self._self_teacher

    # ---- one row ----
    def run(self, method: str, spec: dict, seed: int) -> dict:
        from hfdistill import DistillationTrainer
        from transformers import set_seed

        record = {"method": method, "seed": seed, "settings": self.settings}
        student = self.load(MODEL_NAME, "student", STUDENT_KWARGS, seed=seed)
        data = self.data(student)
        teacher = None
        if spec.get("terms"):
            kind = spec.get("teacher", "teacher")
            teacher = (self.self_teacher() if kind in ("self", "virtual") else self.teacher())[0].model
        recipe = {"terms": spec["terms"], "task_weight": spec["task_weight"]}
        output_dir = os.path.join(self.workdir, f"{method}-{seed}")
        set_seed(seed)
        trainer = DistillationTrainer(
            model=student.model, teacher=teacher, recipe=recipe,
            args=make_args(output_dir, self.settings, seed, self.args.epochs, self.args.max_grad_norm),
            train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
            compute_metrics=accuracy, id2label=self.id2label, timm_model_args=student.timm_model_args,
        )
        start = time.perf_counter()
        trainer.train()
        record["train_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics = trainer.evaluate()
        record["eval_seconds"] = time.perf_counter() - start
        record["accuracy"] = metrics["eval_accuracy"]
        record["eval_loss"] = metrics["eval_loss"]
        logs = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
        record["last_log"] = {k: v for k, v in (logs[-1] if logs else {}).items() if k.startswith("loss")}
        record["first_log"] = {k: v for k, v in (logs[0] if logs else {}).items() if k.startswith("loss")}
        record["steps"] = trainer.state.global_step
        shutil.rmtree(output_dir, ignore_errors=True)
        return record


# ------------------------------------------------------------------------------------ report
def describe_terms(spec: dict) -> str:
    if not spec["terms"]:
        return "CE 1"
    parts = [f"CE {spec['task_weight']:g}"] if spec["task_weight"] else []
    for term in spec["terms"]:
        taps = ""
        if term.get("student") is not None:
            s, t = term["student"], term["teacher"]
            s = "+".join(s) if isinstance(s, list) else s
            t = "+".join(t) if isinstance(t, list) else t
            taps = f" {s}" if s == t else f" {s}->{t}"
        adapter = f" via {term['adapter']}" if term.get("adapter") else ""
        params = ", ".join(f"{k}={v}" for k, v in term.get("params", {}).items())
        params = f" ({params})" if params else ""
        parts.append(f"{term['weight']:g} {term['loss']}{taps}{adapter}{params}")
    return " + ".join(parts).replace("|", "/")


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def write_report(path: Path, records: list[dict], specs: dict, info: dict) -> None:
    ok = [r for r in records if "accuracy" in r]
    failed = [r for r in records if "error" in r]
    by_method: dict[str, list[dict]] = {}
    for r in ok:
        by_method.setdefault(r["method"], []).append(r)
    base = by_method.get("baseline")
    base_mean, base_std = mean_std([r["accuracy"] for r in base]) if base else (None, None)

    lines = [
        "# Distillation methods on Fashion-MNIST (CNN pair)",
        "",
        "Produced by `benchmarks/methods_fashion_mnist.py`; rerun it to reproduce (see the command below).",
        "",
        f"- **Teacher**: timm `resnet18` (3 input channels: the grey image repeated, 10 classes, 11.2M parameters), trained from scratch on the same "
        f"subset for {info['settings']['teacher_epochs']:g} epochs (same optimiser and schedule as the students, "
        f"gradient clipping at norm {info['settings']['teacher_max_grad_norm']:g}): **test accuracy {info['teacher_accuracy']:.4f}**"
        + (f" (trained in {info['teacher_seconds']:.0f} s)" if info.get("teacher_seconds") else " (cached)") + ".",
        "- **Student**: timm `resnet18` with `channels=[16, 32, 64, 128]` (0.71M parameters; same module names, "
        "narrower, so feature terms use adapters or width-free losses).",
        f"- **Data**: Fashion-MNIST, {info['settings']['train_samples'] or 60000} training images (a fixed seeded subset), "
        f"native 28x28, pad-and-crop + horizontal flip; evaluation on the "
        f"{info['settings']['eval_samples'] or 10000} test images.",
        f"- **Schedule (every row)**: {info['settings']['epochs']:g} epochs, batch {info['settings']['batch_size']}, SGD "
        f"momentum 0.9, lr {info['settings']['lr']:g} with cosine decay, weight decay {info['settings']['weight_decay']:g}"
        + (f", max_steps {info['settings']['max_steps']}" if info["settings"].get("max_steps") else "")
        + (", no gradient clipping" if not info["settings"].get("max_grad_norm")
           else f", gradient clipping at norm {info['settings']['max_grad_norm']:g}")
        + f". Seeds {info['main_seeds']} for {', '.join(MAIN_METHODS)}; seed {FIRST_SEED} for the rest. "
        "Same student initialisation per seed in every row.",
        f"- **Machine**: {info['machine']['cpu']}, {info['machine']['cores']} cores (shared with other jobs while this "
        f"ran), torch {info['machine']['torch']}, transformers {info['machine']['transformers']}, timm "
        f"{info['machine']['timm']}, GPU: {info['machine']['gpu']}.",
        f"- **Total run time**: {info['total_seconds'] / 60:.1f} min" + (" (still running)" if info.get("running") else "")
        + f". Command: `{info['command']}`",
        "",
        "| method | terms (weight, loss, taps, adapter, params) | seeds | test accuracy | vs baseline | train time / run |",
        "|---|---|---|---|---|---|",
    ]
    if base:
        lines.append(f"| teacher (resnet18, 11.2M) | CE 1 | {FIRST_SEED} | {info['teacher_accuracy']:.4f} | "
                     f"{info['teacher_accuracy'] - base_mean:+.4f} | - |")
    order = [m for m in specs if m in by_method]
    for method in order:
        runs = by_method[method]
        mean, std = mean_std([r["accuracy"] for r in runs])
        acc = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        delta = "-" if method == "baseline" or base_mean is None else f"{mean - base_mean:+.4f}"
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        seeds = ",".join(str(r["seed"]) for r in runs)
        # A run whose loss became NaN diverged: say so rather than show its chance-level accuracy bare.
        diverged = [str(r["seed"]) for r in runs if any(
            isinstance(v, float) and math.isnan(v) for v in (r.get("last_log") or {}).values())]
        if diverged:
            acc += f" (diverged: NaN loss, seed {', '.join(diverged)})"
        lines.append(f"| {method} | {describe_terms(specs[method])} | {seeds} | {acc} | {delta} | {seconds:.0f} s |")
    pending = [m for m in specs if m not in by_method and m not in {r["method"] for r in failed}]
    if pending and info.get("running"):
        lines += ["", f"Not run yet: {', '.join(pending)}."]

    lines += ["", "## Reading the table", ""]
    if base:
        base_text = f"{base_mean:.4f}" + (f" ± {base_std:.4f}" if base_std is not None else "")
        lines.append(f"The baseline (student alone) reaches {base_text}. "
                     "Differences smaller than about two baseline standard deviations are within seed noise; "
                     "single-seed rows carry that noise too.")
        worse = [m for m in order if m != "baseline" and mean_std([r["accuracy"] for r in by_method[m]])[0] <= base_mean]
        noise = 2 * base_std if base_std else 0.0
        unclear = [m for m in order if m != "baseline" and m not in worse
                   and mean_std([r["accuracy"] for r in by_method[m]])[0] - base_mean <= noise]
        better = [m for m in order if m not in ("baseline", *worse, *unclear)]
        lines.append("")
        lines.append(f"- **Did not beat the baseline** (mean accuracy at or below it): {', '.join(worse) or 'none'}.")
        lines.append(f"- **Above the baseline but within seed noise** (<= 2 baseline std, {noise:.4f}): "
                     f"{', '.join(unclear) or 'none'}.")
        lines.append(f"- **Above the baseline by more than that**: {', '.join(better) or 'none'}.")
    lines += [
        "",
        "This is a short schedule on a small subset, chosen so that every method runs on two CPU cores in about "
        "40 minutes: it checks that each method trains inside the real trainer and shows its effect at this budget; "
        "it is not a reproduction of the papers' CIFAR-100/ImageNet numbers. The term weights are the literature's "
        "CIFAR settings, not tuned here; several were tuned for 240-epoch schedules and much larger maps (at 28x28 "
        "the ImageNet-style stem leaves 7x7, 4x4, 2x2 and 1x1 maps in layer1..layer4).",
        "",
        "## Where each row's settings come from",
        "",
    ]
    for method in specs:
        lines.append(f"- `{method}`: {specs[method]['source']}.")
    lines += ["", "## Methods without a row", ""]
    for name, why in TRANSFORMER_ONLY.items():
        lines.append(f"- `{name}`: not applicable to a CNN pair ({why}).")
    for name, why in NOT_IMPLEMENTED.items():
        lines.append(f"- `{name}`: {why}.")
    for alias, main in ALIASES.items():
        lines.append(f"- `{alias}`: another registered name of `{main}` (same class), benchmarked as `{main}`.")
    if failed:
        lines += ["", "## Runs that failed", ""]
        for r in failed:
            lines.append(f"- `{r['method']}` seed {r['seed']}: `{r['error']}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-samples", type=int, default=6000, help="training images (a seeded subset of 60k)")
    parser.add_argument("--eval-samples", type=int, default=None, help="test images (default: all 10k)")
    parser.add_argument("--epochs", type=float, default=2, help="student epochs (every row)")
    parser.add_argument("--teacher-epochs", type=float, default=5, help="teacher epochs (trained once, cached)")
    parser.add_argument("--seeds", type=int, default=3, help=f"seeds for {', '.join(MAIN_METHODS)} (others: 1)")
    parser.add_argument("--methods", nargs="+", default=["all"], help="methods to run (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps per run (dry runs)")
    parser.add_argument("--max-grad-norm", type=float, default=0.0,
                        help="gradient clipping of the students (0: none, as RepDistiller/mdistiller; the Trainer's "
                        "default 1.0 would rescale the large feature-loss weights' gradients)")
    parser.add_argument("--teacher-max-grad-norm", type=float, default=1.0,
                        help="gradient clipping of the teacher's training (the Trainer's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/methods_fashion_mnist.md"))
    parser.add_argument("--cache-dir", default=None,
                        help="where the teacher (and Tf-KD's self-teacher) are cached; default: "
                        "runs/benchmarks/fashion_mnist-n<train-samples>-e<teacher-epochs>")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the .jsonl with these settings")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny settings: every method a few steps, results under /tmp (checks that all train)")
    parser.add_argument("--list", action="store_true", help="print the methods and their terms, then exit")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.train_samples, args.eval_samples, args.epochs, args.teacher_epochs = 512, 512, 1, 1
        args.max_steps = args.max_steps or 3
        args.seeds = 1
        if args.out == parser.get_default("out"):
            args.out = "/tmp/hfdistill-dry-run/methods_fashion_mnist.md"
        args.cache_dir = args.cache_dir or "/tmp/hfdistill-dry-run/cache"
    if args.cache_dir is None:
        args.cache_dir = str(ROOT / f"runs/benchmarks/fashion_mnist-n{args.train_samples}-e{args.teacher_epochs:g}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = methods(args.epochs)
    if args.list:
        for name, spec in specs.items():
            print(f"{name:15s} {describe_terms(spec)}")
        return 0
    chosen = list(specs) if args.methods == ["all"] else args.methods
    unknown = [m for m in chosen if m not in specs]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {', '.join(specs)}", file=sys.stderr)
        return 2
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else list(argv)))
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    started = time.perf_counter()

    bench = Bench(args)
    main_seeds = [FIRST_SEED + i for i in range(args.seeds)]
    plan = [(m, s) for m in chosen for s in (main_seeds if m in MAIN_METHODS else [FIRST_SEED])]

    records: list[dict] = []
    if args.resume and jsonl.is_file():
        old = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        records = [r for r in old if r.get("settings") == bench.settings and "accuracy" in r
                   and (r["method"], r["seed"]) in plan]
        log(f"resuming: {len(records)} run(s) kept from {jsonl}")
    done = {(r["method"], r["seed"]) for r in records}

    _, teacher_acc, teacher_seconds = bench.teacher()
    info = {
        "settings": bench.settings, "teacher_accuracy": teacher_acc, "teacher_seconds": teacher_seconds,
        "machine": machine(), "command": command, "main_seeds": ",".join(map(str, main_seeds)),
    }

    def save(running: bool) -> None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        write_report(out, records, {m: specs[m] for m in chosen},
                     {**info, "total_seconds": time.perf_counter() - started, "running": running})

    todo = [p for p in plan if p not in done]
    log(f"{len(todo)} run(s) to do: {', '.join(f'{m}/{s}' for m, s in todo)}")
    for i, (method, seed) in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {method} seed {seed}: {describe_terms(specs[method])}")
        try:
            record = bench.run(method, specs[method], seed)
            log(f"[{i}/{len(todo)}] {method} seed {seed}: test accuracy {record['accuracy']:.4f}, "
                f"train {record['train_seconds']:.0f} s, eval {record['eval_seconds']:.0f} s, last losses {record['last_log']}")
        except Exception as exc:  # one failing method must not stop the others; it is reported
            traceback.print_exc()
            record = {"method": method, "seed": seed, "settings": bench.settings,
                      "error": f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]}
            log(f"[{i}/{len(todo)}] {method} seed {seed}: FAILED {record['error']}")
        records.append(record)
        save(running=i < len(todo))
    save(running=False)
    shutil.rmtree(bench.workdir, ignore_errors=True)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min; results in {out}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
