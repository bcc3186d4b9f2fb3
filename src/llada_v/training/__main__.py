"""`python -m llada_v.training FLAGS` (also under `accelerate launch`): see docs/training.md."""

import sys

from .trainer import run

sys.exit(run())
