"""`llada_v.inference`: the generation settings a call runs with (`fit_schedule`, `generation_config_for`,
`checkpoint_generation_config`)."""

import pytest

from llada_v.generation_utils import LladaVGenerationConfig
from llada_v.inference import InputError, checkpoint_generation_config, fit_schedule, generation_config_for


@pytest.mark.parametrize(
    "max_new_tokens, steps, block, expected",
    [
        (128, 128, 128, (128, 128)),
        (64, 128, 128, (64, 64)),
        (256, 128, 128, (128, 128)),
        (8, 4, 4, (4, 4)),
        (6, 4, 4, (4, 6)),
        (32, 16, 32, (16, 32)),
    ],
)
def test_fit_schedule_keeps_what_fits_and_falls_back_to_one_token_per_step(max_new_tokens, steps, block, expected):
    assert fit_schedule(max_new_tokens, steps, block) == expected


def test_generation_config_for_follows_a_new_length_and_rejects_conflicts():
    base = LladaVGenerationConfig()
    config = generation_config_for(base, {"max_new_tokens": 64})
    assert (config.max_new_tokens, config.steps, config.block_length) == (64, 64, 64)
    fast = generation_config_for(base, {"max_new_tokens": 32, "block_length": 8}, fast=True)
    assert (fast.kv_cache, fast.confidence_threshold, fast.block_length, fast.steps) == ("dual", 0.9, 8, 32)
    with pytest.raises(InputError, match="must be divisible"):
        generation_config_for(base, {"max_new_tokens": 6, "block_length": 4})
    assert base.max_new_tokens == 128  # the base config is not modified


def test_checkpoint_generation_config_is_read_before_the_weights(tmp_path):
    LladaVGenerationConfig(max_new_tokens=8, steps=8, block_length=4, mask_token_id=5).save_pretrained(tmp_path)
    saved = checkpoint_generation_config(str(tmp_path), {"mask_token_id": 7})
    assert (saved.max_new_tokens, saved.block_length, saved.mask_token_id) == (8, 4, 5)
    bare = tmp_path / "bare"
    bare.mkdir()
    derived = checkpoint_generation_config(str(bare), {"mask_token_id": 7, "eot_token_id": 9})
    assert derived.mask_token_id == 7 and derived.stop_token_ids == [[9]] and derived.max_new_tokens == 128
