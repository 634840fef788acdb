"""Dense-prediction losses (hfdistill/losses/dense.py): values against the papers' formulas written out
independently here (loops, brute-force matching), plus properties (resizing, ignored pixels, query matching,
gradients to the student only, shapes and parameters refused with clear messages)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hfdistill import losses
from hfdistill.errors import DistillationError, LossParamError

DENSE = ["pixel_kd", "pairwise_affinity", "detection_logit_kd"]


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale


def probs(z: list[float], temperature: float = 1.0) -> list[float]:
    """Softmax of a list, written out."""
    top = max(z)
    e = [math.exp((v - top) / temperature) for v in z]
    return [v / sum(e) for v in e]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# ---------------------------------------------------------------------------------------------
# registry, build, `hfdistill losses`
# ---------------------------------------------------------------------------------------------


def test_registered_entries():
    pixel, pair, det = (losses.get_info(n) for n in DENSE)
    assert (pixel.reads, pixel.default_tap, pixel.same_shape, pixel.fields) == ("logits", "logits", False, ("labels",))
    assert (pair.reads, pair.default_tap, pair.same_shape, pair.fields) == ("features", None, False, ())
    assert (det.reads, det.default_tap, det.same_shape, det.multi_layer) == ("logits", None, False, True)
    assert "arXiv:1903.04197" in pixel.paper and "arXiv:1903.04197" in pair.paper and pixel.year == 2019
    assert "DETRDistill" in det.paper and "arXiv:2211.10156" in det.paper and det.year == 2023
    assert pixel.params == ("temperature", "align", "ignore_index")
    assert pair.params == ("scale",)
    assert det.params == ("activation", "box_weight", "giou_weight", "score_threshold")
    assert not any(i.trainable for i in (pixel, pair, det))


def test_built_through_the_registry_and_listed_with_papers(capsys):
    from hfdistill.cli import main

    built = [losses.build("pixel_kd", temperature=2.0, align="teacher", ignore_index=-100),
             losses.build("pairwise_affinity", scale=0.25),
             losses.build("detection_logit_kd", activation="softmax", box_weight=0, giou_weight=0)]
    assert [type(b).loss_name for b in built] == DENSE
    assert built[0].ignore_index == -100 and built[1].scale == 0.25 and built[2].activation == "softmax"
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in DENSE:
        assert f"\n{name}  [" in out, name
    assert out.count("arXiv:1903.04197") >= 2 and "arXiv:2211.10156" in out and "DETRDistill:" in out
    with pytest.raises(LossParamError, match="has no parameter 'tau'"):
        losses.build("pixel_kd", tau=2.0)


@pytest.mark.parametrize("name, param, value", [
    ("pixel_kd", "temperature", 0), ("pixel_kd", "temperature", -1.0), ("pixel_kd", "align", "both"),
    ("pixel_kd", "ignore_index", 1.5), ("pixel_kd", "ignore_index", "255"), ("pixel_kd", "ignore_index", True),
    ("pairwise_affinity", "scale", 0), ("pairwise_affinity", "scale", 1), ("pairwise_affinity", "scale", -0.5),
    ("pairwise_affinity", "scale", "half"), ("pairwise_affinity", "scale", float("nan")),
    ("detection_logit_kd", "activation", "focal"), ("detection_logit_kd", "box_weight", -1),
    ("detection_logit_kd", "giou_weight", "2"), ("detection_logit_kd", "score_threshold", 1.5),
    ("detection_logit_kd", "score_threshold", -0.1), ("detection_logit_kd", "box_weight", float("inf")),
])
def test_parameters_out_of_domain_are_refused(name, param, value):
    with pytest.raises(LossParamError) as info:
        losses.build(name, **{param: value})
    assert info.value.param == param
    assert "must" in info.value.message and "got" in info.value.message


def test_half_inputs_give_an_fp32_scalar():
    s, t = randn(2, 4, 6, 6, seed=0).half(), randn(2, 4, 6, 6, seed=1).half()
    for name in ("pixel_kd", "pairwise_affinity"):
        value = losses.build(name)(s, t)
        assert value.dtype == torch.float32 and value.dim() == 0
        torch.testing.assert_close(value, losses.build(name)(s.float(), t.float()))
    logits, boxes = randn(2, 5, 3, seed=2).half(), _boxes(2, 5, seed=3).half()
    det = losses.build("detection_logit_kd")
    value = det([logits, boxes], [randn(2, 4, 3, seed=4).half(), _boxes(2, 4, seed=5).half()])
    assert value.dtype == torch.float32 and value.dim() == 0 and math.isfinite(value.item())


# ---------------------------------------------------------------------------------------------
# pixel_kd
# ---------------------------------------------------------------------------------------------


def pixel_kd_by_loops(s: torch.Tensor, t: torch.Tensor, temperature: float, keep=None) -> float:
    """T^2 * mean over kept pixels of KL(p_t || p_s), one pixel at a time (same-size maps)."""
    total, count = 0.0, 0
    b_, k_, h_, w_ = s.shape
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                if keep is not None and not keep[b][i][j]:
                    continue
                p_s = probs(s[b, :, i, j].tolist(), temperature)
                p_t = probs(t[b, :, i, j].tolist(), temperature)
                total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
                count += 1
    return temperature**2 * total / max(count, 1)


def test_pixel_kd_value_against_loops():
    s, t = randn(2, 4, 3, 5, seed=0, scale=2), randn(2, 4, 3, 5, seed=1, scale=2)
    for temperature in (1.0, 2.5):
        value = losses.build("pixel_kd", temperature=temperature)(s, t)
        assert value.item() == pytest.approx(pixel_kd_by_loops(s, t, temperature), rel=1e-5)
    assert losses.build("pixel_kd")(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_pixel_kd_resizes_to_a_common_size():
    s, t = randn(2, 3, 4, 4, seed=0, scale=2), randn(2, 3, 8, 8, seed=1, scale=2)
    t_small = F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False)
    s_large = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    at_student = losses.build("pixel_kd")(s, t)  # align: student (default)
    at_teacher = losses.build("pixel_kd", align="teacher")(s, t)
    assert at_student.item() == pytest.approx(pixel_kd_by_loops(s, t_small, 1.0), rel=1e-5)
    assert at_teacher.item() == pytest.approx(pixel_kd_by_loops(s_large, t, 1.0), rel=1e-5)
    assert at_student.item() != pytest.approx(at_teacher.item(), rel=1e-3)
    # a teacher smaller than the student is upsampled to the student's size the same way
    value = losses.build("pixel_kd")(t, s)
    assert value.item() == pytest.approx(pixel_kd_by_loops(t, s_large, 1.0), rel=1e-5)


@pytest.mark.parametrize("ignore_index", [255, -100])
def test_pixel_kd_ignored_pixels_do_not_count(ignore_index):
    s, t = randn(2, 3, 4, 4, seed=0, scale=2), randn(2, 3, 4, 4, seed=1, scale=2)
    labels = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(2))  # the input's size: 2x
    labels[0, :4] = ignore_index  # image 0: the top half (rows 0-1 of the 4x4 logits)
    labels[1, :, 6:] = ignore_index  # image 1: the last quarter of columns (column 3)
    keep = [[[not (b == 0 and i < 2) and not (b == 1 and j == 3) for j in range(4)] for i in range(4)]
            for b in range(2)]
    loss = losses.build("pixel_kd", ignore_index=ignore_index)
    assert loss(s, t, labels=labels).item() == pytest.approx(pixel_kd_by_loops(s, t, 1.0, keep), rel=1e-5)
    # changing the logits at ignored pixels changes nothing
    s2 = s.clone()
    s2[0, :, :2] = 50.0
    assert loss(s2, t, labels=labels).item() == pytest.approx(loss(s, t, labels=labels).item(), rel=1e-6)
    # without labels, or with ignore_index null, every pixel counts
    everything = pixel_kd_by_loops(s, t, 1.0)
    assert loss(s, t).item() == pytest.approx(everything, rel=1e-5)
    assert losses.build("pixel_kd", ignore_index=None)(s, t, labels=labels).item() == pytest.approx(everything, rel=1e-5)
    # [B, 1, H, W] label maps are read too
    assert loss(s, t, labels=labels[:, None]).item() == pytest.approx(loss(s, t, labels=labels).item())


def test_pixel_kd_every_pixel_ignored_is_zero_with_a_graph():
    s = randn(1, 3, 4, 4, seed=0).requires_grad_(True)
    value = losses.build("pixel_kd")(s, randn(1, 3, 4, 4, seed=1), labels=torch.full((1, 4, 4), 255))
    assert value.item() == 0.0
    value.backward()
    assert torch.all(s.grad == 0)


def test_pixel_kd_gradients_reach_the_student_only():
    s = randn(2, 3, 4, 4, seed=0).requires_grad_(True)
    t = randn(2, 3, 8, 8, seed=1).requires_grad_(True)
    losses.build("pixel_kd", temperature=2.0)(s, t, labels=torch.zeros(2, 8, 8, dtype=torch.long)).backward()
    assert s.grad is not None and torch.any(s.grad != 0) and torch.isfinite(s.grad).all()
    assert t.grad is None
    big = randn(2, 3, 4, 4, seed=2) * 1e4  # large logits stay finite
    assert math.isfinite(losses.build("pixel_kd")(big, -big).item())


def test_pixel_kd_refuses_shapes_with_the_fix():
    loss = losses.build("pixel_kd")
    with pytest.raises(DistillationError, match=r"student logits must be \[B, C, H, W\], got shape \(2, 5\)"):
        loss(randn(2, 5, seed=0), randn(2, 5, 4, 4, seed=1))
    with pytest.raises(DistillationError, match=r"\(2, 5, 4, 4\) and teacher logits \(2, 6, 4, 4\).*same label set"):
        loss(randn(2, 5, 4, 4, seed=0), randn(2, 6, 4, 4, seed=1))
    with pytest.raises(DistillationError, match="batch size"):
        loss(randn(2, 5, 4, 4, seed=0), randn(3, 5, 4, 4, seed=1))
    with pytest.raises(DistillationError, match=r"labels must be a \[B, H, W\] segmentation map, got shape \(2, 16\)"):
        loss(randn(2, 5, 4, 4, seed=0), randn(2, 5, 4, 4, seed=1), labels=torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(DistillationError, match="one label map per image"):
        loss(randn(2, 5, 4, 4, seed=0), randn(2, 5, 4, 4, seed=1), labels=torch.zeros(3, 4, 4, dtype=torch.long))
    with pytest.raises(DistillationError, match="reads one tap"):
        loss([randn(2, 5, 4, 4, seed=0)] * 2, randn(2, 5, 4, 4, seed=1))


# ---------------------------------------------------------------------------------------------
# pairwise_affinity
# ---------------------------------------------------------------------------------------------


def affinity_loss_by_loops(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """mean over images and node pairs of (cos_s(i, j) - cos_t(i, j))^2, for already pooled [B, C, h, w] grids."""
    def cos(f, b, i, j):
        u, v = f[b, :, i].tolist(), f[b, :, j].tolist()
        dot = sum(x * y for x, y in zip(u, v))
        return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))

    fs, ft = fs.flatten(2), ft.flatten(2)
    n = fs.shape[2]
    total = sum((cos(fs, b, i, j) - cos(ft, b, i, j)) ** 2
                for b in range(fs.shape[0]) for i in range(n) for j in range(n))
    return total / (fs.shape[0] * n * n)


def authors_pool(x: torch.Tensor, scale: float, side: int) -> torch.Tensor:
    """The authors' node pooling: MaxPool2d with kernel = stride = int(scale * side), ceil_mode."""
    kernel = max(1, int(side * scale))
    return F.max_pool2d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)


