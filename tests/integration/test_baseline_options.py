# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The trainer options that express the paper's baselines (benchmarks/world_quality.py): `token_init='random'`
(DreamBooth's rare token) and `stage3_train_token` (TI+DB: the embedding learns jointly with the U-Net)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from safetensors.torch import load_file

from attndb_peft.config import ConfigError
from attndb_peft.export import EMBEDDING_NAME
from attndb_peft.stages import add_concept_token, random_token_embedding
from attndb_peft.testing import build_tiny_pipeline
from attndb_peft.trainer import Trainer


def test_random_token_init_is_seeded_and_vocabulary_sized():
    pipe = build_tiny_pipeline()
    weight = pipe.text_encoder.get_input_embeddings().weight
    mean_norm = weight.detach().norm(dim=1).mean()
    concept = add_concept_token(
        pipe.tokenizer, pipe.text_encoder, "<r>", "dog", "a photo of a <r> dog", init="random", seed=3
    )
    row = pipe.text_encoder.get_input_embeddings().weight[concept.token_id].detach()
    torch.testing.assert_close(row.norm(), mean_norm)
    torch.testing.assert_close(row, random_token_embedding(weight[: concept.token_id], 3))
    assert not torch.allclose(row, random_token_embedding(weight[: concept.token_id], 4))
    category = pipe.tokenizer("dog", add_special_tokens=False).input_ids
    assert not torch.allclose(row, pipe.text_encoder.get_input_embeddings().weight[category].mean(0))
    with pytest.raises(ValueError, match="token init"):
        add_concept_token(pipe.tokenizer, pipe.text_encoder, "<s>", "dog", "a photo of a <s> dog", init="rare")


def test_config_checks_token_init(tiny_model, instance_dir, tmp_path):
    with pytest.raises(ConfigError, match="token_init"):
        make_config(tiny_model, instance_dir, tmp_path / "o", token_init="rare")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_stage3_trains_token_jointly(tiny_model, instance_dir, tmp_path, mode):
    """Stage 1 skipped, stage 3 trains the U-Net and the token together: the exported embedding moved; the token
    learns at stage 1's rate in its own optimizer group; a resumed run restores the stage-3 token."""
    config = make_config(
        tiny_model, instance_dir, tmp_path / "joint", steps=(0, 0, 3), stage3_mode=mode, stage3_train_token=True,
        checkpointing_steps=2,
    )
    trainer = Trainer(config)
    trainer.run()
    groups = trainer.optimizer.optimizer.param_groups
    assert [len(g["params"]) for g in groups][1] == 1 and groups[1]["params"][0] is trainer.splice.vector
    assert groups[1]["lr"] == config.stage1.learning_rate and groups[0]["lr"] == config.stage3.learning_rate
    pipe = build_tiny_pipeline()
    category = pipe.tokenizer("dog", add_special_tokens=False).input_ids
    init = pipe.text_encoder.get_input_embeddings().weight[category].float().mean(0)
    learned = load_file(str(tmp_path / "joint" / EMBEDDING_NAME))[config.token].reshape(-1)
    assert (learned - init).abs().max() > 1e-4

    # resume from the step-2 checkpoint of stage 3 and finish: the same embedding
    import shutil

    from attndb_peft import checkpoints as ckpt

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "joint", resumed_dir)
    for path in sorted((resumed_dir / ckpt.CHECKPOINT_DIR).iterdir()):
        if path.name == "stage3-step3":
            shutil.rmtree(path)
    Trainer(make_config(
        tiny_model, instance_dir, resumed_dir, steps=(0, 0, 3), stage3_mode=mode, stage3_train_token=True,
        checkpointing_steps=2, resume=True,
    )).run()
    torch.testing.assert_close(load_file(str(resumed_dir / EMBEDDING_NAME))[config.token].reshape(-1), learned)


def test_stage3_without_token_training_keeps_the_embedding(tiny_model, instance_dir, tmp_path):
    """DreamBooth: a random token, no stage 1, stage 3 full: the exported embedding is exactly the initial one."""
    config = make_config(
        tiny_model, instance_dir, tmp_path / "db", steps=(0, 0, 2), stage3_mode="full", token_init="random", seed=5
    )
    Trainer(config).run()
    pipe = build_tiny_pipeline()
    expected = random_token_embedding(pipe.text_encoder.get_input_embeddings().weight, 5)
    torch.testing.assert_close(load_file(str(tmp_path / "db" / EMBEDDING_NAME))[config.token].reshape(-1), expected)
