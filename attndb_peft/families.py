# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""What differs between the model families attndb trains: SD 1.x/2.x, SDXL, SD3/3.5 and Flux.1.

The trainer, the exporter and the loader ask a `ModelFamily` instead of branching on the family themselves:

| | SD 1.x/2.x (`"sd"`) | SDXL (`"sdxl"`) | SD3/3.5 (`"sd3"`) | Flux.1 (`"flux"`) |
|---|---|---|---|---|
| denoiser, training | U-Net, DDPM | U-Net, DDPM | MMDiT, rectified flow | MMDiT, flow, guidance 3.5 |
| text encoders | CLIP | CLIP-L, CLIP-G | CLIP-L, CLIP-G, T5 | CLIP-L (pooled), T5 |
| regularizer reads | attn2 | attn2 | every joint block | double and single blocks |
| at the positions of | CLIP | CLIP | CLIP-L | T5 |
| stage 2 LoRA | attn2 q/k/v/out | the same | `to_q`, `add_k/v_proj`, `to_out.0` | the same + single q/k/v |
| embedding keys | `{token}` | `clip_l`, `clip_g` | `clip_l`, `clip_g`, `t5`, `t5xxl` | `clip_l`, `t5`, `t5xxl` |
| kohya copy | `lora_unet_` | `lora_unet_`, LDM names | `lora_transformer_` | `lora_transformer_` |
| LoRA rank (default) | 32 | 16 | 16 | 16 |

SDXL's U-Net context is `cat(te1.hidden_states[-2], te2.hidden_states[-2])` with encoder 2's pooled output and
`time_ids`; SD3's is both CLIPs' penultimate states side by side, padded to T5's width, then T5's states along the
sequence, with both CLIPs' pooled outputs; Flux's is T5's states, with CLIP-L's pooled output.

The family is detected from the model itself (the U-Net's `addition_embed_type == "text_time"`, the transformer's
class, a pipeline's second text encoder, a `model_index.json`'s `_class_name`), never from a user flag. The
joint-attention families are subclasses (`SD3Family`, `FluxFamily`) that override how a prompt is encoded, how the
denoiser is called and how its attention is captured.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import capture_cross_attention, cross_attention_names
from .joint_attention import capture_joint_attention, joint_attention_names
from .stages import STAGE2_TARGET_MODULES, STAGE3_TARGETS

