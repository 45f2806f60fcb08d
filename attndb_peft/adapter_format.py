# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The adapter folder's contract, shared by the writer (`export.py`) and every reader (`loading.py`,
`inference.py`, `evaluate.py`, `hub.py`): the file names, the format version, the keys of the safetensors headers
and of `attndb_config.json`, and the reading and validation of a folder (local or on the Hub).

| file | content |
|---|---|
| `attndb_embedding.safetensors` | the token embedding, in diffusers' textual-inversion layout |
| `pytorch_lora_weights.safetensors` | the U-Net LoRA in diffusers/PEFT keys |
| `attndb_kohya.safetensors` | the same LoRA in kohya keys, for A1111/ComfyUI/InvokeAI |
| `attndb_config.json` | token, category, base model, every setting, ranks, package versions |
| `README.md` | the model card |

Every safetensors file carries the `attndb_*` header keys below. Readers accept older folders: a header without
`attndb_format_version` (a hand-made file) is read without a version check, an SD 1.x/2.x embedding may name its
token only by its tensor key, and an `attndb_config.json` needs only `token` and `category` (SD 1.x/2.x
adapters have no `family` key: it was added with SDXL, and SD folders keep the original keys).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError, arg, first_line

__all__ = [
    "ADAPTER_FILES",
    "ALPHAS_KEY",
    "BASE_MODEL_KEY",
    "CATEGORY_KEY",
    "CONFIG_NAME",
    "EMBEDDING_NAME",
    "FORMAT_VERSION",
    "FORMAT_VERSION_KEY",
    "HUB_KWARGS",
    "KOHYA_NAME",
    "LOADED_FILES",
    "LORA_NAME",
    "MODEL_CARD_NAME",
    "RANKS_KEY",
    "STAGE3_MODE_KEY",
    "TOKEN_KEY",
    "VERSION_KEY",
    "AdapterContent",
    "AdapterError",
    "AdapterFiles",
    "AdapterInfo",
    "adapter_name_for_token",
    "check_format_version",
    "config_record",
    "header_metadata",
    "locate_adapter_files",
    "looks_like_repo_id",
    "package_versions",
    "read_adapter",
    "read_adapter_config",
    "read_safetensors",
    "write_config",
]

# ---------------------------------------------------------------------------------------------- file names
#: The concept's token embedding(s), in diffusers' textual-inversion layout.
EMBEDDING_NAME = "attndb_embedding.safetensors"
#: The U-Net LoRA in diffusers/PEFT layout (`pipe.load_lora_weights`).
LORA_NAME = "pytorch_lora_weights.safetensors"
#: The same LoRA in kohya's layout (ComfyUI, A1111, InvokeAI; the token embedding stays in `EMBEDDING_NAME`).
KOHYA_NAME = "attndb_kohya.safetensors"
#: The run's settings and what the loader needs to know (token, category, family).
CONFIG_NAME = "attndb_config.json"
#: The model card.
MODEL_CARD_NAME = "README.md"
#: Every file of a finished adapter folder.
ADAPTER_FILES = (EMBEDDING_NAME, LORA_NAME, KOHYA_NAME, CONFIG_NAME, MODEL_CARD_NAME)
#: The files `load_attndb` reads (and, from the Hub, fetches): nothing else is needed to load a concept.
LOADED_FILES = (EMBEDDING_NAME, LORA_NAME)
#: Version of the adapter folder layout; `load_attndb` refuses folders from a newer major version.
FORMAT_VERSION = "1.0"

# ---------------------------------------------------------------------------------------------- header keys
#: The adapter format version the file was written in (`FORMAT_VERSION`).
FORMAT_VERSION_KEY = "attndb_format_version"
#: The attndb_peft version that wrote the file.
VERSION_KEY = "attndb_version"
#: The concept's token (SDXL embedding files have no other place for it).
TOKEN_KEY = "attndb_token"
#: The concept's category word.
CATEGORY_KEY = "attndb_category"
#: The base model the adapter was trained on (named in the loader's messages).
BASE_MODEL_KEY = "attndb_base_model"
#: `"lora"` or `"full"`: how stage 3 was trained.
STAGE3_MODE_KEY = "attndb_stage3_mode"
#: JSON list of the LoRA ranks in the file.
RANKS_KEY = "attndb_ranks"
#: JSON list of the LoRA alphas in the file.
ALPHAS_KEY = "attndb_alphas"

