"""CRD and SSKD: values against the papers' formulas, their mechanisms (memory banks, sampling, rotations,
error-aware selection, stages) and short DistillationTrainer runs."""

from __future__ import annotations

import math
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import tiny_timm
from test_trainer import make_args
from transformers import TrainerCallback

from hfdistill import DistillationError, DistillationTrainer, losses
from hfdistill.errors import LossParamError
from hfdistill.losses.contrastive import (
    crd_memory_update,
    crd_negatives,
    crd_nce_loss,
    crd_relax_positives,
    gather_rows,
)
from hfdistill.outputs import DISTILL_STATE_NAME
from hfdistill.terms import LossContext, load_distill_state, save_distill_state


# ---------------------------------------------------------------------------------------------
# CRD
# ---------------------------------------------------------------------------------------------


def _crd(n=8, ds=4, dt=5, **params):
    loss = losses.build("crd", **{"feat_dim": 3, "nce_k": 3, **params})
    loss.configure(LossContext(term="crd", student_shape=torch.Size([2, ds]), teacher_shape=torch.Size([2, dt]),
                               num_examples=n))
    return loss


class RowsSeen:
    """Wraps a CRD module's contrast_indices to record the bank rows each call drew."""

    def __init__(self, loss):
        self.rows = []
        original = loss.contrast_indices

        def record(index):
            rows = original(index)
            self.rows.append(rows.clone())
            return rows

        loss.contrast_indices = record


def _nce_by_hand(anchor, bank, rows, tau, z, n):
    """One side of CRD by loops, as the reference's ContrastLoss: P = exp(a.m / tau) / Z, noise K/N;
    -(1/B) sum_b [log(P_pos / (P_pos + K/N + eps)) + sum_neg log((K/N) / (P_neg + K/N + eps))]."""
    batch, k1 = rows.shape
    noise = (k1 - 1) / n
    total = 0.0
    for b in range(batch):
        for j in range(k1):
            dot = sum(float(anchor[b, c]) * float(bank[rows[b, j], c]) for c in range(anchor.shape[1]))
            p = math.exp(dot / tau) / z
            total += math.log(p / (p + noise + 1e-7)) if j == 0 else math.log(noise / (p + noise + 1e-7))
    return -total / batch


def _z_by_hand(anchor, bank, rows, tau, n):
    values = [math.exp(float(anchor[b] @ bank[rows[b, j]]) / tau) for b in range(rows.shape[0]) for j in range(rows.shape[1])]
    return n * sum(values) / len(values)


def test_crd_defaults_follow_the_paper():
    loss = losses.build("crd")
    assert (loss.feat_dim, loss.nce_k, loss.nce_t, loss.nce_m, loss.mode) == (128, 16384, 0.07, 0.5, "exact")
    info = losses.get_info("crd")
    assert info.fields == ("index", "labels") and info.trainable and info.default_tap == "features"
    assert not info.same_shape and "arXiv:1910.10699" in info.paper


