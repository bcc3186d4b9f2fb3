"""Benchmarks through lmms-eval: the `llada_v` model plugin (`lmms_eval_plugin`).

Package-only code (never part of a checkpoint's remote code).
"""
