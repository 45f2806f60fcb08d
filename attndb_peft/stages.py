# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""What each stage trains.

- Stage 1: one new token embedding, spliced into the frozen text encoder's token embedding output.
- Stage 2: a PEFT LoRA on every cross-attention (`attn2`) projection of the U-Net.
- Stage 3: a PEFT LoRA (rank 32 by default) on the linear layers of the U-Net's transformer blocks (on top
  of the frozen stage-2 LoRA), or the full U-Net (with stage 2 merged into its weights).

Also the exact LoRA algebra used by the exporter: reading a PEFT adapter's factors, concatenating two LoRAs
into one, and the truncated SVD of a full fine-tune's weight delta.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .errors import arg

__all__ = [
    "ADAPTER_STAGE2",
    "ADAPTER_STAGE3",
    "STAGE2_TARGET_MODULES",
    "STAGE3_TARGETS",
    "STAGE3_TARGET_MODULES",
    "STAGE_NAMES",
    "ConceptSplice",
    "ConceptToken",
    "LoraFactors",
    "TokenEmbeddingSplice",
    "add_concept_token",
    "add_concept_tokens",
    "add_lora",
    "combine_loras",
    "combined_lora_config",
    "lora_config_for",
    "lora_factors",
    "lora_from_delta",
    "random_token_embedding",
    "set_trainable",
]

#: Stage 2: the four projections of every cross-attention layer (PEFT matches the regex in full).
STAGE2_TARGET_MODULES = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
#: Stage 3: every linear layer of the transformer blocks (self- and cross-attention, feed-forward, in/out
#: projections). ResNet convolutions are left out: a LoRA on them costs more time than full fine-tuning saves
#: (measured on SD2.1-base) while identity is mostly carried by the attention and feed-forward weights.
STAGE3_TARGET_MODULES = (
    r".*transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    r"|.*transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"
    r"|.*attentions\.\d+\.(proj_in|proj_out)"
)
#: Stage 3's LoRA targets by `stage3_targets` (`config.STAGE3_TARGET_SETS`): the default, the cross-attention
#: alone, or as kohya's LoCon (LyCORIS) also every linear and convolution of the ResNet blocks and the resamplers.
STAGE3_TARGETS = {
    "transformer": STAGE3_TARGET_MODULES,
    "attn2": STAGE2_TARGET_MODULES,
    "unet": STAGE3_TARGET_MODULES
    + r"|.*resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|.*(downsamplers|upsamplers)\.\d+\.conv",
}
#: The stages' names in logs, figures and errors (shared by the trainer and reporting).
STAGE_NAMES = {1: "embedding alignment", 2: "attention map (attn2 LoRA)", 3: "subject identity"}
ADAPTER_STAGE2 = "attndb_stage2"
ADAPTER_STAGE3 = "attndb_stage3"


# ---------------------------------------------------------------------------------------------- stage 1
@dataclass
class ConceptToken:
    """The new token and where it sits in the training prompt.

    Attributes:
        token: the token string, e.g. `<attndb-dog>`.
        token_id: its id in the tokenizer and row in the text encoder's embedding matrix.
        category_ids: vocabulary ids of the category's sub-tokens.
        prompt_ids: `[1, model_max_length]` ids of `a photo of a [V] [category]`, padded.
        concept_position: index of `[V]` in `prompt_ids`.
        category_positions: indices of the category's sub-tokens in `prompt_ids`.
    """

    token: str
    token_id: int
    category_ids: list[int]
    prompt_ids: torch.Tensor
    concept_position: int
    category_positions: list[int]

    @property
    def capture_indices(self) -> list[int]:
        """Text positions the attention capture keeps: `[V]` first, then the category."""
        return [self.concept_position, *self.category_positions]


