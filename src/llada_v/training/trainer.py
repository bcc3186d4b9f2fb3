"""Fine-tuning LLaDA-V with the Hugging Face `Trainer`: stages, per-module learning rates, LoRA, launch entry.

Package-only code. Notable facts:
- the model's forward returns the official masked-diffusion loss (docs/parity.md Q19) when `labels` are given,
  so a plain `transformers.Trainer` trains it; `LladaVDataset` + `LladaVDataCollator` make the batches;
- parameters fall in three groups, as in the official optimizer: `vision` (`vision_tower.*`), `projector`
  (`multi_modal_projector.*`) and `language` (everything else: the decoder, `lm_head` and `image_newline`);
- `STAGE_PRESETS` are the paper's recipes (Table 1): stage 1 trains the projector only at 1e-3; stages 2 and
  3 train everything with vision 2e-6, projector 1e-5, language 1e-5;
- SigLIP's `post_layernorm` (stored, never used: the feature is taken before it) is always frozen, so data
  parallel training does not need `find_unused_parameters`;
- LoRA (PEFT) goes on the language model only: `LORA_TARGET_MODULES` is a regex that matches the
  attention and MLP projections of `language_model.layers.N` and nothing in the vision tower (whose
  attention also has `q_proj`/`k_proj`/`v_proj`);
- `python -m llada_v.training --model_name_or_path ... --data_path ... --output_dir ...` is the training
  entry; it runs unchanged under `accelerate launch` (data parallel), with `--fsdp --fsdp_config
  configs/fsdp2.json` (FSDP2, also on CPU processes; shard units and sharded checkpoints in `sharding.py`) and
  with `--deepspeed configs/deepspeed_zero3.json` (GPUs only). See `docs/training.md`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..checkpoint_io import DTYPES, atomic_folder, check_output_outside_inputs, write_remote_code
from ..inference import apply_adapter
from ..modeling_llada_v import IGNORE_INDEX, LladaVModel
from ..processing_llada_v import DEFAULT_SYSTEM_PROMPT, LladaVProcessor
from .checkpoints import (
    TRAINER_STATE_NAME,
    checkpoint_problem,
    last_complete_checkpoint,
    publish,
    remove_staging_dirs,
    staging_dir,
)
from .data import (
    LENGTH_POLICIES,
    MASK_SAMPLING,
    ON_BAD_SAMPLE,
    PADDING_MODES,
    BadSampleError,
    LladaVDataCollator,
    LladaVDataset,
    MaskCountSampling,
)
from .sharding import enable_fsdp_on_cpu, fsdp_wrap_classes, write_checkpoint_metadata

logger = logging.getLogger(__name__)

MODULE_GROUPS = ("vision", "projector", "language")


@dataclass(frozen=True)
class StagePreset:
    """Which module groups a training stage updates, and their learning rates."""

    trainable: tuple[str, ...]
    learning_rates: Mapping[str, float]


# Paper Table 1 / the released training scripts (docs/training.md). `image_newline` belongs to `language` (as in
# the official optimizer grouping), so stage 1 leaves it at its initial value, as the official stage 1 did.
STAGE_PRESETS: dict[str, StagePreset] = {
    "1": StagePreset(trainable=("projector",), learning_rates={"projector": 1e-3}),
    "2": StagePreset(
        trainable=("vision", "projector", "language"),
        learning_rates={"vision": 2e-6, "projector": 1e-5, "language": 1e-5},
    ),
    "3": StagePreset(
        trainable=("vision", "projector", "language"),
        learning_rates={"vision": 2e-6, "projector": 1e-5, "language": 1e-5},
    ),
}

# LoRA targets: the seven projections of every language decoder layer, nothing else. PEFT full-matches a
# string target against module names, so this cannot hit `vision_tower.encoder.layers.N.self_attn.q_proj`.
LORA_TARGET_MODULES = r"language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
# LoRA needs a larger step than full fine-tuning; used for `language` when LoRA is on and no LR is given.
LORA_DEFAULT_LEARNING_RATE = 2e-4

_GROUP_PATTERNS = (
    ("vision", re.compile(r"(?:^|\.)vision_tower\.")),
    ("projector", re.compile(r"(?:^|\.)multi_modal_projector\.")),
)


def module_group(name: str) -> str:
    """The optimizer group of a parameter name: `vision`, `projector` or `language` (works on PEFT names)."""
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(name):
            return group
    return "language"


def stage_preset(stage: str | int) -> StagePreset:
    """The preset of stage `1`, `2` or `3` (also accepts `"stage1"`...)."""
    key = str(stage).lower().removeprefix("stage")
    if key not in STAGE_PRESETS:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {sorted(STAGE_PRESETS)}")
    return STAGE_PRESETS[key]


def _base_model(model: nn.Module) -> nn.Module:
    """The `LladaVModel` under PEFT / DDP wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _numel(param: nn.Parameter) -> int:
    # Under DeepSpeed ZeRO-3 a parameter is an empty placeholder; `ds_numel` is its real size.
    return getattr(param, "ds_numel", None) or param.numel()


