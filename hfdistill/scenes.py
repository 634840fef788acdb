"""Scenes of Fashion-MNIST items: a small offline dataset for semantic segmentation and object detection.

**These are synthetic scenes composed from real Fashion-MNIST items, not a real detection or segmentation
benchmark.** No detection or segmentation dataset ships in a package on these machines, so
:func:`fashion_mnist_scenes` builds one from images that do (the Debian package ``dataset-fashion-mnist``,
read as :mod:`hfdistill.data` reads it): each scene places a few 28x28 Fashion-MNIST items on a canvas,
and its labels are derived from the items' own pixels. Numbers measured on it say how well a student
learns to find and outline these items; they are not comparable with COCO, ADE20K or any published result.

How a scene is made (every draw comes from a generator seeded by ``(seed, split, scene index)``, so a
scene is the same whatever ``num_scenes`` is, and train and test scenes with the same seed differ):

- ``items = (lo, hi)``: lo..hi items (inclusive) are drawn, uniformly with replacement, from the real
  split: train scenes only from the 60,000 train items, test scenes only from the 10,000 test items.
- Each item is resized by a factor drawn uniformly from ``scale`` (side ``round(28 * factor)``, PIL's
  bilinear filter) and placed, whole, at a uniformly drawn position inside the canvas. Items are drawn in
  order and may overlap: a later item lies on top of the earlier ones.
- An item's **silhouette** is its pixels above ``threshold`` times its own brightest pixel (0.1 by
  default), after resizing. Items are opaque inside their silhouette and transparent outside it: the
  scene shows, at each pixel, the top-most silhouette that covers it, or the background.
- ``tint="random"`` gives each item one random colour (each RGB channel uniform in [0.35, 1], scaled so
  its largest channel is 1) multiplied by the item's gray value; ``tint="gray"`` keeps the gray values
  (R = G = B = the item's pixel). ``background="black"`` is 0 everywhere; ``background="noise"`` is
  uniform noise in 0..32 per pixel and channel.
- **Occlusion.** Going from the top item down, an item whose visible silhouette (not covered by the items
  kept above it) is less than ``min_visible`` of its own silhouette, or empty, is left out of the scene
  altogether: not drawn, not in the segmentation map, not an object. So every labelled pixel belongs to
  exactly one object and every object is at least ``min_visible`` visible (the top item always is).

Each row holds ``image`` (RGB, ``canvas x canvas``), ``annotation`` (an ``L`` image: 0 background,
``k + 1`` Fashion-MNIST class ``k``; :data:`SEGMENTATION_ID2LABEL`), ``objects`` in the COCO-style layout
of the Hub's detection sets (cppe-5, detection-datasets/coco: ``bbox`` ``[x, y, w, h]`` in absolute
pixels, the tight box around the object's visible pixels, so the pixels ``x..x+w-1`` and ``y..y+h-1``;
``category`` a :data:`DETECTION_LABELS` class; ``area`` the number of visible pixels, COCO's segment area;
``id`` unique within the dataset), ``image_id`` (the scene's index), ``width`` and ``height``. With
``with_sources=True`` it also holds where each drawn item came from: ``source_items`` (its index in the
Fashion-MNIST split), ``source_boxes`` (the square it was placed in, ``[x, y, side, side]``) and
``source_kept`` (whether it is in the scene); the objects are the kept items, in drawing order.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, _read_idx
from .errors import BadInputError, RecipeError

ITEM_SIZE = 28  # Fashion-MNIST items are 28x28
DETECTION_LABELS: tuple[str, ...] = tuple(FASHION_MNIST_LABELS)
SEGMENTATION_LABELS: tuple[str, ...] = ("background", *DETECTION_LABELS)
DETECTION_ID2LABEL: dict[int, str] = dict(enumerate(DETECTION_LABELS))
SEGMENTATION_ID2LABEL: dict[int, str] = dict(enumerate(SEGMENTATION_LABELS))
SPLITS = ("train", "test")
BACKGROUNDS = ("black", "noise")
TINTS = ("random", "gray")
NOISE_LEVEL = 32  # the noise background's largest value
TINT_RANGE = (0.35, 1.0)
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# ------------------------------------------------------------------------------------ items
def fashion_mnist_items(split: str = "train", data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The real Fashion-MNIST ``split``: uint8 images ``[N, 28, 28]`` and int64 labels ``[N]`` (read-only,
    read once per folder and split)."""
    if split not in SPLITS:
        raise BadInputError(f"split must be one of {SPLITS}, not {split!r}")
    folder = Path(data_dir or FASHION_MNIST_DIR).resolve()
    return _read_split(str(folder), split)


