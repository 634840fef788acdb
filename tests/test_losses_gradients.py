"""Gradient-based losses (hfdistill/losses/gradients.py): Sobolev / Jacobian matching, LwM, BSS.

Values are checked against independent computations on tiny models (full Jacobians from
torch.autograd.functional.jacobian, per-example Grad-CAM loops, the attack step written out by hand); then the
mechanisms (double backprop reaches the student's parameters and not the teacher's, the teacher stays
bit-identical, half-precision teachers, BSS samples crossing toward the boundary), then one short
DistillationTrainer run per method on tiny timm models.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_timm
from test_trainer import make_args
from torch import nn

from hfdistill import DistillationError, DistillationTrainer
from hfdistill.errors import LossParamError
from hfdistill.losses import build
from hfdistill.losses import gradients
from hfdistill.losses.gradients import bss_attack, bss_select, bss_target_classes, grad_cam
from hfdistill.teacher import Teacher
from hfdistill.terms import LossContext

C = 5  # classes


def conv_net(seed: int, width: int = 6, stride: int = 1, scale: float = 1.0, inplace_head: bool = False) -> nn.Module:
    """A tiny classifier with a `body` (the tapped middle layer) and a `head`; tanh keeps second derivatives."""
    torch.manual_seed(seed)
    head = [nn.Conv2d(width, width, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, C)]
    if inplace_head:  # an in-place op right after the tapped layer (as timm's ReLU(inplace=True))
        head = [nn.ReLU(inplace=True), *head]
    model = nn.Sequential(OrderedDict(
        body=nn.Sequential(nn.Conv2d(3, width, 3, padding=1, stride=stride), nn.Tanh(), nn.Conv2d(width, width, 3, padding=1), nn.Tanh()),
        head=nn.Sequential(*head),
    ))
    with torch.no_grad():
        model.head[-1].weight.mul_(scale)
    return model.eval()


def images(n: int = 4, seed: int = 0, size: int = 6) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(n, 3, size, size) * 2 - 1


def frozen(model: nn.Module, dtype: str = "auto") -> Teacher:
    return Teacher(model, dtype=dtype, shared_input_names={"pixel_values"})


def configured(name: str, student: nn.Module | None, teacher: Teacher | None, taps=("logits",), **params):
    loss = build(name, **params)
    loss.configure(LossContext(
        term=name, student=student, frozen_teacher=teacher, student_taps=list(taps), teacher_taps=list(taps),
        student_inputs=lambda batch: {k: v for k, v in batch.items() if k in ("pixel_values", "labels")},
    ))
    return loss


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient (zeros where none reached it, e.g. the last bias under a gradient loss)."""
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in model.named_parameters()}