@pytest.mark.parametrize("side, scale, nodes", [(8, 0.5, 2), (8, 0.3, 4), (6, 0.1, 6), (9, 0.34, 3)])
def test_pairwise_affinity_value_against_loops(side, scale, nodes):
    s, t = randn(2, 3, side, side, seed=0), randn(2, 5, side, side, seed=1)  # channel counts differ
    fs, ft = authors_pool(s, scale, side), authors_pool(t, scale, side)
    assert fs.shape[2:] == (nodes, nodes)
    value = losses.build("pairwise_affinity", scale=scale)(s, t)
    assert value.item() == pytest.approx(affinity_loss_by_loops(fs, ft), rel=1e-5)


def test_pairwise_affinity_maps_of_different_sizes_share_the_smaller_grid():
    s, t = randn(2, 3, 8, 8, seed=0), randn(2, 6, 16, 12, seed=1)
    # the smaller map is 8 x 8: kernel 4, a 2 x 2 grid; the teacher's 16 x 12 is pooled to it in 8 x 6 patches
    fs, ft = F.max_pool2d(s, 4), F.max_pool2d(t, (8, 6))
    value = losses.build("pairwise_affinity")(s, t)
    assert value.item() == pytest.approx(affinity_loss_by_loops(fs, ft), rel=1e-5)
    assert losses.build("pairwise_affinity")(t, s).item() == pytest.approx(value.item(), rel=1e-5)  # symmetric


