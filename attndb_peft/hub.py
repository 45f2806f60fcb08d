# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Push an adapter folder to the Hugging Face Hub.

Only the adapter files, the model card and the sample images are uploaded (an allow-list, so resumable
checkpoints, temporary export folders and anything else in the output folder never leave the machine). The
upload goes from a staging copy in which the card's `REPO_OR_FOLDER` placeholder is replaced by the repo id, so
the local folder is never modified, whether the push succeeds or fails.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .adapter_format import ADAPTER_FILES, MODEL_CARD_NAME, AdapterError, read_adapter_config
from .errors import RunError
from .export import REPO_PLACEHOLDER

__all__ = ["ALLOW_PATTERNS", "IGNORE_PATTERNS", "PushError", "check_repo_id", "files_to_push", "push_to_hub"]

logger = logging.getLogger(__name__)

#: What a push uploads: the adapter files, the model card and the sample images.
ALLOW_PATTERNS = [
    *ADAPTER_FILES,
    "samples/*.png",
    "samples/*.jpg",
    "samples/*.jpeg",
    "samples/*.webp",
]
#: Never uploaded, even if a pattern above matched (belt and braces for checkpoints and pickles).
IGNORE_PATTERNS = ["checkpoints/*", ".export-tmp/*", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]


class PushError(RunError):
    """The Hub refused the push or could not be reached. The local adapter folder is unchanged."""


def files_to_push(output_dir: str | os.PathLike) -> list[str]:
    """The files of `output_dir` that `push_to_hub` uploads (paths relative to it, sorted)."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(output_dir)
    relative = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(relative, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))


def check_repo_id(repo_id: str) -> str:
    """Raise `AdapterError` unless `repo_id` is a valid Hub model repo id with a namespace (`user/name`); checked
    before training starts when `--push-to-hub` is given, so a typo does not surface hours later."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it has no namespace")
    except HFValidationError as exc:
        raise AdapterError(f"repo_id={repo_id!r} is not a Hub repo id like 'your-name/my-concept' ({exc}).") from exc
    return repo_id


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an adapter folder to a Hub model repo (created if needed) in one commit.

    Args:
        output_dir (`str` or `os.PathLike`): the folder `attndb train` wrote.
        repo_id (`str`): the Hub repo, `user/name` or `org/name`.
        private (`bool`, *optional*, defaults to `False`): create the repo private (an existing repo keeps its
            visibility).
        token (`str`, *optional*): a Hub token with write access; default the one saved by `hf auth login`.
        commit_message (`str`, *optional*): default "Upload attndb concept TOKEN".

    Returns:
        `str`: the URL of the commit.

    Raises:
        AdapterError: `output_dir` is not a complete adapter folder, or `repo_id` is not a valid repo id (nothing is
            sent).
        PushError: the Hub refused the push (authentication, permissions) or could not be reached. The local
            folder is unchanged; push again when fixed.
    """
    from huggingface_hub import HfApi

    folder = Path(output_dir)
    if not folder.is_dir():
        raise AdapterError(f"output_dir={str(folder)!r} is not a folder; pass the folder `attndb train` wrote.")
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise AdapterError(
            f"{folder} is missing {', '.join(missing)}: it is not a finished adapter folder (was training "
            "interrupted? finish it with `attndb train ... --resume`). Nothing was pushed."
        )
    check_repo_id(repo_id)
    if commit_message is None:
        commit_message = f"Upload attndb concept {_token_of(folder) or folder.name}"

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="attndb-push-") as staging:
        _stage(folder, Path(staging), repo_id)
        step = "creating the repo"
        try:
            api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
            step = "uploading the files"
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                commit_message=commit_message,
                token=token,
                repo_type="model",
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
            )
        except Exception as exc:  # network, HTTP and validation errors of the Hub client all end here
            raise PushError(_explain(exc, folder, repo_id, step)) from exc
    logger.info("Pushed %s to %s: %s", folder, repo_id, info.commit_url)
    return info.commit_url


def _stage(folder: Path, staging: Path, repo_id: str) -> None:
    """Hard-link (or copy) the files to push into `staging`; write the card with the repo id filled in."""
    for relative in files_to_push(folder):
        source, target = folder / relative, staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative == MODEL_CARD_NAME:  # a new file, never a link: the local card must stay as it is
            text = source.read_text(encoding="utf-8")
            target.write_text(text.replace(REPO_PLACEHOLDER, repo_id), encoding="utf-8")
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def _token_of(folder: Path) -> str | None:
    """The concept's token for the default commit message; `None` when the config can't tell."""
    try:
        return read_adapter_config(folder).token
    except (AdapterError, OSError):
        return None


def _explain(exc: Exception, folder: Path, repo_id: str, step: str) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, OfflineModeIsEnabled):
        hint = "HF_HUB_OFFLINE is set: unset it to push."
    elif status == 401:
        hint = "Not authenticated: log in with `hf auth login` or pass a write token (token=... / --token)."
    elif status == 403:
        hint = (
            "The token may not write there: use a token with write access, and a repo under your user or an "
            "organization you can write to."
        )
    elif status is not None:
        hint = f"The Hub answered HTTP {status}."
    elif isinstance(exc, (ConnectionError, TimeoutError, OSError)) or "connect" in type(exc).__name__.lower():
        hint = "The Hub could not be reached: check the network connection (and HF_ENDPOINT if set)."
    else:
        hint = ""
    reason = str(exc).strip().rstrip(".")
    return (
        f"Pushing {folder} to {repo_id} failed while {step}: {type(exc).__name__}: {reason}. {hint} The local "
        f"folder is unchanged; push again with `attndb push {folder} {repo_id}`."
    ).replace("  ", " ")
