# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""What differs between the model families attndb trains: SD 1.x/2.x and SDXL.

The trainer, the exporter and the loader ask a `ModelFamily` instead of branching on the family themselves:

| | SD 1.x / 2.x (`"sd"`) | SDXL (`"sdxl"`) |
|---|---|---|
| text encoders | `text_encoder` (768 or 1024 wide) | `text_encoder` (768), `text_encoder_2` (1280, projected) |
| U-Net context | the encoder's last hidden state | `cat(te1.hidden_states[-2], te2.hidden_states[-2])` (2048) |
| `added_cond_kwargs` | none | `text_embeds` (encoder 2's pooled output), `time_ids` (6 numbers) |
| embedding file | `{token: [hidden]}` | `{"clip_l": [1, 768], "clip_g": [1, 1280]}` (A1111/ComfyUI/kohya) |
| kohya key names | diffusers module paths | LDM block names (`input_blocks_4_1_...`), as sd-scripts writes |
| training resolution (default) | the model's own: 512 (SD 1.5, 2.1-base), 768 (SD 2.1) | 1024 |
| LoRA rank of stages 2-3 (default) | 32 | 16 (about as many parameters as SD's 32) |

The family is detected from the model itself (the U-Net's `addition_embed_type == "text_time"`, a pipeline's
second text encoder, a `model_index.json`'s `_class_name`), never from a user flag.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "FAMILIES",
    "SD",
    "SDXL",
    "Conditioning",
    "ModelFamily",
    "family_from_pipeline_class",
    "family_of_model",
    "family_of_pipeline",
    "family_of_unet_config",
    "ldm_unet_module_name",
    "native_resolution",
    "pool_at_end_of_text",
]


@dataclass
class Conditioning:
    """What the U-Net is conditioned on for one prompt: `states` `[1, seq, context]` (its `encoder_hidden_states`)
    and, for SDXL, `added` (`text_embeds` `[1, proj]` and `time_ids` `[1, 6]`, diffusers' `added_cond_kwargs`)."""

    states: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def for_batch(self, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """`(encoder_hidden_states, added_cond_kwargs)` for a batch of `size` samples in `dtype`."""
        states = self.states.expand(size, -1, -1).to(dtype)
        if self.added is None:
            return states, None
        return states, {k: v.expand(size, -1).to(dtype) for k, v in self.added.items()}


@dataclass(frozen=True)
class ModelFamily:
    """The facts of one model family (see the module docstring's table).

    Attributes:
        name (`str`): `"sd"` (SD 1.x/2.x) or `"sdxl"`.
        text_encoders (`tuple[str, ...]`): the pipeline's text-encoder component names, in order.
        tokenizers (`tuple[str, ...]`): the matching tokenizer component names.
        text_encoder_classes (`tuple[str, ...]`): the transformers class of each text encoder.
        embedding_keys (`tuple[str, ...]`, *optional*): the embedding file's key per text encoder; None: the file
            is `{token: [hidden]}` (one encoder, one vector).
        kohya_ldm_names (`bool`): the kohya copy names U-Net modules by their LDM blocks (what sd-scripts writes for
            SDXL) instead of their diffusers paths.
        kohya_base_model_version (`str`, *optional*): kohya's `ss_base_model_version`, when the family fixes it
            (SD 1.x and 2.x share a family here; their width tells them apart, see `export.base_model_family`).
        license (`str`, *optional*): the Hub license of the family's base models, when the family fixes it.
        pipeline_class (`str`): the diffusers text-to-image pipeline class.
        lora_loader_class (`str`): the diffusers LoRA loader mixin of the family's pipelines.
        default_lora_rank (`int`): the stage-2/3 LoRA rank when the user sets none. SDXL's U-Net has 70
            transformer blocks against SD's 16, with wider layers: at rank 32 its adapter holds 110 M parameters
            (a 442 MB folder) against SD 2.1-base's 17 M. Rank 16 halves that (55 M, ~221 MB, the size target of
            the SDXL issue) and still holds 3x SD's. Chosen for size, not from a quality measurement on SDXL (none
            has been possible here; see the README).
        default_batch_size (`int`), default_gradient_accumulation_steps (`int`), default_gradient_checkpointing
            (`bool`): the batch and memory setting when the user sets none. SD: the paper's 8 images a pass, no
            accumulation, no checkpointing. SDXL at 1024 px: 2 images a pass, 4 passes accumulated (the same 8
            images per optimizer step) and gradient checkpointing, the setting published SDXL LoRA trainers use to
            fit 24 GB cards; chosen from that practice, not measured here (no GPU has been available).
        vae_fp32_encode (`bool`): encode the latent cache in float32 even when the VAE is held in float16 (the
            SDXL VAE overflows in float16).
        pooled_from (`str`, *optional*): the text encoder whose pooled output conditions the U-Net (SDXL's
            `text_encoder_2`); it must pool at end-of-text (`pool_at_end_of_text`). None: only hidden states are
            used, and the encoders are left exactly as loaded.
        safety_checker (`bool`): the family's pipelines take a safety checker (`no_safety_checker` leaves it out).
    """

    name: str
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    text_encoder_classes: tuple[str, ...]
    embedding_keys: tuple[str, ...] | None
    kohya_ldm_names: bool
    kohya_base_model_version: str | None
    license: str | None
    pipeline_class: str
    lora_loader_class: str
    default_lora_rank: int
    default_batch_size: int
    default_gradient_accumulation_steps: int
    default_gradient_checkpointing: bool
    vae_fp32_encode: bool
    pooled_from: str | None
    safety_checker: bool

    @property
    def is_sdxl(self) -> bool:  # for messages and tests; code asks the attributes above
        return self.name == "sdxl"

    def no_safety_checker(self) -> dict:
        """The pipeline arguments (constructor, `from_pretrained`, `from_single_file`) that leave the safety
        checker and its image processor out; none for families whose pipelines have no checker."""
        if not self.safety_checker:
            return {}
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    # -------------------------------------------------------------------------------------- text side
    def components(self, pipe) -> list[tuple[object, object]]:
        """`(tokenizer, text_encoder)` pairs of a pipeline (or any object with the component attributes)."""
        return [(getattr(pipe, t), getattr(pipe, e)) for t, e in zip(self.tokenizers, self.text_encoders)]

    def fix_pooling(self, pairs) -> None:
        """Make the pooled text encoder (if the family uses one) pool at its tokenizer's end-of-text id; `pairs`:
        `(tokenizer, text_encoder)` in the family's order (see `pool_at_end_of_text`)."""
        for name, (tokenizer, encoder) in zip(self.text_encoders, pairs):
            if name == self.pooled_from:
                pool_at_end_of_text(encoder, tokenizer.eos_token_id)

    def encode(self, text_encoders, input_ids: list[torch.Tensor], resolution: int) -> Conditioning:
        """The U-Net conditioning of tokenized prompts, the way the family's diffusers pipeline computes it
        (`encode_prompt`, without classifier-free guidance).

        Args:
            text_encoders (`list`): the text encoders, in `self.text_encoders` order.
            input_ids (`list[torch.Tensor]`): `[batch, seq]` ids per encoder (from its own tokenizer).
            resolution (`int`): SDXL's size conditioning: `time_ids = (res, res, 0, 0, res, res)` (original size,
                crop top-left, target size), as diffusers' pipeline passes at generation with the defaults.
        """
        if len(self.text_encoders) == 1:  # SD 1.x/2.x: the last hidden state
            return Conditioning(text_encoders[0](input_ids[0])[0])
        hidden, pooled = [], None
        for encoder, ids in zip(text_encoders, input_ids):
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, what diffusers pools from
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        states = torch.cat(hidden, dim=-1)
        time_ids = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]], dtype=states.dtype, device=states.device
        ).expand(states.shape[0], -1)
        return Conditioning(states, {"text_embeds": pooled, "time_ids": time_ids})

    # -------------------------------------------------------------------------------------- embedding file
    def embedding_state_dict(self, token: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The embedding file's tensors: `vectors` holds one `[num_vectors, hidden]` tensor per text encoder.

        SD 1.x/2.x: `{token: [hidden]}` for one vector. The 1-D form is the one every client reads (diffusers,
        A1111, ComfyUI and InvokeAI; InvokeAI's installer rejects `[1, hidden]` as "unrecognized token dimension
        1"), and diffusers loads both forms into the same row, so the pictures do not change. SDXL keeps
        `[1, hidden]` per key, the shape A1111, ComfyUI, kohya and InvokeAI write and read there."""
        if self.embedding_keys is None:
            vector = vectors[0]
            return {token: vector[0] if vector.ndim == 2 and vector.shape[0] == 1 else vector}
        if len(vectors) != len(self.embedding_keys):
            raise ValueError(f"{self.name}: expected {len(self.embedding_keys)} embeddings, got {len(vectors)}")
        return dict(zip(self.embedding_keys, vectors))

    def split_embedding_file(self, tensors: dict[str, torch.Tensor]) -> tuple[str | None, list[torch.Tensor]]:
        """`(token in the file or None, one tensor per text encoder)` of an embedding file's tensors.

        Raises:
            ValueError: the keys are not the family's layout (the message says what was expected).
        """
        if self.embedding_keys is None:
            if len(tensors) != 1:
                raise ValueError(f"must hold exactly one tensor {{token: [vectors, width]}}; it holds {len(tensors)}")
            token, tensor = next(iter(tensors.items()))
            return token, [tensor]
        if set(tensors) != set(self.embedding_keys):
            raise ValueError(
                f"must hold the {self.name.upper()} tensors {', '.join(map(repr, self.embedding_keys))} (one per text "
                f"encoder); it holds {', '.join(map(repr, list(tensors)[:5])) or 'nothing'}"
            )
        return None, [tensors[k] for k in self.embedding_keys]

    # -------------------------------------------------------------------------------------- kohya names
    def kohya_module_name(self, module: str, unet_config) -> str:
        """The module part of a kohya key (`lora_unet_<this>`) for a diffusers U-Net module path."""
        name = ldm_unet_module_name(module, unet_config) if self.kohya_ldm_names else module
        return name.replace(".", "_")


SD = ModelFamily(
    name="sd",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    text_encoder_classes=("CLIPTextModel",),
    embedding_keys=None,
    kohya_ldm_names=False,
    kohya_base_model_version=None,
    license=None,
    pipeline_class="StableDiffusionPipeline",
    lora_loader_class="StableDiffusionLoraLoaderMixin",
    default_lora_rank=32,
    default_batch_size=8,
    default_gradient_accumulation_steps=1,
    default_gradient_checkpointing=False,
    vae_fp32_encode=False,
    pooled_from=None,
    safety_checker=True,
)
SDXL = ModelFamily(
    name="sdxl",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    embedding_keys=("clip_l", "clip_g"),
    kohya_ldm_names=True,
    kohya_base_model_version="sdxl_base_v1-0",
    license="openrail++",
    pipeline_class="StableDiffusionXLPipeline",
    lora_loader_class="StableDiffusionXLLoraLoaderMixin",
    default_lora_rank=16,
    default_batch_size=2,
    default_gradient_accumulation_steps=4,
    default_gradient_checkpointing=True,
    vae_fp32_encode=True,
    pooled_from="text_encoder_2",
    safety_checker=False,
)
FAMILIES = {family.name: family for family in (SD, SDXL)}


# ---------------------------------------------------------------------------------------------- detection
def family_of_unet_config(unet_config) -> ModelFamily:
    """The family of a U-Net config (a dict or diffusers `FrozenDict`): SDXL's U-Net adds the pooled text and
    size embeddings (`addition_embed_type == "text_time"`)."""
    return SDXL if dict(unet_config).get("addition_embed_type") == "text_time" else SD


def native_resolution(unet_config, vae_config=None) -> int:
    """The square size a model generates at, in pixels: the U-Net's `sample_size` (latent cells) times the VAE's
    downscaling (2 per VAE block after the first; 8 for every released SD and SDXL VAE, assumed without
    `vae_config`). Not a per-family constant: SD 2.1 (768) and SD 2.1-base (512) are one family."""
    blocks = len(dict(vae_config)["block_out_channels"]) if vae_config is not None else 4
    return int(dict(unet_config)["sample_size"]) * 2 ** (blocks - 1)


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a pipeline (or of an object holding pipeline components as attributes)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return family_of_unet_config(unet.config)
    return SDXL if getattr(pipe, "text_encoder_2", None) is not None else SD


def family_from_pipeline_class(class_name: str | None) -> ModelFamily | None:
    """The family a diffusers pipeline class name (`model_index.json`'s `_class_name`) stands for, if known."""
    if not class_name:
        return None
    if class_name.startswith("StableDiffusionXL"):
        return SDXL
    if class_name.startswith("StableDiffusion") and not class_name.startswith("StableDiffusion3"):
        return SD  # SD3's pipelines have a transformer, not a U-Net: no family here
    return None


def family_of_model(model: str | os.PathLike, revision: str | None = None) -> ModelFamily:
    """The family of a base model (a diffusers folder or Hub id): its `model_index.json` pipeline class, else its
    U-Net config; SD when neither can be read (a single file: ask its `--model-config` instead)."""
    path = Path(model).expanduser()
    index = None
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        elif not path.exists():
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(str(model), revision=revision)
    except Exception:  # no index: fall back to the U-Net config below
        index = None
    family = family_from_pipeline_class((index or {}).get("_class_name"))
    if family is not None:
        return family
    try:
        from diffusers import UNet2DConditionModel

        return family_of_unet_config(UNet2DConditionModel.load_config(str(model), subfolder="unet", revision=revision))
    except Exception:
        return SD


# ---------------------------------------------------------------------------------------------- fixes and names
def pool_at_end_of_text(text_encoder, eos_token_id: int) -> None:
    """Make a CLIP text model pool its output at the tokenizer's real end-of-text id.

    The SDXL release's `text_encoder_2` config has the legacy `eos_token_id: 2`, with which transformers pools at
    `argmax(input_ids)`: once a concept token is added (the highest id), the pooled `text_embeds` come from the
    concept token instead of end-of-text. A1111 and ComfyUI pool at end-of-text; so does this. The text model
    reads the id from its config at init into an attribute, so both are set. For prompts without added tokens the
    two rules pick the same position (end-of-text is the highest id of CLIP's own vocabulary), so the base model's
    outputs do not change."""
    text_encoder.config.eos_token_id = eos_token_id
    for module in text_encoder.modules():
        if "eos_token_id" in vars(module):
            module.eos_token_id = eos_token_id


def ldm_unet_module_name(module: str, unet_config) -> str:
    """The original (LDM/SGM) name of a diffusers U-Net module inside a transformer block, e.g.
    `down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_q` -> `input_blocks.7.1.transformer_blocks.0.attn2.to_q`
    for SDXL (`layers_per_block=2`). The inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`, for the
    attention blocks attndb's LoRAs target (resnets are never targeted).

    Raises:
        ValueError: the module is not inside a down/mid/up attention block.
    """
    layers = dict(unet_config)["layers_per_block"]
    parts = module.split(".")
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        position = int(parts[1]) * (layers + 1) + int(parts[3]) + 1
        return ".".join(["input_blocks", str(position), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        position = int(parts[1]) * (layers + 1) + int(parts[3])
        return ".".join(["output_blocks", str(position), "1", *parts[4:]])
    raise ValueError(f"no LDM name for U-Net module {module!r} (only attention blocks are covered)")
