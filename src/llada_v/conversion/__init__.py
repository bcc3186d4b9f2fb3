"""Checkpoint conversion: the released LLaDA-V format (`official`, `llada-v convert`), an untrained LLaDA-V
composed from LLaDA-8B-Instruct and SigLIP (`compose`), what both share (`common`) and the LLaDA tokenizer
with `<image>` added (`tokenizer`).

Package-only code (never part of a checkpoint's remote code).
"""
