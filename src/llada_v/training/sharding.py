"""FSDP2 for `LladaVTrainer`: which modules are shard units, FSDP on CPU processes (gloo), sharded-checkpoint folders.

Package-only code (docs/training.md, "Scaling out"). Notable facts:
- the shard units are the classes of the model's `_no_split_modules` that the model holds: `LladaVDecoderLayer`,
  `SiglipEncoderLayer`, `SiglipVisionEmbeddings`. transformers unions the sub-models' lists into the instance
  attribute, so a `LladaVModel` also lists SigLIP's `SiglipTextEmbeddings` and pooling head, which it does not
  hold; accelerate's default (`_no_split_modules` as is) then fails with "Could not find the transformer layer
  class SiglipTextEmbeddings in the model";
- accelerate 1.15 enables FSDP only for accelerator devices: on CPU processes (`DistributedType.MULTI_CPU`,
  gloo) it drops the FSDP plugin and a `--fsdp` run silently trains with DDP. `enable_fsdp_on_cpu` turns
  accelerate's own FSDP2 path on for them (`fully_shard` runs on CPU with gloo), so the multi-process tests
  exercise the code GPU runs use;
- with `SHARDED_STATE_DICT` a checkpoint holds the weights as torch.distributed.checkpoint shards
  (`pytorch_model_fsdp_0/`); `write_checkpoint_metadata` adds the config, processor and remote code, so
  `accelerate merge-weights CKPT/pytorch_model_fsdp_0 CKPT` turns it into a loadable checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..checkpoint_io import write_remote_code

logger = logging.getLogger(__name__)


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """Names of the model's `_no_split_modules` classes that occur in it (the FSDP units), in a stable order.

    Args:
        model: a `LladaVModel`, also wrapped by PEFT (whose attribute lookup reaches the base model's list).
    """
    declared = getattr(model, "_no_split_modules", None) or []
    present = {type(module).__name__ for module in model.modules()}
    classes = sorted(name for name in declared if name in present)
    if not classes:
        raise ValueError(
            f"none of the model's _no_split_modules {sorted(declared)} occurs in {type(model).__name__}: "
            "nothing to shard by layer"
        )
    return classes


def enable_fsdp_on_cpu(accelerator: Any, plugin_kwargs: dict[str, Any]) -> Any:
    """Switch an accelerator of CPU processes (gloo) from DDP to accelerate's FSDP path; returns the plugin.

    accelerate builds the FSDP plugin from the same `plugin_kwargs` (`TrainingArguments.fsdp_plugin_args`) but
    drops it when the processes run on CPU. This sets it on the accelerator's state as accelerate does for GPUs
    (distributed type `FSDP`, the mixed-precision policy from the accelerator's `mixed_precision`).

    Raises:
        ValueError: when the processes are not CPU processes of one distributed run.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(
            f"FSDP was requested but accelerate did not enable it (distributed type {state.distributed_type}, "
            f"{state.num_processes} process(es)); FSDP needs several processes, e.g. accelerate launch --num_processes 2"
        )
    plugin = FullyShardedDataParallelPlugin(**plugin_kwargs)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # As `AcceleratorState.__init__` ends: every later `AcceleratorState()` copies the type from `PartialState`.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info("FSDP%d enabled on %d CPU processes (gloo)", plugin.fsdp_version, state.num_processes)
    return plugin


def write_checkpoint_metadata(model: nn.Module, processor: Any, output_dir: str) -> None:
    """Everything of a checkpoint folder but the weights: config, generation config, processor, remote code.

    For checkpoints whose weights are FSDP shards (`pytorch_model_fsdp_0/`, merged by `accelerate
    merge-weights`). Call it on the process that saves.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(output_dir)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    write_remote_code(output_dir)


__all__ = ["enable_fsdp_on_cpu", "fsdp_wrap_classes", "write_checkpoint_metadata"]