@functools.lru_cache(maxsize=4)
def _read_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = _SPLIT_FILES[split]
    missing = [name for name in names if not (Path(folder) / name).is_file()]
    if missing:
        raise RecipeError(
            "data.data_dir",
            f"Fashion-MNIST scenes need the files {', '.join(missing)} in {folder}, which are not there. Install "
            f"the Debian package: `sudo apt install dataset-fashion-mnist` (it puts them in {FASHION_MNIST_DIR}), "
            "or give `data_dir`: a folder holding the idx .gz files.",
        )
    images = _read_idx(Path(folder) / names[0])
    labels = _read_idx(Path(folder) / names[1]).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (ITEM_SIZE, ITEM_SIZE) or len(images) != len(labels):
        raise RecipeError("data.data_dir", f"{folder}/{names[0]} is not Fashion-MNIST's images (shape {images.shape}) "
                          f"or does not match {names[1]} ({len(labels)} labels)")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def resize_item(item: np.ndarray, side: int) -> np.ndarray:
    """A 28x28 uint8 item resized to ``side x side`` with PIL's bilinear filter (unchanged at 28)."""
    if side == item.shape[0]:
        return item
    from PIL import Image

    return np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR))


def silhouette(item: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """The item's pixels above ``threshold`` times its brightest pixel (bool, the item's shape); an item
    with no bright pixel has an empty silhouette."""
    peak = int(item.max())
    return item > threshold * peak if peak > 0 else np.zeros(item.shape, dtype=bool)


# ------------------------------------------------------------------------------------ features
def scene_features(with_sources: bool = False):
    """The ``datasets.Features`` of a scenes dataset (see the module docstring)."""
    import datasets

    features = {
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "annotation": datasets.Image(),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": datasets.Sequence({
            "id": datasets.Value("int64"),
            "area": datasets.Value("int64"),
            "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
            "category": datasets.ClassLabel(names=list(DETECTION_LABELS)),
        }),
    }
    if with_sources:
        features.update({
            "source_items": datasets.Sequence(datasets.Value("int64")),
            "source_boxes": datasets.Sequence(datasets.Sequence(datasets.Value("int32"), length=4)),
            "source_kept": datasets.Sequence(datasets.Value("bool")),
        })
    return datasets.Features(features)


