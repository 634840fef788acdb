"""What a run writes, by name: the one place for output file names and the patterns that keep files off the Hub.

A finished student folder (``output_dir``) holds the student as transformers writes it (``config.json``,
``model.safetensors``, the image processor or tokenizer, ``training_args.bin``) plus hfdistill's own files:

    distill_recipe.yaml      RECIPE_NAME        the recipe the student was made with (no tokens); reruns it
    distill_results.json     RESULTS_NAME       the model card's values as data (metrics, sizes, ids)
    README.md                CARD_NAME          the model card
    all_results.json         ALL_RESULTS_NAME   Trainer metrics (training and last evaluation)
    checkpoint-*/            Trainer checkpoints; each also holds
      distill_state.safetensors  DISTILL_STATE_NAME  adapters' and loss modules' state (never in the student)
      checkpoint_complete.json   CHECKPOINT_COMPLETE_NAME  written last: the checkpoint is whole (resume reads
                                 only such checkpoints; a run killed while writing one leaves it without)

A run with a baseline or extra seeds writes sibling folders: :func:`baseline_dir` and :func:`seed_dir`; the extra
students a method trains beside the student (DML's peers), each a complete student folder of its own, go to
:func:`peers_dir` (beside ``output_dir``, never in it: the student folder is what goes to the Hub).

This module imports nothing from hfdistill (and nothing heavy), so every module may use it.
"""

from __future__ import annotations

import json
import os
import re

RECIPE_NAME = "distill_recipe.yaml"
RESULTS_NAME = "distill_results.json"
CARD_NAME = "README.md"
ALL_RESULTS_NAME = "all_results.json"
EVAL_RESULTS_NAME = "eval_results.json"
DISTILL_STATE_PREFIX = "distill_state"
DISTILL_STATE_NAME = f"{DISTILL_STATE_PREFIX}.safetensors"
CHECKPOINT_COMPLETE_NAME = "checkpoint_complete.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

# The student's weight files, as transformers names them (single file or shards with an index).
STUDENT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")

# Files in a student folder that are never pushed. transformers' own patterns ("_*", "checkpoint-*") first;
# then what belongs to distillation, not to the student (DESIGN.md, contract 4).
PUSH_IGNORE_PATTERNS = [
    "_*",
    "checkpoint-*",
    "checkpoint-*/*",
    f"{DISTILL_STATE_PREFIX}*",
    f"*/{DISTILL_STATE_PREFIX}*",
    "teacher*",
    "teacher*/*",
    ".cache/*",
]
# Checkpoint pushes (hub_strategy checkpoint / all_checkpoints) carry optimizer state but never loss state.
CHECKPOINT_IGNORE_PATTERNS = [f"{DISTILL_STATE_PREFIX}*", f"*/{DISTILL_STATE_PREFIX}*"]


def baseline_dir(output_dir: str, seed: int | None = None) -> str:
    """Where the student trained without a teacher goes: ``<output_dir>-baseline`` (``-baseline-seed<n>``)."""
    base = f"{output_dir.rstrip('/')}-baseline"
    return base if seed is None else f"{base}-seed{seed}"


def seed_dir(output_dir: str, seed: int) -> str:
    """Where the distilled student of an extra seed goes: ``<output_dir>-seed<n>``."""
    return f"{output_dir.rstrip('/')}-seed{seed}"


PEERS_SUFFIX = "-peers"


def peers_dir(output_dir: str, name: str | None = None) -> str:
    """Where the extra students trained with the student go: ``<output_dir>-peers/<name>`` (the folder without name)."""
    base = f"{output_dir.rstrip('/')}{PEERS_SUFFIX}"
    return base if name is None else os.path.join(base, name)


def hub_repo_id(name: str | None) -> str | None:
    """The Hub repo id a model name refers to, or None (timm names, local folders).

    ``hf-hub:org/name`` and ``hf-hub:org/name@rev`` (timm's syntax) give ``org/name``; a transformers id
    ``org/name`` is returned as is unless a local folder of that name exists. (Pure name parsing: here so
    that the card and the Hub code read names the same way without depending on each other.)
    """
    if not name:
        return None
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):].split("@")[0]
    if name.startswith(("timm:", "/", "./", "../", "~")) or os.path.exists(name):
        return None
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and not name.endswith((".", "-")) and ".." not in name:
        return name
    return None


