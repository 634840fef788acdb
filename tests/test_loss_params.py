"""Every registered loss: parameter checking (LossParamError naming the parameter), valid defaults, set-up through
``configure(ctx)``, and fp32 results whatever the inputs' dtype. Parametrised over the registry, so a new loss is
covered (and a new loss without entries here fails ``test_tables_cover_the_registry``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hfdistill import losses
from hfdistill.errors import BadInputError, LossParamError
from hfdistill.terms import LossContext

METHODS = sorted(n for n in losses.available() if losses.get_info(n).alias_of is None)

# Parameters a loss cannot build without (the rest have valid defaults).
REQUIRED = {
    "minilm_value_relation": {"student_heads": 2, "teacher_heads": 2},
    "mgd": {"margin": "data"},  # the shapes-only context below has no teacher batch-norm to take the margin from
    "crd": {"nce_k": 3},  # negatives must be fewer than the examples (16 below)
}
# Losses that run the models themselves (on rotated, adversarial or input-gradient inputs, or peers): their
# forward needs a trainer's context with the models and the batch, so the generic forward tests below skip
# them; their own test files check fp32 results with half-precision models.
RUNS_MODELS = {"sobolev", "lwm", "bss", "sskd", "dml"}

# Values out of each parameter's domain, beyond the generic ones (NaN, inf, a string, a bool) tried on every
# parameter below.
INVALID = {
    "afd": [("qk_dim", 0), ("qk_dim", 2.5), ("qk_dim", -3)],
    "at": [("p", 0), ("p", -2.0), ("beta", 0), ("beta", -1)],
    "attention_kl": [("layer_map", "every"), ("layer_map", []), ("layer_map", [1.5])],
    "attention_mse": [("layer_map", "first"), ("layer_map", 3)],
    "cc": [("gamma", 0), ("gamma", -0.4), ("p_order", -1), ("p_order", 1.5), ("embed_dim", 0), ("embed_dim", 12.5)],
    "cosine": [("eps", 0), ("eps", -1e-8)],
    "cwd": [("temperature", 0), ("temperature", -4.0)],
    "deit": [("mode", "medium"), ("tau", 0), ("tau", -1)],
    "dist": [("beta", -1), ("gamma", -0.1), ("temperature", 0)],
    "dkd": [("alpha", -1.0), ("beta", -8), ("temperature", 0), ("temperature", -4), ("warmup", -5)],
    "embedding_mse": [],
    "fsp": [],
    "ft": [("phase", "stage1"), ("rate", 0), ("rate", -0.5), ("p", 0), ("teacher_factor", "feature")],
    "hidden_mse": [("layer_map", "all"), ("layer_map", [True])],
    "ickd": [],
    "irg": [("vertex_weight", -0.1), ("edge_weight", -5), ("transform_weight", -1), ("transform_pairs", [[0, 0]]),
            ("transform_pairs", [[0, -1]]), ("transform_pairs", [[0, 1, 2]]), ("transform_pairs", 3)],
    "kd": [("temperature", 0), ("temperature", -1)],
    "kr": [("mid_channel", 0), ("mid_channel", 8.0), ("warmup_epochs", -1)],
    "logit_std_kd": [("temperature", 0)],
    "logits_mse": [],
    "minilm_value_relation": [("student_heads", 0), ("teacher_heads", 3), ("num_relation_heads", -1),
                              ("num_relation_heads", 2.5)],
    "mse": [],
    "nst": [("d", 0), ("d", 1.5), ("c", -1.0)],
    "ofd": [("margin", 0.5), ("margin", [-1.0, 0.2]), ("margin", []), ("margin", ["a"])],
    "pkt": [("eps", 0), ("eps", -1e-7)],
    "rkd": [("distance_weight", -25), ("angle_weight", -1)],
    "sp": [],
    "srd": [("exponent", 0), ("exponent", -4)],
    "tf_kd": [("mode", "reg"), ("temperature", 0), ("a", 0.0), ("a", 1.0), ("a", 1.5)],
    "vid": [("init_pred_var", 0), ("init_pred_var", 1e-6), ("eps", 0), ("eps", -1), ("mid_channels", 0),
            ("mid_channels", 2.5)],
    "ab": [("margin", -1.0)],
    "pad": [("eps", 0), ("eps", -1e-6)],
    "skd": [("temperature", 0), ("multiplier", 0), ("multiplier", -2.0), ("alpha", 1.5), ("alpha", -0.1)],
    "dist_plus": [("beta", -1), ("gamma", -0.1), ("temperature", 0), ("channel_weight", -1.0),
                  ("spatial_weight", -1.0)],
    "kdsvd": [("k", 0), ("k", 1.5), ("sigma", 0), ("sigma", -8.0)],
    "mgd": [("reducer", "sum"), ("update_freq", 0), ("update_freq", 1.5), ("max_batches", 0), ("ignore_inds", [-1]),
            ("ignore_inds", [1, 1]), ("margin", "abc")],
    "crd": [("feat_dim", 0), ("feat_dim", 2.5), ("nce_k", 0), ("nce_t", 0), ("nce_m", 1.5), ("nce_m", -0.1),
            ("mode", "uniform")],
    "sskd": [("phase", "stage1"), ("ss_weight", -1), ("tf_weight", -0.1), ("ss_temperature", 0),
             ("tf_temperature", -4), ("ss_ratio", 1.5), ("tf_ratio", -0.1)],
    "sobolev": [("projection", "full"), ("normalize", 1)],
    "lwm": [("classes", "student")],
    "bss": [("temperature", 0), ("attack_size", 0), ("attack_size", 2.5), ("num_steps", 0), ("step_size", 0),
            ("eps", -1e-4), ("clip", 0), ("start_epoch", -1), ("end_epoch", 0)],
    "dml": [("peers", 0), ("peers", 1.5), ("temperature", 0)],
    "forward_kl": [("temperature", 0), ("chunk_size", 0), ("chunk_size", 2.5)],
    "reverse_kl": [("temperature", -1.0), ("chunk_size", 0)],
    "jsd": [("beta", -0.1), ("beta", 1.5), ("temperature", 0), ("chunk_size", 0)],
    "tvd": [("temperature", 0), ("chunk_size", -3)],
    "skew_kl": [("alpha", 1.0), ("alpha", -0.1), ("temperature", 0)],
    "skew_reverse_kl": [("alpha", 1.0), ("alpha", 1.5), ("chunk_size", 0)],
    "uld": [("temperature", 0), ("chunk_size", 0)],
    "pixel_kd": [("temperature", 0), ("align", "both"), ("ignore_index", 1.5)],
    "pairwise_affinity": [("scale", 0), ("scale", 1)],
    "detection_logit_kd": [("activation", "focal"), ("box_weight", -1), ("giou_weight", -1), ("score_threshold", 1.5)],
}

GENERIC_BAD = [float("nan"), float("inf"), float("-inf"), "abc", True]

PARAM_CASES = [(n, p) for n in METHODS for p in losses.get_info(n).params]


def _is_switch(name: str, param: str) -> bool:
    """A true/false parameter (its default is a bool): `True` is a valid value of it."""
    import inspect

    default = inspect.signature(losses.get_info(name).cls.__init__).parameters[param].default
    return isinstance(default, bool)


def test_tables_cover_the_registry():
    assert set(INVALID) == set(METHODS), "add the new loss's invalid parameter values to INVALID"
    assert set(EXAMPLES) == set(METHODS), "add an example input for the new loss to EXAMPLES"
    for name, cases in INVALID.items():
        assert {p for p, _ in cases} <= set(losses.get_info(name).params), name


@pytest.mark.parametrize("name", METHODS)
def test_defaults_build(name):
    loss = losses.build(name, **REQUIRED.get(name, {}))
    assert isinstance(loss, torch.nn.Module)


@pytest.mark.parametrize("name, param, value", [(n, p, v) for n in METHODS for p, v in INVALID[n]],
                         ids=lambda x: repr(x) if not isinstance(x, str) else x)
def test_out_of_domain_values_raise_loss_param_error(name, param, value):
    with pytest.raises(LossParamError) as info:
        losses.build(name, **{**REQUIRED.get(name, {}), param: value})
    assert info.value.param == param
    assert "must" in info.value.message and "got" in info.value.message  # says what it must be and what it got
    assert isinstance(info.value, BadInputError)  # the CLI exits 2


@pytest.mark.parametrize("name, param", PARAM_CASES, ids=[f"{n}.{p}" for n, p in PARAM_CASES])
@pytest.mark.parametrize("value", GENERIC_BAD, ids=repr)
def test_every_parameter_rejects_nan_inf_strings_and_bools(name, param, value):
    if value is True and _is_switch(name, param):
        pytest.skip("a true/false switch")
    with pytest.raises(LossParamError) as info:
        losses.build(name, **{**REQUIRED.get(name, {}), param: value})
    assert info.value.param == param


def test_messages_name_the_domain():
    with pytest.raises(LossParamError, match=r"^parameter 'alpha': must be a finite number >= 0, got -1.0$"):
        losses.build("dkd", alpha=-1.0)
    with pytest.raises(LossParamError, match=r"'p': must be a finite number > 0, got 0$"):
        losses.build("at", p=0)
    with pytest.raises(LossParamError, match=r"'init_pred_var': must be a finite number > 0, got 0$"):
        losses.build("vid", init_pred_var=0)
    with pytest.raises(LossParamError, match=r"'alpha': must be a finite number >= 0, got 'abc' \(a str\)$"):
        losses.build("dkd", alpha="abc")
    with pytest.raises(LossParamError, match=r"'temperature': .*got nan$"):
        losses.build("kd", temperature=float("nan"))
    with pytest.raises(LossParamError, match=r"'a': must be a finite number in \(0, 1\), got 1.0$"):
        losses.build("tf_kd", a=1.0)
    with pytest.raises(LossParamError, match=r"'mode': must be one of 'hard', 'soft', got 'medium'$"):
        losses.build("deit", mode="medium")
    with pytest.raises(LossParamError, match=r"'d': must be an integer >= 1, got 1.5"):
        losses.build("nst", d=1.5)


@pytest.mark.parametrize("name", METHODS + ["fitnet", "reviewkd"])
def test_unknown_parameter_is_a_loss_param_error(name):
    with pytest.raises(LossParamError, match=f"loss {name!r} has no parameter 'tempreature'") as info:
        losses.build(name, **REQUIRED.get(name, {}), tempreature=4.0)
    assert info.value.param == "tempreature"
    assert "its parameters are" in str(info.value)


def test_integer_valued_floats_and_ints_are_accepted_where_numbers_are():
    assert losses.build("kd", temperature=4).temperature == 4.0
    assert isinstance(losses.build("kd", temperature=4).temperature, float)
    assert losses.build("nst", d=3).d == 3
    assert losses.build("ofd", margin=-1).margin == -1.0
    assert losses.build("ofd", margin=[-1, -0.5]).margin == [-1.0, -0.5]


# --------------------------------------------------------------------------------------------- forward in fp32


def _maps(*shape: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape)


def _attention(b: int, h: int, t: int, seed: int) -> torch.Tensor:
    return F.softmax(_maps(b, h, t, t, seed=seed) * 2, dim=-1)


B = 4
LM_LABELS = torch.tensor([[-100, 1, 2, 3, -100, -100]] * B)  # [B, T=6] causal-LM labels
LABELS = torch.tensor([0, 1, 2, 3])
# name -> (student, teacher, fields); shapes are what configure(ctx) sees (per tap, batch included).
EXAMPLES = {
    "kd": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {}),
    "logits_mse": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {}),
    "dkd": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {"labels": LABELS, "epoch": 30.0}),
    "dist": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {}),
    "logit_std_kd": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {}),
    "tf_kd": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {"labels": LABELS}),
    "deit": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {}),
    "mse": (_maps(B, 4, 3, 3, seed=0), _maps(B, 4, 3, 3, seed=1), {}),
    "cosine": (_maps(B, 4, 3, 3, seed=0), _maps(B, 4, 3, 3, seed=1), {}),
    "cwd": (_maps(B, 4, 3, 3, seed=0), _maps(B, 4, 3, 3, seed=1), {}),
    "at": ([_maps(B, 3, 4, 4, seed=0)], [_maps(B, 6, 4, 4, seed=1)], {}),
    "nst": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, 4, 4, seed=1), {}),
    "ft": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, 4, 4, seed=1), {}),
    "ofd": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, 4, 4, seed=1), {}),
    "ickd": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, 4, 4, seed=1), {}),
    "srd": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, 4, 4, seed=1), {}),
    "afd": ([_maps(B, 3, 4, 4, seed=0), _maps(B, 5, 2, 2, seed=2)], [_maps(B, 6, 4, 4, seed=1)], {}),
    "kr": ([_maps(B, 3, 4, 4, seed=0), _maps(B, 5, 2, 2, seed=2)], [_maps(B, 4, 4, 4, seed=1), _maps(B, 6, 2, 2, seed=3)], {}),
    "pkt": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, seed=1), {}),
    "rkd": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, seed=1), {}),
    "sp": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, 2, 2, seed=1), {}),
    "vid": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, 4, 4, seed=1), {}),
    "cc": (_maps(B, 3, 2, 2, seed=0), _maps(B, 6, seed=1), {}),
    "irg": ([_maps(B, 5, 4, 4, seed=0), _maps(B, 5, seed=2)], [_maps(B, 5, 2, 2, seed=1), _maps(B, 5, seed=3)], {}),
    "fsp": ([_maps(B, 3, 4, 4, seed=0), _maps(B, 5, 2, 2, seed=2)], [_maps(B, 3, 4, 4, seed=1), _maps(B, 5, 4, 4, seed=3)], {}),
    "hidden_mse": ([_maps(B, 6, 8, seed=0)] * 2, [_maps(B, 6, 12, seed=1)] * 3, {"attention_mask": torch.ones(B, 6)}),
    "embedding_mse": (_maps(B, 6, 8, seed=0), _maps(B, 6, 12, seed=1), {}),
    "attention_kl": ([_attention(B, 2, 6, seed=0)], [_attention(B, 2, 6, seed=1)], {}),
    "attention_mse": ([_attention(B, 2, 6, seed=0)], [_attention(B, 2, 6, seed=1)] * 2, {}),
    "minilm_value_relation": (_maps(B, 6, 8, seed=0), _maps(B, 6, 12, seed=1), {}),
    "ab": ([_maps(B, 3, 4, 4, seed=0), _maps(B, 5, 2, 2, seed=2)], [_maps(B, 3, 4, 4, seed=1), _maps(B, 5, 2, 2, seed=3)], {}),
    "pad": (_maps(B, 6, seed=0), _maps(B, 6, seed=1), {}),
    "skd": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {"labels": LABELS}),
    "dist_plus": ([_maps(B, 5, seed=0), _maps(B, 3, 2, 2, seed=2)], [_maps(B, 5, seed=1), _maps(B, 6, 2, 2, seed=3)], {}),
    "kdsvd": ([_maps(B, 3, 4, 4, seed=0), _maps(B, 5, 2, 2, seed=2)], [_maps(B, 3, 4, 4, seed=1), _maps(B, 5, 2, 2, seed=3)], {}),
    "mgd": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, 4, 4, seed=1), {}),
    "crd": (_maps(B, 6, seed=0), _maps(B, 8, seed=1), {"index": torch.arange(B), "labels": LABELS}),
    # Shapes only (RUNS_MODELS: not run here).
    "sskd": (_maps(B, 6, seed=0), _maps(B, 8, seed=1), {}),
    "sobolev": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {}),
    "lwm": ([_maps(B, 3, 4, 4, seed=0), _maps(B, 5, seed=2)], [_maps(B, 6, 4, 4, seed=1), _maps(B, 5, seed=3)], {}),
    "bss": (_maps(B, 5, seed=0), _maps(B, 5, seed=1), {}),
    "dml": (_maps(B, 5, seed=0), None, {}),
    # token losses of causal LMs: [B, T, vocabulary] logits and causal-LM labels (position t predicts t+1)
    "forward_kl": (_maps(B, 6, 5, seed=0), _maps(B, 6, 5, seed=1), {"labels": LM_LABELS}),
    "reverse_kl": (_maps(B, 6, 5, seed=0), _maps(B, 6, 5, seed=1), {"labels": LM_LABELS}),
    "jsd": (_maps(B, 6, 5, seed=0), _maps(B, 6, 5, seed=1), {"labels": LM_LABELS}),
    "tvd": (_maps(B, 6, 5, seed=0), _maps(B, 6, 5, seed=1), {"labels": LM_LABELS}),
    "skew_kl": (_maps(B, 6, 5, seed=0), _maps(B, 6, 5, seed=1), {"labels": LM_LABELS}),
    "skew_reverse_kl": (_maps(B, 6, 5, seed=0), _maps(B, 6, 5, seed=1), {"labels": LM_LABELS}),
    "uld": (_maps(B, 6, 5, seed=0), _maps(B, 6, 7, seed=1), {"labels": LM_LABELS}),  # another vocabulary
    # dense prediction: segmentation score maps (the teacher's larger), features, DETR queries [logits, boxes]
    "pixel_kd": (_maps(B, 5, 4, 4, seed=0), _maps(B, 5, 8, 8, seed=1), {"labels": torch.zeros(B, 8, 8, dtype=torch.long)}),
    "pairwise_affinity": (_maps(B, 3, 4, 4, seed=0), _maps(B, 6, 8, 8, seed=1), {}),
    "detection_logit_kd": ([_maps(B, 5, 3, seed=0), _maps(B, 5, 4, seed=1).sigmoid()],
                           [_maps(B, 4, 3, seed=2), _maps(B, 4, 4, seed=3).sigmoid()], {}),
}


def _shapes(x):
    if x is None:
        return None
    return [v.shape for v in x] if isinstance(x, list) else x.shape


def _built(name: str) -> torch.nn.Module:
    student, teacher, _ = EXAMPLES[name]
    loss = losses.build(name, **REQUIRED.get(name, {}))
    if hasattr(loss, "configure"):
        loss.configure(LossContext(term=name, student_shape=_shapes(student), teacher_shape=_shapes(teacher),
                                   num_examples=16))
    return loss.eval()  # no state updates (OFD's margin estimate, BN statistics) between the two calls


def _cast(x, dtype):
    return [v.to(dtype) for v in x] if isinstance(x, list) else x.to(dtype)


@pytest.mark.parametrize("name", sorted(set(METHODS) - RUNS_MODELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_loss_computes_in_fp32(name, dtype):
    """Half-precision inputs give an fp32 scalar equal to the loss of the same values given in fp32."""
    student, teacher, fields = EXAMPLES[name]
    loss = _built(name)
    s_half, t_half = _cast(student, dtype), _cast(teacher, dtype)
    value = loss(s_half, t_half, **fields)
    reference = loss(_cast(s_half, torch.float32), _cast(t_half, torch.float32), **fields)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert math.isfinite(value.item())
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)


def test_sp_large_features_in_half_precision_stay_finite():
    """The issue's case: post-ReLU features large enough that their Gram diagonal overflows fp16."""
    s = (_maps(B, 64, 4, 4, seed=0).relu() * 60).half()
    t = (_maps(B, 64, 4, 4, seed=1).relu() * 60).half()
    assert torch.isinf((s.flatten(1) @ s.flatten(1).t())).any()  # fp16 arithmetic would overflow
    assert math.isfinite(losses.build("sp")(s, t).item())


@pytest.mark.parametrize("name", sorted(n for n in set(METHODS) - RUNS_MODELS
                                         if hasattr(losses.get_info(n).cls, "configure")))
def test_configure_takes_a_loss_context(name):
    student, teacher, _ = EXAMPLES[name]
    loss = losses.build(name, **REQUIRED.get(name, {}))
    loss.configure(LossContext(student_shape=_shapes(student), teacher_shape=_shapes(teacher), num_examples=16))
    with pytest.raises(TypeError):
        loss.configure(_shapes(student), _shapes(teacher))  # the old two-shape signature is gone
