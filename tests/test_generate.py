"""Sequence-level KD (`hfdistill generate`, hfdistill.generate): the teacher's greedy completions of the training
prompts written as a dataset that a recipe trains on; resume, settings refused, other processes, bad input.
Tiny GPT-2 teachers from configs with the byte tokenizer, saved to a folder (random weights: no training)."""

import json
import shlex
import warnings
from pathlib import Path

import pytest
import torch

from hfdistill.cli import main
from hfdistill.data import LMEncoder, load_raw_data
from hfdistill.generate import (MANIFEST_NAME, VALIDATION_NAME, _limit, _Prompts, check_data_spec,
                                generate_completions, stop_tokens)
from hfdistill.models import byte_tokenizer
from hfdistill.recipe import DataSpec, load_recipe, parse_overrides

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "chatterbot_causal_lm.yaml")
EOS, PAD = 0, 1  # the byte tokenizer's


# A random teacher hardly ever writes its end-of-text: its completions reach their limit, which generate() warns about.
pytestmark = pytest.mark.filterwarnings("ignore:.*reached their token limit")


def tiny_teacher(folder: Path, n_positions: int = 96, seed: int = 0, stop_at: int | None = None):
    """A random tiny GPT-2 with the byte tokenizer, saved to ``folder``. ``stop_at``: the blocks write nothing
    (each position sees only its own token) and from position ``stop_at - 1`` on the end-of-text token wins, so
    a prompt of P tokens gets at most ``stop_at - P`` tokens before it stops."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=n_positions, vocab_size=len(tokenizer),
                                       bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)).eval()
    if stop_at is not None:
        with torch.no_grad():
            for block in model.transformer.h:
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight.zero_()
                    proj.bias.zero_()
            eos = model.transformer.wte.weight[EOS]
            model.transformer.wpe.weight[stop_at - 1:] = 50 * (eos - eos.mean())
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def tiny(tmp_path: Path, *extra: str, data: bool = True) -> list[str]:
    """Overrides that make the chatterbot recipe tiny (a saved random teacher, a 1-layer student, 32 chats)."""
    return ["--teacher.name", str(tmp_path / "teacher"),
            "--student.config", "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 96}",
            *(["--data.max_length", "96", "--data.max_train_samples", "32", "--data.max_eval_samples", "8",
               "--data.validation_fraction", "0.2", "--data.options", "{topics: [greetings, food]}"] if data else []),
            "--training.output_dir", str(tmp_path / "student"), "--training.use_cpu", "true", *extra]


def error_of(err: str) -> str:
    """The CLI's error paragraph (stderr also holds transformers' loading bars), on one line."""
    assert "hfdistill: error:" in err, err
    paragraph = err[err.index("hfdistill: error:"):].strip()
    assert "\n\n" not in paragraph and "Traceback" not in err
    return " ".join(paragraph.split())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def greedy(model, ids: list[int], limit: int) -> str:
    """What the teacher's own generate() writes greedily after ``ids``, up to its end-of-text."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=limit, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)[0, len(ids):].tolist()
    out = out[:out.index(EOS)] if EOS in out else out
    return byte_tokenizer().decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """`hfdistill generate` on the tiny chatterbot recipe: (tmp folder, output folder, stdout)."""
    tmp = tmp_path_factory.mktemp("chat")
    tiny_teacher(tmp / "teacher")
    out = tmp / "completions"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["generate", RECIPE, "--output", str(out), "--shard_size", "12", "--batch_size", "8",
                     *tiny(tmp)]) == 0
    return tmp, out, buffer.getvalue()


