# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The toy world's scenes, concepts and base model: determinism, the caption grammar, the held-out split,
pretraining that resumes bit-identically, and the base model folder that `--model` takes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from attndb_peft.world import scenes as W
from attndb_peft.world.model import (
    SHIPPED_DIR,
    WorldArchitecture,
    build_world_pipeline,
    world_config,
    world_tokenizer,
    write_base,
)
from attndb_peft.world.pretrain import PretrainConfig, pretrain


def test_captions_follow_the_training_prompt_grammar():
    assert W.caption(W.Scene("ball", "red", "grass")) == "a photo of a red ball on the grass"
    assert W.caption(W.Scene("box", "blue", "snow", "painting")) == "a painting of a blue box in the snow"
    assert W.caption(W.Scene("cone", None, "brick", "sketch"), token="<v>") == "a sketch of a <v> cone by a brick wall"
    assert W.caption(W.Scene("ball", "purple", "beach"), token="<v>") == "a photo of a purple <v> ball on the beach"
    with pytest.raises(ValueError, match="context='jungle'"):
        W.Scene("ball", "red", "jungle")


def test_every_world_word_is_one_token():
    tok = world_tokenizer()
    for word in W.WORLD_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    longest = W.caption(W.Scene("cone", "purple", "brick", "painting"), token="<attndb-cone>")
    tok.add_tokens(["<attndb-cone>"])
    assert len(tok(longest).input_ids) <= tok.model_max_length


def test_held_out_captions_are_new_combinations_of_seen_pairs():
    train, held = W.split_scenes()
    assert len(held) == 30 and not set(held) & set(train)
    assert len(train) + len(held) == len(W.all_scenes())

    def pairs(s):
        return set(itertools.combinations([s.category, s.colour, s.context, s.style], 2))

    seen = set().union(*(pairs(s) for s in train))
    for s in held:
        assert pairs(s) <= seen, s  # every pair of words was seen together: only the combination is new


def test_scenes_and_concepts_are_deterministic_and_concepts_vary():
    a, mask_a = W.render(W.Scene("ball", "red", "night"), np.random.default_rng(5))
    b, mask_b = W.render(W.Scene("ball", "red", "night"), np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == (W.SIZE, W.SIZE, 3) and np.array_equal(a, b)
    assert np.array_equal(mask_a, mask_b) and 40 < mask_a.sum() < 500
    assert tuple(a[mask_a].mean(0).round()) == W.COLOURS["red"]
    concepts = [W.make_concept(s) for s in range(40)]
    assert W.make_concept(7) == concepts[7]
    assert len({(c.category, c.pattern, c.colours) for c in concepts}) >= 35
    assert all(c.colours[0] != c.colours[1] for c in concepts)
    photos = W.concept_photos(concepts[0], 5)
    assert len(photos) == 5 and not np.array_equal(photos[0], photos[1])
    assert W.Concept.from_dict(json.loads(json.dumps(concepts[3].to_dict()))) == concepts[3]
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="non-negative integer"):
            W.make_concept(bad)


def test_no_pretraining_picture_has_a_pattern():
    # a pretraining object is one flat colour: only concepts carry two colours
    rng = np.random.default_rng(0)
    for scene in W.split_scenes()[0][:60]:
        if scene.style == "photo":
            image, mask = W.render(scene, rng)
            assert len(np.unique(image[mask].reshape(-1, 3), axis=0)) == 1