def assert_untouched(teacher: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training


# ============================================================================================ Sobolev


def jacobian_rows(model: nn.Module, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Each example's own Jacobian d z_b / d x_b, [B, C, D], from the full batch Jacobian [B, C, B, ...]."""
    full = torch.autograd.functional.jacobian(model, x, create_graph=create_graph)
    return torch.stack([full[b, :, b].reshape(C, -1) for b in range(x.shape[0])])


def sobolev_by_jacobian(j_s: torch.Tensor, j_t: torch.Tensor, v: torch.Tensor, normalize: bool) -> torch.Tensor:
    """sum_b ||v_b^T J_s,b / |.| - v_b^T J_t,b / |.| ||^2 / (B D), written with explicit loops."""
    total, (b_size, _, d) = 0.0, j_s.shape
    for b in range(b_size):
        g_s, g_t = v[b] @ j_s[b], v[b] @ j_t[b]  # [D]
        if normalize:
            g_s, g_t = g_s / g_s.norm(), g_t / g_t.norm()
        total = total + ((g_s - g_t) ** 2).sum()
    return total / (b_size * d)


@pytest.mark.parametrize("normalize", [True, False])
def test_sobolev_label_projection_is_the_true_class_jacobian_row(normalize):
    student, teacher = conv_net(0, width=4), conv_net(1, width=7)
    x, labels = images(), torch.tensor([0, 3, 1, 4])
    loss = configured("sobolev", student, frozen(teacher), projection="label", normalize=normalize)
    x_s = x.clone().requires_grad_()
    value = loss(student(x_s), None, batch={"pixel_values": x, "labels": labels}, student_input=x_s)
    expected = sobolev_by_jacobian(jacobian_rows(student, x), jacobian_rows(teacher, x), F.one_hot(labels, C).float(), normalize)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-8)
    assert value.dtype == torch.float32 and value.dim() == 0


def test_sobolev_random_projection_uses_a_unit_vector_per_example_for_both_models():
    student, teacher = conv_net(0, width=4), conv_net(1, width=7)
    x = images()
    loss = configured("sobolev", student, frozen(teacher))  # projection: random (default)
    x_s = x.clone().requires_grad_()
    torch.manual_seed(123)
    value = loss(student(x_s), None, batch={"pixel_values": x}, student_input=x_s)
    torch.manual_seed(123)
    u = torch.randn(x.shape[0], C)
    v = u / u.norm(dim=1, keepdim=True)  # uniform on the unit sphere
    expected = sobolev_by_jacobian(jacobian_rows(student, x), jacobian_rows(teacher, x), v, normalize=True)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-8)
    # The same network on both sides matches whatever the projection.
    twin = configured("sobolev", student, frozen(copy.deepcopy(student)))
    x_s = x.clone().requires_grad_()
    assert twin(student(x_s), None, batch={"pixel_values": x}, student_input=x_s).item() < 1e-12


def test_sobolev_double_backprop_reaches_the_student_and_not_the_teacher():
    student, teacher_model = conv_net(0, width=4), conv_net(1, width=7)
    before = state(teacher_model)
    x, labels = images(), torch.tensor([0, 3, 1, 4])
    loss = configured("sobolev", student, frozen(teacher_model), projection="label")
    x_s = x.clone().requires_grad_()
    loss(student(x_s), None, batch={"pixel_values": x, "labels": labels}, student_input=x_s).backward()
    got = grads(student)

    # The same loss from full Jacobians built with create_graph: its parameter gradients are the reference.
    student.zero_grad()
    v = F.one_hot(labels, C).float()
    sobolev_by_jacobian(jacobian_rows(student, x, create_graph=True), jacobian_rows(teacher_model, x), v, True).backward()
    for name, grad in grads(student).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-9)
    # Through the gradient itself: even the last layer's weights (which a logit loss would also reach) and
    # the first conv's (only reachable through d z / d x).
    assert got["body.0.weight"].abs().sum() > 0 and got["head.4.weight"].abs().sum() > 0
    assert_untouched(teacher_model, before)


def test_sobolev_teacher_with_its_own_normalisation_is_differentiated_with_respect_to_the_student_input():
    """A teacher fed `2 x - 0.5` (another normalisation, as data.teacher_image_inputs makes): its gradient is
    taken with respect to the student's x, i.e. 2 J_t(2 x - 0.5)."""
    student, teacher_model = conv_net(0, width=4), conv_net(1, width=7)
    teacher = Teacher(teacher_model, inputs_fn=lambda batch: {"pixel_values": 2 * batch["pixel_values"] - 0.5})
    x, labels = images(), torch.tensor([0, 3, 1, 4])
    loss = configured("sobolev", student, teacher, projection="label", normalize=False)
    x_s = x.clone().requires_grad_()
    value = loss(student(x_s), None, batch={"pixel_values": x, "labels": labels}, student_input=x_s)
    j_t = jacobian_rows(lambda v: teacher_model(2 * v - 0.5), x)
    expected = sobolev_by_jacobian(jacobian_rows(student, x), j_t, F.one_hot(labels, C).float(), normalize=False)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sobolev_half_precision_teacher(dtype):
    student, teacher_model = conv_net(0, width=4), conv_net(1, width=7)
    x, labels = images(), torch.tensor([0, 3, 1, 4])
    reference = configured("sobolev", student, frozen(copy.deepcopy(teacher_model)), projection="label")
    half = configured("sobolev", student, frozen(teacher_model, dtype=dtype), projection="label")
    batch = {"pixel_values": x, "labels": labels}
    x_s = x.clone().requires_grad_()
    value = half(student(x_s), None, batch=batch, student_input=x_s)
    expected = reference(student(x_s), None, batch=batch, student_input=x_s)
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    torch.testing.assert_close(value, expected, rtol=0.1, atol=1e-4)  # the teacher's rounding only
    value.backward()
    assert all(p.grad is None for p in teacher_model.parameters())