def never_used_parameter_names(model: nn.Module) -> list[str]:
    """Parameters no forward ever uses: SigLIP's `post_layernorm`, a pooling head, encoder layers past the
    selected feature layer. Training them is a no-op (they never get a gradient) that breaks DDP without
    `find_unused_parameters`, so they are always frozen."""
    used = _base_model(model).config.num_vision_layers_used
    head = re.compile(r"(?:^|\.)vision_tower\.(?:post_layernorm|head)\.")
    encoder_layer = re.compile(r"(?:^|\.)vision_tower\.encoder\.layers\.(\d+)\.")

    def never_used(name: str) -> bool:
        match = encoder_layer.search(name)
        return bool(head.search(name)) or (match is not None and int(match.group(1)) >= used)

    return [name for name, _ in model.named_parameters() if never_used(name)]


def set_trainable(model: nn.Module, groups: Iterable[str]) -> dict[str, int]:
    """Make exactly the parameters of `groups` trainable (and never-used ones frozen).

    Args:
        model: a `LladaVModel` (not wrapped by PEFT: use `apply_lora` for adapters).
        groups: names among `MODULE_GROUPS`.

    Returns:
        Trainable parameter counts per group.
    """
    groups = tuple(groups)
    unknown = [g for g in groups if g not in MODULE_GROUPS]
    if unknown:
        raise ValueError(f"unknown module groups {unknown}; expected names among {MODULE_GROUPS}")
    never_used = set(never_used_parameter_names(model))
    counts = dict.fromkeys(MODULE_GROUPS, 0)
    for name, param in model.named_parameters():
        group = module_group(name)
        trainable = group in groups and name not in never_used
        param.requires_grad_(trainable)
        if trainable:
            counts[group] += _numel(param)
    logger.info("trainable parameters per group: %s", counts)
    return counts


def freeze_for_stage(model: nn.Module, stage: str | int) -> dict[str, int]:
    """Apply the freezing of a stage preset: stage 1 trains the projector only, stages 2 and 3 everything."""
    return set_trainable(model, stage_preset(stage).trainable)


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts per module group."""
    counts = dict.fromkeys(MODULE_GROUPS, 0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[module_group(name)] += _numel(param)
    return counts


def build_param_groups(
    model: nn.Module, learning_rates: Mapping[str, float], weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with one learning rate per module group.

    Weight decay applies to weights with at least 2 dimensions (matrices, embeddings); biases, norms and the
    image newline get none. Empty groups are left out; every group is tagged with `"name"` (e.g.
    `"projector/decay"`).

    Args:
        model: the model (PEFT-wrapped or not); only parameters with `requires_grad` are included.
        learning_rates: a learning rate for every module group that has trainable parameters.
        weight_decay: decay of the decayed groups.
    """
    unknown = [g for g in learning_rates if g not in MODULE_GROUPS]
    if unknown:
        raise ValueError(f"learning_rates has unknown module groups {unknown}; expected names among {MODULE_GROUPS}")
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = module_group(name)
        if group not in learning_rates:
            raise ValueError(
                f"parameter {name} (group {group!r}) is trainable but learning_rates has no {group!r} entry "
                f"(given: {dict(learning_rates)})"
            )
        buckets.setdefault((group, param.dim() >= 2), []).append(param)
    if not buckets:
        raise ValueError("the model has no trainable parameters")
    param_groups = []
    for group in MODULE_GROUPS:
        for decay in (True, False):
            params = buckets.get((group, decay))
            if params:
                param_groups.append(
                    {
                        "params": params,
                        "lr": float(learning_rates[group]),
                        "weight_decay": weight_decay if decay else 0.0,
                        "name": f"{group}/{'decay' if decay else 'no_decay'}",
                    }
                )
    return param_groups


