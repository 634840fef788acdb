"""Hub pushing and the model card for DistillationTrainer (a mixin, to keep the trainer about distillation).

Pushing behaves as in ``transformers.Trainer`` (``push_to_hub``, ``hub_model_id``, ``hub_private_repo``,
``hub_strategy``, ``hub_revision``, ``hub_always_push``), except that only the student folder goes up
(never the teacher, adapters or loss state, nor checkpoints under ``hub_strategy="end"``); the model
card is hfdistill's; the folder is complete on disk before anything is sent; and the token is never
written to a file.

What goes into the folder is written by :func:`hfdistill.publish.write_result` (recipe, metrics, card);
the values of the card come from the trainer (:meth:`HubTrainerMixin._card_values`); the upload is
:func:`hfdistill.hub.push_folder`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any

import torch
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from . import card, hub, publish
from .outputs import CHECKPOINT_IGNORE_PATTERNS
from .summary import model_stats, size_on_disk

logger = logging.getLogger(__name__)


class HubTrainerMixin:
    """Mixed into DistillationTrainer before ``transformers.Trainer``; uses its ``recipe``, ``student``, ``teacher``."""

    def set_card_info(self, **values: Any) -> None:
        """Values for the model card and ``distill_results.json`` beyond what the trainer knows.

        Any argument of :func:`hfdistill.card.build_model_card`: ``teacher_id``, ``student_id``,
        ``dataset``, ``license``, ``command``, ``teacher_latency_ms``/``student_latency_ms`` and
        ``latency_setup``, ``teacher_metrics``, ... and ``recipe`` (the whole CLI recipe, which is then
        the one written to ``distill_recipe.yaml``).
        """
        self._card_info = {**getattr(self, "_card_info", {}), **values}

    @contextlib.contextmanager
    def _hub_token_hidden(self):
        # training_args.bin pickles the arguments, hub_token included: blank it while files are written.
        token = self.args.hub_token
        self.args.hub_token = None
        try:
            yield token
        finally:
            self.args.hub_token = token

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with self._hub_token_hidden():
            super().save_model(output_dir, _internal_call=True)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _hub_repo_name(self) -> str:
        return self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo (at start-up with ``push_to_hub``). An unreachable Hub does not stop training:
        the local result is what matters, and the repo is created again at push time."""
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:
            token = token if token is not None else self.args.hub_token
            mapped = hub.explain_hub_error(error, self._hub_repo_name(), action="push", token=token)
            if mapped is None:
                raise
            if mapped.reason not in ("unreachable", "offline"):
                raise mapped from error  # a wrong token or namespace: say so before hours of training
            logger.warning("%s Training goes on; the repo is created again when the student is pushed.", mapped)
            self.hub_model_id = None
            self.push_in_progress = None

    def create_model_card(
        self,
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        **card_values: Any,
    ) -> None:
        """Write the student's ``README.md`` (hfdistill's card), ``distill_recipe.yaml``,
        ``distill_results.json`` and, when absent, ``all_results.json`` into ``output_dir``.

        Takes ``Trainer.create_model_card``'s arguments and any of :func:`hfdistill.card.build_model_card`'s;
        the rest comes from the trainer (models, recipe, metrics in ``state.log_history``) and
        :meth:`set_card_info`.
        """
        if not self.is_world_process_zero():
            return
        first = lambda v: v[0] if isinstance(v, (list, tuple)) and v else v  # noqa: E731
        given = {
            "language": language, "license": license, "model_id": model_name, "base_model": finetuned_from,
            "pipeline_tag": first(tasks), "dataset": first(dataset) or first(dataset_tags),
            "tags": [tags] if isinstance(tags, str) else tags,
        }
        values = {**self._card_values(), **getattr(self, "_card_info", {}),
                  **{k: v for k, v in given.items() if v is not None}, **card_values}
        train_metrics, eval_metrics, teacher_metrics = card.metrics_from_log_history(self.state.log_history)
        metrics = {**train_metrics, **eval_metrics, **teacher_metrics} if train_metrics or eval_metrics else None
        publish.write_result(self.args.output_dir, values, metrics=metrics)

    def _card_values(self) -> dict[str, Any]:
        """What the trainer itself knows for the card: models, recipe, metrics, hyper-parameters."""
        from transformers import TimmWrapperForImageClassification

        recipe = getattr(self, "_card_info", {}).get("recipe") or self.recipe
        student, config = self.student, self.student.config
        is_timm = isinstance(student, TimmWrapperForImageClassification)
        architecture = (getattr(config, "architectures", None) or [type(student).__name__])[0]
        teacher_id = recipe.teacher.name if recipe.teacher is not None else None
        if teacher_id is None or not (teacher_id.startswith("timm:") or hub.hub_repo_id(teacher_id)):
            teacher_id = card.model_name(self.teacher)  # a local folder: name what it is, not where it was
        _, student_eval, teacher_eval = card.metrics_from_log_history(self.state.log_history)
        student_params, _ = model_stats(student)
        teacher_params, teacher_bytes = model_stats(self.teacher)
        cache = getattr(self, "frozen_teacher", None)
        if self.teacher is None and getattr(cache, "is_cache", False):  # a cache of its outputs: its manifest says
            teacher_id = cache.name
            teacher_params = cache.num_parameters or teacher_params
            teacher_bytes = cache.manifest["teacher"].get("weight_bytes") or teacher_bytes
        license_ = None
        if self.teacher is not None:
            # timm keeps the license of its pretrained weights in pretrained_cfg (also in a wrapper's config).
            pretrained_cfg = getattr(self.teacher, "pretrained_cfg", None)
            if pretrained_cfg is None:
                pretrained_cfg = getattr(getattr(self.teacher, "config", None), "pretrained_cfg", None)
            license_ = pretrained_cfg.get("license") if isinstance(pretrained_cfg, dict) else None
            if license_ is None and teacher_id and hub.hub_repo_id(teacher_id) and "/" in hub.hub_repo_id(teacher_id):
                token = self.args.hub_token
                license_ = hub.model_license(teacher_id, token=token)
        dataset = recipe.data.name if recipe.data is not None else None
        if dataset is None and self.train_dataset is not None:
            info = getattr(self.train_dataset, "info", None)
            dataset = getattr(info, "dataset_name", None) or None
        id2label = getattr(config, "id2label", None) or {}
        args = self.args
        hyper = {
            "learning_rate": args.learning_rate,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_steps" if args.max_steps > 0 else "num_train_epochs": args.max_steps if args.max_steps > 0 else args.num_train_epochs,
            "optim": getattr(args.optim, "value", args.optim),
            "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
            "weight_decay": args.weight_decay,
            "seed": args.seed,
            "task_weight": self.task_weight,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        }
        if getattr(args, "lmbda", 0):  # on-policy batches (GKD)
            hyper.update(lmbda=args.lmbda, on_policy_temperature=args.on_policy_temperature)
        return {
            "model_id": self.hub_model_id or args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
            "recipe": recipe,
            "student_id": recipe.student.name if recipe.student is not None else (
                f"timm:{config.architecture}" if is_timm else card.model_name(student)),
            "student_pretrained": bool(recipe.student is not None and recipe.student.pretrained),
            "teacher_id": teacher_id,
            "pipeline_tag": recipe.task or card.task_of_architecture(architecture),
            "library_name": "timm" if is_timm else "transformers",
            "dataset": dataset,
            "license": license_,
            "label_names": [id2label[i] for i in sorted(id2label)] if id2label else None,
            "student_metrics": student_eval or None,
            "teacher_metrics": teacher_eval or None,
            "student_params": student_params,
            "teacher_params": teacher_params,
            "student_size_bytes": size_on_disk(student, self.args.output_dir),
            "teacher_size_bytes": teacher_bytes,
            "training_hyperparameters": hyper,
            # A tokenizer with a chat template: the card shows the chat call of the text-generation pipeline too.
            "chat": bool(getattr(self.processing_class, "chat_template", None)),
        }

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the student, card, recipe and metrics into ``output_dir``, then upload that folder.

        As ``Trainer.push_to_hub`` (``kwargs`` go to :meth:`create_model_card`), but the folder is
        complete on disk before anything is sent, and what is sent leaves out checkpoints,
        ``distill_state*`` and ``teacher*``. Raises :class:`hfdistill.hub.HubError` saying what failed
        and how to push the (complete) local result later.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        hint = hub.push_later_hint(self.args.output_dir, self.hub_model_id or self.args.hub_model_id)
        if self.hub_model_id is None:
            with hub.wrap_hub_errors(self._hub_repo_name(), action="push", token=token, hint=hint):
                super().init_hf_repo(token=token, private=private)
        self._finish_current_push()
        return hub.push_folder(
            self.args.output_dir,
            self.hub_model_id,
            token=token,
            revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message or "End of training",
            run_as_future=not blocking,
            hint=hint,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push the student (and, for hub_strategy checkpoint / all_checkpoints, the checkpoint minus loss state)."""
        from transformers.trainer import TRAINING_ARGS_NAME
        from transformers.trainer_utils import HubStrategy, SaveStrategy
        from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME, PushInProgress

        if getattr(self, "_checkpoint_push_deferred", False):  # pushed once the checkpoint is complete
            self._checkpoint_to_push = checkpoint_folder
            return
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if self.hub_model_id is None:
            logger.warning("Not pushing %s: the Hub repo could not be created at start-up.", checkpoint_folder)
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        # As transformers: copy the student files of the checkpoint rather than saving the model again.
        modeling_files = [CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_NAME]
        index_path = os.path.join(checkpoint_folder, SAFE_WEIGHTS_INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                modeling_files += [SAFE_WEIGHTS_INDEX_NAME, *set(json.load(f)["weight_map"].values())]
        for name in modeling_files:
            if os.path.isfile(os.path.join(checkpoint_folder, name)):
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        with self._hub_token_hidden():
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        publish.write_recipe(getattr(self, "_card_info", {}).get("recipe") or self.recipe, output_dir)
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        token = self.args.hub_token
        jobs = [hub.push_folder(output_dir, self.hub_model_id, token=token, revision=self.args.hub_revision,
                                commit_message=commit_message, run_as_future=True)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            # Called once the checkpoint is complete (DistillationTrainer._save_checkpoint); the ignore pattern
            # keeps the loss state out.
            path_in_repo = (
                "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else os.path.basename(checkpoint_folder)
            )
            jobs.append(hub.push_folder(checkpoint_folder, self.hub_model_id, token=token, revision=self.args.hub_revision,
                                        commit_message=commit_message + ", checkpoint", path_in_repo=path_in_repo,
                                        ignore_patterns=CHECKPOINT_IGNORE_PATTERNS, run_as_future=True))
        repo_id = self.hub_model_id
        for job in jobs:
            job.add_done_callback(lambda future: self._log_failed_push(future, repo_id, output_dir))
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    @staticmethod
    def _log_failed_push(future, repo_id: str, output_dir: str) -> None:
        # Checkpoint pushes run in the background: say when one failed (training goes on).
        if future.cancelled() or future.exception() is None:
            return
        error = future.exception()
        mapped = hub.explain_hub_error(error, repo_id, action="push") or error
        logger.warning("A checkpoint push to %s failed: %s. Training goes on; %s", repo_id, mapped,
                       hub.push_later_hint(output_dir, repo_id))
