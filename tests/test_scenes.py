"""hfdistill.scenes: synthetic detection/segmentation scenes composed from real Fashion-MNIST items.

The scenes are rebuilt here from the raw idx files and the ``source_*`` columns, independently of the
module's own compositing: silhouettes, occlusion, the segmentation map and the boxes must all match.
"""

import gzip
from pathlib import Path

import numpy as np
import pytest

from hfdistill.errors import BadInputError, RecipeError
from hfdistill.scenes import (
    DETECTION_ID2LABEL,
    DETECTION_LABELS,
    NOISE_LEVEL,
    SEGMENTATION_ID2LABEL,
    SEGMENTATION_LABELS,
    fashion_mnist_scenes,
    fashion_mnist_scenes_dict,
    resize_item,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST files absent from /usr/share/datasets/fashion-mnist (apt install dataset-fashion-mnist)",
)
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def raw_split(split):
    """The split read here with plain gzip + numpy (not through hfdistill)."""
    images_file, labels_file = FILES[split]
    with gzip.open(FMNIST / images_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / labels_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


@pytest.fixture(scope="module")
def raw():
    return {split: raw_split(split) for split in FILES}


def rebuild(row, images, labels, min_visible=0.5, threshold=0.1):
    """Expected (annotation, objects, gray image) of a scene from its sources: top item first, an item is
    kept when its silhouette minus the kept items above is non-empty and >= min_visible of it."""
    canvas = row["width"]
    annotation = np.zeros((canvas, canvas), np.uint8)
    gray = np.zeros((canvas, canvas), np.uint8)
    covered = np.zeros((canvas, canvas), bool)
    kept, boxes, categories, areas, fractions = [], [], [], [], []
    for item, (x, y, w, h) in reversed(list(zip(row["source_items"], row["source_boxes"]))):
        assert w == h
        pixels = images[item] if w == 28 else resize_item(images[item], w)
        mask = pixels > threshold * pixels.max()
        full = np.zeros_like(covered)
        full[y:y + h, x:x + w] = mask
        visible = full & ~covered
        fraction = visible.sum() / max(mask.sum(), 1)
        fractions.append(fraction)
        if visible.sum() == 0 or fraction < min_visible:
            kept.append(False)
            continue
        kept.append(True)
        covered |= full
        annotation[visible] = labels[item] + 1
        gray[y:y + h, x:x + w][visible[y:y + h, x:x + w]] = pixels[visible[y:y + h, x:x + w]]
        rows, cols = np.nonzero(visible)
        boxes.append([cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1])
        categories.append(int(labels[item]))
        areas.append(int(visible.sum()))
    return annotation, gray, kept[::-1], boxes[::-1], categories[::-1], areas[::-1], fractions[::-1]


# ------------------------------------------------------------------------------------ no data needed
def test_labels_constants():
    assert SEGMENTATION_ID2LABEL[0] == "background" and SEGMENTATION_ID2LABEL[1] == "T-shirt/top"
    assert SEGMENTATION_ID2LABEL[10] == "Ankle boot" and len(SEGMENTATION_LABELS) == 11
    assert DETECTION_LABELS[0] == "T-shirt/top" and len(DETECTION_LABELS) == 10
    assert DETECTION_ID2LABEL == dict(enumerate(DETECTION_LABELS))
    assert SEGMENTATION_LABELS[1:] == DETECTION_LABELS


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(RecipeError, match="apt install dataset-fashion-mnist") as info:
        fashion_mnist_scenes("train", 2, data_dir=str(tmp_path))
    assert info.value.path == "data.data_dir"


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "validation"}, "split"),
    ({"items": (0, 3)}, "items"),
    ({"items": (3, 2)}, "items"),
    ({"scale": (2.0, 1.0)}, "scale"),
    ({"canvas": 40, "scale": (1.0, 2.0)}, "canvas"),
    ({"background": "white"}, "background"),
    ({"tint": "rainbow"}, "tint"),
    ({"min_visible": 1.5}, "min_visible"),
    ({"seed": -1}, "seed"),
    ({"num_scenes": -1}, "num_scenes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(BadInputError, match=match):
        fashion_mnist_scenes(**{"num_scenes": 2, **kwargs})


# ------------------------------------------------------------------------------------ with the data
@needs_fmnist
@pytest.mark.parametrize("split, scale", [("train", (1.0, 1.0)), ("test", (1.0, 1.0)), ("train", (0.8, 2.0)),
                                          ("test", (1.0, 2.5))])
def test_scenes_match_their_items(raw, split, scale):
    """Annotation = k+1 exactly on the top-most kept silhouette; boxes tight around the visible pixels;
    the items come from the requested split (the pixels are rebuilt from that split's own files)."""
    images, labels = raw[split]
    ds = fashion_mnist_scenes(split, 40, canvas=80, items=(1, 5), scale=scale, seed=3, tint="gray", with_sources=True)
    assert len(ds) == 40 and ds["image_id"] == list(range(40))
    ids = [i for objects in ds["objects"] for i in objects["id"]]
    assert ids == list(range(len(ids)))  # unique within the dataset
    for row in ds:
        assert max(row["source_items"]) < len(images)
        annotation, gray, kept, boxes, categories, areas, _ = rebuild(row, images, labels)
        np.testing.assert_array_equal(np.asarray(row["annotation"]), annotation)
        image = np.asarray(row["image"])
        for c in range(3):  # tint="gray", black background: R = G = B = the top-most item's pixel
            np.testing.assert_array_equal(image[..., c], gray)
        assert row["source_kept"] == kept
        objects = row["objects"]
        assert objects["bbox"] == [[float(v) for v in b] for b in boxes]
        assert objects["category"] == categories and objects["area"] == areas
        assert all(a > 0 for a in areas) and len(categories) >= 1
        for (x, y, w, h), k in zip(objects["bbox"], objects["category"]):
            inside = np.asarray(row["annotation"])[int(y):int(y + h), int(x):int(x + w)]
            assert (k + 1) in inside
            # tight: each edge row/column of the box holds a pixel of the class
            assert (inside[0] == k + 1).any() and (inside[-1] == k + 1).any()
            assert (inside[:, 0] == k + 1).any() and (inside[:, -1] == k + 1).any()


@needs_fmnist
def test_train_and_test_items_stay_apart(raw):
    scenes = fashion_mnist_scenes_dict(30, 30, canvas=64, scale=(1.0, 1.0), tint="gray", with_sources=True)
    assert set(scenes) == {"train", "validation"}
    assert len(scenes["train"]) == 30 and len(scenes["validation"]) == 30
    train_items = [i for row in scenes["train"]["source_items"] for i in row]
    test_items = [i for row in scenes["validation"]["source_items"] for i in row]
    assert max(test_items) < 10_000 and max(train_items) >= 10_000  # indices into each split, 60k vs 10k
    for name, split in (("train", "train"), ("validation", "test")):
        images, labels = raw[split]
        for row in scenes[name]:
            annotation, *_ = rebuild(row, images, labels)
            np.testing.assert_array_equal(np.asarray(row["annotation"]), annotation)
    # the same seed gives different layouts for the two splits
    assert scenes["train"]["source_boxes"] != scenes["validation"]["source_boxes"]


@needs_fmnist
def test_occluded_items_are_left_out(raw):
    images, labels = raw["train"]
    ds = fashion_mnist_scenes("train", 40, canvas=36, items=(5, 6), scale=(1.0, 1.0), seed=1, with_sources=True,
                              min_visible=0.5)
    dropped = 0
    for row in ds:
        annotation, _, kept, _, _, _, fractions = rebuild(row, images, labels, min_visible=0.5)
        assert row["source_kept"] == kept
        for keep, fraction in zip(kept, fractions):
            assert (fraction >= 0.5) if keep else (fraction < 0.5)
        dropped += kept.count(False)
        assert len(row["objects"]["category"]) == kept.count(True)
        # every labelled pixel lies in a box of its own class
        seg = np.asarray(row["annotation"])
        covered = np.zeros_like(seg, bool)
        for (x, y, w, h), k in zip(row["objects"]["bbox"], row["objects"]["category"]):
            box = np.zeros_like(seg, bool)
            box[int(y):int(y + h), int(x):int(x + w)] = True
            covered |= box & (seg == k + 1)
        assert covered.sum() == (seg > 0).sum()
        assert set(np.unique(seg)) - {0} == {k + 1 for k in row["objects"]["category"]}
    assert dropped > 0


@needs_fmnist
def test_fully_hidden_items_dropped_even_with_min_visible_zero(raw):
    images, labels = raw["train"]
    ds = fashion_mnist_scenes("train", 40, canvas=30, items=(6, 6), scale=(1.0, 1.0), seed=2, with_sources=True,
                              min_visible=0.0)
    hidden = 0
    for row in ds:
        _, _, kept, _, _, areas, fractions = rebuild(row, images, labels, min_visible=0.0)
        assert row["source_kept"] == kept and all(a > 0 for a in row["objects"]["area"])
        hidden += sum(1 for f in fractions if f == 0)
        assert all(not k for k, f in zip(kept, fractions) if f == 0)
    assert hidden > 0


@needs_fmnist
def test_deterministic_per_seed_and_scene():
    a = fashion_mnist_scenes("train", 12, seed=5, with_sources=True)
    b = fashion_mnist_scenes("train", 12, seed=5, with_sources=True)
    assert a.data.table.equals(b.data.table)
    c = fashion_mnist_scenes("train", 12, seed=6, with_sources=True)
    assert a["source_items"] != c["source_items"]
    assert not np.array_equal(np.asarray(a[0]["image"]), np.asarray(c[0]["image"]))
    # a scene does not depend on how many are made
    head = fashion_mnist_scenes("train", 4, seed=5, with_sources=True)
    assert head.data.table.equals(a.select(range(4)).flatten_indices().data.table)
    # tint and background change the look, never the layout
    noisy = fashion_mnist_scenes("train", 12, seed=5, with_sources=True, background="noise", tint="gray")
    assert noisy["objects"] == a["objects"] and noisy["source_boxes"] == a["source_boxes"]
    assert [np.asarray(r["annotation"]).tolist() for r in noisy] == [np.asarray(r["annotation"]).tolist() for r in a]


@needs_fmnist
def test_images_and_backgrounds():
    ds = fashion_mnist_scenes("test", 10, canvas=96, seed=0)
    for row in ds:
        assert row["image"].mode == "RGB" and row["image"].size == (96, 96)
        assert row["annotation"].mode == "L" and row["annotation"].size == (96, 96)
        assert row["width"] == row["height"] == 96
        image, seg = np.asarray(row["image"]), np.asarray(row["annotation"])
        assert (image[seg == 0] == 0).all()  # black background, nothing drawn outside the silhouettes
        assert (image[seg > 0].max(axis=-1) > 0).all()
        assert seg.max() <= 10
    noisy = fashion_mnist_scenes("test", 10, canvas=96, seed=0, background="noise")
    background = np.concatenate([np.asarray(r["image"])[np.asarray(r["annotation"]) == 0] for r in noisy])
    assert background.max() <= NOISE_LEVEL and background.std() > 1


@needs_fmnist
def test_features_round_trip_through_disk(tmp_path):
    import datasets

    ds = fashion_mnist_scenes("train", 8, seed=0, with_sources=True)
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["annotation"], datasets.Image)
    assert ds.features["objects"]["category"].feature.names == list(DETECTION_LABELS)
    assert "synthetic" in ds.info.description.lower()
    ds.save_to_disk(str(tmp_path / "scenes"))
    loaded = datasets.load_from_disk(str(tmp_path / "scenes"))
    assert loaded.features == ds.features
    assert loaded.data.table.equals(ds.data.table)
    row = loaded[3]
    assert row["image"].mode == "RGB" and row["annotation"].mode == "L"
    assert row["objects"] == ds[3]["objects"]
    scenes = fashion_mnist_scenes_dict(4, 3)
    scenes.save_to_disk(str(tmp_path / "dict"))
    again = datasets.load_from_disk(str(tmp_path / "dict"))
    assert {k: len(v) for k, v in again.items()} == {"train": 4, "validation": 3}
    assert "source_items" not in again["train"].column_names
