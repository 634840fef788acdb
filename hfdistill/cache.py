"""Cached teacher outputs: run the teacher once over the training data, train students from disk.

    hfdistill cache RECIPE.yaml [--output DIR] [--logits_top_k K] [--feature_dtype float16|float32]

    # in a recipe                      # from Python
    teacher: {cache: DIR}              cache_dir = hfdistill.cache.build_cache(teacher, train_ds, recipe, "DIR")
                                       DistillationTrainer(..., teacher=hfdistill.cache.TeacherCache(cache_dir))

**What is stored.** :func:`build_cache` runs the frozen teacher (in eval mode) over every training
example once and stores, keyed by the example's index in the dataset, what the recipe's terms read
from the teacher (their teacher taps, plus ``logits`` always):

- ``logits``: full fp32 logits, or with ``logits_top_k: k`` the k largest logits (fp32), their class
  indices (int32) and the log of the probability mass of the other classes. The losses get back full
  logits (:func:`reconstruct_logits`): the kept logits as they were and one value for every other class,
  chosen so that the softmax at temperature 1 is exact on the kept classes and the remaining mass is
  spread evenly over the others (as sparse-logit caches such as DistillKit's do). This is exact only for
  the kept classes' probabilities at temperature 1; the teacher's individual probabilities of the other
  classes are gone (replaced by their average), and at another temperature T the kept probabilities are
  an approximation too. Measured (``tests/test_cache.py::test_topk_error_at_other_temperatures``: 100
  classes, a confident teacher, a student near it): at T=4 the kept probabilities are off by up to 0.039
  (k=10) / 0.006 (k=50); KD's loss value is off by 32 % / 1.5 % at T=1 and by 210 % / 42 % at T=4. So keep
  full logits (the default) for classification heads, and use top-k for very large vocabularies with a
  k that holds nearly all of the teacher's mass.
  Language models: the top-k is per token position (8 k + 4 bytes per token), and the token losses
  (``forward_kl``, ``jsd``, ...) read it as it is (:class:`~hfdistill.losses.common.SparseLogits`), without
  full vocabulary-size teacher logits: exact on the kept tokens, the others as one bucket
  (:mod:`hfdistill.losses.tokens`). The manifest's ``size`` reports the bytes per token and how much of the
  teacher's probability the top-k left to the other tokens (mean, median, p95, max), and so does
  ``hfdistill cache``.
- tapped features (module outputs or inputs, hidden states, attentions; a tap that gives a list is stored
  element by element): float16 by default (``feature_dtype: float32`` or ``bfloat16`` as an option). A
  value beyond float16's range is refused at build time rather than stored as inf.
- per example, a checksum of the teacher's main input (``pixel_values`` / ``input_ids``, as the teacher
  receives it): the float64 sum, a position-weighted sum (so a flipped or shifted image differs) and the
  absolute sum; for token inputs, masked by ``attention_mask`` so that padding does not count.

Sequence taps (text models' hidden states and attention maps) have the padded length of the batch they
were computed in; they are stored with each example's own length (positions past it hold zeros) and come
back padded to the length of the training batch, as a live teacher gives them. Sequence losses mask the
padded positions (``attention_mask``), which a live teacher fills with values no loss should read.

**Files.** ``DIR/shard-00000-of-000NN.safetensors``: each holds a contiguous range of example indices
(``index`` [n] int64, ``input_checksum`` [n, 3] float64, ``length`` [n] for sequence inputs, and one
tensor per stored value ``t/<tap>``, ``t/<tap>/<i>`` for list taps, ``t/logits/topk_values`` ...).
Each shard is written under a temporary name and renamed, so it is complete or absent. ``cache_build.json``
is written first (what is being built: a resumed build must match it) and ``manifest.json`` last, by rank
0, when every shard exists: hfdistill version, teacher identity (name, revision, parameter count, dtype and
the sha256 of its weights), taps with their per-example shapes and stored dtypes, preprocessing, data
(number of examples, ``datasets`` fingerprint when there is one, sha256 of all input checksums),
augmentation views, and every shard with its example range, size and sha256.

The weights hash is sha256 over the state dict's tensors (names, dtypes, shapes and bytes, in sorted
name order): measured 0.55 s per GB of weights on one core here (ResNet-50, 102 MB: 0.06 s), computed
once per build and once per verification of a recipe that names its teacher beside the cache.

**Resume and several processes.** Building again into the same folder verifies the shards already there
(their example range, their sha256 when an earlier manifest lists them, and the input checksums of their
first examples against the data) and writes only the missing or corrupt ones; a different teacher, taps, logits or dtype options, shard size or data is refused,
saying what differs. Process ``rank`` of ``world_size`` writes the shards ``i`` with ``i % world_size ==
rank`` (``accelerate launch -m hfdistill cache RECIPE`` sets them from ``RANK``/``WORLD_SIZE``); rank 0
writes the manifest once all shards exist, waiting for them up to ``wait_timeout`` seconds.

**Reading.** :class:`TeacherCache` implements the :class:`~hfdistill.teacher.Teacher` interface
(``features(batch)``, ``outputs``, ``logits``, ``attach``/``remove``, ``taps``, ``model`` = None): it
gathers rows by ``batch["index"]`` (the trainer adds the index to every training batch when the teacher
is a cache) and returns fp32 tensors on the batch's device. The shards are mapped into memory
(:func:`map_safetensors`): a batch reads only the pages of its rows, so a cache larger than the machine's
memory works, and the processes of a multi-process run share one copy in the page cache
(``memory_map=False`` loads them whole). Opening a cache verifies the manifest (format and hfdistill major version) and
every shard (present, sha256 as listed: one read of every file); a trainer then refuses terms
that read taps the cache lacks, methods that must call the teacher on new inputs (a loss class with
``needs_live_teacher = True``: BSS, Sobolev, LwM, SSKD), and a dataset of another length. On the first
``check_batches`` training batches it compares the teacher's inputs with the stored checksums: a
difference is an error (other data, order or preprocessing) unless the cache was opened with
``augmented=True``, which says that the training batches are augmented on purpose while the cache holds
the deterministic view (FKD and ReLabel do the same with stored crops); then it warns once. A recipe with
``teacher: {cache: DIR}`` checks its data's deterministic view against the cache before training and
sets ``augmented`` from ``data.augment`` itself.

**Views.** By default the deterministic (eval-mode, unaugmented) view is cached (``views: 1``), and training
with augmentation reads the teacher's outputs on the plain image (``augmented=True`` above). With ``views=N``
the cache holds N augmented views of every example, as FKD (Shen & Xing, ECCV 2022, arXiv:2112.01528) and
ReLabel store region-level soft labels with the crop coordinates that reproduce them: the data's own
augmentation (hfdistill's image transforms draw each image's crop and flip from its content, an epoch and a
seed) draws view v as at epoch v of a run seeded ``view_seed``, and row ``v * num_examples + i`` holds the
teacher's outputs on view v of example i. Training replays them: at epoch e the trainer sets the data's
augmentation to view ``e % N`` (with the cache's view seed, not the training seed) and the cache reads that
view, so the student sees exactly the augmented images whose teacher outputs are stored, and the input
checksums are compared strictly. The cache is N times larger; the teacher's cost is paid once for N epochs
of different augmentations (FKD's saving).

The teacher's evaluation on the eval split needs the teacher itself: with a cache it is skipped (the
trainer says so once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import DistillationError, RecipeError
from .losses.common import SparseLogits, sparse_as_dense
from .outputs import default_file_mode
from .teacher import POSITIONAL_INPUTS, TEACHER_DTYPES, Teacher, to_device

logger = logging.getLogger(__name__)

FORMAT = "hfdistill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BUILD_NAME = "cache_build.json"
TOKENIZER_DIR = "teacher_tokenizer"
SHARD_NAME = "shard-{:05d}-of-{:05d}.safetensors"
FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LOGITS_KEYS = ("topk_values", "topk_indices", "rest_logmass")
# log of the smallest remaining probability mass kept (e^-80 ~ 1.8e-35, still a normal fp32 number):
# a top-k that holds all the mass would otherwise give -inf logits, and 0 * -inf = nan in KL.
MIN_LOG_REST = -80.0
# Relative tolerance of the input checksums (resizing on another device changes the last bits).
CHECKSUM_RTOL = 1e-5
LABEL_KEYS = ("labels", "label", "label_ids", "index")


# ------------------------------------------------------------------------------------ small helpers
def _version() -> str:
    import hfdistill

    return hfdistill.__version__


def _major(version: str) -> str:
    return str(version).split(".")[0]


def weights_hash(model: nn.Module) -> str:
    """sha256 over the state dict: each tensor's name, dtype, shape and bytes, in sorted name order. Weights that
    Accelerate offloaded (``device_map`` with CPU or disk offload: meta tensors here) are read from their module,
    onloaded once for all of its tensors (they come together in sorted order)."""
    digest = hashlib.sha256()
    onloaded: tuple[str, dict[str, torch.Tensor]] = ("", {})  # (module prefix, its state on the CPU)
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.device.type == "meta":
            prefix, state = onloaded
            if not (name.startswith(prefix) and name[len(prefix):] in state):
                onloaded = prefix, state = _onload_owner(model, name)
            tensor = state[name[len(prefix):]]
        value = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{value.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy())
    return digest.hexdigest()


def _onload_owner(model: nn.Module, name: str) -> tuple[str, dict[str, torch.Tensor]]:
    """For state-dict entry ``name`` that Accelerate keeps offloaded: the nearest module above it whose hook holds
    offloaded weights, onloaded to the CPU just long enough to copy its state. Returns its prefix (``"a.b."``,
    ``""`` for the model) and that state."""
    from accelerate.utils import align_module_device, has_offloaded_params

    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        try:
            module = model.get_submodule(".".join(parts[:cut]))
        except AttributeError:
            continue
        if has_offloaded_params(module):
            with align_module_device(module, torch.device("cpu")):
                state = {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
            return "".join(part + "." for part in parts[:cut]), state
    raise DistillationError(f"the teacher's weight {name!r} is on the meta device with no offloaded copy to read: "
                            "load the teacher with its weights (or its device_map's offload) before caching")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_logits_tap(tap: str) -> bool:
    """Named outputs holding logits (``logits``, ``distillation_logits``): stored in fp32 or as top-k."""
    return ":" not in tap and "." not in tap and tap.endswith("logits")


def main_input_name(inputs: Mapping[str, Any]) -> str:
    """The input that identifies an example: ``pixel_values``/``input_ids``/..., else the first tensor."""
    for name in POSITIONAL_INPUTS:
        if isinstance(inputs.get(name), torch.Tensor):
            return name
    names = sorted(k for k, v in inputs.items() if isinstance(v, torch.Tensor))
    if not names:
        raise DistillationError(f"the teacher's inputs hold no tensor ({sorted(inputs)}); nothing identifies an example")
    return names[0]


def _position_weights(n: int, device: torch.device) -> torch.Tensor:
    # w_i in [0.5, 2.5], depending on the position only (a longer padded input has the same prefix).
    i = torch.arange(n, dtype=torch.float64, device=device)
    return torch.sin(i * 0.6180339887498949 + 0.5) + 1.5


def input_checksums(inputs: Mapping[str, Any]) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """``(name, [B, 3] float64 checksums, [B] lengths or None)`` of the teacher's main input, per example.

    The checksums are the sum, a position-weighted sum and the absolute sum of the flattened input in
    float64. Token inputs ([B, T] integers) are masked by ``attention_mask`` (padding does not count) and
    have a length, the number of real tokens (right padding).
    """
    name = main_input_name(inputs)
    x = inputs[name].detach()
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    lengths = None
    if not x.is_floating_point() and x.dim() == 2:
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(x.shape):
            mask = mask.to(torch.float64)
            flat = flat * mask
            lengths = mask.sum(1).long()
        else:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    w = _position_weights(flat.shape[1], flat.device)
    sums = torch.stack([flat.sum(1), (flat * w).sum(1), flat.abs().sum(1)], 1)
    return name, sums.cpu(), None if lengths is None else lengths.cpu()


def checksums_match(found: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """[B] bool: each example's checksums equal the stored ones up to float noise."""
    tol = CHECKSUM_RTOL * stored[:, 2:3].abs() + 1e-6
    return ((found - stored).abs() <= tol).all(1)


