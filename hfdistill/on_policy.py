"""On-policy distillation of language models: batches whose completions the student samples itself.

GKD (Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR
2024, arXiv:2306.13649): with probability ``lmbda`` a training batch keeps only its prompts, the student
samples a completion for each (its current policy, at ``on_policy_temperature``), and the step trains on those
sequences: the token losses compare the teacher's and the student's next-token distributions on the student's
own tokens (the teacher scores them in the same forward as any batch). So the student is taught where it
actually goes, not only along the data's completions. The student's own (task) loss is not applied to its
samples (that would teach it to repeat itself): an on-policy batch trains on the distillation terms alone, and
its tokens count in the step's token count with a task loss of 0, so ``task_weight`` weighs the data batches'
tokens. ``lmbda = 0`` is supervised KD on the data; ``lmbda = 1`` is fully on-policy (GKD's best setting with
the JSD or reverse KL).

The prompt of a row is its tokens before its first learnt token (labels != -100): the user's turn of a chat,
the prompt of a prompt/completion pair, the first token of plain text learnt in full. The new row is the prompt
followed by the sampled tokens up to and including the first end-of-sequence token; its labels are -100 on the
prompt and the sampled tokens on the completion, so the token losses and the student's loss count exactly the
sampled tokens (and the trainer's ``num_items_in_batch`` is counted again over the new batches).

Which batches go on-policy is drawn from the training seed, the optimisation step, the micro-batch and the
process: a rerun (or a resumed run) makes the same choices. Generation runs on the bare student in eval mode
without gradients; under FSDP or DeepSpeed (sharded parameters) it is refused.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from .errors import DistillationError
from .models import max_positions

IGNORE_INDEX = -100
SEQUENCE_FIELDS = ("input_ids", "attention_mask", "labels")
OTHER_FIELDS = ("index",)  # kept as they are (per example, not per position)
SAMPLED_FIELD = "on_policy_sampled"  # True in a batch the student sampled: the trainer applies no task loss to it


def draw(seed: int, step: int, micro_batch: int, rank: int, lmbda: float) -> bool:
    """Whether a micro-batch goes on-policy: probability ``lmbda``, reproducible from where it is in the run."""
    if lmbda <= 0:
        return False
    if lmbda >= 1:
        return True
    return random.Random(f"on-policy:{seed}:{step}:{micro_batch}:{rank}").random() < lmbda


def prompts(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's prompt: its real tokens (attention mask 1) before its first learnt token (at least one token)."""
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    learnt = labels != IGNORE_INDEX
    real = mask.sum(1)
    first = torch.where(learnt.any(1), learnt.int().argmax(1), real)  # [B]: the first learnt position
    out = []
    for row, end in enumerate(first.tolist()):
        tokens = ids[row, :end][mask[row, :end]]
        if tokens.numel() == 0:  # learnt from its first token: the first real token is the prompt
            tokens = ids[row][mask[row]][:1]
        out.append(tokens)
    return out


def completion_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] the number of learnt tokens per row."""
    return (batch["labels"] != IGNORE_INDEX).sum(1)


def _special_ids(model: nn.Module) -> tuple[int | None, int | list[int] | None]:
    generation = getattr(model, "generation_config", None)
    config = model.config
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    pad = getattr(generation, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return pad, eos


def check_batch(batch: dict[str, Any]) -> None:
    """Refuse batches that cannot be rebuilt from prompts and sampled tokens alone."""
    missing = [name for name in ("input_ids", "labels") if name not in batch]
    if missing:
        raise DistillationError(f"on-policy batches (lmbda > 0) need {', '.join(missing)} in every training batch; "
                                f"this one has {sorted(batch)}")
    other = sorted(k for k in batch if k not in SEQUENCE_FIELDS + OTHER_FIELDS)
    if other:
        teacher_fields = [k for k in other if k.startswith("teacher_")]
        why = ("the teacher reads its own tokenisation of the batch, which cannot follow the student's sampled "
               "tokens; on-policy distillation needs a teacher with the student's tokenizer" if teacher_fields
               else "they would not match the sampled sequences")
        raise DistillationError(f"on-policy batches (lmbda > 0) are rebuilt from input_ids, attention_mask and labels "
                                f"only; this batch also has {other}: {why}")


@torch.no_grad()
def sample_batch(student: nn.Module, batch: dict[str, torch.Tensor], *, temperature: float = 1.0,
                 max_new_tokens: int | None = None) -> dict[str, torch.Tensor] | None:
    """The batch with its completions replaced by the student's samples (None when there is no room to sample).

    ``batch``: ``input_ids`` / ``attention_mask`` / ``labels`` [B, T]. Returns right-padded [B, T'] tensors on
    the batch's device: prompt + sampled tokens (up to and including the first end-of-sequence token), labels
    -100 on the prompt and padding.
    """
    from transformers import GenerationConfig

    check_batch(batch)
    device = batch["input_ids"].device
    rows = prompts(batch)
    pad, eos = _special_ids(student)
    pad = 0 if pad is None else int(pad)
    longest_prompt = max(len(r) for r in rows)
    new_tokens = max_new_tokens or max(1, int(completion_lengths(batch).max()))
    room = max_positions(student)
    if room is not None:
        new_tokens = min(new_tokens, room - longest_prompt)
    if new_tokens < 1:
        return None
    # Left padding: every prompt ends where generation starts.
    prompt_ids = torch.full((len(rows), longest_prompt), pad, dtype=torch.long, device=device)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, r in enumerate(rows):
        prompt_ids[i, longest_prompt - len(r):] = r
        prompt_mask[i, longest_prompt - len(r):] = 1
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                              pad_token_id=pad, eos_token_id=eos, use_cache=True)
    was_training = student.training
    student.eval()
    try:
        generated = student.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    finally:
        student.train(was_training)
    sampled = generated[:, longest_prompt:]  # [B, M]
    ends = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    completions = []
    for i in range(len(rows)):
        tokens = sampled[i]
        stop = next((j for j, t in enumerate(tokens.tolist()) if t in ends), None)
        completions.append(tokens[: stop + 1] if stop is not None else tokens)
    length = max(len(p) + len(c) for p, c in zip(rows, completions))
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (p, c) in enumerate(zip(rows, completions)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.cat([p, c])
        attention_mask[i, :n] = 1
        labels[i, len(p):n] = c
    out = {k: v for k, v in batch.items() if k in OTHER_FIELDS}
    out.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out[SAMPLED_FIELD] = True
    return out


def check_student(student: nn.Module, sharded: bool, teacher_is_cache: bool, has_terms: bool) -> None:
    """Refuse, before training, set-ups where the student cannot sample or the teacher cannot score samples."""
    if not has_terms:
        raise DistillationError("lmbda > 0 (on-policy batches) trains the student on its own samples against the "
                                "teacher through the distillation terms, and this stage has none; add a token loss "
                                "(e.g. `jsd` or `reverse_kl`) or set lmbda to 0")
    if teacher_is_cache:
        raise DistillationError("lmbda > 0 (on-policy batches) needs the live teacher to score the student's samples; "
                                "a teacher cache holds its outputs on the data's sequences only. Give the teacher "
                                "model, or set lmbda to 0")
    can_generate = getattr(student, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise DistillationError(f"lmbda > 0 (on-policy batches) needs a student that generates text (a transformers "
                                f"causal LM); {type(student).__name__} does not")
    if sharded:
        raise DistillationError("lmbda > 0 (on-policy batches): sampling from a student whose parameters are sharded "
                                "(FSDP, DeepSpeed) is not supported; train on-policy with DDP or one process")