# ------------------------------------------------------------------------------ the chatterbot recipe, tiny
def test_generate_writes_the_teachers_greedy_completions(chat_run):
    from transformers import AutoModelForCausalLM

    tmp, out, printed = chat_run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["generation.json", "generation_build.json", "train-00000-of-00003.jsonl",
                     "train-00001-of-00003.jsonl", "train-00002-of-00003.jsonl", VALIDATION_NAME]
    recipe = load_recipe(RECIPE, parse_overrides(tiny(tmp)))
    raw = load_raw_data(recipe.data, recipe.task, seed=recipe.data.seed)
    rows = [row for i in range(3) for row in read_jsonl(out / f"train-0000{i}-of-00003.jsonl")]
    originals = raw.train.to_list()
    assert len(rows) == len(originals) == 32
    # The same chats in the same order, every turn kept but the last assistant turn's text.
    assert [r["messages"][:-1] for r in rows] == [o["messages"][:-1] for o in originals]
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert sum(r["messages"][-1]["content"] != o["messages"][-1]["content"] for r, o in zip(rows, originals)) >= 28
    # Held-out chats unchanged: the original references.
    assert read_jsonl(out / VALIDATION_NAME) == raw.eval.to_list()

    teacher = AutoModelForCausalLM.from_pretrained(tmp / "teacher").eval()
    tokenizer = byte_tokenizer()
    for i in range(len(rows)):  # each alone, as the teacher's own generate() writes it greedily
        prompt = tokenizer.apply_chat_template(rows[i]["messages"][:-1], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert rows[i]["messages"][-1]["content"] == greedy(teacher, ids, 96 - len(ids)), i

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["teacher"]["name"] == str(tmp / "teacher")
    from hfdistill.cache import weights_hash

    assert manifest["teacher"]["weights_sha256"] == weights_hash(teacher)
    assert manifest["generation"]["strategy"] == "greedy" and manifest["generation"]["stop_token_ids"] == [EOS]
    assert manifest["data"]["format"] == "chat" and manifest["data"]["num_examples"] == 32
    assert [(s["rows"], s["start"], s["stop"]) for s in manifest["shards"]] == [(12, 0, 12), (12, 12, 24), (8, 24, 32)]
    assert manifest["data"]["validation"]["rows"] == 8 and manifest["hfdistill_version"]
    assert "teacher completions:" in printed and "32 training examples" in printed


def test_printed_data_spec_loads_and_trains(chat_run, capsys):
    tmp, out, printed = chat_run
    spec_line = next(line for line in printed.splitlines() if line.strip().startswith("data: {"))
    import yaml

    spec = yaml.safe_load(spec_line.strip()[len("data: "):])
    assert spec == {"name": "json", "data_files": {"train": f"{out}/train-*.jsonl",
                                                   "validation": f"{out}/{VALIDATION_NAME}"}, "max_length": 96}
    raw = load_raw_data(DataSpec(**spec), "text-generation")
    assert raw.lm_format == "chat" and (len(raw.train), len(raw.eval)) == (32, 8)
    command = next(line for line in printed.splitlines() if line.startswith("or: hfdistill train"))
    args = shlex.split(command[len("or: hfdistill "):])
    assert args[:2] == ["train", RECIPE] and args[2] == "--data"
    assert main([*args, *tiny(tmp, "--student.baseline", "false", "--training.max_steps", "2",
                              "--training.save_strategy", "no", "--training.logging_steps", "1", data=False)]) == 0
    assert "student (distilled)" in capsys.readouterr().out
    assert (tmp / "student" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------ resume, other settings
def test_rerun_writes_only_missing_shards_and_refuses_other_settings(chat_run, capsys):
    tmp, out, _ = chat_run
    shards = sorted(out.glob("train-*.jsonl"))

    def stamp(path):
        stat = path.stat()
        return stat.st_ino, stat.st_mtime_ns

    before = {p.name: stamp(p) for p in [*shards, out / VALIDATION_NAME, out / MANIFEST_NAME]}
    middle = shards[1].read_text()
    shards[1].unlink()
    args = ["generate", RECIPE, "--output", str(out), "--shard_size", "12", "--batch_size", "8", *tiny(tmp)]
    assert main(args) == 0
    capsys.readouterr()
    after = {p.name: stamp(p) for p in [*shards, out / VALIDATION_NAME]}
    assert after[shards[0].name] == before[shards[0].name] and after[shards[2].name] == before[shards[2].name]
    assert after[VALIDATION_NAME] == before[VALIDATION_NAME]
    assert shards[1].read_text() == middle  # greedy: the same completions again
    last = shards[2].read_text()
    shards[2].write_text(last.replace('"assistant"', '"assistant" '))  # the same rows, not the listed sha256
    assert main(args) == 0
    assert shards[2].read_text() == last and stamp(shards[0]) == before[shards[0].name]

    again = {p.name: stamp(p) for p in out.iterdir()}
    assert main([*args, "--max_new_tokens", "5"]) == 2
    assert "generation.max_new_tokens: null in the folder, 5 now" in error_of(capsys.readouterr().err)
    assert main([*args, "--do_sample", "--seed", "3"]) == 2
    assert "generation.do_sample: false in the folder, true now" in error_of(capsys.readouterr().err)
    tiny_teacher(tmp / "other-teacher", seed=1)
    assert main([*args, "--teacher.name", str(tmp / "other-teacher")]) == 2
    assert "teacher.weights_sha256" in error_of(capsys.readouterr().err)
    assert {p.name: stamp(p) for p in out.iterdir()} == again  # nothing written


# ------------------------------------------------------------------------------ prompt/completion files
def test_prompt_completion_json_file_keeps_other_columns(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_teacher(tmp_path / "teacher", n_positions=128)
    rows = [{"id": i, "question": f"Q{i}: what is {i} plus {i}?", "answer": f" {2 * i}", "source": "sums"}
            for i in range(24)]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["--data", json.dumps({"name": "json", "data_files": {"train": str(data)}, "validation_fraction": 0.25,
                                       "prompt_column": "question", "completion_column": "answer", "max_length": 64})]
    out = tmp_path / "out"
    assert main(["generate", RECIPE, "--output", str(out), *tiny(tmp_path, *overrides, data=False)]) == 0
    assert "data: {name: json" in capsys.readouterr().out
    written = read_jsonl(out / "train-00000-of-00001.jsonl")
    assert len(written) == 18 and all(set(r) == {"prompt", "completion", "id", "source"} for r in written)
    by_id = {r["id"]: r for r in rows}
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    for row in written[:3]:
        assert row["prompt"] == by_id[row["id"]]["question"] and row["source"] == "sums"
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert row["completion"] == greedy(teacher, ids, 64 - len(ids))  # max_length minus the prompt
    validation = read_jsonl(out / VALIDATION_NAME)
    assert len(validation) == 6 and all(r["completion"] == by_id[r["id"]]["answer"] for r in validation)
    raw = load_raw_data(DataSpec(**json.loads((out / MANIFEST_NAME).read_text())["train_with"]["data"]),
                        "text-generation")
    assert raw.lm_format == "prompt_completion" and len(raw.eval) == 6


def test_stops_at_the_end_of_text_and_empty_completions_are_counted(tmp_path):
    model, tokenizer = tiny_teacher(tmp_path / "teacher", stop_at=20)
    rows = [{"prompt": "x" * n, "completion": "y"} for n in (3, 8, 15, 19, 25, 30)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate_completions(model, tokenizer, rows, rows[:2], tmp_path / "out", fmt="prompt_completion",
                                   max_length=64, progress=False)
    assert not [w for w in caught if "token limit" in str(w.message)]  # every one stopped before its limit
    written = read_jsonl(Path(out) / "train-00000-of-00001.jsonl")
    for row in written:  # 20 - P tokens at most, then the end-of-text token
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert row["completion"] == greedy(model, ids, 64)
    assert written[-1]["completion"] == written[-2]["completion"] == ""
    manifest = json.loads((Path(out) / MANIFEST_NAME).read_text())
    assert manifest["data"]["empty_completions"] == sum(not r["completion"].strip() for r in written) >= 2
    assert any(r["completion"] for r in written)


@pytest.mark.parametrize("args, expected", [
    ((30, "chat", 96, None, 96), (66, None)),            # max_length minus the prompt
    ((50, "prompt_completion", 64, None, 128), (32, None)),  # at least half of max_length, as training keeps
    ((120, "prompt_completion", 64, None, 128), (32, 96)),   # beyond the positions: the prompt loses its start
    ((100, "chat", 96, 1000, 1024), (924, None)),        # --max_new_tokens within the positions, prompt whole
    ((10, "chat", 2048, None, 4096), (512, None)),       # the default's cap
])
def test_token_limits(args, expected):
    assert _limit(*args) == expected


def test_prompts_are_the_training_tokens_and_stops_come_from_the_template():
    tokenizer = byte_tokenizer()
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "Food?"}, {"role": "assistant", "content": "Pizza."}]}
    ids, learnt = LMEncoder(tokenizer, "chat", max_length=None).encode(chat)
    last = max(i for i, keep in enumerate(learnt) if not keep)  # the last assistant turn is learnt from here on
    assert _Prompts(tokenizer, "chat").ids(chat) == ids[:last + 1]
    assert _Prompts(tokenizer, "chat").ids({"messages": [{"role": "user", "content": "no answer"}]}) is None
    assert stop_tokens(torch.nn.Identity(), tokenizer, "chat") == ([EOS], None)
    chatml = byte_tokenizer()
    chatml.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert stop_tokens(torch.nn.Identity(), chatml, "chat") == ([EOS], "<|im_end|>")  # not a token here: a stop string


# ------------------------------------------------------------------------------ processes, sampling
def test_two_ranks_write_disjoint_shards_and_sampling_is_seeded_per_shard(tmp_path):
    model, tokenizer = tiny_teacher(tmp_path / "teacher")
    rows = [{"prompt": f"prompt number {i}:", "completion": "c"} for i in range(12)]
    options = dict(fmt="prompt_completion", max_length=40, shard_size=4, progress=False, do_sample=True, seed=5,
                   temperature=0.8, batch_size=4)
    single = Path(generate_completions(model, tokenizer, rows, rows[:2], tmp_path / "one", **options))
    split = tmp_path / "two"
    generate_completions(model, tokenizer, rows, rows[:2], split, rank=1, world_size=2, **options)
    assert sorted(p.name for p in split.glob("train-*.jsonl")) == ["train-00001-of-00003.jsonl"]
    assert not (split / MANIFEST_NAME).exists() and not (split / VALIDATION_NAME).exists()
    generate_completions(model, tokenizer, rows, rows[:2], split, rank=0, world_size=2, wait_timeout=5, **options)
    for name in ("train-00000-of-00003.jsonl", "train-00001-of-00003.jsonl", "train-00002-of-00003.jsonl",
                 VALIDATION_NAME):
        assert (split / name).read_text() == (single / name).read_text(), name
    other = generate_completions(model, tokenizer, rows, rows[:2], tmp_path / "seed6", **{**options, "seed": 6})
    assert (Path(other) / "train-00000-of-00003.jsonl").read_text() != (single / "train-00000-of-00003.jsonl").read_text()
    manifest = json.loads((split / MANIFEST_NAME).read_text())
    assert manifest["generation"]["temperature"] == 0.8 and manifest["generation"]["seed"] == 5


def test_check_data_spec_refuses_what_does_not_load_as_written(tmp_path):
    from hfdistill.errors import DistillationError

    (tmp_path / "train-00000-of-00001.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    (tmp_path / VALIDATION_NAME).write_text(json.dumps({"prompt": "c", "completion": "d"}) + "\n")
    spec = {"name": "json", "data_files": {"train": f"{tmp_path}/train-*.jsonl", "validation": f"{tmp_path}/{VALIDATION_NAME}"}}
    check_data_spec(spec, "prompt_completion", 1, 1)
    with pytest.raises(DistillationError, match="loads as prompt_completion data with 1 training"):
        check_data_spec(spec, "chat", 1, 1)


# ------------------------------------------------------------------------------ bad input: exit 2, nothing written
@pytest.mark.parametrize("case, where", [
    ("task", "at task:"),
    ("text", "plain text, which has no prompt"),
    ("cache", "at teacher.cache:"),
    ("untrained", "at teacher.train_from: the teacher"),
    ("missing", "teacher"),
    ("temperature", "at --temperature: applies to sampling only"),
])
def test_bad_input_exits_2_with_one_paragraph_and_writes_nothing(tmp_path, capsys, case, where):
    tiny_teacher(tmp_path / "teacher")
    extra = {
        "task": ["--task", "text-classification"],
        "text": ["--data", json.dumps({"name": "json", "data_files": {"train": str(tmp_path / "plain.jsonl")}})],
        "cache": ["--teacher", json.dumps({"cache": str(tmp_path / "cache")})],
        "untrained": ["--teacher.name", str(tmp_path / "not-yet")],
        "missing": ["--teacher", json.dumps({"name": str(tmp_path / "nowhere")})],
        "temperature": ["--temperature", "0.7"],
    }[case]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(10)))
    out = tmp_path / "out"
    assert main(["generate", RECIPE, "--output", str(out), *tiny(tmp_path), *extra]) == 2
    assert where in error_of(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "student").exists()