def topk_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest logits [.., k] (fp32), their classes [.., k] (int32) and log(remaining mass) [..].

    ``log m = logsumexp(z over the other classes) - logsumexp(z)``, computed from the other classes
    themselves (not as ``1 - kept mass``, which loses the digits of a small m), clamped at MIN_LOG_REST.
    """
    z = logits.float()
    values, indices = z.topk(k, dim=-1)
    others = z.scatter(-1, indices, float("-inf"))
    rest = (torch.logsumexp(others, -1) - torch.logsumexp(z, -1)).clamp(min=MIN_LOG_REST)
    return values, indices.to(torch.int32), rest


def reconstruct_logits(values: torch.Tensor, indices: torch.Tensor, rest_logmass: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
    """Full logits [.., C] from a top-k: softmax at T=1 is exact on the kept classes (:meth:`SparseLogits.dense`).

    The kept classes keep their logits z_i. Every other class gets ``f = lse + log m - log(C - k)`` with
    ``lse = logsumexp(z_kept) - log(1 - m)`` (the full logsumexp, recovered from the kept part), so
    ``sum_kept e^z_i + (C-k) e^f = e^lse (1 - m) + e^lse m = e^lse`` and ``softmax_i = e^(z_i - lse) = p_i``.
    """
    return SparseLogits(values, indices, rest_logmass, num_classes).dense()


def _resize_dims(value: torch.Tensor, dims: Sequence[int], length: int) -> torch.Tensor:
    """Crop or zero-pad ``value`` to ``length`` along each of ``dims``."""
    for d in dims:
        size = value.shape[d]
        if size > length:
            value = value.narrow(d, 0, length)
        elif size < length:
            pad_shape = list(value.shape)
            pad_shape[d] = length - size
            value = torch.cat([value, value.new_zeros(pad_shape)], d)
    return value


def _zero_past_length(value: torch.Tensor, dims: Sequence[int], lengths: torch.Tensor) -> torch.Tensor:
    """Zero the positions at or past each example's length along the sequence ``dims`` (batch dim first)."""
    for d in dims:
        size = value.shape[d]
        keep = torch.arange(size, device=value.device).unsqueeze(0) < lengths.to(value.device).unsqueeze(1)  # [B, L]
        shape = [value.shape[0]] + [1] * (value.dim() - 1)
        shape[d] = size
        value = value * keep.view(shape).to(value.dtype)
    return value


def _needs_live_teacher(loss: str, params: Mapping[str, Any]) -> bool:
    from . import losses as loss_registry

    cls = loss_registry.get_info(loss).cls
    if getattr(cls, "needs_live_teacher", False):
        return True
    return bool(getattr(loss_registry.build(loss, **dict(params or {})), "needs_live_teacher", False))


def recipe_teacher_taps(recipe: Any) -> list[str]:
    """The teacher taps the terms of every stage read (terms without a teacher left out), in order.

    Raises DistillationError for a term whose method must call the teacher on new inputs.
    """
    from . import losses as loss_registry
    from .recipe import Recipe
    from .terms import resolve_terms

    if recipe is None:
        return []
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else Recipe.from_yaml(recipe)
    taps: list[str] = []
    for stage in recipe.stage_list():
        for term in resolve_terms(stage.terms):
            if not loss_registry.needs_teacher(term.spec.loss, term.spec.params):
                continue
            _refuse_live(term)
            taps += [t for t in term.teacher_taps if t not in taps]
    return taps


def _refuse_live(term: Any) -> None:
    if _needs_live_teacher(term.spec.loss, term.spec.params):
        raise DistillationError(
            f"term {term.name!r} ({term.spec.loss}) calls the teacher on inputs of its own (new, perturbed or "
            "transformed examples), so it cannot use cached teacher outputs; give it the teacher model itself "
            "(`teacher: {name: ...}` / DistillationTrainer(teacher=model)), or remove the term"
        )


class CachedTaps:
    """What the trainer and terms.py use of a model's taps (attach/remove/attached); nothing to hook."""

    def __init__(self, taps: Iterable[str]):
        self.taps = {t: t for t in taps}
        self.forward_kwargs: dict[str, bool] = {}
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> None:
        self._attached = True

    def remove(self) -> None:
        self._attached = False

    def clear(self) -> None:
        pass