class LladaVTrainer(Trainer):
    """`Trainer` with one learning rate per module group (vision / projector / language) and, in data parallel
    runs, different masking noise on every rank.

    Args:
        learning_rates: learning rate per module group (e.g. `stage_preset(2).learning_rates`); `None` keeps the
            plain `Trainer` optimizer (one `args.learning_rate` for everything). The scheduler scales every
            group's rate by the same factor, so the ratios hold for the whole run.
        per_rank_noise: in runs with several processes, seed torch's RNG with `args.seed + process_index` after
            the `Trainer` set it up. The diffusion loss draws `t` and the masked positions from torch's RNG;
            the `Trainer` seeds every rank alike, so without this the ranks draw the same `t` (and, for equal
            lengths, the same masks) at the same step, and the data-parallel batch has fewer independent noise
            draws. The data order is unaffected (accelerate synchronises the sampler's own generator), and
            checkpoints keep one RNG state per rank, so resuming stays exact.
        All other arguments are `Trainer`'s.

    Every folder it saves also gets the remote code (`checkpoint_io.write_remote_code`). A `checkpoint-N` folder
    is written under a staging name and renamed when complete (`training/checkpoints.py`): a run killed while
    saving leaves the previous checkpoints as they were and no partial `checkpoint-N`.
    """

    def __init__(
        self, *args, learning_rates: Mapping[str, float] | None = None, per_rank_noise: bool = True, **kwargs
    ) -> None:
        self.learning_rates = dict(learning_rates) if learning_rates is not None else None
        super().__init__(*args, **kwargs)
        if per_rank_noise and self.args.world_size > 1:
            torch.manual_seed(self.args.seed + self.args.process_index)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.learning_rates is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = build_param_groups(opt_model, self.learning_rates, self.args.weight_decay)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        for key in ("params", "model", "optimizer_dict"):
            if key in optimizer_kwargs:
                raise ValueError(
                    f"optim={self.args.optim!r} builds its own parameter groups; per-module learning rates need an "
                    "optimizer that takes parameter groups, e.g. adamw_torch"
                )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        for group in groups:
            logger.info("optimizer group %s: %d tensors, lr %g", group["name"], len(group["params"]), group["lr"])
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """With per-module learning rates, the Trainer's one `learning_rate` (the first optimizer group's) becomes
        `learning_rate/vision`, `learning_rate/projector`, `learning_rate/language` (the groups being trained)."""
        if "learning_rate" in logs and self.learning_rates is not None and self.optimizer is not None:
            del logs["learning_rate"]
            for group in self.optimizer.param_groups:
                module = str(group.get("name", "")).split("/")[0]
                if module in MODULE_GROUPS:
                    logs.setdefault(f"learning_rate/{module}", group["lr"])
        super().log(logs, start_time)

    def _get_output_dir(self, trial: Any) -> str:
        # While `_save_checkpoint` runs, the Trainer's checkpoint code writes into the staging folder.
        staging = getattr(self, "_checkpoint_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """`Trainer._save_checkpoint` into `.checkpoint-N.partial/checkpoint-N`, renamed to `checkpoint-N` once
        every rank has written its files; then the old checkpoints are rotated (`save_total_limit`)."""
        run_dir = self._get_output_dir(trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = str(staging_dir(final))
        staged = os.path.join(staging, os.path.basename(final))
        if self.args.should_save:
            remove_staging_dirs(run_dir)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        if self.state.best_model_checkpoint == staged:  # the best model is this step's: name its final folder
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are written
        if self.args.should_save:
            publish(staged, final)
            os.rmdir(staging)
            logger.info("saved %s", final)
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )  # fmt: skip
        self.accelerator.wait_for_everyone()

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        fsdp_requested = self.args.fsdp_plugin_args is not None
        if fsdp_requested and not self.is_fsdp_enabled:
            # accelerate drops the FSDP plugin on CPU processes (a `--fsdp` run would silently be DDP).
            enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True
            if self.accelerator.state.fsdp_plugin.activation_checkpointing and self.args.activation_checkpointing:
                raise ValueError(
                    "fsdp_config['activation_checkpointing'] and --activation_checkpointing are both set; "
                    "use FSDP's (fsdp_config) under FSDP"
                )
        if self.is_fsdp_enabled and self.model is not None:
            self._configure_fsdp_plugin(self.accelerator.state.fsdp_plugin)

    def _configure_fsdp_plugin(self, plugin: Any) -> None:
        """Shard units from the model's `_no_split_modules` (unless configured); LoRA keeps the model's own
        activation checkpointing, because PEFT saves an adapter without its LoRA weights when FSDP's checkpoint
        wrapper has renamed the adapted layers (`..._checkpoint_wrapped_module...`)."""
        if plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(self.model)
        if plugin.activation_checkpointing and hasattr(self.model, "peft_config"):
            logger.warning("LoRA under FSDP: the model's activation checkpointing replaces fsdp_config's")
            plugin.activation_checkpointing = False
            self.args.activation_checkpointing = True
        logger.info("FSDP%d units: %s", plugin.fsdp_version, plugin.transformer_cls_names_to_wrap)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As `Trainer.save_model`; under FSDP with sharded checkpoints (`SHARDED_STATE_DICT`) the final save
        (`_internal_call=False`) gathers the full state dict and writes a normal checkpoint, and checkpoint
        folders get everything but the weights (config, processor, remote code) beside the shards."""
        if not (self.is_fsdp_enabled and "SHARDED" in str(self.accelerator.state.fsdp_plugin.state_dict_type)):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call:
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                write_checkpoint_metadata(self.model, self.processing_class, output_dir)
            return None
        state_dict = self.accelerator.get_state_dict(self.model)  # collective: every rank takes part
        self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Every folder the Trainer writes (checkpoints, the final model) loads with `trust_remote_code=True`.
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_remote_code(output_dir if output_dir is not None else self.args.output_dir)


# ----------------------------------------------------------------------------------------------------------
# LoRA


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str = LORA_TARGET_MODULES,
    modules_to_save: list[str] | None = None,
) -> nn.Module:
    """Wrap `model` in a PEFT LoRA model whose adapters sit on the language model only.

    Every base parameter is frozen; the adapters (and `modules_to_save`, e.g. `["multi_modal_projector"]`,
    trained in full) are trainable. `task_type` is left unset (PEFT's `CAUSAL_LM` wrapper expects an
    autoregressive `generate`).

    Args:
        model: a `LladaVModel`.
        r, alpha, dropout: LoRA rank, scaling numerator (`alpha / r`) and dropout.
        target_modules: a regex full-matched against module names; must select modules of
            `language_model.layers` only (checked).
        modules_to_save: modules trained in full and saved with the adapter.

    Returns:
        The `peft.PeftModel`; `merge_lora` turns it back into a plain `LladaVModel`.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is in the train and test extras
        raise ImportError("LoRA needs peft: pip install 'llada-v[train]'") from err
    if r < 1:
        raise ValueError(f"LoRA rank r must be positive, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = [name for name, _ in model.named_modules() if re.fullmatch(target_modules, name)]
    if not targets:
        raise ValueError(f"LoRA target_modules {target_modules!r} matches no module of the model")
    outside = [name for name in targets if not name.startswith("language_model.layers.")]
    if outside:
        raise ValueError(
            f"LoRA target_modules {target_modules!r} matches modules outside language_model.layers, e.g. {outside[:3]}"
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, modules_to_save=modules_to_save
    )
    peft_model = get_peft_model(model, config)
    params = dict(peft_model.named_parameters())
    for name in never_used_parameter_names(peft_model):
        params[name].requires_grad_(False)
    logger.info("LoRA on %d modules; trainable parameters per group: %s", len(targets), trainable_counts(peft_model))
    return peft_model


def merge_lora(peft_model: nn.Module) -> LladaVModel:
    """Fold the LoRA adapters into the base weights and return the plain `LladaVModel`."""
    if not hasattr(peft_model, "merge_and_unload"):
        raise TypeError(f"expected a PEFT model with LoRA adapters, got {type(peft_model).__name__}")
    return peft_model.merge_and_unload()


def merge_saved_lora(base_model: LladaVModel, adapter_dir: str | os.PathLike) -> LladaVModel:
    """Load the adapter saved in `adapter_dir` (with its `modules_to_save`) onto `base_model` and merge it."""
    return apply_adapter(base_model, adapter_dir, merge=True)


# ----------------------------------------------------------------------------------------------------------
# Training entry


def fixed_noise_loss(model: nn.Module, batch: dict, draws: int = 4, seed: int = 123) -> float:
    """The diffusion loss of `batch` averaged over `draws` fixed `(t, mask)` draws, in `eval()` mode.

    A training step's logged loss is one random draw of the mask level `t ~ U(0, 1)` weighted by `1 / t`, so it
    swings by several units while the weights barely move (docs/training.md, "Reading a LoRA loss curve"); this
    loss uses the same draws for every model, so it is comparable between checkpoints. The model's train/eval mode
    is restored."""
    generator = torch.Generator().manual_seed(seed)
    labels = batch["labels"]
    was_training = model.training
    total = 0.0
    model.eval()
    with torch.no_grad():
        for _ in range(draws):
            t = torch.rand(labels.shape[0], generator=generator)
            masked = (torch.rand(labels.shape, generator=generator) < t[:, None]) & (labels != IGNORE_INDEX)
            total += float(model(**batch, masking_t=t, masked_indices=masked).loss)
    model.train(was_training)
    return total / draws


@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune."""

    model_name_or_path: str = field(metadata={"help": "llada-v checkpoint folder or Hub id"})
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "processor folder (default: the model's)"}
    )
    dtype: str = field(
        default="float32", metadata={"help": "weights dtype: float32 (use --bf16 for autocast) or bfloat16"}
    )
    attn_implementation: str | None = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2"})


