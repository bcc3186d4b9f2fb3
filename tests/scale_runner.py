"""`python -m llada_v.training` as the tests of tests/test_fsdp.py run it: one process or under `accelerate launch`.

Two additions, both outside the code under test:
- fixed masking noise: `LladaVModel.forward` gets `masking_t` and `masked_indices` computed from each row's own
  tokens (its unpadded ids), so a sample is masked the same way whatever its rank, batch or padding. The trainer
  draws the noise from torch's RNG (reseeded per rank, `per_rank_noise`), which can never give one process and
  two processes the same draws; with the noise fixed by the data the two runs compute the same losses;
- a summary per rank in OUTPUT_DIR/rank{N}.json: losses, what FSDP sharded, the optimizer groups, the bytes of
  parameters and optimizer state each rank holds.

Usage: python scale_runner.py TRAINING_FLAGS...   (or accelerate launch ... scale_runner.py TRAINING_FLAGS...)
"""

import hashlib
import json
import resource
import sys

import torch

from llada_v.modeling_llada_v import LladaVModel
from llada_v.training.trainer import main

_forward = LladaVModel.forward


def fixed_noise(input_ids, attention_mask, labels):
    """(t, masked) per row from a generator seeded by the row's unpadded ids (right padding)."""
    t = torch.empty(labels.shape[0])
    masked = torch.zeros(labels.shape, dtype=torch.bool)
    for row in range(labels.shape[0]):
        n = int(attention_mask[row].sum())
        digest = hashlib.sha256(str(input_ids[row, :n].tolist()).encode()).hexdigest()
        generator = torch.Generator().manual_seed(int(digest[:12], 16))
        t[row] = 0.3 + 0.6 * torch.rand((), generator=generator)
        masked[row, :n] = (torch.rand(n, generator=generator) < t[row]) & (labels[row, :n] != -100).cpu()
    return t.to(labels.device), masked.to(labels.device)


def fixed_noise_forward(self, input_ids=None, *args, labels=None, **kwargs):
    if labels is not None and kwargs.get("masking_t") is None:
        kwargs["masking_t"], kwargs["masked_indices"] = fixed_noise(input_ids, kwargs["attention_mask"], labels)
    return _forward(self, input_ids, *args, labels=labels, **kwargs)


def local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def summary(trainer) -> dict:
    from torch.distributed.fsdp import FSDPModule

    model = trainer.model
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    groups = [
        {
            "name": g.get("name"),
            "lr": g.get("initial_lr", g.get("lr")),
            "tensors": len(g["params"]),
            "dtensors": sum(type(p).__name__ == "DTensor" for p in g["params"]),
        }
        for g in optimizer.param_groups
    ]
    optimizer_bytes = sum(
        local_bytes(v)
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    return {
        "world_size": trainer.args.world_size,
        "fsdp": trainer.is_fsdp_enabled,
        "units": list(plugin.transformer_cls_names_to_wrap) if plugin is not None else None,
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "sharded_modules": sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)),
        "checkpoint_wrapped": sum(hasattr(m, "_checkpoint_wrapped_module") for m in model.modules()),
        "activation_checkpointing": bool(trainer.args.activation_checkpointing),
        "groups": groups,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "parameter_bytes": sum(local_bytes(p) for p in model.parameters()),
        "optimizer_bytes": optimizer_bytes,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    LladaVModel.forward = fixed_noise_forward
    trainer = main(sys.argv[1:])
    with open(f"{trainer.args.output_dir}/rank{trainer.args.process_index}.json", "w") as f:
        json.dump(summary(trainer), f)