def test_sobolev_errors():
    student, teacher = conv_net(0), conv_net(1)
    x = images()
    loss = configured("sobolev", student, frozen(teacher))
    with pytest.raises(DistillationError, match="student_input"):
        loss(student(x), None, batch={"pixel_values": x}, student_input=None)
    x_s = x.clone().requires_grad_()
    with pytest.raises(DistillationError, match="does not come from the student's"):  # the teacher's own input
        loss(student(x_s), None, batch={"pixel_values": x, "teacher_pixel_values": images(size=8)}, student_input=x_s)
    label_loss = configured("sobolev", student, frozen(teacher), projection="label")
    with pytest.raises(DistillationError, match="labels"):
        label_loss(student(x_s), None, batch={"pixel_values": x}, student_input=x_s)
    unattached = build("sobolev")
    with pytest.raises(DistillationError, match="needs the teacher model"):
        unattached(student(x_s), None, batch={"pixel_values": x}, student_input=x_s)
    with pytest.raises(DistillationError, match="needs the teacher model"):
        configured("sobolev", student, None).on_train_begin(LossContext(term="sob"))
    with pytest.raises(LossParamError, match="projection"):
        build("sobolev", projection="full")
    with pytest.raises(LossParamError, match="normalize"):
        build("sobolev", normalize="yes")


# ================================================================================================ LwM


def cam_loop(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None, create_graph: bool):
    """Each example alone: A = body(x_b), y = head(A)[c], alpha_k = mean_hw dy/dA_k, cam = relu(sum_k alpha_k A_k)."""
    cams, picked = [], []
    for b in range(x.shape[0]):
        a = model.body(x[b:b + 1])
        if not create_graph:
            a = a.detach().requires_grad_()
        z = model.head(a.clone())
        c = int(z.argmax()) if classes is None else int(classes[b])
        (g,) = torch.autograd.grad(z[0, c], a, create_graph=create_graph)
        cam = torch.zeros(a.shape[2:])
        for k in range(a.shape[1]):
            cam = cam + g[0, k].mean() * a[0, k]
        cams.append(torch.relu(cam))
        picked.append(c)
    return torch.stack(cams), torch.tensor(picked)


def lwm_by_loops(student: nn.Module, teacher: nn.Module, x: torch.Tensor, labels=None, create_graph=False):
    cam_t, classes = cam_loop(teacher, x, labels, False)
    cam_s, _ = cam_loop(student, x, classes, create_graph)
    if cam_s.shape != cam_t.shape:
        size = tuple(min(a, b) for a, b in zip(cam_s.shape[1:], cam_t.shape[1:]))
        cam_s = F.adaptive_avg_pool2d(cam_s[:, None], size)[:, 0]
        cam_t = F.adaptive_avg_pool2d(cam_t[:, None], size)[:, 0]
    total = 0.0
    for b in range(x.shape[0]):
        q_s, q_t = cam_s[b].flatten(), cam_t[b].flatten()
        total = total + (q_s / q_s.norm() - q_t / q_t.norm()).abs().sum()
    return total / cam_s[0].numel() / x.shape[0]


