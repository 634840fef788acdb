"""The `hfdistill` command line: end to end on digits, overrides, and every bad input (exit code 2)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hfdistill import cli
from hfdistill.cli import main
from hfdistill.recipe import RecipeError

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(tmp_path, **changes) -> dict:
    """A recipe that trains in seconds: tiny timm models on 16x16 digits."""
    recipe = {
        "task": "image-classification",
        "teacher": {"name": "timm:test_resnet", "pretrained": False},
        "student": {"name": "timm:test_efficientnet"},
        "data": {"name": "sklearn-digits", "image_size": 16, "max_train_samples": 128, "max_eval_samples": 64},
        "terms": [{"loss": "kd", "weight": 0.5, "params": {"temperature": 4}}],
        "training": {
            "output_dir": str(tmp_path / "out" / "student"),
            "max_steps": 4,
            "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 32,
            "learning_rate": 0.001,
            "logging_steps": 2,
            "save_strategy": "no",
            "use_cpu": True,
        },
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            recipe[section][name] = value
        elif value is None:
            recipe.pop(section, None)
        else:
            recipe[section] = value
    return recipe


def write(tmp_path, recipe: dict, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------ end to end
# (The overrides' own tests are in test_recipe.py, with the recipe types they edit.)
def test_train_end_to_end_with_teacher_chain_and_baseline(tmp_path, capsys):
    """Teacher trained first (train_from), baseline and distilled student, summary, pipeline() loads it."""
    teacher_dir = tmp_path / "out" / "teacher"
    recipe = tiny_recipe(
        tmp_path,
        teacher={"name": str(teacher_dir), "train_from": {"name": "timm:test_resnet"}, "train_args": {"max_steps": 3}},
        student__baseline=True,
    )
    path = write(tmp_path, recipe)
    assert main(["train", path]) == 0
    out = capsys.readouterr().out
    for expected in ("teacher", "student (no teacher)", "student (distilled)", "latency b=1", "accuracy",
                     "distillation vs. no teacher", "pipeline('image-classification'"):
        assert expected in out, expected
    student_dir = Path(recipe["training"]["output_dir"])
    assert (student_dir / "config.json").is_file() and (student_dir / "model.safetensors").is_file()
    assert (teacher_dir / "config.json").is_file()
    assert (tmp_path / "out" / "student-baseline" / "config.json").is_file()
    saved = yaml.safe_load((student_dir / cli.RECIPE_FILE_NAME).read_text())
    assert saved["terms"][0]["loss"] == "kd"

    import numpy as np
    from PIL import Image
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(student_dir))
    predictions = classifier(Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype("uint8")))
    assert predictions and {p["label"] for p in predictions} <= {str(i) for i in range(10)}

    # A second run reuses the saved teacher rather than training it again (it replaces the earlier result only
    # when told to).
    assert main(["train", path, "--student.baseline", "false"]) == 2
    assert "earlier result" in " ".join(capsys.readouterr().err.split())
    assert main(["train", path, "--student.baseline", "false", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "==> training teacher" not in out and "student (distilled)" in out


def test_train_without_teacher_fine_tunes(tmp_path, capsys):
    path = write(tmp_path, tiny_recipe(tmp_path, teacher=None, terms=None))
    assert main(["train", path]) == 0
    out = capsys.readouterr().out
    table = out.split("Summary")[1].splitlines()
    assert any(line.startswith("student ") for line in table)
    assert not any(line.startswith(("teacher", "student (")) for line in table)


def test_ctrl_c_keeps_checkpoint_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from hfdistill.trainer import DistillationTrainer

    original = DistillationTrainer.training_step
    calls = {"n": 0}

    def interrupted_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "training_step", interrupted_step)
    recipe = tiny_recipe(tmp_path)
    recipe["training"].update(max_steps=8, save_strategy="steps", save_steps=2)
    assert main(["train", write(tmp_path, recipe)]) == 130
    err = capsys.readouterr().err
    checkpoint = Path(recipe["training"]["output_dir"]) / "checkpoint-2"
    assert f"--training.resume_from_checkpoint {checkpoint}" in err
    assert (checkpoint / "model.safetensors").is_file()


# ------------------------------------------------------------------------------ bad input
def _bad_recipes(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("foo,bar\n1,2\n3,4\n5,6\n7,8\n", encoding="utf-8")
    return {
        "unknown key": (tiny_recipe(tmp_path, studnet={"name": "timm:test_resnet"}), "studnet"),
        "unknown model": (tiny_recipe(tmp_path, student__name="timm:not_a_model"), "student.name"),
        "hub id offline": (tiny_recipe(tmp_path, teacher={"name": "google/vit-base-patch16-224"}), "HF_HUB_OFFLINE"),
        "timm hub offline": (tiny_recipe(tmp_path, teacher={"name": "hf-hub:timm/resnet18.a1_in1k"}), "HF_HUB_OFFLINE"),
        "missing columns": (tiny_recipe(tmp_path, data={"name": "csv", "data_files": str(csv)}), "data.image_column"),
        "label count": (tiny_recipe(tmp_path, teacher={"name": "timm:test_resnet", "pretrained": False, "num_classes": 5}),
                        "teacher.num_classes"),
        "student label count": (tiny_recipe(tmp_path, student__num_classes=3), "student.num_classes"),
        "unknown loss": (tiny_recipe(tmp_path, terms=[{"loss": "kdd"}]), "did you mean 'kd'"),
        "wrong tap": (tiny_recipe(tmp_path, terms=[{"loss": "fitnet", "student": "layer9", "teacher": "layer3"}]), "layer9"),
        "terms without teacher": (tiny_recipe(tmp_path, teacher=None), "teacher"),
        "bad training arg": (tiny_recipe(tmp_path, training={"output_dir": str(tmp_path / "out" / "student"),
                                                             "learning_rat": 1}), "learning_rate"),
    }


@pytest.mark.parametrize(
    "case",
    ["unknown key", "unknown model", "hub id offline", "timm hub offline", "missing columns", "label count",
     "student label count", "unknown loss", "wrong tap", "terms without teacher", "bad training arg"],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case):
    recipe, expected = _bad_recipes(tmp_path)[case]
    assert main(["train", write(tmp_path, recipe)]) == 2
    err = capsys.readouterr().err
    assert "hfdistill: error:" in err and expected in err.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_missing_and_malformed_recipe_files(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n", encoding="utf-8")
    assert main(["train", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_override_for_missing_key_exits_2(tmp_path, capsys):
    path = write(tmp_path, tiny_recipe(tmp_path))
    assert main(["train", path, "--training.no_such_arg", "1"]) == 2
    assert "training.no_such_arg" in capsys.readouterr().err
    assert main(["train", path, "--student.colour", "red"]) == 2
    assert "student.colour" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ losses
def test_losses_command_lists_every_method(capsys):
    from hfdistill import losses

    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in losses.available())
    assert main(["losses", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| name | description | paper | reads | trains extra modules |")
    assert len(table.strip().splitlines()) == len(losses.available()) + 2


def test_real_entry_point_in_a_subprocess(tmp_path):
    """`python -m hfdistill` (what `accelerate launch -m hfdistill` runs): one process, as importing takes ~15 s."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "hfdistill", "check", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


