"""Data: from a recipe's ``data:`` section to the tensors teacher and student read.

Two steps:

1. :func:`load_raw_data` gives a train and an eval split with an image or text column and integer
   labels (or segmentation maps), from a built-in offline source (``sklearn-digits``, ``fashion-mnist``,
   ``chatterbot-corpus``, ``fashion-mnist-scenes``), ``imagefolder``, ``csv``/``json`` files, a folder written
   by ``save_to_disk`` (``disk``), a ``datasets`` Hub id, or a ``DatasetDict`` passed from Python. A validation
   split is made (seeded) when there is none.
2. :func:`build_task_data` turns the splits into model inputs with the task's data builder (the
   table in :mod:`hfdistill.tasks`: :func:`image_classification_data`, :func:`text_classification_data`,
   :func:`causal_lm_data`, :func:`hfdistill.data_dense.segmentation_data`)
   and the preprocessing of the models themselves: image size, channels, mean and std from the student's config (the teacher's inputs are
   re-normalised/resized on the device when its config differs), and each model's own tokenizer.

Everything runs on whole batches (DESIGN.md: reading a ``datasets.Dataset`` row by row costs about
0.9 ms an example): the built-in image sources are decoded once into one uint8 tensor at the model's
resolution, and other datasets get a batched ``with_transform``; both are read through
``__getitems__``, which the DataLoader calls once per batch.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import RecipeError
from .models import ImageConfig, LoadedModel, max_positions
from .recipe import DataSpec
from .tasks import IMAGE_COLUMNS, LABEL_COLUMNS, TEXT_COLUMNS, get_task  # noqa: F401 - column names re-exported

BUILTIN_SOURCES = ("sklearn-digits", "fashion-mnist", "chatterbot-corpus", "fashion-mnist-scenes")
# The `data.*` fields each built-in source reads besides the sizes, seeds and augmentation every source
# has; the others do not apply to it (recipe validation refuses them rather than ignore them).
BUILTIN_SOURCE_FIELDS = {
    "sklearn-digits": ("validation_fraction",),
    "fashion-mnist": ("data_dir",),
    "chatterbot-corpus": ("options", "validation_fraction", "train_split"),
    "fashion-mnist-scenes": ("data_dir", "options"),
}
SOURCE_AGNOSTIC_FIELDS = ("name", "seed", "image_size", "max_length", "max_train_samples", "max_eval_samples", "augment",
                          "completion_only_loss", "packing")
FILE_SOURCES = ("imagefolder", "csv", "json", "disk")
# flip: random horizontal flips only (segmentation flips the image and its map together).
AUGMENTATIONS = ("none", "crop", "crop_flip", "rrc_flip", "flip")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
EVAL_SPLITS = ("validation", "valid", "val", "test")


@dataclass
class ImageArrays:
    """An in-memory image split: uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageArrays":
        return ImageArrays(self.images[index], self.labels[index])


@dataclass
class RawData:
    """Train and eval splits with integer labels, before any model-specific preprocessing."""

    train: Any  # ImageArrays or datasets.Dataset
    eval: Any
    label_names: list[str]
    input_column: str  # "image" or "text" column name in a datasets.Dataset ("image" for ImageArrays)
    label_column: str = "label"
    default_augment: str = "crop_flip"
    # Language modelling (a task whose targets are tokens): the splits' format, `text` (a `text` column),
    # `prompt_completion` (`prompt`, `completion`) or `chat` (`messages`), the columns renamed to these names;
    # label_names is then empty. And the data section's choices the data builder reads.
    lm_format: str | None = None
    completion_only_loss: bool = True
    packing: bool = False
    # Semantic segmentation: whether the maps' 0 means "no label" and class k is stored as k + 1 (None: as the
    # student's image processor says), and a sentence the summary and the card show about the data (synthetic
    # scenes say so).
    reduce_labels: bool | None = None
    note: str | None = None
    # Object detection: how the objects' boxes are written, ``xywh`` (COCO) or ``xyxy`` (Pascal VOC), in pixels.
    box_format: str = "xywh"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class TaskData:
    """What a trainer needs: datasets yielding model inputs, a collator, and the teacher's input mapping."""

    train: Any
    eval: Any
    label_names: list[str]
    collator: Callable[[list[dict]], dict]
    teacher_inputs: Callable[[dict], dict] | None = None
    id2label: dict[int, str] = field(default_factory=dict)
    # What the summary and the card may report about the data (language modelling: format and token counts,
    # see causal_lm_data); empty for the other tasks.
    stats: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ sources
