"""Publishing a result folder: write what travels with the student, then push it to the Hub.

A finished ``output_dir`` gets, next to the student that ``save_model`` wrote (names in
:mod:`hfdistill.outputs`):

- ``distill_recipe.yaml``: the recipe, without tokens (:func:`write_recipe`);
- ``all_results.json``: the Trainer's metrics, when absent;
- ``README.md`` and ``distill_results.json``: the model card and its values (:func:`hfdistill.card.write_model_card`).

:func:`write_result` writes all three; :func:`push_result` (``hfdistill push OUTPUT_DIR --hub_model_id ...``)
checks that a folder is a finished student, makes sure its card names the target repo, and uploads it
(never checkpoints, loss state, the teacher, or a file holding the token: :func:`hfdistill.hub.push_folder`).

This is the one module that depends on both :mod:`hfdistill.card` (the card's text) and :mod:`hfdistill.hub`
(Hub I/O and errors); neither of those imports the other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from . import card, hub
from .errors import HubError, ResultFolderError
from .outputs import ALL_RESULTS_NAME, RECIPE_NAME, STUDENT_WEIGHTS

DEFAULT_COMMIT_MESSAGE = "Upload distilled student with hfdistill"


def write_recipe(recipe: Any, output_dir: str | os.PathLike) -> Path | None:
    """Write the recipe a student was made with as ``distill_recipe.yaml``, without any token.

    ``recipe`` is a :class:`~hfdistill.Recipe` (or a dict of recipe data). Keys of ``training`` that
    hold tokens (``hub_token``, ...) are dropped: the recipe is pushed with the student.
    """
    if recipe is None:
        return None
    import yaml

    from .recipe import Recipe

    data = recipe.to_dict() if isinstance(recipe, Recipe) else dict(recipe)
    training = data.get("training")
    if isinstance(training, dict):
        data["training"] = {k: v for k, v in training.items() if not k.endswith("token")}
        if not data["training"]:
            del data["training"]
    path = Path(output_dir) / RECIPE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# Written by hfdistill; `hfdistill train {RECIPE_NAME}` reruns it (with models and data).\n"
    path.write_text(text + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def write_result(
    output_dir: str | os.PathLike,
    card_values: Mapping[str, Any],
    *,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write the files that travel with a saved student into ``output_dir``; returns the card's path.

    ``card_values`` are :func:`hfdistill.card.build_model_card`'s arguments (``recipe`` among them, which
    is also written as ``distill_recipe.yaml``). ``metrics`` (the Trainer's final training and evaluation
    metrics) are written as ``all_results.json`` unless the folder already has one.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_recipe(card_values.get("recipe"), output_dir)
    results_path = output_dir / ALL_RESULTS_NAME
    if metrics and not results_path.exists():
        results_path.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True), encoding="utf-8")
    return card.write_model_card(output_dir, **card_values)


def check_result_folder(output_dir: str | os.PathLike) -> Path:
    """``output_dir`` as a Path when it holds a saved student; else :class:`ResultFolderError` saying what is missing."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise ResultFolderError(f"{output_dir} is not a folder; give the output_dir of a finished `hfdistill train` run")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in STUDENT_WEIGHTS):
        missing.append("model.safetensors")
    if missing:
        checkpoints = sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
        advice = (f" It holds Trainer checkpoints ({', '.join(checkpoints[-3:])}): push a finished run, or save the "
                  "student with `trainer.save_model()`." if checkpoints else
                  " It should be what `trainer.save_model()` or `hfdistill train` writes.")
        raise ResultFolderError(f"{output_dir} is not a student folder: it has no {' or '.join(missing)}.{advice}")
    return folder


def push_result(
    output_dir: str | os.PathLike,
    hub_model_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
):
    """Push a finished result folder (student, card, recipe, metrics) to ``hub_model_id``.

    What ``hfdistill push OUTPUT_DIR --hub_model_id ...`` runs, e.g. after a push that failed. Writes a
    model card from the folder's contents when it has none (or when the card was generated for
    another repo id). Returns the ``CommitInfo``. Raises :class:`ResultFolderError` for a folder that
    is not a student, :class:`HubError` when the Hub cannot be reached or refuses.
    """
    folder = check_result_folder(output_dir)
    if not hub_model_id or "/" not in hub_model_id.strip("/"):
        raise ResultFolderError(f"hub_model_id must be `<user or org>/<name>`, got {hub_model_id!r}")
    card.refresh_card(folder, hub_model_id)
    repo_id = hub.ensure_repo(hub_model_id, token=token, private=private)
    if revision not in (None, "main"):
        from huggingface_hub import HfApi

        with hub.wrap_hub_errors(repo_id, action="push", token=token):
            HfApi().create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    return hub.push_folder(folder, repo_id, token=token, revision=revision, commit_message=commit_message)


def push_main(argv: list[str] | None = None) -> int:
    """``hfdistill push OUTPUT_DIR --hub_model_id USER/NAME``: exit 0 pushed, 2 bad input, 1 push failed."""
    parser = argparse.ArgumentParser(
        prog="hfdistill push",
        description="Push a distilled student folder (weights, config, processor/tokenizer, recipe, metrics, model "
        "card) to the Hugging Face Hub. Checkpoints, adapters, loss state and the teacher are never pushed.",
    )
    parser.add_argument("output_dir", help="the output_dir of a finished run (what `trainer.save_model()` wrote)")
    parser.add_argument("--hub_model_id", required=True, help="the repo to push to: <user or org>/<name>")
    parser.add_argument("--hub_token", "--token", dest="token", default=None,
                        help="a write token; default: HF_TOKEN or the `huggingface-cli login` token")
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                        help="create the repo private (no effect when it exists)")
    parser.add_argument("--revision", default=None, help="branch to push to (created if needed); default main")
    parser.add_argument("--commit_message", default=DEFAULT_COMMIT_MESSAGE)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad usage, 0 on --help
        return int(exit_.code or 0)
    try:
        info = push_result(args.output_dir, args.hub_model_id, token=args.token, private=args.private,
                           revision=args.revision, commit_message=args.commit_message)
    except ResultFolderError as error:
        print(f"hfdistill push: {error}", file=sys.stderr)
        return 2
    except HubError as error:
        print(f"hfdistill push: push failed: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.output_dir} to {getattr(info, 'commit_url', None) or args.hub_model_id}")
    return 0
