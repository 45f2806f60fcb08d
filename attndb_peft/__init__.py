# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""attndb_peft: AttnDreamBooth personalization for Stable Diffusion as PEFT/LoRA adapters.

Importing the package also adds `load_attndb` / `unload_attndb` methods to diffusers' Stable Diffusion
pipelines (new names only; no existing diffusers method is changed).
"""

from .config import AttnDBConfig, StageConfig
from .errors import AttnDBError, RunError, UsageError
from .hub import push_to_hub
from .loading import _register_pipeline_methods, load_attndb, unload_attndb
from .regularizer import attention_regularizer
from .trainer import train

__version__ = "0.1.0"

__all__ = [
    "AttnDBConfig",
    "AttnDBError",
    "RunError",
    "StageConfig",
    "__version__",
    "attention_regularizer",
    "load_attndb",
    "push_to_hub",
    "train",
    "UsageError",
    "unload_attndb",
]

_register_pipeline_methods()
