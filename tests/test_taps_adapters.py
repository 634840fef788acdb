"""Taps (hooks by module path, named outputs) and adapters (shapes, resizing)."""

import pytest
import torch
from conftest import tiny_timm
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hfdistill.adapters import (
    available_adapters,
    build_adapter,
    check_adapter_params,
    get_adapter_params,
    suggest_adapter,
)
from hfdistill.errors import AdapterError, BadInputError
from hfdistill.taps import ModelTaps, TapError, resolve_module


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=24, num_labels=3, attn_implementation="eager")
    return BertForSequenceClassification(config).eval()


def record(taps: ModelTaps, call):
    taps.attach()
    with taps.recording():
        outputs = call()
    features = taps.gather(outputs)
    taps.remove()
    return features, outputs


def test_timm_module_taps_input_output_and_named():
    model = tiny_timm().eval()
    taps = ModelTaps(model, ["layer2", "layer3.0.conv1:input", "logits", "features", "fc:input"], "teacher")
    x = torch.randn(2, 3, 16, 16)
    features, outputs = record(taps, lambda: model(x))
    assert features["logits"] is outputs
    assert features["layer2"].shape[1] == model.layer2[-1].conv2.out_channels
    torch.testing.assert_close(features["layer3.0.conv1:input"], features["layer2"])  # input of layer3 = output of layer2
    torch.testing.assert_close(features["features"], model.forward_head(model.forward_features(x), pre_logits=True))
    torch.testing.assert_close(features["fc:input"], features["features"])
    assert not model.layer2._forward_hooks  # removed


def test_transformers_named_outputs():
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 5))
    names = ["logits", "hidden_states", "hidden_states.-1", "attentions.1", "pooled", "bert.encoder.layer.-1"]
    taps = ModelTaps(model, names, "student")
    assert taps.forward_kwargs == {"output_hidden_states": True, "output_attentions": True}
    features, outputs = record(taps, lambda: model(input_ids=ids, **taps.forward_kwargs))
    assert len(features["hidden_states"]) == 4 and features["hidden_states.-1"].shape == (2, 5, 16)
    assert features["attentions.1"].shape == (2, 2, 5, 5)
    torch.testing.assert_close(features["attentions.1"].sum(-1), torch.ones(2, 2, 5))
    torch.testing.assert_close(features["pooled"], model.bert.pooler(features["hidden_states.-1"]))
    torch.testing.assert_close(features["bert.encoder.layer.-1"], features["hidden_states.-1"])


def test_hooks_overwrite_and_record_only_when_asked():
    model = tiny_timm().eval()
    taps = ModelTaps(model, ["layer1"], "student")
    taps.attach()
    model(torch.randn(2, 3, 16, 16))  # not recording: nothing kept
    assert not taps._store
    with taps.recording():
        model(torch.randn(2, 3, 16, 16))
        second = torch.randn(2, 3, 16, 16)
        model(second)  # a re-run (gradient checkpointing) overwrites, never appends
    assert len(taps._store) == 1
    torch.testing.assert_close(taps._store["layer1"], model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(second))))))
    taps.remove()
    assert not taps._store and not model.layer1._forward_hooks


def test_wrong_paths_list_the_closest():
    model = tiny_timm().eval()
    taps = ModelTaps(model, ["layer3.0.conv9"], "teacher")
    with pytest.raises(TapError) as info:
        record(taps, lambda: model(torch.randn(1, 3, 16, 16)))
    message = str(info.value)
    assert "teacher tap 'layer3.0.conv9'" in message and "layer3.0.conv1" in message and "Named outputs" in message
    with pytest.raises(TapError, match="layer3"):
        ModelTaps(model, ["layr3.conv"], "student").check_paths()
    assert resolve_module(model, "layer1.-1") is model.layer1[-1]
    assert resolve_module(model, "layer1.7") is None


def test_module_not_on_forward_path():
    model = tiny_timm().eval()
    model.spare = nn.Linear(2, 2)
    taps = ModelTaps(model, ["spare"], "student")
    with pytest.raises(TapError, match="did not run"):
        record(taps, lambda: model(torch.randn(1, 3, 16, 16)))


