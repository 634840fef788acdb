"""The Hugging Face Hub: loading teachers and students from it, uploading folders to it, and its errors.

Loading goes through ``huggingface_hub``'s normal cache (``HF_HOME``/``HF_HUB_CACHE``) and honours
``HF_HUB_OFFLINE``, ``revision`` and ``token``; whatever the Hub or the network answers is turned into
one :class:`HubError` whose message says what failed and what to do (:func:`wrap_hub_errors`).

Uploading (:func:`push_folder`) sends a folder without what :data:`~hfdistill.outputs.PUSH_IGNORE_PATTERNS`
keeps local (Trainer checkpoints, ``distill_state*``, the teacher) and refuses to send any file that holds
the token. What a result folder holds, and pushing one (``hfdistill push``), is :mod:`hfdistill.publish`;
this module knows nothing of model cards or recipes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import HubError, ResultFolderError  # noqa: F401 - re-exported
from .outputs import (  # noqa: F401 - re-exported: these names were defined here before outputs.py
    CARD_NAME,
    CHECKPOINT_IGNORE_PATTERNS,
    DISTILL_STATE_PREFIX,
    PUSH_IGNORE_PATTERNS,
    RECIPE_NAME,
    RESULTS_NAME,
    STUDENT_WEIGHTS,
    hub_repo_id,
)

logger = logging.getLogger(__name__)

# Formats a PyTorch loader never reads: not downloaded by `download_model`.
NON_TORCH_PATTERNS = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.gguf", "*.mlmodel",
                      "flax_model*", "tf_model*", "rust_model*", "onnx/*", "openvino/*", "coreml/*"]
LOGIN_HINT = "pass a token (`token=...`, `--hub_token`, or the HF_TOKEN environment variable) or run `huggingface-cli login`"
# Names that moved to hfdistill.publish (writing and pushing result folders); still importable from here.
_MOVED_TO_PUBLISH = ("write_recipe", "check_result_folder", "push_result", "push_main")


def __getattr__(name: str) -> Any:
    # Lazy, so that importing hub never imports publish (which imports hub): no import cycle.
    if name in _MOVED_TO_PUBLISH:
        from . import publish

        return getattr(publish, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- errors
def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _has_token(token: str | bool | None) -> bool:
    if token is False:
        return False
    if isinstance(token, str) and token:
        return True
    from huggingface_hub import get_token

    return get_token() is not None


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and the errors it was raised from (transformers wraps Hub errors into OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _server_message(error: BaseException) -> str:
    response = getattr(error, "response", None)
    message = getattr(error, "server_message", None)
    if not message and response is not None:
        message = response.headers.get("X-Error-Message")
    return message or str(error).strip().splitlines()[0]


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import httpx2

        types += [httpx2.TransportError]
    except ImportError:  # older huggingface_hub: requests
        pass
    try:
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def explain_hub_error(
    error: BaseException,
    repo_id: str,
    *,
    action: str = "load",
    revision: str | None = None,
    token: str | bool | None = None,
    hint: str | None = None,
) -> HubError | None:
    """The :class:`HubError` for ``error`` (or one it was raised from), or None when it is not a Hub error.

    ``action`` is ``load`` (download a teacher/student) or ``push`` (create the repo and upload).
    """
    from huggingface_hub.errors import (
        BadRequestError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = hub_endpoint()
    network_errors = _network_error_types()
    tail = f" {hint}" if hint else ""

    for cause in _causes(error):
        if isinstance(cause, HubError):
            return cause
        if isinstance(cause, OfflineModeIsEnabled) or (isinstance(cause, LocalEntryNotFoundError) and is_offline()):
            if action == "push":
                return HubError(f"HF_HUB_OFFLINE=1, so {repo_id} cannot be pushed: unset HF_HUB_OFFLINE to push.{tail}",
                                "offline")
            return HubError(
                f"HF_HUB_OFFLINE=1 and {repo_id} is not in the cache ({hub_cache()}): download it once online "
                f"(`huggingface-cli download {repo_id}` with HF_HUB_OFFLINE unset) or give a local folder.{tail}",
                "offline",
            )
        if isinstance(cause, GatedRepoError):
            return HubError(
                f"{repo_id} is private or gated on the Hub ({endpoint}/{repo_id}): request access on its page, "
                f"then {LOGIN_HINT}.{tail}",
                "gated",
            )
        if isinstance(cause, RepositoryNotFoundError):
            if action == "push":
                return HubError(
                    f"the Hub refused the push to {repo_id}: the repo does not exist or this token cannot see it "
                    f"({_server_message(cause)}); check `hub_model_id` and {LOGIN_HINT}.{tail}",
                    "not_found",
                )
            if _has_token(token):
                return HubError(
                    f"no model {repo_id!r} on the Hub ({endpoint}) that your token can read: check the id, and that "
                    f"the token's user has access to it.{tail}",
                    "not_found",
                )
            return HubError(
                f"no model {repo_id!r} on the Hub ({endpoint}), or it is private or gated: check the id; if you have "
                f"access, {LOGIN_HINT}.{tail}",
                "not_found",
            )
        if isinstance(cause, RevisionNotFoundError):
            return HubError(
                f"{repo_id} has no revision {revision!r} on the Hub: give a branch, tag or commit id that exists.{tail}",
                "revision",
            )
        if isinstance(cause, RemoteEntryNotFoundError):
            return HubError(f"{repo_id} on the Hub lacks a file the loader needs: {_server_message(cause)}.{tail}",
                            "not_found")
        if isinstance(cause, BadRequestError) and "metadata" in str(cause).lower():
            return HubError(f"the Hub rejected the model card of {repo_id}: {cause}.{tail}", "invalid")
        if isinstance(cause, ValueError) and str(cause).startswith("Invalid metadata in README.md"):
            return HubError(f"the Hub rejected the model card of {repo_id}: {cause}{tail}", "invalid")
        if isinstance(cause, HfHubHTTPError):
            status = _status(cause)
            message = _server_message(cause)
            if status == 401:
                if "Invalid credentials" in message or _has_token(token):
                    return HubError(
                        f"the Hub rejected the token while trying to {action} {repo_id} (401 {message}): "
                        f"{LOGIN_HINT} with a valid token.{tail}",
                        "auth",
                    )
                return HubError(f"{action}ing {repo_id} needs a token (401 {message}): {LOGIN_HINT}.{tail}", "auth")
            if status == 403:
                return HubError(
                    f"the Hub refused to {action} {repo_id} (403 {message}): the token cannot write there (a read-only "
                    f"token, or another user's or organisation's namespace); use a write token of the repo's "
                    f"owner.{tail}",
                    "forbidden",
                )
            return HubError(f"the Hub answered {status} while trying to {action} {repo_id}: {message}.{tail}", "http")
        if isinstance(cause, HFValidationError):
            return HubError(
                f"{repo_id!r} is neither a local folder nor a valid Hub model id (`namespace/name`): {cause}{tail}",
                "invalid",
            )
        if isinstance(cause, LocalEntryNotFoundError) or isinstance(cause, network_errors):
            if action == "push":
                return HubError(f"could not reach the Hub at {endpoint} to push {repo_id} "
                                f"({type(cause).__name__}: {cause}).{tail}", "unreachable")
            return HubError(
                f"could not reach the Hub at {endpoint} to download {repo_id}, and it is not in the cache "
                f"({hub_cache()}): check the connection (and HF_ENDPOINT / proxy settings), or use a cached or "
                f"local model with HF_HUB_OFFLINE=1.{tail}",
                "unreachable",
            )
    return None


@contextlib.contextmanager
def wrap_hub_errors(
    model_id: str,
    *,
    action: str = "load",
    revision: str | None = None,
    token: str | bool | None = None,
    hint: str | None = None,
) -> Iterator[None]:
    """Turn what the Hub, the network or a loader raises for ``model_id`` into one :class:`HubError`.

    Usage (the CLI, around ``from_pretrained`` / ``timm.create_model("hf-hub:...")``)::

        with wrap_hub_errors(name, revision=revision, token=token):
            model = AutoModel.from_pretrained(name, revision=revision, token=token)

    Errors that do not come from the Hub pass through unchanged.
    """
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        mapped = explain_hub_error(
            error, hub_repo_id(model_id) or model_id, action=action, revision=revision, token=token, hint=hint
        )
        if mapped is None:
            raise
        raise mapped from error


# ----------------------------------------------------------------------------- loading
def download_model(
    model_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: list[str] | None = None,
) -> str:
    """A local folder holding ``model_id``: the folder itself, or the Hub snapshot in the cache.

    Downloads through the normal cache (``HF_HOME``), so a second call and ``HF_HUB_OFFLINE=1`` reuse it;
    formats a PyTorch loader never reads (TF, Flax, ONNX, ...) are skipped. ``hf-hub:org/name@rev`` is
    accepted. Raises :class:`HubError` with what to do when the repo is missing, private, gated,
    offline and uncached, or the Hub is unreachable.
    """
    from huggingface_hub import snapshot_download

    if os.path.isdir(model_id):
        return model_id
    repo_id = hub_repo_id(model_id)
    if repo_id is None:
        raise HubError(f"{model_id!r} is neither a local folder nor a Hub model id (`namespace/name`)", "invalid")
    if model_id.startswith("hf-hub:") and "@" in model_id and revision is None:
        revision = model_id.split("@", 1)[1]
    with wrap_hub_errors(repo_id, revision=revision, token=token):
        return snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=allow_patterns,
            ignore_patterns=None if allow_patterns else NON_TORCH_PATTERNS,
        )


def model_license(model_id: str, *, revision: str | None = None, token: str | bool | None = None) -> str | None:
    """The ``license`` in a Hub model's card metadata, or None when unknown or unreachable (best effort)."""
    from huggingface_hub import ModelCard, hf_hub_download

    repo_id = hub_repo_id(model_id)
    if repo_id is None:
        return None
    try:
        card = ModelCard.load(hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token))
    except Exception as error:  # the card is decoration: never fail a run over it
        logger.debug("no license for %s: %s", repo_id, error)
        return None
    license_ = card.data.get("license")
    if license_ == "other" and card.data.get("license_name"):
        return f"other ({card.data.get('license_name')})"
    return license_ if isinstance(license_, str) else None