def _default_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    from . import processes

    return processes.rank(), processes.world_size()


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of the file mapped into memory (nothing is read up front).

    The format is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte
    range) and the raw little-endian bytes. The mapping is copy-on-write (the tensors are writable, the file
    never changes); indexing rows reads only their pages.
    """
    import mmap

    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise DistillationError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which a teacher cache never stores")
        first, last = entry["data_offsets"]
        count = (last - first) // dtype.itemsize
        flat = (torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + first) if count
                else torch.empty(0, dtype=dtype))
        out[name] = flat.view(entry["shape"])
    return out


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistillationError(f"the {what} {path} cannot be read ({exc}); delete the folder and build the cache again") from None


def _differences(cached: Mapping[str, Any], now: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    out = []
    for key in keys:
        if cached.get(key) != now.get(key):
            out.append(f"{key}: {_short(cached.get(key))} in the cache, {_short(now.get(key))} now")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, sort_keys=True)
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12] + "..."
    return text if len(text) <= 160 else text[:157] + "..."


# ------------------------------------------------------------------------------------ building
@dataclasses.dataclass
class _Layout:
    """How one tap is stored: a tensor or a list of them, its per-example shapes, sequence dims, dtype."""

    kind: str  # "tensor" or "list"
    shapes: list[list[int | None]]  # per element; None at sequence dims
    seq_dims: list[list[int]]  # per element, in the per-example shape (0 = first dim after the batch)
    dtype: str
    logits: bool
    top_k: int | None
    num_classes: int | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_list(value: Any) -> tuple[list[torch.Tensor], bool]:
    if isinstance(value, torch.Tensor):
        return [value], False
    if isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value), True
    raise DistillationError(f"a teacher tap gave a {type(value).__name__}, which a cache cannot store")


class _Builder:
    """One process's part of a cache build (see :func:`build_cache`)."""

    def __init__(self, teacher: Teacher, dataset: Any, folder: Path, taps: list[str], *, top_k: int | None,
                 feature_dtype: str, batch_size: int, shard_size: int, collator: Callable, num_workers: int,
                 progress: bool, views: int = 1, view_seed: int = 0,
                 set_view: Callable[[int, int], None] | None = None):
        self.teacher, self.dataset, self.folder, self.taps = teacher, dataset, folder, taps
        self.top_k, self.feature_dtype = top_k, FEATURE_DTYPES[feature_dtype]
        self.batch_size, self.shard_size, self.num_workers, self.progress = batch_size, shard_size, num_workers, progress
        from .terms import IndexedCollator, IndexedDataset

        self.indexed = IndexedDataset(dataset)
        self.collate = IndexedCollator(collator)
        self.num_examples = len(dataset)
        # Row r of the cache is view r // num_examples of example r % num_examples (views > 1: augmented views,
        # each drawn by the data's own augmentation as at epoch `view` of a run seeded `view_seed`).
        self.views, self.view_seed, self.set_view = views, view_seed, set_view
        self.num_rows = views * self.num_examples
        self.num_shards = max(1, math.ceil(self.num_rows / shard_size))
        self.layouts: dict[str, _Layout] | None = None
        self.listed_sha256: dict[str, str] = {}  # shards an earlier manifest lists, with their hashes
        self.input_name: str | None = None
        self.input_shape: list[int] | None = None

    # ---- data ----
    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_size, min((i + 1) * self.shard_size, self.num_rows)

    def shard_path(self, i: int) -> Path:
        return self.folder / SHARD_NAME.format(i, self.num_shards)

    def batches(self, start: int, stop: int):
        """Collated batches of rows ``start..stop-1``, their ``index`` the row; never two views in one batch."""
        n, device = self.num_examples, self.device
        for view in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start, view * n), min(stop, (view + 1) * n)
            if self.set_view is not None:
                self.set_view(view, self.view_seed)  # before the loader's workers copy the dataset
            loader = torch.utils.data.DataLoader(
                self.indexed, batch_size=self.batch_size, sampler=range(lo - view * n, hi - view * n),
                collate_fn=self.collate, num_workers=self.num_workers,
            )
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                batch["index"] = batch["index"] + view * n
                yield batch

    @property
    def device(self) -> torch.device:
        """Where batches go: the teacher's device (a teacher spread by ``device_map`` takes its inputs there too;
        its first parameter may be offloaded, on the meta device)."""
        return self.teacher.device

    def teacher_inputs(self, batch: dict) -> dict:
        if not self.teacher.shared_input_names and self.teacher.inputs_fn is None:
            # Not told which batch fields are the teacher's: every input field (not labels, not the index).
            self.teacher.shared_input_names = {k for k in batch if k not in LABEL_KEYS and not k.startswith("teacher_")}
        return self.teacher.call_inputs(batch)

    # ---- the shapes of what is stored ----
    def probe(self) -> None:
        """Tap layouts from the first example; for token inputs, which dims follow the sequence length."""
        batch = next(self.batches(0, 1))
        inputs = self.teacher_inputs(batch)
        name = main_input_name(inputs)
        self.input_name = name
        x = inputs[name]
        features = self.teacher.features(batch)
        sequence = not x.is_floating_point() and x.dim() == 2
        other = None
        if sequence:
            # The same batch one position shorter (or, for a single position, one masked position longer: a
            # longer one could pass the model's maximum length): the dims that change by one are sequence dims.
            length = x.shape[1]
            if length >= 2:
                changed = {k: (v[:, :length - 1] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == length
                               else v) for k, v in batch.items()}
            else:
                changed = {k: (torch.cat([v, v.new_zeros(v.shape[0], 1, *v.shape[2:])], 1)
                               if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == length else v)
                           for k, v in batch.items()}
            other = self.teacher.features(changed)
        else:
            self.input_shape = list(x.shape[1:])
        layouts = {}
        for tap in self.taps:
            if tap not in features:
                raise DistillationError(f"the teacher gave no value for tap {tap!r}")
            values, is_list = _as_list(features[tap])
            other_values = _as_list(other[tap])[0] if other is not None else values
            shapes, seq_dims = [], []
            for v, w in zip(values, other_values):
                step = 1 if other is not None and length < 2 else -1  # how the other batch's length differs
                dims = [d - 1 for d in range(1, v.dim()) if w.shape[d] == v.shape[d] + step]
                if any(w.shape[d] not in (v.shape[d], v.shape[d] + step) for d in range(v.dim())):
                    raise DistillationError(f"teacher tap {tap!r} changes shape with the input length in a way a "
                                            f"cache cannot store ({tuple(v.shape)} -> {tuple(w.shape)})")
                shapes.append([None if d in dims else int(s) for d, s in enumerate(v.shape[1:])])
                seq_dims.append(dims)
            logits = is_logits_tap(tap) and not is_list
            top_k = None
            # Classes are last in [B, K], [B, T, V] and a detector's [B, Q, K]; a segmentation map is [B, K, H, W].
            class_dim = 1 if values[0].dim() >= 4 else -1
            num_classes = int(values[0].shape[class_dim]) if logits else None
            if logits and self.top_k is not None and self.top_k < num_classes:
                if class_dim == 1 or (seq_dims[0] and (values[0].dim() - 2) in seq_dims[0]):
                    raise DistillationError(
                        f"logits_top_k: tap {tap!r} ({list(values[0].shape)}) has no class dimension last (a map "
                        "of class scores per position); store the full logits (leave out --logits_top_k)")
                top_k = self.top_k
            dtype = "float32" if logits else str(self.feature_dtype).replace("torch.", "")
            layouts[tap] = _Layout("list" if is_list else "tensor", shapes, seq_dims, dtype, logits, top_k, num_classes)
        self.layouts = layouts

    # ---- one shard ----
    def convert(self, tap: str, value: Any, lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The tensors stored for one tap of one batch (on the CPU)."""
        layout = self.layouts[tap]
        values, _ = _as_list(value)
        if len(values) != len(layout.shapes):
            raise DistillationError(f"teacher tap {tap!r} gave {len(values)} tensors here and {len(layout.shapes)} before")
        out = {}
        for i, (v, dims) in enumerate(zip(values, layout.seq_dims)):
            v = v.detach()
            if dims:
                v = _zero_past_length(v, [d + 1 for d in dims], lengths)
            key = f"t/{tap}" if layout.kind == "tensor" else f"t/{tap}/{i}"
            if layout.logits:
                if layout.top_k is not None:
                    values_k, indices, rest = topk_logits(v, layout.top_k)
                    out.update({f"{key}/topk_values": values_k.cpu(), f"{key}/topk_indices": indices.cpu(),
                                f"{key}/rest_logmass": rest.cpu()})
                    continue
                out[key] = v.float().cpu()
                continue
            target = FEATURE_DTYPES[layout.dtype]
            if target == torch.float16 and v.is_floating_point():
                peak = float(v.float().abs().max()) if v.numel() else 0.0
                if peak > torch.finfo(torch.float16).max:
                    raise DistillationError(
                        f"teacher tap {tap!r} has values up to {peak:.4g}, beyond float16's range (65504); "
                        "build the cache with feature_dtype float32 (or bfloat16)"
                    )
            out[key] = v.to(target).cpu()
        return out

    def write_shard(self, i: int, bar: Any) -> None:
        start, stop = self.shard_range(i)
        parts: dict[str, list[torch.Tensor]] = {}
        index, sums, lengths_all = [], [], []
        for batch in self.batches(start, stop):
            inputs = self.teacher_inputs(batch)
            _, checks, lengths = input_checksums(inputs)
            features = self.teacher.features(batch)
            index.append(batch["index"].cpu())
            sums.append(checks)
            if lengths is not None:
                lengths_all.append(lengths)
            for tap in self.taps:
                for key, tensor in self.convert(tap, features[tap], lengths).items():
                    parts.setdefault(key, []).append(tensor)
            bar.update(len(batch["index"]))
        tensors = {"index": torch.cat(index), "input_checksum": torch.cat(sums)}
        if lengths_all:
            tensors["length"] = torch.cat(lengths_all)
        for key, chunks in parts.items():
            tensors[key] = self._concat(key, chunks)
        import safetensors.torch

        path = self.shard_path(i)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        layout = {tap: layout.to_dict() for tap, layout in self.layouts.items()}
        metadata = {"format": "pt", "start": str(start), "stop": str(stop), "layout": json.dumps(layout),
                    "input_name": self.input_name or "", "input_shape": json.dumps(self.input_shape)}
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        default_file_mode([str(tmp)])  # as any other file the user writes (the writer makes it 0600)
        os.replace(tmp, path)

    def _concat(self, key: str, chunks: list[torch.Tensor]) -> torch.Tensor:
        tap, element = self._tap_of(key)
        layout = self.layouts[tap]
        dims = [d + 1 for d in layout.seq_dims[element]]
        if dims:  # batches have other padded lengths: pad to the longest in the shard
            longest = max(c.shape[dims[0]] for c in chunks)
            chunks = [_resize_dims(c, dims, longest) for c in chunks]
        return torch.cat(chunks)

    def _tap_of(self, key: str) -> tuple[str, int]:
        body = key[2:]
        for tap in sorted(self.layouts, key=len, reverse=True):
            if body == tap or body.startswith(tap + "/"):
                rest = body[len(tap) + 1:].split("/")[0] if body != tap else ""
                return tap, int(rest) if rest.isdigit() else 0
        raise KeyError(key)

    # ---- verification of a shard already there ----
    def shard_is_complete(self, i: int, check_examples: int) -> bool:
        """A shard from an earlier build: its range and the checksums of its first examples; False if absent."""
        from safetensors import safe_open

        path = self.shard_path(i)
        if not path.is_file():
            return False
        listed = self.listed_sha256.get(path.name)
        if listed is not None and file_sha256(path) != listed:
            logger.warning("shard %s is corrupt (its sha256 is not the manifest's): writing it again", path)
            path.unlink()
            return False
        start, stop = self.shard_range(i)
        try:
            with safe_open(str(path), framework="pt") as f:
                index = f.get_tensor("index")
                stored = f.get_tensor("input_checksum")
                metadata = f.metadata() or {}
        except Exception as exc:  # noqa: BLE001 - an unreadable file is rebuilt
            logger.warning("shard %s cannot be read (%s): writing it again", path, exc)
            path.unlink()
            return False
        if not torch.equal(index, torch.arange(start, stop)):
            raise DistillationError(f"shard {path} holds examples {int(index[0])}..{int(index[-1])}, not {start}..{stop - 1}; "
                                    "the folder holds another cache layout: use a new folder or delete this one")
        layout = json.loads(metadata.get("layout", "{}"))
        if self.layouts is not None and layout != {t: l.to_dict() for t, l in self.layouts.items()}:
            raise DistillationError(f"shard {path} stores its taps differently from what is being built now "
                                    f"({_short(layout)}); use a new folder or delete this one")
        n = min(check_examples, stop - start)
        if n <= 0:
            return True
        batch = next(self.batches(start, start + n))
        _, found, _ = input_checksums(self.teacher_inputs(batch))
        bad = (~checksums_match(found, stored[:n])).nonzero().flatten()
        if len(bad):
            raise DistillationError(
                f"shard {path} was built from other data or preprocessing: the teacher inputs of examples "
                f"{[start + int(b) for b in bad[:5]]} differ from those stored; build into a new folder, or delete "
                "this one to build it again"
            )
        return True


def _identity(teacher: Teacher, model: nn.Module, name: str | None, revision: str | None, sha256: str) -> dict:
    from .card import model_name

    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    return {
        "name": name or model_name(model),
        "revision": revision,
        "weights_sha256": sha256,
        "num_parameters": params,
        "weight_bytes": size,
        "dtype": str(teacher.dtype).replace("torch.", ""),
        "input_names": sorted(teacher.input_names),
        "id2label": {str(k): v for k, v in id2label.items()} if isinstance(id2label, dict) else None,
    }


def build_cache(
    teacher: nn.Module | Teacher,
    dataset: Any,
    recipe: Any = None,
    path: str | os.PathLike = "teacher_cache",
    *,
    taps: Sequence[str] = (),
    logits_top_k: int | None = None,
    feature_dtype: str = "float16",
    batch_size: int = 64,
    collator: Callable[[list[dict]], dict] | None = None,
    teacher_inputs: Callable[[dict], dict] | None = None,
    teacher_dtype: str = "auto",
    device: str | torch.device | None = None,
    shard_size: int = 2048,
    views: int = 1,
    view_seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    wait_timeout: float = 3600.0,
    progress: bool = True,
    num_workers: int = 0,
    teacher_name: str | None = None,
    teacher_revision: str | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    augmentation: str | None = None,
    tokenizer: Any = None,
    check_examples: int = 8,
) -> str:
    """Run the teacher once over ``dataset`` and store what ``recipe``'s terms read; returns the folder.

    Args:
        teacher: the teacher model (frozen here) or a :class:`~hfdistill.teacher.Teacher`.
        dataset: the training examples, in their deterministic (unaugmented) view, map-style; the cache is
            keyed by index in it, so train on the same dataset (the same order) with the cache.
        recipe: a :class:`~hfdistill.Recipe`, dict or YAML path: its terms' teacher taps are stored (every
            stage's); ``logits`` is always stored. None stores ``taps`` and ``logits`` only.
        path: the cache folder (created; an earlier build there is resumed).
        taps: more teacher taps to store.
        logits_top_k: store the k largest logits and the remaining mass instead of full logits.
        feature_dtype: ``float16`` (default), ``bfloat16`` or ``float32`` for tapped features.
        batch_size, collator, num_workers: how examples are batched (default collator:
            :class:`hfdistill.data.PaddingCollator`).
        teacher_inputs: ``batch -> teacher inputs`` (as ``DistillationTrainer(teacher_inputs=)``); by default
            the batch's ``teacher_*`` fields over its other input fields.
        teacher_dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16`` for the teacher's forward.
        device: where the teacher runs (default: this process's GPU, else the CPU).
        shard_size: examples per shard.
        views: 1 (default): the examples as ``dataset`` gives them (its deterministic view). N > 1: N augmented
            views of every example (FKD / ReLabel): ``dataset`` must augment with hfdistill's reproducible image
            transforms (``set_augmentation_epoch``); view v is what it gives at epoch v of a run seeded
            ``view_seed``, and training replays view ``epoch % N`` (module docstring).
        view_seed: the seed of the augmented views (stored; training draws the same augmentations from it).
        rank, world_size: this process's part (default: torch.distributed, else RANK/WORLD_SIZE, else 0/1).
        wait_timeout: how long rank 0 waits for the other ranks' shards before writing the manifest.
        teacher_name, teacher_revision, preprocessing, augmentation: recorded in the manifest (what the
            teacher is, how its inputs were made, which augmentation training will use).
        tokenizer: the teacher's tokenizer, saved in the cache (a recipe reading the cache tokenises with it).
        check_examples: examples of each shard already there whose input checksums are compared on resume.
    """
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise DistillationError(f"views must be a positive integer, got {views!r}")
    set_view = None
    if views > 1:
        from .trainer import augmentation_setter

        set_view = augmentation_setter(dataset)
        if set_view is None:
            raise DistillationError(
                f"views={views}: augmented views are drawn by the data's own augmentation, replayed in training, "
                "and this dataset has none that can be replayed (hfdistill's image transforms, built with "
                "`data.augment` other than none, have `set_augmentation_epoch`); give such a dataset, or views=1"
            )
    if logits_top_k is not None and (isinstance(logits_top_k, bool) or not isinstance(logits_top_k, int) or logits_top_k < 1):
        raise DistillationError(f"logits_top_k must be a positive integer or None, got {logits_top_k!r}")
    if feature_dtype not in FEATURE_DTYPES:
        raise DistillationError(f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}")
    if teacher_dtype not in TEACHER_DTYPES:
        raise DistillationError(f"teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {teacher_dtype!r}")
    for key, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DistillationError(f"{key} must be a positive integer, got {value!r}")
    if isinstance(teacher, TeacherCache):
        raise DistillationError("the teacher is already a cache; give the teacher model to build a cache from")
    if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        raise DistillationError("a cache is keyed by example index: the dataset must be map-style with a length")
    if rank is None or world_size is None:
        default_rank, default_world = _default_rank()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise DistillationError(f"rank {rank} is not in 0..{world_size - 1}")
    all_taps = list(dict.fromkeys(["logits", *recipe_teacher_taps(recipe), *taps]))
    folder = Path(path)
    device = torch.device(device) if device is not None else _default_device()

    if isinstance(teacher, Teacher):
        model = teacher.model
    elif isinstance(teacher, nn.Module):
        model = teacher
    else:
        raise DistillationError(f"the teacher must be an nn.Module or a Teacher, got {type(teacher).__name__}")
    sha256 = weights_hash(model)  # the weights as given, before any dtype cast
    if isinstance(teacher, Teacher):
        frozen = Teacher(model, all_taps, device=device, dtype="auto", inputs_fn=teacher.inputs_fn,
                         shared_input_names=teacher.shared_input_names)
    else:
        frozen = Teacher(model, all_taps, device=device, dtype=teacher_dtype, inputs_fn=teacher_inputs)
    if collator is None:
        from .data import PaddingCollator

        collator = PaddingCollator()
    builder = _Builder(frozen, dataset, folder, all_taps, top_k=logits_top_k, feature_dtype=feature_dtype,
                       batch_size=batch_size, shard_size=shard_size, collator=collator, num_workers=num_workers,
                       progress=progress, views=views, view_seed=view_seed, set_view=set_view)
    if builder.num_examples == 0:
        raise DistillationError("the dataset is empty: there is nothing to cache")
    identity = _identity(frozen, model, teacher_name, teacher_revision, sha256)
    frozen.attach()
    try:
        return _build(builder, frozen, folder, identity, rank, world_size, wait_timeout, check_examples,
                      logits_top_k=logits_top_k, feature_dtype=feature_dtype, views=views, shard_size=shard_size,
                      preprocessing=preprocessing, augmentation=augmentation, tokenizer=tokenizer, dataset=dataset,
                      progress=progress)
    finally:
        frozen.remove()


def _build(builder: _Builder, frozen: Teacher, folder: Path, identity: dict, rank: int, world_size: int,
           wait_timeout: float, check_examples: int, *, logits_top_k: int | None, feature_dtype: str, views: int,
           shard_size: int, preprocessing: Mapping[str, Any] | None, augmentation: str | None, tokenizer: Any,
           dataset: Any, progress: bool) -> str:
    all_taps = builder.taps
    builder.probe()
    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hfdistill_version": _version(),
        "teacher": identity,
        "taps": sorted(all_taps),
        "logits_top_k": logits_top_k,
        "feature_dtype": feature_dtype,
        "views": views,
        "view_seed": builder.view_seed if views > 1 else None,
        "num_examples": builder.num_examples,
        "shard_size": shard_size,
        "num_shards": builder.num_shards,
        "input_name": builder.input_name,
        "input_shape": builder.input_shape,
        "preprocessing": dict(preprocessing or {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    _check_or_write_build_spec(folder, spec)
    if (folder / MANIFEST_NAME).is_file():  # built before: a shard changed since is rebuilt, not re-listed
        try:
            listed = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("shards", [])
            builder.listed_sha256 = {entry["file"]: entry["sha256"] for entry in listed}
        except (OSError, ValueError, KeyError, TypeError):
            builder.listed_sha256 = {}
    if rank == 0 and tokenizer is not None and not (folder / TOKENIZER_DIR).is_dir():
        tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))

    mine = [i for i in range(builder.num_shards) if i % world_size == rank]
    todo = [i for i in mine if not builder.shard_is_complete(i, check_examples)]
    if len(todo) < len(mine):
        logger.info("teacher cache %s: %d of this process's %d shards are complete and kept", folder,
                    len(mine) - len(todo), len(mine))
    from tqdm.auto import tqdm

    total = sum(builder.shard_range(i)[1] - builder.shard_range(i)[0] for i in todo)
    with tqdm(total=total, desc=f"teacher cache (rank {rank}/{world_size})" if world_size > 1 else "teacher cache",
              unit="ex", disable=not progress or total == 0) as bar:
        for i in todo:
            builder.write_shard(i, bar)
    if rank != 0:
        return str(folder)
    _wait_for_shards(builder, world_size, wait_timeout)
    _write_manifest(folder, spec, builder, augmentation, dataset)
    return str(folder)


def _check_or_write_build_spec(folder: Path, spec: dict) -> None:
    path = folder / BUILD_NAME
    if not path.is_file():
        if any(folder.glob("shard-*.safetensors")):
            raise DistillationError(f"{folder} holds cache shards but no {BUILD_NAME}: it is not a cache this version "
                                    "can resume; use a new folder or delete this one")
        _write_json(path, spec)
        return
    cached = _read_json(path, "cache build description")
    if _major(cached.get("hfdistill_version", "")) != _major(spec["hfdistill_version"]):
        raise DistillationError(
            f"{folder} was started by hfdistill {cached.get('hfdistill_version')}, another major version than this "
            f"one ({spec['hfdistill_version']}); build into a new folder"
        )
    differ = []
    if cached.get("teacher", {}).get("weights_sha256") != spec["teacher"]["weights_sha256"]:
        differ.append(f"teacher weights sha256: {cached.get('teacher', {}).get('weights_sha256', '?')[:12]}... "
                      f"({cached.get('teacher', {}).get('name')}) in the cache, {spec['teacher']['weights_sha256'][:12]}... "
                      f"({spec['teacher']['name']}) now: another teacher")
    differ += _differences(cached.get("teacher", {}), spec["teacher"], ["dtype"])
    differ += _differences(cached, spec, ["taps", "logits_top_k", "feature_dtype", "views", "view_seed",
                                          "num_examples", "shard_size", "input_name", "input_shape", "preprocessing"])
    if differ:
        raise DistillationError(
            f"{folder} holds (part of) another cache, so it cannot be resumed: " + "; ".join(differ)
            + ". Build into a new folder, or delete this one to start over"
        )


def _wait_for_shards(builder: _Builder, world_size: int, wait_timeout: float) -> None:
    deadline = time.monotonic() + max(0.0, wait_timeout)
    while True:
        missing = [i for i in range(builder.num_shards) if not builder.shard_path(i).is_file()]
        if not missing:
            return
        if time.monotonic() >= deadline:
            owners = sorted({i % world_size for i in missing})
            raise DistillationError(
                f"the teacher cache in {builder.folder} is missing shard(s) {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, written by rank(s) {owners} of {world_size}; run them (the same "
                "command), then run rank 0 again: it keeps the complete shards and writes the manifest"
            )
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def _write_manifest(folder: Path, spec: dict, builder: _Builder, augmentation: str | None, dataset: Any) -> None:
    from safetensors import safe_open

    shards, digest, layout = [], hashlib.sha256(), None
    tokens, rest_masses = 0, []
    top_k_keys = [f"t/{tap}/rest_logmass" for tap, l in builder.layouts.items() if l.top_k is not None and l.kind == "tensor"]
    for i in range(builder.num_shards):
        path = builder.shard_path(i)
        start, stop = builder.shard_range(i)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            digest.update(f.get_tensor("input_checksum").numpy().tobytes())
            lengths = f.get_tensor("length") if "length" in f.keys() else None
            tokens += int(lengths.sum()) if lengths is not None else 0
            for key in top_k_keys:
                rest = f.get_tensor(key).float().exp()  # [n] or [n, T] (zeros past each length: mass 1, masked)
                if lengths is not None and rest.dim() == 2:
                    rest = rest[torch.arange(rest.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)]
                rest_masses.append(rest.flatten())
        shard_layout = json.loads(metadata.get("layout", "{}"))
        if layout is None:
            layout = shard_layout
        elif shard_layout != layout:
            raise DistillationError(f"shard {path} stores its taps differently from shard 0; delete the folder and build again")
        shards.append({"file": path.name, "start": start, "stop": stop, "bytes": path.stat().st_size,
                       "sha256": file_sha256(path)})
    fingerprint = getattr(dataset, "_fingerprint", None)
    size = sum(shard["bytes"] for shard in shards)
    sizes = {"bytes": size, "bytes_per_example": size / max(spec["num_examples"], 1)}  # all its views
    if tokens:
        sizes.update({"tokens": tokens, "bytes_per_token": size / tokens})
    if rest_masses:
        rest = torch.cat(rest_masses)
        # How much of the teacher's probability the top-k leaves to the other classes (one bucket in the losses).
        sizes["rest_mass"] = {"mean": float(rest.mean()), "median": float(rest.median()),
                              "p95": float(rest.quantile(0.95)) if rest.numel() < 2**24 else None,
                              "max": float(rest.max())}
    manifest = {
        **{k: spec[k] for k in ("format", "format_version", "hfdistill_version", "teacher")},
        "taps": layout,
        "logits_top_k": spec["logits_top_k"],
        "feature_dtype": spec["feature_dtype"],
        "preprocessing": {
            **spec["preprocessing"],
            "teacher_input": spec["input_name"],
            "input_shape": spec["input_shape"],
            "checksum": "per example: float64 sum, position-weighted sum and absolute sum of the teacher's main "
                        "input (token inputs masked by attention_mask)",
        },
        "data": {
            "num_examples": spec["num_examples"],
            "fingerprint": fingerprint,
            "checksums_sha256": digest.hexdigest(),
            "views": spec["views"],
            "view_seed": spec.get("view_seed"),
            "rows": spec["views"] * spec["num_examples"],
            "view": ("deterministic (eval-mode, unaugmented)" if spec["views"] == 1 else
                     f"{spec['views']} augmented views: row v * num_examples + i is example i as the data's "
                     f"augmentation draws it at epoch v of a run seeded {spec.get('view_seed')}"),
            "training_augmentation": augmentation,
        },
        "shard_size": spec["shard_size"],
        "size": sizes,
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(folder / MANIFEST_NAME, manifest)


# ------------------------------------------------------------------------------------ reading
def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a complete cache; a DistillationError that says what is wrong otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise DistillationError(
            f"there is no teacher cache at {folder}; build one with `hfdistill cache RECIPE --output {folder}` or "
            "hfdistill.cache.build_cache(teacher, dataset, recipe, path)"
        )
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        if (folder / BUILD_NAME).is_file():
            raise DistillationError(
                f"the teacher cache at {folder} is incomplete (no {MANIFEST_NAME}): its build was interrupted or "
                "other ranks have not finished; run the same build again, it keeps the complete shards"
            )
        raise DistillationError(f"{folder} is not a teacher cache (no {MANIFEST_NAME}); build one with `hfdistill cache`")
    manifest = _read_json(manifest_path, "cache manifest")
    if manifest.get("format") != FORMAT:
        raise DistillationError(f"{manifest_path} is not a teacher cache manifest (format {manifest.get('format')!r})")
    version = str(manifest.get("hfdistill_version", "?"))
    if _major(version) != _major(_version()) or manifest.get("format_version") != FORMAT_VERSION:
        raise DistillationError(
            f"the teacher cache at {folder} was written by hfdistill {version} (cache format "
            f"{manifest.get('format_version')}), another major version than this hfdistill {_version()} (format "
            f"{FORMAT_VERSION}), whose cache layout may differ; build it again with this version"
        )
    return manifest


class TeacherCache(Teacher):
    """Stored teacher outputs behind the :class:`~hfdistill.teacher.Teacher` interface.

    Args:
        path: a folder written by :func:`build_cache` / ``hfdistill cache``.
        device: where returned tensors go (default: the batch's device, from its ``index``).
        inputs_fn / shared_input_names: ``batch -> teacher inputs``, as for a live Teacher (a trainer sets
            them); used to compare the training batches' teacher inputs with the stored checksums.
        augmented: the training batches are augmented on purpose while the cache holds the deterministic
            view: a checksum difference then warns once instead of failing.
        check_batches: how many ``features`` calls compare their inputs with the stored checksums.
        teacher: optionally the teacher model: refused when its weights are not the cached teacher's.
        verify: ``sha256`` (every shard's hash, read once) or ``size`` (file sizes only, for huge caches).
        memory_map: map the shards into memory (:func:`map_safetensors`, the default): a batch reads only its
            rows' pages, a cache larger than the memory works, and the processes of a multi-process run share
            one copy in the page cache. False loads every shard whole.
    """

    is_cache = True

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None, *,
                 inputs_fn: Callable[[dict], dict] | None = None, shared_input_names: Iterable[str] = (),
                 augmented: bool = False, check_batches: int = 16, teacher: nn.Module | None = None,
                 verify: str = "sha256", memory_map: bool = True):
        import safetensors.torch

        if verify not in ("sha256", "size"):
            raise DistillationError(f"verify must be 'sha256' or 'size', got {verify!r}")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.model = None
        self.device = torch.device(device) if device is not None else None
        self.dtype = torch.float32
        self.inputs_fn = inputs_fn
        self.shared_input_names = set(shared_input_names)
        identity = self.manifest["teacher"]
        self.input_names = set(identity.get("input_names") or [])
        self.layouts: dict[str, dict] = self.manifest["taps"]
        self.taps = CachedTaps(self.layouts)
        self.active_taps: list[str] = list(self.layouts)
        self.augmented = augmented
        self.check_batches = check_batches
        self._checked = 0
        self._warned = False
        self.num_examples = int(self.manifest["data"]["num_examples"])
        self.views = int(self.manifest["data"].get("views") or 1)
        self.view_seed = self.manifest["data"].get("view_seed")
        self.view = 0  # which augmented view training reads (set_view, each epoch)
        self.shard_size = int(self.manifest["shard_size"])
        self._shards: list[dict[str, torch.Tensor]] = []
        for entry in self.manifest["shards"]:
            file = self.path / entry["file"]
            where = f"shard {entry['file']} (examples {entry['start']}..{entry['stop'] - 1}) of the teacher cache at {self.path}"
            if not file.is_file():
                raise DistillationError(f"{where} is missing; build the cache again with the same command: it "
                                        "writes only the missing shards")
            size = file.stat().st_size
            if size != entry["bytes"] or (verify == "sha256" and file_sha256(file) != entry["sha256"]):
                raise DistillationError(
                    f"{where} is corrupt: its {'size' if size != entry['bytes'] else 'sha256'} is not the one in "
                    f"{MANIFEST_NAME}; delete the file and build the cache again (the other shards are kept)"
                )
            tensors = map_safetensors(file) if memory_map else safetensors.torch.load_file(str(file))
            if not torch.equal(tensors["index"], torch.arange(entry["start"], entry["stop"])):
                raise DistillationError(f"{where} holds other examples than its manifest entry says; build it again")
            self._shards.append(tensors)
        if teacher is not None:
            self.check_teacher(teacher)

    # ---- what the cache is ----
    @property
    def name(self) -> str:
        return str(self.manifest["teacher"].get("name") or "teacher")

    @property
    def num_parameters(self) -> int | None:
        return self.manifest["teacher"].get("num_parameters")

    @property
    def num_labels(self) -> int | None:
        logits = self.layouts.get("logits")
        if logits is None:
            return None
        return logits.get("num_classes") or (logits["shapes"][0][-1] if logits["shapes"][0] else None)

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.path)!r}: {self.num_examples} examples of {self.name}, taps "
                f"{', '.join(self.layouts)})")

    def describe(self) -> str:
        size = sum(e["bytes"] for e in self.manifest["shards"])
        return (f"{self.name} (cached in {self.path}: {self.num_examples} examples, taps {', '.join(self.layouts)}, "
                f"{size / 1e6:.1f} MB)")

    # ---- checks ----
    def check_teacher(self, model: nn.Module) -> None:
        """Refuse a teacher model whose weights are not the ones the cache was built with."""
        cached = self.manifest["teacher"].get("weights_sha256")
        found = weights_hash(model)
        if found != cached:
            raise DistillationError(
                f"the teacher cache at {self.path} was built by teacher {self.name} (weights sha256 {cached[:12]}...), "
                f"but the teacher given has weights sha256 {found[:12]}...: another teacher or other weights. Build a "
                "cache for this teacher (`hfdistill cache RECIPE --output NEW_DIR`), or use the teacher itself"
            )

    def check_taps(self, taps: Iterable[str]) -> None:
        missing = [t for t in dict.fromkeys(taps) if t not in self.layouts]
        if missing:
            raise DistillationError(
                f"the recipe's terms read teacher tap(s) {missing} that the teacher cache at {self.path} does not hold "
                f"(it holds {', '.join(self.layouts)}); build a cache with a recipe whose terms read them "
                "(`hfdistill cache RECIPE`), or give the teacher model"
            )

    def check_terms(self, terms: Iterable[Any]) -> list[str]:
        """Refuse terms that call the teacher on new inputs and taps the cache lacks; use only the taps read."""
        from . import losses as loss_registry

        used: list[str] = []
        for term in terms:
            if not loss_registry.needs_teacher(term.spec.loss, term.spec.params):
                continue
            _refuse_live(term)
            used += [t for t in term.teacher_taps if t not in used]
        self.check_taps(used)
        self.active_taps = used or ["logits"]
        return used

    def check_dataset(self, dataset: Any) -> None:
        """Refuse training data of another length; (its content is checked on the first batches)."""
        if dataset is None or not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
            raise DistillationError(
                "a teacher cache is read by example index: the training dataset must be map-style with a length"
            )
        if len(dataset) != self.num_examples:
            raise DistillationError(
                f"the teacher cache at {self.path} holds {self.num_examples} examples, but the training data has "
                f"{len(dataset)}: other data (another split, subset or max_train_samples) than the cache was built "
                "from; build a cache for this data (`hfdistill cache RECIPE`)"
            )

    def prepare(self, terms: Iterable[Any], dataset: Any, inputs_fn: Callable[[dict], dict] | None,
                shared_input_names: Iterable[str]) -> None:
        """What a trainer does with a cache teacher: its inputs mapping, its terms and its dataset checked."""
        if self.inputs_fn is None:
            self.inputs_fn = inputs_fn
        if not self.shared_input_names:
            self.shared_input_names = set(shared_input_names)
        self.check_terms(terms)
        if dataset is not None:
            self.check_dataset(dataset)

    def verify_data(self, dataset: Any, collator: Callable[[list[dict]], dict] | None = None,
                    num_examples: int = 256, batch_size: int = 64) -> None:
        """Compare the teacher inputs of up to ``num_examples`` examples (spread over ``dataset``, its
        deterministic view) with the stored checksums; a DistillationError saying what differs."""
        from .data import PaddingCollator
        from .terms import IndexedCollator, IndexedDataset

        self.check_dataset(dataset)
        collate = IndexedCollator(collator or PaddingCollator())
        indexed = IndexedDataset(dataset)
        n = min(num_examples, self.num_examples)
        picks = sorted({int(round(i * (self.num_examples - 1) / max(1, n - 1))) for i in range(n)})
        for lo in range(0, len(picks), batch_size):
            chunk = picks[lo:lo + batch_size]
            rows = indexed.__getitems__(chunk)
            self._check_inputs(collate(rows), strict=True)

    # ---- the interface ----
    def call_inputs(self, batch: dict) -> dict:
        inputs = super().call_inputs(batch)
        if not inputs:  # not told which fields the teacher reads: every input field of the batch
            inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        return inputs

    def _index(self, batch: dict) -> torch.Tensor:
        index = batch.get("index") if isinstance(batch, dict) else None
        if not isinstance(index, torch.Tensor):
            raise DistillationError(
                "a teacher cache reads stored outputs by example index, and this batch has no `index`; "
                "DistillationTrainer adds it to training batches (teacher evaluation on other data needs the "
                "teacher model), and outside a trainer wrap the dataset in hfdistill.terms.IndexedDataset"
            )
        index = index.detach().to("cpu", torch.long).flatten()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.num_examples):
            raise DistillationError(
                f"example index {int(index.max())} is beyond the teacher cache's {self.num_examples} examples: "
                "the training data is larger than the data the cache was built from; build a cache for this data"
            )
        return index + self.view * self.num_examples  # the rows of the view in use

    def set_view(self, epoch: int) -> int:
        """Read view ``epoch % views`` from now on (a trainer calls it at every epoch); returns the view."""
        self.view = int(epoch) % self.views
        return self.view

    def _check_inputs(self, batch: dict, strict: bool = False) -> None:
        index = self._index(batch)
        inputs = self.call_inputs(batch)
        name, found, _ = input_checksums(inputs)
        prep = self.manifest.get("preprocessing", {})
        cached_name, cached_shape = prep.get("teacher_input"), prep.get("input_shape")
        shape = list(inputs[name].shape[1:])
        described = {k: v for k, v in prep.items() if k not in ("checksum", "teacher_input", "input_shape")} or \
            "not recorded (built from Python)"
        if cached_name and name != cached_name:
            raise DistillationError(
                f"the teacher's main input is {name!r} here but {cached_name!r} in the teacher cache at {self.path}: "
                "other preprocessing; build a cache for this setup"
            )
        if cached_shape is not None and shape != cached_shape:
            raise DistillationError(
                f"other preprocessing: the teacher's inputs ({name}) have shape {shape} per example here, but "
                f"{cached_shape} in the teacher cache at {self.path} (built with {_short(described)}); build a "
                "cache with this resolution and preprocessing, or train with the cache's"
            )
        stored = self._gather("input_checksum", index)
        bad = (~checksums_match(found, stored)).nonzero().flatten()
        if not len(bad):
            return
        if self.augmented and not strict:
            if not self._warned:
                warnings.warn(
                    f"the training batches are augmented, while the teacher cache at {self.path} holds the teacher's "
                    "outputs on the deterministic (unaugmented) view of each example: the student learns from the "
                    "teacher's outputs on the unaugmented image (as FKD/ReLabel with one view). Set `data.augment: "
                    "none` to train on exactly the cached view.", UserWarning, stacklevel=3)
                self._warned = True
            self.check_batches = 0
            return
        data = self.manifest.get("data", {})
        raise DistillationError(
            f"the teacher inputs of training example(s) {[int(index[b]) % self.num_examples for b in bad[:5]]} ({len(bad)} of {len(index)} "
            f"checked) differ from those the teacher cache at {self.path} was built from: other data (another "
            "dataset, split, order, subset or seed) or other preprocessing (resolution, normalisation, tokenizer, "
            f"max_length) than at build time (cache: {data.get('num_examples')} examples, fingerprint "
            f"{data.get('fingerprint')}, preprocessing {_short(described)}). Build a cache for this data "
            "(`hfdistill cache RECIPE`). If the training batches are augmented on purpose, build the cache from "
            "the deterministic view and open it with TeacherCache(path, augmented=True) (a recipe with "
            "`teacher: {cache: ...}` does this itself)"
        )

    def _gather(self, key: str, index: torch.Tensor, seq_dims: Sequence[int] = (), length: int | None = None) -> torch.Tensor:
        """Rows ``index`` of a stored tensor (sequence dims cropped/padded to ``length``)."""
        shard_ids = torch.div(index, self.shard_size, rounding_mode="floor")
        local = index - shard_ids * self.shard_size
        parts, where = [], []
        for s in shard_ids.unique().tolist():
            mask = shard_ids == s
            tensors = self._shards[s]
            if key not in tensors:
                raise DistillationError(f"the teacher cache at {self.path} has no {key!r} in shard {s}; build it again")
            rows = tensors[key][local[mask]]
            if seq_dims and length is not None:
                rows = _resize_dims(rows, [d + 1 for d in seq_dims], length)
            parts.append(rows)
            where.append(mask.nonzero().flatten())
        if len(parts) == 1:
            return parts[0]
        out = parts[0].new_empty((len(index), *parts[0].shape[1:]))
        for rows, positions in zip(parts, where):
            out[positions] = rows
        return out

    def _value(self, tap: str, index: torch.Tensor, length: int | None) -> Any:
        """The stored value of ``tap`` for examples ``index``: fp32 tensors, or :class:`SparseLogits` for a
        top-k logits tap (the terms give full logits to the losses that do not read a top-k themselves)."""
        layout = self.layouts[tap]
        values = []
        for i, dims in enumerate(layout["seq_dims"]):
            key = f"t/{tap}" if layout["kind"] == "tensor" else f"t/{tap}/{i}"
            if layout.get("top_k"):
                # The class dim is never a sequence dim: values/indices [.., k] and the mass [..] keep the others.
                rows = SparseLogits(*(self._gather(f"{key}/{part}", index, dims, length) for part in LOGITS_KEYS),
                                    layout["num_classes"])
            else:
                rows = self._gather(key, index, dims, length).float()
            values.append(rows)
        return values if layout["kind"] == "list" else values[0]

    def _sequence_length(self, batch: dict) -> int | None:
        if not any(dims for layout in self.layouts.values() for dims in layout["seq_dims"]):
            return None
        inputs = self.call_inputs(batch)
        return int(inputs[main_input_name(inputs)].shape[1])

    def features(self, batch: dict) -> dict[str, Any]:
        """The stored teacher values of the batch's examples for the taps in use, fp32, on the batch's device
        (a top-k logits tap as :class:`SparseLogits`)."""
        index = self._index(batch)
        if self._checked < self.check_batches:
            self._check_inputs(batch)
            self._checked += 1
        device = self.device if self.device is not None else batch["index"].device
        length = self._sequence_length(batch)
        return {tap: to_device(self._value(tap, index, length), device) for tap in self.active_taps}

    def read(self, batch: dict, taps: Iterable[str]) -> dict[str, Any]:
        """The stored values of ``taps`` for the batch's examples as full fp32 tensors (a tap the cache lacks is
        refused)."""
        taps = list(taps)
        self.check_taps(taps)
        index = self._index(batch)
        device = self.device if self.device is not None else batch["index"].device
        length = self._sequence_length(batch)
        return {tap: sparse_as_dense(to_device(self._value(tap, index, length), device)) for tap in taps}

    def outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"logits": self.logits(batch)}

    def logits(self, batch: dict) -> torch.Tensor:
        return self.read(batch, ["logits"])["logits"]

    def attach(self) -> None:
        self.taps.attach()

    def remove(self) -> None:
        self.taps.remove()


def is_cache(teacher: Any) -> bool:
    return isinstance(teacher, TeacherCache)


# ------------------------------------------------------------------------------------ recipes and the CLI
def load_cached_teacher(recipe: Any, raw: Any, student: Any, task: str, load_model: Callable[..., Any]) -> Any:
    """The LoadedModel of ``teacher: {cache: DIR}`` for :func:`hfdistill.run.plan_run`, checked against the data.

    The cache's teacher preprocessing (image size and normalisation, or its tokenizer saved in the cache)
    makes the teacher's inputs; the deterministic view of the training data is compared with the stored
    checksums (examples spread over the data) and the number of examples; with ``teacher.name`` given too,
    that model is loaded and its weights hash compared. Training augmentation (``data.augment``) makes the
    cache ``augmented`` and warns once.
    """
    from .data import build_task_data
    from .models import ImageConfig, LoadedModel
    from .tasks import get_task

    spec = recipe.teacher
    try:
        cache = TeacherCache(spec.cache)
    except DistillationError as exc:
        raise RecipeError("teacher.cache", str(exc)) from None
    if spec.name is not None:
        verify_spec = dataclasses.replace(spec, cache=None)
        model = load_model(verify_spec, "teacher", task, raw.num_labels, dict(enumerate(raw.label_names)))
        try:
            cache.check_teacher(model.model)
        except DistillationError as exc:
            raise RecipeError("teacher.name", str(exc)) from None
        del model
    identity = cache.manifest["teacher"]
    prep = cache.manifest.get("preprocessing", {})
    id2label = identity.get("id2label")
    from .models import _real_labels

    info = get_task(task)
    # A language model's logits are over its vocabulary, not over the data's classes (it has none).
    num_labels = raw.num_labels if info.targets == "tokens" else (cache.num_labels or raw.num_labels)
    loaded = LoadedModel(model=cache, role="teacher", name=f"{cache.name} (cache {Path(spec.cache).name})",
                         num_labels=num_labels,
                         id2label=_real_labels({int(k): v for k, v in id2label.items()}) if id2label else None)
    if prep.get("image"):
        image = prep["image"]
        loaded.image_config = ImageConfig(size=tuple(image["size"]), channels=int(image["channels"]),
                                          mean=tuple(image["mean"]), std=tuple(image["std"]),
                                          interpolation=image.get("interpolation", "bilinear"))
    tokenizer_dir = Path(spec.cache) / TOKENIZER_DIR
    if tokenizer_dir.is_dir():
        from transformers import AutoTokenizer

        loaded.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if info.inputs == "image" and loaded.image_config is None:
        raise RecipeError("teacher.cache", f"the teacher cache at {spec.cache} records no image preprocessing; build it "
                          "with `hfdistill cache`")
    if info.inputs == "text" and loaded.tokenizer is None:
        raise RecipeError("teacher.cache", f"the teacher cache at {spec.cache} has no {TOKENIZER_DIR}/; build it with "
                          "`hfdistill cache`")
    # The deterministic view of the training data must be what the cache was built from.
    augment = recipe.data.augment if recipe.data.augment != "auto" else raw.default_augment
    if cache.views > 1:
        # Augmented views: the training data's own augmentation, at view 0, must give the stored inputs.
        from .trainer import augmentation_setter

        plain = build_task_data(raw, task, student, loaded, recipe.data.augment, recipe.data.max_length)
        set_view = augmentation_setter(plain.train)
        if set_view is None or augment == "none":
            raise RecipeError("data.augment", f"the teacher cache at {spec.cache} holds {cache.views} augmented views "
                              f"(built with data.augment {cache.manifest['data'].get('training_augmentation')!r}), "
                              f"replayed one per epoch, but this recipe's data is not augmented ({augment!r}); set "
                              "data.augment as it was when the cache was built")
        set_view(cache.set_view(0), int(cache.view_seed))
    else:  # the deterministic view
        plain = build_task_data(raw, task, student, loaded, "none", recipe.data.max_length)
    cache.inputs_fn = plain.teacher_inputs
    try:
        cache.verify_data(plain.train, plain.collator)
    except DistillationError as exc:
        raise RecipeError("teacher.cache", str(exc)) from None
    cache.inputs_fn = None  # the trainer sets the inputs mapping of the data it trains on
    if info.inputs == "image" and augment != "none" and cache.views == 1:
        cache.augmented = True
        cache._warned = True  # said here, once
        warnings.warn(
            f"data.augment is {augment!r}, while the teacher cache at {spec.cache} holds the teacher's outputs on the "
            "unaugmented training images: the student trains on augmented images against the teacher's outputs on "
            "the plain ones. Set `data.augment: none` to train on exactly the cached view.", UserWarning, stacklevel=2)
    return loaded


def _preprocessing(teacher: Any, recipe: Any) -> dict:
    """What the teacher's inputs were made with (from a LoadedModel and the recipe)."""
    out: dict[str, Any] = {"data": recipe.data.name, "max_length": recipe.data.max_length}
    if teacher.image_config is not None:
        config = teacher.image_config
        out["image"] = {"size": list(config.size), "channels": config.channels, "mean": list(config.mean),
                        "std": list(config.std), "interpolation": config.interpolation}
    if teacher.tokenizer is not None:
        out["tokenizer"] = getattr(teacher.tokenizer, "name_or_path", None) or type(teacher.tokenizer).__name__
    return out


def cache_command(recipe_path: str, overrides: Sequence[str] = (), output: str | None = None,
                  logits_top_k: int | None = None, feature_dtype: str = "float16", batch_size: int = 64,
                  progress: bool = True, views: int = 1) -> str:
    """``hfdistill cache``: load the recipe's teacher and training data as ``train`` does, build the cache.

    ``views`` > 1: that many augmented views of every example, drawn by the recipe's ``data.augment`` with the
    recipe's ``training.seed`` as the view seed, replayed by training (one per epoch)."""
    from .run import _default_output_dir, _resolve_recipe, plan_run

    recipe, path = _resolve_recipe(recipe_path, overrides)
    if recipe.teacher is None:
        raise RecipeError("teacher", "the recipe has no `teacher:`; a cache stores a teacher's outputs")
    if recipe.teacher.cache is not None:
        raise RecipeError("teacher.cache", "the recipe already reads a teacher cache; give the teacher model "
                          "(`teacher: {name: ...}`) to build one")
    try:
        recipe_teacher_taps(recipe)
    except DistillationError as exc:
        raise RecipeError("terms", str(exc)) from None
    if logits_top_k is not None and logits_top_k < 1:
        raise RecipeError("--logits_top_k", f"must be >= 1, got {logits_top_k}")
    if views < 1:
        raise RecipeError("--views", f"must be >= 1, got {views}")
    if views > 1 and recipe.data.augment == "none":
        raise RecipeError("data.augment", f"--views {views} caches augmented views of every example, and the recipe "
                          "does not augment (data.augment: none); give an augmentation, or --views 1")
    # The deterministic view (views 1), or the training data with its augmentation (views > 1).
    built = recipe if views > 1 else dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, augment="none"))
    plan = plan_run(built, path)
    if any(job.label == "teacher" for job in plan.jobs):
        raise RecipeError("teacher.train_from", f"the teacher {plan.teacher_folder} does not exist yet; train it "
                          f"first (`hfdistill train {recipe_path}` trains it before the student), then build the cache")
    out_dir = recipe.training.get("output_dir") or _default_output_dir(path)
    output = output or f"{out_dir.rstrip('/')}-teacher-cache"
    data = plan.final.data
    use_cpu = bool(recipe.training.get("use_cpu")) or not torch.cuda.is_available()
    folder = build_cache(
        plan.teacher.model, data.train, recipe, output, logits_top_k=logits_top_k, feature_dtype=feature_dtype,
        batch_size=batch_size, collator=data.collator, teacher_inputs=data.teacher_inputs,
        teacher_dtype=recipe.training.get("teacher_dtype", "auto"),
        device="cpu" if use_cpu else None, progress=progress,
        teacher_name=recipe.teacher.name, teacher_revision=recipe.teacher.revision,
        preprocessing=_preprocessing(plan.teacher, recipe), augmentation=recipe.data.augment,
        tokenizer=plan.teacher.tokenizer, views=views, view_seed=int(recipe.training.get("seed", 42)),
    )
    return folder


def cache_usage(folder: str, recipe_path: str) -> str:
    """What ``hfdistill cache`` prints when done: where the cache is and how to train with it."""
    manifest = read_manifest(folder)
    size = sum(e["bytes"] for e in manifest["shards"])
    taps = ", ".join(manifest["taps"])
    sizes = manifest.get("size", {})
    lines = [
        f"teacher cache: {folder} ({manifest['data']['num_examples']} examples of {manifest['teacher']['name']}; "
        f"taps {taps}; {len(manifest['shards'])} shard(s), {size / 1e6:.1f} MB)",
    ]
    if sizes.get("tokens"):
        lines.append(f"  {sizes['tokens']} tokens, {sizes['bytes_per_token']:.0f} bytes per token")
    if sizes.get("rest_mass"):
        rest = sizes["rest_mass"]
        lines.append(f"  logits top-{manifest['logits_top_k']}: the other classes hold {rest['mean']:.2%} of the "
                     f"teacher's probability on average (median {rest['median']:.2%}, max {rest['max']:.2%}); "
                     "raise --logits_top_k if that is large")
    return "\n".join(lines + [
        "Train with it: in the recipe, replace the teacher by",
        f"  teacher: {{cache: {folder}}}",
        f"or: hfdistill train {recipe_path} --teacher '{{cache: {folder}}}'",
    ])