def test_crd_nce_value_against_loops():
    """The loss of one forward equals the reference's formula computed by loops on tiny banks, Z included."""
    torch.manual_seed(0)
    n, tau = 8, 0.07
    crd = _crd(n=n)
    crd.labels.copy_(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    seen = RowsSeen(crd)
    s, t = torch.randn(2, 4), torch.randn(2, 5)
    index = torch.tensor([1, 4])
    memory_s, memory_t = crd.memory_s.clone(), crd.memory_t.clone()
    crd.eval()  # no bank update: the banks used are the ones copied above
    value = crd(s, t, index=index, labels=torch.tensor([0, 2]))
    rows = seen.rows[0]
    with torch.no_grad():
        v_s, v_t = crd.embed_s(s), crd.embed_t(t)
    # Unit-norm embeddings from a linear layer.
    torch.testing.assert_close(v_s, (s @ crd.embed_s.linear.weight.T + crd.embed_s.linear.bias)
                               / (s @ crd.embed_s.linear.weight.T + crd.embed_s.linear.bias).norm(dim=1, keepdim=True))
    z_s = _z_by_hand(v_s, memory_t, rows, tau, n)  # student anchor against the teacher bank
    z_t = _z_by_hand(v_t, memory_s, rows, tau, n)  # teacher anchor against the student bank
    torch.testing.assert_close(crd.z, torch.tensor([z_s, z_t]), rtol=1e-5, atol=0)
    expected = _nce_by_hand(v_s, memory_t, rows, tau, z_s, n) + _nce_by_hand(v_t, memory_s, rows, tau, z_t, n)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # Z is estimated once: a second batch reuses it.
    crd(torch.randn(2, 4), torch.randn(2, 5), index=torch.tensor([0, 7]), labels=torch.tensor([0, 3]))
    torch.testing.assert_close(crd.z, torch.tensor([z_s, z_t]), rtol=1e-5, atol=0)


def test_crd_nce_formula_function():
    scores = torch.tensor([[2.0, 0.5, 0.1], [0.3, 0.2, 4.0]])
    n = 10
    noise = 2 / n
    expected = -(
        math.log(2.0 / (2.0 + noise + 1e-7)) + math.log(noise / (0.5 + noise + 1e-7)) + math.log(noise / (0.1 + noise + 1e-7))
        + math.log(0.3 / (0.3 + noise + 1e-7)) + math.log(noise / (0.2 + noise + 1e-7)) + math.log(noise / (4.0 + noise + 1e-7))
    ) / 2
    assert crd_nce_loss(scores, n).item() == pytest.approx(expected, rel=1e-6)


def test_crd_memory_update_rule_and_gradients():
    """Training forward: the banks' rows of the batch become normalize(m * old + (1 - m) * v); nothing else moves;
    gradients reach the student feature and both heads, never the banks."""
    torch.manual_seed(1)
    crd = _crd(n=8, nce_m=0.5)
    crd.labels.copy_(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    crd.train()
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 5)
    index = torch.tensor([5, 0, 2])
    old_s, old_t = crd.memory_s.clone(), crd.memory_t.clone()
    with torch.no_grad():
        v_s, v_t = crd.embed_s(s), crd.embed_t(t)
    loss = crd(s, t, index=index, labels=torch.tensor([2, 0, 1]))
    loss.backward()
    for bank, old, v in ((crd.memory_s, old_s, v_s), (crd.memory_t, old_t, v_t)):
        for b, i in enumerate(index.tolist()):
            mixed = [0.5 * float(old[i, c]) + 0.5 * float(v[b, c]) for c in range(3)]
            norm = math.sqrt(sum(x * x for x in mixed))
            torch.testing.assert_close(bank[i], torch.tensor([x / norm for x in mixed]), rtol=1e-6, atol=1e-7)
        others = [i for i in range(8) if i not in index.tolist()]
        assert torch.equal(bank[others], old[others])
    assert s.grad is not None and torch.any(s.grad != 0)
    assert all(p.grad is not None for p in crd.parameters())
    assert not crd.memory_s.requires_grad and not crd.memory_t.requires_grad
    # The function alone, with another momentum.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = crd_memory_update(bank, torch.tensor([1]), torch.tensor([[1.0, 0.0]]), momentum=0.75)
    torch.testing.assert_close(got, torch.tensor([[0.25, 0.75]]) / math.sqrt(0.25**2 + 0.75**2))


def test_crd_duplicate_index_updates_once_with_the_first():
    torch.manual_seed(2)
    crd = _crd(n=8)
    crd.labels.copy_(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    crd.train()
    s, t = torch.randn(2, 4), torch.randn(2, 5)
    old = crd.memory_s.clone()
    with torch.no_grad():
        v_s = crd.embed_s(s)
    crd(s, t, index=torch.tensor([3, 3]), labels=torch.tensor([1, 1]))
    torch.testing.assert_close(crd.memory_s[3], F.normalize(0.5 * old[3] + 0.5 * v_s[0], dim=0))


def test_crd_initial_banks_as_the_reference():
    torch.manual_seed(0)
    crd = losses.build("crd", feat_dim=48, nce_k=5)
    crd.configure(LossContext(student_shape=torch.Size([2, 4]), teacher_shape=torch.Size([2, 6]), num_examples=4000))
    bound = 1 / math.sqrt(48 / 3)
    for bank in (crd.memory_s, crd.memory_t):
        assert bank.shape == (4000, 48)
        assert bank.abs().max() <= bound and bank.min() < -0.9 * bound and bank.max() > 0.9 * bound
        assert bank.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.02)  # expected norm 1
    assert not torch.equal(crd.memory_s, crd.memory_t)
    assert torch.equal(crd.labels, torch.full((4000,), -1)) and torch.equal(crd.z, torch.tensor([-1.0, -1.0]))
    # A map is flattened per example (as the reference's Embed does).
    crd = losses.build("crd", feat_dim=4, nce_k=3)
    crd.configure(LossContext(student_shape=torch.Size([2, 3, 2, 2]), teacher_shape=torch.Size([2, 5]), num_examples=10))
    assert crd.embed_s.linear.in_features == 12 and crd.embed_t.linear.in_features == 5


LABELS_12 = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])


