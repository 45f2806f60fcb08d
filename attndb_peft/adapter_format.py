# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The adapter folder's contract: its file names and format version, shared by the writer (`export.py`) and
the reader (`loading.py`)."""

from __future__ import annotations

__all__ = [
    "ADAPTER_FILES",
    "CONFIG_NAME",
    "EMBEDDING_NAME",
    "FORMAT_VERSION",
    "KOHYA_NAME",
    "LORA_NAME",
    "MODEL_CARD_NAME",
]

#: The concept's token embedding(s), in diffusers' textual-inversion layout.
EMBEDDING_NAME = "attndb_embedding.safetensors"
#: The U-Net LoRA in diffusers/PEFT layout (`pipe.load_lora_weights`).
LORA_NAME = "pytorch_lora_weights.safetensors"
#: The same LoRA and embedding in kohya's layout (ComfyUI, A1111, InvokeAI).
KOHYA_NAME = "attndb_kohya.safetensors"
#: The run's settings and what the loader needs to know (token, category, family).
CONFIG_NAME = "attndb_config.json"
#: The model card.
MODEL_CARD_NAME = "README.md"
#: Every file of a finished adapter folder.
ADAPTER_FILES = (EMBEDDING_NAME, LORA_NAME, KOHYA_NAME, CONFIG_NAME, MODEL_CARD_NAME)
#: Version of the adapter folder layout; `load_attndb` refuses folders from a newer major version.
FORMAT_VERSION = "1.0"
