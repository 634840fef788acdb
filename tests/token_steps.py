"""One optimisation step of a tiny causal-LM distillation, for tests/test_token_normalisation.py.

Run in-process (``one_step(...)``) or under ``accelerate launch --num_processes 2`` (``__main__``: each
rank writes its student's weights), with sequential sampling so that every set-up sees the same 32 examples
in one optimisation step, whatever its split into micro-batches and processes.
"""

import os
import sys

import safetensors.torch
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hfdistill import DistillationConfig, DistillationTrainer

VOCAB, LENGTH, EXAMPLES = 50, 12, 32


def tiny_gpt2(seed: int, layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=layers, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, loss_type="ForCausalLM", bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def examples() -> list[dict]:
    """32 right-padded sequences with prompts and completions of different lengths: the completion tokens
    (labels != -100) differ from example to example, so a per-micro-batch mean would weigh them unequally."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(EXAMPLES):
        length = 4 + (i * 7) % (LENGTH - 3)
        prompt = 1 + (i * 5) % (length - 2)
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=generator)
        mask = (torch.arange(LENGTH) < length).long()
        labels = torch.where((torch.arange(LENGTH) >= prompt) & mask.bool(), ids, torch.full_like(ids, -100))
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return rows


def one_step(output_dir: str, batch: int, accumulation: int, terms: list[dict]) -> DistillationTrainer:
    args = DistillationConfig(
        output_dir=output_dir, max_steps=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=0.5, optim="sgd", weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no", disable_tqdm=True,
        train_sampling_strategy="sequential", logging_steps=1, seed=0, use_cpu=torch.cuda.is_available(),
    )
    trainer = DistillationTrainer(model=tiny_gpt2(seed=2, layers=1), teacher=tiny_gpt2(seed=1),
                                  recipe={"terms": terms, "task_weight": 0.5}, args=args, train_dataset=examples())
    trainer.train()
    return trainer


if __name__ == "__main__":
    import json

    output_dir, batch, terms = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    trainer = one_step(output_dir, batch, 1, terms)
    rank = trainer.args.process_index
    state = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}  # tied weights: copies
    safetensors.torch.save_file(state, os.path.join(output_dir, f"rank{rank}.safetensors"))