def random_token_embedding(embeddings: torch.Tensor, seed: int) -> torch.Tensor:
    """A token embedding the model has no prior for (`token_init='random'`, DreamBooth's rare token): a seeded
    standard-normal direction scaled to the mean row norm of `embeddings` (`[vocab, hidden]`), float32 on the CPU.
    Deterministic from `seed` (its own generator; the global RNG is untouched)."""
    rows = embeddings.detach().float().cpu()
    direction = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(int(seed)))
    return direction / direction.norm() * rows.norm(dim=1).mean()


def add_concept_token(
    tokenizer,
    text_encoder,
    token: str,
    category: str,
    prompt: str,
    init: str = "category",
    seed: int = 0,
    max_length: int | None = None,
) -> ConceptToken:
    """Add `token` to the tokenizer, grow the text encoder's embedding matrix by one row initialised to the
    mean embedding of the category's sub-tokens (`init='random'`: to `random_token_embedding(..., seed)`), and
    locate `[V]` and the category in `prompt`, padded to `max_length` (default the tokenizer's
    `model_max_length`). A matrix with spare rows past the vocabulary (T5's 32 128 rows for 32 100 tokens) is not
    resized: the token takes the first spare row.

    Raises:
        ValueError: the token already exists, the category tokenizes to nothing, or the prompt does not
            contain the token followed by the category.
    """
    if token in tokenizer.get_vocab():
        raise ValueError(
            f"{arg('token')} {token!r} already exists in the base model's tokenizer; choose a new, unused token "
            f"(e.g. '<attndb-{token.strip('<>')}>')."
        )
    category_ids = tokenizer(category, add_special_tokens=False).input_ids
    if not category_ids:
        raise ValueError(
            f"{arg('category')} {category!r} tokenizes to nothing; give the subject's category as a word, e.g. 'dog'."
        )
    if init not in ("category", "random"):
        raise ValueError(f"token init {init!r}: expected 'category' or 'random'.")
    tokenizer.add_tokens(token)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id >= text_encoder.get_input_embeddings().num_embeddings:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set just below
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        if init == "category":
            vector = embeddings[category_ids].float().mean(0)
        else:
            vector = random_token_embedding(embeddings[:token_id], seed).to(embeddings.device)
        embeddings[token_id] = vector.to(embeddings.dtype)

    length = max_length or tokenizer.model_max_length
    prompt_ids = tokenizer(
        prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    ids = prompt_ids[0].tolist()
    if ids.count(token_id) != 1:
        raise ValueError(f"The prompt {prompt!r} must contain the token {token!r} exactly once.")
    concept_position = ids.index(token_id)
    category_positions = list(range(concept_position + 1, concept_position + 1 + len(category_ids)))
    if ids[concept_position + 1 : concept_position + 1 + len(category_ids)] != category_ids:
        raise ValueError(f"The prompt {prompt!r} must have the category {category!r} right after {token!r}.")
    return ConceptToken(token, token_id, category_ids, prompt_ids, concept_position, category_positions)


class TokenEmbeddingSplice(nn.Module):
    """Stage 1's only trainable parameter: the new token's embedding vector.

    Rather than making the whole (vocabulary x hidden) embedding matrix trainable and restoring the other rows
    after every step, the vector is spliced into the output of the frozen embedding module by a forward hook
    wherever the input ids equal `token_id`. `CLIPTextModel` takes no `inputs_embeds`, so the hook is the
    clean entry point; gradients reach only this vector.

    Args:
        text_encoder: a transformers `CLIPTextModel`.
        token_id (`int`): the new token's id.
    """

    def __init__(self, text_encoder, token_id: int) -> None:
        super().__init__()
        self.embedding_module = text_encoder.get_input_embeddings()
        # The modules the forward calls: transformers' T5 looks rows up in `encoder.embed_tokens`, a second module
        # tied to `shared` (its input embeddings) by the very same weight.
        weight = self.embedding_module.weight
        self.lookups = [m for m in text_encoder.modules() if isinstance(m, nn.Embedding) and m.weight is weight]
        self.token_id = token_id
        self.vector = nn.Parameter(self.embedding_module.weight[token_id].detach().float().clone())
        self._handles = []

    def _hook(self, module, inputs, output):
        input_ids = inputs[0]
        mask = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.vector.to(output.dtype), output)

    def __enter__(self) -> TokenEmbeddingSplice:
        self._handles = [module.register_forward_hook(self._hook) for module in self.lookups]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained vector into the embedding matrix, so later stages and inference use the stock path."""
        weight = self.embedding_module.weight
        # the text encoder may sit on the CPU while the vector trains on the device (offload_frozen)
        weight[self.token_id] = self.vector.to(weight.device, weight.dtype)


def add_concept_tokens(
    pairs,
    token: str,
    category: str,
    prompt: str,
    init: str = "category",
    seed: int = 0,
    shared_positions: tuple[int, ...] = (0, 1),
    max_lengths: tuple[int | None, ...] = (),
) -> list[ConceptToken]:
    """`add_concept_token` for every `(tokenizer, text_encoder)` pair of a model (SDXL has two, SD3 three): each
    encoder's new row is initialised from the category in that encoder. The tokenizers in `shared_positions`
    (SDXL's and SD3's two CLIPs) must give the token the same id and the prompt the same positions, since the
    denoiser sees their states side by side, position by position; a T5 tokenizer has its own vocabulary and
    sequence. `max_lengths`: the padded prompt length per tokenizer (None or missing: its `model_max_length`).

    Raises:
        ValueError: as `add_concept_token`, or the shared tokenizers disagree on the token's id or positions.
    """
    concepts = []
    for i, (tokenizer, text_encoder) in enumerate(pairs):
        # `seed + i`: a random init draws a different direction per encoder (their widths differ anyway)
        length = max_lengths[i] if i < len(max_lengths) else None
        concepts.append(add_concept_token(tokenizer, text_encoder, token, category, prompt, init, seed + i, length))
    shared = [concepts[i] for i in shared_positions if i < len(concepts)]
    for other in shared[1:]:
        first = shared[0]
        if other.token_id != first.token_id or other.capture_indices != first.capture_indices:
            raise ValueError(
                f"The base model's tokenizers disagree on {token!r} (ids {first.token_id} and {other.token_id}, "
                f"positions {first.capture_indices} and {other.capture_indices}); their vocabularies must be the "
                "same, as in SDXL's two CLIP tokenizers."
            )
    return concepts


class ConceptSplice(nn.Module):
    """The concept token's trainable vectors, one `TokenEmbeddingSplice` per text encoder (SD 1.x/2.x: one;
    SDXL: two, of widths 768 and 1280), used as one: a context manager installing all hooks, `vectors` for the
    optimizer and `write_back` for all encoders.

    Args:
        text_encoders (`list`): the text encoders, in the family's order.
        token_ids (`int` or `list[int]`): the new token's id in each tokenizer (one int: the same in all, as in
            SDXL's two CLIPs; T5's differs).
    """

    def __init__(self, text_encoders, token_ids: int | list[int]) -> None:
        super().__init__()
        ids = [token_ids] * len(text_encoders) if isinstance(token_ids, int) else list(token_ids)
        self.splices = nn.ModuleList(TokenEmbeddingSplice(encoder, i) for encoder, i in zip(text_encoders, ids))

    @property
    def vectors(self) -> list[nn.Parameter]:
        """One trainable vector per text encoder."""
        return [splice.vector for splice in self.splices]

    @property
    def vector(self) -> nn.Parameter:
        """The first text encoder's vector (the only one for SD 1.x/2.x)."""
        return self.splices[0].vector

    def __enter__(self) -> ConceptSplice:
        for splice in self.splices:
            splice.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for splice in self.splices:
            splice.__exit__(*exc)

    def write_back(self) -> None:
        """Copy every trained vector into its encoder's embedding matrix."""
        for splice in self.splices:
            splice.write_back()


