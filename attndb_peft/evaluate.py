# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The paper's quantitative metrics for a trained concept (`attndb evaluate`).

For every evaluation prompt, images are generated with the concept (`{}` -> `TOKEN CATEGORY`), then:

- **identity** (CLIP-I): the mean CLIP image-image cosine similarity between each generated image and each
  instance image (all pairs);
- **text alignment** (CLIP-T): the mean CLIP image-text cosine similarity between each generated image and its
  prompt *without the token* (`{}` -> `CATEGORY`), i.e. how well the picture follows the rest of the prompt;
- **DINO identity** (optional, `--dino MODEL`): as identity, with the DINO ViT's CLS embeddings (DreamBooth's
  DINO score), which is more sensitive to the subject's appearance than CLIP.

The built-in prompt set has 24 prompts in four groups (background change, interaction, colour change, artistic
style); results are reported per prompt, per group and overall, in `metrics.json`, with a captioned grid.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapter_format import AdapterInfo, package_versions
from .config import DEFAULT_CLIP_MODEL
from .data import load_image, scan_image_folder
from .errors import UsageError, arg, first_line
from .inference import expand_prompt, generate_images, resolve_device, sample_guidance
from .visualize import image_grid

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "EVALUATION_PROMPTS",
    "ClipEmbedder",
    "DinoEmbedder",
    "evaluate_concept",
    "evaluation_prompts",
    "identity_similarity",
    "load_reference_images",
    "read_prompts_file",
    "split_group",
    "text_alignment",
]

logger = logging.getLogger(__name__)

#: The built-in evaluation prompts by group; `{}` expands to `TOKEN CATEGORY` (and to `CATEGORY` for scoring).
EVALUATION_PROMPTS: dict[str, tuple[str, ...]] = {
    "background": (
        "a photo of a {} in the jungle",
        "a photo of a {} on the beach",
        "a photo of a {} in the snow",
        "a photo of a {} on a city street at night",
        "a photo of a {} in front of the Eiffel Tower",
        "a photo of a {} on top of a wooden table",
    ),
    "interaction": (
        "a photo of a {} wearing a red hat",
        "a photo of a {} wearing sunglasses",
        "a photo of a {} playing with a ball",
        "a photo of a {} next to a cat",
        "a photo of a {} swimming in a pool",
        "a photo of a person holding a {}",
    ),
    "color": (
        "a photo of a red {}",
        "a photo of a blue {}",
        "a photo of a green {}",
        "a photo of a yellow {}",
        "a photo of a purple {}",
        "a photo of a pink {}",
    ),
    "style": (
        "a watercolor painting of a {}",
        "an oil painting of a {} in the style of Van Gogh",
        "a pencil sketch of a {}",
        "a {} in pixel art style",
        "a cyberpunk illustration of a {}",
        "a marble sculpture of a {}",
    ),
}


def evaluation_prompts() -> list[tuple[str, str]]:
    """The built-in prompt set as `(group, prompt)` pairs (24 prompts)."""
    return [(group, prompt) for group, prompts in EVALUATION_PROMPTS.items() for prompt in prompts]


def split_group(line: str, default: str = "custom") -> tuple[str, str]:
    """`"group: prompt"` -> `(group, prompt)` when the part before the colon is one word; else `(default, line)`."""
    group, sep, rest = line.strip().partition(":")
    if sep and group.strip().isidentifier() and rest.strip():
        return group.strip(), rest.strip()
    return default, line.strip()