def test_pairwise_affinity_properties():
    s = randn(2, 4, 8, 8, seed=0).requires_grad_(True)
    loss = losses.build("pairwise_affinity", scale=0.25)
    assert loss(s, s.detach() * 3.0).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    assert loss(randn(1, 4, 8, 8, seed=5), randn(1, 4, 8, 8, seed=6)).item() > 0  # batch of one is fine
    t = randn(2, 7, 8, 8, seed=1).requires_grad_(True)
    loss(s, t).backward()
    assert s.grad is not None and torch.any(s.grad != 0) and torch.isfinite(s.grad).all()
    assert t.grad is None
    zeros = torch.zeros(2, 4, 8, 8)  # dead features (all-zero nodes) stay finite
    assert math.isfinite(loss(zeros, randn(2, 4, 8, 8, seed=2)).item())


def test_pairwise_affinity_refuses_shapes_with_the_fix():
    loss = losses.build("pairwise_affinity")
    with pytest.raises(DistillationError, match=r"teacher feature must be \[B, C, H, W\], got shape \(2, 16, 8\)"):
        loss(randn(2, 4, 4, 4, seed=0), randn(2, 16, 8, seed=1))
    with pytest.raises(DistillationError, match=r"\(2, 4, 4, 4\) and teacher \(3, 4, 4, 4\) have different batch"):
        loss(randn(2, 4, 4, 4, seed=0), randn(3, 4, 4, 4, seed=1))


