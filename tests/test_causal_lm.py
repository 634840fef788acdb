"""Language modelling (task: text-generation): data formats and their labels, packing, the loss and perplexity,
students made from a checkpoint's layers, and a run whose student generates through pipeline()."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
import yaml

import hfdistill
from hfdistill.data import DEFAULT_CHAT_TEMPLATE, LMEncoder, build_task_data, load_raw_data, same_tokenizer
from hfdistill.errors import RecipeError
from hfdistill.models import BYTES_TOKENIZER, LoadedModel, byte_tokenizer, load_model, pick_layers
from hfdistill.recipe import DataSpec, ModelSpec, Recipe
from hfdistill.tasks import get_task, perplexity, token_nll

REPO = Path(__file__).resolve().parents[1]
TINY_GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def fake_lm(tokenizer, name: str = "m", role: str = "student") -> LoadedModel:
    return LoadedModel(model=torch.nn.Identity(), role=role, name=name, num_labels=0, tokenizer=tokenizer)


def tiny_gpt2(tokenizer=None, seed: int = 0, **config):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tokenizer or byte_tokenizer()
    torch.manual_seed(seed)
    values = dict(TINY_GPT2, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=1,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    values.update(config)
    return GPT2LMHeadModel(GPT2Config(**values)).eval()


def lm_data(rows: dict, tokenizer=None, max_length: int = 64, teacher=None, **spec):
    """(raw, task data) of in-memory rows for text-generation, with the byte tokenizer by default."""
    raw = load_raw_data(DataSpec(name="python", validation_fraction=0.5, **spec), "text-generation",
                        dataset=datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                                      "validation": datasets.Dataset.from_dict(rows)}))
    tokenizer = tokenizer or byte_tokenizer()
    return raw, build_task_data(raw, "text-generation", fake_lm(tokenizer), teacher, max_length=max_length)


def learnt_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != -100])


# ------------------------------------------------------------------------------ the tokenizer built offline
def test_byte_tokenizer_round_trips_any_text_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = byte_tokenizer()
    text = "Héllo wörld! 你好 <|user|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and tokenizer.decode(ids) == text
    assert len(tokenizer) == 258 and tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"] and reloaded.chat_template == DEFAULT_CHAT_TEMPLATE
    assert same_tokenizer(reloaded, byte_tokenizer())


# ------------------------------------------------------------------------------ formats and labels
def test_plain_text_learns_every_token_but_the_first():
    raw, data = lm_data({"text": ["Hello world.", "Bye."]})
    assert raw.lm_format == "text" and raw.label_names == [] and raw.num_labels == 0
    tokenizer = byte_tokenizer()
    example = data.train[0]
    assert tokenizer.decode(example["input_ids"]) == "Hello world.<|endoftext|>"
    assert example["labels"][0] == -100 and example["labels"][1:] == example["input_ids"][1:]
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_prompt_completion_learns_the_completion_and_its_end_only():
    tokenizer = byte_tokenizer()
    raw, data = lm_data({"prompt": ["Q: hi?\nA:", "Q: 2+2?\nA:"], "completion": [" hello", " 4"]})
    assert raw.lm_format == "prompt_completion"
    example = data.train[0]
    assert tokenizer.decode(example["input_ids"]) == "Q: hi?\nA: hello<|endoftext|>"
    prompt_length = len("Q: hi?\nA:".encode())
    assert example["labels"][:prompt_length] == [-100] * prompt_length
    assert learnt_text(tokenizer, example) == " hello<|endoftext|>"
    # completion_only_loss: false learns the prompt too (not its first token: nothing predicts it)
    _, every = lm_data({"prompt": ["Q: hi?\nA:"], "completion": [" hello"]}, completion_only_loss=False)
    assert every.train[0]["labels"] == [-100] + every.train[0]["input_ids"][1:]


def test_chat_learns_the_assistant_turns_only_with_the_default_template():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Food?"},
            {"role": "assistant", "content": "Pizza."}]
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None  # a tokenizer without a template gets the documented default
    raw, data = lm_data({"messages": [chat]}, tokenizer=tokenizer, max_length=200)
    assert raw.lm_format == "chat" and tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    example = data.train[0]
    assert tokenizer.decode(example["input_ids"]) == (
        "<|system|>\nBe brief.<|endoftext|><|user|>\nHi<|endoftext|><|assistant|>\nHello!<|endoftext|>"
        "<|user|>\nFood?<|endoftext|><|assistant|>\nPizza.<|endoftext|>")
    # the learnt tokens: each assistant turn after its header (what follows the generation prompt)
    assert learnt_text(tokenizer, example) == "Hello!<|endoftext|>Pizza.<|endoftext|>"
    ids, labels = example["input_ids"], example["labels"]
    spans = [i for i, label in enumerate(labels) if label != -100]
    assert tokenizer.decode(ids[: spans[0]]).endswith("<|assistant|>\n")


def test_chat_with_the_tokenizers_own_template():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHATML
    chat = [{"role": "user", "content": "Are you sentient?"}, {"role": "assistant", "content": "Sort of."}]
    _, data = lm_data({"messages": [chat]}, tokenizer=tokenizer, max_length=200)
    example = data.train[0]
    assert tokenizer.decode(example["input_ids"]) == (
        "<|im_start|>user\nAre you sentient?<|im_end|>\n<|im_start|>assistant\nSort of.<|im_end|>\n")
    assert learnt_text(tokenizer, example) == "Sort of.<|im_end|>\n"
    assert tokenizer.chat_template == CHATML  # its own template is kept


def test_truncation_keeps_part_of_the_completion_and_drops_examples_with_nothing_to_learn():
    tokenizer = byte_tokenizer()
    encoder = LMEncoder(tokenizer, "prompt_completion", max_length=16)
    ids, learnt = encoder.encode({"prompt": "p" * 40, "completion": "c" * 40})
    assert len(ids) == 16 and sum(learnt) == 8  # half of max_length for the completion, the prompt's end kept
    assert tokenizer.decode(ids) == "p" * 8 + "c" * 8
    # a chat whose first turn fills max_length has no assistant token left: left out of the split
    long = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    _, data = lm_data({"messages": [long, short]}, max_length=32)
    assert len(data.train) == 1 and learnt_text(tokenizer, data.train[0]) == "ok<|endoftext|>"


def test_packing_concatenates_examples_into_blocks_with_their_labels(tmp_path):
    from tests_helpers import tiny_tokenizer

    tokenizer = byte_tokenizer()
    rows = {"prompt": [f"question {i}? " for i in range(12)], "completion": [f"answer {i}." for i in range(12)]}
    _, plain = lm_data(rows, max_length=128)  # no example is truncated; packing truncates none either
    _, packed = lm_data(rows, max_length=16, packing=True)
    stream = [t for e in plain.train for t in e["input_ids"]]
    labels = [t for e in plain.train for t in e["labels"]]
    blocks = [packed.train[i] for i in range(len(packed.train))]
    assert all(len(b["input_ids"]) == 16 for b in blocks[:-1]) and len(blocks[-1]["input_ids"]) <= 16
    assert [t for b in blocks for t in b["input_ids"]] == stream  # nothing lost, nothing truncated
    for i, block in enumerate(blocks):  # each token keeps its label; the first of a block is not learnt
        assert block["labels"][0] == -100
        assert block["labels"][1:] == labels[i * 16 + 1: i * 16 + len(block["labels"])]
    assert "answer 3.<|endoftext|>question 4? answer 4." in tokenizer.decode(stream)
    other = fake_lm(tiny_tokenizer(tmp_path / "other", ["question", "answer"]), role="teacher")
    with pytest.raises(RecipeError, match="data.packing"):  # a teacher with another tokenizer cannot follow blocks
        lm_data(rows, max_length=16, packing=True, teacher=other)


def test_a_teacher_with_its_own_tokenizer_gets_teacher_fields(tmp_path):
    from tests_helpers import tiny_tokenizer

    tokenizer = byte_tokenizer()

    bert = tiny_tokenizer(tmp_path / "bert", ["hi", "hello", "there"])
    rows = {"prompt": ["hi"], "completion": [" hello there"]}
    _, data = lm_data(rows, tokenizer=tokenizer, teacher=fake_lm(bert, "t", "teacher"))
    example = data.train[0]
    assert {"teacher_input_ids", "teacher_attention_mask", "teacher_labels"} <= set(example)
    # its own leading special tokens ([CLS]) and no end-of-text token (it has none)
    assert bert.decode(example["teacher_input_ids"]) == "[CLS] hi hello there"
    assert bert.decode([t for t in example["teacher_labels"] if t != -100]) == "hello there"
    batch = data.collator([example, data.train[0]])
    assert data.teacher_inputs(batch).keys() == {"input_ids", "attention_mask", "labels"}
    # the same tokenizer for both: one tokenisation only
    _, same = lm_data(rows, tokenizer=tokenizer, teacher=fake_lm(byte_tokenizer(), "t", "teacher"))
    assert not any(k.startswith("teacher_") for k in same.train[0]) and same.teacher_inputs is None


# ------------------------------------------------------------------------------ the loss and the metric
def test_the_models_loss_counts_exactly_the_completion_tokens():
    tokenizer = byte_tokenizer()
    rows = {"prompt": ["Q: hi?\nA:", "Q: what is two and two?\nA:", "Q:\nA:"],
            "completion": [" hello there", " 4", " a rather longer answer than the others"]}
    _, data = lm_data(rows, max_length=64)
    batch = data.collator([data.train[i] for i in range(3)])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding (on the right) is not learnt
    assert (batch["attention_mask"][:, 0] == 1).all() and (batch["input_ids"][batch["attention_mask"] == 0] == 1).all()
    completion_tokens = (batch["labels"] != -100).sum()
    assert int(completion_tokens) == sum(len(c.encode()) + 1 for c in rows["completion"])  # + the end-of-text token
    assert data.stats["train_learnt_tokens"] == int(completion_tokens)
    assert data.stats["train_tokens"] == int(batch["attention_mask"].sum()) and data.stats["format"] == "prompt_completion"
    model = tiny_gpt2(tokenizer)
    with torch.no_grad():
        output = model(**batch)
    # by hand: position t predicts token t+1; only the tokens whose label is not -100
    log_probs = F.log_softmax(output.logits[:, :-1].float(), dim=-1)
    token_log_probs = log_probs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    counted = batch["labels"][:, 1:] != -100
    assert int(counted.sum()) == int(completion_tokens)
    assert torch.allclose(output.loss, -token_log_probs[counted].mean(), atol=1e-6)
    assert torch.allclose(get_task("text-generation").loss(output.logits, batch["labels"]), output.loss, atol=1e-6)

    # perplexity: exp of the token-weighted mean over the eval set, from logits padded across batches with -100
    # (as the Trainer gathers them) or from token_nll (preprocess_logits_for_metrics)
    from transformers import EvalPrediction
    from transformers.trainer_pt_utils import nested_concat

    first = data.collator([data.train[0]])
    second = data.collator([data.train[1], data.train[2]])
    with torch.no_grad():
        logits = [model(**b).logits for b in (first, second)]
    padded_logits = nested_concat(logits[0], logits[1], padding_index=-100)
    padded_labels = nested_concat(first["labels"], second["labels"], padding_index=-100)
    expected = float(torch.exp(-token_log_probs[counted].double().mean()))
    value = perplexity(EvalPrediction(predictions=padded_logits.numpy(), label_ids=padded_labels.numpy()))
    assert value["perplexity"] == pytest.approx(expected, rel=1e-5)
    nll = nested_concat(token_nll(logits[0], first["labels"]), token_nll(logits[1], second["labels"]), padding_index=-100)
    value = perplexity(EvalPrediction(predictions=nll.numpy(), label_ids=padded_labels.numpy()))
    assert value["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert not get_task("text-generation").greater_is_better and get_task("text-classification").greater_is_better


# ------------------------------------------------------------------------------ sources
def test_chatterbot_corpus_as_chats_of_consecutive_statements():
    raw = load_raw_data(DataSpec(name="chatterbot-corpus", options={"topics": ["greetings"]}, validation_fraction=0.2),
                        "text-generation")
    assert raw.lm_format == "chat" and raw.train.column_names == ["messages"]
    chats = list(raw.train["messages"]) + list(raw.eval["messages"])
    assert all([m["role"] for m in chat] == ["user", "assistant"] for chat in chats)
    pairs = {(c[0]["content"], c[1]["content"]) for c in chats}
    assert ("Hello", "Hi") in pairs and len(pairs) == len(chats)  # consecutive statements, no repeats
    # and for classification the same source still gives topics
    classes = load_raw_data(DataSpec(name="chatterbot-corpus", options={"topics": ["greetings", "food"]}),
                            "text-classification")
    assert classes.label_names == ["greetings", "food"]


def test_csv_and_json_files(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("question,answer\nhi?,hello\nbye?,see you\nok?,yes\nno?,fine\n", encoding="utf-8")
    raw = load_raw_data(DataSpec(name="csv", data_files=str(csv), prompt_column="question", completion_column="answer",
                                 validation_fraction=0.25), "text-generation")
    assert raw.lm_format == "prompt_completion" and set(raw.train.column_names) == {"prompt", "completion"}
    lines = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines.write_text("\n".join(json.dumps({"messages": chat, "id": i}) for i in range(4)), encoding="utf-8")
    raw = load_raw_data(DataSpec(name="json", data_files=str(lines), validation_fraction=0.25), "text-generation")
    assert raw.lm_format == "chat" and raw.train[0]["messages"] == chat
    text = tmp_path / "text.csv"
    text.write_text("body\nsome text\nmore text\n\nlast\n", encoding="utf-8")
    raw = load_raw_data(DataSpec(name="csv", data_files=str(text), text_column="body", validation_fraction=0.34),
                        "text-generation")
    assert raw.lm_format == "text" and len(raw.train) + len(raw.eval) == 3  # the empty row is left out
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("a,b\nx,y\nz,w\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="data.text_column"):
        load_raw_data(DataSpec(name="csv", data_files=str(unknown), validation_fraction=0.5), "text-generation")
    with pytest.raises(RecipeError, match="data.messages_column"):
        load_raw_data(DataSpec(name="csv", data_files=str(csv), messages_column="question", validation_fraction=0.25),
                      "text-generation")


def test_language_modelling_fields_are_refused_for_other_tasks():
    with pytest.raises(RecipeError, match="data.packing"):
        Recipe.from_dict({"task": "text-classification", "data": {"name": "csv", "packing": True}})
    with pytest.raises(RecipeError, match="data.completion_only_loss"):
        Recipe.from_dict({"task": "image-classification", "data": {"name": "sklearn-digits", "completion_only_loss": False}})
    Recipe.from_dict({"task": "text-generation", "data": {"name": "chatterbot-corpus", "packing": True}})
    with pytest.raises(RecipeError, match="student.init_layers"):
        Recipe.from_dict({"task": "text-generation", "student": {"name": "gpt2", "init_layers": "every"}})
    with pytest.raises(RecipeError, match="student.init_layers"):
        Recipe.from_dict({"task": "text-generation", "student": {"name": "x", "init_layers": [0, -1]}})
    with pytest.raises(RecipeError, match="student.init_layers"):
        Recipe.from_dict({"task": "text-generation", "student": {"name": "x", "pretrained": False, "init_layers": "first"}})


# ------------------------------------------------------------------------------ models
def test_fresh_causal_lms_fit_their_tokenizer():
    for name, config in (("gpt2", TINY_GPT2),
                         ("llama", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128})):
        loaded = load_model(ModelSpec(name=name, config=config, tokenizer=BYTES_TOKENIZER), "student", "text-generation",
                            0, {})
        config = loaded.model.config
        assert type(loaded.model).__name__.endswith(("LMHeadModel", "ForCausalLM"))
        assert (config.vocab_size, config.eos_token_id, config.pad_token_id) == (258, 0, 1) and loaded.num_labels == 0
        assert loaded.tokenizer is not None and loaded.id2label is None
    with pytest.raises(RecipeError, match="student.config"):
        load_model(ModelSpec(name="gpt2", config=dict(TINY_GPT2, vocab_size=100), tokenizer=BYTES_TOKENIZER), "student",
                   "text-generation")
    with pytest.raises(RecipeError, match="data.max_length"):
        raw = load_raw_data(DataSpec(name="chatterbot-corpus", options={"topics": ["greetings"]}), "text-generation")
        student = load_model(ModelSpec(name="gpt2", config=TINY_GPT2, tokenizer=BYTES_TOKENIZER), "student",
                             "text-generation")
        build_task_data(raw, "text-generation", student, max_length=512)


def test_student_from_every_kth_layer_of_a_checkpoint(tmp_path):
    teacher = tiny_gpt2(n_layer=6, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    byte_tokenizer().save_pretrained(tmp_path / "teacher")
    folder = str(tmp_path / "teacher")
    student = load_model(ModelSpec(name=folder, config={"num_hidden_layers": 3}, init_layers="uniform"), "student",
                         "text-generation")
    assert student.model.config.n_layer == 3 and student.tokenizer is not None
    s, t = student.model.state_dict(), teacher.state_dict()
    for i in range(3):  # k = 6 // 3 = 2: student layer i is teacher layer 2i
        for key in [k for k in s if k.startswith(f"transformer.h.{i}.")]:
            assert torch.equal(s[key], t[key.replace(f"h.{i}.", f"h.{2 * i}.")]), key
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert torch.equal(s[key], t[key]), key
    explicit = load_model(ModelSpec(name=folder, config={"num_hidden_layers": 2}, init_layers=[1, 5]), "student",
                          "text-generation").model.state_dict()
    assert torch.equal(explicit["transformer.h.1.mlp.c_fc.weight"], t["transformer.h.5.mlp.c_fc.weight"])
    assert pick_layers("uniform", 12, 6) == [0, 2, 4, 6, 8, 10] and pick_layers("first", 12, 3) == [0, 1, 2]
    assert pick_layers("uniform", 7, 3) == [0, 2, 4]
    with pytest.raises(RecipeError, match="student.init_layers"):
        load_model(ModelSpec(name=folder, config={"num_hidden_layers": 2}, init_layers=[0, 6]), "student",
                   "text-generation")
    with pytest.raises(RecipeError, match="student.init_layers"):
        load_model(ModelSpec(name=folder, config={"num_hidden_layers": 2, "n_embd": 16}, init_layers="first"), "student",
                   "text-generation")


# ------------------------------------------------------------------------------ end to end
def tiny_lm_recipe(tmp_path, terms=None) -> dict:
    tiny = dict(TINY_GPT2, n_positions=96)
    return {
        "task": "text-generation",
        "teacher": {"name": str(tmp_path / "teacher"),
                    "train_from": {"name": "gpt2", "config": tiny, "tokenizer": BYTES_TOKENIZER},
                    "train_args": {"max_steps": 3}},
        "student": {"name": "gpt2", "config": dict(tiny, n_layer=1), "tokenizer": BYTES_TOKENIZER, "baseline": True},
        "data": {"name": "chatterbot-corpus", "options": {"topics": ["greetings", "food"]}, "max_length": 96,
                 "max_train_samples": 48, "max_eval_samples": 16, "validation_fraction": 0.2},
        "terms": terms if terms is not None else [{"loss": "forward_kl", "weight": 0.5}],
        "training": {"output_dir": str(tmp_path / "student"), "max_steps": 3, "per_device_train_batch_size": 8,
                     # eval batches of different lengths (the teacher's evaluation pads them as the Trainer does)
                     "per_device_eval_batch_size": 5, "learning_rate": 0.003, "save_strategy": "no",
                     "logging_steps": 1, "use_cpu": True},
    }


GENERATE = """
import json, sys
from transformers import pipeline
pipe = pipeline("text-generation", model=sys.argv[1])
text = pipe("Hello", max_new_tokens=6, do_sample=False)[0]["generated_text"]
chat = pipe([{"role": "user", "content": "Hi"}], max_new_tokens=6, do_sample=False)[0]["generated_text"]
print(json.dumps({"text": text, "chat": chat}))
"""


def test_run_distils_a_causal_lm_whose_student_generates_in_a_fresh_process(tmp_path):
    from hfdistill import losses

    terms = [{"loss": "forward_kl", "weight": 0.5}] if "forward_kl" in losses.available() else [{"loss": "kd", "weight": 0.5}]
    result = hfdistill.run(Recipe.from_dict(tiny_lm_recipe(tmp_path, terms)), print_summary=False)
    assert [job.label for job in result.jobs] == ["teacher", "student (no teacher)", "student (distilled)"]
    metrics = result.metrics
    assert metrics["eval_perplexity"] > 1 and metrics["eval_teacher_perplexity"] > 1
    assert "perplexity" in result.summary
    assert f"generator = pipeline('text-generation', model={result.output_dir!r})" in result.summary
    student = Path(result.output_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (student / name).is_file(), name
    assert json.loads((student / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert yaml.safe_load((student / "distill_recipe.yaml").read_text())["task"] == "text-generation"
    card = (student / "README.md").read_text()
    assert "chat training data is" in card and "learnt tokens" in card and "perplexity" in card
    assert '([{"role": "user", "content": "What is your favorite food?"}], max_new_tokens=40)' in card  # chat snippet
    assert "huggingface.co/GPT2LMHeadModel" not in card and "`GPT2LMHeadModel`" in card  # built from a config
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", GENERATE, str(student)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    generated = json.loads(done.stdout.strip().splitlines()[-1])
    assert generated["text"].startswith("Hello") and len(generated["text"]) > len("Hello")
    assert generated["chat"][-1]["role"] == "assistant"


@pytest.mark.slow
def test_chatterbot_causal_lm_recipe(tmp_path):
    """The shipped recipe as it is (a few minutes on 2 CPU cores): the student beats nothing in particular but
    trains, saves and generates."""
    recipe = REPO / "recipes" / "chatterbot_causal_lm.yaml"
    overrides = {"training.output_dir": str(tmp_path / "student"), "teacher.name": str(tmp_path / "teacher")}
    result = hfdistill.run(str(recipe), overrides=overrides, print_summary=False)
    rows = {row.role: row for row in result.plan.rows}
    assert rows["teacher"].metrics["perplexity"] < rows["student (no teacher)"].metrics["perplexity"] < 258
    from transformers import pipeline

    chat = pipeline("text-generation", model=result.output_dir)
    reply = chat([{"role": "user", "content": "What is your favorite food?"}], max_new_tokens=20, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def test_check_describes_language_modelling_data_in_tokens(tmp_path):
    from hfdistill.run import check

    report = check(Recipe.from_dict(tiny_lm_recipe(tmp_path)))
    data_line = next(line for line in report.text.splitlines() if line.startswith("data:"))
    assert "chat data" in data_line and "training tokens learnt per epoch" in data_line and "labels" not in data_line


def test_different_vocabularies_are_refused_before_training_unless_uld(tmp_path):
    from hfdistill.errors import RecipeError
    from hfdistill.run import plan_run

    spec = tiny_lm_recipe(tmp_path)
    tiny = dict(TINY_GPT2, n_positions=96)
    # a teacher whose output vocabulary is larger than the byte tokenizer's 258 tokens
    spec["teacher"] = {"name": "gpt2", "config": dict(tiny, vocab_size=300), "tokenizer": BYTES_TOKENIZER}
    spec["student"].pop("baseline")
    with pytest.raises(RecipeError) as refused:
        plan_run(Recipe.from_dict(spec))
    message = str(refused.value)
    assert "terms[0].loss" in message and "forward_kl" in message and "uld" in message
    assert "output vocabulary 258" in message and "output vocabulary 300" in message
    spec["terms"] = [{"loss": "uld", "weight": 0.5}]
    plan = plan_run(Recipe.from_dict(spec))  # ULD pairs any two vocabularies
    assert plan.final.recipe.terms[0].loss == "uld"


def test_best_model_by_perplexity_keeps_the_lowest():
    """transformers takes every metric but `*loss` as higher-is-better; a recipe that selects the best checkpoint
    by perplexity gets greater_is_better false unless it says otherwise."""
    from hfdistill.run import make_args

    best = dict(output_dir="unused", eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True)
    assert make_args({**best, "metric_for_best_model": "perplexity"}).greater_is_better is False
    assert make_args({**best, "metric_for_best_model": "eval_perplexity"}).greater_is_better is False
    assert make_args({**best, "metric_for_best_model": "perplexity", "greater_is_better": True}).greater_is_better
    assert make_args({**best, "metric_for_best_model": "accuracy"}).greater_is_better
