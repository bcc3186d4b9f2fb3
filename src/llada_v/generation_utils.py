"""Diffusion generation for LLaDA-V (filled by the sampler issue).

For now it holds the generation config class that `LladaVModel` declares, so checkpoints carry the
released defaults in `generation_config.json`.
"""

from transformers import GenerationConfig


class LladaVGenerationConfig(GenerationConfig):
    """Generation settings of LLaDA-V's masked-diffusion sampler (the sampler itself lands with issue 4)."""


class LladaVGenerationMixin:
    """Placeholder mixin: `diffusion_generate` lands with the sampler issue."""


__all__ = ["LladaVGenerationConfig", "LladaVGenerationMixin"]
