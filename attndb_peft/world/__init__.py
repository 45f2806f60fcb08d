# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The toy world: procedural scenes and personal concepts (`scenes`), a small base model pretrained on them
(`model`, shipped weights) and exact pixel scorers (`scorers`), so that what attndb does can be measured offline."""