def lwm_inputs(student: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What the engine hands the loss for the taps [body, logits]: the layer's output and the logits, in one graph."""
    feature = student.body(x)
    return [feature, student.head(feature)]


def test_grad_cam_formula_on_hand_made_tensors():
    a = torch.tensor([[[[1.0, -2.0]], [[3.0, 4.0]]]])  # [1, 2 channels, 1, 2]
    g = torch.tensor([[[[0.5, 1.5]], [[-1.0, 0.0]]]])  # alphas: 1.0 and -0.5
    expected = torch.relu(torch.tensor([[[1.0 * 1 - 0.5 * 3, 1.0 * -2 - 0.5 * 4]]]))  # [[0, 0]] -> relu
    torch.testing.assert_close(grad_cam(a, g), expected)
    tokens = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # [1, T=2, D=2]; alpha_d = mean over tokens
    grads = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]])  # alphas 1, 1
    torch.testing.assert_close(grad_cam(tokens, grads), torch.tensor([[3.0, 2.0]]))


@pytest.mark.parametrize("classes", ["teacher", "label"])
def test_lwm_value_is_l1_of_normalised_grad_cams(classes):
    student, teacher = conv_net(0, width=4), conv_net(1, width=7, inplace_head=True)
    x, labels = images(), torch.tensor([0, 3, 1, 4])
    loss = configured("lwm", student, frozen(teacher), taps=("body", "logits"), classes=classes)
    value = loss(lwm_inputs(student, x), None, batch={"pixel_values": x, "labels": labels})
    expected = lwm_by_loops(student, teacher, x, labels if classes == "label" else None)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    assert value.dtype == torch.float32


def test_lwm_pools_the_larger_map_and_reads_an_input_tap():
    student, teacher = conv_net(0, width=4, stride=2), conv_net(1, width=7)  # 3x3 and 6x6 maps
    x = images()
    loss = configured("lwm", student, frozen(teacher), taps=("body", "logits"))
    value = loss(lwm_inputs(student, x), None, batch={"pixel_values": x})
    torch.testing.assert_close(value, lwm_by_loops(student, teacher, x), rtol=1e-5, atol=1e-7)
    # `head.0:input` is the body's output read as the head's input: the same map, through a pre-hook.
    by_input = configured("lwm", student, frozen(teacher), taps=("head.0:input", "logits"))
    torch.testing.assert_close(by_input(lwm_inputs(student, x), None, batch={"pixel_values": x}), value)


def test_lwm_double_backprop_reaches_the_student_on_both_sides_of_the_layer():
    student, teacher_model = conv_net(0, width=4), conv_net(1, width=7)
    before = state(teacher_model)
    x = images()
    loss = configured("lwm", student, frozen(teacher_model), taps=("body", "logits"))
    loss(lwm_inputs(student, x), None, batch={"pixel_values": x}).backward()
    got = grads(student)
    student.zero_grad()
    lwm_by_loops(student, teacher_model, x, create_graph=True).backward()
    for name, grad in grads(student).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-9)
    # Before the layer through A, after it through alpha = mean d y / d A (second order).
    assert got["body.0.weight"].abs().sum() > 0 and got["head.0.weight"].abs().sum() > 0
    assert_untouched(teacher_model, before)
    # The temporary hook is gone.
    assert not teacher_model.body._forward_hooks and not teacher_model.body._forward_pre_hooks


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lwm_half_precision_teacher_and_student_taps(dtype):
    """A half teacher runs; a half-precision student tap given as its fp32 copy (as the engine's `select`
    hands it) is differentiated through its source tensor."""
    student, teacher_model = conv_net(0, width=4), conv_net(1, width=7)
    x = images()
    reference = configured("lwm", student, frozen(copy.deepcopy(teacher_model)), taps=("body", "logits"))
    half = configured("lwm", student, frozen(teacher_model, dtype=dtype), taps=("body", "logits"))
    expected = reference(lwm_inputs(student, x), None, batch={"pixel_values": x})
    value = half(lwm_inputs(student, x), None, batch={"pixel_values": x})
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    torch.testing.assert_close(value, expected, rtol=0.1, atol=2e-3)

    half_student = copy.deepcopy(student).to(torch.bfloat16)
    feature = half_student.body(x.to(torch.bfloat16))
    logits = half_student.head(feature)
    got = reference([feature.float(), logits.float()], None, batch={"pixel_values": x})
    torch.testing.assert_close(got, expected, rtol=0.1, atol=2e-3)
    got.backward()
    assert half_student.body[0].weight.grad.abs().sum() > 0


