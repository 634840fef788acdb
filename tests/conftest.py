"""Shared fixtures: offline, tiny models, scikit-learn digits."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import numpy as np
import pytest
import torch


def digits_arrays(size: int = 16, channels: int = 3):
    """scikit-learn digits as float32 [N, channels, size, size] images in [-1, 1] and int64 labels.

    Three channels (the gray image repeated) by default, because pipeline() feeds RGB images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images * 2 - 1).repeat(1, channels, 1, 1)
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


def tiny_timm(name: str = "test_resnet", num_classes: int = 10, seed: int = 0, size: int = 16, **kwargs):
    """A tiny timm classifier whose pretrained_cfg describes the digits inputs (so pipeline() preprocesses right)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "input_size": (3, size, size),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }
    return model


def tiny_vit(num_labels: int = 10, size: int = 16, seed: int = 0):
    """A tiny transformers ViT classifier without dropout (per-example maths: no batch statistics)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=size, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=48, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def tiny_hf_resnet(num_labels: int = 10, seed: int = 0):
    """A small transformers CNN (ResNetForImageClassification) built from a config."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        downsample_in_first_stage=False, num_labels=num_labels,
    )
    return ResNetForImageClassification(config)