def test_crd_exact_negatives_come_from_other_classes_without_replacement():
    generator = torch.Generator().manual_seed(0)
    index = torch.arange(12)
    for _ in range(20):
        neg = crd_negatives(index, LABELS_12, 8, generator)  # each class has exactly 8 other-class examples
        assert neg.shape == (12, 8)
        for b in range(12):
            assert neg[b].unique().numel() == 8  # without replacement
            assert not (LABELS_12[neg[b]] == LABELS_12[b]).any()  # never the same class, never itself
    # Fewer candidates than K: with replacement, still other classes only.
    neg = crd_negatives(index, LABELS_12, 11, generator, enough=False)
    assert neg.shape == (12, 11)
    assert all(not (LABELS_12[neg[b]] == LABELS_12[b]).any() for b in range(12))
    # Chunked key matrices give the same kind of draw.
    neg = crd_negatives(index, LABELS_12, 5, generator, max_elements=24)  # two rows per chunk
    assert all(not (LABELS_12[neg[b]] == LABELS_12[b]).any() and neg[b].unique().numel() == 5 for b in range(12))


def test_crd_negatives_are_uniform_over_candidates():
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3])
    index = torch.zeros(4000, dtype=torch.long)  # example 0 (class 0): candidates are examples 2..9
    counts = torch.bincount(crd_negatives(index, labels, 2, generator).flatten(), minlength=10).float()
    assert counts[:2].sum() == 0
    expected = 4000 * 2 / 8
    assert ((counts[2:] - expected).abs() / expected).max() < 0.1


def test_crd_unknown_labels_and_relax_positives():
    labels = torch.tensor([0, 0, 1, 1, -1, 2, 2, 2])
    generator = torch.Generator().manual_seed(0)
    index = torch.tensor([4, 0, 5])
    for _ in range(20):
        neg = crd_negatives(index, labels, 4, generator)
        assert (neg[0] != 4).all()  # unknown class: anything but itself
        assert not (labels[neg[1]] == 0).any() and not (labels[neg[2]] == 2).any()
    drawn = torch.stack([crd_relax_positives(torch.tensor([0, 5, 4, 2]), labels, generator) for _ in range(300)])
    assert set(drawn[:, 0].tolist()) == {0, 1}  # class 0: itself or its classmate, both drawn
    assert set(drawn[:, 1].tolist()) == {5, 6, 7}
    assert set(drawn[:, 2].tolist()) == {4}  # unknown class: its own positive
    assert set(drawn[:, 3].tolist()) == {2, 3}


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_crd_contrast_rows_follow_the_mode(mode):
    torch.manual_seed(0)
    crd = _crd(n=12, nce_k=6, mode=mode)
    crd.labels.copy_(LABELS_12)
    index = torch.tensor([0, 4, 11, 7])
    positives = set()
    for _ in range(30):
        rows = crd.contrast_indices(index)
        assert rows.shape == (4, 7)
        own = LABELS_12[index]
        if mode == "exact":
            assert torch.equal(rows[:, 0], index)
        else:
            assert torch.equal(LABELS_12[rows[:, 0]], own)
            positives.add(int(rows[0, 0]))
        assert not (LABELS_12[rows[:, 1:]] == own.unsqueeze(1)).any()
        assert not (rows[:, 1:] == index.unsqueeze(1)).any()
        crd._advance_sampling()
    if mode == "relax":
        assert positives == {0, 3, 6, 9}


def test_crd_sampling_is_a_function_of_its_state():
    """The draw depends on the buffered (seed, calls), not on the global RNG: restored state, same negatives."""
    torch.manual_seed(0)
    crd = _crd(n=12, nce_k=5)
    crd.labels.copy_(LABELS_12)
    index = torch.tensor([1, 2, 3])
    first = crd.contrast_indices(index)
    torch.manual_seed(123)
    assert torch.equal(crd.contrast_indices(index), first)  # same state: same draw, whatever the global RNG
    crd._advance_sampling()
    second = crd.contrast_indices(index)
    assert not torch.equal(second, first)
    other = _crd(n=12, nce_k=5)
    other.labels.copy_(LABELS_12)
    for key, value in crd.state_dict().items():  # as DistillationModel.load_distill_state_dict does
        other.state_dict()[key].copy_(value)
    assert torch.equal(other.contrast_indices(index), second)