def test_world_pipeline_architecture():
    pipe = build_world_pipeline()
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 7  # cross-attention at 16x16 and 8x8 (and the mid block)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, W.SIZE, W.SIZE)).latent_dist.mean
    assert latents.shape == (1, 4, W.SIZE // 2, W.SIZE // 2)
    # --unet-layers-per-block 2: two ResNet + transformer layers in each down block, three in each up block
    deeper = build_world_pipeline(PretrainConfig(unet_layers_per_block=2)).unet
    assert [len(b.resnets) for b in deeper.down_blocks] == [2, 2]
    assert [len(b.resnets) for b in deeper.up_blocks] == [3, 3]
    assert sum(n.endswith("attn2") for n, _ in deeper.named_modules()) == 2 * 2 + 1 + 2 * 3


def test_pretrain_configs_architecture_defaults_are_the_shipped_models():
    """`PretrainConfig` takes its four architecture fields' defaults from `WorldArchitecture`, so the recipe and
    the model definition cannot drift apart, and either builds the same pipeline."""
    from dataclasses import asdict

    arch = asdict(WorldArchitecture())
    assert {k: getattr(PretrainConfig(), k) for k in arch} == arch
    a = build_world_pipeline(PretrainConfig(), seed=3).unet.state_dict()
    b = build_world_pipeline(WorldArchitecture(), seed=3).unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_world_modules_import_one_way_and_at_the_top():
    """No function-local import of the package's own modules in world/* (the command-line module excepted: it is
    imported by `attndb --help` and loads torch/diffusers only for the command that runs), and the imports run
    scenes <- scorers, model <- evaluation <- pretrain, never back."""
    import ast
    from pathlib import Path

    folder = Path(W.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            package_module = node.level > 0 or (node.module or "").startswith("attndb_peft")
            if path.name != "cli.py":
                assert not package_module or node in tree.body, f"{path.name}:{node.lineno}: a function-local import"
            if node.level == 1:
                own.update([node.module] if node.module else [a.name for a in node.names])
        imports[path.stem] = own
    assert imports["scenes"] == set()
    assert imports["scorers"] == {"scenes"}
    assert imports["model"] == {"scenes"}
    assert imports["evaluation"] == {"scenes", "scorers", "model"}
    assert imports["pretrain"] == {"scenes", "evaluation", "model"}


def _tiny(**kw) -> PretrainConfig:
    from attndb_peft.testing import TINY_PRETRAIN_SETTINGS

    return PretrainConfig(**{**TINY_PRETRAIN_SETTINGS, **kw})


@pytest.mark.parametrize(
    "recipe",
    [{}, {"train_text_encoder": False, "object_loss_weight": 4.0}],
    ids=["default", "frozen-encoder-object-weighted"],
)
def test_pretraining_is_deterministic_and_resumes_bit_identically(tmp_path, recipe):
    straight = pretrain(tmp_path / "a", _tiny(**recipe), evaluate=False)
    # the same run, stopped after its first checkpoint (step 2) and resumed
    early = pretrain(tmp_path / "b", _tiny(**recipe), evaluate=False, stop_after=2)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert json.loads((early / "pretrain.json").read_text())["steps_done"] == 2
    resumed = pretrain(tmp_path / "b", _tiny(**recipe), evaluate=False)
    from safetensors.torch import load_file

    for part in ("unet", "text_encoder"):
        files = sorted((straight / part).glob("*.safetensors"))
        assert files
        for f in files:
            a, b = load_file(str(f)), load_file(str(resumed / part / f.name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    log = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    assert log["settings"]["steps"] == 4 and log["unet_loss"][-1][0] == 4 and log["steps_done"] == 4
    with pytest.raises(ValueError, match="other settings"):
        pretrain(tmp_path / "a", _tiny(learning_rate=1e-4, **recipe), evaluate=False)


def test_a_run_started_before_a_setting_existed_resumes_with_the_old_behaviour(tmp_path, monkeypatch):
    """A run folder whose settings.json predates `train_text_encoder`, `object_loss_weight` and
    `unet_layers_per_block` was trained with the text encoder, a plain MSE and one layer a block: it must read as
    that whatever the defaults are, or a resume could silently change its recipe. Checked with defaults that differ
    from the old behaviour (as they did for a while)."""
    from dataclasses import asdict, dataclass

    from attndb_peft.world import pretrain as P

    @dataclass
    class OtherDefaults(PretrainConfig):
        train_text_encoder: bool = False
        object_loss_weight: float = 4.0
        unet_layers_per_block: int = 2

    monkeypatch.setattr(P, "PretrainConfig", OtherDefaults)
    new_settings = ("train_text_encoder", "object_loss_weight", "unet_layers_per_block")
    old = _tiny(train_text_encoder=True, object_loss_weight=0.0, unet_layers_per_block=1)
    settings = {k: v for k, v in asdict(old).items() if k not in new_settings}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="object_loss_weight, train_text_encoder, unet_layers_per_block"):
        pretrain(tmp_path / "old", _tiny(train_text_encoder=False, object_loss_weight=4.0, unet_layers_per_block=2),
                 evaluate=False)
    assert pretrain(tmp_path / "old", old, evaluate=False).is_dir()


def test_a_frozen_text_encoder_stays_at_its_initialisation(tmp_path, capsys):
    """`--frozen-text-encoder`: the U-Net trains, the text encoder is the seeded one, bit for bit."""
    from safetensors.torch import load_file

    from attndb_peft.cli import main

    config = _tiny(train_text_encoder=False)
    folder = pretrain(tmp_path / "frozen", config, evaluate=False)
    initial = build_world_pipeline(config, seed=config.seed)
    saved = load_file(str(folder / "text_encoder" / "model.safetensors"))
    expected = initial.text_encoder.state_dict()
    assert saved and all(torch.equal(saved[k], expected[k]) for k in saved)
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    start = initial.unet.state_dict()
    assert any(not torch.equal(unet[k].float(), start[k].half().float()) for k in unet)  # the U-Net did train
    assert json.loads((tmp_path / "frozen" / "settings.json").read_text())["train_text_encoder"] is False
    # The command line: the tiny run's sizes are no flags, so every call is refused (exit 2) with the settings
    # that differ, which include train_text_encoder only without --frozen-text-encoder (training it is the default).
    argv = ["world", "pretrain", "--output", str(tmp_path / "frozen"), "--steps", "4", "--threads", "1", "--quiet"]
    assert main(argv) == 2 and "train_text_encoder" in capsys.readouterr().err
    assert main([*argv, "--frozen-text-encoder"]) == 2 and "train_text_encoder" not in capsys.readouterr().err
    assert main([*argv, "--train-text-encoder"]) == 2 and "train_text_encoder" in capsys.readouterr().err


def test_pretrain_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps=0"):
        PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="caption_dropout"):
        PretrainConfig(caption_dropout=1.5)
    with pytest.raises(ValueError, match="object_loss_weight=-1"):
        PretrainConfig(object_loss_weight=-1)


def test_object_masks_on_the_latent_grid_cover_each_object():
    from attndb_peft.world.pretrain import _training_set

    config = _tiny(num_images=8)
    pictures, ids, masks = _training_set(config, world_tokenizer())
    assert masks.shape == (8, 1, W.SIZE // 2, W.SIZE // 2) and len(ids) == len(pictures) == 8
    # the same pictures' masks, rendered again from the same seed (the training set draws scenes in order)
    train, _ = W.split_scenes(config.held_out, seed=1)
    rng = np.random.default_rng([config.seed, 2])
    for i in range(8):
        pixels = torch.from_numpy(W.render(train[i], rng)[1])
        blocks = pixels.view(W.SIZE // 2, 2, W.SIZE // 2, 2).any(3).any(1)  # latent positions the object touches
        assert torch.all(masks[i, 0][blocks] > 0) and torch.all((masks[i, 0] > 0) >= blocks)
        assert 0 <= masks.min() and masks.max() <= 1
        # one latent position of widening: nothing two positions away from the object is weighted
        far = ~torch.nn.functional.max_pool2d(blocks[None, None].float(), 5, 1, 2)[0, 0].bool()
        assert torch.all(masks[i, 0][far] == 0)


def test_the_object_weighted_loss_is_the_weighted_mean_of_the_squared_error():
    """`pretrain_loss` against the formula, with the batch's draws redone by hand in the documented order."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from attndb_peft.world.pretrain import LatentCache, pretrain_loss

    torch.manual_seed(0)
    n, side = 5, W.SIZE // 2
    means, stds = torch.randn(n, 4, side, side), 0.1 * torch.rand(n, 4, side, side)
    ids, empty = torch.randint(1, 9, (n, 16)), torch.zeros(16, dtype=torch.long)
    masks = (torch.rand(n, 1, side, side) > 0.6).float() * torch.rand(n, 1, side, side)
    cache = LatentCache(means, stds, ids, empty, 0.9, masks)
    scheduler = DDPMScheduler(prediction_type="v_prediction")

    class Unet:  # a known function of its inputs in place of the U-Net
        device = torch.device("cpu")

        def __call__(self, noisy, t, states):
            return SimpleNamespace(sample=0.5 * noisy + states.mean())

    unet = Unet()

    def text_encoder(tokens):
        return (tokens.float(),)

    def by_hand(weight: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        j = torch.randint(0, n, (3,), generator=g)
        latents = (means[j] + stds[j] * torch.randn(means[j].shape, generator=g)) * 0.9
        tokens = ids[j].clone()
        tokens[torch.rand(3, generator=g) < 0.1] = empty
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (3,), generator=g)
        a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        b = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        error = (0.5 * (a * latents + b * noise) + tokens.float().mean() - (a * noise - b * latents)) ** 2
        w = (1 + weight * masks[j]).expand_as(error)
        return (w * error).sum() / w.sum()

    for weight in (0.0, 4.0):
        config = PretrainConfig(batch_size=3, caption_dropout=0.1, object_loss_weight=weight)
        loss = pretrain_loss(unet, text_encoder, scheduler, cache, config, torch.Generator().manual_seed(3))
        assert torch.allclose(loss, by_hand(weight), rtol=1e-5), weight
    assert not torch.allclose(by_hand(0.0), by_hand(4.0), rtol=1e-3)  # the weight does change the loss
    with pytest.raises(ValueError, match="masks"):
        pretrain_loss(unet, text_encoder, scheduler, LatentCache(means, stds, ids, empty, 0.9), config,
                      torch.Generator().manual_seed(3))


def test_pretrain_takes_the_object_loss_weight_from_the_command_line(tmp_path, capsys):
    from attndb_peft.cli import main

    assert PretrainConfig().object_loss_weight == 4.0  # the shipped model's recipe
    plain = pretrain(tmp_path / "plain", _tiny(object_loss_weight=0.0), evaluate=False)
    weighted = pretrain(tmp_path / "weighted", _tiny(object_loss_weight=2.5), evaluate=False)
    from safetensors.torch import load_file

    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(plain / name)), load_file(str(weighted / name))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "weighted" / "settings.json").read_text())["object_loss_weight"] == 2.5
    # the flag reaches the settings: the tiny run's sizes are no flags, so this is refused naming what differs,
    # and object_loss_weight is not among them
    argv = ["world", "pretrain", "--output", str(tmp_path / "weighted"), "--steps", "4", "--threads", "1", "--quiet"]
    assert main([*argv, "--object-loss-weight", "2.5"]) == 2 and "object_loss_weight" not in capsys.readouterr().err
    assert main(argv) == 2 and "object_loss_weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--object-loss-weight", "-2"])
    assert "--object-loss-weight" in capsys.readouterr().err


def test_pretrain_takes_the_unet_depth_from_the_command_line(tmp_path, capsys):
    """`--unet-layers-per-block N` reaches the settings (checked against a run folder's settings, before training)."""
    from dataclasses import asdict

    from attndb_peft.cli import main

    assert PretrainConfig().unet_layers_per_block == 1  # the shipped model's
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "settings.json").write_text(json.dumps(asdict(_tiny(unet_layers_per_block=2))))
    # the tiny run's sizes are no flags, so both are refused; only the one without the flag names the depth
    argv = ["world", "pretrain", "--output", str(tmp_path / "deep"), "--steps", "4", "--threads", "1", "--quiet"]
    assert main([*argv, "--unet-layers-per-block", "2"]) == 2
    assert "unet_layers_per_block" not in capsys.readouterr().err
    assert main(argv) == 2 and "unet_layers_per_block" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--unet-layers-per-block", "0"])
    assert "--unet-layers-per-block" in capsys.readouterr().err


@pytest.mark.skipif(not (SHIPPED_DIR / "model_index.json").is_file(), reason="shipped world model not built")
def test_base_folder_loads_with_stock_diffusers_and_carries_the_recipe(tmp_path):
    import yaml
    from diffusers import StableDiffusionPipeline

    out = write_base(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    recipe = yaml.safe_load((out / "attndb.yaml").read_text())
    config = world_config(images="x", category="ball", output="y", **recipe)
    assert config.resolution == W.SIZE and config.model == str(out.resolve())
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_base(out)


@pytest.mark.parametrize("device", ["foo", "cuda"])
def test_pretrain_refuses_a_device_it_cannot_use(tmp_path, capsys, device):
    from attndb_peft.cli import main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        main(["world", "pretrain", "--output", str(tmp_path / "run"), "--device", device])
    assert exit_info.value.code == 2
    assert f"--device: '{device}'" in capsys.readouterr().err and not (tmp_path / "run").exists()
