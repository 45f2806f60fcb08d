# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Base models: ids that resolve today, old ids still recognised, one-line errors naming what to do."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
from conftest import assert_same_models, assert_same_pixels, generate

from attndb_peft.base_model import DEFAULT_BASE_MODEL, SD15_BASE_MODEL, BaseModelError, check_base_model
from attndb_peft.cli import main
from attndb_peft.export import base_model_family
from attndb_peft.inference import UsageError, load_pipeline

MOVED_SD21 = "stabilityai/stable-diffusion-2-1-base"
MOVED_SD15 = "runwayml/stable-diffusion-v1-5"


@pytest.mark.parametrize(
    ("model", "family"),
    [
        (DEFAULT_BASE_MODEL, ("sd_v2", "openrail++")),
        (MOVED_SD21, ("sd_v2", "openrail++")),
        ("StabilityAI/Stable-Diffusion-2-1", ("sd_v2", "openrail++")),
        (SD15_BASE_MODEL, ("sd_v1", "creativeml-openrail-m")),
        (MOVED_SD15, ("sd_v1", "creativeml-openrail-m")),
        ("CompVis/stable-diffusion-v1-4", ("sd_v1", "creativeml-openrail-m")),
        ("someone/my-fine-tune", (None, "other")),
    ],
)
def test_old_and_new_ids_keep_their_family_and_license(model, family):
    assert base_model_family(model) == family


def _offline_empty_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


@pytest.mark.parametrize(("model", "mirror"), [(MOVED_SD21, DEFAULT_BASE_MODEL), (MOVED_SD15, SD15_BASE_MODEL)])
def test_a_moved_id_that_cannot_be_found_names_its_mirror(model, mirror, monkeypatch, tmp_path):
    _offline_empty_cache(monkeypatch, tmp_path)
    with pytest.raises(BaseModelError) as info:
        check_base_model(model)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"`model` {model}: not in the local Hub cache")
    assert f"use its mirror {mirror}" in message


def test_a_repo_that_does_not_exist_says_so_in_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors
    from huggingface_hub.errors import RepositoryNotFoundError

    http = importlib.import_module(errors.Response.__module__.split(".")[0])  # httpx, or the Hub client's copy

    def not_found(repo_id, filename, **kwargs):
        response = http.Response(404, request=http.Request("GET", f"https://huggingface.co/{repo_id}"))
        raise RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found for url", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(BaseModelError, match=rf"^`model` {MOVED_SD21}: not found on the Hub; use its mirror "):
        check_base_model(MOVED_SD21)
    with pytest.raises(BaseModelError, match=r"^`model` someone/typo: not found on the Hub; check the spelling"):
        check_base_model("someone/typo")


def test_paths_that_are_not_models(tmp_path):
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(BaseModelError, match="folder has no model_index.json"):
        check_base_model(str(tmp_path / "not-a-pipeline"))
    with pytest.raises(BaseModelError, match="no such folder or file"):
        check_base_model(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BaseModelError, match="is a file; give a diffusers folder"):
        check_base_model(str(tmp_path / "notes.txt"))


def test_cli_refuses_a_moved_id_in_one_line_and_writes_nothing(monkeypatch, tmp_path, instance_dir, capsys):
    _offline_empty_cache(monkeypatch, tmp_path)
    out = tmp_path / "out"
    code = main(
        ["train", "--model", MOVED_SD21, "--images", str(instance_dir), "--category", "dog", "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"--model {MOVED_SD21}: not in the local Hub cache" in err and DEFAULT_BASE_MODEL in err
    assert "Traceback" not in err
    code = main(["generate", "--model", MOVED_SD15, "--prompt", "a dog", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"use its mirror {SD15_BASE_MODEL}" in err


def _lay_out_hub_cache(cache, repo_id, folder, sha="89abcdef0123456789abcdef0123456789abcdef"):
    """The layout huggingface_hub writes (refs/main -> commit, snapshots/<commit>/<files>), subfolders included."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    shutil.copytree(folder, repo_dir / "snapshots" / sha)


def test_the_new_default_id_loads_offline_from_the_hub_cache(tiny_model, monkeypatch, tmp_path):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, DEFAULT_BASE_MODEL, tiny_model)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    check_base_model(DEFAULT_BASE_MODEL)
    pipe, _ = load_pipeline(DEFAULT_BASE_MODEL, device="cpu")
    local, _ = load_pipeline(str(tiny_model), device="cpu")
    assert_same_models(pipe, local)
    assert_same_pixels(generate(pipe, "a photo of a dog"), generate(local, "a photo of a dog"))
    with pytest.raises(UsageError, match=f"^`model` {MOVED_SD21}: not in the local Hub cache"):
        load_pipeline(MOVED_SD21, device="cpu")


@pytest.mark.parametrize(
    ("pipeline", "transformer"),
    [("PixArtAlphaPipeline", "PixArtTransformer2DModel"), ("SanaPipeline", "SanaTransformer2DModel")],
)
def test_a_transformer_model_without_a_family_is_named_in_one_line_folder_or_hub_id(
    pipeline, transformer, monkeypatch, tmp_path, instance_dir, capsys
):
    from huggingface_hub import constants

    from attndb_peft.families import family_from_pipeline_class

    folder = tmp_path / "model"
    folder.mkdir()
    index = {"_class_name": pipeline, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", transformer], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    expected = f"a {pipeline}, which attndb has no family for"
    with pytest.raises(BaseModelError, match=expected):
        check_base_model(str(folder))
    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, "someone/transformer-model", folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(BaseModelError, match=expected):
        check_base_model("someone/transformer-model")
    out = tmp_path / "out"
    argv = ["train", "--model", str(folder), "--images", str(instance_dir), "--category", "dog", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "SD3/3.5 and Flux.1" in err and "Traceback" not in err
    assert not out.exists()
    assert family_from_pipeline_class(pipeline) is None
    assert family_from_pipeline_class("StableDiffusion3Pipeline").name == "sd3"
    assert family_from_pipeline_class("FluxImg2ImgPipeline").name == "flux"
