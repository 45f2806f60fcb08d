# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`python -m attndb_peft ...` is the `attndb` command (also under `accelerate launch -m attndb_peft`)."""

import sys

from .cli import main

sys.exit(main())
