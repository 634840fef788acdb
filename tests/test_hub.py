"""The Hub: pushing students, loading from it, and every failure, against a real HTTP server on 127.0.0.1.

``huggingface_hub`` reads HF_ENDPOINT / HF_HUB_OFFLINE when it is imported, and this test process runs
offline (conftest), so everything that talks to the server runs in a fresh Python process with its own
environment and an empty cache (HF_HOME): exactly what a user's next session sees.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
import torch
from hub_server import FakeHub, validate_card_metadata
from huggingface_hub import ModelCard
from huggingface_hub.utils import hf_raise_for_status

from hfdistill.hub import HubError, ResultFolderError, explain_hub_error, find_token_leaks, hub_repo_id
from hfdistill.publish import check_result_folder, push_main, write_recipe

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TOKEN = "hf_TestTokenForTheFakeHub0123456789"  # write token of user "user"
OTHER_TOKEN = "hf_OtherUsersToken0123456789abcdef"  # write token of user "other"
READ_TOKEN = "hf_ReadOnlyToken0123456789abcdefgh"  # read-only token of user "user"


@pytest.fixture(scope="module")
def fake_hub():
    hub = FakeHub(tokens={TOKEN: "user", OTHER_TOKEN: "other", READ_TOKEN: "user"}, read_only_tokens={READ_TOKEN},
                  lifetime_s=900)
    hub.start()
    yield hub
    hub.stop()
    assert not hub.unhandled, f"requests the fake Hub did not understand: {hub.unhandled}"


def closed_port_url() -> str:
    with socket.socket() as s:  # bind, read the port, close: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run_python(code: str, endpoint: str, tmp_path: Path, env: dict | None = None, timeout: int = 240,
               home: Path | None = None):
    """Run ``code`` in a fresh interpreter against ``endpoint``, with an empty Hub cache (or ``home``) and no login."""
    home = home or tmp_path / f"hf_home_{len(list(tmp_path.glob('hf_home_*')))}"
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))},
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        **(env or {}),
    }
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                            text=True, timeout=timeout, cwd=tmp_path)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def all_text(files: dict[str, bytes]) -> bytes:
    return b"\n".join(files.values())


TRAIN_TIMM = """
    import json, os, sys
    from conftest import digits_dataset, tiny_timm, accuracy
    from hfdistill import DistillationConfig, DistillationTrainer
    from hfdistill.hub import HubError

    output_dir, repo_id, hub_strategy = sys.argv[1:4]
    train, val = digits_dataset(n_train=32, n_eval=16)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    args = DistillationConfig(
        output_dir=output_dir, max_steps=2, per_device_train_batch_size=8, learning_rate=1e-3, use_cpu=True,
        save_strategy="steps", save_steps=1, eval_strategy="no", report_to=[], logging_steps=1,
        push_to_hub=True, hub_model_id=repo_id, hub_token=os.environ.get("TEST_TOKEN"), hub_strategy=hub_strategy,
    )
    trainer = DistillationTrainer(
        model=tiny_timm("test_efficientnet", seed=2), teacher=tiny_timm("test_resnet", seed=1),
        recipe={"terms": [{"loss": "kd", "weight": 0.5, "params": {"temperature": 4}}], "task_weight": 0.5},
        args=args, train_dataset=train, eval_dataset=val, compute_metrics=accuracy, id2label=dict(enumerate(names)),
    )
    trainer.train()
    trainer.evaluate()
    try:
        trainer.save_model()  # with push_to_hub: saves, writes card + recipe + metrics, pushes
        print("RESULT pushed")
    except HubError as error:
        print("RESULT hub-error", error.reason, json.dumps(str(error)))
