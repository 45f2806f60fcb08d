# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The adapter folder writer. The file names and header keys are defined in `adapter_format.py`, which every
reader uses too; this module fills the files from a run's settings, embedding and combined LoRA:

- the embedding in diffusers' textual-inversion layout, loadable with `pipe.load_textual_inversion(file)`;
- stages 2+3 as one LoRA in diffusers/PEFT keys, written by diffusers' own `save_lora_weights`;
- the same LoRA in kohya keys (`lora_unet_*.lora_down/lora_up/alpha`) for A1111/ComfyUI;
- `attndb_config.json` with token, category, base model, every setting, ranks and package versions;
- the model card, rendered from `model_card_template.md`.

SDXL adapters differ in two files (families.py): the embedding is `{"clip_l": [1, 768], "clip_g": [1, 1280]}`
(one `load_textual_inversion` call per text encoder) and the kohya copy names modules by their LDM blocks.

Every file is written to a temporary folder first and moved into place only when all of them are complete, so
an interrupted export never leaves a mix of old and new files that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapter_format import (
    ALPHAS_KEY,
    CONFIG_NAME,
    EMBEDDING_NAME,
    FORMAT_VERSION,
    KOHYA_NAME,
    LORA_NAME,
    MODEL_CARD_NAME,
    adapter_name_for_token,
    config_record,
    header_metadata,
    looks_like_repo_id,
    package_versions,
    write_config,
)
from .base_model import known_base_model
from .config import AttnDBConfig
from .families import SD, ModelFamily
from .stages import LoraFactors, combined_lora_config

# The file names, FORMAT_VERSION and package_versions are the adapter contract's (adapter_format.py), re-exported
# for callers that import them from the writer.
__all__ = [
    "CONFIG_NAME",
    "EMBEDDING_NAME",
    "FORMAT_VERSION",
    "KOHYA_NAME",
    "LORA_NAME",
    "MODEL_CARD_NAME",
    "REPO_PLACEHOLDER",
    "base_model_family",
    "export_adapter",
    "kohya_alpha",
    "kohya_state_dict",
    "package_versions",
    "peft_state_dict",
    "render_model_card",
]

#: Stands for the adapter's location in the model card's snippets; `push_to_hub` replaces it with the repo id.
REPO_PLACEHOLDER = "REPO_OR_FOLDER"

# Text-encoder width -> (kohya ss_base_model_version, Hub license of the base model). SD 1.x uses CLIP ViT-L
# (768) under CreativeML OpenRAIL-M; SD 2.x uses OpenCLIP ViT-H (1024) under OpenRAIL++.
_FAMILIES = {768: ("sd_v1", "creativeml-openrail-m"), 1024: ("sd_v2", "openrail++")}

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def base_model_family(
    model: str, embedding_dim: int | None = None, family: ModelFamily = SD
) -> tuple[str | None, str]:
    """`(kohya base model version, Hub license)` of a base model: fixed by `family` where the family fixes it
    (SDXL), else from its text-encoder width when known (a local folder's name says nothing), else from its name;
    `(None, "other")` when nothing tells."""
    if family.kohya_base_model_version is not None:
        return family.kohya_base_model_version, family.license or "other"
    if embedding_dim in _FAMILIES:
        return _FAMILIES[embedding_dim]
    known = known_base_model(model)  # also ids that have moved, e.g. stabilityai/stable-diffusion-2-1-base
    if known is not None:
        return known.family, known.license
    name = model.lower()
    if re.search(r"stable-diffusion-v1|sd-?1[.-]?[45]|v1-[45]", name):
        return _FAMILIES[768]
    if re.search(r"stable-diffusion-2|sd-?2[.-]?[01]", name):
        return _FAMILIES[1024]
    return None, "other"