# Bad input must leave nothing behind: what a failed set-up created is removed while still empty.
def missing_folders(path: str) -> list[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing, current = [], os.path.abspath(path)
    while not os.path.exists(current):
        missing.append(current)
        current = os.path.dirname(current)
    return missing


def remove_empty_folders(folders: list[str]) -> None:
    for folder in folders:  # deepest first; stop at the first one something else wrote into
        try:
            if os.path.isdir(folder):
                os.rmdir(folder)
        except OSError:
            return


# ---- checkpoints: complete ones only ----
def mark_checkpoint_complete(folder: str, step: int) -> None:
    """Mark a checkpoint folder complete (call after everything else in it is written)."""
    path = os.path.join(folder, CHECKPOINT_COMPLETE_NAME)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump({"step": int(step)}, f)
    os.replace(f"{path}.tmp", path)


def checkpoints(folder: str) -> list[tuple[int, str, bool]]:
    """``(step, path, complete)`` of every ``checkpoint-N`` in ``folder``, by step."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path, os.path.isfile(os.path.join(path, CHECKPOINT_COMPLETE_NAME))))
    return sorted(found)


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest complete checkpoint in ``folder`` (None when there is none)."""
    complete = [path for _, path, done in checkpoints(folder) if done]
    return complete[-1] if complete else None


def incomplete_checkpoints(folder: str) -> list[str]:
    """Checkpoint folders newer than the newest complete one that are not complete (a killed write)."""
    found = checkpoints(folder)
    last = max((step for step, _, done in found if done), default=-1)
    return [path for step, path, done in found if not done and step > last]


def rotate_checkpoints(folder: str, limit: int | None, keep: str | None = None) -> list[str]:
    """Keep the newest ``limit`` *complete* checkpoints in ``folder`` (and ``keep``, the best one); delete the
    older ones and every incomplete one (a write that was killed). Call after the newest is marked complete,
    on the main process only. Returns what was deleted."""
    import shutil

    if not limit or limit <= 0:
        return []
    found = checkpoints(folder)
    complete = [os.path.normpath(path) for _, path, done in found if done]
    kept = set(complete[-limit:]) | ({os.path.normpath(keep)} if keep else set())
    deleted = [path for _, path, _ in found if os.path.normpath(path) not in kept]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


# ---- output folders: what may be written into ----
RESULT_MARKERS = (RECIPE_NAME, RESULTS_NAME, "stage_complete.json")


def folder_kind(folder: str) -> str:
    """``missing``, ``empty``, ``result`` (an earlier hfdistill result or run: its recipe, results, a stage
    marker or Trainer checkpoints) or ``other`` (something else: a model, a user's files)."""
    if not os.path.exists(folder):
        return "missing"
    if not os.path.isdir(folder):
        return "other"
    names = os.listdir(folder)
    if not names:
        return "empty"
    if any(name in RESULT_MARKERS for name in names) or checkpoints(folder):
        return "result"
    if all(os.path.isdir(os.path.join(folder, name)) and folder_kind(os.path.join(folder, name)) in ("result", "empty")
           for name in names):
        return "result"  # e.g. `<output_dir>-stages/` or `-peers/`: folders of results
    return "other"


def remove_checkpoints(folder: str) -> list[str]:
    """Delete the Trainer checkpoints (``checkpoint-N``) in ``folder``: an earlier run's, which must not mix
    with a new run's (resume would otherwise pick them up). Returns what was removed."""
    import shutil

    removed = [path for _, path, _ in checkpoints(folder)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def default_file_mode(paths: list[str]) -> None:
    """Give files the mode a newly created file gets here (0666 minus the umask).

    safetensors writes through a private temporary file, so its weight files came out 0600 while the rest
    of the folder is readable by the group: a shared result folder whose weights nobody else could read.
    """
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~mask)
