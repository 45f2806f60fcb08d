# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Masked loss (opt-in, an addition to the paper): subject masks from the alpha channel or a masks folder follow
their image's views down to latent resolution, the loss is a per-sample normalised weighted MSE that ignores the
background, default-off runs are untouched, and bad masks are refused naming the file and the fix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_config
from PIL import Image

from attndb_peft.cli import build_parser, config_from_args
from attndb_peft.config import AttnDBConfig
from attndb_peft.data import (
    image_views,
    latent_masks,
    load_alpha,
    load_mask,
    load_subject_mask,
    mask_views,
    scan_image_folder,
    scan_masks,
)
from attndb_peft.regularizer import MASK_MEAN_FLOOR, diffusion_loss, masked_diffusion_loss
from attndb_peft.trainer import InputError, Trainer, check_inputs


def _pool(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Mean over `factor` x `factor` blocks (independent of torch's pooling)."""
    h, w = pixels.shape
    return pixels.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


# -- masks reach latent resolution following the image's views ----------------------------------------------
@pytest.mark.parametrize(
    "size, subject, expected_columns",
    [
        ((64, 32), (0, 0, 32, 32), True),  # landscape, left half: the center crop is half subject, left
        ((32, 64), (0, 0, 32, 32), False),  # portrait, top half: the center crop is half subject, on top
    ],
)
def test_center_crop_and_flip_reach_latent_resolution(size, subject, expected_columns):
    mask = Image.new("L", size, 0)
    mask.paste(255, subject)
    views = mask_views(mask, 32, flip=True)
    latent = latent_masks(views, (8, 8))
    assert latent.shape == (2, 1, 8, 8)
    half = np.zeros((8, 8))
    if expected_columns:
        half[:, :4] = 1
    else:
        half[:4, :] = 1
    np.testing.assert_allclose(latent[0, 0].numpy(), half, atol=1e-6)
    np.testing.assert_allclose(latent[1, 0].numpy(), half[:, ::-1], atol=1e-6)  # the mirror view


@pytest.mark.parametrize("flip, random_crops", [(False, 0), (True, 0), (False, 3), (True, 2)])
def test_mask_views_match_the_image_views(flip, random_crops):
    """Encode a mask in an image's red channel: its image views, pooled by hand, must be the mask's views."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 2, size=(7, 10)).astype(np.uint8) * 255
    alpha = np.kron(blocks, np.ones((8, 8), np.uint8))  # 56 x 80 pixels, blocks of 8
    rgb = np.zeros((*alpha.shape, 3), np.uint8)
    rgb[..., 0] = alpha
    image, mask = Image.fromarray(rgb), Image.fromarray(alpha)
    got = latent_masks(mask_views(mask, 32, flip, random_crops, seed=5), (8, 8))
    views = image_views(image, 32, flip, random_crops, seed=5)
    assert got.shape == (len(views), 1, 8, 8)
    for view, latent in zip(views, got):
        want = _pool((view[0].numpy() + 1) / 2, 4)  # red channel back to [0, 1], 4x4 pixel cells
        np.testing.assert_allclose(latent[0].numpy(), want, atol=4 / 255)  # the image is resampled in 8 bits
    if random_crops:  # the random views differ from the center crop
        assert not torch.allclose(got[0], got[(2 if flip else 1)])


def test_alpha_and_mask_files_load_as_subject_masks(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    rgba.paste((200, 0, 0, 255), (10, 10, 30, 30))
    rgba.save(tmp_path / "cut.png")
    alpha = np.asarray(load_alpha(tmp_path / "cut.png"))
    assert alpha[20, 20] == 255 and alpha[0, 0] == 0
    Image.new("RGBA", (8, 8), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.jpg")
    assert load_alpha(tmp_path / "opaque.png") is None and load_alpha(tmp_path / "rgb.jpg") is None
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "white.png")  # RGB mask: luminance
    assert np.asarray(load_mask(tmp_path / "white.png")).min() == 255
    np.testing.assert_array_equal(np.asarray(load_mask(tmp_path / "cut.png")), alpha)  # a cut-out as mask: alpha
    full = load_subject_mask(tmp_path / "rgb.jpg", None)  # no mask: the whole frame
    assert full.size == (8, 8) and np.asarray(full).min() == 255


# -- the loss ------------------------------------------------------------------------------------------------
def test_masked_loss_is_the_hand_computed_weighted_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    mask = torch.zeros(3, 1, 2, 2)
    mask[0, 0, 0, 0] = 1.0  # a quarter of sample 0: mean 0.25, weight 4 there
    mask[1] = 1.0  # all subject: the plain MSE of sample 1
    mask[2, 0, 1, 1] = 0.1  # a sliver: mean 0.025 < floor, weight 0.1 / floor
    err = (pred - target) ** 2
    per_sample = [
        err[0, :, 0, 0].sum() * 4.0 / 16,
        err[1].mean(),
        err[2, :, 1, 1].sum() * (0.1 / MASK_MEAN_FLOOR) / 16,
    ]
    want = sum(per_sample) / 3
    torch.testing.assert_close(masked_diffusion_loss(pred, target, mask), want)
    torch.testing.assert_close(
        masked_diffusion_loss(pred, target, torch.ones(3, 1, 2, 2)), diffusion_loss(pred, target)
    )
    torch.testing.assert_close(  # half-precision predictions are compared in float32
        masked_diffusion_loss(pred.half(), target, mask), masked_diffusion_loss(pred.half().float(), target, mask)
    )
    with pytest.raises(ValueError, match="latent resolution"):
        masked_diffusion_loss(pred, target, torch.ones(3, 1, 4, 4))


def test_background_only_changes_do_not_change_the_masked_loss_gradient():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(4, 4, 1)
    x, target = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[:, :, 1:4, 2:5] = 1.0
    mask[1, :, 0, 0] = 0.5  # a soft edge pixel belongs to the subject too

    def grads(x, target):
        layer.zero_grad()
        loss = masked_diffusion_loss(layer(x), target, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in layer.parameters()]

    loss, want = grads(x, target)
    background = mask == 0
    x2 = torch.where(background, torch.randn_like(x) * 10, x)  # a 1x1 conv: no spatial mixing
    target2 = torch.where(background, torch.randn_like(target) * 10, target)
    loss2, got = grads(x2, target2)
    assert torch.equal(loss, loss2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    _, plain = grads(x2, torch.where(background, target, target2 + 1))  # a subject change does change it
    assert not torch.allclose(plain[0], want[0])


# -- the trainer --------------------------------------------------------------------------------------------
def _cutouts(folder, num_images=4, size=48):
    """Instance photos as RGBA cut-outs: a ball (opaque) on a transparent background."""
    from PIL import ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        r = size * (0.25 + 0.03 * i)
        c = size / 2 + (i - 2) * 2
        ImageDraw.Draw(image).ellipse([c - r, c - r, c + r, c + r], fill=(230, 60 + 30 * i, 40, 255))
        image.save(folder / f"cut_{i}.png")
    return folder


@pytest.fixture(scope="module")
def masked(tiny_model, tmp_path_factory):
    """A prepared trainer (masked loss from the cut-outs' alpha, one random crop) with stage 2 built: its tests
    swap the cached masks and the batch settings instead of loading the model again."""
    images = _cutouts(tmp_path_factory.mktemp("cut") / "images")
    out = tmp_path_factory.mktemp("masked") / "out"
    trainer = Trainer(make_config(tiny_model, images, out, masked_loss=True, random_crops=1))
    trainer.prepare()
    trainer.build_stage(2)
    return trainer


def _step_gradients(trainer, mask, **changes):
    """The gradients of stage 2's first optimizer step with `mask` as the cached masks and `changes` to the
    config; the optimizer does not step, so the weights stay for the next call."""
    config, mask_before = trainer.config, trainer.latents.mask
    trainer.config, trainer.latents.mask = dataclasses.replace(config, **changes), mask
    try:
        trainer.make_optimizer(2)  # reseeds the step's noise generator
        grads = []
        trainer.optimizer.step = lambda *a, **k: grads.extend(p.grad.detach().clone() for p in trainer.params)
        with trainer.stage_loop(2) as train_step:
            train_step(0)
    finally:
        trainer.config = config
        trainer.latents.mask = mask_before
    return grads


def test_the_latent_cache_holds_each_views_mask(masked):
    cache, cfg = masked.latents, masked.config
    assert cache.mask.shape == (cache.mean.shape[0], 1, *cache.mean.shape[-2:])
    assert cache.views_per_image == 4  # center crop, one random crop, both mirrored
    for i, path in enumerate(scan_image_folder(cfg.images, 32).images):  # image i's views, from its alpha
        want = latent_masks(mask_views(load_alpha(path), 32, True, 1, seed=cfg.seed + i), (8, 8))
        torch.testing.assert_close(cache.mask[cache.views_of[i]], want)
    assert 0.2 < float(cache.mask.mean()) < 0.9


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # the optimizer does not step here
def test_all_ones_masks_train_like_the_default_and_accumulation_keeps_the_batch(masked, monkeypatch):
    """All-ones masks weight every pixel by 1: the default run's gradients (the masks draw no random numbers, so
    images, noise and timesteps are the same). With real masks, accumulated passes give the gradients of one
    larger batch (each sample is normalised by its own mask)."""
    real = masked.latents.mask
    with monkeypatch.context() as patch:  # off, the step takes the unmasked loss as before masks existed
        patch.setattr("attndb_peft.training.step.masked_diffusion_loss", None)
        default = _step_gradients(masked, None, batch_size=2, masked_loss=False)
    ones = _step_gradients(masked, torch.ones_like(real), batch_size=2)
    assert len(default) == len(ones) > 0
    for o, d in zip(ones, default):
        torch.testing.assert_close(o, d, rtol=1e-4, atol=1e-7)
    masked_grads = _step_gradients(masked, real, batch_size=2)
    assert any(not torch.allclose(m, d, rtol=1e-3, atol=1e-6) for m, d in zip(masked_grads, default))
    accumulated = _step_gradients(masked, real, batch_size=1, gradient_accumulation_steps=2)
    for a, m in zip(accumulated, masked_grads):
        torch.testing.assert_close(a, m, rtol=1e-4, atol=1e-7)


def test_masked_runs_resume_only_with_the_same_masks(masked):
    masked.make_optimizer(2)
    masked.save_checkpoint(2, 0)
    cfg = dataclasses.replace(masked.config, masked_loss=False, resume=True)
    with pytest.raises(InputError, match="masked_loss"):
        Trainer(cfg).prepare()


# -- settings and errors --------------------------------------------------------------------------------------
def test_flags_reach_the_config_and_masks_imply_the_masked_loss(tmp_path):
    base = ["train", "--model", "m", "--images", "i", "--category", "dog", "--output", "o"]
    assert config_from_args(build_parser().parse_args(base)).masked_loss is False
    assert config_from_args(build_parser().parse_args([*base, "--masked-loss"])).masked_loss is True
    config = config_from_args(build_parser().parse_args([*base, "--masks", str(tmp_path)]))
    assert config.masked_loss is True and config.masks == str(tmp_path)
    assert AttnDBConfig.from_dict(config.to_dict()) == config
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--masked-loss" in help_text and "--masks DIR" in help_text


def test_mask_problems_name_the_file_and_the_fix(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (40, 32), (200, 30, 30)).save(images / f"{name}.jpg")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (40, 32), 255).save(masks / "a.png")  # good
    Image.new("L", (32, 32), 255).save(masks / "b.png")  # wrong size
    Image.new("L", (40, 32), 0).save(masks / "c.png")  # all black
    Image.new("L", (40, 32), 255).save(masks / "typo.png")  # no photo
    report = scan_masks(scan_image_folder(images, 32).images, masks)
    assert [s.name if s else None for s in report.sources] == ["a.png", "b.png", "c.png", None]
    problems = "\n".join(report.problems)
    assert len(report.problems) == 3, problems
    assert "b.png: the mask is 32x32 but its photo b.jpg is 40x32" in problems and "save the mask at" in problems
    assert "c.png: the mask is all black" in problems and "mark the subject" in problems
    assert "d.jpg: no mask in `masks`" in problems and "d.png" in problems
    assert any("typo.png" in w for w in report.warnings)
    assert "no such folder" in scan_masks([images / "a.jpg"], tmp_path / "nowhere").problems[0]
    Image.new("L", (40, 32), 255).save(masks / "a.webp")
    assert "several masks" in scan_masks([images / "a.jpg"], masks).problems[0]


def test_alpha_problems_and_check_inputs(tiny_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "opaque.png")
    config = make_config(tiny_model, images, tmp_path / "out", masked_loss=True)
    with pytest.raises(InputError, match="none of the photos has transparency.*`masks` DIR"):
        check_inputs(config)
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(images / "empty.png")
    with pytest.raises(InputError, match="empty.png: the mask is fully transparent"):
        check_inputs(config)
    cut = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    cut.paste((9, 9, 9, 255), (5, 5, 30, 30))
    cut.save(images / "empty.png")
    warnings = check_inputs(config)
    assert any("opaque.png has no transparency" in w for w in warnings)
    assert check_inputs(make_config(tiny_model, images, tmp_path / "out")) == []  # off: masks not looked at


def test_the_model_card_says_the_loss_was_masked(tmp_path):
    from attndb_peft.export import LoraFactors, render_model_card

    lora = {"down_blocks.0.attentions.0.proj_in": LoraFactors(torch.zeros(4, 8), torch.zeros(8, 4))}
    off = render_model_card(make_config("m", tmp_path, tmp_path / "o"), lora, {}, [], embedding_dim=1024)
    on = render_model_card(make_config("m", tmp_path, tmp_path / "o", masked_loss=True), lora, {}, [], 1024)
    assert "masked_loss" not in off and "an addition to the\npaper's method" in on