def reviews(tmp_path) -> None:
    """Two tokenizers over the same words (`tok_s`, `tok_t`) and `reviews.csv`: 48 short reviews, neg / pos."""
    from tests_helpers import tiny_tokenizer

    words = ["good", "bad", "movie", "film", "great", "awful", "plot", "actor"]
    tiny_tokenizer(tmp_path / "tok_s", words)
    tiny_tokenizer(tmp_path / "tok_t", list(reversed(words)) + ["extra"])
    rows = [f"{a} {b},{'pos' if a in ('good', 'great') else 'neg'}"
            for a in ("good", "bad", "great", "awful") for b in ("movie", "film", "plot", "actor")]
    (tmp_path / "reviews.csv").write_text("\n".join(["text,label"] + rows * 3) + "\n", encoding="utf-8")


def test_text_pair_with_different_tokenizers_end_to_end(tmp_path, capsys):
    """A config-built BERT teacher and student with their own tokenizers, on a csv file; KD + hidden + attention."""
    from tests_helpers import TINY_BERT

    reviews(tmp_path)
    recipe = {
        "task": "text-classification",
        "teacher": {"name": "bert", "config": dict(TINY_BERT, num_hidden_layers=4, vocab_size=32),
                    "tokenizer": str(tmp_path / "tok_t"), "pretrained": False},
        "student": {"name": "bert", "config": dict(TINY_BERT, vocab_size=32), "tokenizer": str(tmp_path / "tok_s")},
        "data": {"name": "csv", "data_files": str(tmp_path / "reviews.csv"), "max_length": 16},
        "terms": [
            {"loss": "kd", "weight": 0.5},
            {"loss": "hidden_mse", "student": "hidden_states", "teacher": "hidden_states", "params": {"layer_map": "uniform"}},
            {"loss": "attention_kl", "student": "attentions", "teacher": "attentions", "params": {"layer_map": "last"}},
        ],
        "training": {"output_dir": str(tmp_path / "out" / "student"), "max_steps": 3, "per_device_train_batch_size": 8,
                     "save_strategy": "no", "use_cpu": True, "report_to": "none"},
    }
    assert main(["train", write(tmp_path, recipe)]) == 0
    out = capsys.readouterr().out
    assert "student (distilled)" in out and "pipeline('text-classification'" in out
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(tmp_path / "out" / "student"))
    assert classifier("good movie")[0]["label"] in ("neg", "pos")