def _digits() -> tuple[ImageArrays, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 values in 0..16 -> uint8 0..255, one channel.
    images = torch.tensor(np.round(digits.images * (255.0 / 16.0)), dtype=torch.uint8).unsqueeze(1)
    return ImageArrays(images, torch.tensor(digits.target, dtype=torch.long)), [str(i) for i in range(10)]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(data_dir: str | None) -> tuple[ImageArrays, ImageArrays, list[str]]:
    folder = Path(data_dir or FASHION_MNIST_DIR)
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    missing = [name for pair in files.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise RecipeError(
            "data.name",
            f"fashion-mnist needs the files {', '.join(missing)} in {folder}, which are not there. Install the "
            "Debian package: `sudo apt-get install dataset-fashion-mnist` (it puts them in "
            f"{FASHION_MNIST_DIR}), or set `data.data_dir` to a folder holding the four idx .gz files.",
        )
    splits = {}
    for split, (images, labels) in files.items():
        x = torch.from_numpy(_read_idx(folder / images).copy()).unsqueeze(1)
        y = torch.from_numpy(_read_idx(folder / labels).astype(np.int64))
        splits[split] = ImageArrays(x, y)
    return splits["train"], splits["test"], list(FASHION_MNIST_LABELS)


def _chatterbot_topics(language: str = "english", topics: Sequence[str] | None = None) -> dict[str, list[list[str]]]:
    """``{topic: [conversation, ...]}`` of the chatterbot corpus, each conversation a list of statements."""
    import yaml

    try:
        import chatterbot_corpus as corpus
    except ImportError:
        raise RecipeError(
            "data.name",
            "chatterbot-corpus is not installed; `pip install chatterbot-corpus` (it is in the `test` extra)",
        ) from None
    folder = Path(corpus.__file__).parent / "data" / language
    if not folder.is_dir():
        available = sorted(p.name for p in folder.parent.iterdir() if p.is_dir())
        raise RecipeError("data.options.language", f"no corpus for {language!r}; available: {', '.join(available)}")
    files = {p.stem: p for p in sorted(folder.glob("*.yml"))}
    if topics:
        unknown = [t for t in topics if t not in files]
        if unknown:
            raise RecipeError("data.options.topics", f"unknown topic(s) {unknown}; available: {', '.join(files)}")
        files = {t: files[t] for t in topics}
    found = {}
    for topic, path in files.items():
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        found[topic] = [[str(u).strip() for u in conversation] for conversation in content.get("conversations", []) or []]
    return found


def chatterbot_corpus(language: str = "english", topics: Sequence[str] | None = None):
    """The chatterbot corpus as a text-classification ``datasets.Dataset``: each utterance, its topic as label."""
    import datasets

    texts, labels, seen = [], [], set()
    conversations = _chatterbot_topics(language, topics)
    names = list(conversations)
    for label, (topic, topic_conversations) in enumerate(conversations.items()):
        for conversation in topic_conversations:
            for text in conversation:
                if text and (text, topic) not in seen:  # the corpus repeats questions with several answers
                    seen.add((text, topic))
                    texts.append(text)
                    labels.append(label)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def chatterbot_chats(language: str = "english", topics: Sequence[str] | None = None):
    """The chatterbot corpus as chats for language modelling: a ``datasets.Dataset`` with a ``messages`` column.

    Each pair of consecutive statements of a conversation is one chat, the first as the user's turn and the
    second as the assistant's (a conversation of n statements gives n - 1 chats); a pair seen before is
    left out (the corpus repeats some).
    """
    import datasets

    chats, seen = [], set()
    for topic_conversations in _chatterbot_topics(language, topics).values():
        for conversation in topic_conversations:
            for question, answer in zip(conversation, conversation[1:]):
                if question and answer and (question, answer) not in seen:
                    seen.add((question, answer))
                    chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return datasets.Dataset.from_dict({"messages": chats})


def is_saved_dataset(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` holds a ``Dataset``/``DatasetDict`` written by ``save_to_disk``."""
    if not folder or not os.path.isdir(folder):
        return False
    return (os.path.isfile(os.path.join(folder, "dataset_dict.json"))
            or os.path.isfile(os.path.join(folder, "state.json")) and os.path.isfile(os.path.join(folder, "dataset_info.json")))


def _load_from_disk(spec: DataSpec):
    """``data: {name: disk, data_dir: FOLDER}`` (or ``name: FOLDER``): what ``save_to_disk`` wrote there."""
    import datasets

    folder = spec.data_dir if spec.name == "disk" else spec.name
    where = "data.data_dir" if spec.name == "disk" else "data.name"
    if not folder:
        raise RecipeError("data.data_dir", "`disk` needs `data_dir`: a folder written by Dataset.save_to_disk or "
                          "DatasetDict.save_to_disk")
    if not os.path.isdir(folder):
        raise RecipeError(where, f"folder {folder!r} does not exist")
    if not is_saved_dataset(folder):
        raise RecipeError(where, f"{folder!r} is not a folder written by save_to_disk (it has no dataset_dict.json, "
                          "nor state.json with dataset_info.json)")
    if spec.options:
        raise RecipeError("data.options", f"`disk` takes no options; got {sorted(spec.options)}")
    try:
        return datasets.load_from_disk(folder)
    except (OSError, ValueError) as exc:
        raise RecipeError(where, f"cannot read the saved dataset in {folder!r}: {exc}") from None


def _load_datasets_source(spec: DataSpec):
    import datasets

    if spec.name == "disk" or is_saved_dataset(spec.name):
        return _load_from_disk(spec)
    try:
        if spec.name == "imagefolder":
            if not spec.data_dir:
                raise RecipeError("data.data_dir", "`imagefolder` needs `data_dir`: a folder with one sub-folder per class")
            if not os.path.isdir(spec.data_dir):
                raise RecipeError("data.data_dir", f"folder {spec.data_dir!r} does not exist")
            return datasets.load_dataset("imagefolder", data_dir=spec.data_dir, **spec.options)
        if spec.name in ("csv", "json"):
            if not spec.data_files:
                raise RecipeError("data.data_files", f"`{spec.name}` needs `data_files`: a file, a list, or {{split: file}}")
            return datasets.load_dataset(spec.name, data_files=spec.data_files, **spec.options)
        return datasets.load_dataset(spec.name, data_dir=spec.data_dir, data_files=spec.data_files, **spec.options)
    except RecipeError:
        raise
    except FileNotFoundError as exc:
        raise _source_error(spec, exc) from None
    except (OSError, ValueError, ConnectionError) as exc:
        raise _source_error(spec, exc) from None


def _source_error(spec: DataSpec, exc: Exception) -> RecipeError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and spec.name not in FILE_SOURCES:
        return RecipeError(
            "data.name",
            f"dataset {spec.name!r} needs the Hugging Face Hub, but HF_HUB_OFFLINE=1 is set and it is not cached. "
            f"Download it once while online, or use a local source ({', '.join(BUILTIN_SOURCES + FILE_SOURCES)}).",
        )
    return RecipeError(
        "data.name",
        f"cannot load dataset {spec.name!r}: {exc}. Use a datasets Hub id, one of "
        f"{', '.join(BUILTIN_SOURCES + FILE_SOURCES)}, or pass a DatasetDict from Python.",
    )


# ------------------------------------------------------------------------------------ splits
def _split_arrays(data: ImageArrays, fraction: float, seed: int) -> tuple[ImageArrays, ImageArrays]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_eval = max(1, int(round(len(data) * fraction)))
    return data.subset(order[n_eval:]), data.subset(order[:n_eval])


def _limit(split: Any, n: int | None, seed: int) -> Any:
    if n is None or n >= len(split):
        return split
    if isinstance(split, ImageArrays):
        return split.subset(torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n])
    return split.shuffle(seed=seed).select(range(n))


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], field_name: str, what: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise RecipeError(
                f"data.{field_name}",
                f"the dataset has no column {wanted!r}; its columns are {list(columns)}. Set `data.{field_name}` to "
                f"the column holding {what}",
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise RecipeError(
        f"data.{field_name}",
        f"cannot find the column holding {what}: the dataset has columns {list(columns)}, none named "
        f"{' / '.join(candidates)}. Set `data.{field_name}` to the right column",
    )


def _label_names(split, column: str) -> tuple[list[str], Any]:
    """Label names and the split with integer labels (string labels are mapped in sorted order)."""
    import datasets

    feature = split.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), split
    values = split[column]
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise RecipeError("data.label_column", f"column {column!r} has negative labels; labels must be 0..N-1")
        return [str(i) for i in range(max(values) + 1)], split
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        return names, split
    raise RecipeError(
        "data.label_column",
        f"column {column!r} holds {type(values[0]).__name__} values; a classification label must be an integer "
        "class index or a class name",
    )


def _encode_labels(split, column: str, names: list[str]):
    import datasets

    feature = split.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return split
    values = split[column]
    if values and isinstance(values[0], str):
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise RecipeError(
                "data.eval_split", f"the eval split has labels {unknown[:5]} that the train split does not have"
            )
        split = split.cast_column(column, datasets.ClassLabel(names=names))  # name -> index
    elif values and max(values) >= len(names):
        raise RecipeError("data.eval_split", f"the eval split has label {max(values)}, beyond the train split's {len(names) - 1}")
    return split


def load_raw_data(spec: DataSpec, task: str, seed: int | None = None, dataset: Any = None, *,
                  keep_columns: bool = False) -> RawData:
    """Train and eval splits for ``spec`` (or for ``dataset``, a ``DatasetDict``/``Dataset`` from Python).

    ``seed`` (default ``spec.seed``) fixes the made validation split and the sample limits.
    ``keep_columns`` (language modelling): keep the columns both splits have besides the format's own (the same
    rows either way), for writers of derived data such as :mod:`hfdistill.generate`.

    Raises :class:`~hfdistill.recipe.RecipeError` naming the ``data.*`` field to fix.
    """
    import datasets

    seed = spec.seed if seed is None else seed
    if spec.augment not in ("auto", *AUGMENTATIONS):
        raise RecipeError("data.augment", f"unknown augmentation {spec.augment!r}; allowed: auto, {', '.join(AUGMENTATIONS)}")
    info = get_task(task)
    image_task = info.inputs == "image"
    if dataset is None and spec.name == "fashion-mnist-scenes":
        if info.targets not in ("maps", "boxes"):
            raise RecipeError("data.name", f"fashion-mnist-scenes is a segmentation and detection dataset (images, "
                              f"their segmentation maps and object boxes) but the recipe's task is {task!r}; use "
                              "task: semantic-segmentation or object-detection")
        from .data_dense import scenes_source

        dataset = scenes_source(spec)
    if dataset is None and spec.name in ("sklearn-digits", "fashion-mnist"):
        if info.targets == "maps":
            raise RecipeError("data.name", f"{spec.name} has one class per image, no segmentation maps; a "
                              "semantic-segmentation recipe needs images with maps (e.g. fashion-mnist-scenes)")
        if info.targets == "boxes":
            raise RecipeError("data.name", f"{spec.name} has one class per image, no object boxes; an "
                              "object-detection recipe needs images with objects (e.g. fashion-mnist-scenes)")
        if not image_task:
            raise RecipeError("data.name", f"{spec.name} is an image dataset but the recipe's task is {task!r}")
        if spec.name == "sklearn-digits":
            full, names = _digits()
            train, evaluation = _split_arrays(full, spec.validation_fraction, seed)
            default_augment = "crop"  # flipped digits are other digits
        else:
            train, evaluation, names = _fashion_mnist(spec.data_dir)
            default_augment = "crop_flip"
        train = _limit(train, spec.max_train_samples, seed)
        evaluation = _limit(evaluation, spec.max_eval_samples, seed)
        return RawData(train, evaluation, names, "image", default_augment=default_augment)

    if dataset is None and spec.name == "chatterbot-corpus":
        if info.inputs != "text":
            raise RecipeError("data.name", f"chatterbot-corpus is a text dataset but the recipe's task is {task!r}")
        options = dict(spec.options)
        unknown = sorted(set(options) - {"language", "topics"})
        if unknown:
            raise RecipeError("data.options", f"chatterbot-corpus has no option(s) {unknown}; its options: language, topics")
        # Classification: each utterance labelled with its topic; language modelling: chats of consecutive statements.
        make = chatterbot_chats if info.targets == "tokens" else chatterbot_corpus
        dataset = datasets.DatasetDict({"train": make(**options)})
    elif dataset is None:
        dataset = _load_datasets_source(spec)
    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict({spec.train_split: dataset})
    if not isinstance(dataset, datasets.DatasetDict):
        raise RecipeError("data", f"expected a datasets Dataset or DatasetDict, got {type(dataset).__name__}")
    if spec.train_split not in dataset:
        raise RecipeError("data.train_split", f"the dataset has no split {spec.train_split!r}; its splits: {list(dataset)}")
    train = dataset[spec.train_split]
    if spec.eval_split is not None:
        if spec.eval_split not in dataset:
            raise RecipeError("data.eval_split", f"the dataset has no split {spec.eval_split!r}; its splits: {list(dataset)}")
        evaluation = dataset[spec.eval_split]
    else:
        found = next((s for s in EVAL_SPLITS if s in dataset and s != spec.train_split), None)
        if found is not None:
            evaluation = dataset[found]
        else:
            parts = train.train_test_split(test_size=spec.validation_fraction, seed=seed)
            train, evaluation = parts["train"], parts["test"]

    if info.targets == "tokens":
        return _language_modelling_raw(spec, train, evaluation, info, seed, keep_columns)
    if info.targets == "maps":
        from .data_dense import segmentation_raw

        return segmentation_raw(spec, train, evaluation, info, seed, dataset)
    if info.targets == "boxes":
        from .data_dense import detection_raw

        return detection_raw(spec, train, evaluation, info, seed, dataset)
    columns = train.column_names
    if image_task:
        input_column = _pick_column(columns, spec.image_column, info.input_columns, "image_column", "the images")
    else:
        input_column = _pick_column(columns, spec.text_column, info.input_columns, "text_column", "the text")
    label_column = _pick_column(columns, spec.label_column, info.label_columns, "label_column", "the class labels")
    for column in (input_column, label_column):
        if column not in evaluation.column_names:
            raise RecipeError("data.eval_split", f"the eval split has no column {column!r}; its columns: {evaluation.column_names}")
    names, train = _label_names(train, label_column)
    train = _encode_labels(train, label_column, names)
    evaluation = _encode_labels(evaluation, label_column, names)
    if len(names) < 2:
        raise RecipeError("data.label_column", f"column {label_column!r} has {len(names)} class(es); classification needs 2 or more")
    keep = [input_column, label_column]
    train = train.select_columns(keep)
    evaluation = evaluation.select_columns(keep)
    train = _limit(train, spec.max_train_samples, seed)
    evaluation = _limit(evaluation, spec.max_eval_samples, seed)
    return RawData(train, evaluation, names, input_column, label_column)


# ------------------------------------------------------------------------------------ language modelling: raw splits
LM_FORMATS = ("text", "prompt_completion", "chat")


def _lm_columns(spec: DataSpec, columns: Sequence[str], text_candidates: Sequence[str]) -> tuple[str, dict[str, str]]:
    """The format of language-modelling data and ``{its column: canonical name}``, from the data fields or the
    column names: ``messages`` (chat), ``prompt`` + ``completion``, else a text column."""
    if spec.messages_column is not None:
        column = _pick_column(columns, spec.messages_column, (), "messages_column", "the chats")
        return "chat", {column: "messages"}
    if spec.prompt_column is not None or spec.completion_column is not None:
        prompt = _pick_column(columns, spec.prompt_column, ("prompt",), "prompt_column", "the prompts")
        completion = _pick_column(columns, spec.completion_column, ("completion",), "completion_column",
                                  "the completions")
        return "prompt_completion", {prompt: "prompt", completion: "completion"}
    if spec.text_column is not None:
        return "text", {_pick_column(columns, spec.text_column, (), "text_column", "the text"): "text"}
    if "messages" in columns:
        return "chat", {"messages": "messages"}
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion", {"prompt": "prompt", "completion": "completion"}
    found = next((c for c in text_candidates if c in columns), None)
    if found is None:
        raise RecipeError(
            "data.text_column",
            f"cannot find what to learn: the dataset has columns {list(columns)}. Language modelling reads plain "
            f"text (a column named {' / '.join(text_candidates)}, or set `data.text_column`), prompt/completion "
            "pairs (`prompt` and `completion`, or set `data.prompt_column` and `data.completion_column`) or chats "
            "(`messages`, or set `data.messages_column`)",
        )
    return "text", {found: "text"}


def _check_lm_split(split: Any, fmt: str, spec: DataSpec, name: str) -> None:
    """The first rows have the format's types (a wrong column fails here, naming the field, not mid-training)."""
    head = split.select(range(min(8, len(split))))
    if fmt == "chat":
        field_name = f"data.{'messages_column' if spec.messages_column else 'name'}"
        for i, chat in enumerate(head["messages"]):
            if not isinstance(chat, list) or not chat or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in chat
            ):
                raise RecipeError(
                    field_name, f"row {i} of the {name} split is not a chat: a chat is a non-empty list of "
                    f"{{role: ..., content: ...}} messages with string values, got {chat!r:.200}",
                )
        return
    for column in ("text",) if fmt == "text" else ("prompt", "completion"):
        for i, value in enumerate(head[column]):
            if value is not None and not isinstance(value, str):
                what = {"text": "text_column", "prompt": "prompt_column", "completion": "completion_column"}[column]
                raise RecipeError(f"data.{what}", f"row {i} of the {name} split holds {type(value).__name__} "
                                  f"{value!r:.100}, not text")


def _drop_empty(split: Any, fmt: str) -> Any:
    """Rows without text (None, blank; a chat without an assistant turn stays: its tokens may still be learnt)."""
    if fmt == "chat":
        return split
    column = "text" if fmt == "text" else "completion"
    keep = [i for i, value in enumerate(list(split[column])) if isinstance(value, str) and value.strip()]
    if fmt == "prompt_completion":
        prompts = list(split["prompt"])
        keep = [i for i in keep if isinstance(prompts[i], str)]
    return split if len(keep) == len(split) else split.select(keep)


def _language_modelling_raw(spec: DataSpec, train: Any, evaluation: Any, info: Any, seed: int,
                            keep_columns: bool = False) -> RawData:
    """Splits for a task whose targets are tokens: one format's columns, renamed to `text`, `prompt` and
    `completion`, or `messages`; no labels. ``keep_columns``: also the other columns both splits have (not
    one named like a format's column, which would change the format found in the data)."""
    fmt, rename = _lm_columns(spec, train.column_names, info.input_columns)
    for column in rename:
        if column not in evaluation.column_names:
            raise RecipeError("data.eval_split", f"the eval split has no column {column!r}; its columns: "
                              f"{evaluation.column_names}")
    reserved = {*rename, *rename.values(), "messages", "prompt", "completion"}
    extra = [c for c in train.column_names if c in evaluation.column_names and c not in reserved] if keep_columns else []
    splits = []
    for split, name in ((train, "train"), (evaluation, "eval")):
        split = split.select_columns(list(rename) + extra).rename_columns({k: v for k, v in rename.items() if k != v})
        _check_lm_split(split, fmt, spec, name)
        splits.append(_drop_empty(split, fmt))
    train, evaluation = splits
    if len(train) == 0:
        raise RecipeError("data.name", "the training split has no text to learn (every row is empty)")
    train = _limit(train, spec.max_train_samples, seed)
    evaluation = _limit(evaluation, spec.max_eval_samples, seed)
    main = {"text": "text", "prompt_completion": "prompt", "chat": "messages"}[fmt]
    return RawData(train, evaluation, [], main, "completion" if fmt == "prompt_completion" else "",
                   default_augment="none", lm_format=fmt, completion_only_loss=spec.completion_only_loss,
                   packing=spec.packing)


# ------------------------------------------------------------------------------------ images
def _to_uint8_tensor(image: Any, channels: int) -> torch.Tensor:
    from PIL import Image

    if isinstance(image, torch.Tensor):
        array = image.numpy()
    elif isinstance(image, Image.Image):
        image = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(image)
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4):
        array = array.transpose(2, 0, 1)  # HWC -> CHW
    if array.dtype != np.uint8:
        array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array))


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    raise ValueError(f"cannot map {x.shape[1]}-channel images to {channels} channels")


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bilinear"
    dtype = x.dtype
    out = F.interpolate(x.float(), size=size, mode=mode, antialias=mode != "nearest", align_corners=False if mode != "nearest" else None)
    return out.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else out


def example_generator(content: bytes, epoch: int, seed: int) -> torch.Generator:
    """A random generator for one example's augmentation, seeded by its content, the epoch and the training seed:
    the same example gets the same draws in the same epoch whatever the batch, worker or interruption."""
    digest = hashlib.blake2b(content, digest_size=8, key=f"{epoch}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def reproducible_flips(images: Sequence[Any], epoch: int | None, seed: int) -> list[bool]:
    """Whether to flip each image (numpy arrays), half the time: drawn per image with :func:`example_generator`,
    or from torch's global stream before any epoch was set."""
    if epoch is None:
        return (torch.rand(len(images)) < 0.5).tolist()
    return [bool(torch.rand(1, generator=example_generator(image.tobytes(), epoch, seed)) < 0.5) for image in images]


class ImageTransform:
    """Batched image preprocessing for one model: size, channels, augmentation, normalisation.

    Accepts a uint8 tensor ``[B, C, H, W]`` or a list of images (PIL, arrays); returns float
    ``[B, channels, H, W]`` normalised with the model's mean and std.

    Augmentation is drawn per image from a seed made of the image's content, the epoch and the training
    seed, once :meth:`set_augmentation_epoch` was called (the trainer does at every epoch): the same example gets
    the same crop and flip in the same epoch whatever the batch order, the worker or an interruption, so a
    run resumed mid-epoch sees exactly what an uninterrupted one saw. Before any ``set_augmentation_epoch`` it
    draws from torch's global random stream.
    """

    def __init__(self, image: ImageConfig, train: bool, augment: str = "none"):
        self.image = image
        self.train = train
        self.augment = augment if train else "none"
        self.mean = torch.tensor(image.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(image.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.epoch: int | None = None
        self.seed = 0

    def set_augmentation_epoch(self, epoch: int, seed: int = 0) -> None:
        """Draw augmentations for ``epoch`` of a run with training seed ``seed`` (per image, reproducibly)."""
        self.epoch, self.seed = int(epoch), int(seed)

    def _generators(self, images: Sequence[torch.Tensor]) -> list[torch.Generator] | None:
        """One generator per image, seeded by (content, epoch, seed); None before set_augmentation_epoch."""
        if self.epoch is None:
            return None
        return [example_generator(image.contiguous().numpy().tobytes(), self.epoch, self.seed) for image in images]

    def _from_list(self, tensors: list[torch.Tensor], generators: list[torch.Generator] | None) -> torch.Tensor:
        if self.augment == "rrc_flip":
            from torchvision.transforms import v2

            crop = v2.RandomResizedCrop(self.image.size, antialias=True)
            cropped = []
            for i, t in enumerate(tensors):
                with _seeded(generators[i] if generators else None):
                    cropped.append(crop(t))
            tensors = cropped
        else:
            tensors = [_resize(t[None], self.image.size)[0] for t in tensors]
        return torch.stack([_match_channels(t[None], self.image.channels)[0] for t in tensors])

    def __call__(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        augmenting = self.augment != "none"
        if isinstance(images, torch.Tensor):
            generators = self._generators(list(images)) if augmenting else None
            x = _resize(images, self.image.size, self.image.interpolation)
        else:
            tensors = [_to_uint8_tensor(img, self.image.channels) for img in images]  # decoded once
            generators = self._generators(tensors) if augmenting else None
            x = self._from_list(tensors, generators)
        x = _match_channels(x.float() / 255.0, self.image.channels)
        if self.augment in ("crop", "crop_flip"):
            x = _random_crop(x, padding=max(1, self.image.size[0] // 8), generators=generators)
        if self.augment in ("crop_flip", "rrc_flip", "flip"):
            if generators is None:
                flip = torch.rand(x.shape[0]) < 0.5
            else:
                flip = torch.cat([torch.rand(1, generator=g) for g in generators]) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return (x - self.mean) / self.std


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None):
    """torch's global random stream.seeded from ``generator`` for the duration (torchvision draws from it)."""
    if generator is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        yield


def _random_crop(x: torch.Tensor, padding: int, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset per image (the CIFAR recipe)."""
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    if generators is None:
        dy = torch.randint(0, 2 * padding + 1, (batch,)).tolist()
        dx = torch.randint(0, 2 * padding + 1, (batch,)).tolist()
    else:
        offsets = [torch.randint(0, 2 * padding + 1, (2,), generator=g).tolist() for g in generators]
        dy, dx = [o[0] for o in offsets], [o[1] for o in offsets]
    return torch.stack([padded[i, :, y:y + height, x0:x0 + width] for i, (y, x0) in enumerate(zip(dy, dx))])


class ArrayImageDataset(torch.utils.data.Dataset):
    """Pre-decoded images in one uint8 tensor, transformed a whole batch at a time."""

    def __init__(self, data: ImageArrays, transform: ImageTransform):
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        index = torch.as_tensor(indices)
        pixels = self.transform(self.data.images[index])
        labels = self.data.labels[index]
        return [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def set_augmentation_epoch(self, epoch: int, seed: int = 0) -> None:
        self.transform.set_augmentation_epoch(epoch, seed)


class _DatasetImageTransform:
    def __init__(self, transform: ImageTransform, image_column: str, label_column: str):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column

    def set_augmentation_epoch(self, epoch: int, seed: int = 0) -> None:
        self.transform.set_augmentation_epoch(epoch, seed)

    def __call__(self, batch: dict) -> dict:
        return {
            "pixel_values": self.transform(batch[self.image_column]),
            "labels": torch.as_tensor(batch[self.label_column], dtype=torch.long),
        }


def teacher_image_inputs(student: ImageConfig, teacher: ImageConfig) -> Callable[[dict], dict] | None:
    """A ``batch -> teacher inputs`` function mapping student-normalised pixels to what the teacher expects.

    None when both models expect the same input. Runs on the batch's device, after the student's
    preprocessing: undo the student's normalisation, match channels and size, apply the teacher's.
    """
    if student.same_as(teacher):
        return None
    s_mean = torch.tensor(student.mean).view(1, -1, 1, 1)
    s_std = torch.tensor(student.std).view(1, -1, 1, 1)
    t_mean = torch.tensor(teacher.mean).view(1, -1, 1, 1)
    t_std = torch.tensor(teacher.std).view(1, -1, 1, 1)

    def to_teacher(batch: dict) -> dict:
        x = batch["pixel_values"]
        x = x * s_std.to(x.device, x.dtype) + s_mean.to(x.device, x.dtype)
        x = _match_channels(x, teacher.channels)
        x = _resize(x, teacher.size, teacher.interpolation)
        return {"pixel_values": (x - t_mean.to(x.device, x.dtype)) / t_std.to(x.device, x.dtype)}

    return to_teacher


# ------------------------------------------------------------------------------------ text
def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers produce the same ids for the same text."""
    if a is b:
        return True
    if type(a) is not type(b) or len(a) != len(b):
        return False
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


class _TextTransform:
    def __init__(self, tokenizer: Any, teacher_tokenizer: Any, text_column: str, label_column: str, max_length: int):
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer
        self.text_column, self.label_column, self.max_length = text_column, label_column, max_length

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch[self.text_column]]
        out = dict(self.tokenizer(texts, truncation=True, max_length=self.max_length))
        if self.teacher_tokenizer is not None:
            # A teacher with its own vocabulary reads its own tokenisation of the same text.
            teacher = self.teacher_tokenizer(texts, truncation=True, max_length=self.max_length)
            out.update({f"teacher_{k}": v for k, v in teacher.items()})
        out["labels"] = list(batch[self.label_column])
        return out


class PaddingCollator:
    """Stacks examples into a batch, padding token lists to the longest with each key's pad id."""

    def __init__(self, pad_ids: dict[str, int] | None = None):
        self.pad_ids = pad_ids or {}

    def __call__(self, examples: list[dict]) -> dict:
        batch = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
                batch[key] = torch.stack(values)
            elif isinstance(values[0], (list, tuple)):
                length = max(len(v) for v in values)
                pad = self.pad_ids.get(key, 0)
                batch[key] = torch.tensor([list(v) + [pad] * (length - len(v)) for v in values], dtype=torch.long)
            else:
                batch[key] = torch.as_tensor(np.asarray(values))
        return batch


def _pad_ids(tokenizer: Any, prefix: str = "") -> dict[str, int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {f"{prefix}input_ids": pad, f"{prefix}attention_mask": 0, f"{prefix}token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}


# ------------------------------------------------------------------------------------ assembly
def build_task_data(
    raw: RawData,
    task: str,
    student: LoadedModel,
    teacher: LoadedModel | None = None,
    augment: str = "auto",
    max_length: int = 128,
) -> TaskData:
    """Model inputs for ``student`` (and ``teacher``) from raw splits, with the task's data builder."""
    return get_task(task).build_data(raw, student, teacher, augment=augment, max_length=max_length)


def image_classification_data(
    raw: RawData, student: LoadedModel, teacher: LoadedModel | None = None, augment: str = "auto"
) -> TaskData:
    """Images -> normalised ``pixel_values`` at the student's size; the teacher's inputs are mapped on the device."""
    id2label = dict(enumerate(raw.label_names))
    if student.image_config is None:
        raise RecipeError("student.name", f"{student.name!r} is not an image model (no input size or normalisation known)")
    augment = raw.default_augment if augment == "auto" else augment
    train_tf = ImageTransform(student.image_config, train=True, augment=augment)
    eval_tf = ImageTransform(student.image_config, train=False)
    if isinstance(raw.train, ImageArrays):
        # Decode and resize once, keep uint8: the per-batch work is then crop/flip/normalise only.
        def at_size(split: ImageArrays) -> ImageArrays:
            return ImageArrays(_resize(split.images, student.image_config.size, student.image_config.interpolation), split.labels)

        train = ArrayImageDataset(at_size(raw.train), train_tf)
        evaluation = ArrayImageDataset(at_size(raw.eval), eval_tf)
    else:
        train = raw.train.with_transform(_DatasetImageTransform(train_tf, raw.input_column, raw.label_column))
        evaluation = raw.eval.with_transform(_DatasetImageTransform(eval_tf, raw.input_column, raw.label_column))
    teacher_fn = None
    if teacher is not None:
        if teacher.image_config is None:
            raise RecipeError("teacher.name", f"{teacher.name!r} is not an image model")
        teacher_fn = teacher_image_inputs(student.image_config, teacher.image_config)
    return TaskData(train, evaluation, raw.label_names, PaddingCollator(), teacher_fn, id2label)


def _teacher_tokenisation(student: LoadedModel, teacher: LoadedModel | None) -> tuple[Any, Callable | None]:
    """Both models must have tokenizers; a teacher whose tokenizer differs from the student's gets its own
    tokenisation (``teacher_*`` batch fields): returns its tokenizer and the batch -> teacher inputs map,
    or ``(None, None)`` when the student's tokens serve both."""
    if student.tokenizer is None:
        raise RecipeError("student.tokenizer", f"{student.name!r} has no tokenizer; set `student.tokenizer`")
    if teacher is None:
        return None, None
    if teacher.tokenizer is None:
        raise RecipeError("teacher.tokenizer", f"{teacher.name!r} has no tokenizer; set `teacher.tokenizer`")
    if same_tokenizer(student.tokenizer, teacher.tokenizer):
        return None, None

    def teacher_fn(batch: dict) -> dict:
        return {k[len("teacher_"):]: v for k, v in batch.items() if k.startswith("teacher_")}

    return teacher.tokenizer, teacher_fn


def text_classification_data(
    raw: RawData, student: LoadedModel, teacher: LoadedModel | None = None, max_length: int = 128
) -> TaskData:
    """Text -> each model's own tokenisation (a teacher with another vocabulary gets ``teacher_*`` fields)."""
    id2label = dict(enumerate(raw.label_names))
    teacher_tokenizer, teacher_fn = _teacher_tokenisation(student, teacher)
    transform = _TextTransform(student.tokenizer, teacher_tokenizer, raw.input_column, raw.label_column, max_length)
    pad_ids = _pad_ids(student.tokenizer)
    if teacher_tokenizer is not None:
        pad_ids.update(_pad_ids(teacher_tokenizer, "teacher_"))
    return TaskData(
        raw.train.with_transform(transform),
        raw.eval.with_transform(transform),
        raw.label_names,
        PaddingCollator(pad_ids),
        teacher_fn,
        id2label,
    )


# ------------------------------------------------------------------------------------ language modelling: tokens
# The chat template of a tokenizer that has none (set on it, so that it is saved with the model and pipeline()
# renders chats as training did). Each turn is `<|role|>`, a newline, the content and the end-of-text token;
# the generation prompt is `<|assistant|>` and a newline:
#   <|user|>\nHi there<|endoftext|><|assistant|>\nHello!<|endoftext|>
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + (eos_token or '') }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give ``tokenizer`` :data:`DEFAULT_CHAT_TEMPLATE` when it has no chat template; True if it got it."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def _special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS for Llama's, none for GPT-2's)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


class LMEncoder:
    """One example of language-modelling data -> token ids and which of them are learnt.

    - ``text``: the tokenizer's leading special tokens (a BOS where it adds one), the text, the end-of-text
      token; every token is learnt.
    - ``prompt_completion``: the same with the prompt then the completion, concatenated as they are (a
      separator such as a space or a newline belongs to the prompt), each tokenised on its own; the
      completion and the end-of-text token are learnt (``completion_only_loss``).
    - ``chat``: the messages rendered with the tokenizer's chat template; the tokens of each assistant turn
      after its header (what the model writes after the template's generation prompt, up to and including
      the template's end-of-turn marker) are learnt. Every turn is tokenised on its own, so it takes chat
      templates that render a conversation as a prefix of its continuations (most do).

    ``completion_only_loss=False`` learns every token. The first token is never learnt, as nothing predicts
    it: ``labels`` (the ids, -100 where not learnt) then mark exactly the tokens a causal LM's loss counts.
    """

    def __init__(self, tokenizer: Any, fmt: str, completion_only_loss: bool = True, max_length: int | None = 128):
        if fmt not in LM_FORMATS:
            raise ValueError(f"unknown language-modelling format {fmt!r}; one of {', '.join(LM_FORMATS)}")
        self.tokenizer, self.fmt = tokenizer, fmt
        self.completion_only_loss, self.max_length = completion_only_loss, max_length
        self.prefix = _special_prefix(tokenizer) if fmt != "chat" else []  # chat templates write their own
        self.eos = tokenizer.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        if not messages and not generation_prompt:
            try:
                return self.tokenizer.apply_chat_template([], tokenize=False)
            except Exception:  # noqa: BLE001 - templates that refuse an empty chat: nothing comes before the first turn
                return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _chat_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        segments: list[tuple[str, bool]] = []
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        before = self._render([])
        if before:
            segments.append((before, False))
        for i, message in enumerate(messages):
            after = self._render(messages[: i + 1])
            if not after.startswith(before):
                raise RecipeError(
                    "data.messages_column",
                    "the tokenizer's chat template does not render a conversation as the beginning of its "
                    "continuation (turn by turn), so the assistant turns cannot be told apart from the rest; "
                    "use a tokenizer with such a template, or give the data as prompt/completion pairs",
                )
            turn = after[len(before):]
            if message["role"] == "assistant":
                prompt = self._render(messages[:i], generation_prompt=True)[len(before):]
                header = len(os.path.commonprefix([prompt, turn]))  # what the generation prompt already wrote
                segments += [(turn[:header], False), (turn[header:], True)]
            else:
                segments.append((turn, False))
            before = after
        return segments

    def encode(self, example: dict) -> tuple[list[int], list[bool]]:
        """``(ids, learnt)`` of one example (a row of the format's columns), truncated to ``max_length``."""
        if self.fmt == "chat":
            segments = self._chat_segments(example["messages"])
            ids, learnt = [], []
            for text, completion in segments:
                piece = self._ids(text)
                ids += piece
                learnt += [completion] * len(piece)
        else:
            prompt = (example.get("prompt") or "") if self.fmt == "prompt_completion" else ""
            completion = example["completion"] if self.fmt == "prompt_completion" else example["text"]
            head = self.prefix + self._ids(prompt)
            tail = self._ids(completion) + ([self.eos] if self.eos is not None else [])
            if self.max_length is not None and len(head) + len(tail) > self.max_length:
                # Keep at least half of max_length for the completion; the prompt loses its beginning.
                keep_tail = min(len(tail), max(self.max_length - len(head), self.max_length // 2))
                keep_head = self.max_length - keep_tail
                head, tail = (head[len(head) - keep_head:] if keep_head else []), tail[:keep_tail]
            ids = head + tail
            learnt = [False] * len(head) + [True] * len(tail)
        if self.max_length is not None:
            ids, learnt = ids[: self.max_length], learnt[: self.max_length]
        if not self.completion_only_loss or self.fmt == "text":
            learnt = [True] * len(ids)
        if learnt:
            learnt[0] = False  # nothing predicts the first token
        return ids, learnt

    def __call__(self, batch: dict) -> dict:
        """Batched: ``input_ids``, ``attention_mask`` and ``labels`` lists of every row of ``batch``."""
        columns = list(batch)
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in range(len(batch[columns[0]])):
            ids, learnt = self.encode({c: batch[c][row] for c in columns})
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([t if keep else -100 for t, keep in zip(ids, learnt)])
        return out


class _LMTransform:
    """The student's encoding of a batch, and the teacher's as ``teacher_*`` fields when its tokenizer differs."""

    def __init__(self, student: LMEncoder, teacher: LMEncoder | None = None):
        self.student, self.teacher = student, teacher

    def __call__(self, batch: dict) -> dict:
        out = self.student(batch)
        if self.teacher is not None:
            out.update({f"teacher_{k}": v for k, v in self.teacher(batch).items()})
        return out


def pack_examples(split: Any, max_length: int) -> Any:
    """Tokenised examples (``input_ids``, ``labels``) concatenated into blocks of ``max_length`` tokens.

    Each example keeps its labels (-100 where not learnt) and ends with the end-of-text token its encoding
    put there; blocks attend across the examples they hold (no attention mask between them) and an example
    may continue in the next block. The first token of each block is not learnt (nothing in the block
    predicts it); the last, shorter block is kept when it has a token to learn.
    """
    import datasets

    ids = np.fromiter((t for row in split["input_ids"] for t in row), dtype=np.int64)
    labels = np.fromiter((t for row in split["labels"] for t in row), dtype=np.int64)
    blocks_ids, blocks_labels = [], []
    for start in range(0, len(ids), max_length):
        block_labels = labels[start:start + max_length].copy()
        block_labels[0] = -100
        if (block_labels != -100).any():
            blocks_ids.append(ids[start:start + max_length].tolist())
            blocks_labels.append(block_labels.tolist())
    return datasets.Dataset.from_dict({
        "input_ids": blocks_ids, "attention_mask": [[1] * len(b) for b in blocks_ids], "labels": blocks_labels,
    })


def causal_lm_data(
    raw: RawData, student: LoadedModel, teacher: LoadedModel | None = None, max_length: int = 128
) -> TaskData:
    """Language-modelling data -> ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the tokens not
    learnt: prompts, non-assistant turns, padding) from each model's own tokenizer (:class:`LMEncoder`).

    Both splits are tokenised once, here; examples with no token to learn (a completion truncated away)
    are left out. With ``raw.packing`` they are then packed into blocks of ``max_length``
    (:func:`pack_examples`). A teacher with another tokenizer gets ``teacher_input_ids``,
    ``teacher_attention_mask`` and ``teacher_labels`` of its own tokenisation (not with packing). The collator
    pads to the batch's longest on the right (pad id, attention 0, label -100): with the real tokens first,
    their positions are 0..n-1 as at generation, and a causal model's real tokens never see the padding.
    Tokenizers without a chat template get :data:`DEFAULT_CHAT_TEMPLATE` for chat data. ``stats`` holds the
    format and each split's :func:`token_counts`.
    """
    if raw.lm_format is None:
        raise RecipeError("task", "these splits were not loaded for language modelling (load_raw_data with a "
                          "text-generation task)")
    teacher_tokenizer, teacher_fn = _teacher_tokenisation(student, teacher)
    if teacher_tokenizer is not None and raw.packing:
        raise RecipeError(
            "data.packing", "packs the student's tokens into blocks, which the teacher's own tokenizer "
            "(another vocabulary) cannot follow; use models with the same tokenizer, or no packing",
        )
    for loaded in (student, teacher):
        positions = max_positions(getattr(loaded, "model", None))
        if positions is not None and max_length > positions:
            raise RecipeError("data.max_length", f"is {max_length}, but the {loaded.role} {loaded.name!r} reads at most "
                              f"{positions} positions; lower `data.max_length` to {positions} or less")
    if raw.lm_format == "chat":
        for tokenizer in (student.tokenizer, teacher_tokenizer):
            if tokenizer is not None:
                ensure_chat_template(tokenizer)
    limit = None if raw.packing else max_length  # packed examples are cut into blocks, not truncated
    transform = _LMTransform(
        LMEncoder(student.tokenizer, raw.lm_format, raw.completion_only_loss, limit),
        LMEncoder(teacher_tokenizer, raw.lm_format, raw.completion_only_loss, limit) if teacher_tokenizer else None,
    )

    def tokenise(split: Any, name: str) -> Any:
        with _quiet_datasets():
            encoded = split.map(transform, batched=True, remove_columns=split.column_names, desc=f"tokenising {name}")
            learnt = [any(t != -100 for t in row) for row in encoded["labels"]]
            if not all(learnt):
                encoded = encoded.select([i for i, keep in enumerate(learnt) if keep])
        if len(encoded) == 0:
            raise RecipeError("data.max_length", f"no example of the {name} split has a token to learn within "
                              f"max_length={max_length}; raise `data.max_length`")
        return pack_examples(encoded, max_length) if raw.packing else encoded

    pad_ids = _lm_pad_ids(student.tokenizer)
    if teacher_tokenizer is not None:
        pad_ids.update(_lm_pad_ids(teacher_tokenizer, "teacher_"))
    train, evaluation = tokenise(raw.train, "train"), tokenise(raw.eval, "eval")
    stats = {"format": raw.lm_format, "completion_only_loss": raw.completion_only_loss, "packing": raw.packing,
             "max_length": max_length}
    for name, split in (("train", train), ("eval", evaluation)):
        stats.update({f"{name}_{key}": value for key, value in token_counts(split).items()})
    return TaskData(train, evaluation, [], PaddingCollator(pad_ids), teacher_fn, {}, stats)


def token_counts(split: Any) -> dict[str, int]:
    """A tokenised language-modelling split's ``examples`` (rows or packed blocks), ``tokens`` (padding
    excluded) and ``learnt_tokens`` (labels not -100: what the loss and the perplexity count), per epoch."""
    labels = split["labels"]
    return {"examples": len(split), "tokens": sum(len(row) for row in labels),
            "learnt_tokens": sum(sum(1 for t in row if t != -100) for row in labels)}


def _lm_pad_ids(tokenizer: Any, prefix: str = "") -> dict[str, int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {f"{prefix}input_ids": pad if pad is not None else 0, f"{prefix}attention_mask": 0, f"{prefix}labels": -100}


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars from ``datasets`` for the duration (the tokenisation of small splits is instant)."""
    from datasets.utils import logging as ds_logging

    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------- fast reads
# datasets' torch formatter builds a tensor per innermost list (a 1x32x32 image: 33 tensors), so reading a
# `datasets.Dataset` in torch format cost ~0.9 ms an example, more than a small model's training step.
# For numeric columns of fixed shape the same values come straight out of Arrow: one `take` per batch and
# one reshape per column.
ARROW_READ_FORMATS = ("torch", "numpy")


class ArrowBatchReader(torch.utils.data.Dataset):
    """The rows of a ``datasets.Dataset`` in torch or numpy format, read a batch at a time from Arrow.

    ``__getitems__`` (what the DataLoader calls once per batch) gathers the batch's rows with one Arrow
    ``take`` and converts each column to one array of shape ``[batch, *shape]``, then hands out per-row
    views, so collators see exactly the rows the dataset itself would give: the same values and dtypes
    (integers as int64 and floats as float32, as datasets' formatters make them). A column that is not numeric with a fixed shape (text,
    ragged lists, images to decode) is read by ``datasets`` itself, so every dataset reads correctly and
    the ones that can be read fast are.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.format = dataset.format["type"]
        columns = dataset.format.get("columns") or dataset.column_names
        self._arrow = dataset.with_format("arrow", columns=columns)
        self.columns = list(columns)
        self._slow: set[str] = set()  # columns found not to convert (ragged, text): datasets formats them
        self._slow_view: Any = None  # the dataset's view of those columns, made once (again when one is added)

    @staticmethod
    def supports(dataset: Any) -> bool:
        """A ``datasets.Dataset`` in torch or numpy format with no transform or formatting options."""
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets is a dependency
            return False
        if not isinstance(dataset, datasets.Dataset):
            return False
        fmt = dataset.format
        return (fmt["type"] in ARROW_READ_FORMATS and not fmt.get("format_kwargs")
                and not fmt.get("output_all_columns"))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        table = self._arrow[list(indices)]
        columns: dict[str, Any] = {}
        for name in self.columns:
            values = None if name in self._slow else _arrow_to_numpy(table.column(name))
            if values is None:
                if name not in self._slow:  # found now: the view of the slow columns is made anew
                    self._slow.add(name)
                    self._slow_view = None
                continue
            columns[name] = self._convert(values)
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(indices))]
        if self._slow:  # the rest as datasets formats it
            if self._slow_view is None:
                self._slow_view = self.dataset.select_columns(sorted(self._slow))
            rest = self._slow_view.__getitems__(list(indices))
            for row, extra in zip(rows, rest):
                row.update(extra)
        return [{name: row[name] for name in self.columns} for row in rows]

    def _convert(self, values: np.ndarray) -> Any:
        # datasets' torch and numpy formatters both make integers int64 and floats float32
        dtype = (np.int64 if np.issubdtype(values.dtype, np.integer) else
                 np.float32 if np.issubdtype(values.dtype, np.floating) else values.dtype)
        if self.format == "numpy":
            return values.astype(dtype, copy=False)
        # Arrow's zero-copy arrays are read-only, which torch tensors must not share
        return torch.from_numpy(values.astype(dtype, copy=not values.flags.writeable))


def _arrow_to_numpy(column: Any) -> np.ndarray | None:
    """An Arrow column of numbers (or fixed-shape nested lists / ArrayND of numbers) as one numpy array
    ``[rows, *shape]``; None when it is anything else (text, ragged lists, nulls, structs)."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):  # datasets' Array2D..Array5D
        try:
            values = array.to_numpy()
        except Exception:  # noqa: BLE001 - ragged first dimension or an unknown extension: datasets reads it
            return None
        return values if isinstance(values, np.ndarray) and values.dtype != object else None
    rows = len(array)
    shape = [rows]
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        if array.null_count:
            return None
        lengths = array.value_lengths().to_numpy(zero_copy_only=False) if len(array) else np.zeros(0, np.int64)
        if len(lengths) and (lengths != lengths[0]).any():
            return None  # ragged
        shape.append(int(lengths[0]) if len(lengths) else 0)
        array = array.flatten()
    if array.null_count or not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)
                                or pa.types.is_boolean(array.type)):
        return None
    return array.to_numpy(zero_copy_only=False).reshape(shape)
