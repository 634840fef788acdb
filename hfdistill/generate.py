"""Sequence-level knowledge distillation: the teacher writes the training completions, the student learns them.

    hfdistill generate RECIPE.yaml [--output DIR] [--max_new_tokens N] [--batch_size B] [--do_sample]
                       [--temperature T] [--top_p P] [--seed S] [--shard_size N]

    # from Python
    folder = hfdistill.generate.generate_completions(teacher, tokenizer, raw.train, raw.eval, "DIR", fmt="chat")

Kim & Rush (Sequence-Level Knowledge Distillation, EMNLP 2016, arXiv:1606.07947) train the student on the
teacher's own outputs for the training inputs instead of on the references: the student then imitates the
teacher's mode rather than the whole data distribution, which suits a small model better. They decode with
beam search; greedy decoding (the default here) is its beam-1 approximation. ``--do_sample`` samples instead
(``--temperature``, ``--top_p``; no top-k, and the model's own generation defaults are not used: what the
manifest records is what was applied).

**What is generated.** For each training example of a ``text-generation`` recipe, its prompt is what the
teacher completes: the ``prompt`` of prompt/completion data, or the conversation before the LAST assistant
turn of a chat (``messages``), rendered with the teacher tokenizer's chat template and its generation prompt,
token for token as :class:`hfdistill.data.LMEncoder` renders the chat for training. Generation stops at the
tokenizer's end-of-text token, the model's ``eos_token_id`` and the chat template's end-of-turn token, or
after ``max_new_tokens`` (default: what training can learn of it, ``data.max_length`` minus the prompt's
tokens, at most :data:`DEFAULT_MAX_NEW_TOKENS`, within the model's positions). Batches are padded on the left.
Plain ``text`` data has no prompt and is refused.

**Files.** ``DIR/train-00000-of-000NN.jsonl``: the training rows in their order, the completion (or the last
assistant turn's content) replaced by the teacher's text, every other column kept;
``DIR/validation.jsonl``: the held-out examples unchanged (the references: perplexities stay comparable
with runs on the original data); ``generation_build.json`` (what is being built, written first) and
``generation.json`` (the manifest, written last: teacher name and weights sha256, generation settings, data
size and sha256, hfdistill version, shards with their row counts and sha256, and the ``data:`` section to
train with). A recipe trains on it with
``data: {name: json, data_files: {train: DIR/train-*.jsonl, validation: DIR/validation.jsonl}}``
(:func:`generate_usage` prints it with the recipe's ``max_length``); before writing the manifest this is
loaded through :func:`hfdistill.data.load_raw_data`, which must find the same format and row counts.

**Resume and several processes.** Each shard is written under a temporary name and renamed, so it is complete
or absent. Running again into the same folder keeps the complete shards (their row count, and their sha256
when a manifest lists them) and writes the others; another teacher, other settings or other data are refused,
saying what differs. Under ``accelerate launch`` process ``r`` of ``w`` writes the shards ``i % w == r``;
rank 0 writes ``validation.jsonl`` and, once every shard exists, the manifest. Sampling is seeded per shard,
so a resumed or multi-process run writes what a single uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .errors import DistillationError, RecipeError
from .models import max_positions

FORMAT = "hfdistill-teacher-completions"
FORMAT_VERSION = 1
BUILD_NAME = "generation_build.json"
MANIFEST_NAME = "generation.json"
VALIDATION_NAME = "validation.jsonl"
SHARD_NAME = "train-{:05d}-of-{:05d}.jsonl"
SHARD_GLOB = "train-*.jsonl"
GENERATED_FORMATS = ("prompt_completion", "chat")
# Cap of the default max_new_tokens (a long data.max_length and a teacher that never stops would otherwise
# cost max_length tokens per example); --max_new_tokens sets any other limit.
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_SHARD_SIZE = 1024
PAPER = "Sequence-Level Knowledge Distillation (Kim & Rush, EMNLP 2016, arXiv:1606.07947)"
_PROBE = "hfdistill-end-of-turn-probe"


# ------------------------------------------------------------------------------------ small helpers
def _version() -> str:
    import hfdistill

    return hfdistill.__version__


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    from . import processes

    return processes.rank(), processes.world_size()


def _write_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: the file is complete or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def _line(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rows(split: Any, start: int, stop: int) -> list[dict]:
    """Rows ``start:stop`` of a ``datasets.Dataset`` or a list of dicts, as plain dicts."""
    if isinstance(split, (list, tuple)):
        return [dict(row) for row in split[start:stop]]
    return split.select(range(start, stop)).to_list()


def _data_sha256(split: Any, block: int = 1024) -> str:
    """sha256 of every row (all columns), in order: what the rows were made from."""
    digest = hashlib.sha256()
    for start in range(0, len(split), block):
        rows = _rows(split, start, min(start + block, len(split)))
        digest.update(json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
    return digest.hexdigest()


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12] + "..."
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _has_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _kept_on_load(row: Mapping[str, Any], fmt: str) -> bool:
    """Whether :func:`hfdistill.data.load_raw_data` keeps the row (it drops empty completions)."""
    return fmt == "chat" or (_has_text(row.get("completion")) and isinstance(row.get("prompt"), str))


def last_assistant(messages: Sequence[Mapping[str, Any]]) -> int | None:
    """Index of the last assistant turn of a chat (None: the chat has none, nothing to generate)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    return None


