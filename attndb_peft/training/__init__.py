# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The pieces of the training loop in `attndb_peft.trainer`: input checks (`inputs`), the runtime (`runtime`),
the kinds of stage (`stage_kinds`), one optimizer step (`step`), checkpoints and resume (`resume`) and the
latent cache (`cache`)."""

__all__: list[str] = []