def test_lwm_errors():
    student, teacher = conv_net(0), conv_net(1)
    x = images()
    with pytest.raises(DistillationError, match="two student taps"):
        configured("lwm", student, frozen(teacher), taps=("body",))
    loss = configured("lwm", student, frozen(teacher), taps=("body", "logits"))
    with pytest.raises(DistillationError, match="two student taps"):
        loss(student(x), None, batch={"pixel_values": x})
    adapted = [nn.Conv2d(6, 6, 1)(student.body(x)), student(x)]  # an adapter's output is not on the logits' path
    with pytest.raises(DistillationError, match="do not depend on the tapped feature"):
        loss(adapted, None, batch={"pixel_values": x})
    named_output = configured("lwm", student, frozen(teacher), taps=("pooled", "logits"))
    with pytest.raises(DistillationError, match="module path"):
        named_output(lwm_inputs(student, x), None, batch={"pixel_values": x})
    with pytest.raises(LossParamError, match="classes"):
        build("lwm", classes="student")


# ================================================================================================ BSS


def test_bss_select_takes_examples_both_classify_right_ranked_by_non_true_class_distance():
    labels = torch.tensor([0, 1, 2, 0, 1])
    teacher = torch.tensor([[5.0, 0, 0], [0, 4, 1], [0, 0, 3], [1, 2, 0], [0, 3, 2]])
    student = torch.tensor([[2.0, 1, 0], [0, 2, 1.5], [3, 0, 1], [3, 1, 0], [0, 1, 0.9]])
    # Correct for both: 0, 1, 4 (2: student wrong; 3: teacher wrong).
    assert bss_select(student, teacher, labels, size=10).tolist() == [0, 1, 4]
    scores = {}
    for i in (0, 1, 4):
        p_t, p_s = teacher[i].softmax(0), student[i].softmax(0)
        scores[i] = sum(float(p_t[k] - p_s[k]) ** 2 for k in range(3) if k != labels[i])
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert bss_select(student, teacher, labels, size=2).tolist() == ranked[:2]


def test_bss_target_classes_follow_the_teacher_over_its_other_classes():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.6, 0.1]]))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([bss_target_classes(logits, generator) for _ in range(3000)])  # [3000, 2]
    assert (draws[:, 0] != 0).all() and (draws[:, 1] != 2).all()  # never the teacher's own class
    freq = torch.stack([torch.bincount(draws[:, r], minlength=4).float() / 3000 for r in range(2)])
    expected = torch.tensor([[0.0, 0.6, 0.3, 0.1], [0.25, 0.5, 0.0, 0.25]])  # p_k / sum of the other classes
    torch.testing.assert_close(freq, expected, atol=0.035, rtol=0)
    # Every other class underflows to probability 0 in fp32: the second class, as the authors' code.
    assert bss_target_classes(torch.tensor([[0.0, 500.0, -3.0, 2.0]])).tolist() == [3]


