# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`load_attndb` / `unload_attndb` on the tiny pipeline with really trained adapters: Hub ids from an offline
cache, per-block weights of a foreign PEFT LoRA kept, two differently trained concepts side by side, and every
refused input leaving the pipeline exactly as it was. The same images as stock diffusers, the LoRA strength,
mixing with a foreign LoRA and unloading to the base model are tested for every family in
test_family_contracts.py."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_same_models, assert_same_pixels, fresh_pipeline, generate, make_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import attndb_peft
from attndb_peft.export import EMBEDDING_NAME, LORA_NAME
from attndb_peft.loading import AdapterError, loaded_concepts, unload_attndb

PLAIN = "a photo of a dog in the jungle"


def _scalings(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        (component, name, adapter): scale
        for component in ("unet", "text_encoder")
        for name, module in getattr(pipe, component).named_modules()
        if isinstance(module, BaseTunerLayer)
        for adapter, scale in module.scaling.items()
    }


def _state(pipe):
    """Everything a refused load/unload must leave alone."""
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    return {
        "adapters": pipe.get_list_adapters(),
        "active": pipe.get_active_adapters(),
        "scalings": _scalings(pipe),
        "vocab": dict(pipe.tokenizer.get_vocab()),
        "vocab_size": pipe.text_encoder.config.vocab_size,
        "embeddings": embeddings.detach().clone(),
        "concepts": loaded_concepts(pipe),
    }


def _assert_same_state(before, after):
    for key in before:
        if key == "embeddings":
            assert torch.equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key


def _load(path):
    # load_file memory-maps the file: copy before writing to the same path, or the write pulls the pages away.
    return {key: tensor.clone() for key, tensor in load_file(str(path)).items()}


def _rewrite(path, change):
    """Rewrite a safetensors file through `change(tensors, metadata)`, keeping its header metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = _load(path)
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def adapter(trained):
    return trained.output_dir


@pytest.fixture(scope="module")
def second_adapter(tiny_model, instance_dir, tmp_path_factory):
    """Another concept trained with the same (default) token `<attndb-dog>`: other seed, other steps."""
    from attndb_peft.trainer import Trainer

    out = tmp_path_factory.mktemp("second") / "out"
    Trainer(make_config(tiny_model, instance_dir, out, steps=(1, 1, 1), seed=1)).run()
    return out


@pytest.fixture(scope="module")
def style_lora(tiny_model, tmp_path_factory):
    """A foreign LoRA made with PEFT (random, non-zero B) and saved with diffusers' writer."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False)
    unet.add_adapter(config, adapter_name="style")
    folder = tmp_path_factory.mktemp("style")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="style")
    )
    return folder


def _with_style(model, style, weight=0.6):
    pipe = fresh_pipeline(model)
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["style"], [weight])
    return pipe


# ---------------------------------------------------------------------------------------------- loading
def test_methods_are_added_to_stable_diffusion_pipelines_only_as_new_names():
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    for cls in (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline):
        assert cls.load_attndb is attndb_peft.load_attndb and cls.unload_attndb is attndb_peft.unload_attndb
        assert cls.load_lora_weights.__module__.startswith("diffusers.")  # existing methods untouched
        assert cls.load_textual_inversion.__module__.startswith("diffusers.")