# ---------------------------------------------------------------------------------------------
# detection_logit_kd
# ---------------------------------------------------------------------------------------------


def _boxes(b: int, q: int, seed: int) -> torch.Tensor:
    """Valid normalised (cx, cy, w, h) boxes."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.rand(b, q, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(b, q, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], -1)


def class_term(s: list[float], t: list[float], activation: str) -> float:
    if activation == "softmax":
        p_s, p_t = probs(s), probs(t)
        return sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    total = 0.0
    for zs, zt in zip(s, t):
        ps, pt = sigmoid(zs), sigmoid(zt)
        total += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    return total


def giou(a: list[float], b: list[float]) -> float:
    """GIoU of two (cx, cy, w, h) boxes, written out (Rezatofighi et al. 2019)."""
    def corners(box):
        cx, cy, w, h = box
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    ax1, ay1, ax2, ay2 = corners(a)
    bx1, by1, bx2, by2 = corners(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def pair_cost(sl, sb, tl, tb, activation, box_weight, giou_weight) -> float:
    cost = class_term(sl, tl, activation)
    if sb is not None:
        cost += box_weight * sum(abs(x - y) for x, y in zip(sb, tb)) + giou_weight * (1 - giou(sb, tb))
    return cost


def detection_kd_brute_force(s_logits, s_boxes, t_logits, t_boxes, activation="sigmoid", box_weight=5.0,
                             giou_weight=2.0, kept=None) -> float:
    """Every one-to-one assignment tried per image; the cheapest one's summed pair costs over the number of pairs."""
    total, pairs = 0.0, 0
    for b in range(s_logits.shape[0]):
        qs = range(s_logits.shape[1])
        qt = [j for j in range(t_logits.shape[1]) if kept is None or kept[b][j]]
        cost = {(i, j): pair_cost(s_logits[b, i].tolist(), None if s_boxes is None else s_boxes[b, i].tolist(),
                                  t_logits[b, j].tolist(), None if t_boxes is None else t_boxes[b, j].tolist(),
                                  activation, box_weight, giou_weight) for i in qs for j in qt}
        if len(qs) >= len(qt):  # every teacher query gets a student query
            best = min(sum(cost[i, j] for i, j in zip(chosen, qt)) for chosen in itertools.permutations(qs, len(qt)))
        else:  # every student query gets a teacher query
            best = min(sum(cost[i, j] for i, j in zip(qs, chosen)) for chosen in itertools.permutations(qt, len(qs)))
        total += best
        pairs += min(len(qs), len(qt))
    return total / max(pairs, 1)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("qs, qt", [(4, 4), (5, 3), (3, 5)])
