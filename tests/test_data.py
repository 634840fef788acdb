"""Data loading: built-in sources, datasets sources, batched transforms, teacher re-normalisation, text."""

import os

import numpy as np
import pytest
import torch

from hfdistill.data import (
    ArrayImageDataset,
    ImageArrays,
    ImageTransform,
    PaddingCollator,
    build_task_data,
    load_raw_data,
    teacher_image_inputs,
)
from hfdistill.models import ImageConfig, LoadedModel
from hfdistill.recipe import DataSpec, RecipeError

GRAY = ImageConfig(size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
RGB = ImageConfig(size=(24, 24), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_digits_split_is_seeded_and_disjoint():
    spec = DataSpec(name="sklearn-digits", validation_fraction=0.25)
    a = load_raw_data(spec, "image-classification", seed=1)
    b = load_raw_data(spec, "image-classification", seed=1)
    c = load_raw_data(spec, "image-classification", seed=2)
    assert len(a.train) + len(a.eval) == 1797 and len(a.eval) == round(1797 * 0.25)
    assert torch.equal(a.eval.labels, b.eval.labels) and not torch.equal(a.eval.images, c.eval.images)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    assert a.label_names == [str(i) for i in range(10)] and a.default_augment == "crop"


def test_max_samples():
    raw = load_raw_data(DataSpec(name="sklearn-digits", max_train_samples=50, max_eval_samples=20), "image-classification")
    assert (len(raw.train), len(raw.eval)) == (50, 20)


def test_image_transform_eval_is_deterministic_and_normalised():
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    tf = ImageTransform(RGB, train=False)
    x = tf(images)
    assert x.shape == (4, 3, 24, 24) and torch.equal(x, tf(images))
    white = tf(torch.full((1, 1, 8, 8), 255, dtype=torch.uint8))
    assert torch.allclose(white[0, :, 0, 0], (1 - torch.tensor(RGB.mean)) / torch.tensor(RGB.std), atol=1e-5)


def test_image_transform_train_augments():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    tf = ImageTransform(GRAY, train=True, augment="crop_flip")
    assert tf(images).shape == (8, 1, 16, 16) and not torch.equal(tf(images), tf(images))


def test_array_dataset_reads_whole_batches():
    data = ImageArrays(torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8), torch.arange(10))
    calls = []
    tf = ImageTransform(GRAY, train=False)
    ds = ArrayImageDataset(data, lambda x: calls.append(len(x)) or tf(x))
    rows = ds.__getitems__([0, 3, 5])
    assert calls == [3] and [int(r["labels"]) for r in rows] == [0, 3, 5]
    batch = PaddingCollator()(rows)
    assert batch["pixel_values"].shape == (3, 1, 16, 16) and batch["labels"].tolist() == [0, 3, 5]


def test_teacher_renormalisation_matches_teacher_preprocessing():
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    teacher_cfg = ImageConfig(size=(16, 16), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    to_teacher = teacher_image_inputs(GRAY, teacher_cfg)
    student_x = ImageTransform(GRAY, train=False)(images)
    expected = ImageTransform(teacher_cfg, train=False)(images)
    assert torch.allclose(to_teacher({"pixel_values": student_x})["pixel_values"], expected, atol=1e-5)
    assert teacher_image_inputs(GRAY, GRAY) is None
    # A different size is resized on the fly.
    assert to_teacher({"pixel_values": student_x})["pixel_values"].shape == (2, 3, 16, 16)
    bigger = teacher_image_inputs(GRAY, RGB)({"pixel_values": student_x})["pixel_values"]
    assert bigger.shape == (2, 3, 24, 24)


def _datasetdict_from_python(n=40):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)) for _ in range(n)]
    labels = ["cat" if i % 2 else "dog" for i in range(n)]
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"img": images, "animal": labels})})


