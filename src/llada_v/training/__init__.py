"""Fine-tuning LLaDA-V: LLaVA-format data (`data`) and the `Trainer` with stage presets, per-module learning
rates and LoRA (`trainer`). `python -m llada_v.training FLAGS` runs `trainer.main` (docs/training.md).

Package-only code (never part of a checkpoint's remote code).
"""

import logging


class _DropMissingKernelsNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    `transformers.trainer_utils` imports PEFT, PEFT imports bitsandbytes, and bitsandbytes' CPU backend, on CPUs
    with AVX512-BF16, tries to fetch an optional 4-bit matmul kernel from the Hub through the `kernels` package
    and warns at import time when that package is missing. Training never runs 4-bit CPU matmuls (and 4-bit
    inference falls back to bitsandbytes' own CPU code), so the line is noise in front of every run and `--help`.
    Only that message on that logger is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# Installed before anything imports transformers' Trainer: the warning is emitted while bitsandbytes is imported.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMissingKernelsNotice())