#: Hub arguments `load_attndb` passes to `huggingface_hub.hf_hub_download`. The Hub access token is `hf_token`
#: (diffusers' name in `load_textual_inversion`), because `token` names the concept's token.
HUB_KWARGS = ("cache_dir", "force_download", "hf_token", "local_files_only", "revision", "subfolder")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files that are pickles under another name: refused with a message that says why.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class AdapterError(UsageError):
    """An adapter folder, file or argument is wrong, or the adapter does not fit the pipeline. Raised before the
    pipeline is changed (or after undoing a partial load), so the pipeline is exactly as it was."""


def looks_like_repo_id(text: str) -> bool:
    """Whether `text` reads as a Hub repo id (`user/name`) rather than a relative path (callers check the disk
    first: a folder of that name wins)."""
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "~"))


def adapter_name_for_token(token: str) -> str:
    """The default adapter name of a token: `<attndb-dog>` -> `attndb-dog` (PEFT adapter names can't contain
    dots; other characters outside `[A-Za-z0-9_-]` become `-`). The model card's snippets use it too."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", token).strip("-")
    return name or "attndb"


# ---------------------------------------------------------------------------------------------- writing
def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the adapter (for reproduction): recorded in `attndb_config.json`, and
    attndb_peft's as `VERSION_KEY` in every header."""
    versions = {}
    for name in ("attndb_peft", "torch", "diffusers", "peft", "transformers", "accelerate", "safetensors"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def header_metadata(
    *,
    token: str,
    category: str,
    base_model: str,
    stage3_mode: str,
    ranks: list[int],
    alphas: list[int],
    version: str,
) -> dict[str, str]:
    """The `attndb_*` keys of a safetensors header (safetensors metadata values are strings: lists are JSON).

    Args:
        token (`str`): the concept's token.
        category (`str`): the concept's category word.
        base_model (`str`): the base model it was trained on.
        stage3_mode (`str`): `"lora"` or `"full"`.
        ranks (`list[int]`): the LoRA ranks in the file.
        alphas (`list[int]`): the LoRA alphas in the file.
        version (`str`): the writing attndb_peft's version.
    """
    return {
        FORMAT_VERSION_KEY: FORMAT_VERSION,
        VERSION_KEY: version,
        TOKEN_KEY: token,
        CATEGORY_KEY: category,
        BASE_MODEL_KEY: base_model,
        STAGE3_MODE_KEY: stage3_mode,
        RANKS_KEY: json.dumps(ranks),
        ALPHAS_KEY: json.dumps(alphas),
    }


def config_record(
    *,
    token: str,
    category: str,
    base_model: str,
    instance_prompt: str,
    embedding_dims: list[int],
    lora_modules: int,
    ranks: list[int],
    report: dict[str, Any],
    settings: dict[str, Any],
    family: str | None = None,
) -> dict[str, Any]:
    """The content of `attndb_config.json` (what `AdapterInfo.from_dict` reads back).

    Args:
        token (`str`), category (`str`), base_model (`str`), instance_prompt (`str`): the concept and its run.
        embedding_dims (`list[int]`): the embedding's width per text encoder.
        lora_modules (`int`): how many U-Net modules the LoRA has.
        ranks (`list[int]`): its ranks (alpha = rank: the scale is folded into `lora_B`).
        report (`dict`): extra facts of the run (e.g. SVD energy kept).
        settings (`dict`): the run's `AttnDBConfig.to_dict()`.
        family (`str`, *optional*): the base model's family; `None` for SD 1.x/2.x, whose folders keep the keys
            they had before SDXL (no `family`, no `embedding_dims`).
    """
    record = {
        "format_version": FORMAT_VERSION,
        "token": token,
        "category": category,
        "base_model": base_model,
        "instance_prompt": instance_prompt,
        "embedding_dim": embedding_dims[0],
        "lora": {"modules": lora_modules, "ranks": ranks, "alpha": "rank (scale folded into lora_B)"},
        "files": {"embedding": EMBEDDING_NAME, "lora": LORA_NAME, "kohya": KOHYA_NAME},
        "report": report,
        "settings": settings,
        "versions": package_versions(),
    }
    if family is not None:
        record["family"] = family
        record["embedding_dims"] = embedding_dims
    return record


def write_config(path: Path, record: dict[str, Any]) -> None:
    """Write `attndb_config.json` (sorted keys: the same run gives the same bytes)."""
    path.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")


def check_format_version(version: str | None, label: str) -> None:
    """Refuse a folder written in a newer major format version than this attndb_peft reads.

    Args:
        version (`str`, *optional*): the recorded version; `None` (a hand-made or early file) passes.
        label (`str`): what the version came from, for the message.

    Raises:
        AdapterError: the version is unreadable or of a newer major version.
    """
    if version is None:
        return  # a hand-made file: the loader's other checks still apply
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise AdapterError(f"{label}: unreadable {FORMAT_VERSION_KEY} {version!r} in its header.") from None
    if major > int(FORMAT_VERSION.split(".")[0]):
        raise AdapterError(
            f"{label} uses adapter format {version}, newer than this attndb_peft reads ({FORMAT_VERSION}): "
            "upgrade with `pip install -U attndb_peft`."
        )


# ---------------------------------------------------------------------------------------------- locating files
@dataclass
class AdapterFiles:
    """Where the files `load_attndb` reads are on this machine (a local folder or the Hub cache)."""

    source: str  # what the user passed, for messages
    embedding: Path
    lora: Path

    @property
    def embedding_label(self) -> str:
        """How messages name the embedding file."""
        return f"{EMBEDDING_NAME} of {self.source}"

    @property
    def lora_label(self) -> str:
        """How messages name the LoRA file."""
        return f"{LORA_NAME} of {self.source}"


def locate_adapter_files(path_or_repo_id: str | os.PathLike, hub_kwargs: dict[str, Any]) -> AdapterFiles:
    """Find `LOADED_FILES` in a local adapter folder, or fetch them (and nothing else) from a Hub repo.

    Args:
        path_or_repo_id (`str` or `os.PathLike`): an adapter folder (checked first) or a Hub repo id.
        hub_kwargs (`dict`): `HUB_KWARGS` as given to `load_attndb`; `subfolder` applies to local folders too.

    Raises:
        AdapterError: no such folder or repo, a file is missing (or is a pickle), or the Hub can't be reached.
    """
    text = os.fspath(path_or_repo_id)
    subfolder = hub_kwargs.get("subfolder")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AdapterError(
                f"path_or_repo_id={text!r} is a file; pass the adapter folder that holds {EMBEDDING_NAME} and "
                f"{LORA_NAME} (what `attndb train --output` wrote)."
            )
        folder = path / subfolder if subfolder else path
        return _local_files(folder, text)
    if looks_like_repo_id(text):
        return _hub_files(text, hub_kwargs)
    raise AdapterError(
        f"path_or_repo_id={text!r}: no such folder, and it is not a Hub repo id ('user/name'). Pass the adapter "
        "folder written by `attndb train --output`, or the Hub repo it was pushed to."
    )


def _local_files(folder: Path, source: str) -> AdapterFiles:
    if not folder.is_dir():
        raise AdapterError(f"{source}: no folder {folder} (check subfolder=).")
    missing = [name for name in LOADED_FILES if not (folder / name).is_file()]
    if missing:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(
                f"{folder} has no {' or '.join(missing)} but has {', '.join(pickles)}: attndb_peft only loads "
                "safetensors files (loading a pickle file can run arbitrary code). Export the adapter again with "
                "attndb_peft, or convert the file with safetensors.torch.save_file."
            )
        raise AdapterError(
            f"{folder} is missing {', '.join(missing)}, so it is not a complete attndb adapter folder (expected "
            f"{EMBEDDING_NAME} and {LORA_NAME}, written by `attndb train`). Copy or download the whole folder again."
        )
    return AdapterFiles(source=source, embedding=folder / EMBEDDING_NAME, lora=folder / LORA_NAME)


def _hub_files(repo_id: str, hub_kwargs: dict[str, Any]) -> AdapterFiles:
    """Fetch `LOADED_FILES` with `hf_hub_download`, which reads them from the local Hub cache when they are there
    (offline mode included)."""
    import huggingface_hub  # looked up at call time: tests stand in for `hf_hub_download`
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = hub_kwargs.get("revision")
    where = f"Hub repo {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    paths = {}
    for filename in LOADED_FILES:
        try:
            paths[filename] = Path(
                huggingface_hub.hf_hub_download(
                    repo_id,
                    filename,
                    subfolder=hub_kwargs.get("subfolder"),
                    revision=revision,
                    cache_dir=hub_kwargs.get("cache_dir"),
                    token=hub_kwargs.get("hf_token"),
                    local_files_only=bool(hub_kwargs.get("local_files_only", False)),
                    force_download=bool(hub_kwargs.get("force_download", False)),
                )
            )
        except LocalEntryNotFoundError as exc:
            raise AdapterError(
                f"{filename} of {where} is not in the local Hub cache and the Hub could not be asked (offline: "
                f"HF_HUB_OFFLINE=1 or local_files_only=True, or no network). Download it once while online, or pass "
                f"the local adapter folder. ({exc})"
            ) from exc
        except EntryNotFoundError as exc:
            raise AdapterError(
                f"{where} has no {filename}: it is not an attndb adapter repo (push one with `attndb push`)."
            ) from exc
        except GatedRepoError as exc:
            raise AdapterError(
                f"{where} is gated: accept its terms on the Hub and pass hf_token=... (or `hf auth login`)."
            ) from exc
        except RepositoryNotFoundError as exc:
            raise AdapterError(
                f"{where} was not found (no local folder of that name either). Check the id; for a private repo pass "
                "hf_token=... or log in with `hf auth login`."
            ) from exc
        except RevisionNotFoundError as exc:
            raise AdapterError(f"{where}: no such revision; pass an existing branch, tag or commit.") from exc
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise AdapterError(f"Could not fetch {filename} from {where}: {exc}") from exc
    return AdapterFiles(source=repo_id, embedding=paths[EMBEDDING_NAME], lora=paths[LORA_NAME])


# ---------------------------------------------------------------------------------------------- reading files
def read_safetensors(path: Path, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file (tensors and header metadata), refusing anything else with a message that says
    what the file is, and refusing non-finite values.

    Raises:
        AdapterError: the file is a pickle, unreadable (corrupted, truncated) or holds NaN/inf.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
            raise AdapterError(
                f"{label} ({path}) is a pickle / PyTorch checkpoint, not safetensors. attndb_peft only loads "
                "safetensors (loading a pickle can run arbitrary code): export the adapter again with attndb_peft, "
                "or convert it with safetensors.torch.save_file."
            ) from exc
        raise AdapterError(
            f"{label} ({path}) is not a readable safetensors file ({exc}): it is corrupted or truncated. Download "
            "or export it again."
        ) from exc
    bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise AdapterError(
            f"{label} ({path}) holds non-finite values (NaN or inf) in {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}: the training run diverged or the file was "
            "damaged. Train again with lower learning rates, or use an earlier export."
        )
    return tensors, metadata


@dataclass
class AdapterContent:
    """The two files `load_attndb` reads, read and version-checked: tensors and header of each.

    Attributes:
        files (`AdapterFiles`): where they were read from.
        embedding (`dict[str, torch.Tensor]`): the embedding file's tensors.
        embedding_header (`dict[str, str]`): its header metadata.
        lora (`dict[str, torch.Tensor]`): the LoRA file's tensors.
        lora_header (`dict[str, str]`): its header metadata.
    """

    files: AdapterFiles
    embedding: dict[str, torch.Tensor]
    embedding_header: dict[str, str]
    lora: dict[str, torch.Tensor]
    lora_header: dict[str, str]

    @property
    def source(self) -> str:
        """What the user passed (folder or repo id), for messages."""
        return self.files.source

    @property
    def embedding_label(self) -> str:
        """How messages name the embedding file."""
        return self.files.embedding_label

    @property
    def lora_label(self) -> str:
        """How messages name the LoRA file."""
        return self.files.lora_label

    @property
    def token(self) -> str | None:
        """The token the embedding's header names (SDXL files carry no token in their tensor keys)."""
        return self.embedding_header.get(TOKEN_KEY)

    @property
    def embedding_base_model(self) -> str | None:
        """The base model the embedding names (else the LoRA's), for messages."""
        return self.embedding_header.get(BASE_MODEL_KEY) or self.lora_header.get(BASE_MODEL_KEY)

    @property
    def lora_base_model(self) -> str | None:
        """The base model the LoRA names (else the embedding's), for messages."""
        return self.lora_header.get(BASE_MODEL_KEY) or self.embedding_header.get(BASE_MODEL_KEY)


def read_adapter(path_or_repo_id: str | os.PathLike, hub_kwargs: dict[str, Any]) -> AdapterContent:
    """Locate (see `locate_adapter_files`), read and version-check the files `load_attndb` loads.

    Raises:
        AdapterError: see `locate_adapter_files`, `read_safetensors` and `check_format_version`.
    """
    files = locate_adapter_files(path_or_repo_id, hub_kwargs)
    embedding, embedding_header = read_safetensors(files.embedding, files.embedding_label)
    lora, lora_header = read_safetensors(files.lora, files.lora_label)
    content = AdapterContent(files, embedding, embedding_header, lora, lora_header)
    for label, header in ((content.embedding_label, embedding_header), (content.lora_label, lora_header)):
        check_format_version(header.get(FORMAT_VERSION_KEY), label)
    return content


# ---------------------------------------------------------------------------------------------- attndb_config.json
@dataclass
class AdapterInfo:
    """The concept an adapter adds, from its `attndb_config.json`: its token and category, the base model it
    was trained on, and where it came from.

    Attributes:
        source (`str`): the folder or Hub repo id it was read from.
        token (`str`): the concept's token.
        category (`str`): the concept's category word.
        base_model (`str`, *optional*): the base model it was trained on.
        config (`dict`): the whole file (`settings`, `lora`, `versions`, ...).
    """

    source: str
    token: str
    category: str
    base_model: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def family(self) -> str:
        """The base model's family name (`"sd"` for folders written before SDXL, which have no `family` key)."""
        return self.config.get("family", "sd")

    @property
    def settings(self) -> dict[str, Any]:
        """The run's `AttnDBConfig` settings, as recorded (`{}` if the file has none)."""
        settings = self.config.get("settings")
        return settings if isinstance(settings, dict) else {}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> AdapterInfo:
        """Validate the parsed content of `attndb_config.json` (only `token` and `category` are required).

        Raises:
            AdapterError: not a JSON object, or `token` or `category` missing.
        """
        label = f"{arg('adapter')} {source}: {CONFIG_NAME}"
        if not isinstance(data, dict):
            raise AdapterError(f"{label} is not a valid attndb config (not a JSON object).")
        missing = [key for key in ("token", "category") if key not in data]
        if missing:
            raise AdapterError(f"{label} is not a valid attndb config ({', '.join(map(repr, missing))}).")
        return cls(source, data["token"], data["category"], data.get("base_model"), data)


def read_adapter_config(path_or_repo_id: str | os.PathLike, token: str | None = None, **hub_kwargs) -> AdapterInfo:
    """Read `attndb_config.json` of an adapter folder or Hub repo (the file `attndb train` writes).

    Args:
        path_or_repo_id: a local adapter folder or a Hub repo id.
        token (`str`, *optional*): Hub access token for private repos.
        hub_kwargs: passed to `huggingface_hub.hf_hub_download` (e.g. `revision`, `cache_dir`).

    Raises:
        AdapterError: no such folder / repo, it has no `attndb_config.json`, or the file is not a valid one.
    """
    source = str(path_or_repo_id)
    path = Path(source)
    where = f"{arg('adapter')} {source}"
    if path.is_dir():
        file = path / CONFIG_NAME
        if not file.is_file():
            raise AdapterError(f"{where}: folder has no {CONFIG_NAME}; give a folder written by attndb train.")
    elif path.exists():
        raise AdapterError(f"{where}: is a file; give the adapter folder (the output of attndb train).")
    elif not looks_like_repo_id(source):
        raise AdapterError(
            f"{where}: no such folder, and not a Hub repo id ('user/name'); give the folder written by "
            "attndb train --output, or the Hub repo it was pushed to."
        )
    else:
        import huggingface_hub

        try:
            file = Path(huggingface_hub.hf_hub_download(source, CONFIG_NAME, token=token, **hub_kwargs))
        except Exception as exc:  # offline, gated, missing repo or file: say what was tried
            raise AdapterError(
                f"{where}: not a local folder, and fetching {CONFIG_NAME} from the Hub failed ({first_line(exc)}); "
                "give an existing adapter folder or a Hub repo id."
            ) from None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AdapterError(f"{where}: {CONFIG_NAME} is not a valid attndb config ({exc}).") from None
    return AdapterInfo.from_dict(data, source)
