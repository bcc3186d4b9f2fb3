"""Configuration of LLaDA-V: a SigLIP vision tower, a 2-layer MLP projector and the bidirectional
LLaDA-8B language tower, trained as a masked diffusion model.

`LladaVConfig()` with no arguments describes the released GSAI-ML/LLaDA-V checkpoint exactly
(8,434,837,024 parameters, counting SigLIP's stored but unused post_layernorm). Every special id and
image-layout fact lives here, so the model, processor and sampler read one source of truth.
"""

from .compat_llada_v import ConfigBase, PreTrainedConfig, SiglipVisionConfig, with_sub_configs
from .image_layout_llada_v import default_grid_pinpoints, layout_kwargs

# SigLIP2 so400m-patch14-384 as LLaDA-V stores it: the last of 27 encoder layers is deleted and there
# is no pooling head (docs/parity.md Q8).
SIGLIP_SO400M_VISION_DEFAULTS = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": False,
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class LladaVTextConfig(ConfigBase):
    r"""
    The LLaDA language tower: a LLaMA-3-shaped decoder without a causal mask (RMSNorm, SwiGLU, RoPE, plain
    multi-head attention, no biases, untied lm_head).

    Args:
        vocab_size (`int`, defaults to 126464): rows of `embed_tokens` and `lm_head`.
        hidden_size (`int`, defaults to 4096), intermediate_size (`int`, defaults to 12288),
        num_hidden_layers (`int`, defaults to 32), num_attention_heads (`int`, defaults to 32),
        num_key_value_heads (`int`, defaults to `num_attention_heads`), head_dim (`int`, defaults to
        `hidden_size // num_attention_heads`): the decoder's shape.
        hidden_act (`str`, defaults to `"silu"`): activation of the gated MLP.
        max_position_embeddings (`int`, defaults to 16384): the longest merged sequence (prompt, image
            tokens and answer) the model accepts.
        rms_norm_eps (`float`, defaults to 1e-5), rope_theta (`float`, defaults to 500000.0).
        attention_bias (`bool`, defaults to False), attention_dropout (`float`, defaults to 0.0).
        initializer_range (`float`, defaults to 0.02): std of the normal init of fresh weights.
    """

    model_type = "llada_v_text"
    base_config_key = "text_config"

    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 16384
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 126081
    bos_token_id: int | None = 126080
    eos_token_id: int | list[int] | None = 126081

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({self.num_key_value_heads})",
        )
        _require(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        _require(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        _require(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        _require(
            0.0 <= self.attention_dropout < 1.0, f"attention_dropout must be in [0, 1), got {self.attention_dropout}"
        )


@with_sub_configs(text_config=LladaVTextConfig, vision_config=SiglipVisionConfig)
class LladaVConfig(ConfigBase):
    r"""
    Configuration of [`LladaVModel`]. Defaults reproduce the released GSAI-ML/LLaDA-V.

    Args:
        text_config (`LladaVTextConfig` or `dict`): the language tower.
        vision_config (`SiglipVisionConfig` or `dict`): the vision tower as stored (26 layers, no head).
        vision_feature_layer (`int`, defaults to -1): which encoder output feeds the projector, counted like
            `hidden_states` (-1: the last stored layer). SigLIP's `post_layernorm` is never applied.
        projector_hidden_act (`str`, defaults to `"gelu"`): the `mlp2x_gelu` activation (exact erf GELU).
        multimodal_projector_bias (`bool`, defaults to True).
        image_grid_pinpoints (`list[list[int]]`): candidate tilings as **(height, width)** pairs, in the order
            that decides ties (the released (1x1)..(6x6) of 384 px, width outer).
        max_num_tiles (`int`, defaults to 4): the "anyres_max_4" cap; tile grids larger than this many crops
            are pooled bilinearly (when the factor exceeds `anyres_pool_threshold`).
        anyres_pool_threshold (`float`, defaults to 1.1): pooling happens only above this factor.
        video_pool_stride (`int`, defaults to 2): video frames' 27x27 grids are pooled to ceil(27/2)^2.
        image_token_id (`int`, defaults to 126349): the `<image>` token (first id after the released
            tokenizer's 126349 entries, so the sampler can never emit it).
        mask_token_id (`int`, defaults to 126336): `<|mdm_mask|>`.
        bos_token_id / eos_token_id / pad_token_id / eot_token_id: 126080 / 126081 / 126081 / 126348.
        start_header_token_id / end_header_token_id: 126346 / 126347, `<|start_header_id|>` and
            `<|end_header_id|>` (turn delimiters; never generated at mask positions).
        user_role_token_id / assistant_role_token_id: 882 / 598, the `user` and `assistant` ids that delimit
            turns for the dialogue mask.
        tokenizer_vocab_size (`int`, defaults to 126349): the released tokenizer's length; ids at or above
            it are never generated.
        diffusion_eps (`float`, defaults to 1e-3): the training masking rate is
            `p_mask = (1 - eps) * t + eps`.
        dialogue_causal_attention (`bool`, defaults to False): in training, let a token attend only to
            conversation turns up to its own (the released runs used full bidirectional attention).
    """

    model_type = "llada_v"

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_grid_pinpoints: list | None = None
    max_num_tiles: int = 4
    anyres_pool_threshold: float = 1.1
    video_pool_stride: int = 2
    image_token_id: int = 126349
    mask_token_id: int = 126336
    bos_token_id: int | None = 126080
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    eot_token_id: int = 126348
    start_header_token_id: int = 126346
    end_header_token_id: int = 126347
    user_role_token_id: int = 882
    assistant_role_token_id: int = 598
    tokenizer_vocab_size: int = 126349
    diffusion_eps: float = 1e-3
    dialogue_causal_attention: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # The sub-configs are built here, not left to transformers (which does it only from 5.20 on).
        if self.text_config is None:
            self.text_config = LladaVTextConfig()
        elif isinstance(self.text_config, dict):
            self.text_config = LladaVTextConfig(**self.text_config)
        if self.vision_config is None:
            self.vision_config = dict(SIGLIP_SO400M_VISION_DEFAULTS)
        if isinstance(self.vision_config, dict):
            self.vision_config = SiglipVisionConfig(**{**SIGLIP_SO400M_VISION_DEFAULTS, **self.vision_config})
        if self.image_grid_pinpoints is None:
            crop = self.vision_config.image_size
            self.image_grid_pinpoints = default_grid_pinpoints(crop)
        self.image_grid_pinpoints = [[int(h), int(w)] for h, w in self.image_grid_pinpoints]
        super().__post_init__(**kwargs)
        # One source of truth for special ids: the language tower carries the composite's.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(self.text_config, name, getattr(self, name))
        self._check()

    @property
    def crop_size(self) -> int:
        return self.vision_config.image_size

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_vision_layers_used(self) -> int:
        """SigLIP encoder layers that feed the selected feature (`vision_feature_layer`); deeper ones never run."""
        n = self.vision_config.num_hidden_layers
        layer = self.vision_feature_layer
        return n + 1 + layer if layer < 0 else layer

    def layout_kwargs(self) -> dict:
        """Keyword arguments of `image_layout_llada_v.num_image_tokens` for this model."""
        return layout_kwargs(self)

    def _check(self) -> None:
        vision = self.vision_config
        _require(
            0 < vision.patch_size <= vision.image_size,
            f"vision patch_size ({vision.patch_size}) must be in 1..image_size ({vision.image_size})",
        )
        _require(len(self.image_grid_pinpoints) > 0, "image_grid_pinpoints must not be empty")
        for pair in self.image_grid_pinpoints:
            _require(
                len(pair) == 2 and all(v > 0 and v % vision.image_size == 0 for v in pair),
                f"every grid pinpoint must be a (height, width) pair of positive multiples of the crop size "
                f"{vision.image_size}, got {pair}",
            )
        n_layers = vision.num_hidden_layers
        _require(
            -(n_layers + 1) <= self.vision_feature_layer <= n_layers and self.vision_feature_layer != 0,
            f"vision_feature_layer ({self.vision_feature_layer}) must select one of the {n_layers} encoder layers "
            f"(1..{n_layers} or -{n_layers}..-1)",
        )
        _require(self.max_num_tiles > 0, f"max_num_tiles must be positive, got {self.max_num_tiles}")
        _require(self.video_pool_stride > 0, f"video_pool_stride must be positive, got {self.video_pool_stride}")
        _require(0.0 <= self.diffusion_eps < 1.0, f"diffusion_eps must be in [0, 1), got {self.diffusion_eps}")
        vocab = self.text_config.vocab_size
        _require(
            0 < self.tokenizer_vocab_size <= vocab,
            f"tokenizer_vocab_size ({self.tokenizer_vocab_size}) must be in 1..vocab_size ({vocab})",
        )
        for name in (
            "image_token_id",
            "mask_token_id",
            "eot_token_id",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "start_header_token_id",
            "end_header_token_id",
            "user_role_token_id",
            "assistant_role_token_id",
        ):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, int) and 0 <= value < vocab),
                f"{name} ({value}) must be a token id in 0..{vocab - 1}",
            )
        _require(
            self.image_token_id != self.mask_token_id,
            f"image_token_id and mask_token_id must differ, both are {self.image_token_id}",
        )


__all__ = ["LladaVConfig", "LladaVTextConfig"]