__all__ = [
    "FAMILIES",
    "FLUX",
    "SD",
    "SD3",
    "SDXL",
    "Conditioning",
    "FluxFamily",
    "JointAttentionFamily",
    "ModelFamily",
    "SD3Family",
    "family_from_pipeline_class",
    "family_of_denoiser",
    "family_of_model",
    "family_of_pipeline",
    "family_of_unet_config",
    "ldm_unet_module_name",
    "native_resolution",
    "pack_latents",
    "pool_at_end_of_text",
    "unpack_latents",
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
        pooled_from (`tuple[str, ...]`): the text encoders whose pooled output conditions the denoiser (SDXL's
            `text_encoder_2`, SD3's two CLIPs, Flux's CLIP-L); they must pool at end-of-text
            (`pool_at_end_of_text`). Empty: only hidden states are used, and the encoders are left exactly as
            loaded.
        safety_checker (`bool`): the family's pipelines take a safety checker (`no_safety_checker` leaves it out).
        denoiser (`str`), denoiser_class (`str`): the denoiser's pipeline component name and diffusers class
            (`"unet"`, or `"transformer"` for the joint-attention families).
        noise_scheduler_class (`str`): the diffusers scheduler of the training noise (built from the base model's
            scheduler config).
        flow_matching (`bool`): the denoiser is trained by rectified flow (SD3, Flux) instead of DDPM noise.
        attended (`int`): the tokenizer whose positions are the text keys the regularizer reads (its sequence
            starts the text part of the denoiser's attention): CLIP-L for SD/SDXL/SD3, T5 for Flux, whose CLIP
            only contributes a pooled vector.
        shared_positions (`tuple[int, ...]`): the tokenizers whose sequences are concatenated position by
            position (SDXL's and SD3's two CLIPs): the token must get the same id and positions in all of them.
        sequence_lengths (`tuple`): per tokenizer the padded prompt length (None: its `model_max_length`); T5 is
            padded to the pipeline's default `max_sequence_length`.
        stage2_targets (`str`): the PEFT regex of stage 2's LoRA (the layers that read the text).
        stage3_targets (`tuple`): `(stage3_targets value, PEFT regex)` pairs of stage 3's LoRA.
        kohya_prefix (`str`): the key prefix of the kohya-style copy: `lora_unet_` (sd-scripts), `lora_transformer_`
            for the transformers (OneTrainer's keys, which ComfyUI maps for SD3 and Flux).
        textual_inversion (`bool`): diffusers' `load_textual_inversion` loads the token into the family's
            pipelines; the joint-attention families' token rows are added by `pipeline_state.add_token_row` instead
            (SD3 pipelines have no textual-inversion loader, and T5's matrix has spare rows that diffusers'
            unloading would cut off).
        sample_guidance_scale (`float`): the guidance scale of sample images and `attndb generate` when none is
            given: the family pipeline's own default (SD and SDXL 7.5, the value their users know; SD3 7.0; Flux
            3.5, the distilled guidance FLUX.1-dev expects, which schnell ignores).
        embedding_aliases (`tuple`): `(key, alias)` pairs: the embedding file also holds `key`'s tensor under
            `alias` (ComfyUI reads T5's as `t5xxl`, diffusers' scripts as `t5`), and a reader accepts either.
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
    pooled_from: tuple[str, ...]
    safety_checker: bool
    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    noise_scheduler_class: str = "DDPMScheduler"
    flow_matching: bool = False
    attended: int = 0
    shared_positions: tuple[int, ...] = (0,)
    sequence_lengths: tuple[int | None, ...] = ()
    stage2_targets: str = STAGE2_TARGET_MODULES
    stage3_targets: tuple[tuple[str, str], ...] = tuple(STAGE3_TARGETS.items())
    embedding_aliases: tuple[tuple[str, str], ...] = ()
    kohya_prefix: str = "lora_unet_"
    textual_inversion: bool = True
    sample_guidance_scale: float = 7.5

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
            if name in self.pooled_from:
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

    def prompt_length(self, index: int, tokenizer) -> int:
        """The padded length of prompts in tokenizer `index` (`sequence_lengths`, else its `model_max_length`)."""
        lengths = self.sequence_lengths
        return (lengths[index] if index < len(lengths) else None) or tokenizer.model_max_length

    def text_length(self, prompt_ids: list[torch.Tensor]) -> int:
        """How many text tokens the denoiser's attention sees for prompts tokenized as `prompt_ids`."""
        return int(prompt_ids[self.attended].shape[-1])

    # -------------------------------------------------------------------------------------- denoiser side
    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, states, added) -> torch.Tensor:
        """The denoiser's prediction for latents `noisy` `[batch, channels, h, w]` at `timesteps`, conditioned on
        `states` (and `added`, see `Conditioning.for_batch`), shaped like `noisy`."""
        return denoiser(noisy, timesteps, states, added_cond_kwargs=added).sample

    def attention_names(self, denoiser) -> list[str]:
        """The attention processors the regularizer reads (the U-Net's `attn2` layers)."""
        return cross_attention_names(denoiser)

    def capture(self, denoiser, indices, store, text_length: int):
        """The context manager that captures the attention of `indices` (text positions) into `store`."""
        return capture_cross_attention(denoiser, indices, store)

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
        tensors = dict(zip(self.embedding_keys, vectors))
        for key, alias in self.embedding_aliases:  # the same tensor under the other clients' name (a copy:
            tensors[alias] = tensors[key].clone()  # safetensors refuses shared storage)
        return tensors

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
        tensors = dict(tensors)
        for key, alias in self.embedding_aliases:
            if alias in tensors:
                tensors.setdefault(key, tensors[alias])
                del tensors[alias]
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
    pooled_from=(),
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
    pooled_from=("text_encoder_2",),
    safety_checker=False,
    shared_positions=(0, 1),
)