def peft_state_dict(lora: dict[str, LoraFactors], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT keys without the `unet.` prefix (diffusers' `save_lora_weights` adds it)."""
    state = {}
    for name, factors in lora.items():
        state[f"{name}.lora_A.weight"] = factors.down.to(dtype).contiguous()
        state[f"{name}.lora_B.weight"] = (factors.up * factors.scale).to(dtype).contiguous()
    return state


def kohya_alpha(lora: dict[str, LoraFactors]) -> int:
    """The one `alpha` every module of the kohya copy carries: the most common rank."""
    return Counter(f.rank for f in lora.values()).most_common(1)[0][0]


def kohya_state_dict(
    lora: dict[str, LoraFactors], dtype: torch.dtype, family: ModelFamily = SD, unet_config=None
) -> dict[str, torch.Tensor]:
    """kohya-ss keys, as sd-scripts' `networks.lora` writes them: `lora_unet_<module>.lora_down.weight`,
    `.lora_up.weight` and a scalar `.alpha`, where `<module>` is the diffusers module path with '.' -> '_' for SD
    1.x/2.x and the LDM block name for SDXL (`input_blocks_4_1_transformer_blocks_0_attn2_to_q`, what kohya's own
    SDXL tools read; needs `unet_config` for the block numbering).

    Loaders apply `alpha / rank * lora_up @ lora_down`. Every module gets the same alpha (`kohya_alpha`) and the
    rest of its scale is folded into `lora_up`: diffusers' kohya converter keeps a single alpha exactly but
    misnames per-module alphas of attention layers (its `alpha_pattern` keys keep the old
    `attn2.processor.to_k_lora` spelling and match nothing), which would silently rescale the stage-2 attention
    modules, whose rank differs from the others'. A1111 and ComfyUI read the alpha per module, so a uniform alpha
    is exact for them as well."""
    alpha = kohya_alpha(lora)
    state = {}
    for name, factors in lora.items():
        key = family.kohya_prefix + family.kohya_module_name(name, unet_config)
        state[f"{key}.lora_down.weight"] = factors.down.to(dtype).contiguous()
        up = factors.up.float() * (factors.scale * factors.rank / alpha)
        state[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return state


def _common_metadata(config: AttnDBConfig, lora: dict[str, LoraFactors]) -> dict[str, str]:
    ranks = sorted({f.rank for f in lora.values()})
    return header_metadata(
        token=config.token,
        category=config.category,
        base_model=config.model,
        stage3_mode=config.stage3_mode,
        ranks=ranks,
        alphas=ranks,  # alpha = rank everywhere: the scale is folded into lora_up
        version=package_versions()["attndb_peft"],
    )


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})


def render_model_card(
    config: AttnDBConfig,
    lora: dict[str, LoraFactors],
    report: dict[str, Any],
    samples: list[tuple[str, str]],
    embedding_dim: int | None = None,
    repo_id: str | None = None,
    family: ModelFamily = SD,
) -> str:
    """Render `model_card_template.md` with the run's settings: Hub YAML front matter (base model and its license,
    tags, instance prompt, widget entries for the samples), usage with attndb_peft, stock diffusers, A1111 and
    ComfyUI, and the training settings table.

    Args:
        config (`AttnDBConfig`): the run's settings.
        lora (`dict[str, LoraFactors]`): the exported LoRA (for ranks and module count).
        report (`dict`): extra facts (e.g. `full_export_retained`).
        samples (`list[tuple[str, str]]`): (prompt, relative image path) pairs; `{}` in a prompt expands to
            `TOKEN CATEGORY`.
        embedding_dim (`int`, *optional*): the text-encoder width, which tells SD 1.x from 2.x (license).
        repo_id (`str`, *optional*): where the adapter will live; default `config.push_to_hub`, else the
            `REPO_OR_FOLDER` placeholder that `push_to_hub` fills in.
        family (`ModelFamily`, *optional*): the base model's family (default SD 1.x/2.x).
    """
    from huggingface_hub import ModelCard, ModelCardData

    template = Path(__file__).with_name("model_card_template.md")
    _, license_ = base_model_family(config.model, embedding_dim, family)
    # The Hub only accepts repo ids as base_model; a local folder is named in the text instead.
    is_hub_id = looks_like_repo_id(config.model) and not Path(config.model).expanduser().exists()
    expanded = [(p.replace("{}", f"{config.token} {config.category}"), path) for p, path in samples]
    card_data = ModelCardData(
        base_model=config.model if is_hub_id else None,
        license=license_,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["attndb", "lora", "textual-inversion", "diffusers", "text-to-image", "stable-diffusion"]
        + {"sdxl": ["stable-diffusion-xl"], "sd3": ["sd3", "sd3.5"], "flux": ["flux"]}.get(family.name, []),
        instance_prompt=config.prompt,
        widget=[{"text": p, "output": {"url": path}} for p, path in expanded] or None,
    )
    ranks = sorted({f.rank for f in lora.values()})
    attention = "attn2" if family.denoiser == "unet" else "joint-attention"
    stages = [
        ("1 embedding", config.stage1, "token embedding"),
        ("2 attention", config.stage2, f"{attention} LoRA r={config.stage2.rank}"),
        (
            "3 identity",
            config.stage3,
            f"{'U-Net' if family.denoiser == 'unet' else 'transformer'} LoRA r={config.stage3.rank}"
            if config.stage3_mode == "lora"
            else f"full {'U-Net' if family.denoiser == 'unet' else 'transformer'}",
        ),
    ]
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        token=config.token,
        adapter_name=adapter_name_for_token(config.token),
        category=config.category,
        base_model=config.model,
        base_model_is_hub_id=is_hub_id,
        repo=repo_id or config.push_to_hub or REPO_PLACEHOLDER,
        prompt=config.prompt,
        stages=[
            {
                "name": n,
                "trains": t,
                "steps": s.steps,
                "lr": f"{s.learning_rate:g}",
                "lambda_mu": s.lambda_mu,
                "lambda_var": s.lambda_var,
            }
            for n, s, t in stages
        ],
        resolution=config.resolution,
        batch_size=config.batch_size,
        seed=config.seed,
        regularizer=config.regularizer,
        masked_loss=config.masked_loss,
        ranks=", ".join(map(str, ranks)),
        num_modules=len(lora),
        report=report,
        samples=expanded,
        versions=package_versions(),
        sdxl=family.is_sdxl,
        joint=not family.textual_inversion,
        pipeline_class=family.pipeline_class,
        denoiser="U-Net" if family.denoiser == "unet" else "transformer",
        encoders=list(zip(family.tokenizers, family.text_encoders, family.embedding_keys or ())),
        embedding_keys=list(family.embedding_keys or ()),
        embedding_name=EMBEDDING_NAME,
        lora_name=LORA_NAME,
        kohya_name=KOHYA_NAME,
        config_name=CONFIG_NAME,
    )
    return str(card)


