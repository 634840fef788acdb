"""Run by test_ddp.py under `accelerate launch --multi_gpu --num_processes 2` (gloo DDP on CPU).

Each rank writes its student, adapter and loss-module weights so the test can check they are identical.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from conftest import digits_dataset, tiny_timm  # noqa: E402

from hfdistill import DistillationConfig, DistillationTrainer  # noqa: E402


def main(output_dir: str) -> None:
    train, _ = digits_dataset(n_train=128)
    recipe = {
        "terms": [
            {"loss": "kd", "weight": 0.5},
            {"loss": "mse", "student": "blocks.2", "teacher": "layer3", "adapter": "conv1x1"},
            {"loss": "vid", "student": "blocks.1", "teacher": "layer2"},
        ]
    }
    # Different seeds per rank on purpose: DDP must broadcast rank 0's initial weights and keep them in sync.
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(100 + rank)
    args = DistillationConfig(
        output_dir=output_dir, max_steps=4, per_device_train_batch_size=8, learning_rate=0.05, optim="sgd",
        report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=2, seed=0,
        # Nothing about the CPU or gloo on a machine without GPUs: DistillationConfig sees the launch and asks
        # Accelerate for data parallelism on the CPU (one GPU cannot host two ranks, so there: use_cpu).
        use_cpu=torch.cuda.is_available(),
    )
    trainer = DistillationTrainer(
        model=tiny_timm("test_efficientnet", seed=2 + rank), teacher=tiny_timm("test_resnet", seed=1),
        recipe=recipe, args=args, train_dataset=train,
    )
    trainer.train()
    state = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    state.update({k: v for k, v in trainer.model.distill_state_dict().items()})
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    world = trainer.accelerator.num_processes
    assert trainer.args.parallel_mode.value == "distributed" and world == 2, (trainer.args.parallel_mode, world)
    safetensors.torch.save_file(state, os.path.join(output_dir, f"rank{trainer.accelerator.process_index}_of_{world}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