def read_prompts_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a prompts file: one prompt per line; blank lines and lines starting with `#` are skipped; a line
    `group: prompt` puts the prompt in a group (else group `custom`). Returns `(group, prompt)` pairs."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{arg('prompts')} {path}: no such file; give a text file with one prompt per line.")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = [split_group(line) for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UsageError(f"{arg('prompts')} {path}: no prompts in the file; write one prompt per line.")
    return prompts


def load_reference_images(folder: str | os.PathLike) -> list:
    """The instance images of `folder` (same discovery and decoding as training), as RGB PIL images."""
    report = scan_image_folder(folder, 0)
    if report.problems or not report.images:
        problems = report.problems or [f"{arg('images')} {folder}: no images found (png, jpg, webp, ...)."]
        raise UsageError(" ".join(problems))
    return [load_image(p) for p in report.images]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def identity_similarity(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity over all (generated, reference) pairs of image embeddings `[n, d]`, `[m, d]`."""
    return float((_normalize(generated) @ _normalize(references).T).mean())


def text_alignment(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine similarity between each image embedding and its own text embedding (`[n, d]` each)."""
    return float((_normalize(images) * _normalize(texts)).sum(-1).mean())


class ClipEmbedder:
    """CLIP image and text embeddings (the projected, pooled features CLIP's similarity uses).

    Args:
        model (`str`): a Hub id (e.g. `openai/clip-vit-base-patch32`) or a local folder with a `CLIPModel` and
            its processor.
        device (`str`, *optional*): default the best available.
        setting (`str`, *optional*): the flag or setting that named `model`, for the error message.
    """

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device: str | None = None, setting: str = "clip") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = resolve_device(device)
        try:
            self.model = CLIPModel.from_pretrained(model).to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except Exception as exc:
            raise UsageError(
                f"{arg(setting)} {model}: cannot load a CLIP model and processor ({first_line(exc)})."
            ) from None

    @torch.no_grad()
    def images(self, images: Sequence, batch_size: int = 16) -> torch.Tensor:
        """`[len(images), projection_dim]` float32 image embeddings (not normalised), on the CPU."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor.image_processor(
                images=list(images[start : start + batch_size]), return_tensors="pt"
            )
            pooled = self.model.vision_model(pixel_values=pixels.pixel_values.to(self.device)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """`[len(texts), projection_dim]` float32 text embeddings (not normalised), on the CPU."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.processor.tokenizer(
                list(texts[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            ).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)


class DinoEmbedder:
    """DINO ViT image embeddings: the CLS token of the last layer (as DreamBooth's DINO metric).

    Args:
        model (`str`): a Hub id (e.g. `facebook/dino-vits16`) or a local folder with the model and its image
            processor.
        device (`str`, *optional*): default the best available.
        setting (`str`, *optional*): the flag or setting that named `model`, for the error message.
    """

    def __init__(self, model: str, device: str | None = None, setting: str = "dino") -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.device = resolve_device(device)
        try:
            self.model = AutoModel.from_pretrained(model).to(self.device).eval()
            self.processor = AutoImageProcessor.from_pretrained(model)
        except Exception as exc:
            raise UsageError(
                f"{arg(setting)} {model}: cannot load a ViT model and image processor ({first_line(exc)})."
            ) from None

    @torch.no_grad()
    def images(self, images: Sequence, batch_size: int = 16) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor(images=list(images[start : start + batch_size]), return_tensors="pt")
            hidden = self.model(pixel_values=pixels.pixel_values.to(self.device)).last_hidden_state
            out.append(hidden[:, 0].float().cpu())
        return torch.cat(out)


def evaluate_concept(
    pipe,
    info: AdapterInfo,
    references: Sequence,
    output_dir: str | os.PathLike,
    clip: ClipEmbedder,
    dino: DinoEmbedder | None = None,
    prompts: Sequence[tuple[str, str]] | None = None,
    num_images: int = 4,
    seed: int = 0,
    steps: int = 30,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate `num_images` per prompt with the concept and score them.

    Args:
        pipe: a `StableDiffusionPipeline` with the adapter loaded.
        info (`AdapterInfo`): the adapter's token and category.
        references (`Sequence[PIL.Image.Image]`): the instance images.
        output_dir: where `images/`, `metrics.json` and `grid.png` go.
        clip (`ClipEmbedder`): CLIP for identity and text alignment.
        dino (`DinoEmbedder`, *optional*): DINO for the DINO identity.
        prompts (`Sequence[tuple[str, str]]`, *optional*): `(group, prompt)` pairs; default the built-in set.
        num_images, seed, steps, guidance, height, width: generation settings (image `i` of every prompt uses
            seed `seed + i`).
        settings (`dict`, *optional*): extra facts for `metrics.json` (model, adapter, ...).

    Returns:
        `dict`: the content of `metrics.json` (`identity`, `text_alignment`, optional `dino_identity`, per group
        and per prompt results, settings).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts or evaluation_prompts())
    guidance = sample_guidance(pipe, guidance)
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    generated, rows, records = [], [], []
    bar = tqdm(prompts, desc="evaluate", disable=logger.getEffectiveLevel() > logging.INFO)
    for p, (group, prompt) in enumerate(bar):
        full = expand_prompt(prompt, info.token, info.category)
        images = generate_images(pipe, full, num_images, seed, steps, guidance, height, width)
        files = []
        for i, image in enumerate(images):
            path = output_dir / "images" / f"{p:02d}-{i:02d}.png"
            image.save(path)
            files.append(f"images/{path.name}")
        generated += images
        rows.append(images)
        records.append(
            {
                "group": group,
                "prompt": prompt,
                "generated_with": full,
                "scored_against": expand_prompt(prompt, None, info.category),
                "files": files,
            }
        )

    image_emb = clip.images(generated)
    reference_emb = clip.images(list(references))
    text_emb = clip.texts([r["scored_against"] for r in records])
    dino_gen = dino.images(generated) if dino else None
    dino_ref = dino.images(list(references)) if dino else None

    for p, record in enumerate(records):
        part = slice(p * num_images, (p + 1) * num_images)
        texts = text_emb[p : p + 1].expand(num_images, -1)
        record["identity"] = identity_similarity(image_emb[part], reference_emb)
        record["text_alignment"] = text_alignment(image_emb[part], texts)
        if dino:
            record["dino_identity"] = identity_similarity(dino_gen[part], dino_ref)
    per_image_text = text_emb.repeat_interleave(num_images, dim=0)
    metrics: dict[str, Any] = {
        "identity": identity_similarity(image_emb, reference_emb),
        "text_alignment": text_alignment(image_emb, per_image_text),
    }
    if dino:
        metrics["dino_identity"] = identity_similarity(dino_gen, dino_ref)
    groups = {}
    for group in dict.fromkeys(r["group"] for r in records):
        members = [r for r in records if r["group"] == group]
        groups[group] = {k: float(np.mean([r[k] for r in members])) for k in metrics} | {"prompts": len(members)}
    result = {
        **metrics,
        "groups": groups,
        "prompts": records,
        "token": info.token,
        "category": info.category,
        "adapter": info.source,
        "num_images": num_images,
        "num_references": len(references),
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        **(settings or {}),
        "versions": package_versions(),
    }
    (output_dir / "metrics.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    labels = [
        f"[{r['group']}] {r['generated_with']}  (identity {r['identity']:.3f}, text {r['text_alignment']:.3f})"
        for r in records
    ]
    title = (
        f"{info.token} {info.category}: identity {metrics['identity']:.3f}, "
        f"text alignment {metrics['text_alignment']:.3f}"
    )
    image_grid(rows, row_labels=labels, cell_size=128, title=title).save(output_dir / "grid.png")
    return result