def test_bss_attack_step_by_hand_and_per_sample_stopping():
    """A linear teacher z = W x: one step is x + eta (m + eps) g / ||g|| with g = w_target - w_base."""
    # ||w1 - w0|| = 5, ||w2 - w0|| = 1.5, w1 . w2 = 0 (moving toward one class leaves the other's logit alone)
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 3.0], [0.9, 0.0, 1.2, 0.0]])
    teacher = nn.Linear(4, 3, bias=True)
    with torch.no_grad():
        teacher.weight.copy_(w)
        teacher.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    x = torch.zeros(2, 4)
    base, target = torch.tensor([0, 0]), torch.tensor([1, 2])  # margins z0 - zt = 1 for both
    eta, eps = 0.3, 1e-4
    one = bss_attack(teacher, x, base, target, num_steps=1, step_size=eta, eps=eps, clip=None)
    for b in range(2):
        g = w[target[b]] - w[base[b]]
        torch.testing.assert_close(one[b], x[b] + eta * (1.0 + eps) * g / g.norm())
    margins = []
    for steps in range(1, 25):
        z = teacher(bss_attack(teacher, x, base, target, num_steps=steps, step_size=eta, eps=eps, clip=None))
        margins.append((z[:, 0] - z.gather(1, target[:, None])[:, 0]).detach())
    margins = torch.stack(margins)  # [steps, 2]
    # Example 0 (eta ||g|| = 1.5): crosses in one step and then stays where it is (it is no longer on the base side).
    assert margins[0, 0] < 0 and torch.equal(margins[:, 0], margins[0, 0].expand(24))
    # Example 1 (eta ||g|| = 0.45): the margin shrinks every step (by 1 - 0.45 on a linear model), crosses once
    # enough steps are taken, and then stays.
    crossing = int((margins[:, 1] < 0).nonzero()[0])
    assert crossing > 5 and (margins[1:crossing + 1, 1] < margins[:crossing, 1]).all()
    torch.testing.assert_close(margins[1:crossing, 1], 0.55 * (margins[:crossing - 1, 1] + eps) - eps)
    assert torch.equal(margins[crossing:, 1], margins[crossing, 1].expand(24 - crossing))
    assert torch.equal(one, bss_attack(teacher, x, base, target, num_steps=1, step_size=eta, eps=eps, clip=5.0))
    assert bss_attack(teacher, x, base, target, num_steps=1, clip=0.5).abs().max() <= 0.5


def test_bss_attack_moves_a_network_teacher_toward_the_boundary():
    teacher = conv_net(1, width=7, scale=30.0)
    x = images(6)
    z = teacher(x)
    base, target = z.argmax(1), (z.argmax(1) + 1) % C

    def margin(v):
        out = teacher(v)
        return (out.gather(1, base[:, None]) - out.gather(1, target[:, None]))[:, 0].detach()

    start, after_five = margin(x), margin(bss_attack(teacher, x, base, target, num_steps=5))
    assert (start > 0).all() and (after_five < start).all() and (after_five > 0).all()
    crossed = bss_attack(teacher, x, base, target, num_steps=60)
    assert (margin(crossed) < 0).all()  # across the boundary, and only just (the step is scaled by the margin)
    assert (margin(crossed) > -1e-3).all() and (teacher(crossed).argmax(1) == target).all()
    assert torch.equal(crossed, bss_attack(teacher, x, base, target, num_steps=100))  # all stopped once across


def bss_batch(n: int = 8):
    """A student that is a noisy copy of the teacher and labels = the teacher's predictions (many base samples)."""
    teacher = conv_net(1, width=7, scale=30.0)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = images(n)
    labels = teacher(x).argmax(1)
    return student, teacher, x, labels


def test_bss_value_schedule_and_gradients():
    student, teacher_model, x, labels = bss_batch()
    before = state(teacher_model)
    loss = configured("bss", student, frozen(teacher_model), attack_size=5, temperature=3.0, start_epoch=1.0, end_epoch=4.0)
    batch = {"pixel_values": x, "labels": labels}
    z_s, z_t = student(x), teacher_model(x).detach()
    torch.manual_seed(7)
    value = loss(z_s, z_t, labels=labels, batch=batch, epoch=2.0)

    # Independently: the same draws, the attack, then the KL written as a sum, x the schedule's 1 - 2/4.
    torch.manual_seed(7)
    index = bss_select(z_s.detach(), z_t, labels, 5)
    assert index.numel() == 5
    target = bss_target_classes(z_t[index])
    x_adv = bss_attack(teacher_model, x[index], labels[index], target)
    p_t = F.softmax(teacher_model(x_adv).detach() / 3, dim=1)
    log_p_s = F.log_softmax(student(x_adv) / 3, dim=1)
    kl = (p_t * (p_t.log() - log_p_s)).sum() / index.numel()
    torch.testing.assert_close(value, 0.5 * kl, rtol=1e-5, atol=1e-8)
    assert value.item() > 0

    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert_untouched(teacher_model, before)
    assert [loss.schedule(e) for e in (0.0, 0.99, 1.0, 2.0, 4.0, 9.0)] == [0.0, 0.0, 0.75, 0.5, 0.0, 0.0]
    assert build("bss").schedule(123.0) == 1.0  # no decay: a constant weight


