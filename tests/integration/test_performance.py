# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The performance levers change no result: the precomputed view schedule is the per-step batch, skipping
PEFT's LoRA input cast under autocast is exact, and `load_attndb`, which grows the embedding matrix without
initialising the new rows and lets PEFT take the LoRA tensors without initialising them first, loads the same
weights in the pipeline's dtype."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from attndb_peft.data import batch_indices
from attndb_peft.export import EMBEDDING_NAME
from attndb_peft.training.step import view_schedule


def test_view_schedule_is_the_per_step_batch(trained):
    """`stage_loop` builds every step's cached-view ids up front (no host-to-device copy per step)."""
    cfg, latents = trained.config, trained.latents
    for stage in (1, 2, 3):
        schedule = view_schedule(cfg, stage, latents, trained.num_images, trained.runtime)
        assert schedule.shape == (cfg.stages[stage - 1].steps, cfg.batch_size)
        assert schedule.device == trained.device
        for step in range(cfg.stages[stage - 1].steps):
            seed = cfg.seed * 10 + stage
            ids = batch_indices(step, cfg.batch_size, trained.num_images, latents.views_per_image, seed)
            torch.testing.assert_close(schedule[step].cpu(), latents.view_ids(*ids).cpu(), rtol=0, atol=0)


def test_skipping_lora_input_casts_under_autocast_is_exact():
    """PEFT casts a LoRA layer's bf16 input to the (float32) LoRA weights' dtype and autocast casts it back:
    without the round trip the outputs and the LoRA gradients are bitwise the same."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.helpers import disable_input_dtype_casting

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False), model)
    model.to(torch.bfloat16)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()  # trainable weights in float32, as the trainer keeps them
    x = torch.randn(4, 16, dtype=torch.bfloat16)

    def run(skip_cast: bool):
        for p in lora:
            p.grad = None
        with disable_input_dtype_casting(model, active=skip_cast), torch.autocast("cpu", torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        return out.detach(), [p.grad.clone() for p in lora]

    out_cast, grads_cast = run(False)
    out_skip, grads_skip = run(True)
    assert out_skip.dtype == torch.bfloat16
    assert torch.equal(out_skip, out_cast)
    for a, b in zip(grads_skip, grads_cast):
        assert torch.equal(a, b)


def test_load_attndb_grows_the_embedding_without_initialising_it(trained, tiny_model, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from attndb_peft.loading import load_attndb

    calls, draws = [], []
    original = CLIPTextModel.resize_token_embeddings
    normal = torch.Tensor.normal_

    def spy(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        calls.append(mean_resizing)
        monkeypatch.setattr(torch.Tensor, "normal_", lambda t, *a, **k: draws.append(t.shape) or normal(t, *a, **k))
        try:
            return original(self, new_num_tokens, pad_to_multiple_of, mean_resizing=mean_resizing)
        finally:
            monkeypatch.setattr(torch.Tensor, "normal_", normal)

    monkeypatch.setattr(CLIPTextModel, "resize_token_embeddings", spy)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    token = load_attndb(pipe, str(trained.output_dir))
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert calls == [False] and draws == []  # no mean resizing, no random rows thrown away
    assert {"resize_token_embeddings", "_init_weights"}.isdisjoint(pipe.text_encoder.__dict__)  # patches gone
    lora = {n: p for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    assert lora and {(p.dtype, p.device.type) for p in lora.values()} == {(torch.float32, "cpu")}  # fp16 file
    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    assert after.shape[0] == before.shape[0] + 1 == len(pipe.tokenizer) and token_id == before.shape[0]
    assert torch.equal(after[: before.shape[0]], before)
    expected = load_file(str(trained.output_dir / EMBEDDING_NAME))[token].reshape(-1)
    torch.testing.assert_close(after[token_id], expected.to(after.dtype), rtol=0, atol=0)