def test_crd_state_saved_and_restored_bit_exact(tmp_path):
    """Banks, Z, labels and sampling state go through the distill-state file unchanged; a restored module
    continues exactly as the original."""
    torch.manual_seed(0)
    crd = _crd(n=12, nce_k=5)
    crd.labels.copy_(LABELS_12)
    crd.train()
    batches = [(torch.randn(3, 4), torch.randn(3, 5), torch.randperm(12)[:3]) for _ in range(4)]
    for s, t, index in batches[:2]:
        crd(s, t, index=index, labels=LABELS_12[index])
    state = {f"losses.crd.{k}": v for k, v in crd.state_dict().items()}
    assert {"losses.crd.memory_s", "losses.crd.memory_t", "losses.crd.z", "losses.crd.labels",
            "losses.crd.sampling"} <= set(state)
    save_distill_state(state, tmp_path)
    loaded = load_distill_state(tmp_path)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    torch.manual_seed(99)  # another run: other initial banks and heads, until the state is loaded
    restored = _crd(n=12, nce_k=5)
    restored.train()
    for key, value in loaded.items():
        restored.state_dict()[key[len("losses.crd."):]].copy_(value)
    for s, t, index in batches[2:]:
        a = crd(s, t, index=index, labels=LABELS_12[index])
        b = restored(s, t, index=index, labels=LABELS_12[index])
        assert torch.equal(a, b)
    for key, value in crd.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_crd_learns_labels_from_batches_without_a_data_pass():
    torch.manual_seed(0)
    crd = _crd(n=12, nce_k=3)
    crd.train()
    assert (crd.labels == -1).all()
    crd(torch.randn(4, 4), torch.randn(4, 5), index=torch.tensor([0, 1, 2, 3]), labels=LABELS_12[:4])
    assert torch.equal(crd.labels[:4], LABELS_12[:4]) and (crd.labels[4:] == -1).all()
    rows = crd.contrast_indices(torch.tensor([0]))
    assert not (rows[0, 1:] == 3).any()  # example 3 is now known to share class 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_crd_computes_in_fp32(dtype):
    torch.manual_seed(0)
    crd = _crd(n=12, nce_k=5)
    crd.labels.copy_(LABELS_12)
    crd.eval()  # no update between the two calls
    s, t, index = torch.randn(3, 4).to(dtype), torch.randn(3, 5).to(dtype), torch.tensor([0, 5, 7])
    value = crd(s, t, index=index, labels=LABELS_12[index])
    assert value.dtype == torch.float32 and value.dim() == 0 and math.isfinite(value.item())
    torch.testing.assert_close(value, crd(s.float(), t.float(), index=index, labels=LABELS_12[index]))


def test_crd_errors():
    with pytest.raises(DistillationError, match="number of training examples.*map-style"):
        losses.build("crd").configure(LossContext(student_shape=torch.Size([2, 4]), teacher_shape=torch.Size([2, 4])))
    with pytest.raises(DistillationError, match=r"nce_k=16384 .* only 100 examples.*nce_k: 99"):
        losses.build("crd").configure(LossContext(student_shape=torch.Size([2, 4]), teacher_shape=torch.Size([2, 4]),
                                                  num_examples=100))
    with pytest.raises(DistillationError, match="needs a teacher feature"):
        losses.build("crd", nce_k=3).configure(LossContext(student_shape=torch.Size([2, 4]), num_examples=10))
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("crd")(torch.randn(2, 4), torch.randn(2, 4), index=torch.arange(2), labels=torch.arange(2))
    crd = _crd(n=8)
    crd.labels.fill_(1)
    with pytest.raises(DistillationError, match="at least two classes"):
        crd(torch.randn(2, 4), torch.randn(2, 5), index=torch.arange(2), labels=torch.ones(2, dtype=torch.long))
    crd = _crd(n=8)
    with pytest.raises(DistillationError, match="one integer class label per example"):
        crd(torch.randn(2, 4), torch.randn(2, 5), index=torch.arange(2), labels=torch.randn(2))
    with pytest.raises(DistillationError, match="configure was called with other shapes"):
        crd(torch.randn(2, 7), torch.randn(2, 5), index=torch.arange(2), labels=torch.arange(2))
    for bad in ({"feat_dim": 0}, {"feat_dim": 2.5}, {"nce_k": 0}, {"nce_t": 0}, {"nce_m": 1.5}, {"nce_m": -0.1},
                {"mode": "uniform"}):
        with pytest.raises(LossParamError, match=repr(next(iter(bad)))):
            losses.build("crd", **bad)


def _digits_subset(digits, n):
    train, _ = digits
    return train.select(range(n))