# ---------------------------------------------------------------------------------------------- joint attention
#: SD3's stage 2: the projections of every joint block that read the text: the image queries, the text keys and
#: values, and the image output (the MMDiT counterpart of the U-Net's attn2 to_q/to_k/to_v/to_out).
SD3_STAGE2_TARGETS = r".*transformer_blocks\.\d+\.attn\.(to_q|add_k_proj|add_v_proj|to_out\.0)"
#: SD3's stage 3: every linear of the joint blocks (both streams' attention, feed-forwards and modulations, and
#: SD3.5's second self-attention).
SD3_STAGE3_TARGETS = (
    r".*transformer_blocks\.\d+\.(attn|attn2)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|.*transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
    r"|.*transformer_blocks\.\d+\.(norm1|norm1_context)\.linear"
)
#: Flux's stage 2: the double-stream blocks' image queries, text keys/values and image output, and the
#: single-stream blocks' query/key/value projections (one projection there reads the text and the image tokens).
FLUX_STAGE2_TARGETS = (
    r"transformer_blocks\.\d+\.attn\.(to_q|add_k_proj|add_v_proj|to_out\.0)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)"
)
#: Flux's stage 3: every linear of both kinds of block.
FLUX_STAGE3_TARGETS = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
    r"|transformer_blocks\.\d+\.(norm1|norm1_context)\.linear"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)"
)


def _unwrapped(model):
    """A model under DistributedDataParallel is its `module`."""
    return getattr(model, "module", model)


@dataclass(frozen=True)
class JointAttentionFamily(ModelFamily):
    """A family whose denoiser is a joint-attention (MMDiT) transformer: the text tokens are keys of every block's
    attention over `[image, text]` (SD3) or `[text, image]` (Flux), captured by `joint_attention`."""

    def attention_names(self, denoiser) -> list[str]:
        return joint_attention_names(denoiser)

    def capture(self, denoiser, indices, store, text_length: int):
        return capture_joint_attention(denoiser, indices, text_length, store)


@dataclass(frozen=True)
class SD3Family(JointAttentionFamily):
    """Stable Diffusion 3 / 3.5: CLIP-L and CLIP-G penultimate states side by side, padded to T5's width, then
    T5's states along the sequence; the pooled vector is both CLIPs' projected outputs
    (`StableDiffusion3Pipeline.encode_prompt`, without guidance)."""

    def encode(self, text_encoders, input_ids: list[torch.Tensor], resolution: int) -> Conditioning:
        clip, pooled = [], []
        for encoder, ids in zip(text_encoders[:2], input_ids[:2]):
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            clip.append(out.hidden_states[-2])
        t5 = text_encoders[2](input_ids[2])[0]
        clip_states = torch.cat(clip, dim=-1)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
        return Conditioning(torch.cat([clip_states, t5], dim=-2), {"pooled_projections": torch.cat(pooled, dim=-1)})

    def text_length(self, prompt_ids: list[torch.Tensor]) -> int:
        return int(prompt_ids[0].shape[-1] + prompt_ids[2].shape[-1])  # the CLIP positions, then T5's

    def predict(self, denoiser, noisy, timesteps, states, added) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=states, **added).sample


