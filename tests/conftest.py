"""Shared fixtures: offline, tiny models, scikit-learn digits."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import numpy as np
import pytest
import torch


def digits_arrays(size: int = 16):
    """scikit-learn digits as float32 [N, 1, size, size] images in [-1, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images * 2 - 1
    return images, torch.tensor(digits.target, dtype=torch.long)


def digits_dataset(n_train: int = 512, n_eval: int = 128, size: int = 16):
    """(train, eval) `datasets.Dataset`s with `pixel_values` and `labels`, torch-formatted."""
    import datasets

    images, labels = digits_arrays(size)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    images, labels = images[order], labels[order]

    def make(lo, hi):
        ds = datasets.Dataset.from_dict({"pixel_values": images[lo:hi].numpy(), "labels": labels[lo:hi].numpy()})
        return ds.with_format("torch")

    return make(0, n_train), make(n_train, n_train + n_eval)


@pytest.fixture(scope="session")
def digits():
    return digits_dataset()


def accuracy(eval_pred):
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def tiny_timm(name: str = "test_resnet", num_classes: int = 10, seed: int = 0, **kwargs):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=1, **kwargs)
