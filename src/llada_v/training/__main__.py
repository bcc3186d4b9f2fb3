"""`python -m llada_v.training FLAGS` (also under `accelerate launch`): see docs/training.md."""

from .trainer import main

main()