def test_bss_zero_without_base_samples_or_before_its_start(monkeypatch):
    student, teacher_model, x, labels = bss_batch()
    loss = configured("bss", student, frozen(teacher_model), start_epoch=2.0)
    batch = {"pixel_values": x, "labels": labels}

    def no_attack(*args, **kwargs):
        raise AssertionError("the attack must not run")

    monkeypatch.setattr(gradients, "bss_attack", no_attack)
    z_s, z_t = student(x), teacher_model(x).detach()
    before_start = loss(z_s, z_t, labels=labels, batch=batch, epoch=1.5)
    wrong = (labels + 1) % C  # nobody classifies these right
    no_samples = loss(z_s, z_t, labels=wrong, batch={**batch, "labels": wrong}, epoch=3.0)
    for value in (before_start, no_samples):
        assert value.item() == 0 and value.requires_grad


def test_bss_attacks_in_the_student_input_space_through_the_teacher_input_mapping():
    """A teacher fed `x / 2` (its own normalisation): the attack moves the student's x, the teacher judges x / 2."""
    student, teacher_model, x, _ = bss_batch()
    halved = Teacher(teacher_model, inputs_fn=lambda batch: {"pixel_values": batch["pixel_values"] / 2})
    labels = teacher_model(x / 2).argmax(1)
    loss = configured("bss", student, halved, attack_size=3, clip=None)
    batch = {"pixel_values": x, "labels": labels}
    z_s, z_t = student(x), teacher_model(x / 2).detach()
    torch.manual_seed(3)
    value = loss(z_s, z_t, labels=labels, batch=batch, epoch=0.0)
    torch.manual_seed(3)
    index = bss_select(z_s.detach(), z_t, labels, 3)
    target = bss_target_classes(z_t[index])
    x_adv = bss_attack(lambda v: teacher_model(v / 2), x[index], labels[index], target, clip=None)
    expected = F.kl_div(F.log_softmax(student(x_adv) / 3, 1), F.softmax(teacher_model(x_adv / 2) / 3, 1),
                        reduction="batchmean")
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-8)


def test_bss_half_precision_teacher_runs():
    student, teacher_model, x, labels = bss_batch()
    loss = configured("bss", student, frozen(teacher_model, dtype="bfloat16"), attack_size=4)
    z_t = teacher_model(x.to(torch.bfloat16)).float()  # the model is bf16 now
    value = loss(student(x), z_t, labels=labels, batch={"pixel_values": x, "labels": labels}, epoch=0.0)
    assert value.dtype == torch.float32 and math.isfinite(value.item()) and value.item() > 0
    value.backward()
    assert all(p.grad is None for p in teacher_model.parameters())


def test_bss_errors():
    student, teacher_model, x, labels = bss_batch()
    loss = configured("bss", student, frozen(teacher_model))
    other = {"pixel_values": x, "labels": labels, "teacher_pixel_values": x + 1}
    with pytest.raises(DistillationError, match="does not come from the student's.*same adversarial image"):
        loss(student(x), teacher_model(x), labels=labels, batch=other, epoch=0.0)
    with pytest.raises(DistillationError, match="needs the teacher model"):
        configured("bss", student, None).on_train_begin(LossContext(term="bss"))
    for param, bad in [("attack_size", 0), ("attack_size", 2.5), ("num_steps", 0), ("step_size", 0), ("eps", -1),
                       ("clip", 0), ("temperature", 0), ("start_epoch", -1), ("end_epoch", 0)]:
        with pytest.raises(LossParamError) as info:
            build("bss", **{param: bad})
        assert info.value.param == param
    with pytest.raises(LossParamError, match="later than start_epoch"):
        build("bss", start_epoch=10, end_epoch=5)
    assert build("bss", clip=None, end_epoch=None).clip is None


# ======================================================================================= trainer runs


