"""`python -m qdylora ...` runs the `qdylora` command (for torchrun and accelerate launch)."""

import sys

from .cli import main

sys.exit(main())