def _lay_out_hub_cache(cache, repo_id, folder, sha):
    """The layout huggingface_hub itself writes: refs/main -> commit, snapshots/<commit>/<files>."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    snapshot = repo_dir / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file():
            shutil.copy(path, snapshot / path.name)


def test_hub_repo_id_resolves_offline_from_the_cache(adapter, tiny_model, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sha = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, "attndb-test/dog", adapter, sha)
    calls = []
    real = huggingface_hub.hf_hub_download

    def recording(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    reference = fresh_pipeline(tiny_model)
    token = reference.load_attndb(adapter)
    prompt = f"a photo of a {token} dog"

    pipe = fresh_pipeline(tiny_model)
    assert pipe.load_attndb("attndb-test/dog", cache_dir=cache, hf_token="hf_dummy") == token
    assert_same_models(pipe, reference)
    assert_same_pixels(generate(pipe, prompt), generate(reference, prompt))
    assert [c[1] for c in calls] == [EMBEDDING_NAME, LORA_NAME]  # only what is needed
    assert all(c[2]["cache_dir"] == cache and c[2]["token"] == "hf_dummy" for c in calls)

    # the default cache (HF_HUB_CACHE / HF_HOME) and a pinned revision
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    pinned = fresh_pipeline(tiny_model)
    pinned.load_attndb("attndb-test/dog", revision=sha, local_files_only=True)
    assert calls[-1][2]["revision"] == sha and calls[-1][2]["local_files_only"] is True
    assert_same_models(pinned, reference)
    assert_same_pixels(generate(pinned, prompt), generate(reference, prompt))

    before = _state(pinned)
    with pytest.raises(AdapterError, match="not in the local Hub cache"):
        pinned.load_attndb("attndb-test/absent", token="<other>")
    _assert_same_state(before, _state(pinned))


def test_a_folder_without_attndb_header_keys_still_loads(adapter, tiny_model, tmp_path):
    """Files without the `attndb_*` header keys (hand-made, or written before a key existed) load like the
    originals: an SD embedding names its token by its tensor key, and no format version means no version check."""
    folder = _copy(adapter, tmp_path)
    for name in (EMBEDDING_NAME, LORA_NAME):
        _rewrite(folder / name, lambda t, m: [m.pop(k) for k in list(m) if k.startswith("attndb_")])
    reference = fresh_pipeline(tiny_model)
    token = reference.load_attndb(adapter)
    pipe = fresh_pipeline(tiny_model)
    assert pipe.load_attndb(folder) == token
    assert_same_models(pipe, reference)


# ---------------------------------------------------------------------------------------------- mixing
def test_per_block_weights_of_active_adapters_are_kept(adapter, style_lora, tiny_model):
    pipe = fresh_pipeline(tiny_model)
    pipe.load_lora_weights(str(style_lora), adapter_name="style")
    pipe.set_adapters(["style"], [{"unet": {"down": 0.25, "mid": 0.5, "up": 1.5}}])
    before = _scalings(pipe)
    assert len(set(before.values())) > 1
    pipe.load_attndb(adapter)
    assert {k: v for k, v in _scalings(pipe).items() if k[2] == "style"} == before


def test_two_concepts_trained_with_the_same_token_coexist_and_unload_independently(
    adapter, second_adapter, tiny_model
):
    base = fresh_pipeline(tiny_model)
    base_state = _state(base)
    pipe = fresh_pipeline(tiny_model)
    assert pipe.load_attndb(adapter, token="<dog-a>") == "<dog-a>"
    assert pipe.load_attndb(second_adapter, token="<dog-b>", weight=0.7) == "<dog-b>"
    assert pipe.get_active_adapters() == ["dog-a", "dog-b"]
    assert loaded_concepts(pipe) == {"dog-a": "<dog-a>", "dog-b": "<dog-b>"}
    rows = pipe.text_encoder.get_input_embeddings().weight
    for token, folder in (("<dog-a>", adapter), ("<dog-b>", second_adapter)):
        (vector,) = load_file(str(folder / EMBEDDING_NAME)).values()
        assert torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids(token)], vector.reshape(-1))
    both = generate(pipe, "a photo of a <dog-a> dog and a <dog-b> dog")

    assert pipe.unload_attndb("dog-a") == "<dog-a>"
    assert pipe.get_active_adapters() == ["dog-b"] and "<dog-a>" not in pipe.tokenizer.get_vocab()
    only_b = fresh_pipeline(tiny_model)
    only_b.load_attndb(second_adapter, token="<dog-b>", weight=0.7)
    prompt = "a photo of a <dog-b> dog"
    assert_same_pixels(generate(pipe, prompt), generate(only_b, prompt))
    assert abs(generate(pipe, "a photo of a <dog-a> dog and a <dog-b> dog") - both).max() > 1e-4

    assert pipe.unload_attndb() == "<dog-b>"  # the only one left: no name needed
    state = _state(pipe)
    assert not any(state["adapters"].values()) and state["active"] == []
    assert [type(m) for m in pipe.unet.modules()] == [type(m) for m in base.unet.modules()]  # no empty LoRA layers
    for key in ("vocab", "vocab_size", "embeddings", "concepts"):
        _assert_same_state({key: base_state[key]}, {key: state[key]})
    assert_same_pixels(generate(pipe, PLAIN), generate(base, PLAIN))


def test_unload_after_the_user_deleted_the_lora(adapter, tiny_model):
    pipe = fresh_pipeline(tiny_model)
    token = pipe.load_attndb(adapter)
    pipe.delete_adapters("attndb-dog")
    assert pipe.unload_attndb() == token and token not in pipe.tokenizer.get_vocab()
    assert [type(m) for m in pipe.unet.modules()] == [type(m) for m in fresh_pipeline(tiny_model).unet.modules()]


# ---------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def busy_pipe(adapter, style_lora, tiny_model):
    """A pipeline with a foreign LoRA at 0.6 and the concept at 0.8: what every refusal must leave alone."""
    pipe = _with_style(tiny_model, style_lora, 0.6)
    pipe.load_attndb(adapter, weight=0.8)
    return pipe


def _copy(adapter, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder, ignore=shutil.ignore_patterns("checkpoints"))
    return folder


def _nan_embedding(folder):
    _rewrite(folder / EMBEDDING_NAME, lambda t, m: t.update({k: v * float("nan") for k, v in t.items()}))


def _inf_lora(folder):
    def change(tensors, metadata):
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("inf")

    _rewrite(folder / LORA_NAME, change)


def _wider_embedding(folder):
    def change(tensors, metadata):
        (key,) = tensors
        tensors[key] = torch.randn(1, 48)
        metadata["attndb_base_model"] = "stabilityai/stable-diffusion-2-1-base"

    _rewrite(folder / EMBEDDING_NAME, change)


def _misfit_lora(folder):
    def change(tensors, metadata):
        key = next(k for k in sorted(tensors) if "attn2.to_k.lora_A" in k)
        tensors[key] = torch.randn(tensors[key].shape[0], 1024)
        metadata["attndb_base_model"] = "stabilityai/stable-diffusion-2-1-base"

    _rewrite(folder / LORA_NAME, change)


def _unknown_module(folder):
    def change(tensors, metadata):
        for part in ("lora_A", "lora_B"):
            key = next(k for k in sorted(tensors) if f"attn1.to_q.{part}" in k)
            tensors[key.replace("down_blocks.0", "down_blocks.7")] = tensors.pop(key)

    _rewrite(folder / LORA_NAME, change)


def _newer_format(folder):
    _rewrite(folder / LORA_NAME, lambda t, m: m.update({"attndb_format_version": "2.0"}))


def _pickle_instead(folder):
    torch.save(_load(folder / EMBEDDING_NAME), folder / EMBEDDING_NAME)


def _bin_files_only(folder):
    for name in (EMBEDDING_NAME, LORA_NAME):
        torch.save(_load(folder / name), folder / name.replace(".safetensors", ".bin"))
        (folder / name).unlink()


def _truncated(folder):
    data = (folder / LORA_NAME).read_bytes()
    (folder / LORA_NAME).write_bytes(data[: len(data) // 2])


def _garbage(folder):
    (folder / EMBEDDING_NAME).write_bytes(b"\x00\x01 this is not a safetensors file" * 10)


BROKEN_FOLDERS = {
    "missing lora": (lambda f: (f / LORA_NAME).unlink(), f"missing {LORA_NAME}"),
    "missing embedding": (lambda f: (f / EMBEDDING_NAME).unlink(), f"missing {EMBEDDING_NAME}"),
    "pickle under the safetensors name": (_pickle_instead, "pickle / PyTorch checkpoint, not safetensors"),
    "only .bin files": (_bin_files_only, "only loads safetensors"),
    "truncated": (_truncated, "corrupted or truncated"),
    "garbage": (_garbage, "corrupted or truncated"),
    "nan embedding": (_nan_embedding, "non-finite values"),
    "inf lora": (_inf_lora, "non-finite values"),
    "other text encoder width": (
        _wider_embedding,
        r"text encoder of width 48, this pipeline's is 32: load it into the base model it was trained on "
        r"\(stabilityai/stable-diffusion-2-1-base\)",
    ),
    "lora shapes of another base": (_misfit_lora, r"does not fit this pipeline's U-Net: 1 of \d+ modules.*2-1-base"),
    "lora module this u-net lacks": (_unknown_module, "module.s. this U-Net does not have .down_blocks.7"),
    "newer format": (_newer_format, "newer than this attndb_peft reads"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_broken_adapter_is_refused_and_the_pipeline_is_unchanged(case, busy_pipe, adapter, tmp_path):
    damage, message = BROKEN_FOLDERS[case]
    folder = _copy(adapter, tmp_path)
    damage(folder)
    before = _state(busy_pipe)
    with pytest.raises(AdapterError, match=message):
        busy_pipe.load_attndb(folder, token="<fresh-token>")
    _assert_same_state(before, _state(busy_pipe))


BAD_CALLS = {
    "same concept twice": (lambda a, s: ((a,), {}), r"token '<attndb-dog>' is already loaded .*unload_attndb"),
    "same concept under another adapter name": (
        lambda a, s: ((a,), {"adapter_name": "again"}),
        "already loaded",
    ),
    "second concept with the same token": (lambda a, s: ((s,), {}), "token='<attndb-dog-2>'"),
    "adapter name of the foreign lora": (
        lambda a, s: ((s,), {"token": "<x-dog>", "adapter_name": "style"}),
        "adapter_name='style' is already used by a LoRA",
    ),
    "token of the base vocabulary": (lambda a, s: ((s,), {"token": "a"}), "already exists in this pipeline's"),
    "token differing only in case": (lambda a, s: ((s,), {"token": "<ATTNDB-Dog>"}), "already loaded"),
    "adapter name with a dot": (lambda a, s: ((s,), {"adapter_name": "a.b", "token": "<y>"}), "can't contain dots"),
    "non-finite weight": (lambda a, s: ((s,), {"weight": float("nan"), "token": "<y>"}), "finite number"),
    "no such folder": (lambda a, s: ((a / "nope" / "deeper",), {}), "no such folder"),
    "a file, not a folder": (lambda a, s: ((a / LORA_NAME,), {}), "is a file; pass the adapter folder"),
    "token with a space": (lambda a, s: ((s,), {"token": "<a b>"}), "one word without spaces"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_call_is_refused_and_the_pipeline_is_unchanged(case, busy_pipe, adapter, second_adapter):
    make_args, message = BAD_CALLS[case]
    args, kwargs = make_args(adapter, second_adapter)
    before = _state(busy_pipe)
    with pytest.raises(AdapterError, match=message):
        busy_pipe.load_attndb(*args, **kwargs)
    _assert_same_state(before, _state(busy_pipe))


def test_unknown_hub_argument_is_a_type_error(busy_pipe, second_adapter):
    before = _state(busy_pipe)
    with pytest.raises(TypeError, match="use_auth_token.*hf_token"):
        busy_pipe.load_attndb(second_adapter, use_auth_token="x")
    _assert_same_state(before, _state(busy_pipe))


@pytest.mark.parametrize(
    ("name", "message"),
    [("nope", r"no attndb concept with adapter_name='nope' is loaded \(loaded: 'attndb-dog'\)"), ("style", "delete_")],
)
def test_unload_of_an_unknown_adapter_is_refused(name, message, busy_pipe):
    before = _state(busy_pipe)
    with pytest.raises(AdapterError, match=message):
        unload_attndb(busy_pipe, name)
    _assert_same_state(before, _state(busy_pipe))


def test_unload_needs_a_name_when_several_concepts_are_loaded(adapter, second_adapter, tiny_model):
    pipe = fresh_pipeline(tiny_model)
    with pytest.raises(AdapterError, match="No attndb concept is loaded"):
        pipe.unload_attndb()
    pipe.load_attndb(adapter)
    pipe.load_attndb(second_adapter, token="<other-dog>")
    before = _state(pipe)
    with pytest.raises(AdapterError, match=r"2 attndb concepts are loaded .*unload_attndb\('attndb-dog'\)"):
        pipe.unload_attndb()
    _assert_same_state(before, _state(pipe))


@pytest.mark.parametrize("failing", ["load_lora_weights", "set_adapters"])
def test_a_diffusers_failure_midway_is_rolled_back(failing, busy_pipe, second_adapter, monkeypatch):
    before = _state(busy_pipe)

    def boom(*args, **kwargs):
        raise RuntimeError(f"simulated failure in {failing}")

    real_load = busy_pipe.load_lora_weights
    if failing == "set_adapters":  # fail after the LoRA was injected
        monkeypatch.setattr(busy_pipe, "set_adapters", boom)
    else:  # fail after part of the LoRA was injected

        def half_load(*args, **kwargs):
            real_load(*args, **kwargs)
            raise RuntimeError(f"simulated failure in {failing}")

        monkeypatch.setattr(busy_pipe, "load_lora_weights", half_load)
    with pytest.raises(RuntimeError, match="simulated failure"):
        busy_pipe.load_attndb(second_adapter, token="<rolled-back>")
    monkeypatch.undo()
    _assert_same_state(before, _state(busy_pipe))