@dataclass(frozen=True)
class FluxFamily(JointAttentionFamily):
    """Flux.1: only T5's states enter attention; CLIP-L gives the pooled vector (`FluxPipeline.encode_prompt`).
    The latents enter the transformer as 2x2 patches (`pack_latents`), with position ids for RoPE.

    Attributes:
        guidance_scale (`float`): the distilled guidance a guidance-embedding model (Flux.1-dev) is trained at:
            the pipeline's default at generation (3.5), as diffusers' Flux DreamBooth script trains."""

    guidance_scale: float = 3.5

    def encode(self, text_encoders, input_ids: list[torch.Tensor], resolution: int) -> Conditioning:
        pooled = text_encoders[0](input_ids[0], output_hidden_states=False).pooler_output
        states = text_encoders[1](input_ids[1], output_hidden_states=False)[0]
        return Conditioning(states, {"pooled_projections": pooled})

    def predict(self, denoiser, noisy, timesteps, states, added) -> torch.Tensor:
        b, c, h, w = noisy.shape
        device, dtype = noisy.device, noisy.dtype
        image_ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
        image_ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
        image_ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
        guidance = None
        if _unwrapped(denoiser).config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=device, dtype=torch.float32)
        out = denoiser(
            hidden_states=pack_latents(noisy),
            timestep=timesteps / 1000,  # FluxPipeline passes sigma; the transformer scales it by 1000
            guidance=guidance,
            encoder_hidden_states=states,
            txt_ids=torch.zeros(states.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids.reshape(-1, 3),
            **added,
        ).sample
        return unpack_latents(out, h, w)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[b, c, h, w]` latents as Flux's `[b, h/2 * w/2, 4c]` patch tokens (`FluxPipeline._pack_latents`)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: `[b, h/2 * w/2, 4c]` -> `[b, c, h, w]`."""
    b, _, channels = tokens.shape
    c = channels // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


_JOINT = dict(
    kohya_ldm_names=False,
    default_batch_size=1,
    default_gradient_accumulation_steps=4,
    default_gradient_checkpointing=True,
    vae_fp32_encode=False,
    safety_checker=False,
    denoiser="transformer",
    noise_scheduler_class="FlowMatchEulerDiscreteScheduler",
    flow_matching=True,
    embedding_aliases=(("t5", "t5xxl"),),
    kohya_prefix="lora_transformer_",
    textual_inversion=False,
)
SD3 = SD3Family(
    name="sd3",
    sample_guidance_scale=7.0,
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    text_encoder_classes=("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
    embedding_keys=("clip_l", "clip_g", "t5"),
    kohya_base_model_version="sd3",
    license="other",
    pooled_from=("text_encoder", "text_encoder_2"),
    pipeline_class="StableDiffusion3Pipeline",
    lora_loader_class="SD3LoraLoaderMixin",
    default_lora_rank=16,
    denoiser_class="SD3Transformer2DModel",
    attended=0,
    shared_positions=(0, 1),
    sequence_lengths=(None, None, 256),
    stage2_targets=SD3_STAGE2_TARGETS,
    stage3_targets=(("transformer", SD3_STAGE3_TARGETS), ("attn2", SD3_STAGE2_TARGETS)),
    **_JOINT,
)
FLUX = FluxFamily(
    name="flux",
    sample_guidance_scale=3.5,
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    text_encoder_classes=("CLIPTextModel", "T5EncoderModel"),
    embedding_keys=("clip_l", "t5"),
    kohya_base_model_version="flux1",
    license="other",
    pooled_from=("text_encoder",),
    pipeline_class="FluxPipeline",
    lora_loader_class="FluxLoraLoaderMixin",
    default_lora_rank=16,
    denoiser_class="FluxTransformer2DModel",
    attended=1,
    shared_positions=(0,),
    sequence_lengths=(None, 512),
    stage2_targets=FLUX_STAGE2_TARGETS,
    stage3_targets=(("transformer", FLUX_STAGE3_TARGETS), ("attn2", FLUX_STAGE2_TARGETS)),
    **_JOINT,
)
FAMILIES = {family.name: family for family in (SD, SDXL, SD3, FLUX)}
#: The denoiser class -> family of the joint-attention families (what a pipeline or model folder holds).
_BY_DENOISER = {family.denoiser_class: family for family in (SD3, FLUX)}


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
    # Flux's transformer config has no sample size: it generates at 1024 px (128 latent cells) by default
    return int(dict(unet_config).get("sample_size") or 128) * 2 ** (blocks - 1)


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a pipeline (or of an object holding pipeline components as attributes)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and type(_unwrapped(transformer)).__name__ in _BY_DENOISER:
        return family_of_denoiser(transformer)
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return family_of_unet_config(unet.config)
    return SDXL if getattr(pipe, "text_encoder_2", None) is not None else SD


def family_of_denoiser(denoiser) -> ModelFamily:
    """The family of a loaded denoiser: a joint-attention transformer by its class, a U-Net by its config."""
    name = type(_unwrapped(denoiser)).__name__
    return _BY_DENOISER[name] if name in _BY_DENOISER else family_of_unet_config(denoiser.config)


def family_from_pipeline_class(class_name: str | None) -> ModelFamily | None:
    """The family a diffusers pipeline class name (`model_index.json`'s `_class_name`) stands for, if known."""
    if not class_name:
        return None
    if class_name.startswith("StableDiffusionXL"):
        return SDXL
    if class_name.startswith("StableDiffusion3"):
        return SD3
    if class_name.startswith("StableDiffusion"):
        return SD
    if class_name.startswith("Flux") and class_name.endswith("Pipeline") and "Kontext" not in class_name:
        return FLUX  # FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, ...
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
    denoiser = (index or {}).get("transformer")
    if isinstance(denoiser, list) and len(denoiser) == 2 and denoiser[1] in _BY_DENOISER:
        return _BY_DENOISER[denoiser[1]]
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