def test_a_teacher_offloaded_by_device_map_trains_caches_and_is_summarised(tmp_path, capsys):
    """`teacher.kwargs: {device_map: ...}` (Accelerate's big-model inference; here every weight offloaded to disk)
    through the CLI: a live run (its summary times the teacher, whose parameters are on `meta`), `hfdistill cache`
    (hashing offloaded weights) and a run from that cache."""
    from tests_helpers import TINY_BERT
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    reviews(tmp_path)
    labels = {0: "neg", 1: "pos"}
    teacher = BertForSequenceClassification(BertConfig(**dict(TINY_BERT, vocab_size=32), id2label=labels,
                                                       label2id={v: k for k, v in labels.items()}))
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(tmp_path / "tok_t").save_pretrained(tmp_path / "teacher")
    offload = {"device_map": "auto", "max_memory": {"cpu": "20KB"}, "offload_folder": str(tmp_path / "offload")}
    recipe = {
        "task": "text-classification",
        "teacher": {"name": str(tmp_path / "teacher"), "kwargs": offload},
        "student": {"name": "bert", "config": dict(TINY_BERT, vocab_size=32), "tokenizer": str(tmp_path / "tok_s")},
        "data": {"name": "csv", "data_files": str(tmp_path / "reviews.csv"), "max_length": 16},
        "terms": [{"loss": "kd", "weight": 0.5},
                  {"loss": "hidden_mse", "student": "hidden_states", "teacher": "hidden_states"}],
        "training": {"output_dir": str(tmp_path / "out" / "student"), "max_steps": 2, "per_device_train_batch_size": 8,
                     "save_strategy": "no", "use_cpu": True, "report_to": "none"},
    }
    path = write(tmp_path, recipe)
    assert main(["train", path]) == 0
    summary = capsys.readouterr().out.split("Summary")[-1]
    assert "teacher" in summary and "student (distilled)" in summary
    assert main(["cache", path, "--output", str(tmp_path / "cache")]) == 0
    capsys.readouterr()
    assert main(["train", path, "--teacher", f"{{cache: {tmp_path / 'cache'}}}",
                 "--training.output_dir", str(tmp_path / "out" / "from_cache")]) == 0
    assert (tmp_path / "out" / "from_cache" / "config.json").is_file()