# ------------------------------------------------------------------------------------ prompts and stops
class _Prompts:
    """The teacher's prompt tokens of a row, as :class:`hfdistill.data.LMEncoder` tokenises them for training."""

    def __init__(self, tokenizer: Any, fmt: str):
        from .data import LMEncoder, ensure_chat_template

        if fmt == "chat":
            ensure_chat_template(tokenizer)  # as causal_lm_data does for chat data
        self.fmt = fmt
        self.encoder = LMEncoder(tokenizer, fmt, max_length=None)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start = [start] if start is not None else []  # an empty prompt still needs one token to start from

    def ids(self, row: Mapping[str, Any]) -> list[int] | None:
        """The prompt's token ids; None when the row has nothing to complete (a chat with no assistant turn)."""
        enc = self.encoder
        if self.fmt == "prompt_completion":
            ids = enc.prefix + enc._ids(row.get("prompt") or "")
        else:
            end = last_assistant(row["messages"])
            if end is None:
                return None
            context = [{"role": m["role"], "content": m["content"]} for m in row["messages"][:end]]
            plain = enc._render(context)
            full = enc._render(context, generation_prompt=True)
            if full.startswith(plain):  # the turns one by one, then the generation prompt: training's tokens
                ids = [t for text, _ in enc._chat_segments(context) for t in enc._ids(text)] + enc._ids(full[len(plain):])
            else:
                ids = enc._ids(full)
        return ids or list(self.start)


def end_of_turn(tokenizer: Any) -> str:
    """What the tokenizer's chat template writes after an assistant turn's content (``<|im_end|>\\n``, ...)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this chat: the eos tokens stop generation
        return ""
    return text.split(_PROBE, 1)[1] if _PROBE in text else ""


def stop_tokens(model: Any, tokenizer: Any, fmt: str) -> tuple[list[int], str | None]:
    """Token ids that end a completion (eos of the tokenizer and of the model, the chat template's end-of-turn
    token) and, for a chat template whose end-of-turn is plain text, that text (a stop string)."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    stop_string = None
    if fmt == "chat":
        suffix = end_of_turn(tokenizer)
        first = tokenizer(suffix, add_special_tokens=False)["input_ids"][:1] if suffix else []
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        if first and first[0] in special:
            add(first[0])
        elif suffix.strip():
            stop_string = suffix.strip()
    return ids, stop_string


