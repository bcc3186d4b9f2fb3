"""Train the embedded demo model: a tiny LLaDA-V learns the synthetic shapes task from scratch.

    python -m llada_v.train_demo --output-dir OUT [--seed 0] [--train-samples 32000] [--stage1-steps 300]
        [--stage2-steps 2000] [--batch-size 16] [--vision-pretrain-steps 2400]
        [--vision-lr 2e-5] [--projector-lr 2e-4] [--language-lr 1e-3] [--device cpu] [--dataloader-workers 0]

The run goes through this project's own pipeline end to end: `demo_task` renders scenes, `LladaVDataset`
applies the chat template, `LladaVDataCollator` pads, `LladaVTrainer` trains Stage 1 (projector only) then
Stage 2 (everything) with the masked-diffusion loss of `LladaVModel`, and the result is saved with its
processor, generation defaults and remote code. Before them, Stage 0 (`pretrain_vision`) stands in for the
pretrained SigLIP that the released model starts from: the vision tower alone learns to tag the training
scenes. Deterministic given the seed (CPU, fixed thread count). The learning rates are higher than the
paper's (1e-3 instead of 1e-5): the paper fine-tunes pretrained towers, this model starts from random weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainingArguments, set_seed

from .data import IGNORE_INDEX, LladaVDataCollator, LladaVDataset, TemplateTokens, find_turns
from .demo_model import build_demo_processor, build_demo_tokenizer, demo_config
from .demo_task import COLORS, SHAPES, make_sample
from .generation_utils import LladaVGenerationConfig
from .modeling_llada_v import LladaVModel
from .processing_llada_v import LladaVProcessor
from .training import LladaVTrainer, saving_remote_code, set_trainable

logger = logging.getLogger(__name__)

TRAIN_SEED_OFFSET = 1_000_000  # training scenes use seeds >= this; held-out sets use seeds below it
# The demo's sampler defaults: one-word answers, so a 4-token canvas decoded in 4 steps.
DEMO_GENERATION = dict(max_new_tokens=4, steps=4, block_length=4)
# The vision tower moves 50x slower than the rest (the paper's ratio is 5x at 2e-6 vs 1e-5): while the
# language model still ignores the image, its gradients are tiny and noisy, and Adam at full rate lets the
# random tower drift until every patch maps to the same vector.
STAGE2_LEARNING_RATES = {"vision": 2e-5, "projector": 2e-4, "language": 1e-3}
STAGE1_LEARNING_RATES = {"projector": 1e-3}
# Stage 0, the demo's stand-in for a pretrained SigLIP: the vision tower learns to tag scenes (which shapes and
# colours are present) from its mean-pooled features with a throw-away linear head.
VISION_TAGS = (*SHAPES, *sorted(COLORS))
VISION_PRETRAIN = {"steps": 2400, "batch_size": 16, "learning_rate": 1e-3}


def write_training_data(folder: Path, num_samples: int, seed: int) -> Path:
    """Render `num_samples` scenes as PNG files plus a LLaVA-format JSON list; returns the JSON path.

    About one sample in four is a two-turn conversation about the same image.
    """
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_samples):
        sample_seed = TRAIN_SEED_OFFSET + seed * num_samples + i
        turns = 2 if i % 4 == 3 else 1
        sample = make_sample(sample_seed, turns=turns)
        name = f"{i:06d}.png"
        sample["image"].save(folder / name)
        conversations = []
        for turn, (question, answer) in enumerate(sample["qa"]):
            conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
            conversations.append({"from": "gpt", "value": answer})
        tags = sorted({o.shape for o in sample["objects"]} | {o.color for o in sample["objects"]})
        records.append({"id": i, "image": name, "conversations": conversations, "tags": tags})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def pretrain_vision(model: LladaVModel, data_path: Path, processor: LladaVProcessor, steps: int, batch_size: int,
                    learning_rate: float, seed: int) -> list[float]:
    """Stage 0: train the vision tower alone to tag scenes; returns the loss every `steps // 20` steps.

    The released LLaDA-V starts from a pretrained SigLIP; no such tower exists at the demo's size, and one
    trained from scratch only through the language model does not learn shapes: while its random features carry
    no usable shape information, the language model learns to answer shape questions from priors and the vision
    gradient vanishes (measured: patch-embedding gradient ~1e-4, and shape accuracy at chance whatever the
    vision learning rate). So the demo pretrains the tower first, on the training images only: every crop of an
    image (anyres tiling as in training) goes through the layers that feed the projector, the tokens are
    mean-pooled per image, and a linear head (discarded afterwards) predicts which shapes and colours are present
    (binary cross-entropy). The language model and projector are untouched.
    """
    records = json.loads(data_path.read_text())
    folder = data_path.parent
    vision = model.vision_tower
    head = nn.Linear(model.config.vision_config.hidden_size, len(VISION_TAGS))
    # Parameters the feature does not use (post_layernorm) get no gradient, so AdamW leaves them as they are.
    optimizer = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = next(vision.parameters()).device
    head.to(device)
    losses, window = [], []
    vision.train()
    for step in range(steps):
        picks = torch.randint(len(records), (batch_size,), generator=generator).tolist()
        crops, counts, targets = [], [], torch.zeros(batch_size, len(VISION_TAGS))
        for row, index in enumerate(picks):
            with Image.open(folder / records[index]["image"]) as image:
                pixel_values = processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
            crops.append(pixel_values)
            counts.append(pixel_values.shape[0])
            for tag in records[index]["tags"]:
                targets[row, VISION_TAGS.index(tag)] = 1.0
        hidden = model.encode_vision(torch.cat(crops).to(device))
        pooled = torch.stack([part.mean(dim=(0, 1)) for part in torch.split(hidden, counts)])
        loss = nn.functional.binary_cross_entropy_with_logits(head(pooled), targets.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % max(1, steps // 20) == 0:
            losses.append(sum(window) / len(window))
            window = []
    return losses


class AnswerOnlyLabels(Dataset):
    """The demo's labels: only the assistant answers (word + `<|eot_id|>`) are supervised.

    The SPEC rule also supervises every template token, so a one-word answer is about a tenth of each
    sample's loss and the model learns the (easy) template and the answer priors long before it learns to
    look at the image. The demo keeps the answer's share whole; the released model's rule is unchanged in
    `LladaVDataset`.
    """

    def __init__(self, dataset: LladaVDataset, tokens: TemplateTokens):
        self.dataset, self.tokens = dataset, tokens

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        ids = item["input_ids"].tolist()
        labels = torch.full_like(item["labels"], IGNORE_INDEX)
        for turn in find_turns(ids, self.tokens):
            if turn.is_assistant:
                # The answer starts after `<|start_header_id|>assistant<|end_header_id|>\n\n`.
                header_end = ids.index(self.tokens.end_header_id, turn.start) + 1
                labels[header_end : turn.end] = item["input_ids"][header_end : turn.end]
        item["labels"] = labels
        return item


def _args(output_dir: Path, steps: int, batch_size: int, seed: int, warmup: int, device: str,
          workers: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,  # replaced per module group by LladaVTrainer
        lr_scheduler_type="cosine",
        warmup_steps=warmup,
        weight_decay=0.0,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=workers,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )


def train_demo(
    output_dir: Path,
    seed: int = 0,
    train_samples: int = 32_000,
    stage1_steps: int = 300,
    stage2_steps: int = 2000,
    batch_size: int = 16,
    work_dir: Path | None = None,
    learning_rates: dict[str, float] | None = None,
    device: str = "cpu",
    dataloader_workers: int = 0,
    vision_pretrain_steps: int = VISION_PRETRAIN["steps"],
) -> dict:
    """Train and save the demo model into `output_dir` (atomically). Returns a summary with the losses.

    `learning_rates` overrides entries of the Stage 2 rates (`vision`, `projector`, `language`). The shipped
    model is trained on CPU with the defaults; `device="cuda"` (and data-loader workers) are for exploring
    settings faster: a GPU run is not bit-identical to the CPU run.
    """
    rates2 = dict(STAGE2_LEARNING_RATES)
    for name, value in (learning_rates or {}).items():
        if name not in rates2:
            raise ValueError(f"unknown learning-rate group {name!r}; expected one of {sorted(rates2)}")
        if not value > 0:
            raise ValueError(f"learning rate for {name!r} must be positive, got {value}")
        rates2[name] = value
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device")
    if dataloader_workers < 0:
        raise ValueError(f"dataloader_workers must be >= 0, got {dataloader_workers}")
    if vision_pretrain_steps < 0:
        raise ValueError(f"vision_pretrain_steps must be >= 0, got {vision_pretrain_steps}")
    for name, value in (("train_samples", train_samples), ("stage2_steps", stage2_steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if stage1_steps < 0:
        raise ValueError(f"stage1_steps must be >= 0, got {stage1_steps}")
    output_dir = Path(output_dir)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    set_seed(seed)
    started = time.time()

    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer)
    config._attn_implementation = "eager"  # on CPU, eager trains ~4x faster than sdpa with a padding mask
    processor = build_demo_processor(config, tokenizer)
    model = LladaVModel(config)
    model.generation_config = LladaVGenerationConfig.from_model_config(config)
    for key, value in DEMO_GENERATION.items():
        setattr(model.generation_config, key, value)

    scratch = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="llada_v_demo_"))
    try:
        data_path = write_training_data(scratch / "data", train_samples, seed)
        dataset = AnswerOnlyLabels(
            LladaVDataset(data_path, processor, image_folder=scratch / "data", system_prompt=None),
            TemplateTokens.from_processor(processor),
        )
        collator = LladaVDataCollator.from_processor(processor, padding="masked")
        history = {}
        if vision_pretrain_steps:
            model.to(device)
            history["stage0"] = pretrain_vision(
                model, data_path, processor, vision_pretrain_steps, VISION_PRETRAIN["batch_size"],
                VISION_PRETRAIN["learning_rate"], seed,
            )  # fmt: skip
            logger.info("stage 0 (vision tags): loss %.3f -> %.3f", history["stage0"][0], history["stage0"][-1])
        stages = [("1", stage1_steps, ("projector",), STAGE1_LEARNING_RATES),
                  ("2", stage2_steps, ("vision", "projector", "language"), rates2)]
        for stage, steps, groups, rates in stages:
            if steps == 0:
                continue
            set_trainable(model, groups)
            trainer = LladaVTrainer(
                model=model,
                args=_args(scratch / f"stage{stage}", steps, batch_size, seed, warmup=max(1, steps // 20),
                           device=device, workers=dataloader_workers),
                train_dataset=dataset,
                data_collator=collator,
                learning_rates=rates,
            )
            trainer.train()
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            history[f"stage{stage}"] = losses
            logger.info("stage %s: loss %.3f -> %.3f", stage, losses[0], losses[-1])
        set_trainable(model, ("vision", "projector", "language"))
        model.to("cpu")
        save_demo(model, processor, output_dir)
    finally:
        if work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"seconds": time.time() - started, "losses": history, "output_dir": str(output_dir)}


def save_demo(model: LladaVModel, processor: LladaVProcessor, output_dir: Path) -> None:
    """Save model, processor and remote code into `output_dir` via a temporary folder renamed into place."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model.config._attn_implementation = None  # let the loader pick (sdpa by default)
        with saving_remote_code():  # the folder gets the remote code and auto_map entries
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, default=32_000)
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--stage2-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    for group, rate in STAGE2_LEARNING_RATES.items():
        parser.add_argument(f"--{group}-lr", type=float, default=rate, help=f"Stage 2 learning rate (default {rate})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default: the reproducible run) or cuda (faster exploration, not bit-identical)")
    parser.add_argument("--dataloader-workers", type=int, default=0)
    parser.add_argument("--vision-pretrain-steps", type=int, default=VISION_PRETRAIN["steps"],
                        help="Stage 0 steps (vision tower tags scenes; 0 skips it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rates = {group: getattr(args, f"{group}_lr") for group in STAGE2_LEARNING_RATES}
    summary = train_demo(args.output_dir, args.seed, args.train_samples, args.stage1_steps, args.stage2_steps,
                         args.batch_size, learning_rates=rates, device=args.device,
                         dataloader_workers=args.dataloader_workers, vision_pretrain_steps=args.vision_pretrain_steps)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"} | {
        "first_loss": {k: v[0] for k, v in summary["losses"].items()},
        "last_loss": {k: v[-1] for k, v in summary["losses"].items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