def test_datasetdict_from_python_with_string_labels_and_made_split():
    dataset = _datasetdict_from_python()
    spec = DataSpec(name="python", label_column="animal", validation_fraction=0.25)
    raw = load_raw_data(spec, "image-classification", dataset=dataset)
    assert raw.label_names == ["cat", "dog"] and raw.input_column == "img"
    assert len(raw.train) == 30 and len(raw.eval) == 10
    student = LoadedModel(model=torch.nn.Identity(), role="student", name="s", num_labels=2, image_config=RGB)
    data = build_task_data(raw, "image-classification", student)
    batch = data.collator(data.train.__getitems__([0, 1, 2, 3]))
    assert batch["pixel_values"].shape == (4, 3, 24, 24) and batch["labels"].dtype == torch.long
    assert set(batch["labels"].tolist()) <= {0, 1}


def test_missing_columns_name_the_field(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("words,kind\nhello,a\nbye,b\nhi,a\nciao,b\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="data.text_column"):
        load_raw_data(DataSpec(name="csv", data_files=str(csv)), "text-classification")
    with pytest.raises(RecipeError, match="data.label_column"):
        load_raw_data(DataSpec(name="csv", data_files=str(csv), text_column="words"), "text-classification")
    raw = load_raw_data(DataSpec(name="csv", data_files=str(csv), text_column="words", label_column="kind",
                                 validation_fraction=0.5), "text-classification")
    assert raw.label_names == ["a", "b"]
    with pytest.raises(RecipeError, match="no column 'nope'"):
        load_raw_data(DataSpec(name="csv", data_files=str(csv), text_column="nope"), "text-classification")


def test_imagefolder(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (9, 7), color=(i * 30, 0, 0)).save(tmp_path / "train" / label / f"{i}.png")
    raw = load_raw_data(DataSpec(name="imagefolder", data_dir=str(tmp_path), validation_fraction=0.25), "image-classification")
    assert raw.label_names == ["a", "b"] and len(raw.train) + len(raw.eval) == 8


def test_fashion_mnist_absent_says_how_to_install(tmp_path):
    with pytest.raises(RecipeError, match="apt-get install dataset-fashion-mnist"):
        load_raw_data(DataSpec(name="fashion-mnist", data_dir=str(tmp_path)), "image-classification")


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    raw = load_raw_data(DataSpec(name="fashion-mnist", max_eval_samples=100), "image-classification")
    assert len(raw.train) == 60000 and len(raw.eval) == 100
    assert raw.train.images.shape[1:] == (1, 28, 28) and raw.label_names[-1] == "Ankle boot"


def test_chatterbot_corpus_topics_as_labels():
    pytest.importorskip("chatterbot_corpus")
    raw = load_raw_data(DataSpec(name="chatterbot-corpus", options={"topics": ["food", "sports", "money"]}),
                        "text-classification")
    assert raw.label_names == ["food", "sports", "money"]
    assert len(raw.train) > 50 and isinstance(raw.train[0]["text"], str)
    with pytest.raises(RecipeError, match="data.options.topics"):
        load_raw_data(DataSpec(name="chatterbot-corpus", options={"topics": ["cooking"]}), "text-classification")


def test_wrong_task_for_source():
    with pytest.raises(RecipeError, match="data.name"):
        load_raw_data(DataSpec(name="sklearn-digits"), "text-classification")
    with pytest.raises(RecipeError, match="data.augment"):
        load_raw_data(DataSpec(name="sklearn-digits", augment="mixup"), "image-classification")


def test_text_with_two_tokenizers_gives_teacher_fields(tmp_path):
    import datasets

    from tests_helpers import tiny_tokenizer

    student_tok = tiny_tokenizer(tmp_path / "s", ["hello", "world", "good", "bye"])
    teacher_tok = tiny_tokenizer(tmp_path / "t", ["good", "bye", "hello", "there", "world", "again"])
    dataset = datasets.Dataset.from_dict({"text": ["hello world", "good bye", "hello there world again"] * 4,
                                          "label": [0, 1, 0] * 4})
    raw = load_raw_data(DataSpec(name="python", validation_fraction=0.25), "text-classification", dataset=dataset)
    student = LoadedModel(model=torch.nn.Identity(), role="student", name="s", num_labels=2, tokenizer=student_tok)
    teacher = LoadedModel(model=torch.nn.Identity(), role="teacher", name="t", num_labels=2, tokenizer=teacher_tok)
    data = build_task_data(raw, "text-classification", student, teacher, max_length=16)
    batch = data.collator([data.train[i] for i in range(4)])
    assert {"input_ids", "attention_mask", "teacher_input_ids", "teacher_attention_mask", "labels"} <= set(batch)
    assert batch["input_ids"].shape[0] == 4 and batch["teacher_input_ids"].shape[0] == 4
    teacher_inputs = data.teacher_inputs(batch)
    assert torch.equal(teacher_inputs["input_ids"], batch["teacher_input_ids"]) and "labels" not in teacher_inputs
    # The same tokenizer for both: one tokenisation only.
    same = build_task_data(raw, "text-classification", student, student, max_length=16)
    assert same.teacher_inputs is None and "teacher_input_ids" not in same.train[0]


# ------------------------------------------------------------------------------------ the task table
def test_task_table_entries():
    import transformers
    from transformers import EvalPrediction

    from hfdistill.tasks import TASK_NAMES, TASKS, get_task

    assert TASK_NAMES == ("image-classification", "text-classification", "text-generation", "semantic-segmentation",
                          "object-detection")
    for task in TASKS.values():
        assert hasattr(transformers, task.auto_class) and task.inputs in ("image", "text") and task.metric
    image, text = get_task("image-classification"), get_task("text-classification")
    assert image.processor == "image_processor" and text.processor == "tokenizer"
    assert image.compute_metrics(EvalPrediction(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))) == {"accuracy": 0.5}
    loss = image.loss(torch.tensor([[0.0, 10.0], [10.0, 0.0]]), torch.tensor([1, -100]))
    assert float(loss) < 1e-3  # the ignored label does not count
    with pytest.raises(RecipeError, match="did you mean 'image-classification'"):
        get_task("image-clasification")


def test_a_new_task_is_one_table_entry(monkeypatch):
    """The data path reads the table: a new entry (its input columns, its data builder) is all a task needs."""
    import dataclasses

    import datasets

    from hfdistill import tasks

    built = {}

    def build(raw, student, teacher=None, augment="auto", max_length=128):
        built.update(raw=raw, student=student, max_length=max_length)
        return "model inputs"

    entry = dataclasses.replace(tasks.TASKS["text-classification"], name="toy-task", input_columns=("utterance",),
                                build_data=build)
    monkeypatch.setitem(tasks.TASKS, "toy-task", entry)
    dataset = datasets.Dataset.from_dict({"utterance": ["a", "b", "c", "d"] * 3, "label": [0, 1] * 6})
    raw = load_raw_data(DataSpec(name="python", validation_fraction=0.25), "toy-task", dataset=dataset)
    assert raw.input_column == "utterance"
    assert build_task_data(raw, "toy-task", "student", max_length=7) == "model inputs"
    assert built["raw"] is raw and built["max_length"] == 7
    with pytest.raises(RecipeError, match="unknown task 'no-such-task'"):
        build_task_data(raw, "no-such-task", "student")


# ----------------------------------------------------------------------------- ArrowBatchReader
def _mixed_dataset():
    import datasets

    rng = np.random.default_rng(0)
    n = 37
    return datasets.Dataset.from_dict({
        "pixel_values": rng.random((n, 1, 6, 5)),                          # float64 nested lists
        "image_u8": rng.integers(0, 255, (n, 3, 4, 4), dtype=np.uint8),     # uint8 nested lists
        "labels": rng.integers(0, 10, n),
        "flag": rng.random(n) > 0.5,
        "score": rng.random(n).astype(np.float32),
        "text": [f"example {i}" for i in range(n)],                         # not numeric: datasets reads it
        "ragged": [list(range(i % 4)) for i in range(n)],                   # ragged: datasets reads it
    }).cast_column("image_u8", datasets.Array3D((3, 4, 4), "uint8"))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, (a, b)
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    elif isinstance(a, list):
        assert len(a) == len(b) and all(_same(x, y) is None for x, y in zip(a, b))
    else:
        assert type(a) is type(b) and a == b, (a, b)


@pytest.mark.parametrize("fmt", ["torch", "numpy"])
@pytest.mark.parametrize("view", ["whole", "shuffled", "selected", "columns"])
def test_arrow_batch_reader_gives_exactly_the_rows_datasets_gives(fmt, view):
    from hfdistill.data import ArrowBatchReader

    dataset = _mixed_dataset()
    if view == "shuffled":
        dataset = dataset.shuffle(seed=1)  # an indices mapping over the Arrow table
    elif view == "selected":
        dataset = dataset.select([5, 3, 30, 3, 0, 12])
    dataset = dataset.with_format(fmt, columns=["pixel_values", "labels", "text"] if view == "columns" else None)
    assert ArrowBatchReader.supports(dataset)
    reader = ArrowBatchReader(dataset)
    indices = [4, 0, 2, 2, len(dataset) - 1]
    expected = dataset.__getitems__(indices)
    got = reader.__getitems__(indices)
    assert len(got) == len(expected)
    for row, want in zip(got, expected):
        assert list(row) == list(want)
        for key in want:
            _same(row[key], want[key])
    _same_row = reader[1]
    assert list(_same_row) == list(dataset[1])


def test_arrow_batch_reader_is_not_used_where_datasets_must_format():
    from hfdistill.data import ArrowBatchReader

    dataset = _mixed_dataset()
    assert not ArrowBatchReader.supports(dataset)  # python format: rows are lists, collators may want them
    assert not ArrowBatchReader.supports(dataset.with_transform(lambda batch: batch))
    assert not ArrowBatchReader.supports(dataset.with_format("torch", dtype=torch.float16))  # its own options
    assert not ArrowBatchReader.supports([{"x": 1}])


def test_trainer_reads_a_torch_format_dataset_in_batches_with_the_same_batches(tmp_path, monkeypatch):
    """The trainer's loaders read a datasets.Dataset through the reader, batch for batch as datasets would."""
    import datasets
    from transformers import default_data_collator

    from hfdistill import DistillationConfig, DistillationTrainer
    from hfdistill.data import ArrowBatchReader

    from conftest import digits_dataset, tiny_timm

    train, _ = digits_dataset(n_train=40)
    rows = [train[i] for i in range(len(train))]
    dataset = datasets.Dataset.from_dict({k: torch.stack([r[k] for r in rows]).numpy() if rows[0][k].dim() else
                                          [int(r[k]) for r in rows] for k in rows[0]}).with_format("torch")
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, report_to=[], use_cpu=True,
                              seed=0)
    trainer = DistillationTrainer(model=tiny_timm("test_efficientnet", seed=0), args=args, train_dataset=dataset,
                                  eval_dataset=dataset)
    calls = []
    original = ArrowBatchReader.__getitems__
    monkeypatch.setattr(ArrowBatchReader, "__getitems__", lambda self, idx: calls.append(len(idx)) or original(self, idx))
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        for batch in loader:
            plain = default_data_collator(dataset.__getitems__(list(range(len(batch["labels"])))))
            assert {k: (v.dtype, v.shape[1:]) for k, v in batch.items()} == \
                {k: (v.dtype, v.shape[1:]) for k, v in plain.items()}
    assert calls and max(calls) == 16  # one read per batch