def run_trainer(tmp_path, digits, recipe, train=None, steps=3, student_seed=2):
    dataset, _ = digits
    student, teacher = tiny_timm(seed=student_seed), tiny_timm(seed=1)
    student_before, teacher_before = state(student), state(teacher)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, recipe=recipe, train_dataset=train if train is not None else dataset.select(range(64)),
        args=make_args(tmp_path, max_steps=steps, per_device_train_batch_size=16, logging_steps=1),
    )
    trainer.train()
    after = student.state_dict()
    assert any(not torch.equal(student_before[k], after[k]) for k in student_before)
    assert_untouched(teacher, teacher_before)
    assert not any(p.requires_grad for p in trainer.model.losses.parameters())  # the models are not the loss's state
    assert not trainer.distill_state()
    name = recipe["terms"][0]["loss"]
    logged = [h[f"loss_{name}"] for h in trainer.state.log_history if f"loss_{name}" in h]
    assert len(logged) == steps and all(math.isfinite(v) for v in logged)
    return trainer, logged


def test_sobolev_trains_in_the_trainer_with_the_input_made_to_require_grad(tmp_path, digits):
    trainer, logged = run_trainer(tmp_path, digits, {"terms": [{"loss": "sobolev", "weight": 20}]})
    assert all(v > 0 for v in logged)
    distill = trainer.model
    inputs, x = distill.input_requiring_grad({"pixel_values": torch.zeros(2, 3, 16, 16), "labels": torch.zeros(2)})
    assert x.requires_grad and x.is_leaf and inputs["pixel_values"] is x and "labels" in inputs
    with pytest.raises(DistillationError, match="continuous input"):
        distill.input_requiring_grad({"pixel_values": torch.zeros(2, 5, dtype=torch.long)})


def test_lwm_trains_in_the_trainer(tmp_path, digits):
    term = {"loss": "lwm", "weight": 0.4, "student": ["layer2", "logits"], "teacher": ["layer2", "logits"]}
    _, logged = run_trainer(tmp_path, digits, {"terms": [term]})
    assert all(v > 0 for v in logged)


def test_bss_trains_in_the_trainer(tmp_path, digits):
    """Labels set to the teacher's predictions and the student a copy of the teacher: every step has base samples."""
    import datasets

    dataset, _ = digits
    teacher = tiny_timm(seed=1).eval()
    pixels = torch.stack([row["pixel_values"] for row in dataset.select(range(64))])
    with torch.no_grad():
        labels = teacher(pixels).argmax(1)
    train = datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")
    recipe = {"terms": [{"loss": "bss", "weight": 2, "params": {"attack_size": 8}}]}
    _, logged = run_trainer(tmp_path, digits, recipe, train=train, student_seed=1)
    assert max(logged) > 0  # adversarial samples were distilled


class InputProbe(nn.Module):
    """A test loss declaring `student_input`: records what the engine hands it."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple] = []

    def forward(self, student, teacher, student_input, batch):
        (grad,) = torch.autograd.grad(student.sum(), student_input, create_graph=True)
        self.seen.append((student_input.requires_grad, student_input.is_leaf, batch["pixel_values"].requires_grad,
                          torch.equal(student_input, batch["pixel_values"]), grad.shape == student_input.shape))
        return grad.pow(2).mean()


def test_engine_makes_the_student_input_require_grad_for_terms_that_declare_it(tmp_path, digits):
    """One training forward, its graph starting at a leaf copy of pixel_values (the batch's own tensor untouched)."""
    from hfdistill.losses import registry

    registry.register_loss("student_input_probe", description="test", paper="none", year=2024, reads="logits",
                           default_tap="logits", fields=("student_input", "batch"))(InputProbe)
    try:
        dataset, _ = digits
        trainer = DistillationTrainer(model=tiny_timm(seed=2), teacher=tiny_timm(seed=1),
                                      recipe={"terms": [{"loss": "student_input_probe"}, {"loss": "kd"}]},
                                      args=make_args(tmp_path, max_steps=2), train_dataset=dataset.select(range(32)))
        trainer.train()
        assert trainer.model.losses["student_input_probe"].seen == [(True, True, False, True, True)] * 2
    finally:
        registry._LOSSES.pop("student_input_probe")
