# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The kinds of training stage, one class each, behind one small surface (`Stage`).

| class | stage | trains |
|---|---|---|
| `TokenEmbeddingStage` | 1 | the token's embedding vector(s) |
| `Attn2LoraStage` | 2 | a LoRA on the U-Net's cross-attention (attn2) layers |
| `UnetLoraStage` | 3, `stage3_mode="lora"` | a LoRA on the whole U-Net, over the stage-2 one |
| `FullUnetStage` | 3, `stage3_mode="full"` | every U-Net weight; exported as a LoRA of the change (SVD) |
| `WithToken` | 3, `stage3_train_token` (TI+DB) | another stage's weights and the token, at stage 1's rate |

The training loop (`trainer.Trainer`) asks a stage what it trains (`build`, `param_groups`), whether it encodes
the prompt every step (`encodes_prompt`), its checkpoint state (`trainable_state`, `load_state`), what it
contributes to the exported LoRA (`export_lora`) and what happens at its end (`finish`); a new kind (e.g. DoRA)
is one more class here and one line in `make_stage`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..base_model import BaseModels
from ..config import AttnDBConfig
from ..errors import RunError
from ..stages import (
    ADAPTER_STAGE2,
    ADAPTER_STAGE3,
    ConceptSplice,
    LoraFactors,
    add_lora,
    combine_loras,
    lora_factors,
    lora_from_delta,
    set_trainable,
)

__all__ = [
    "Attn2LoraStage",
    "FullUnetStage",
    "Stage",
    "TokenEmbeddingStage",
    "UnetLoraStage",
    "WithToken",
    "make_stage",
    "token_key",
]

logger = logging.getLogger(__name__)

_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def token_key(index: int) -> str:
    """A checkpoint's key for the token vector of text encoder `index` (SD's only one keeps its old name)."""
    return "token_embedding" if index == 0 else f"token_embedding_{index + 1}"


def adapter_state(unet, adapter_name: str) -> dict[str, torch.Tensor]:
    """One LoRA adapter's parameters under their PEFT names, prefixed `unet.` (checkpoint keys)."""
    return {f"unet.{n}": p.detach().clone() for n, p in unet.named_parameters() if f".{adapter_name}." in n}