def test_detection_kd_value_against_brute_force_matching(activation, qs, qt):
    s_logits, t_logits = randn(2, qs, 3, seed=0, scale=2), randn(2, qt, 3, seed=1, scale=2)
    s_boxes, t_boxes = _boxes(2, qs, seed=2), _boxes(2, qt, seed=3)
    loss = losses.build("detection_logit_kd", activation=activation)
    value = loss([s_logits, s_boxes], [t_logits, t_boxes])
    expected = detection_kd_brute_force(s_logits, s_boxes, t_logits, t_boxes, activation)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert [len(rows) for rows, _ in loss.match([s_logits, s_boxes], [t_logits, t_boxes])] == [min(qs, qt)] * 2
    weighted = losses.build("detection_logit_kd", activation=activation, box_weight=1.5, giou_weight=0.5)
    assert weighted([s_logits, s_boxes], [t_logits, t_boxes]).item() == pytest.approx(
        detection_kd_brute_force(s_logits, s_boxes, t_logits, t_boxes, activation, 1.5, 0.5), rel=1e-5)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_hungarian_matching_recovers_a_permutation_of_the_teacher(activation):
    b, q, k = 2, 12, 5
    t_logits, t_boxes = randn(b, q, k, seed=0, scale=3), _boxes(b, q, seed=1)
    perms = [torch.randperm(q, generator=torch.Generator().manual_seed(10 + i)) for i in range(b)]
    s_logits = torch.stack([t_logits[i, perms[i]] for i in range(b)]) + randn(b, q, k, seed=2, scale=0.01)
    s_boxes = torch.stack([t_boxes[i, perms[i]] for i in range(b)]) + randn(b, q, 4, seed=3, scale=1e-4)
    loss = losses.build("detection_logit_kd", activation=activation)
    for (rows, cols), perm in zip(loss.match([s_logits, s_boxes], [t_logits, t_boxes]), perms):
        assert rows.tolist() == list(range(q)) and cols.tolist() == perm.tolist()  # student i <-> teacher perm[i]
    assert loss([s_logits, s_boxes], [t_logits, t_boxes]).item() < 0.05
    unrelated = loss([randn(b, q, k, seed=4, scale=3), _boxes(b, q, seed=5)], [t_logits, t_boxes]).item()
    assert unrelated > 1.0
    # fewer student queries than teacher queries: each finds its own teacher query
    few = loss([s_logits[:, :5], s_boxes[:, :5]], [t_logits, t_boxes])
    assert few.item() < 0.05
    for (rows, cols), perm in zip(loss.match([s_logits[:, :5], s_boxes[:, :5]], [t_logits, t_boxes]), perms):
        assert cols.tolist() == perm[:5].tolist()


def test_detection_kd_score_threshold_keeps_confident_teacher_queries():
    b, q, k = 1, 6, 3
    t_logits = torch.full((b, q, k), -6.0)
    t_logits[0, [1, 4], 2] = 4.0  # two confident teacher queries (sigmoid 0.98), the rest at 0.0025
    t_boxes = _boxes(b, q, seed=1)
    s_logits, s_boxes = randn(b, 5, k, seed=2), _boxes(b, 5, seed=3)
    loss = losses.build("detection_logit_kd", score_threshold=0.5)
    ((rows, cols),) = loss.match([s_logits, s_boxes], [t_logits, t_boxes])
    assert sorted(cols.tolist()) == [1, 4] and len(rows) == 2
    kept = [[j in (1, 4) for j in range(q)]]
    assert loss([s_logits, s_boxes], [t_logits, t_boxes]).item() == pytest.approx(
        detection_kd_brute_force(s_logits, s_boxes, t_logits, t_boxes, kept=kept), rel=1e-5)
    # softmax: the confidence leaves the last (no-object) class out
    soft = torch.zeros(b, q, k)
    soft[0, :, -1] = 8.0  # every query says "no object"...
    soft[0, 3, 0] = 12.0  # ...but one
    ((_, cols),) = losses.build("detection_logit_kd", activation="softmax", score_threshold=0.5).match(
        [s_logits, s_boxes], [soft, t_boxes])
    assert cols.tolist() == [3]
    # nothing reaches the threshold: 0, and backward still works
    s = s_logits.clone().requires_grad_(True)
    value = losses.build("detection_logit_kd", score_threshold=1.0)([s, s_boxes], [t_logits, t_boxes])
    assert value.item() == 0.0
    value.backward()
    assert torch.all(s.grad == 0)