# ---------------------------------------------------------------------------------------------- stages 2-3
def lora_config_for(rank: int, alpha: float, target_modules, rank_pattern=None, alpha_pattern=None):
    """The PEFT `LoraConfig` of a LoRA (a stage's, or the exported combination with per-module ranks)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        init_lora_weights=True,
    )


def add_lora(unet, adapter_name: str, rank: int, alpha: float, target_modules) -> list[nn.Parameter]:
    """Inject a PEFT LoRA into the U-Net with diffusers' `add_adapter` and return its parameters."""
    with warnings.catch_warnings():  # a second adapter is intended here (stage 3 stacks on stage 2)
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(lora_config_for(rank, alpha, target_modules), adapter_name=adapter_name)
    return [p for n, p in unet.named_parameters() if f".{adapter_name}." in n]


def set_trainable(modules: list[nn.Module], trainable: list[nn.Parameter]) -> None:
    """Freeze every parameter of `modules`, then unfreeze exactly `trainable`.

    PEFT's `set_adapter` marks every active adapter trainable; stage 3 keeps stage 2 active but frozen, so the
    trainer states what trains explicitly instead of relying on adapter activation side effects.
    """
    for module in modules:
        module.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)


# ---------------------------------------------------------------------------------------------- LoRA algebra
@dataclass
class LoraFactors:
    """One module's LoRA: `delta_W = scale * up @ down` (for convolutions, `up` is 1x1 and `down` carries the
    kernel). `down` is PEFT's `lora_A` / kohya's `lora_down`, `up` is `lora_B` / `lora_up`."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense weight delta (float32), shaped like the base weight."""
        down, up = self.down.float(), self.up.float()
        if down.ndim == 4:  # conv: up [out, r, 1, 1], down [r, in, kh, kw]
            return self.scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        return self.scale * up @ down


