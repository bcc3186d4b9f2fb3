"""A LladaVModelTester-style helper: tiny configs and inputs that run in milliseconds on CPU."""

import torch

from llada_v import LladaVConfig, LladaVModel
from llada_v.image_layout_llada_v import LAYOUT_ANYRES, num_image_tokens

CROP = 28  # 2x2 patches of 14 px: 4 tokens per crop
PINPOINTS = [[28, 28], [56, 28], [28, 56], [56, 56], [84, 28], [28, 84]]
IMAGE_TOKEN = 120
MASK_TOKEN = 126


def tiny_config(**overrides) -> LladaVConfig:
    kwargs = dict(
        text_config=dict(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=CROP,
            patch_size=14,
        ),
        image_grid_pinpoints=PINPOINTS,
        max_num_tiles=2,
        image_token_id=IMAGE_TOKEN,
        mask_token_id=MASK_TOKEN,
        bos_token_id=121,
        eos_token_id=122,
        pad_token_id=122,
        start_header_token_id=123,
        end_header_token_id=124,
        eot_token_id=125,
        user_role_token_id=5,
        assistant_role_token_id=6,
        tokenizer_vocab_size=127,
    )
    kwargs.update(overrides)
    return LladaVConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> LladaVModel:
    torch.manual_seed(seed)
    return LladaVModel(tiny_config(**overrides)).eval()


def image_prompt(config: LladaVConfig, size_hw=(50, 30), text_before=(1, 2, 3), text_after=(4, 5)):
    """ids with one anyres image expanded to its tokens, and matching random crops."""
    n_tokens = num_image_tokens(LAYOUT_ANYRES, size_hw, **config.layout_kwargs())
    from llada_v.image_layout_llada_v import num_crops

    crops = num_crops(LAYOUT_ANYRES, size_hw, 1, pinpoints=config.image_grid_pinpoints, crop_size=config.crop_size)
    ids = torch.tensor([[*text_before, *([config.image_token_id] * n_tokens), *text_after]])
    pixel_values = torch.randn(crops, 3, config.crop_size, config.crop_size)
    return ids, pixel_values, torch.tensor([list(size_hw)])
