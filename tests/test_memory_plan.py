"""scripts/memory_plan.py: the figures docs/training.md quotes, from the released shape (LladaVConfig())."""

import importlib.util

from paths import REPO

spec = importlib.util.spec_from_file_location("memory_plan", REPO / "scripts" / "memory_plan.py")
memory_plan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_plan)


def test_released_shape_counts_and_shard_units():
    facts = memory_plan.model_facts()
    assert facts["total"] == 8_434_837_024  # the released LLaDA-V parameter count
    assert facts["groups"]["projector"] == 4096 * 1152 + 4096 + 4096 * 4096 + 4096
    # The largest FSDP unit is a decoder layer: 4 attention projections + 3 MLP projections + 2 norms.
    assert facts["largest_unit"] == 4 * 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096
    assert facts["lm_head"] == 126464 * 4096
    assert facts["lora_per_rank"] == 32 * (4 * 2 * 4096 + 2 * (4096 + 12288) + (12288 + 4096))