def _limit(prompt_len: int, fmt: str, max_length: int, max_new_tokens: int | None,
           positions: int | None) -> tuple[int, int | None]:
    """``(new tokens allowed, prompt tokens kept or None for all)`` of one example. By default what training can
    learn of the completion (LMEncoder keeps at least half of max_length for a completion; a chat is cut at
    max_length). Within the model's positions the prompt is kept whole unless that leaves the completion less
    than half of them; then it loses its beginning, as in training."""
    if max_new_tokens is not None:
        limit = max_new_tokens
    else:
        room = max_length - prompt_len
        if fmt == "prompt_completion":
            room = max(room, max_length // 2)
        limit = max(1, min(DEFAULT_MAX_NEW_TOKENS, room))
    if positions is None or prompt_len + limit <= positions:
        return limit, None
    limit = max(1, min(limit, max(positions - prompt_len, positions // 2)))
    return limit, (positions - limit if positions - limit < prompt_len else None)


def generation_settings(max_new_tokens: int | None, batch_size: int, do_sample: bool, temperature: float | None,
                        top_p: float | None, seed: int, max_length: int) -> dict:
    """What decides the completions (compared on resume). Greedy decoding ignores the seed and, up to float
    noise, the batch size: they are recorded for sampling only."""
    return {
        "strategy": "sampling" if do_sample else "greedy",
        "do_sample": bool(do_sample),
        "temperature": (1.0 if temperature is None else float(temperature)) if do_sample else None,
        "top_p": (1.0 if top_p is None else float(top_p)) if do_sample else None,
        "seed": int(seed) if do_sample else None,
        "batch_size": int(batch_size) if do_sample else None,
        "max_new_tokens": max_new_tokens,
        "default_max_new_tokens": None if max_new_tokens is not None else
        f"data.max_length ({max_length}) minus the prompt's tokens, at most {DEFAULT_MAX_NEW_TOKENS}",
        "max_length": int(max_length),
    }


def check_generation_options(max_new_tokens: int | None, batch_size: int, do_sample: bool, temperature: float | None,
                             top_p: float | None, shard_size: int) -> None:
    """RecipeErrors naming the option (``--max_new_tokens``, ...) that cannot be used."""
    for name, value in (("--max_new_tokens", max_new_tokens), ("--batch_size", batch_size), ("--shard_size", shard_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(name, f"must be a positive integer, got {value!r}")
    if not do_sample and (temperature is not None or top_p is not None):
        raise RecipeError("--temperature" if temperature is not None else "--top_p",
                          "applies to sampling only; add --do_sample, or leave it out for greedy decoding")
    if temperature is not None and not temperature > 0:
        raise RecipeError("--temperature", f"must be > 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise RecipeError("--top_p", f"must be in (0, 1], got {top_p}")


# ------------------------------------------------------------------------------------ generating
class _Generator:
    """Completions of rows by the teacher: prompts sorted by length into left-padded batches, ``generate()``."""

    def __init__(self, model: Any, tokenizer: Any, fmt: str, *, max_new_tokens: int | None, max_length: int,
                 batch_size: int, do_sample: bool, temperature: float | None, top_p: float | None, seed: int):
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        self.prompts = _Prompts(tokenizer, fmt)
        self.stop_ids, self.stop_string = stop_tokens(model, tokenizer, fmt)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = pad if pad is not None else 0
        self.max_new_tokens, self.max_length, self.batch_size = max_new_tokens, max_length, batch_size
        self.positions = max_positions(model)
        self.seed = seed
        # Every decoding choice explicit: generate() fills unset ones from the model's generation_config
        # (a chat model's sampling temperature, repetition penalty, ...), which would make them unrecorded.
        self.options = {"num_beams": 1, "num_return_sequences": 1, "min_new_tokens": 0,
                        "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "do_sample": bool(do_sample),
                        "eos_token_id": self.stop_ids or None, "pad_token_id": self.pad, "use_cache": True}
        if do_sample:
            self.options.update(temperature=1.0 if temperature is None else float(temperature),
                                top_p=1.0 if top_p is None else float(top_p), top_k=0, min_p=0.0, typical_p=1.0,
                                epsilon_cutoff=0.0, eta_cutoff=0.0)
        else:
            self.options.update(temperature=1.0, top_p=1.0, top_k=50, typical_p=1.0)  # unused by greedy decoding
        if self.stop_string:
            self.options["stop_strings"] = [self.stop_string]
        self.reached_limit = 0  # completions cut at their token limit before any stop token
        self.generated = 0

    @property
    def device(self) -> torch.device:
        from .teacher import input_device

        return input_device(self.model)

    def complete(self, rows: list[dict], shard: int, bar: Any) -> list[dict]:
        """The rows with their completion (prompt/completion) or last assistant turn (chat) by the teacher."""
        work = []  # (row index, prompt ids, new tokens allowed)
        for i, row in enumerate(rows):
            ids = self.prompts.ids(row)
            if ids is None:
                continue
            limit, keep = _limit(len(ids), self.fmt, self.max_length, self.max_new_tokens, self.positions)
            work.append((i, ids if keep is None else ids[-keep:], limit))
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(self.seed + shard)  # per shard: a resumed or multi-process run samples the same
            texts = dict(zip([i for i, _, _ in work], self._complete_all([p for _, p, _ in work],
                                                                         [n for *_, n in work], bar)))
        bar.update(len(rows) - len(work))
        out = []
        for i, row in enumerate(rows):
            if i not in texts:
                out.append(row)
            elif self.fmt == "prompt_completion":
                out.append({**row, "completion": texts[i]})
            else:
                messages = [dict(m) for m in row["messages"]]
                messages[last_assistant(messages)]["content"] = texts[i]
                out.append({**row, "messages": messages})
        return out

    def _complete_all(self, prompts: list[list[int]], limits: list[int], bar: Any) -> list[str]:
        """Each prompt's completion: up to its own token limit or its first stop.

        Prompts go sorted by length into batches. A batch generates at most as many tokens as its longest
        prompt leaves within the model's positions (left-padded rows all take the same number of steps); a row
        that has not stopped and has tokens left goes on in a later round, from its prompt and what it wrote
        (for greedy decoding the same tokens as one longer call)."""
        new: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * len(prompts)
        pending = list(range(len(prompts)))
        while pending:
            pending.sort(key=lambda k: len(prompts[k]) + len(new[k]))
            later = []
            for start in range(0, len(pending), self.batch_size):
                batch = pending[start:start + self.batch_size]
                inputs = [prompts[k] + new[k] for k in batch]
                remaining = [limits[k] - len(new[k]) for k in batch]
                steps = max(remaining)
                if self.positions is not None:  # every row's prompt + limit fits (_limit), so this is >= 1
                    steps = min(steps, self.positions - max(len(x) for x in inputs))
                finished = 0
                for k, left, tokens in zip(batch, remaining, self._generate(inputs, steps)):
                    tokens = tokens[:left]
                    end = next((j for j, t in enumerate(tokens) if t in self.stop_ids), None)
                    new[k] += tokens if end is None else tokens[:end]
                    stopped[k] = end is not None or (self.stop_string is not None and self.stop_string in self._decode(new[k]))
                    if stopped[k] or len(new[k]) >= limits[k]:
                        finished += 1
                    else:
                        later.append(k)
                bar.update(finished)
            pending = later
        texts = []
        for tokens, done in zip(new, stopped):
            text = self._decode(tokens)
            if self.stop_string is not None and self.stop_string in text:
                text = text.split(self.stop_string, 1)[0]
            self.reached_limit += not done
            self.generated += 1
            texts.append(text)
        return texts

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _generate(self, prompts: list[list[int]], steps: int) -> list[list[int]]:
        """``generate()`` on left-padded prompts: each row's new tokens (``steps`` at most)."""
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[r, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[r, width - len(prompt):] = 1
        config = GenerationConfig(max_new_tokens=steps, **self.options)
        extra = {"tokenizer": self.tokenizer} if self.stop_string else {}
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=config, **extra)
        return out[:, width:].tolist()


# ------------------------------------------------------------------------------------ the folder
def data_spec(folder: str | os.PathLike, max_length: int | None = None, **fields: Any) -> dict:
    """The recipe ``data:`` section that trains on a generated folder (``fields``: more data fields)."""
    folder = os.fspath(folder).rstrip("/") or "/"
    spec: dict[str, Any] = {"name": "json", "data_files": {"train": f"{folder}/{SHARD_GLOB}",
                                                           "validation": f"{folder}/{VALIDATION_NAME}"}}
    if max_length is not None:
        spec["max_length"] = int(max_length)
    spec.update(fields)
    return spec


def check_data_spec(spec: Mapping[str, Any], fmt: str, num_train: int, num_eval: int) -> None:
    """Load ``spec`` through :func:`hfdistill.data.load_raw_data` as a recipe would: it must find ``fmt`` and
    the row counts (a DistillationError otherwise: the folder would not train as printed)."""
    from .data import _quiet_datasets, load_raw_data
    from .recipe import DataSpec

    try:
        with _quiet_datasets():
            raw = load_raw_data(DataSpec(**dict(spec)), "text-generation")
    except RecipeError as exc:
        raise DistillationError(f"the generated data does not load as `data: {dict(spec)}`: {exc}") from None
    found = (raw.lm_format, len(raw.train), len(raw.eval))
    if found != (fmt, num_train, num_eval):
        raise DistillationError(
            f"the generated data loads as {found[0]} data with {found[1]} training and {found[2]} validation "
            f"examples, not as {fmt} data with {num_train} and {num_eval}; delete the folder and generate again")


def _check_or_write_build(folder: Path, spec: dict) -> None:
    path = folder / BUILD_NAME
    if not path.is_file():
        if any(folder.glob(SHARD_GLOB)):
            raise DistillationError(f"{folder} holds {SHARD_GLOB} files but no {BUILD_NAME}: it is not a folder "
                                    "`hfdistill generate` can resume; use a new folder or delete this one")
        _write_atomic(path, _json(spec))
        return
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistillationError(f"{path} cannot be read ({exc}); delete the folder and generate again") from None
    if str(found.get("hfdistill_version", "")).split(".")[0] != spec["hfdistill_version"].split(".")[0]:
        raise DistillationError(f"{folder} was started by hfdistill {found.get('hfdistill_version')}, another major "
                                f"version than this one ({spec['hfdistill_version']}); generate into a new folder")
    before, now = _flatten({k: v for k, v in found.items() if k != "hfdistill_version"}), \
        _flatten({k: v for k, v in spec.items() if k != "hfdistill_version"})
    differ = []
    for key in sorted(set(before) | set(now), key=lambda k: (not k.startswith("teacher."), k)):
        if before.get(key) != now.get(key) and key != "teacher.name":  # the weights decide, not where they are
            note = " (another teacher, or other weights)" if key == "teacher.weights_sha256" else ""
            differ.append(f"{key}: {_short(before.get(key))} in the folder, {_short(now.get(key))} now{note}")
    if differ:
        raise DistillationError(
            f"{folder} holds (part of) other teacher completions, so it cannot be resumed: " + "; ".join(differ)
            + ". Generate into a new folder (--output), or delete this one to start over")


def _shard_is_complete(path: Path, rows: int, listed_sha256: str | None) -> bool:
    if not path.is_file():
        return False
    if listed_sha256 is not None and _file_sha256(path) != listed_sha256:
        return False
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip()) == rows


def _wait_for_shards(paths: list[Path], world_size: int, wait_timeout: float) -> None:
    deadline = time.monotonic() + max(0.0, wait_timeout)
    while True:
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise DistillationError(
                f"the teacher completions are missing shard(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                f"written by rank(s) {sorted({i % world_size for i in missing})} of {world_size}; run them (the same "
                "command), then run rank 0 again: it keeps the complete shards and writes the manifest")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def read_generation_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a complete folder of teacher completions; a DistillationError saying what is wrong."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise DistillationError(f"{folder} holds no {MANIFEST_NAME}: the teacher completions there are not complete; "
                                "run `hfdistill generate` with the same recipe and --output again to finish them")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise DistillationError(f"{path} is not a manifest of teacher completions (format {manifest.get('format')!r})")
    return manifest


def generate_completions(
    teacher_model: Any,
    tokenizer: Any,
    raw_train: Any,
    raw_eval: Any,
    folder: str | os.PathLike,
    *,
    fmt: str,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int = 42,
    progress: bool = True,
    max_length: int = 128,
    shard_size: int = DEFAULT_SHARD_SIZE,
    data_fields: Mapping[str, Any] | None = None,
    teacher_name: str | None = None,
    teacher_dtype: str = "auto",
    device: str | torch.device | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    wait_timeout: float = 3600.0,
) -> str:
    """Write the teacher's completions of ``raw_train``'s prompts and ``raw_eval`` unchanged to ``folder``.

    ``raw_train``/``raw_eval``: the splits as :func:`hfdistill.data.load_raw_data` gives them (``datasets``
    or lists of dicts) in format ``fmt`` (``prompt_completion`` or ``chat``). ``max_length`` is the
    recipe's ``data.max_length`` (the default token limit, and the ``data:`` section printed to train with,
    with ``data_fields``). ``teacher_dtype``: ``auto`` (as loaded), ``float32``, ``bfloat16``, ``float16``.
    ``device``: default this process's GPU, else the CPU. ``rank``/``world_size``: default
    torch.distributed, else RANK/WORLD_SIZE. Returns the folder.
    """
    from tqdm.auto import tqdm

    from .cache import weights_hash
    from .teacher import TEACHER_DTYPES, place_frozen_model

    if fmt not in GENERATED_FORMATS:
        raise RecipeError("data", f"{fmt!r} data has no prompt for the teacher to complete: sequence-level distillation "
                          "needs prompt/completion pairs (`prompt`, `completion`) or chats (`messages`)")
    check_generation_options(max_new_tokens, batch_size, do_sample, temperature, top_p, shard_size)
    if teacher_dtype not in TEACHER_DTYPES:
        raise RecipeError("training.teacher_dtype", f"must be one of {', '.join(TEACHER_DTYPES)}, got {teacher_dtype!r}")
    if len(raw_train) == 0:
        raise DistillationError("the training split is empty: there is nothing to complete")
    if rank is None or world_size is None:
        found_rank, found_world = _rank()
        rank = found_rank if rank is None else rank
        world_size = found_world if world_size is None else world_size
    folder_path = Path(folder)
    model = teacher_model
    sha256 = weights_hash(model)  # the weights as given, before any cast
    model.eval()
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    place_frozen_model(model, device, teacher_dtype)  # a model spread over devices by `device_map` stays there
    generator = _Generator(model, tokenizer, fmt, max_new_tokens=max_new_tokens, max_length=max_length,
                           batch_size=batch_size, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
    num = len(raw_train)
    num_shards = -(-num // shard_size)
    from .card import model_name

    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hfdistill_version": _version(),
        "teacher": {"name": teacher_name or model_name(model), "weights_sha256": sha256,
                    "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "generation": {**generation_settings(max_new_tokens, batch_size, do_sample, temperature, top_p, seed, max_length),
                       "stop_token_ids": generator.stop_ids, "stop_string": generator.stop_string},
        "data": {"format": fmt, "num_examples": num, "sha256": _data_sha256(raw_train),
                 "num_eval_examples": len(raw_eval), "eval_sha256": _data_sha256(raw_eval)},
        "shard_size": shard_size,
        "num_shards": num_shards,
    }
    folder_path.mkdir(parents=True, exist_ok=True)
    _check_or_write_build(folder_path, spec)
    listed: dict[str, str] = {}
    if (folder_path / MANIFEST_NAME).is_file():  # finished before: a shard changed since is written again
        try:
            listed = {s["file"]: s["sha256"] for s in json.loads((folder_path / MANIFEST_NAME).read_text())["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            listed = {}
    paths = [folder_path / SHARD_NAME.format(i, num_shards) for i in range(num_shards)]

    def shard_range(i: int) -> tuple[int, int]:
        return i * shard_size, min((i + 1) * shard_size, num)

    mine = [i for i in range(num_shards) if i % world_size == rank]
    todo = [i for i in mine if not _shard_is_complete(paths[i], shard_range(i)[1] - shard_range(i)[0],
                                                      listed.get(paths[i].name))]
    total = sum(shard_range(i)[1] - shard_range(i)[0] for i in todo)
    with tqdm(total=total, unit="ex", disable=not progress or total == 0,
              desc=f"teacher completions (rank {rank}/{world_size})" if world_size > 1 else "teacher completions") as bar:
        for i in todo:
            rows = generator.complete(_rows(raw_train, *shard_range(i)), i, bar)
            _write_atomic(paths[i], "".join(_line(row) + "\n" for row in rows))
    if generator.reached_limit:
        warnings.warn(
            f"{generator.reached_limit} of the {generator.generated} teacher completions written now reached their "
            "token limit before an end-of-text or end-of-turn token: they are cut, and a student trained on them "
            "learns to go on rather than stop. Raise --max_new_tokens (or data.max_length), or check the teacher",
            UserWarning, stacklevel=2)
    if rank != 0:
        return str(folder_path)

    validation = "".join(_line(row) + "\n" for row in _rows(raw_eval, 0, len(raw_eval)))
    validation_path = folder_path / VALIDATION_NAME
    if not validation_path.is_file() or _file_sha256(validation_path) != _sha256_text(validation):
        _write_atomic(validation_path, validation)
    _wait_for_shards(paths, world_size, wait_timeout)
    shards, kept = [], 0
    for i, path in enumerate(paths):
        start, stop = shard_range(i)
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        kept += sum(_kept_on_load(row, fmt) for row in rows)
        shards.append({"file": path.name, "start": start, "stop": stop, "rows": len(rows),
                       "bytes": path.stat().st_size, "sha256": _file_sha256(path)})
    eval_kept = sum(_kept_on_load(row, fmt) for row in _rows(raw_eval, 0, len(raw_eval)))
    train_data = data_spec(folder, max_length, **dict(data_fields or {}))
    check_data_spec(train_data, fmt, kept, eval_kept)
    columns = list(_rows(raw_train, 0, 1)[0])
    manifest = {
        **{k: spec[k] for k in ("format", "format_version", "hfdistill_version", "teacher")},
        "generation": {**spec["generation"], "batch_size": batch_size},  # the build compares it for sampling only
        "method": PAPER,
        "data": {**spec["data"], "columns": columns, "fingerprint": getattr(raw_train, "_fingerprint", None),
                 "empty_completions": num - kept if fmt == "prompt_completion" else 0,
                 "validation": {"file": VALIDATION_NAME, "rows": len(raw_eval), "sha256": _sha256_text(validation)}},
        "shard_size": shard_size,
        "shards": shards,
        "train_with": {"data": train_data},
    }
    manifest_path = folder_path / MANIFEST_NAME
    try:
        before = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else None
    except (OSError, ValueError):
        before = None
    if before is None or {k: v for k, v in before.items() if k != "created"} != json.loads(_json(manifest)):
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_atomic(manifest_path, _json(manifest))
    return str(folder_path)


# ------------------------------------------------------------------------------------ recipes and the CLI
def generate_command(recipe_path: str, overrides: Sequence[str] = (), *, output: str | None = None,
                     max_new_tokens: int | None = None, batch_size: int = 32, do_sample: bool = False,
                     temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                     shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True, dataset: Any = None) -> str:
    """``hfdistill generate``: load the recipe's teacher and training data as ``train`` does, write the teacher's
    completions (default folder ``<training.output_dir>-teacher-completions``; ``seed``: default
    ``training.seed``). Returns the folder."""
    from .data import load_raw_data
    from .run import _default_output_dir, _require, _resolve_recipe, plan_run

    recipe, path = _resolve_recipe(recipe_path, overrides)
    if recipe.task != "text-generation":
        raise RecipeError("task", f"is {recipe.task!r}; `hfdistill generate` writes a teacher's completions of text "
                          "prompts (sequence-level distillation), for `task: text-generation` recipes only")
    if recipe.teacher is None:
        raise RecipeError("teacher", "the recipe has no `teacher:`; sequence-level distillation needs the teacher "
                          "that writes the completions")
    if recipe.teacher.cache is not None:
        raise RecipeError("teacher.cache", "a teacher cache holds the teacher's outputs on the training tokens, "
                          "not a model that can generate; give the teacher model (`teacher: {name: ...}`)")
    check_generation_options(max_new_tokens, batch_size, do_sample, temperature, top_p, shard_size)
    _require(recipe)
    # Every column kept (the same rows as training reads): the generated rows keep what they had.
    raw = load_raw_data(recipe.data, recipe.task, seed=recipe.data.seed, dataset=dataset, keep_columns=True)
    if raw.lm_format not in GENERATED_FORMATS:
        raise RecipeError("data", "the training data is plain text, which has no prompt for the teacher to complete; "
                          "sequence-level distillation needs prompt/completion pairs (`prompt` and `completion` "
                          "columns, or `data.prompt_column` and `data.completion_column`) or chats (`messages`)")
    plan = plan_run(recipe, path, dataset)
    if any(job.label == "teacher" for job in plan.jobs):
        raise RecipeError("teacher.train_from", f"the teacher {plan.teacher_folder} does not exist yet; train it "
                          f"first (`hfdistill train {recipe_path}` trains it before the student), then generate")
    out_dir = recipe.training.get("output_dir") or _default_output_dir(path)
    output = output or f"{out_dir.rstrip('/')}-teacher-completions"
    use_cpu = bool(recipe.training.get("use_cpu")) or not torch.cuda.is_available()
    fields: dict[str, Any] = {}
    if not recipe.data.completion_only_loss:
        fields["completion_only_loss"] = False
    if recipe.data.packing:
        fields["packing"] = True
    return generate_completions(
        plan.teacher.model, plan.teacher.tokenizer, raw.train, raw.eval, output, fmt=raw.lm_format,
        max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample, temperature=temperature,
        top_p=top_p, seed=int(recipe.training.get("seed", 42)) if seed is None else seed, progress=progress,
        max_length=recipe.data.max_length, shard_size=shard_size, data_fields=fields,
        teacher_name=recipe.teacher.name, teacher_dtype=recipe.training.get("teacher_dtype", "auto"),
        device="cpu" if use_cpu else None,
    )


def generate_usage(folder: str, recipe_path: str) -> str:
    """What ``hfdistill generate`` prints when done: where the data is and how to train on it."""
    import yaml

    manifest = read_generation_manifest(folder)
    data, generation = manifest["data"], manifest["generation"]
    spec = yaml.safe_dump(manifest["train_with"]["data"], default_flow_style=True, sort_keys=False, width=10**6).strip()
    limit = generation["max_new_tokens"] or generation["default_max_new_tokens"]
    lines = [
        f"teacher completions: {folder} ({data['num_examples']} training examples completed by "
        f"{manifest['teacher']['name']}, {generation['strategy']}, new tokens: {limit}; {len(manifest['shards'])} "
        f"shard(s); {data['validation']['rows']} held-out examples unchanged in {VALIDATION_NAME})",
    ]
    if data.get("empty_completions"):
        lines.append(f"  {data['empty_completions']} completion(s) are empty; training leaves those examples out")
    return "\n".join(lines + [
        "Train on it (sequence-level distillation; keep the recipe's terms for word-level KD on top, as Kim & Rush's "
        "Seq-KD + Word-KD, or remove them for Seq-KD alone): in the recipe, replace the `data:` section by",
        f"  data: {spec}",
        f"or: hfdistill train {recipe_path} --data {shlex.quote(spec)}",
    ])