@pytest.mark.parametrize(
    "name, s_shape, t_shape, params",
    [
        ("identity", (2, 8, 4, 4), (2, 8, 4, 4), {}),
        ("linear", (2, 16), (2, 32), {}),
        ("linear", (2, 5, 16), (2, 5, 32), {"bias": False}),
        ("linear", (2, 8, 4, 4), (2, 16, 2, 2), {}),
        ("conv1x1", (2, 8, 8, 8), (2, 16, 4, 4), {}),
        ("conv1x1", (2, 8, 2, 2), (2, 16, 4, 4), {"bn": False}),
        ("conv_reg", (2, 8, 4, 4), (2, 16, 4, 4), {}),
        ("conv_reg", (2, 8, 8, 8), (2, 16, 4, 4), {}),
        ("conv_reg", (2, 8, 4, 4), (2, 16, 8, 8), {}),
        ("conv_reg", (2, 8, 7, 7), (2, 16, 4, 4), {"relu": False}),
        ("conv_reg", (2, 8, 3, 3), (2, 16, 7, 7), {}),
        ("mlp", (2, 5, 16), (2, 5, 24), {"hidden": 8}),
        ("mlp", (2, 8, 4, 4), (2, 12, 4, 4), {}),
        ("resize", (2, 8, 8, 8), (2, 8, 4, 4), {"mode": "pool"}),
    ],
)
def test_adapters_map_to_teacher_shape_and_train(name, s_shape, t_shape, params):
    adapter = build_adapter(name, torch.Size(s_shape), torch.Size(t_shape), **params)
    x = torch.randn(*s_shape, requires_grad=True)
    y = adapter(x)
    assert y.shape == t_shape
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in adapter.parameters())


def test_adapter_registry_and_errors():
    assert {"identity", "linear", "conv1x1", "conv_reg", "mlp", "resize"} <= set(available_adapters())
    assert get_adapter_params("conv1x1") == ("bn", "resize")
    with pytest.raises(AdapterError, match="conv1x1.*4-d.*shape \\(2, 16\\)"):
        build_adapter("conv1x1", torch.Size((2, 16)), torch.Size((2, 8, 4, 4)))
    with pytest.raises(AdapterError, match="unknown adapter"):
        build_adapter("conv3x3", torch.Size((2, 16)), torch.Size((2, 8)))
    with pytest.raises(AdapterError, match="unknown adapter"):
        get_adapter_params("conv3x3")
    assert suggest_adapter(torch.Size((2, 8, 4, 4)), torch.Size((2, 16, 4, 4))) == "conv1x1"
    assert suggest_adapter(torch.Size((2, 5, 8)), torch.Size((2, 5, 16))) == "linear"
    # resize is exact average pooling when shrinking by an integer factor
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = build_adapter("resize", x.shape, torch.Size((1, 1, 2, 2)))(x)
    torch.testing.assert_close(y, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("conv1x1", {"bn": "yes"}, "'bn' must be true or false"),
        ("conv1x1", {"resize": "nearest"}, "'resize' must be one of auto, pool, bilinear"),
        ("linear", {"bias": 1}, "'bias' must be true or false"),
        ("conv_reg", {"relu": None}, "'relu' must be true or false"),
        ("mlp", {"hidden": 0}, "'hidden' must be an integer >= 1"),
        ("mlp", {"hidden": 2.5}, "'hidden' must be an integer >= 1"),
        ("resize", {"mode": "area"}, "'mode' must be one of"),
        ("conv1x1", {"kernel": 3}, "no parameter 'kernel'.*bn, resize"),
        ("identity", {"scale": 2}, "no parameter 'scale'.*none"),
    ],
)
def test_adapter_parameter_errors(name, params, match):
    shapes = {"linear": ((2, 16), (2, 8)), "mlp": ((2, 16), (2, 8))}.get(name, ((2, 8, 4, 4), (2, 16, 4, 4)))
    with pytest.raises(AdapterError, match=match) as info:
        check_adapter_params(name, params)  # before any shape is known
    assert info.value.param == next(iter(params))
    with pytest.raises(AdapterError, match=match) as info:
        build_adapter(name, torch.Size(shapes[0]), torch.Size(shapes[1]), **params)
    assert isinstance(info.value, BadInputError)  # bad input: the CLI exits 2


def test_adapter_valid_parameters_pass_the_check():
    for name, params in [("conv1x1", {"bn": False, "resize": "pool"}), ("mlp", {"hidden": None}), ("linear", {})]:
        check_adapter_params(name, params)


def test_input_tap_of_an_in_place_module_reads_the_values_before_it():
    """`layer1.0.act2:input` is the pre-ReLU sum of a timm block even though its ReLU is in place, and the
    gradient still flows through it."""
    model = tiny_timm().train()
    assert model.layer1[0].act2.inplace
    nn.init.normal_(model.layer1[0].bn2.weight)  # timm zero-initialises the last BN of a block
    taps = ModelTaps(model, ["layer1.0.act2:input", "layer1.0.act2"], "student")
    features, _ = record(taps, lambda: model(torch.randn(2, 3, 16, 16)))
    pre, post = features["layer1.0.act2:input"], features["layer1.0.act2"]
    assert (pre < 0).any() and (post >= 0).all()
    torch.testing.assert_close(pre.clamp(min=0), post)
    pre.pow(2).sum().backward()
    assert model.layer1[0].bn2.weight.grad is not None and model.layer1[0].bn2.weight.grad.abs().sum() > 0
