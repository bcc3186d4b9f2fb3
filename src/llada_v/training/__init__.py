"""Fine-tuning LLaDA-V: LLaVA-format data (`data`) and the `Trainer` with stage presets, per-module learning
rates and LoRA (`trainer`). `python -m llada_v.training FLAGS` runs `trainer.main` (docs/training.md).

Package-only code (never part of a checkpoint's remote code).
"""