"""

USE_TIMM = """
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline
    repo_id = sys.argv[1]
    classifier = pipeline(model=repo_id)  # task from the repo's pipeline_tag, files from the server
    predictions = classifier(Image.fromarray((np.random.rand(16, 16, 3) * 255).astype("uint8")))
    print("LABELS", json.dumps([p["label"] for p in predictions]))
    import timm
    timm_model = timm.create_model("hf-hub:" + repo_id, pretrained=True).eval()
    hf_model = AutoModelForImageClassification.from_pretrained(repo_id).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        print("TIMM_MATCH", torch.allclose(timm_model(x), hf_model(pixel_values=x).logits, atol=1e-5))
"""


def subprocess_train(endpoint: str, tmp_path: Path, output_dir: Path, repo_id: str, strategy: str, token: str | None):
    argv = f"import sys; sys.argv = ['x', {str(output_dir)!r}, {repo_id!r}, {strategy!r}]\n"
    return run_python(argv + textwrap.dedent(TRAIN_TIMM), endpoint, tmp_path, {"TEST_TOKEN": token} if token else {})


def subprocess_use(endpoint: str, tmp_path: Path, repo_id: str, env: dict | None = None):
    return run_python(f"import sys; sys.argv = ['x', {repo_id!r}]\n" + textwrap.dedent(USE_TIMM), endpoint, tmp_path,
                      env)


def test_timm_student_pushed_loads_with_pipeline_and_timm(fake_hub, tmp_path):
    repo_id = "user/tiny-timm-student"
    output_dir = tmp_path / "run"
    result = subprocess_train(fake_hub.url, tmp_path, output_dir, repo_id, "checkpoint", TOKEN)
    assert "RESULT pushed" in result.stdout

    files = fake_hub.files(repo_id)
    for name in ("config.json", "model.safetensors", "README.md", "distill_recipe.yaml", "distill_results.json",
                 "all_results.json"):
        assert name in files, f"{name} was not pushed: {sorted(files)}"
    # hub_strategy="checkpoint": the last checkpoint goes to last-checkpoint/, but never the loss state.
    assert "last-checkpoint/model.safetensors" in files
    assert not [p for p in files if "distill_state" in p or "teacher" in p.lower() or p.startswith("checkpoint-")]
    assert (output_dir / "checkpoint-2" / "distill_state.safetensors").is_file()  # it stays local
    assert TOKEN.encode() not in all_text(files)
    assert not find_token_leaks(output_dir, TOKEN, [str(p.relative_to(output_dir)) for p in output_dir.rglob("*")
                                                    if p.is_file()])
    readme = files["README.md"].decode()
    assert validate_card_metadata(readme) == []
    data = ModelCard(readme).data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert "knowledge-distillation" in data.tags and data.license == "apache-2.0"  # timm teacher's license
    assert data.eval_results and data.eval_results[0].metric_type == "accuracy"
    assert "0.5 * task loss + 0.5 * kd" in readme and "arxiv.org/abs/1503.02531" in readme
    config = json.loads(files["config.json"])
    assert config["label_names"][3] == "three"  # timm_wrapper configs store the labels as a list

    use = subprocess_use(fake_hub.url, tmp_path, repo_id)
    labels = json.loads(use.stdout.split("LABELS ", 1)[1].splitlines()[0])
    assert labels and set(labels) <= {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert "TIMM_MATCH True" in use.stdout


def result_line(stdout: str) -> tuple[str, str, str]:
    """The (outcome, reason, message) the training script printed."""
    line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
    parts = line.split(" ", 3)
    return parts[1], (parts[2] if len(parts) > 2 else ""), (json.loads(parts[3]) if len(parts) > 3 else "")


def test_unreachable_hub_keeps_the_local_result_and_push_later_succeeds(fake_hub, tmp_path):
    output_dir = tmp_path / "run"
    result = subprocess_train(closed_port_url(), tmp_path, output_dir, "user/pushed-later", "every_save", TOKEN)
    outcome, reason, message = result_line(result.stdout)
    assert (outcome, reason) == ("hub-error", "unreachable")
    assert "could not reach the Hub" in message and "user/pushed-later" in message
    assert f"hfdistill push {output_dir} --hub_model_id user/pushed-later" in message
    assert TOKEN not in result.stdout + result.stderr
    # Everything is on disk: student, card, recipe, metrics and the checkpoints with their loss state.
    for name in ("config.json", "model.safetensors", "README.md", "distill_recipe.yaml", "distill_results.json",
                 "checkpoint-2/distill_state.safetensors", "checkpoint-2/optimizer.pt"):
        assert (output_dir / name).is_file(), name
    assert validate_card_metadata((output_dir / "README.md").read_text()) == []

    # Later, with the Hub back: `hfdistill push OUTPUT_DIR --hub_model_id ...`, token from HF_TOKEN.
    push = run_python(f"""
        import sys
        from hfdistill.publish import push_main
        sys.exit(push_main([{str(output_dir)!r}, "--hub_model_id", "user/pushed-later", "--private"]))
    """, fake_hub.url, tmp_path, {"HF_TOKEN": TOKEN})
    assert "Pushed" in push.stdout
    files = fake_hub.files("user/pushed-later")
    assert {"config.json", "model.safetensors", "README.md", "distill_recipe.yaml"} <= set(files)
    assert not [p for p in files if "checkpoint" in p or "distill_state" in p]
    assert fake_hub.repos["user/pushed-later"].private
    assert 'model="user/pushed-later"' in files["README.md"].decode()
    assert TOKEN.encode() not in all_text(files)


LOAD_ERRORS = """
    import json, os, sys
    import timm
    from transformers import AutoModelForImageClassification
    from hfdistill.hub import HubError, download_model, wrap_hub_errors
    from hfdistill.publish import push_main
    token, read_token, student_dir = sys.argv[1:4]
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = ["ok", ""]
        except HubError as error:
            out[name] = [error.reason, str(error)]

    def from_pretrained(repo_id, **kwargs):
        with wrap_hub_errors(repo_id, token=kwargs.get("token")):
            AutoModelForImageClassification.from_pretrained(repo_id, **kwargs)

    def timm_hub(repo_id):
        with wrap_hub_errors("hf-hub:" + repo_id):
            timm.create_model("hf-hub:" + repo_id, pretrained=True)

    attempt("private_no_token", lambda: download_model("user/private-teacher"))
    attempt("private_from_pretrained", lambda: from_pretrained("user/private-teacher"))
    attempt("private_timm", lambda: timm_hub("user/private-teacher"))
    attempt("private_other_user", lambda: download_model("user/private-teacher", token=sys.argv[4]))
    attempt("missing", lambda: download_model("user/no-such-model", token=token))
    attempt("bad_revision", lambda: download_model("user/private-teacher", token=token, revision="v9"))
    attempt("private_with_token", lambda: from_pretrained("user/private-teacher", token=token))
    attempt("revision_by_commit", lambda: download_model("user/private-teacher", token=token, revision=sys.argv[5]))
    out["push_read_only"] = push_main([student_dir, "--hub_model_id", "user/refused", "--token", read_token])
    out["push_other_namespace"] = push_main([student_dir, "--hub_model_id", "other/x", "--token", token])
    out["push_bad_token"] = push_main([student_dir, "--hub_model_id", "user/x", "--token", "hf_wrong"])
    print("OUT", json.dumps(out))
