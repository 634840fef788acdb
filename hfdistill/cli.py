"""``hfdistill``: the command line (DESIGN.md, contract 6). Parsing and exit codes only.

    hfdistill train RECIPE.yaml [--dotted.key value ...]   train as the recipe says (hfdistill.run)
    hfdistill check RECIPE.yaml [--dotted.key value ...]   validate, load models and data, build every
                                                          stage's trainer (dry run); train and write nothing
    hfdistill cache RECIPE.yaml [--output DIR] [--logits_top_k K] [--feature_dtype float16|float32]
                    [--batch_size N] [--views N] [--dotted.key value ...]     run the teacher once over the training
                                                          data and store what the terms read (hfdistill.cache)
    hfdistill generate RECIPE.yaml [--output DIR] [--max_new_tokens N] [--batch_size B] [--do_sample]
                       [--temperature T] [--top_p P] [--seed S] [--shard_size N] [--dotted.key value ...]
                                                          sequence-level KD (text-generation): the teacher
                                                          completes every training prompt, written as a
                                                          dataset to train on (hfdistill.generate)
    hfdistill losses [--markdown | --update-readme README.md]
    hfdistill suggest TEACHER STUDENT [--task T] [--input-size N] [--method LOSS]
                                                          pair the two models' layers in a dry run and print
                                                          a `terms:` block for them (hfdistill.suggest)
    hfdistill push OUTPUT_DIR --hub_model_id USER/NAME

``train`` and ``check`` call the same functions a Python user would (:func:`hfdistill.run`,
:func:`hfdistill.run.check`), and run unchanged under ``accelerate launch -m hfdistill train RECIPE``.

Exit codes: 0 done, 2 bad input (one paragraph naming the problem and the fix; nothing trained or
written), 1 anything else (a short message; `--debug` or HFDISTILL_DEBUG=1 adds the traceback), 130
interrupted (Ctrl-C; the message says how to resume).
A Hub error is bad input when the recipe named something that cannot be had (2), else a failure (1).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

from . import processes
from .errors import BadInputError, HfdistillError, HubError, RecipeError
from .outputs import RECIPE_NAME as RECIPE_FILE_NAME  # noqa: F401 - kept for callers of the old name
from .recipe import apply_overrides, load_recipe, parse_overrides  # noqa: F401 - the CLI's overrides, re-exported
from .run import RunInterrupted, run, run_recipe  # noqa: F401 - run_recipe: the public API of before
from .losses.registry import METHODS_END, METHODS_START, losses_table, update_readme_methods  # noqa: F401
from .tasks import TASK_NAMES
from .tasks import accuracy  # noqa: F401 - moved to hfdistill.tasks; kept importable from here

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
DEBUG_ENV = "HFDISTILL_DEBUG"  # set to 1 (or pass --debug) for the traceback of an unexpected error


# ------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfdistill",
        description="Knowledge distillation for Hugging Face models: recipes in, compact students out.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help=f"print the traceback of an unexpected error (or {DEBUG_ENV}=1)")
    overrides = ("Any recipe key can be overridden with `--dotted.key value`, e.g. `--training.learning_rate 0.01 "
                 "--terms.0.weight 0.5 --stages.1.training.num_train_epochs 2`.")
    train = commands.add_parser(
        "train", parents=[debug], help="train a student from a recipe",
        description="Train a student as a YAML recipe describes (every stage, after checking all of them). " + overrides,
    )
    train.add_argument("recipe", help="the recipe YAML file")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an earlier result in the output folder (training.overwrite_output_dir)")
    check = commands.add_parser(
        "check", parents=[debug], help="check a recipe without training: models, data, every stage's dry run",
        description="Validate a recipe, load its models and data and build the trainer of every stage (the "
        "dry-run batch: taps, adapters, loss set-up) without training or writing anything; print what was "
        "checked. Exit 0 when `train` would start, 2 with the problem otherwise. " + overrides,
    )
    check.add_argument("recipe", help="the recipe YAML file")
    cache = commands.add_parser(
        "cache", parents=[debug], help="run the teacher once over the training data and store its outputs for training",
        description="Load the recipe's teacher and training data as `train` does, run the teacher once over the "
        "deterministic (unaugmented) view of every training example and store what the recipe's terms read "
        "(logits and tapped features) in safetensors shards with a manifest. Train with it by giving the recipe "
        "`teacher: {cache: DIR}`. An interrupted build resumes; under `accelerate launch` each process writes its "
        "own shards. " + overrides,
    )
    cache.add_argument("recipe", help="the recipe YAML file")
    cache.add_argument("--output", metavar="DIR", help="the cache folder (default: <training.output_dir>-teacher-cache)")
    cache.add_argument("--logits_top_k", type=int, metavar="K",
                       help="store the K largest logits and the remaining probability mass instead of full logits")
    cache.add_argument("--feature_dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                       help="dtype of the stored features (default float16; logits are always float32)")
    cache.add_argument("--batch_size", type=int, default=64, metavar="N", help="teacher batch size (default 64)")
    cache.add_argument("--views", type=int, default=1, metavar="N",
                       help="N augmented views of every example, replayed one per epoch (FKD; default 1: unaugmented)")
    generate = commands.add_parser(
        "generate", parents=[debug], help="sequence-level KD: write the teacher's completions of the training prompts as a dataset",
        description="Sequence-level knowledge distillation (Kim & Rush, EMNLP 2016, arXiv:1606.07947) for "
        "text-generation recipes: load the recipe's teacher and training data as `train` does, let the teacher "
        "complete each training prompt (prompt/completion data: the prompt; chats: the conversation before the "
        "last assistant turn), greedily by default, and write the rows with the teacher's text (JSON Lines shards) "
        "and the held-out examples unchanged, then print the `data:` section that trains on them. An interrupted "
        "run resumes; under `accelerate launch` each process writes its own shards. " + overrides,
    )
    generate.add_argument("recipe", help="the recipe YAML file")
    generate.add_argument("--output", metavar="DIR",
                          help="the output folder (default: <training.output_dir>-teacher-completions)")
    generate.add_argument("--max_new_tokens", type=int, metavar="N",
                          help="at most N new tokens per completion (default: data.max_length minus the prompt's "
                               "tokens, at most 512)")
    generate.add_argument("--batch_size", type=int, default=32, metavar="B", help="prompts per generate() call (default 32)")
    generate.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (with --do_sample; default 1)")
    generate.add_argument("--top_p", type=float, metavar="P", help="nucleus sampling (with --do_sample; default 1: off)")
    generate.add_argument("--seed", type=int, metavar="S", help="sampling seed (default: training.seed)")
    generate.add_argument("--shard_size", type=int, default=1024, metavar="N",
                          help="training rows per shard, the unit of resuming (default 1024)")
    commands.add_parser(
        "push", add_help=False, help="push a finished result folder to the Hub (`hfdistill push --help`)"
    )
    suggest = commands.add_parser(
        "suggest", parents=[debug], help="suggest tap pairs and a ready `terms:` block for a teacher and a student",
        description="Build both models by the names recipes use, without pretrained weights, run each once on an "
        "example input, pair their stage outputs (CNNs, by output stride) or layers (transformers, by layer "
        "proportion), and print each pair's shapes and adapter, then a `terms:` block to paste into a recipe.",
    )
    suggest.add_argument("teacher", help="the teacher: timm:<name>, a transformers id, a local folder, package:<module>")
    suggest.add_argument("student", help="the student, named the same ways")
    suggest.add_argument("--task", choices=list(TASK_NAMES), help="the task (default: read from the models)")
    suggest.add_argument("--input-size", type=int, metavar="N",
                         help="side of the example image (default: each model's own); for text, the number of tokens")
    suggest.add_argument("--method", metavar="LOSS",
                         help="a registered loss that reads features (default: mse, FitNets-style hints; at: "
                              "attention maps, no adapters)")
    losses = commands.add_parser("losses", help="list the registered distillation methods")
    losses.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    losses.add_argument("--update-readme", metavar="README", help="rewrite the table between the README's markers")
    return parser


def _print(text: str) -> None:
    # Under `accelerate launch` every process runs this code: only the main one talks.
    if processes.is_main_process():
        print(text, flush=True)


def _error(message: str) -> None:
    """One paragraph on stderr (under `accelerate launch`, from each process that meets it, named)."""
    who = f"hfdistill (process {processes.rank()} of {processes.world_size()})" if processes.world_size() > 1 \
        else "hfdistill"
    print(textwrap.fill(f"{who}: error: {' '.join(str(message).split())}", 100, break_long_words=False,
                        break_on_hyphens=False), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 done, 2 bad input, 1 other errors, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["push"]:
        from .publish import push_main

        return push_main(argv[1:])
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if args.command == "losses":
        args.debug = False
        if extra:
            _error(f"unexpected arguments {extra}; `hfdistill losses` takes only --markdown / --update-readme")
            return EXIT_BAD_INPUT
        return guarded(lambda: _losses_command(args))
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    if args.command == "cache":
        return guarded(lambda: _cache_command(args, extra))
    if args.command == "generate":
        return guarded(lambda: _generate_command(args, extra))
    if args.command == "suggest":
        if extra:
            _error(f"unexpected arguments {extra}; `hfdistill suggest` takes TEACHER STUDENT [--task T] [--input-size N] "
                   "[--method LOSS]")
            return EXIT_BAD_INPUT
        return guarded(lambda: _suggest_command(args))
    if args.command == "check":
        return guarded(lambda: _check_command(args.recipe, extra))
    if getattr(args, "overwrite", False):
        extra = [*extra, "--training.overwrite_output_dir", "true"]
    return guarded(lambda: run(args.recipe, overrides=extra, command=reproduce_command(args.recipe, extra)))


def _losses_command(args: argparse.Namespace) -> None:
    if args.update_readme:
        changed = update_readme_methods(args.update_readme)
        _print(f"{args.update_readme}: methods table {'updated' if changed else 'already up to date'}")
    else:
        _print(losses_table(markdown=args.markdown))


def _cache_command(args: argparse.Namespace, overrides: list[str]) -> None:
    from .cache import cache_command, cache_usage

    _print(f"building the teacher cache of {args.recipe}")
    folder = cache_command(args.recipe, overrides, output=args.output, logits_top_k=args.logits_top_k,
                           feature_dtype=args.feature_dtype, batch_size=args.batch_size, views=args.views)
    _print(cache_usage(folder, args.recipe))


def _generate_command(args: argparse.Namespace, overrides: list[str]) -> None:
    from .generate import generate_command, generate_usage

    _print(f"generating the teacher's completions for {args.recipe}")
    folder = generate_command(args.recipe, overrides, output=args.output, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, do_sample=args.do_sample, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, shard_size=args.shard_size)
    if processes.is_main_process():  # the other processes do not wait for the manifest
        _print(generate_usage(folder, args.recipe))


def _suggest_command(args: argparse.Namespace) -> None:
    from .suggest import suggest

    _print(suggest(args.teacher, args.student, task=args.task, input_size=args.input_size, method=args.method).report())


def _check_command(recipe_path: str, overrides: list[str]) -> None:
    from .run import check

    _print(f"checking {recipe_path}")
    _print(check(recipe_path, overrides=overrides).text)


def guarded(action: Callable[[], Any]) -> int:
    """Run ``action`` and map what it raises to the exit code, with one message."""
    try:
        action()
    except BadInputError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    except HubError as exc:
        # A model id that cannot be had is bad input; a push that failed left the local result complete.
        _error(str(exc))
        return EXIT_BAD_INPUT if exc.is_bad_input else EXIT_ERROR
    except HfdistillError as exc:  # a failure hfdistill explains itself (training diverged): no traceback needed
        _error(str(exc))
        return EXIT_ERROR
    except RunInterrupted as stop:
        print(stop.hint(), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - exit code 1 with the error; the traceback on request
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            import traceback

            traceback.print_exc()
            hint = ""
        else:
            hint = f" (this is not a problem with your input; rerun with --debug or {DEBUG_ENV}=1 for the traceback " \
                   "to report it)"
        _error(f"{type(exc).__name__}: {exc}{hint}")
        return EXIT_ERROR
    return EXIT_OK


def reproduce_command(recipe_path: str, overrides: Sequence[str]) -> str:
    """The command line for the model card, without any token: `--x.hub_token VALUE` loses both parts."""
    kept, skip_value = [], False
    for part in overrides:
        if skip_value:
            skip_value = False
            continue
        if part.startswith("--") and "token" in part:
            skip_value = "=" not in part
            continue
        kept.append(part)
    return " ".join(["hfdistill", "train", recipe_path, *kept])