def _load_token(splice: ConceptSplice, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, vector in enumerate(splice.vectors):
            vector.copy_(weights[token_key(i)])


def _load_adapter(unet, adapter_name: str, weights: dict[str, torch.Tensor]) -> None:
    for name, param in unet.named_parameters():
        key = f"unet.{name}"
        if f".{adapter_name}." in name and key in weights:
            param.copy_(weights[key])


class Stage:
    """One stage of a run: what it trains and how its state is kept and exported.

    Args:
        number (`int`): the stage (1, 2 or 3): its settings are `config.stages[number - 1]`.
        config (`AttnDBConfig`): the run's settings.
        models (`BaseModels`): the models being trained (changed in place).
        splice (`ConceptSplice`): the token's trainable vector(s).
    """

    #: Whether the stage trains the token: it then encodes the prompt through the splice every step (the other
    #: stages encode it once, the text side being frozen).
    encodes_prompt: bool = False
    #: Whether several processes train it through torch's DistributedDataParallel (a single token vector is
    #: averaged by hand instead: one collective).
    data_parallel: bool = True

    def __init__(self, number: int, config: AttnDBConfig, models: BaseModels, splice: ConceptSplice) -> None:
        self.number = number
        self.config = config
        self.models = models
        self.splice = splice
        self.params: list[nn.Parameter] = []

    def trainable(self) -> list[nn.Parameter]:
        """Add what the stage trains to the models (a LoRA, ...) and return its parameters, in optimizer order."""
        raise NotImplementedError

    def build(self) -> list[nn.Parameter]:
        """Make exactly this stage's parameters trainable (all others frozen), in float32: autocast computes in
        the weight dtype, the optimizer updates float32 weights."""
        self.params = self.trainable()
        m = self.models
        set_trainable([m.unet, *m.text_encoders, m.vae, self.splice], self.params)
        for p in self.params:
            p.data = p.data.float()
        return self.params

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (the stage's learning rate unless a group sets its own)."""
        return [{"params": self.params}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every tensor learned so far, for a checkpoint: the token vector(s) and what this stage adds."""
        return {token_key(i): v.detach() for i, v in enumerate(self.splice.vectors)}

    def load_state(self, weights: dict[str, torch.Tensor]) -> None:
        """Restore what the stage learned from a checkpoint's tensors, right after `build`."""

    def export_lora(self, report: dict) -> dict[str, LoraFactors]:
        """The LoRA the adapter folder gets after this stage; may add entries to the export's `report`."""
        raise RunError(f"stage {self.number} holds no LoRA to export; export a stage-2 or stage-3 checkpoint.")

    def finish(self) -> None:
        """What happens at the end of the stage (main process), before its final samples."""

    def restore(self, weights: dict[str, torch.Tensor]) -> None:
        """After the stage finished: go back to a checkpoint's weights (`select` auto) and finish again."""
        self.load_state(weights)
        self.finish()


class TokenEmbeddingStage(Stage):
    """Stage 1: the token's embedding vector(s), one per text encoder."""

    encodes_prompt = True
    data_parallel = False

    def trainable(self) -> list[nn.Parameter]:
        return list(self.splice.vectors)

    def load_state(self, weights: dict[str, torch.Tensor]) -> None:
        _load_token(self.splice, weights)


class _UnetStage(Stage):
    """A stage that trains the U-Net: the token learned in stage 1 is written into the embedding matrices first."""

    def trainable(self) -> list[nn.Parameter]:
        self.splice.write_back()
        return self.unet_trainable()

    def unet_trainable(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @property
    def settings(self):
        return self.config.stages[self.number - 1]


class Attn2LoraStage(_UnetStage):
    """Stage 2: a LoRA on the cross-attention (attn2) layers."""

    def unet_trainable(self) -> list[nn.Parameter]:
        s = self.settings
        targets = self.models.family.stage2_targets  # the U-Net's attn2 layers, a joint block's text projections
        return add_lora(self.models.unet, ADAPTER_STAGE2, s.rank, s.lora_alpha, targets)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {**super().trainable_state(), **adapter_state(self.models.unet, ADAPTER_STAGE2)}

    def load_state(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            _load_adapter(self.models.unet, ADAPTER_STAGE2, weights)

    def export_lora(self, report: dict) -> dict[str, LoraFactors]:
        return combine_loras(lora_factors(self.models.unet, ADAPTER_STAGE2))


class UnetLoraStage(_UnetStage):
    """Stage 3 as a LoRA on the whole U-Net, active together with the stage-2 one (kept frozen)."""

    def unet_trainable(self) -> list[nn.Parameter]:
        s, unet = self.settings, self.models.unet
        targets = dict(self.models.family.stage3_targets)[self.config.stage3_targets]
        params = add_lora(unet, ADAPTER_STAGE3, s.rank, s.lora_alpha, targets)
        unet.set_adapters([ADAPTER_STAGE2, ADAPTER_STAGE3])
        return params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        unet = self.models.unet
        return {
            **super().trainable_state(),
            **adapter_state(unet, ADAPTER_STAGE2),
            **adapter_state(unet, ADAPTER_STAGE3),
        }

    def load_state(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            _load_adapter(self.models.unet, ADAPTER_STAGE3, weights)

    def export_lora(self, report: dict) -> dict[str, LoraFactors]:
        unet = self.models.unet
        return combine_loras(lora_factors(unet, ADAPTER_STAGE2), lora_factors(unet, ADAPTER_STAGE3))


class FullUnetStage(_UnetStage):
    """Stage 3 as a full fine-tune of the U-Net (the stage-2 LoRA fused in first), exported as the
    rank-`full_export_rank` LoRA of the change over the base model (`use_full_export`)."""

    def __init__(self, number: int, config: AttnDBConfig, models: BaseModels, splice: ConceptSplice) -> None:
        super().__init__(number, config, models, splice)
        self.base_weights: dict[str, torch.Tensor] = {}  # the U-Net before stages 2-3, on the CPU
        self.stage2_state: dict[str, torch.Tensor] = {}  # the stage-2 LoRA, kept in checkpoints
        self.full_export: tuple[dict[str, LoraFactors], float] | None = None  # (LoRA, energy kept)

    def unet_trainable(self) -> list[nn.Parameter]:
        """Remember the base weights (for the export's delta), fold the stage-2 LoRA into the U-Net and drop the
        adapter, then train every U-Net weight in float32."""
        unet = self.models.unet
        self.base_weights = {
            k: v.detach().to("cpu", torch.float32, copy=True) for k, v in _base_unet_state(unet).items()
        }
        self.stage2_state = adapter_state(unet, ADAPTER_STAGE2)
        unet.to(torch.float32)  # before fusing, so the stage-2 delta is not rounded to bf16/fp16
        unet.fuse_lora(adapter_names=[ADAPTER_STAGE2])
        unet.unload_lora()
        return list(unet.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = super().trainable_state()
        state.update(self.stage2_state)
        state.update({f"unet_full.{k}": v for k, v in self.models.unet.state_dict().items()})
        return state

    def load_state(self, weights: dict[str, torch.Tensor]) -> None:
        full = {k[len("unet_full.") :]: v for k, v in weights.items() if k.startswith("unet_full.")}
        if full:
            with torch.no_grad():
                self.models.unet.load_state_dict(full)

    def export_lora(self, report: dict) -> dict[str, LoraFactors]:
        if self.full_export is None:
            self.use_full_export()
        lora, report["full_export_retained"] = self.full_export
        return lora

    def finish(self) -> None:
        self.use_full_export()  # the final samples come from what is exported

    def use_full_export(self) -> None:
        """Compute the exported LoRA (`full_export`) and put exactly what it makes into the in-memory U-Net, so
        the final samples and the model card show what the adapter does: every weight becomes base + the LoRA's
        delta (at `save_dtype`, as the file holds it); biases and norms, which a LoRA cannot carry, go back to
        the base model's. The stage's last checkpoint keeps the fine-tuned weights."""
        cfg = self.config
        lora, retained = self._full_export_lora()
        self.full_export = (lora, retained)
        logger.info(
            "Stage 3 full: the rank-%d LoRA export keeps %.1f%% of the U-Net delta's energy (squared Frobenius "
            "norm); the final samples show the exported LoRA.",
            cfg.full_export_rank,
            100 * retained,
        )
        dtype = _SAVE_DTYPES[cfg.save_dtype]
        with torch.no_grad():
            for name, param in self.models.unet.named_parameters():
                value = self.base_weights[name].to(param.device, param.dtype)
                factors = lora.get(name.removesuffix(".weight"))
                if factors is not None:  # the LoRA as saved: factors rounded to save_dtype
                    saved = LoraFactors(factors.down.to(dtype), factors.up.to(dtype), factors.scale)
                    value = value + saved.delta().to(param.device, param.dtype)
                param.copy_(value)

    def _full_export_lora(self) -> tuple[dict[str, LoraFactors], float]:
        """The rank-`full_export_rank` LoRA of every U-Net linear/conv weight that changed in stages 2-3
        (final - base), and the share of the change's energy (squared Frobenius norm) it keeps.

        Each delta is formed and factorized on the training device, one weight at a time (the base weights wait
        in CPU memory); only the factors come back to the CPU."""
        rank = self.config.full_export_rank
        lora: dict[str, LoraFactors] = {}
        kept, total = 0.0, 0.0
        with torch.no_grad():
            for name, tensor in self.models.unet.state_dict().items():
                if not (name.endswith(".weight") and tensor.ndim in (2, 4)):
                    continue
                delta = tensor.float() - self.base_weights[name].to(tensor.device)
                norm = float(delta.square().sum())
                if norm == 0:
                    continue
                factors, retained = lora_from_delta(delta, rank)
                lora[name.removesuffix(".weight")] = LoraFactors(factors.down.cpu(), factors.up.cpu())
                kept, total = kept + retained * norm, total + norm
        return lora, (kept / total if total else 1.0)


def _base_unet_state(unet) -> dict[str, torch.Tensor]:
    """The U-Net's base weights (without LoRA tensors), with PEFT's `base_layer.` naming removed."""
    return {name.replace(".base_layer.", "."): t for name, t in unet.state_dict().items() if "lora_" not in name}


class WithToken(Stage):
    """TI+DB (`stage3_train_token`): another stage's weights and the token vector(s) learn together, the token at
    stage 1's learning rate and weight decay, the rest at the stage's own.

    Args:
        inner (`Stage`): the stage whose weights are trained alongside the token.
    """

    encodes_prompt = True

    def __init__(self, inner: Stage) -> None:
        super().__init__(inner.number, inner.config, inner.models, inner.splice)
        self.inner = inner
        self.data_parallel = inner.data_parallel

    def trainable(self) -> list[nn.Parameter]:
        return self.inner.trainable() + self.splice.vectors

    def param_groups(self) -> list[dict]:
        vectors = {id(v) for v in self.splice.vectors}
        stage1 = self.config.stage1
        return [
            {"params": [p for p in self.params if id(p) not in vectors]},
            {
                "params": [p for p in self.params if id(p) in vectors],
                "lr": stage1.learning_rate,
                "weight_decay": stage1.weight_decay,
            },
        ]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.inner.trainable_state()

    def load_state(self, weights: dict[str, torch.Tensor]) -> None:
        _load_token(self.splice, weights)
        self.inner.load_state(weights)

    def export_lora(self, report: dict) -> dict[str, LoraFactors]:
        return self.inner.export_lora(report)

    def finish(self) -> None:
        self.inner.finish()


def make_stage(number: int, config: AttnDBConfig, models: BaseModels, splice: ConceptSplice) -> Stage:
    """The stage `number` of a run with `config` (stage 3: `stage3_mode`, and `stage3_train_token` for TI+DB)."""
    if number == 1:
        return TokenEmbeddingStage(number, config, models, splice)
    if number == 2:
        return Attn2LoraStage(number, config, models, splice)
    kind = UnetLoraStage if config.stage3_mode == "lora" else FullUnetStage
    stage = kind(number, config, models, splice)
    return WithToken(stage) if config.stage3_train_token else stage
