"""llada-v: LLaDA-V (a masked-diffusion multimodal LLM) for Hugging Face Transformers.

The flat modules beside this file double as the checkpoint's remote code; importing the package also
registers the classes with the Auto* factories, so `AutoModel.from_pretrained` works without
`trust_remote_code` when `llada_v` is installed.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_llada_v import LladaVConfig, LladaVTextConfig
from .generation_utils import LladaVGenerationConfig
from .image_processing_llada_v import LladaVImageProcessor
from .modeling_llada_v import LladaVModel, LladaVModelOutput, LladaVTextModel
from .processing_llada_v import LladaVProcessor

__version__ = "0.1.0"

AutoConfig.register(LladaVConfig.model_type, LladaVConfig, exist_ok=True)
AutoConfig.register(LladaVTextConfig.model_type, LladaVTextConfig, exist_ok=True)
AutoModel.register(LladaVConfig, LladaVModel, exist_ok=True)
AutoModel.register(LladaVTextConfig, LladaVTextModel, exist_ok=True)
AutoImageProcessor.register(LladaVConfig, slow_image_processor_class=LladaVImageProcessor, exist_ok=True)
AutoProcessor.register(LladaVConfig, LladaVProcessor, exist_ok=True)

__all__ = [
    "LladaVConfig",
    "LladaVTextConfig",
    "LladaVGenerationConfig",
    "LladaVImageProcessor",
    "LladaVProcessor",
    "LladaVModel",
    "LladaVModelOutput",
    "LladaVTextModel",
]