# ------------------------------------------------------------------------------------ scenes
def _check(split: str, num_scenes: int, canvas: int, items: Sequence[int], scale: Sequence[float], seed: int,
           background: str, tint: str, min_visible: float,
           threshold: float) -> tuple[tuple[int, int], tuple[float, float]]:
    def bad(message: str) -> BadInputError:
        return BadInputError(f"fashion_mnist_scenes: {message}")

    if split not in SPLITS:
        raise bad(f"split must be one of {SPLITS}, not {split!r}")
    if not isinstance(num_scenes, (int, np.integer)) or isinstance(num_scenes, bool) or num_scenes < 0:
        raise bad(f"num_scenes must be a whole number >= 0, not {num_scenes!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise bad(f"seed must be a whole number >= 0, not {seed!r}")
    if not isinstance(canvas, (int, np.integer)) or isinstance(canvas, bool) or canvas < 1:
        raise bad(f"canvas must be a whole number of pixels >= 1, not {canvas!r}")
    try:
        lo, hi = (int(v) for v in items)
    except (TypeError, ValueError):
        raise bad(f"items must be (min, max) item counts, not {items!r}") from None
    if not 1 <= lo <= hi:
        raise bad(f"items must be (min, max) with 1 <= min <= max, not {tuple(items)!r}")
    try:
        s_lo, s_hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise bad(f"scale must be (min, max) resize factors, not {scale!r}") from None
    if not 0 < s_lo <= s_hi or round(ITEM_SIZE * s_lo) < 1:
        raise bad(f"scale must be (min, max) with 0 < min <= max and items at least 1 pixel, not {tuple(scale)!r}")
    if round(ITEM_SIZE * s_hi) > canvas:
        raise bad(f"items scaled by up to {s_hi} are {round(ITEM_SIZE * s_hi)} pixels wide, more than the canvas "
                  f"({canvas}); raise canvas or lower scale")
    if background not in BACKGROUNDS:
        raise bad(f"background must be one of {BACKGROUNDS}, not {background!r}")
    if tint not in TINTS:
        raise bad(f"tint must be one of {TINTS}, not {tint!r}")
    if not 0.0 <= min_visible <= 1.0:
        raise bad(f"min_visible must be a fraction in [0, 1], not {min_visible!r}")
    if not 0.0 <= threshold < 1.0:
        raise bad(f"threshold must be a fraction in [0, 1), not {threshold!r}")
    return (lo, hi), (s_lo, s_hi)


def _png(array: np.ndarray) -> dict[str, Any]:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, canvas: int, items: tuple[int, int],
           scale: tuple[float, float], background: str, tint: str, min_visible: float, threshold: float):
    """One scene: ``(image [H, W, 3] uint8, annotation [H, W] uint8, objects, sources)``.

    The draws always come in the same order and number, whatever ``tint`` and ``background``, so those two
    change the look of a scene, never its layout.
    """
    count = int(rng.integers(items[0], items[1] + 1))
    index = rng.integers(0, len(images), count)
    sides = np.rint(ITEM_SIZE * rng.uniform(scale[0], scale[1], count)).astype(np.int64)
    xs = rng.integers(0, canvas - sides + 1)
    ys = rng.integers(0, canvas - sides + 1)
    colours = rng.uniform(TINT_RANGE[0], TINT_RANGE[1], (count, 3))
    colours /= colours.max(axis=1, keepdims=True)
    if background == "noise":
        image = rng.integers(0, NOISE_LEVEL + 1, (canvas, canvas, 3), dtype=np.uint8)
    else:
        image = np.zeros((canvas, canvas, 3), dtype=np.uint8)
    annotation = np.zeros((canvas, canvas), dtype=np.uint8)
    covered = np.zeros((canvas, canvas), dtype=bool)  # silhouettes of the kept items above
    kept = np.zeros(count, dtype=bool)
    boxes, categories, areas = [], [], []
    for i in range(count - 1, -1, -1):  # top item first
        x, y, side = int(xs[i]), int(ys[i]), int(sides[i])
        pixels = resize_item(images[index[i]], side)
        mask = silhouette(pixels, threshold)
        window = (slice(y, y + side), slice(x, x + side))
        visible = mask & ~covered[window]
        area = int(visible.sum())
        if area == 0 or area < min_visible * int(mask.sum()):
            continue  # left out of the scene: not drawn, not labelled
        kept[i] = True
        covered[window] |= mask
        category = int(labels[index[i]])
        annotation[window][visible] = category + 1
        if tint == "gray":
            image[window][visible] = pixels[visible][:, None]
        else:
            image[window][visible] = np.rint(pixels[visible][:, None] * colours[i]).astype(np.uint8)
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        boxes.append([x + cols[0], y + rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1])
        categories.append(category)
        areas.append(area)
    # objects in drawing order (bottom to top), as the items were drawn
    objects = {"bbox": [[float(v) for v in b] for b in boxes[::-1]], "category": categories[::-1], "area": areas[::-1]}
    sources = {
        "source_items": [int(v) for v in index],
        "source_boxes": [[int(x), int(y), int(s), int(s)] for x, y, s in zip(xs, ys, sides)],
        "source_kept": [bool(k) for k in kept],
    }
    return image, annotation, objects, sources


