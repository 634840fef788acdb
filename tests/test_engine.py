"""The engine's second floor: the loss setup context, hooks, per-example index, stages' `train:`, fp32 terms."""

import pytest
import torch
from conftest import tiny_timm
from test_trainer import make_args
from torch import nn

from hfdistill import DistillationError, DistillationTrainer
from hfdistill.errors import BadInputError
from hfdistill.losses import build, registry
from hfdistill.terms import LossContext


class IndexSeen(nn.Module):
    """A test loss with per-example state: counts how often each dataset index is seen, per epoch."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def configure(self, ctx: LossContext) -> None:
        self.contexts = [ctx]
        self.register_buffer("seen", torch.zeros(ctx.num_examples, dtype=torch.long))
        self.per_epoch: list[torch.Tensor] = []
        # A pass over the training data through the context: the term's values, per batch.
        self.pass_shapes = [(s.shape, t.shape, b["index"].shape) for s, t, b in ctx.term_values(max_batches=2)]

    def on_train_begin(self, ctx):
        self.calls.append("train_begin")

    def on_epoch_begin(self, ctx):
        if self.calls and self.calls[-1] != "train_begin":
            self.per_epoch.append(self.seen.clone())
        self.seen.zero_()
        self.calls.append(f"epoch_begin@{ctx.epoch:g}")

    def on_step_end(self, ctx):
        self.calls.append(f"step_end@{ctx.step}")

    def forward(self, student, teacher, index, epoch, step):
        self.seen.index_add_(0, index.to(self.seen.device), torch.ones_like(index, device=self.seen.device))
        return (student.float() - teacher.float()).pow(2).mean()


@pytest.fixture
def index_loss():
    registry.register_loss("index_seen_test", description="test", paper="none", year=2024, reads="logits",
                           default_tap="logits", fields=("index", "epoch", "step"))(IndexSeen)
    yield "index_seen_test"
    registry._LOSSES.pop("index_seen_test")


def test_context_index_hooks_and_data_pass(tmp_path, digits, index_loss):
    """A loss asking for `index` sees every example once per epoch; hooks get the context; configure can
    read the dataset size, world size, models and a pass over the training data."""
    train, _ = digits
    subset = train.select(range(40))  # the user's dataset has no index column
    trainer = DistillationTrainer(
        model=tiny_timm(seed=2), teacher=tiny_timm(seed=1), recipe={"terms": [{"loss": index_loss}]},
        args=make_args(tmp_path, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=8),
        train_dataset=subset,
    )
    loss = trainer.model.losses[index_loss]
    ctx = loss.contexts[0]
    assert ctx.num_examples == 40 and ctx.world_size == 1 and ctx.rank == 0
    assert ctx.student is not None and ctx.teacher is trainer.teacher
    assert ctx.student_shape == torch.Size([2, 10]) and ctx.teacher_shape == torch.Size([2, 10])
    assert loss.pass_shapes == [(torch.Size([8, 10]), torch.Size([8, 10]), torch.Size([8]))] * 2
    trainer.train()
    loss.per_epoch.append(loss.seen.clone())
    assert len(loss.per_epoch) == 2
    for counts in loss.per_epoch:
        assert torch.equal(counts, torch.ones(40, dtype=torch.long)), counts
    assert loss.calls[:2] == ["train_begin", "epoch_begin@0"]
    assert loss.calls.count("step_end@5") == 1 and "epoch_begin@1" in loss.calls
    assert sum(c.startswith("step_end") for c in loss.calls) == 10


def test_stage_train_restricts_what_trains_and_restores(tmp_path, digits):
    """`train: [student.layer1, adapters]`: only those change; frozen modules keep their BN statistics;
    requires_grad flags are restored after training."""
    train, _ = digits
    student = tiny_timm(seed=2)
    recipe = {"stages": [{"name": "hint", "task_weight": 0, "train": ["student.layer1", "adapters"],
                          "terms": [{"loss": "mse", "student": "layer1", "teacher": "layer1", "adapter": "conv1x1"}]}]}
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher=tiny_timm(seed=1), recipe=recipe,
                                  args=make_args(tmp_path, max_steps=4), train_dataset=train)
    adapters_before = {k: v.clone() for k, v in trainer.model.adapters.state_dict().items()}
    trainer.train()
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("layer1.") for k in changed), changed
    assert any(k.endswith("running_mean") for k in changed)  # layer1 trains in train mode
    assert any(not torch.equal(v, trainer.model.adapters.state_dict()[k]) for k, v in adapters_before.items())
    assert all(p.requires_grad for p in student.parameters())


def test_stage_train_entry_that_names_nothing(tmp_path, digits):
    train, _ = digits
    recipe = {"stages": [{"name": "hint", "train": ["student.layer9"], "terms": [{"loss": "kd"}]}]}
    with pytest.raises(DistillationError, match=r"stages\[0\]\.train\[0\].*student\.layer9"):
        DistillationTrainer(model=tiny_timm(seed=2), teacher=tiny_timm(seed=1), recipe=recipe,
                            args=make_args(tmp_path), train_dataset=train)


def test_stages_pick_and_carry_distill_state(tmp_path, digits):
    """A multi-stage recipe needs `stage=`; a term with the same name keeps its adapter state."""
    train, _ = digits
    term = {"name": "hint", "loss": "mse", "student": "layer2", "teacher": "layer2", "adapter": "conv1x1"}
    recipe = {"stages": [{"name": "one", "terms": [term]}, {"name": "two", "terms": [term, {"loss": "kd"}]}]}
    student, teacher = tiny_timm(seed=2), tiny_timm(seed=1)
    with pytest.raises(BadInputError, match="pass `stage=`"):
        DistillationTrainer(model=student, teacher=teacher, recipe=recipe, args=make_args(tmp_path), train_dataset=train)
    first = DistillationTrainer(model=student, teacher=teacher, recipe=recipe, stage="one",
                                args=make_args(tmp_path, max_steps=2), train_dataset=train)
    first.train()
    state = first.distill_state()
    second = DistillationTrainer(model=student, teacher=teacher, recipe=recipe, stage=1, distill_state=state,
                                 args=make_args(tmp_path, max_steps=2), train_dataset=train)
    assert [t.name for t in second.model.terms] == ["hint", "kd"]
    for key, value in second.distill_state().items():
        torch.testing.assert_close(value, state[key])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["sp", "pkt", "nst", "cc"])
def test_terms_run_in_fp32_under_autocast(tmp_path, digits, loss_name, dtype):
    """Accelerate runs the wrapped forward under autocast; the terms must still compute in fp32."""
    train, _ = digits
    params = {"embed_dim": None} if loss_name == "cc" else {}
    trainer = DistillationTrainer(
        model=tiny_timm(seed=2), teacher=tiny_timm(seed=1),
        recipe={"task_weight": 0, "terms": [{"loss": loss_name, "student": "layer3", "teacher": "layer3", "params": params}]},
        args=make_args(tmp_path), train_dataset=train,
    )
    distill = trainer.model
    term = distill.terms[0]
    # Large post-ReLU-like features: fp16 Gram diagonals overflow, bf16 loses most digits.
    student_feature = (torch.rand(8, 64, 4, 4) * 300).requires_grad_()
    teacher_feature = torch.rand(8, 64, 4, 4) * 300
    loss_module = distill.losses[term.name]
    expected = loss_module(student_feature, teacher_feature)

    # The student's tap gives the feature in half precision, as an autocast forward would.
    distill.student_features = lambda **inputs: (None, {"layer3": student_feature.to(dtype)})
    with torch.autocast("cpu", dtype=dtype):
        _, got = distill(teacher_features={"layer3": teacher_feature.to(dtype)}, loss_fields={})
    value = got[term.name]
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # The only error left is the inputs' own rounding to half precision, not the loss maths.
    rounded = loss_module(student_feature.to(dtype).float(), teacher_feature.to(dtype).float())
    torch.testing.assert_close(value, rounded, rtol=1e-4, atol=1e-6)
    assert abs(value.item() - expected.item()) <= 0.05 * abs(expected.item()) + 1e-6


def test_build_raises_on_unknown_loss_field():
    from hfdistill.recipe import TermSpec
    from hfdistill.terms import resolve_terms

    registry.register_loss("bad_field_test", description="t", paper="p", year=2024, reads="logits",
                           default_tap="logits", fields=("nonsense",))(type("Bad", (nn.Module,), {}))
    try:
        with pytest.raises(RuntimeError, match="unknown fields"):
            resolve_terms([TermSpec(loss="bad_field_test")])
    finally:
        registry._LOSSES.pop("bad_field_test")
    assert build("kd") is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_teacher_takes_float_inputs_everywhere(dtype):
    """A teacher run in half precision (`teacher_dtype`) is also called by the summary's latency with the
    float32 eval batch: call_model gives it inputs in its own dtype (issue 11: the summary crashed)."""
    import timm

    from hfdistill.summary import measure_latency
    from hfdistill.teacher import call_model

    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1).to(dtype).eval()
    batch = {"pixel_values": torch.randn(2, 1, 32, 32), "labels": torch.tensor([0, 1])}
    with torch.no_grad():
        assert call_model(model, batch).dtype == dtype
    latency = measure_latency(model, batch)
    assert latency and all(ms > 0 for ms in latency.values())