@dataclass
class DataArguments:
    """Training data (LLaVA format) and how it is batched."""

    data_path: str = field(metadata={"help": "LLaVA-format .json (a list) or .jsonl"})
    image_folder: str | None = field(default=None, metadata={"help": "base folder of relative image paths"})
    video_folder: str | None = field(default=None, metadata={"help": "base folder of video frame folders"})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "system turn ('' for none)"})
    max_length: int | None = field(default=None, metadata={"help": "longest sample in tokens after image expansion"})
    length_policy: str = field(default="drop_turns", metadata={"help": f"over-long samples: one of {LENGTH_POLICIES}"})
    on_bad_sample: str = field(default="skip", metadata={"help": f"bad samples: one of {ON_BAD_SAMPLE}"})
    padding: str = field(default="official", metadata={"help": f"padding mode: one of {PADDING_MODES}"})
    mask_sampling: str = field(
        default="time",
        metadata={
            "help": f"one of {MASK_SAMPLING}: t ~ U(0,1) per sample (the released recipe) or the number of masked tokens "
            "(same objective, lower variance; MaskCountSampling)"
        },
    )
    dummy_image: bool = field(
        default=True, metadata={"help": "zero crop (masked, no loss) in batches without images; see docs/training.md"}
    )


@dataclass
class LladaVTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the stage presets, per-module learning rates and LoRA settings."""

    stage: str = field(default="2", metadata={"help": "1 (projector only), 2 or 3 (everything)"})
    trainable: str | None = field(
        default=None,
        metadata={"help": "comma-separated groups to train instead of the stage's: vision,projector,language"},
    )
    vision_lr: float | None = field(default=None, metadata={"help": "vision tower LR (default: the stage's)"})
    projector_lr: float | None = field(default=None, metadata={"help": "projector LR (default: the stage's)"})
    language_lr: float | None = field(default=None, metadata={"help": "language model LR (default: the stage's)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the language model (0: full fine-tuning)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default=LORA_TARGET_MODULES, metadata={"help": "regex of LoRA target modules"})
    lora_modules_to_save: str | None = field(
        default=None, metadata={"help": "comma-separated modules trained in full with LoRA, e.g. multi_modal_projector"}
    )
    merge_lora_at_end: bool = field(default=False, metadata={"help": "also save the merged model to OUTPUT_DIR/merged"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep pixel_values & co (must stay False)"})


def resolve_learning_rates(args: LladaVTrainingArguments) -> dict[str, float]:
    """The stage preset's learning rates with `--vision_lr/--projector_lr/--language_lr` overrides."""
    rates = dict(stage_preset(args.stage).learning_rates)
    if args.lora_r > 0:
        rates["language"] = LORA_DEFAULT_LEARNING_RATE  # the adapters live in the language group
    for group in MODULE_GROUPS:
        value = getattr(args, f"{group}_lr")
        if value is not None:
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"--{group}_lr must be a finite non-negative number, got {value}")
            rates[group] = value
    return rates


