"""llada-v: LLaDA-V (a masked-diffusion multimodal LLM) for Hugging Face Transformers.

The flat modules beside this file double as the checkpoint's remote code. `import llada_v` itself is light (the
`llada-v` command answers `--help` without importing torch): the classes below load on first use, and the first
use also registers them with the Auto* factories, so that after `from llada_v import LladaVModel` (or any
class, or `llada_v.register_auto_classes()`) `AutoModel.from_pretrained` works without `trust_remote_code`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"


class _DropMissingKernelsNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    PEFT imports bitsandbytes (training, every command that loads an adapter, 4-bit/8-bit loading), and bitsandbytes'
    CPU backend, on CPUs with AVX512-BF16, tries to fetch an optional 4-bit matmul kernel from the Hub through the
    `kernels` package and warns at import time when that package is missing. llada-v never needs it (4-bit CPU
    inference falls back to bitsandbytes' own code), so the line is noise in front of every such command. Only that
    message on that logger is dropped; installed when `llada_v` is imported, before anything imports bitsandbytes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMissingKernelsNotice())

# Public name -> the module that defines it.
_EXPORTS = {
    "LladaVConfig": "configuration_llada_v",
    "LladaVDenoisingBatch": "denoising_llada_v",
    "LladaVDenoisingRun": "denoising_llada_v",
    "LladaVTextConfig": "configuration_llada_v",
    "LladaVGenerationConfig": "generation_config_llada_v",
    "LladaVImageProcessor": "image_processing_llada_v",
    "LladaVProcessor": "processing_llada_v",
    "LladaVModel": "modeling_llada_v",
    "LladaVModelOutput": "modeling_llada_v",
    "LladaVTextModel": "modeling_llada_v",
}
_registered = False


def register_auto_classes() -> None:
    """Register the llada-v classes with `AutoConfig`, `AutoModel`, `AutoImageProcessor` and `AutoProcessor`
    (idempotent; imports transformers and torch)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

    from .configuration_llada_v import LladaVConfig, LladaVTextConfig
    from .image_processing_llada_v import LladaVImageProcessor
    from .modeling_llada_v import LladaVModel, LladaVTextModel
    from .processing_llada_v import LladaVProcessor

    AutoConfig.register(LladaVConfig.model_type, LladaVConfig, exist_ok=True)
    AutoConfig.register(LladaVTextConfig.model_type, LladaVTextConfig, exist_ok=True)
    AutoModel.register(LladaVConfig, LladaVModel, exist_ok=True)
    AutoModel.register(LladaVTextConfig, LladaVTextModel, exist_ok=True)
    AutoImageProcessor.register(LladaVConfig, slow_image_processor_class=LladaVImageProcessor, exist_ok=True)
    AutoProcessor.register(LladaVConfig, LladaVProcessor, exist_ok=True)
    _registered = True


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llada_v' has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [  # noqa: RUF022 - in the order of _EXPORTS
    "LladaVConfig",
    "LladaVTextConfig",
    "LladaVGenerationConfig",
    "LladaVImageProcessor",
    "LladaVProcessor",
    "LladaVModel",
    "LladaVModelOutput",
    "LladaVTextModel",
    "register_auto_classes",
]
