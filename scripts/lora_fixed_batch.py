"""LoRA on the demo model: the logged (random-noise) training loss against a held-out loss with fixed noise.

    python scripts/lora_fixed_batch.py LR STEPS [--data-dir DIR]

docs/training.md ("Reading a LoRA loss curve") quotes its output for LR 0, 2e-4 and 2e-3. The setup follows the
training entry's defaults with `--lora_r 8`: the default system prompt and padding, the model's own mask noise
(`t ~ U(0, 1)` per sample, loss weighted by `1 / t`), LoRA alpha 32 and dropout 0.05, AdamW, gradient clipping at 1,
batch 4 over 16 rendered demo scenes (seed 0) in order. The held-out batch is 8 of the same 16 scenes' other half
(samples 8-15, never trained on), its loss averaged over 4 fixed `(t, mask)` draws in `eval()` mode.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from llada_v.demo.model import demo_model_dir
from llada_v.demo.train import write_training_data
from llada_v.modeling_llada_v import LladaVModel
from llada_v.processing_llada_v import LladaVProcessor
from llada_v.training.data import LladaVDataCollator, LladaVDataset
from llada_v.training.trainer import apply_lora, build_param_groups, fixed_noise_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lr", type=float)
    parser.add_argument("steps", type=int)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    data_dir = args.data_dir or Path(tempfile.mkdtemp())
    data = write_training_data(data_dir, 16, seed=0)
    processor = LladaVProcessor.from_pretrained(demo_model_dir())
    dataset = LladaVDataset(data, processor, image_folder=data_dir)
    collator = LladaVDataCollator.from_processor(processor)
    model = apply_lora(LladaVModel.from_pretrained(demo_model_dir()), r=8, alpha=32, dropout=0.05)
    optimizer = torch.optim.AdamW(build_param_groups(model, {"language": args.lr}), lr=args.lr)
    held_out = collator([dataset[i] for i in range(8, 16)])
    print("held-out before", round(fixed_noise_loss(model, held_out), 4))
    for step in range(args.steps):
        start = (step * 4) % 8
        loss = model(**collator([dataset[j] for j in range(start, start + 4)])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        print(
            "step",
            step + 1,
            "logged",
            round(loss.item(), 4),
            "held-out",
            round(fixed_noise_loss(model, held_out), 4),
            flush=True,
        )


if __name__ == "__main__":
    main()
