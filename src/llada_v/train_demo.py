"""Train the embedded demo model: a tiny LLaDA-V learns the synthetic shapes task from scratch.

    python -m llada_v.train_demo --output-dir OUT [--seed 0] [--train-samples 32000] [--stage1-steps 300]
        [--stage2-steps 2000] [--batch-size 16]

The run goes through this project's own pipeline end to end: `demo_task` renders scenes, `LladaVDataset`
applies the chat template and the SPEC labels rule, `LladaVDataCollator` pads, `LladaVTrainer` trains
Stage 1 (projector only) then Stage 2 (everything) with the masked-diffusion loss of `LladaVModel`, and
the result is saved with its processor, generation defaults and remote code. Deterministic given the seed
(CPU, fixed thread count). The learning rates are higher than the paper's (1e-3 instead of 1e-5): the
paper fine-tunes pretrained towers, this model starts from random weights.
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
from transformers import TrainingArguments, set_seed

from torch.utils.data import Dataset

from .data import IGNORE_INDEX, LladaVDataCollator, LladaVDataset, TemplateTokens, find_turns
from .demo_model import build_demo_processor, build_demo_tokenizer, demo_config
from .demo_task import make_sample
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
        records.append({"id": i, "image": name, "conversations": conversations})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rates = {group: getattr(args, f"{group}_lr") for group in STAGE2_LEARNING_RATES}
    summary = train_demo(args.output_dir, args.seed, args.train_samples, args.stage1_steps, args.stage2_steps,
                         args.batch_size, learning_rates=rates, device=args.device,
                         dataloader_workers=args.dataloader_workers)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"} | {
        "first_loss": {k: v[0] for k, v in summary["losses"].items()},
        "last_loss": {k: v[-1] for k, v in summary["losses"].items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