def test_detection_kd_logits_only():
    s_logits, t_logits = randn(2, 4, 3, seed=0, scale=2), randn(2, 3, 3, seed=1, scale=2)
    loss = losses.build("detection_logit_kd", box_weight=0, giou_weight=0)
    assert loss(s_logits, t_logits).item() == pytest.approx(
        detection_kd_brute_force(s_logits, None, t_logits, None), rel=1e-5)
    assert loss([s_logits], [t_logits]).item() == pytest.approx(loss(s_logits, t_logits).item())
    with pytest.raises(DistillationError, match=r"box_weight and giou_weight need the boxes.*\[logits, pred_boxes\]"):
        losses.build("detection_logit_kd")(s_logits, t_logits)


def test_detection_kd_gradients_reach_the_student_only():
    s_logits = randn(2, 5, 3, seed=0).requires_grad_(True)
    s_boxes = _boxes(2, 5, seed=1).requires_grad_(True)
    t_logits = randn(2, 4, 3, seed=2).requires_grad_(True)
    t_boxes = _boxes(2, 4, seed=3).requires_grad_(True)
    for activation in ("sigmoid", "softmax"):
        s_logits.grad = s_boxes.grad = None
        losses.build("detection_logit_kd", activation=activation)([s_logits, s_boxes], [t_logits, t_boxes]).backward()
        for grad in (s_logits.grad, s_boxes.grad):
            assert grad is not None and torch.any(grad != 0) and torch.isfinite(grad).all()
        assert t_logits.grad is None and t_boxes.grad is None
        # the 4 matched student queries get gradients, the unmatched fifth of each image none
        assert int((s_logits.grad.abs().sum(-1) > 0).sum()) == 8


def test_detection_kd_refuses_shapes_with_the_fix():
    loss = losses.build("detection_logit_kd")
    logits, boxes = randn(2, 4, 3, seed=0), _boxes(2, 4, seed=1)
    with pytest.raises(DistillationError, match=r"student logits must be \[B, Q, K\].*got shape \(2, 3\)"):
        loss([logits[:, 0], boxes], [logits, boxes])
    with pytest.raises(DistillationError, match=r"teacher pred_boxes must be \[B, Q, 4\].*got shape \(2, 4, 3\).*order"):
        loss([logits, boxes], [logits, logits])  # the taps in the wrong order
    with pytest.raises(DistillationError, match=r"\(2, 4, 3\) and teacher logits \(2, 4, 5\).*same label set"):
        loss([logits, boxes], [randn(2, 4, 5, seed=2), boxes])
    with pytest.raises(DistillationError, match="batch size"):
        loss([logits, boxes], [logits[:1], boxes[:1]])
    with pytest.raises(DistillationError, match=r"must be \[logits, pred_boxes\].*got 3 value"):
        loss([logits, boxes, boxes], [logits, boxes])
    with pytest.raises(DistillationError, match="on both sides or on neither"):
        losses.build("detection_logit_kd", box_weight=0, giou_weight=0)([logits, boxes], logits)


def test_pixel_kd_trains_on_batches_without_labels():
    """`labels` is an optional field of pixel_kd: a training batch without them counts every pixel, while a loss
    that needs labels still refuses such a batch."""
    from hfdistill.recipe import TermSpec
    from hfdistill.terms import loss_fields, resolve_terms

    terms = resolve_terms([TermSpec(loss="pixel_kd")])
    assert terms[0].optional_fields == ("labels",)
    fields = loss_fields({"labels"}, {"pixel_values": torch.zeros(1)}, None, None, optional={"labels"})
    assert fields == {"labels": None}
    with pytest.raises(DistillationError, match="batch field 'labels'"):
        loss_fields({"labels"}, {"pixel_values": torch.zeros(1)}, None, None)