"""

OFFLINE = """
    import json
    from hfdistill.hub import HubError, download_model
    out = {}
    for name in ("user/private-teacher", "user/never-downloaded"):
        try:
            out[name] = ["ok", download_model(name)]
        except HubError as error:
            out[name] = [error.reason, str(error)]
    print("OUT", json.dumps(out))
"""


def test_loading_from_the_hub_and_its_errors(fake_hub, tmp_path, capsys):
    from conftest import tiny_hf_resnet

    teacher_dir = tmp_path / "teacher"
    tiny_hf_resnet().save_pretrained(teacher_dir)
    files = {p.name: p.read_bytes() for p in teacher_dir.iterdir() if p.is_file()}
    files["README.md"] = b"---\nlicense: mit\nlibrary_name: transformers\n---\n# teacher\n"
    repo = fake_hub.create_repo("user/private-teacher", private=True, files=files)
    first_commit = repo.branches["main"]

    home = tmp_path / "shared_home"
    argv = f"import sys; sys.argv = ['x', {TOKEN!r}, {READ_TOKEN!r}, {str(teacher_dir)!r}, {OTHER_TOKEN!r}, {first_commit!r}]\n"
    result = run_python(argv + textwrap.dedent(LOAD_ERRORS), fake_hub.url, tmp_path, home=home)
    out = json.loads(result.stdout.split("OUT ", 1)[1].splitlines()[0])

    for case in ("private_no_token", "private_from_pretrained", "private_timm"):
        reason, message = out[case]
        assert reason == "not_found", (case, out[case])
        assert "private or gated" in message and "huggingface-cli login" in message and "no model" in message
    assert out["private_other_user"][0] == "not_found" and "your token can read" in out["private_other_user"][1]
    assert out["missing"][0] == "not_found" and "no model 'user/no-such-model'" in out["missing"][1]
    assert out["bad_revision"][0] == "revision" and "'v9'" in out["bad_revision"][1]
    assert out["private_with_token"] == ["ok", ""] and out["revision_by_commit"] == ["ok", ""]
    assert (out["push_read_only"], out["push_other_namespace"], out["push_bad_token"]) == (1, 1, 1)
    assert "refused" in result.stderr and "rejected the token" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert "user/refused" not in fake_hub.repos and "other/x" not in fake_hub.repos

    # HF_HUB_OFFLINE=1: what is in the cache loads without the server, the rest says so.
    offline = run_python(OFFLINE, closed_port_url(), tmp_path, {"HF_HUB_OFFLINE": "1"}, home=home)
    out = json.loads(offline.stdout.split("OUT ", 1)[1].splitlines()[0])
    assert out["user/private-teacher"][0] == "ok" and os.path.isfile(os.path.join(out["user/private-teacher"][1], "config.json"))
    reason, message = out["user/never-downloaded"]
    assert reason == "offline" and message.startswith("HF_HUB_OFFLINE=1 and user/never-downloaded is not in the cache")


# ----------------------------------------------------------------------------- in-process, no network
def test_saved_arguments_never_hold_the_token(digits, tmp_path):
    from conftest import tiny_timm

    from hfdistill import DistillationConfig, DistillationTrainer

    train, _ = digits
    args = DistillationConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                              save_strategy="steps", save_steps=1, report_to=[], hub_token=TOKEN)
    trainer = DistillationTrainer(model=tiny_timm("test_efficientnet"), teacher=tiny_timm("test_resnet", seed=1),
                                  args=args, train_dataset=train.select(range(8)))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert tmp_path / "training_args.bin" in written and tmp_path / "checkpoint-1" / "training_args.bin" in written
    assert not find_token_leaks(tmp_path, TOKEN, [str(p.relative_to(tmp_path)) for p in written])
    saved = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and trainer.args.hub_token == TOKEN  # hidden while saving, then restored


def test_write_recipe_drops_tokens(tmp_path):
    from hfdistill import Recipe

    recipe = Recipe.from_dict({"terms": [{"loss": "kd"}], "training": {"hub_token": TOKEN, "learning_rate": 0.1}})
    path = write_recipe(recipe, tmp_path)
    text = path.read_text()
    assert TOKEN not in text and "learning_rate: 0.1" in text
    assert Recipe.from_yaml(path).terms[0].loss == "kd"  # it loads back


def test_token_leaks_are_found(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"token": TOKEN}))
    (tmp_path / "b.json").write_text("{}")
    assert find_token_leaks(tmp_path, TOKEN) == ["a.json"]
    assert find_token_leaks(tmp_path, None) == []


def test_push_main_rejects_folders_that_are_not_students(tmp_path, capsys):
    assert push_main([str(tmp_path / "missing"), "--hub_model_id", "user/x"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "checkpoint-5").mkdir()
    assert push_main([str(tmp_path), "--hub_model_id", "user/x"]) == 2
    err = capsys.readouterr().err
    assert "not a student folder" in err and "config.json or model.safetensors" in err and "checkpoint-5" in err
    assert push_main([str(tmp_path)]) == 2  # --hub_model_id is required (argparse usage error)
    with pytest.raises(ResultFolderError):
        check_result_folder(tmp_path / "missing")


def _http_error(status: int, url: str, **headers):
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as error:  # the real exception types huggingface_hub raises
        return error
    raise AssertionError("no error raised")


def test_hub_errors_are_explained():
    missing = _http_error(401, "https://hub.test/user/m/resolve/main/config.json", **{"X-Error-Code": "RepoNotFound"})
    assert explain_hub_error(OSError("a local disk error"), "user/m") is None  # not a Hub error: passes through
    wrapped = OSError("transformers' message")
    wrapped.__cause__ = missing
    error = explain_hub_error(wrapped, "user/m", token=False)
    assert error.reason == "not_found" and "private or gated" in str(error)
    assert "no model 'user/m'" in str(error) and "huggingface-cli login" in str(error)
    gated = _http_error(403, "https://hub.test/user/g/resolve/main/config.json", **{"X-Error-Code": "GatedRepo"})
    assert explain_hub_error(gated, "user/g").reason == "gated"
    refused = _http_error(403, "https://hub.test/api/models/user/r/commit/main", **{"X-Error-Message": "no write"})
    error = explain_hub_error(refused, "user/r", action="push", hint="Push later.")
    assert error.reason == "forbidden" and str(error).endswith("Push later.")
    connect = httpx2.ConnectError("connection refused")
    assert explain_hub_error(connect, "user/r", action="push").reason == "unreachable"
    assert explain_hub_error(connect, "user/r").reason == "unreachable"
    assert isinstance(explain_hub_error(connect, "user/r"), HubError)


def test_names_that_moved_stay_importable_from_hub():
    import hfdistill.hub as hub
    import hfdistill.outputs as outputs
    import hfdistill.publish as publish

    for name in ("write_recipe", "check_result_folder", "push_result", "push_main"):
        assert getattr(hub, name) is getattr(publish, name)
    assert hub.RECIPE_NAME == outputs.RECIPE_NAME == "distill_recipe.yaml"
    assert hub.PUSH_IGNORE_PATTERNS is outputs.PUSH_IGNORE_PATTERNS and hub.hub_repo_id is outputs.hub_repo_id
    with pytest.raises(AttributeError):
        hub.no_such_name  # noqa: B018


def test_hub_repo_ids():
    assert hub_repo_id("hf-hub:timm/resnet18.a1_in1k@main") == "timm/resnet18.a1_in1k"
    assert hub_repo_id("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert hub_repo_id("timm:resnet18") is None and hub_repo_id("./runs/student") is None


TRAIN_TEXT = """
    import json, os, sys
    import datasets, torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    from hfdistill import DistillationConfig, DistillationTrainer

    output_dir, repo_id = sys.argv[1:3]
    words = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "movie", "the", "was", "a"]
    vocab = os.path.join(output_dir + "-vocab.txt")
    with open(vocab, "w") as f:
        f.write("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
    texts = [f"the movie was {w}" for w in words[:8]] * 4
    labels = [0 if words.index(t.split()[-1]) < 4 else 1 for t in texts]
    data = datasets.Dataset.from_dict(dict(tokenizer(texts, padding="max_length", max_length=8), labels=labels))
    id2label = {0: "positive", 1: "negative"}

    def bert(hidden, layers, seed):
        torch.manual_seed(seed)
        return BertForSequenceClassification(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=2, id2label=id2label,
            label2id={v: k for k, v in id2label.items()}))

    args = DistillationConfig(output_dir=output_dir, max_steps=3, per_device_train_batch_size=8, use_cpu=True,
                              learning_rate=1e-3, save_strategy="no", eval_strategy="no", report_to=[],
                              push_to_hub=True, hub_model_id=repo_id, hub_token=os.environ["TEST_TOKEN"])
    trainer = DistillationTrainer(model=bert(16, 1, 0), teacher=bert(32, 2, 1), recipe={"terms": [{"loss": "kd"}]},
                                  args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub()
    print("RESULT pushed")
"""

USE_TEXT = """
    import json, sys
    from transformers import pipeline
    classifier = pipeline(model=sys.argv[1])
    print("LABELS", json.dumps([p["label"] for p in classifier(["the movie was great", "the movie was awful"])]))
"""


@pytest.mark.slow
def test_text_student_pushed_loads_with_pipeline(fake_hub, tmp_path):
    repo_id = "user/tiny-bert-student"
    output_dir = tmp_path / "run"
    argv = f"import sys; sys.argv = ['x', {str(output_dir)!r}, {repo_id!r}]\n"
    result = run_python(argv + textwrap.dedent(TRAIN_TEXT), fake_hub.url, tmp_path, {"TEST_TOKEN": TOKEN})
    assert "RESULT pushed" in result.stdout
    files = fake_hub.files(repo_id)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "distill_recipe.yaml"} <= set(files)
    assert TOKEN.encode() not in all_text(files)
    data = ModelCard(files["README.md"].decode()).data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    use = run_python(f"import sys; sys.argv = ['x', {repo_id!r}]\n" + textwrap.dedent(USE_TEXT), fake_hub.url, tmp_path)
    labels = json.loads(use.stdout.split("LABELS ", 1)[1].splitlines()[0])
    assert len(labels) == 2 and set(labels) <= {"positive", "negative"}


@pytest.mark.slow
def test_cli_train_pushes_the_student(fake_hub, tmp_path):
    cli = pytest.importorskip("hfdistill.cli")
    if not hasattr(cli, "main"):
        pytest.skip("hfdistill.cli has no main yet")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""
        task: image-classification
        teacher: {name: "timm:test_resnet", pretrained: false}
        student: {name: "timm:test_efficientnet"}
        data: {name: sklearn-digits, image_size: 16, max_train_samples: 64, max_eval_samples: 32}
        terms: [{loss: kd, weight: 0.5}]
        training: {max_steps: 2, per_device_train_batch_size: 16, save_strategy: "no", use_cpu: true}
    """))
    result = run_python(f"""
        import sys
        from hfdistill.cli import main
        sys.exit(main(["train", {str(recipe)!r}, "--training.output_dir", {str(tmp_path / 'cli_run')!r},
                       "--training.push_to_hub", "true", "--training.hub_model_id", "user/cli-student"]))
    """, fake_hub.url, tmp_path, {"HF_TOKEN": TOKEN}, timeout=400)
    files = fake_hub.files("user/cli-student")
    assert {"config.json", "model.safetensors", "README.md", "distill_recipe.yaml"} <= set(files), result.stdout[-2000:]
    assert TOKEN.encode() not in all_text(files)
    recipe_pushed = files["distill_recipe.yaml"].decode()
    assert "timm:test_resnet" in recipe_pushed and "sklearn-digits" in recipe_pushed  # the whole recipe, not just terms
    use = subprocess_use(fake_hub.url, tmp_path, "user/cli-student")
    assert "LABELS" in use.stdout