# ----------------------------------------------------------------------------- pushing
def files_to_push(folder: str | os.PathLike, ignore_patterns: list[str] | None = None) -> list[str]:
    """The paths (relative, POSIX) ``upload_folder`` would send from ``folder`` with these ignore patterns."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    paths = [p for p in paths if not any(part == ".git" for part in p.split("/"))]
    return list(filter_repo_objects(paths, ignore_patterns=list(ignore_patterns or [])))


def find_token_leaks(folder: str | os.PathLike, token: str | None, paths: list[str] | None = None) -> list[str]:
    """The files in ``folder`` (or just ``paths``) whose bytes contain ``token``."""
    if not token or not isinstance(token, str):
        return []
    needle = token.encode()
    folder = Path(folder)
    leaks = []
    for relative in paths if paths is not None else files_to_push(folder):
        path = folder / relative
        if path.stat().st_size < len(needle):
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(needle) != -1:
                leaks.append(relative)
    return leaks


def _resolve_token(token: str | bool | None) -> str | None:
    if isinstance(token, str) and token:
        return token
    if token is False:
        return None
    from huggingface_hub import get_token

    return get_token()


def ensure_repo(repo_id: str, *, token: str | None = None, private: bool | None = None, hint: str | None = None) -> str:
    """Create ``repo_id`` on the Hub if it does not exist; returns the full repo id."""
    from huggingface_hub import HfApi

    with wrap_hub_errors(repo_id, action="push", token=token, hint=hint):
        return HfApi().create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload distilled student with hfdistill",
    path_in_repo: str | None = None,
    ignore_patterns: list[str] | None = None,
    run_as_future: bool = False,
    hint: str | None = None,
):
    """Upload ``folder`` to an existing repo after checking that no file contains the token.

    Returns the ``CommitInfo`` (or a ``Future`` of it with ``run_as_future``); raises :class:`HubError`.
    """
    from huggingface_hub import HfApi

    ignore = list(PUSH_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns)
    # The token may come from the environment or the login store: check for that one too.
    leaks = find_token_leaks(folder, _resolve_token(token), files_to_push(folder, ignore))
    if leaks:
        raise HubError(
            f"refusing to push {folder} to {repo_id}: {', '.join(leaks)} contain(s) the Hub token; remove it from "
            "those files (and revoke the token if they were shared)",
            "token_leak",
        )
    with wrap_hub_errors(repo_id, action="push", token=token, revision=revision, hint=hint):
        return HfApi().upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            commit_message=commit_message,
            token=token,
            revision=revision,
            ignore_patterns=ignore,
            run_as_future=run_as_future,
        )


def push_later_hint(output_dir: str | os.PathLike, repo_id: str | None) -> str:
    target = f" --hub_model_id {repo_id}" if repo_id else " --hub_model_id <user>/<name>"
    return (f"The local student, card and checkpoints in {output_dir} are complete; push them later with "
            f"`hfdistill push {output_dir}{target}`.")