def export_adapter(
    output_dir: str | os.PathLike,
    config: AttnDBConfig,
    embedding: torch.Tensor | list[torch.Tensor],
    lora: dict[str, LoraFactors],
    report: dict[str, Any] | None = None,
    samples: list[tuple[str, str]] | None = None,
    family: ModelFamily = SD,
    unet_config=None,
) -> list[Path]:
    """Write the adapter folder.

    Args:
        output_dir: the run's output folder.
        config (`AttnDBConfig`): the run's settings.
        embedding (`torch.Tensor` or `list[torch.Tensor]`): the trained token embedding, `[1, hidden]`, one per
            text encoder of the family (SDXL: `[1, 768]` and `[1, 1280]`).
        lora (`dict[str, LoraFactors]`): the final U-Net LoRA by module name (stages 2+3 combined).
        report (`dict`, *optional*): extra facts for the config and card (e.g. SVD energy kept).
        samples (`list[tuple[str, str]]`, *optional*): (prompt, relative image path) pairs for the card.
        family (`ModelFamily`, *optional*): the base model's family (default SD 1.x/2.x): embedding layout, kohya
            names, pipeline class.
        unet_config (*optional*): the U-Net's config; needed for SDXL's kohya names (block numbering).

    Returns:
        `list[Path]`: the files written.
    """
    import diffusers

    output_dir = Path(output_dir)
    report = dict(report or {})
    dtype = _DTYPES[config.save_dtype]
    embeddings = [embedding] if isinstance(embedding, torch.Tensor) else list(embedding)
    if not all(torch.isfinite(e).all() for e in embeddings) or any(
        not (torch.isfinite(f.down).all() and torch.isfinite(f.up).all()) for f in lora.values()
    ):
        raise ValueError("Refusing to export non-finite weights; the run diverged (lower the learning rate).")
    metadata = _common_metadata(config, lora)
    tmp = output_dir / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    vectors = [e.to(dtype).contiguous() for e in embeddings]
    _save(family.embedding_state_dict(config.token, vectors), tmp / EMBEDDING_NAME, metadata)

    # diffusers writes the LoRA (its key packing and adapter metadata); then our metadata is added to the header.
    getattr(diffusers, family.pipeline_class).save_lora_weights(
        tmp,
        weight_name=LORA_NAME,
        **{  # unet_lora_layers, or transformer_lora_layers for the joint-attention families
            f"{family.denoiser}_lora_layers": peft_state_dict(lora, dtype),
            f"{family.denoiser}_lora_adapter_metadata": combined_lora_config(lora).to_dict(),
        },
    )
    with safe_open(str(tmp / LORA_NAME), framework="pt") as f:
        diffusers_metadata = f.metadata() or {}
    _save(load_file(str(tmp / LORA_NAME)), tmp / LORA_NAME, {**diffusers_metadata, **metadata})

    ranks = sorted({f.rank for f in lora.values()})
    width = int(embeddings[0].shape[-1])
    kohya_family, _ = base_model_family(config.model, width, family)
    alpha = kohya_alpha(lora)
    # The keys sd-scripts writes for a LoRA; A1111/ComfyUI show them, none of them changes how it loads.
    kohya_meta = {
        **metadata,
        ALPHAS_KEY: json.dumps([alpha]),  # the kohya copy has one alpha for every module
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(alpha),
        "ss_network_alpha": str(alpha),
        "ss_output_name": config.token.strip("<>"),
        "ss_sd_model_name": config.model,
        "ss_training_comment": f"AttnDreamBooth concept {config.token} ({config.category}); "
        f"embedding in {EMBEDDING_NAME}",
    }
    if kohya_family is not None:
        kohya_meta["ss_base_model_version"] = kohya_family
        kohya_meta["ss_v2"] = str(kohya_family == "sd_v2")
    _save(kohya_state_dict(lora, dtype, family, unet_config), tmp / KOHYA_NAME, kohya_meta)

    run_info = config_record(
        token=config.token,
        category=config.category,
        base_model=config.model,
        instance_prompt=config.prompt,
        embedding_dims=[int(e.shape[-1]) for e in embeddings],
        lora_modules=len(lora),
        ranks=ranks,
        report=report,
        settings=config.to_dict(),
        family=None if family is SD else family.name,
    )
    write_config(tmp / CONFIG_NAME, run_info)
    card = render_model_card(config, lora, report, samples or [], embedding_dim=width, family=family)
    (tmp / MODEL_CARD_NAME).write_text(card, encoding="utf-8")

    written = []
    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(tmp.iterdir()):
        os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; adapters are meant to be shared
        os.replace(path, output_dir / path.name)
        written.append(output_dir / path.name)
    tmp.rmdir()
    return written