def test_crd_in_distillation_trainer_with_checkpoint_resume(tmp_path, digits):
    """A short run: labels gathered in the set-up pass, banks trained; the checkpoint holds the banks as they were
    at that step; resuming restores them bit-exact and draws the same negatives as the uninterrupted run."""
    train = _digits_subset(digits, 48)
    recipe = {"terms": [{"loss": "crd", "weight": 0.8, "params": {"nce_k": 16, "feat_dim": 8}}]}

    def run(output, resume=None):
        teacher = tiny_timm("test_resnet", seed=1)
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        trainer = DistillationTrainer(
            model=tiny_timm("test_resnet", seed=2), teacher=teacher, recipe=recipe,
            args=make_args(tmp_path, output_dir=str(output), max_steps=6, per_device_train_batch_size=8,
                           save_strategy="steps", save_steps=3, lr_scheduler_type="constant", logging_steps=3),
            train_dataset=train,
        )
        crd = trainer.model.losses["crd"]
        seen = RowsSeen(crd)
        states = {}  # the CRD state after each optimiser step

        class Keep(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # after a resume has loaded the checkpoint
                states["begin"] = {k: v.clone() for k, v in crd.state_dict().items()}

            def on_step_end(self, args, state, control, **kwargs):
                states[state.global_step] = {k: v.clone() for k, v in crd.state_dict().items()}

        trainer.add_callback(Keep())
        labels_after_setup = crd.labels.clone()
        trainer.train(resume_from_checkpoint=resume)
        for k, v in teacher.state_dict().items():
            assert torch.equal(v, before[k]), k
        return trainer, seen, states, labels_after_setup

    full, full_rows, full_states, labels = run(tmp_path / "full")
    assert torch.equal(labels, torch.as_tensor(train["labels"]))  # every label from the set-up pass
    crd = full.model.losses["crd"]
    assert (crd.z > 0).all() and int(crd.sampling[1]) == 6 and len(full_rows.rows) == 6
    logs = [h for h in full.state.log_history if "loss_crd" in h]
    assert logs and all(math.isfinite(h["loss_crd"]) for h in logs)

    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = safetensors.torch.load_file(str(checkpoint / DISTILL_STATE_NAME))
    for key in ("memory_s", "memory_t", "z", "labels", "sampling"):
        assert torch.equal(saved[f"losses.crd.{key}"], full_states[3][key]), key
    student_file = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    assert not any("memory" in k or "losses" in k for k in student_file)

    resumed, resumed_rows, resumed_states, _ = run(tmp_path / "resumed", resume=str(checkpoint))
    for key, value in resumed_states["begin"].items():  # every buffer and head weight restored bit-exact
        assert torch.equal(value, saved[f"losses.crd.{key}"]), key
    # Steps 4..6 of the resumed run draw exactly the rows of steps 4..6 of the uninterrupted run.
    assert len(resumed_rows.rows) == 3
    for a, b in zip(full_rows.rows[3:], resumed_rows.rows):
        assert torch.equal(a, b)
    for key, value in full.model.losses["crd"].state_dict().items():
        torch.testing.assert_close(resumed.model.losses["crd"].state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial heads and banks on both ranks, as the trainer's seed
        crd = _crd(n=12, nce_k=4)
        crd.labels.copy_(LABELS_12)
        crd.train()
        generator = torch.Generator().manual_seed(5)
        s_all, t_all = torch.randn(5, 4, generator=generator), torch.randn(5, 5, generator=generator)
        index_all = torch.tensor([0, 3, 7, 8, 10])
        mine = slice(0, 3) if rank == 0 else slice(3, 5)  # unequal shards: 3 and 2 examples
        crd(s_all[mine], t_all[mine], index=index_all[mine], labels=LABELS_12[index_all[mine]])
        gathered = gather_rows(torch.tensor([rank, rank + 10]))
        torch.save({"state": crd.state_dict(), "gathered": gathered}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_crd_banks_identical_across_processes(tmp_path):
    """Two gloo processes with different examples: after a step both hold the same banks, equal to one process's
    update with the whole batch; Z is the mean over processes."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["gathered"], torch.tensor([0, 10, 1, 11]))
    for key in ("memory_s", "memory_t", "labels", "sampling"):
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    torch.testing.assert_close(r0["state"]["z"], r1["state"]["z"])
    # One process with the whole batch updates the same rows the same way (no process group here).
    torch.manual_seed(0)
    single = _crd(n=12, nce_k=4)
    single.labels.copy_(LABELS_12)
    single.train()
    generator = torch.Generator().manual_seed(5)
    s_all, t_all = torch.randn(5, 4, generator=generator), torch.randn(5, 5, generator=generator)
    index_all = torch.tensor([0, 3, 7, 8, 10])
    single(s_all, t_all, index=index_all, labels=LABELS_12[index_all])
    for key in ("memory_s", "memory_t"):
        torch.testing.assert_close(r0["state"][key], single.state_dict()[key], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# SSKD
# ---------------------------------------------------------------------------------------------

from hfdistill.losses.contrastive import (  # noqa: E402
    error_aware_selection,
    rotated_copies,
    rotation_similarity,
    selected_kl,
    target_rank,
)

SSKD_STAGES = {"stages": [
    {"name": "teacher_head", "task_weight": 0, "train": ["losses.sskd.teacher_head"],
     "terms": [{"name": "sskd", "loss": "sskd", "params": {"phase": "teacher_head"}}]},
    {"name": "student", "task_weight": 0.1,
     "terms": [{"name": "kd", "loss": "kd", "weight": 0.9}, {"name": "sskd", "loss": "sskd"}]},
]}


def _sskd(ds=4, dt=5, **params):
    loss = losses.build("sskd", **params)
    loss.configure(LossContext(term="sskd", student_shape=torch.Size([2, ds]), teacher_shape=torch.Size([2, dt])))
    return loss


def _cos(a, b):
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    return dot / (math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b)))


def _kl_rows_by_hand(student, teacher, temperature, rows):
    """T^2 / |rows| * sum_{r in rows} sum_c p_t (log p_t - log p_s), softmaxes written out."""
    total = 0.0
    for r in rows:
        zs = [float(v) / temperature for v in student[r]]
        zt = [float(v) / temperature for v in teacher[r]]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        total += sum(math.exp(t - lt) * ((t - lt) - (s - ls)) for s, t in zip(zs, zt))
    return temperature**2 * total / max(len(rows), 1)


def _kept_by_hand(scores, targets, ratio):
    """The reference's rule written as a sort of (rank, row): all right rows, then floor(ratio * wrong) best wrong."""
    ranks = [sum(float(v) > float(row[t]) for v in row) for row, t in zip(scores, targets)]
    wrong = sum(r > 0 for r in ranks)
    n_keep = len(ranks) - wrong + int(wrong * ratio)
    return sorted(sorted(range(len(ranks)), key=lambda r: (ranks[r], r))[:n_keep])


def test_sskd_defaults_follow_the_paper():
    loss = losses.build("sskd")
    assert (loss.phase, loss.ss_weight, loss.tf_weight, loss.ss_temperature, loss.tf_temperature, loss.ss_ratio,
            loss.tf_ratio) == ("student", 10.0, 2.7, 0.5, 4.0, 0.75, 1.0)
    info = losses.get_info("sskd")
    assert info.fields == ("labels", "batch") and info.trainable and info.default_tap == "features"
    assert "arXiv:2006.07114" in info.paper


def test_rotations_are_the_authors_quarter_turns():
    import numpy as np

    x = torch.randn(2, 3, 4, 4)
    rotated = rotated_copies(x)
    assert rotated.shape == (6, 3, 4, 4)
    for b in range(2):
        hwc = x[b].permute(1, 2, 0).numpy()
        for k in (1, 2, 3):  # the reference: np.rot90(img, k) on an H x W x C image
            expected = torch.from_numpy(np.rot90(hwc, k).copy()).permute(2, 0, 1)
            assert torch.equal(rotated[3 * b + k - 1], expected)


def test_sskd_stage_one_value_against_loops():
    torch.manual_seed(0)
    sskd = _sskd(phase="teacher_head")
    t_normal, t_rotated = torch.randn(3, 5), torch.randn(9, 5)
    with torch.no_grad():
        e_n, e_r = sskd.teacher_head(t_normal), sskd.teacher_head(t_rotated)
    # The head: Linear(5, 5) -> ReLU -> Linear(5, 5).
    first, second = sskd.teacher_head[0], sskd.teacher_head[2]
    torch.testing.assert_close(e_n, (t_normal @ first.weight.T + first.bias).relu() @ second.weight.T + second.bias)
    similarity = [[_cos(e_r[r], e_n[b]) for b in range(3)] for r in range(9)]
    torch.testing.assert_close(rotation_similarity(e_r, e_n), torch.tensor(similarity), rtol=1e-5, atol=1e-6)
    expected = sum(-similarity[r][r // 3] + math.log(sum(math.exp(v) for v in similarity[r])) for r in range(9)) / 9
    assert sskd.stage_one_loss(t_normal, t_rotated).item() == pytest.approx(expected, rel=1e-5)


def test_error_aware_selection_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [0.0, 0.5, 0.2]])
    assert target_rank(scores, torch.tensor([0, 0, 2])).tolist() == [0, 2, 1]
    assert target_rank(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1])).tolist() == [0]  # a tie counts as right
    rank = torch.tensor([0, 2, 0, 1, 3, 1])  # 2 right, 4 wrong
    picks = {0.0: [0, 2], 0.5: [0, 2, 3, 5], 0.75: [0, 1, 2, 3, 5], 1.0: [0, 1, 2, 3, 4, 5], 0.3: [0, 2, 3]}
    for ratio, rows in picks.items():
        assert torch.nonzero(error_aware_selection(rank, ratio)).flatten().tolist() == rows, ratio
    assert error_aware_selection(torch.tensor([2, 1, 1]), 0.5).tolist() == [False, True, False]  # tie: earlier row
    # Nothing kept: the loss is 0, not NaN.
    value = selected_kl(torch.randn(3, 4), torch.randn(3, 4), 2.0, torch.zeros(3, dtype=torch.bool))
    assert value.item() == 0.0


def test_sskd_student_parts_against_loops():
    torch.manual_seed(3)
    sskd = _sskd(ss_ratio=0.5, tf_ratio=0.5)
    s_n, t_n = torch.randn(4, 4), torch.randn(4, 5)
    s_r, t_r = torch.randn(12, 4), torch.randn(12, 5)
    s_logits, t_logits = torch.randn(12, 6), torch.randn(12, 6)
    labels = torch.tensor([0, 5, 2, 3])
    parts = sskd.student_parts(s_n, t_n, s_r, t_r, s_logits, t_logits, labels)
    with torch.no_grad():
        a_t = [[_cos(sskd.teacher_head(t_r)[r], sskd.teacher_head(t_n)[b]) for b in range(4)] for r in range(12)]
        a_s = [[_cos(sskd.student_head(s_r)[r], sskd.student_head(s_n)[b]) for b in range(4)] for r in range(12)]
    kept_ss = _kept_by_hand(a_t, [r // 3 for r in range(12)], 0.5)
    kept_tf = _kept_by_hand(t_logits.tolist(), [int(labels[r // 3]) for r in range(12)], 0.5)
    assert 0 < len(kept_ss) < 12 and 0 < len(kept_tf) < 12  # the selection matters in this example
    assert parts["ss"].item() == pytest.approx(_kl_rows_by_hand(a_s, a_t, 0.5, kept_ss), rel=1e-4)
    assert parts["tf"].item() == pytest.approx(_kl_rows_by_hand(s_logits.tolist(), t_logits.tolist(), 4.0, kept_tf), rel=1e-5)
    # tf_ratio 1 (the default) keeps every rotated row.
    every = _sskd(tf_ratio=1.0)
    every.load_state_dict(sskd.state_dict())
    full = every.student_parts(s_n, t_n, s_r, t_r, s_logits, t_logits, labels)["tf"]
    assert full.item() == pytest.approx(_kl_rows_by_hand(s_logits.tolist(), t_logits.tolist(), 4.0, range(12)), rel=1e-5)


def test_sskd_phases_choose_what_trains():
    stage_one, stage_two = _sskd(phase="teacher_head"), _sskd()
    assert all(p.requires_grad for p in stage_one.teacher_head.parameters())
    assert not any(p.requires_grad for p in stage_one.student_head.parameters())
    assert not any(p.requires_grad for p in stage_two.teacher_head.parameters())
    assert all(p.requires_grad for p in stage_two.student_head.parameters())
    assert set(stage_one.state_dict()) == set(stage_two.state_dict())  # the state carries from stage to stage
    with pytest.raises(DistillationError, match=r"teacher-side head trained in an earlier stage.*phase: teacher_head"):
        stage_two.on_train_begin(LossContext(term="sskd"))
    stage_one.train()
    stage_one.teacher_head_trained.fill_(True)
    stage_two.load_state_dict(stage_one.state_dict())
    stage_two.on_train_begin(LossContext(term="sskd"))  # no error now


def _timm_features(model, x):
    """A timm classifier's pooled pre-logits features and logits, computed directly."""
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return features, model.get_classifier()(features)


def test_sskd_forward_runs_both_models_on_rotations(tmp_path, digits):
    """Inside the trainer: the term's value equals the parts computed from the two models run by hand on the rotated
    images; gradients reach the student through its rotated forward, never the teacher or the frozen teacher head."""
    train = _digits_subset(digits, 16)
    student, teacher = tiny_timm("test_resnet", seed=2), tiny_timm("test_resnet", seed=1)
    trainer = DistillationTrainer(model=student, teacher=teacher, recipe=SSKD_STAGES, stage="student",
                                  args=make_args(tmp_path, max_steps=1), train_dataset=train)
    sskd = trainer.model.losses["sskd"]
    trainer.model.eval()  # batch-norm in eval mode: the hand computation sees the same statistics
    x, labels = torch.as_tensor(train["pixel_values"][:4]), torch.as_tensor(train["labels"][:4])
    batch = {"pixel_values": x, "labels": labels, "index": torch.arange(4)}
    with torch.no_grad():
        t_n, _ = _timm_features(teacher, x)
        t_r, t_logits = _timm_features(teacher, rotated_copies(x))
        s_n, _ = _timm_features(student, x)
        s_r, s_logits = _timm_features(student, rotated_copies(x))
        parts = sskd.student_parts(s_n, t_n, s_r, t_r, s_logits, t_logits, labels)
        expected = 10.0 * parts["ss"] + 2.7 * parts["tf"]
    with torch.no_grad():  # half-precision taps give an fp32 value
        half = sskd(s_n.bfloat16(), t_n.bfloat16(), labels=labels, batch=batch)
    assert half.dtype == torch.float32 and math.isfinite(half.item())
    s_feature, _ = _timm_features(student, x)
    value = sskd(s_feature, t_n, labels=labels, batch=batch)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    value.backward()
    assert any(p.grad is not None and torch.any(p.grad != 0) for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in sskd.teacher_head.parameters())
    assert all(p.grad is not None for p in sskd.student_head.parameters())
    # With the normal feature detached, the gradient reaches the student's first layer through the rotated run alone.
    student.zero_grad()
    sskd(s_feature.detach(), t_n, labels=labels, batch=batch).backward()
    stem = next(student.parameters())
    assert stem.grad is not None and torch.any(stem.grad != 0)


def test_sskd_two_stage_run_keeps_the_teacher_bit_identical(tmp_path, digits):
    """Stage 1 trains only the teacher-side head; stage 2 carries it (frozen) and trains the student and its head;
    the teacher's state_dict is bit-identical after both."""
    train = _digits_subset(digits, 32)
    student, teacher = tiny_timm("test_resnet", seed=2), tiny_timm("test_resnet", seed=1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}

    first = DistillationTrainer(model=student, teacher=teacher, recipe=SSKD_STAGES, stage="teacher_head",
                                args=make_args(tmp_path / "one", max_steps=3, per_device_train_batch_size=8,
                                               learning_rate=0.05), train_dataset=train)
    head = first.model.losses["sskd"]
    initial = {k: v.clone() for k, v in head.state_dict().items()}
    first.train()
    trained = {k: v.clone() for k, v in head.state_dict().items()}
    assert bool(trained["teacher_head_trained"])
    assert all(not torch.equal(trained[k], initial[k]) for k in initial if k.startswith("teacher_head."))
    assert all(torch.equal(trained[k], initial[k]) for k in initial if k.startswith("student_head."))
    for k, v in student.state_dict().items():  # the student waits in stage 1 (eval mode: not even BN statistics)
        assert torch.equal(v, student_before[k]), k
    assert all(p.requires_grad for p in student.parameters())  # flags restored after the stage

    second = DistillationTrainer(model=student, teacher=teacher, recipe=SSKD_STAGES, stage="student",
                                 distill_state=first.distill_state(),
                                 args=make_args(tmp_path / "two", max_steps=3, per_device_train_batch_size=8,
                                                logging_steps=1), train_dataset=train)
    sskd = second.model.losses["sskd"]
    for k, v in sskd.state_dict().items():  # carried over by term name
        assert torch.equal(v, trained[k]), k
    second.train()
    after = sskd.state_dict()
    assert all(torch.equal(after[k], trained[k]) for k in trained if k.startswith("teacher_head."))  # frozen
    assert any(not torch.equal(after[k], trained[k]) for k in trained if k.startswith("student_head."))
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    logs = [h for h in second.state.log_history if "loss_sskd" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss_sskd"]) and math.isfinite(h["loss_kd"]) for h in logs)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_sskd_student_stage_without_the_first_stage_fails_with_the_fix(tmp_path, digits):
    train = _digits_subset(digits, 16)
    trainer = DistillationTrainer(model=tiny_timm(seed=2), teacher=tiny_timm(seed=1), recipe=SSKD_STAGES,
                                  stage="student", args=make_args(tmp_path, max_steps=1), train_dataset=train)
    with pytest.raises(DistillationError, match=r"train: \[losses\.sskd\.teacher_head\]"):
        trainer.train()


def test_sskd_errors():
    with pytest.raises(RuntimeError, match="configure"):
        losses.build("sskd")(torch.randn(2, 4), torch.randn(2, 4), labels=torch.arange(2), batch={})
    sskd = _sskd()  # configured without models (a hand-made context)
    with pytest.raises(DistillationError, match="live teacher model"):
        sskd(torch.randn(2, 4), torch.randn(2, 5), labels=torch.arange(2), batch={"pixel_values": torch.randn(2, 3, 4, 4)})
    from hfdistill.losses.contrastive import _image_key

    with pytest.raises(DistillationError, match="square images"):
        _image_key({"pixel_values": torch.randn(2, 3, 4, 6)}, "student")
    with pytest.raises(DistillationError, match=r"\[B, C, H, W\] image tensor"):
        _image_key({"input_ids": torch.ones(2, 5, dtype=torch.long)}, "student")
    with pytest.raises(DistillationError, match="needs a teacher feature"):
        losses.build("sskd").configure(LossContext(student_shape=torch.Size([2, 4])))
    for bad in ({"phase": "stage1"}, {"ss_weight": -1}, {"tf_weight": -0.1}, {"ss_temperature": 0},
                {"tf_temperature": -4}, {"ss_ratio": 1.5}, {"tf_ratio": -0.1}):
        with pytest.raises(LossParamError, match=repr(next(iter(bad)))):
            losses.build("sskd", **bad)
