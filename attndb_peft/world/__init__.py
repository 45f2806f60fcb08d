# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The toy world: procedural scenes and personal concepts (`scenes`), exact pixel scorers (`scorers`), a small base
model shipped with the package (`model`: its definition, storage and loading), the command that pretrained it
(`pretrain`), how a base model is evaluated (`evaluation`) and the checkpoint scorer of a training run on a world
concept (`scoring`), so that what attndb does can be measured offline.

The modules import one way: `scenes` <- `scorers` <- `scoring`, `model` <- `evaluation` <- `pretrain`. Of the
core they use public names only (`attndb_peft.AttnDBConfig` and `train`, `attndb_peft.testing`, and names in the
`__all__` of `attndb_peft.config`, `attndb_peft.checkpoints` and `attndb_peft.scoring`); of the core, only the
command line and the demo import them, and `attndb_peft.scoring` finds `scoring` through its entry point.
"""

# Nothing is re-exported here: importing the package stays cheap (the command line imports it for `attndb --help`),
# and each module is imported by name.
__all__: list[str] = []