def test_baseline_over_several_seeds(tmp_path, capsys):
    """`student.baseline_seeds`: both sides trained per seed, the gain reported as mean +- std, card written."""
    recipe = tiny_recipe(tmp_path, student__baseline=True, student__baseline_seeds=2)
    recipe["training"]["seed"] = 7
    assert main(["train", write(tmp_path, recipe)]) == 0
    out = capsys.readouterr().out
    assert "over 2 seeds (7, 8): no teacher" in out and "per seed:" in out
    assert "seed 8" not in out.split("Summary")[1].split("over 2 seeds")[0]  # extra seeds are not table rows
    for folder in ("student", "student-baseline", "student-seed8", "student-baseline-seed8"):
        assert (tmp_path / "out" / folder / "config.json").is_file(), folder
    card = (tmp_path / "out" / "student" / "README.md").read_text()
    assert "hfdistill" in card and "kd" in card
    with pytest.raises(RecipeError, match="student.baseline_seeds"):
        cli.load_recipe(write(tmp_path, tiny_recipe(tmp_path, student__baseline_seeds=0)))
    assert main(["train", write(tmp_path, tiny_recipe(tmp_path, student__baseline_seeds=2), "r2.yaml")]) == 2
    assert "set `student.baseline: true`" in " ".join(capsys.readouterr().err.split())


def test_one_channel_student_is_not_offered_to_pipeline(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, teacher=None, terms=[])
    recipe["student"]["kwargs"] = {"in_chans": 1}
    assert main(["train", write(tmp_path, recipe)]) == 0
    out = capsys.readouterr().out
    assert "pipeline() always feeds RGB" in out and "from_pretrained" in out
    assert "classifier = pipeline(" not in out
    import torch
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(recipe["training"]["output_dir"])
    assert model(pixel_values=torch.zeros(1, 1, 16, 16)).logits.shape == (1, 10)


def test_reproduce_command_never_holds_a_token():
    command = cli.reproduce_command(
        "r.yaml", ["--training.hub_token", "hf_secret", "--training.learning_rate", "0.1", "--training.hub_token=hf_x"]
    )
    assert command == "hfdistill train r.yaml --training.learning_rate 0.1"


def test_exit_codes_of_each_kind_of_error(capsys, monkeypatch):
    from hfdistill.errors import AdapterError, HubError, LossParamError, ResultFolderError

    def raising(error):
        def action():
            raise error
        return action

    for error in (LossParamError("alpha", "must be >= 0, got -1.0"), AdapterError("no adapter maps 3 to 5 dims"),
                  ResultFolderError("out is not a student folder"), HubError("org/x does not exist", reason="not_found")):
        assert cli.guarded(raising(error)) == 2, error
        err = capsys.readouterr().err
        assert err.startswith("hfdistill: error:") and "\n\n" not in err and "Traceback" not in err
    assert cli.guarded(raising(HubError("the Hub is unreachable", reason="unreachable"))) == 1
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.guarded(raising(RuntimeError("a bug"))) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RuntimeError: a bug" in err and "--debug" in err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.guarded(raising(RuntimeError("a bug"))) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.guarded(raising(KeyboardInterrupt())) == 130
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.guarded(lambda: None) == 0


def test_cli_is_parsing_and_exit_codes_only():
    """The run pipeline lives in hfdistill.run; the CLI stays small (DESIGN.md: cli.py)."""
    source = Path(cli.__file__).read_text(encoding="utf-8")
    assert len(source.splitlines()) < 300
    assert "DistillationTrainer" not in source and "def plan_run" not in source and "def load_recipe" not in source


def test_debug_flag_sets_the_traceback_switch(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    args, extra = cli.build_parser().parse_known_args(["train", "r.yaml", "--debug", "--training.seed", "1"])
    assert args.debug and extra == ["--training.seed", "1"]