def lora_factors(model, adapter_name: str) -> dict[str, LoraFactors]:
    """Read one PEFT adapter out of a model: module name -> its (detached, float32) LoRA factors."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            factors[name] = LoraFactors(
                down=module.lora_A[adapter_name].weight.detach().float().cpu().clone(),
                up=module.lora_B[adapter_name].weight.detach().float().cpu().clone(),
                scale=float(module.scaling[adapter_name]),
            )
    return factors


def combine_loras(*loras: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
    """Combine LoRAs that are applied together into one LoRA, exactly: ranks are concatenated and each part's
    scale is folded into its `up` factor, so the result has scale 1 (alpha = rank) and
    `sum_i scale_i * up_i @ down_i == up @ down` up to float rounding."""
    combined: dict[str, LoraFactors] = {}
    for name in sorted({n for lora in loras for n in lora}):
        parts = [lora[name] for lora in loras if name in lora]
        down = torch.cat([p.down for p in parts], dim=0)
        up = torch.cat([p.up * p.scale for p in parts], dim=1)
        combined[name] = LoraFactors(down=down, up=up, scale=1.0)
    return combined


def lora_from_delta(
    delta: torch.Tensor, rank: int, method: str = "exact", niter: int = 4, oversample: int | None = None
) -> tuple[LoraFactors, float]:
    """Rank-`rank` approximation of a weight delta as LoRA factors, computed on the delta's device.

    Args:
        delta (`torch.Tensor`): `[out, in]` (linear) or `[out, in, kh, kw]` (conv) weight difference.
        rank (`int`): the LoRA rank (capped at the matrix rank bound).
        method (`str`, *optional*, defaults to `"exact"`):
            - `"exact"`: truncated SVD, the best approximation (Eckart-Young). The SVD runs on the matrix in its
              tall orientation: LAPACK is several times slower on a wide matrix (a 3x3 conv's `[out, in * 9]`)
              than on its transpose (benchmarks/bench_export.py).
            - `"randomized"`: randomized subspace iteration (Halko et al. 2011) with `rank + oversample`
              vectors and `niter` power iterations, from a fixed seed (the same delta gives the same factors).
              Cheaper on large matrices, slightly below the optimum on flat spectra.
        niter (`int`, *optional*, defaults to 4): power iterations of `"randomized"`.
        oversample (`int`, *optional*): extra vectors of `"randomized"` (default: `rank`).

    Returns:
        `(LoraFactors, retained)`: the factors (scale 1, the singular values split evenly between them, on the
        delta's device) and the fraction of the delta's squared Frobenius norm they keep, `sum(s_r^2) /
        ||delta||_F^2`, exact for either method (both project the delta onto a rank-`r` subspace); 1.0 for a
        zero delta.
    """
    if method not in ("exact", "randomized"):
        raise ValueError(f"method={method!r} is not supported; use 'exact' or 'randomized'.")
    matrix = delta.float().reshape(delta.shape[0], -1)
    m, n = matrix.shape
    r = min(rank, m, n)
    q = min(r + (r if oversample is None else oversample), m, n)
    if method == "exact" or 2 * q >= min(m, n):  # a subspace as wide as the matrix saves nothing
        u, s, vh = _svd_tall(matrix)
    else:
        u, s, vh = _svd_randomized(matrix, q, niter)
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    total = matrix.square().sum()
    retained = float(s[:r].square().sum() / total) if total > 0 else 1.0
    if delta.ndim == 4:
        up = up[:, :, None, None]
        down = down.reshape(r, *delta.shape[1:])
    return LoraFactors(down=down.contiguous(), up=up.contiguous(), scale=1.0), retained


def _svd_tall(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `matrix = u diag(s) vh`, computed on whichever of `matrix` and its transpose is tall."""
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
    return uh.T, s, v.T


def _svd_randomized(matrix: torch.Tensor, q: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `matrix` projected onto an orthonormal basis `Q` (`q` columns) of its approximate range:
    `Q Q^T matrix = u diag(s) vh`. Seeded, so it never touches the global RNG."""
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    omega = torch.randn(matrix.shape[1], q, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    ub, s, vh = _svd_tall(basis.T @ matrix)
    return basis @ ub, s, vh


def combined_lora_config(lora: dict[str, LoraFactors]):
    """The `LoraConfig` of a scale-1 LoRA with per-module ranks (the convention diffusers infers for a LoRA
    without alphas): the most common rank as `r`, the others in `rank_pattern`, alpha = rank everywhere."""
    ranks = {name: f.rank for name, f in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = _rank_pattern(ranks, r)
    return lora_config_for(r, r, sorted(lora), rank_pattern=pattern, alpha_pattern=dict(pattern))


def _rank_pattern(ranks: dict[str, int], default: int) -> dict[str, int]:
    """PEFT `rank_pattern` giving each module in `ranks` its rank (others get `default`), with keys as short as
    PEFT's matching allows: for each module the shortest dotted suffix (`attn2.to_q`) that every module it would
    match agrees on, escaped so that PEFT's regex (`(.*\\.)?(key)$`) matches it literally.

    A key per module (full names) is also correct, but PEFT tries every key as a regex against every targeted
    module while it loads: 280 keys x 722 modules, about 1.3 s of an SDXL `load_attndb` on a CPU."""

    def matches(key: str, name: str) -> bool:
        return name == key or name.endswith("." + key)

    pattern: dict[str, int] = {}
    for name, rank in sorted(ranks.items()):
        if rank == default or any(matches(key, name) for key in pattern):
            continue
        parts = name.split(".")
        for start in range(len(parts) - 1, -1, -1):  # start = 0 (the full name) always qualifies
            key = ".".join(parts[start:])
            if all(ranks[other] == rank for other in ranks if matches(key, other)):
                break
        pattern[key] = rank
    return {re.escape(key): rank for key, rank in pattern.items()}