def _trainable_groups(args: LladaVTrainingArguments) -> tuple[str, ...]:
    if args.trainable is None:
        return stage_preset(args.stage).trainable
    return tuple(g.strip() for g in args.trainable.split(",") if g.strip())


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint` names: `last` (or `latest`, `true`) is the newest complete
    `checkpoint-N` of `output_dir` (incomplete newer ones are logged and passed over); a folder is checked too."""
    if value is None or value == "" or value.lower() == "false":
        return None
    if value.lower() in ("true", "last", "latest"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in {output_dir}")
        logger.info("resuming from %s, the newest complete checkpoint", found)
        return str(found)
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such folder")
    problem = checkpoint_problem(value)
    if problem is not None:
        raise ValueError(f"--resume_from_checkpoint {value}: the checkpoint is incomplete ({problem})")
    return value


def check_output_dir(model_args: ModelArguments, data_args: DataArguments, args: LladaVTrainingArguments) -> None:
    """Refuse an `--output_dir` that is, contains or lies inside a local input (the model, the processor, the data
    file, the image or video folder): the run would overwrite or mix with them (`model.safetensors`, checkpoints).
    Inputs that are not local paths (Hub ids) cannot overlap."""
    inputs = {
        "--model_name_or_path": model_args.model_name_or_path,
        "--processor_name_or_path": model_args.processor_name_or_path,
        "--data_path": data_args.data_path,
        "--image_folder": data_args.image_folder,
        "--video_folder": data_args.video_folder,
    }
    for flag, path in inputs.items():
        if path and os.path.exists(path):
            try:
                check_output_outside_inputs(args.output_dir, [path])
            except ValueError as err:
                raise ValueError(f"--output_dir and {flag}: {err}") from None


class TrainingInputError(ValueError):
    """Bad input found before training starts (a flag, an input or output path, the data, the checkpoint to resume
    from): `python -m llada_v.training` reports it as one line with exit status 2."""


def prepare_training(
    model_args: ModelArguments, data_args: DataArguments, args: LladaVTrainingArguments
) -> tuple[LladaVTrainer, str | None]:
    """Every check, then the data, then the model: the trainer ready to run and the checkpoint to resume from.
    Raises `TrainingInputError` for bad input."""
    try:
        return _prepare_training(model_args, data_args, args)
    except TrainingInputError:
        raise
    except (ValueError, OSError) as err:
        raise TrainingInputError(str(err)) from err


def _prepare_training(
    model_args: ModelArguments, data_args: DataArguments, args: LladaVTrainingArguments
) -> tuple[LladaVTrainer, str | None]:
    if model_args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {model_args.dtype!r}")
    if args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: the model needs pixel_values and image layouts")
    if data_args.mask_sampling not in MASK_SAMPLING:
        raise ValueError(f"--mask_sampling must be one of {MASK_SAMPLING}, got {data_args.mask_sampling!r}")
    check_output_dir(model_args, data_args, args)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    learning_rates = resolve_learning_rates(args)
    set_seed(args.seed)
    processor = LladaVProcessor.from_pretrained(model_args.processor_name_or_path or model_args.model_name_or_path)
    dataset = LladaVDataset(  # before the weights are read: bad data fails fast
        data_args.data_path,
        processor,
        image_folder=data_args.image_folder,
        video_folder=data_args.video_folder,
        system_prompt=data_args.system_prompt,
        max_length=data_args.max_length,
        length_policy=data_args.length_policy,
        on_bad_sample=data_args.on_bad_sample,
    )
    collator = LladaVDataCollator.from_processor(
        processor, padding=data_args.padding, max_length=data_args.max_length, dummy_image=data_args.dummy_image
    )
    if data_args.mask_sampling == "count":
        collator = MaskCountSampling(collator, seed=args.seed + args.process_index)  # ranks draw different masks
    model = LladaVModel.from_pretrained(
        model_args.model_name_or_path,
        dtype=DTYPES[model_args.dtype],
        attn_implementation=model_args.attn_implementation,
    )
    set_trainable(model, _trainable_groups(args))
    if args.lora_r > 0:
        to_save = [m.strip() for m in args.lora_modules_to_save.split(",")] if args.lora_modules_to_save else None
        model = apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, to_save)
    if data_args.dummy_image and args.ddp_find_unused_parameters is None:
        # With the dummy crop every trainable parameter is used in every step.
        args.ddp_find_unused_parameters = False
    trainer = LladaVTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        learning_rates=learning_rates,
    )
    return trainer, resume


def train(model_args: ModelArguments, data_args: DataArguments, args: LladaVTrainingArguments) -> Trainer:
    """Fine-tune a checkpoint on LLaVA-format data; returns the finished trainer (model saved in output_dir).

    Everything is checked before the weights are read (`prepare_training`): the flags, an `--output_dir` that would
    overwrite an input (`check_output_dir`), the data, the checkpoint to resume from (`resolve_resume`)."""
    trainer, resume = prepare_training(model_args, data_args, args)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    if args.lora_r > 0 and args.merge_lora_at_end and trainer.is_world_process_zero():
        # From the saved adapter, not the live model: under FSDP the live weights are shards spread over the ranks.
        base = LladaVModel.from_pretrained(
            model_args.model_name_or_path,
            dtype=DTYPES[model_args.dtype],
            attn_implementation=model_args.attn_implementation,
        )
        # Written whole or not at all; a rerun into the same output_dir replaces it, as the run replaced the adapter.
        with atomic_folder(os.path.join(args.output_dir, "merged"), overwrite=True) as merged_dir:
            merge_saved_lora(base, args.output_dir).save_pretrained(merged_dir)
            trainer.processing_class.save_pretrained(merged_dir)
            write_remote_code(merged_dir)
    return trainer


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LladaVTrainingArguments]:
    """Parse command-line flags, or one `.json`/`.yaml` file holding them all."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, LladaVTrainingArguments), prog="python -m llada_v.training"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> Trainer:
    """`python -m llada_v.training FLAGS` (also under `accelerate launch`); see `docs/training.md`."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(*parse_args(argv))


def run(argv: list[str] | None = None) -> int:
    """The `python -m llada_v.training` process: `main`, with bad input (`TrainingInputError`, a bad sample under
    `--on_bad_sample raise`) reported as one line on stderr and exit status 2. A failure during training keeps its
    traceback."""
    try:
        main(argv)
    except (TrainingInputError, BadSampleError) as err:
        print(f"python -m llada_v.training: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "LORA_TARGET_MODULES",
    "MODULE_GROUPS",
    "STAGE_PRESETS",
    "DataArguments",
    "LladaVTrainer",
    "LladaVTrainingArguments",
    "ModelArguments",
    "StagePreset",
    "TrainingInputError",
    "apply_lora",
    "build_param_groups",
    "check_output_dir",
    "freeze_for_stage",
    "main",
    "merge_lora",
    "merge_saved_lora",
    "module_group",
    "never_used_parameter_names",
    "parse_args",
    "prepare_training",
    "resolve_learning_rates",
    "resolve_resume",
    "run",
    "set_trainable",
    "stage_preset",
    "train",
    "trainable_counts",
]


if __name__ == "__main__":
    sys.exit(run())