def fashion_mnist_scenes(
    split: str = "train",
    num_scenes: int = 1000,
    canvas: int = 128,
    items: Sequence[int] = (1, 4),
    scale: Sequence[float] = (1.0, 2.0),
    seed: int = 0,
    data_dir: str | None = None,
    background: str = "black",
    min_visible: float = 0.5,
    *,
    tint: str = "random",
    threshold: float = 0.1,
    with_sources: bool = False,
):
    """``num_scenes`` synthetic scenes of real Fashion-MNIST items as a ``datasets.Dataset`` for semantic
    segmentation (``image``, ``annotation``) and object detection (``image``, ``objects``).

    Scenes are composed from the real ``split`` ("train" or "test") only, deterministically from
    ``seed``; how, and what each column holds, is in the module docstring. ``data_dir`` is a folder with
    Fashion-MNIST's idx .gz files (default: the Debian package's ``/usr/share/datasets/fashion-mnist``).
    ``with_sources`` adds the columns that say which item of the split was drawn where.

    Raises :class:`~hfdistill.errors.RecipeError` (``data.data_dir``) when the files are missing and
    :class:`~hfdistill.errors.BadInputError` for arguments out of their domain.
    """
    import datasets

    items, scale = _check(split, num_scenes, canvas, items, scale, seed, background, tint, min_visible,
                          threshold)
    images, labels = fashion_mnist_items(split, data_dir)
    split_code = SPLITS.index(split)
    columns: dict[str, list] = {name: [] for name in scene_features(with_sources)}
    next_id = 0
    for scene in range(int(num_scenes)):
        rng = np.random.default_rng([int(seed), split_code, scene])
        image, annotation, objects, sources = _scene(rng, images, labels, int(canvas), items, scale, background, tint,
                                                     float(min_visible), float(threshold))
        objects["id"] = list(range(next_id, next_id + len(objects["category"])))
        next_id += len(objects["category"])
        columns["image_id"].append(scene)
        columns["image"].append(_png(image))
        columns["annotation"].append(_png(annotation))
        columns["width"].append(int(canvas))
        columns["height"].append(int(canvas))
        columns["objects"].append(objects)
        if with_sources:
            for name, values in sources.items():
                columns[name].append(values)
    features = scene_features(with_sources)
    info = datasets.DatasetInfo(features=features, description=(
        f"Synthetic scenes composed from real Fashion-MNIST {split} items (hfdistill.scenes, seed {seed}); not a "
        "real detection or segmentation benchmark. annotation: 0 background, k + 1 Fashion-MNIST class k. "
        "objects: COCO [x, y, w, h] boxes of the visible item pixels."
    ))
    return datasets.Dataset.from_dict(columns, features=features, info=info)


def fashion_mnist_scenes_dict(num_train: int = 1000, num_test: int = 200, **kwargs):
    """A ``datasets.DatasetDict``: ``train`` (scenes of Fashion-MNIST's train items) and ``validation``
    (scenes of its test items); ``kwargs`` go to :func:`fashion_mnist_scenes` for both."""
    import datasets

    for name in ("split", "num_scenes"):
        if name in kwargs:
            raise BadInputError(f"fashion_mnist_scenes_dict sets {name!r} itself; use num_train and num_test")
    return datasets.DatasetDict({
        "train": fashion_mnist_scenes("train", num_train, **kwargs),
        "validation": fashion_mnist_scenes("test", num_test, **kwargs),
    })