@pytest.mark.slow
def test_causal_lm_student_pushed_loads_with_text_generation_pipeline(fake_hub, tmp_path):
    """A distilled causal LM (text-generation task, offline byte tokenizer) pushed by `hfdistill train`
    generates through pipeline("text-generation") from the Hub in a fresh process, as text and as chat."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""
        task: text-generation
        teacher: {name: gpt2, config: {n_layer: 2, n_embd: 32, n_head: 2, n_positions: 96}, tokenizer: "hfdistill:bytes"}
        student: {name: gpt2, config: {n_layer: 1, n_embd: 16, n_head: 2, n_positions: 96}, tokenizer: "hfdistill:bytes"}
        data: {name: chatterbot-corpus, options: {topics: [greetings]}, max_length: 96, max_train_samples: 32,
               max_eval_samples: 8}
        terms: [{loss: forward_kl, weight: 0.5}]
        training: {max_steps: 2, per_device_train_batch_size: 8, save_strategy: "no", use_cpu: true}
    """))
    repo_id = "user/tiny-causal-lm-student"
    run_python(f"""
        import sys
        from hfdistill.cli import main
        sys.exit(main(["train", {str(recipe)!r}, "--training.output_dir", {str(tmp_path / 'lm_run')!r},
                       "--training.push_to_hub", "true", "--training.hub_model_id", {repo_id!r}]))
    """, fake_hub.url, tmp_path, {"HF_TOKEN": TOKEN}, timeout=400)
    files = fake_hub.files(repo_id)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "distill_recipe.yaml",
            "generation_config.json"} <= set(files)
    assert TOKEN.encode() not in all_text(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "text-generation" and "perplexity" in card.text
    use = run_python(f"""
        import json
        from transformers import pipeline
        pipe = pipeline("text-generation", model={repo_id!r})
        text = pipe("Hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
        chat = pipe([{{"role": "user", "content": "Hi"}}], max_new_tokens=5, do_sample=False)[0]["generated_text"]
        print("GENERATED", json.dumps({{"text": text, "chat": chat[-1]["role"]}}))
    """, fake_hub.url, tmp_path)
    generated = json.loads(use.stdout.split("GENERATED ", 1)[1].splitlines()[0])
    assert generated["text"].startswith("Hello") and len(generated["text"]) > 5 and generated["chat"] == "assistant"


DENSE_USE = {
    "semantic-segmentation": ("image-segmentation", "[o['label'] for o in pipe(image)]"),
    "object-detection": ("object-detection", "[o['label'] for o in pipe(image, threshold=0.0)]"),
}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST files absent (apt install dataset-fashion-mnist)")
@pytest.mark.parametrize("task", list(DENSE_USE))
def test_dense_student_pushed_loads_with_its_pipeline_from_the_hub(fake_hub, tmp_path, task):
    """A segmenter and a detector distilled on the scenes and pushed by `hfdistill train --training.push_to_hub`
    load from the Hub with pipeline("image-segmentation") / pipeline("object-detection") in a fresh process, and
    their cards carry the pipeline tag and the metric."""
    import yaml
    from test_detection_task import detection_recipe
    from test_segmentation import scenes_recipe

    recipe = (scenes_recipe if task == "semantic-segmentation" else detection_recipe)(tmp_path)
    recipe["student"]["baseline"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    repo_id = f"user/tiny-{task}-student"
    run_python(f"""
        import sys
        from hfdistill.cli import main
        sys.exit(main(["train", {str(path)!r}, "--training.push_to_hub", "true", "--training.hub_model_id", {repo_id!r}]))
    """, fake_hub.url, tmp_path, {"HF_TOKEN": TOKEN}, timeout=600)
    files = fake_hub.files(repo_id)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert TOKEN.encode() not in all_text(files)
    tag, labels = DENSE_USE[task]
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == tag and ("mean_iou" if tag == "image-segmentation" else "map") in card.text
    use = run_python(f"""
        import json
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        pipe = pipeline({tag!r}, model={repo_id!r})
        image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
        print("LABELS", json.dumps({labels}))
    """, fake_hub.url, tmp_path)
    found = json.loads(use.stdout.split("LABELS ", 1)[1].splitlines()[0])
    assert found and set(found) <= set(json.loads(files["config.json"])["id2label"].values())
