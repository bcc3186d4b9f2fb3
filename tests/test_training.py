"""Trainer fine-tuning: stage freezing, per-module learning rates, LoRA, gradient checkpointing, bf16, resume,
and a 2-process `accelerate launch` run (gloo on CPU) whose ranks agree on the loss and the weights."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from llada_v import LladaVModel
from llada_v.processing_llada_v import LladaVProcessor
from llada_v.training.data import LladaVDataCollator, LladaVDataset, MaskCountSampling
from llada_v.training.trainer import (
    LORA_TARGET_MODULES,
    STAGE_PRESETS,
    LladaVTrainer,
    apply_lora,
    build_param_groups,
    fixed_noise_loss,
    freeze_for_stage,
    main,
    merge_lora,
    module_group,
    never_used_parameter_names,
    set_trainable,
    stage_preset,
)

from helpers import accelerate_launch, tiny_processor, write_tiny_checkpoint_and_data
from paths import REPO


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    processor, config, _, data, images = write_tiny_checkpoint_and_data(root)
    dataset = LladaVDataset(data, processor, image_folder=images)
    return SimpleNamespace(
        root=root,
        ck=root / "ck",
        data=data,
        images=images,
        processor=processor,
        config=config,
        dataset=dataset,
        collator=LladaVDataCollator.from_processor(processor),
    )


def _model(setup) -> LladaVModel:
    return LladaVModel.from_pretrained(setup.ck)


def _args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before, model):
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def test_module_groups_and_stage_presets(setup):
    assert module_group("vision_tower.encoder.layers.0.self_attn.q_proj.weight") == "vision"
    assert module_group("base_model.model.multi_modal_projector.linear_1.weight") == "projector"
    assert module_group("language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "language"
    assert module_group("image_newline") == module_group("lm_head.weight") == "language"
    assert dict(STAGE_PRESETS["1"].learning_rates) == {"projector": 1e-3}
    assert dict(stage_preset("stage2").learning_rates) == {"vision": 2e-6, "projector": 1e-5, "language": 1e-5}
    assert stage_preset(3).trainable == ("vision", "projector", "language")
    with pytest.raises(ValueError, match="unknown training stage '4'"):
        stage_preset("4")

    model = _model(setup)
    freeze_for_stage(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("multi_modal_projector.")}
    freeze_for_stage(model, 2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # SigLIP's post_layernorm is stored but never used: frozen so DDP needs no find_unused_parameters.
    assert frozen == {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"}
    with pytest.raises(ValueError, match="unknown module groups \\['text'\\]"):
        set_trainable(model, ["text"])


def test_never_used_parameters_include_layers_past_the_feature_layer():
    processor, config = tiny_processor(vision_feature_layer=-2)
    names = never_used_parameter_names(LladaVModel(config))
    assert any(n.startswith("vision_tower.encoder.layers.1.") for n in names)
    assert not any(n.startswith("vision_tower.encoder.layers.0.") for n in names)


def test_param_groups_hold_each_trainable_parameter_once_with_its_module_lr(setup):
    model = _model(setup)
    freeze_for_stage(model, 2)
    rates = dict(stage_preset(2).learning_rates)
    groups = build_param_groups(model, rates, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for group in groups:
        for p in group["params"]:
            assert group["lr"] == rates[module_group(names[id(p)])]
            assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    assert {g["name"] for g in groups} >= {"vision/decay", "projector/no_decay", "language/decay"}
    with pytest.raises(ValueError, match="learning_rates has no 'vision' entry"):
        build_param_groups(model, {"projector": 1e-3, "language": 1e-5})
    with pytest.raises(ValueError, match="unknown module groups \\['llm'\\]"):
        build_param_groups(model, {"llm": 1e-5})


def test_stage1_trains_only_the_projector(setup, tmp_path):
    model = _model(setup)
    freeze_for_stage(model, 1)
    before = _snapshot(model)
    trainer = LladaVTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=setup.dataset,
        data_collator=setup.collator,
        learning_rates=stage_preset(1).learning_rates,
    )
    trainer.train()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-3]
    assert _changed(before, model) == {n for n in before if n.startswith("multi_modal_projector.")}


def test_per_module_learning_rates_reach_the_optimizer(setup, tmp_path):
    # LladaVTrainer: only the projector has a non-zero rate, so only it moves.
    model = _model(setup)
    freeze_for_stage(model, 2)
    before = _snapshot(model)
    trainer = LladaVTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=setup.dataset,
        data_collator=setup.collator,
        learning_rates={"vision": 0.0, "projector": 1e-2, "language": 0.0},
    )
    trainer.train()
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}["projector/decay"] == 1e-2
    assert _changed(before, model) == {n for n in before if n.startswith("multi_modal_projector.")}
    # A plain Trainer with the helper's groups: only the vision tower moves.
    model = _model(setup)
    freeze_for_stage(model, 2)
    before = _snapshot(model)
    optimizer = torch.optim.AdamW(build_param_groups(model, {"vision": 1e-2, "projector": 0.0, "language": 0.0}))
    Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=setup.dataset,
        data_collator=setup.collator,
        optimizers=(optimizer, None),
    ).train()
    changed = _changed(before, model)
    assert changed and all(n.startswith("vision_tower.") for n in changed)


def test_lora_targets_only_the_language_model_trains_and_merges(setup, tmp_path):
    model = _model(setup)
    base = _snapshot(model)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora_names and all(".language_model.layers." in n for n in lora_names)
    assert len(lora_names) == 2 * 7 * setup.config.text_config.num_hidden_layers  # A and B on 7 projections
    # The vision tower's q_proj/k_proj/v_proj are not adapted.
    assert not any("vision_tower" in n and "lora" in n for n, _ in peft_model.named_modules())
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == set(lora_names)
    before = _snapshot(peft_model)
    LladaVTrainer(
        model=peft_model,
        args=_args(tmp_path, max_steps=4),
        train_dataset=setup.dataset,
        data_collator=setup.collator,
        learning_rates={"language": 1e-2},
    ).train()
    changed = _changed(before, peft_model)
    assert changed and changed <= set(lora_names) and any("lora_B" in n for n in changed)

    peft_model.eval()
    batch = setup.collator([setup.dataset[0], setup.dataset[3]])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapted = peft_model(**batch).logits
        merged = merge_lora(peft_model)
        assert isinstance(merged, LladaVModel)
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=1e-4, atol=1e-5)
    assert {n for n, p in merged.named_parameters() if not torch.equal(p, base[n])} <= {
        n for n in base if n.startswith("language_model.layers.")
    }
    with pytest.raises(ValueError, match="outside language_model.layers"):
        apply_lora(_model(setup), target_modules=r".*\.q_proj")
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(_model(setup), target_modules=r"nothing")
    assert LORA_TARGET_MODULES.startswith(r"language_model\.layers")


def test_gradient_checkpointing_gives_the_same_gradients(setup):
    batch = setup.collator([setup.dataset[i] for i in range(4)])
    t = torch.tensor([0.5, 0.6, 0.7, 0.8])
    masked = (torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(0)) < 0.6) & (
        batch["labels"] != -100
    )
    grads = []
    for checkpointing in (False, True):
        model = _model(setup).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch, masking_t=t, masked_indices=masked).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_bf16_and_gradient_checkpointing_flags_train_on_cpu(setup, tmp_path):
    model = _model(setup)
    trainer = LladaVTrainer(
        model=model,
        args=_args(tmp_path, bf16=True, activation_checkpointing=True, max_steps=2),
        train_dataset=setup.dataset,
        data_collator=setup.collator,
        learning_rates=stage_preset(2).learning_rates,
    )
    result = trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16" and model.is_activation_checkpointing
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights, bf16 autocast


def _entry_args(setup, out, *extra):
    return [
        "--model_name_or_path",
        str(setup.ck),
        "--data_path",
        str(setup.data),
        "--image_folder",
        str(setup.images),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "2",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
        *extra,
    ]


def test_training_entry_resumes_exactly_and_writes_a_loadable_checkpoint(setup, tmp_path):
    full = main(_entry_args(setup, tmp_path / "full", "--max_steps", "4", "--save_steps", "2"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = main(
        _entry_args(setup, resumed_dir, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "last")
    )
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    # The resumed history = the checkpoint's first 2 steps + steps 3-4 recomputed, equal to the straight run.
    assert len(losses) == 4 and resumed_losses == losses
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The output folder is a complete checkpoint: weights, processor and the remote code.
    out = tmp_path / "full"
    for name in ("modeling_llada_v.py", "configuration_llada_v.py", "processing_llada_v.py", "processor_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_llada_v.LladaVModel"
    assert "_auto_class" not in LladaVModel.__dict__  # the registration is undone after training
    processor = LladaVProcessor.from_pretrained(out)
    assert processor.image_token_id == setup.config.image_token_id
    assert not torch.equal(LladaVModel.from_pretrained(out).lm_head.weight, _model(setup).lm_head.weight)


def test_training_entry_count_mask_sampling_trains_and_rejects_unknown_modes(setup, tmp_path):
    trainer = main(_entry_args(setup, tmp_path / "count", "--max_steps", "2", "--mask_sampling", "count"))
    assert isinstance(trainer.data_collator, MaskCountSampling)
    assert isinstance(trainer.data_collator.collator, LladaVDataCollator)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)  # count form: every row masks >= 1 token
    assert not isinstance(
        main(_entry_args(setup, tmp_path / "time", "--max_steps", "1")).data_collator, MaskCountSampling
    )  # the default stays the SPEC form
    with pytest.raises(ValueError, match="mask_sampling must be one of .*'sometimes'"):
        main(_entry_args(setup, tmp_path / "bad", "--max_steps", "1", "--mask_sampling", "sometimes"))


def test_training_entry_lora_saves_adapter_and_merged_model(setup, tmp_path):
    trainer = main(
        _entry_args(
            setup,
            tmp_path / "lora",
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            "--lora_r",
            "4",
            "--lora_modules_to_save",
            "multi_modal_projector",
            "--merge_lora_at_end",
            "true",
        )
    )
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {2e-4, 1e-5}  # LoRA default, projector preset
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    merged = LladaVModel.from_pretrained(tmp_path / "lora" / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


# ---------------------------------------------------------------------------------------------- safe outputs


def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_output_dir_overlapping_the_model_or_the_data_is_refused_before_loading(setup, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(setup.ck, ck)  # a run that went ahead would overwrite it
    before = _digest(ck / "model.safetensors")
    data_dir = tmp_path / "data"
    shutil.copytree(setup.images, data_dir / "images")
    data = data_dir / "data.json"
    shutil.copy(setup.data, data)
    cases = [
        (ck, "--model_name_or_path", ck),
        (ck / "run", "--model_name_or_path", ck),
        (tmp_path, "--model_name_or_path", ck),
        (data_dir, "--data_path", data),
        (data_dir / "images", "--image_folder", data_dir / "images"),
        (data_dir / "images" / "run", "--image_folder", data_dir / "images"),
    ]
    for out, flag, source in cases:
        args = [
            "--model_name_or_path",
            str(ck),
            "--data_path",
            str(data),
            "--image_folder",
            str(data_dir / "images"),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--report_to",
            "none",
            "--use_cpu",
        ]
        with pytest.raises(
            ValueError,
            match=f"--output_dir and {flag}: the output folder {out} overlaps the input "
            f"{source}: it must not be the input, contain it or lie inside it",
        ):
            main(args)
    assert _digest(ck / "model.safetensors") == before
    assert not (ck / "run").exists() and not (data_dir / "images" / "run").exists()


@pytest.mark.slow
def test_python_m_llada_v_training_reports_bad_input_in_one_line(setup, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(setup.ck, ck)
    before = _digest(ck / "model.safetensors")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    common = [
        "--data_path",
        str(setup.data),
        "--image_folder",
        str(setup.images),
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "llada_v.training", "--model_name_or_path", str(ck), "--output_dir", str(ck), *common],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"python -m llada_v.training: error: --output_dir and --model_name_or_path: the output folder {ck} overlaps "
        f"the input {ck}: it must not be the input, contain it or lie inside it"
    )
    assert "Traceback" not in result.stderr and _digest(ck / "model.safetensors") == before
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "image": "../../etc/passwd",
                    "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
                }
            ]
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llada_v.training",
            "--model_name_or_path",
            str(ck),
            "--output_dir",
            str(tmp_path / "out"),
            *common,
            "--data_path",
            str(bad),
            "--on_bad_sample",
            "raise",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "python -m llada_v.training: error: bad sample 0: image path '../../etc/passwd' lies outside the image/video "
        f"folder {setup.images}"
    )


def test_logged_learning_rates_name_their_module_group(setup, tmp_path):
    trainer = LladaVTrainer(
        model=_model(setup),
        args=_args(tmp_path, max_steps=1),
        train_dataset=setup.dataset,
        data_collator=setup.collator,
        learning_rates={"vision": 1e-4, "projector": 1e-3, "language": 2e-3},
    )
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert "learning_rate" not in logged  # the Trainer's would be the first group's: vision's 1e-4
    assert (logged["learning_rate/vision"], logged["learning_rate/projector"], logged["learning_rate/language"]) == (
        1e-4,
        1e-3,
        2e-3,
    )


# ---------------------------------------------------------------------------------------------- checkpoints


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def two_checkpoints(setup, tmp_path_factory):
    """A 4-step run saving checkpoint-2 and checkpoint-4 (and its final weights)."""
    out = tmp_path_factory.mktemp("checkpoints") / "run"
    main(_entry_args(setup, out, "--max_steps", "4", "--save_steps", "2"))
    return out


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda ck: (ck / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda ck: (ck / "trainer_state.json").write_text('{"global_step": 4,'), "trainer_state.json does not parse"),
        (lambda ck: _truncate(ck / "model.safetensors"), "model.safetensors has .* bytes, its header describes"),
        (lambda ck: _truncate(ck / "model.safetensors", 0.0), "model.safetensors is truncated"),
        (lambda ck: _truncate(ck / "optimizer.pt"), "optimizer.pt is not a complete archive"),
    ],
)
def test_resume_last_skips_an_incomplete_checkpoint_and_says_why(two_checkpoints, tmp_path, caplog, damage, reason):
    import logging
    import re

    from llada_v.training.trainer import resolve_resume

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints / "checkpoint-2", run / "checkpoint-2")
    shutil.copytree(two_checkpoints / "checkpoint-4", run / "checkpoint-4")
    assert resolve_resume("last", str(run)) == str(run / "checkpoint-4")
    damage(run / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="llada_v.training.checkpoints"):
        assert resolve_resume("last", str(run)) == str(run / "checkpoint-2")
    expected = f"not resuming from {run / 'checkpoint-4'}: it is incomplete \\({reason}"
    assert re.search(expected, caplog.text), caplog.text
    with pytest.raises(
        ValueError, match=f"--resume_from_checkpoint {run / 'checkpoint-4'}: the checkpoint is incomplete \\({reason}"
    ):
        resolve_resume(str(run / "checkpoint-4"), str(run))
    damage(run / "checkpoint-2")
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint last: no complete checkpoint-N folder in {run}"):
        resolve_resume("last", str(run))


def test_resume_last_with_a_truncated_newest_checkpoint_continues_from_the_complete_one(
    setup, two_checkpoints, tmp_path
):
    # The real entry and Trainer: the truncated checkpoint-4 is passed over, training resumes at step 2 and ends
    # where the uninterrupted run ended.
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints / "checkpoint-2", run / "checkpoint-2")
    shutil.copytree(two_checkpoints / "checkpoint-4", run / "checkpoint-4")
    _truncate(run / "checkpoint-4" / "optimizer.pt")
    resumed = main(_entry_args(setup, run, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "last"))
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4]
    a, b = load_file(two_checkpoints / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from llada_v.training.checkpoints import checkpoint_problem

    assert checkpoint_problem(run / "checkpoint-4") is None  # the resumed run wrote a whole checkpoint-4 again


def test_a_checkpoint_save_that_fails_half_way_leaves_no_checkpoint_folder(setup, tmp_path):
    # The optimizer state fails to write after the weights were written (a full disk, a kill): checkpoint-2 stays
    # absent, the staging folder holds the partial write, and the next save cleans it up.
    class FailingSave(LladaVTrainer):
        def _save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == 2:
                raise OSError("No space left on device")
            return super()._save_optimizer_and_scheduler(output_dir)

    out = tmp_path / "out"
    trainer = FailingSave(
        model=_model(setup),
        args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1),
        train_dataset=setup.dataset,
        data_collator=setup.collator,
    )
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert sorted(p.name for p in out.iterdir()) == [".checkpoint-2.partial", "checkpoint-1"]
    assert (out / ".checkpoint-2.partial" / "checkpoint-2" / "model.safetensors").is_file()
    from llada_v.training.trainer import resolve_resume

    assert resolve_resume("last", str(out)) == str(out / "checkpoint-1")
    trainer = LladaVTrainer(
        model=_model(setup),
        args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1),
        train_dataset=setup.dataset,
        data_collator=setup.collator,
    )
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # rotated to the limit, staging removed


_KILLED_SCRIPT = """
import sys, time
from pathlib import Path
from test_training import _args
from helpers import write_tiny_checkpoint_and_data
from llada_v.training.data import LladaVDataCollator, LladaVDataset
from llada_v.training.trainer import LladaVTrainer
from llada_v import LladaVModel

root = Path(sys.argv[1])
processor, config, ck, data, images = write_tiny_checkpoint_and_data(root)

class SlowSave(LladaVTrainer):
    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == 2:  # the weights of checkpoint-2 are written: the parent kills us here
            (root / "saving").write_text(output_dir)
            time.sleep(120)
        return super()._save_optimizer_and_scheduler(output_dir)

trainer = SlowSave(model=LladaVModel.from_pretrained(ck), args=_args(root, max_steps=3, save_strategy="steps",
                   save_steps=1), train_dataset=LladaVDataset(data, processor, image_folder=images),
                   data_collator=LladaVDataCollator.from_processor(processor))
trainer.train()
"""


@pytest.mark.slow
def test_a_trainer_killed_while_saving_leaves_the_last_complete_checkpoint_to_resume(tmp_path):
    import signal
    import time

    from llada_v.training.trainer import resolve_resume

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SCRIPT, str(tmp_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (tmp_path / "saving").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline, "the run never reached its second save"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    out = tmp_path / "out"
    assert (out / ".checkpoint-2.partial" / "checkpoint-2" / "model.safetensors").is_file()  # killed mid-save
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["checkpoint-1"]
    assert resolve_resume("last", str(out)) == str(out / "checkpoint-1")


_RANK_SCRIPT = """
import json, sys
from llada_v.modeling_llada_v import LladaVModel
from llada_v.training.trainer import main

p_masks = []
forward = LladaVModel.forward


def recording_forward(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    p_masks.append(out.p_mask.tolist())
    return out


LladaVModel.forward = recording_forward
trainer = main(sys.argv[1:])
model = trainer.accelerator.unwrap_model(trainer.model)
summary = {
    "world_size": trainer.args.world_size,
    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    "weights": {n: p.detach().double().sum().item() for n, p in model.named_parameters()},
    "p_mask": p_masks,
}
with open(f"{trainer.args.output_dir}/rank{trainer.args.process_index}.json", "w") as f:
    json.dump(summary, f)
"""


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_agree_on_loss_and_weights(setup, tmp_path):
    # Mostly text-only samples, one per rank and step: ranks often hold batches without images, which only
    # work in DDP (find_unused_parameters=False) thanks to the collator's dummy crop.
    records = json.loads(setup.data.read_text())
    text = [r for r in records if "image" not in r]
    data = tmp_path / "mostly_text.json"
    data.write_text(json.dumps([r for r in records if isinstance(r.get("image"), str)][:2] + text * 3))
    script = tmp_path / "rank_summary.py"
    script.write_text(_RANK_SCRIPT)
    out = tmp_path / "ddp"
    args = _entry_args(setup, out, "--max_steps", "4", "--save_strategy", "no", "--stage", "2")
    args[args.index("--data_path") + 1] = str(data)
    args[args.index("--per_device_train_batch_size") + 1] = "1"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = accelerate_launch(2)
    result = subprocess.run([*launcher, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["losses"]) == 4 and ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # Each rank draws its own masking noise (the Trainer alone would seed both ranks alike).
    assert len(ranks[0]["p_mask"]) == 4 and ranks[0]["p_mask"][0] != ranks[1]["p_mask"][0]
    initial = {n: p.detach().double().sum().item() for n, p in _model(setup).named_parameters()}
    assert ranks[0]["weights"] != initial


def test_deepspeed_zero3_config_leaves_optimizer_and_batch_sizes_to_the_trainer():
    config = json.loads((REPO / "configs" / "deepspeed_zero3.json").read_text())
    assert config["zero_optimization"]["stage"] == 3
    # No optimizer/scheduler section: the Trainer builds them, so per-module learning rates apply.
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert config[key] == "auto", key


@pytest.mark.slow
def test_lora_at_the_default_learning_rate_lowers_a_fixed_held_out_loss(tmp_path):
    # Issue #15 reported a 4-step LoRA run logging 9.06 -> 9.82 -> 10.87 -> 16.26. The logged losses are one draw
    # of t ~ U(0, 1) each, weighted 1 / t: here they are compared on a held-out batch with the noise fixed, which
    # falls at the documented LR (LORA_DEFAULT_LEARNING_RATE, linear decay, no warm-up) and would not with the
    # adapters in the wrong place, a wrong-signed loss, or frozen adapters.
    from llada_v.demo.model import demo_model_dir
    from llada_v.demo.train import write_training_data
    from llada_v.training.trainer import LORA_DEFAULT_LEARNING_RATE

    train_json = write_training_data(tmp_path / "train", 16, seed=0)
    held_out_json = write_training_data(tmp_path / "held_out", 8, seed=1)
    processor = LladaVProcessor.from_pretrained(demo_model_dir())
    held_out = LladaVDataset(held_out_json, processor, image_folder=tmp_path / "held_out")
    batch = LladaVDataCollator.from_processor(processor)([held_out[i] for i in range(len(held_out))])
    before = fixed_noise_loss(LladaVModel.from_pretrained(demo_model_dir()), batch)
    trainer = main(
        [
            "--model_name_or_path",
            str(demo_model_dir()),
            "--data_path",
            str(train_json),
            "--image_folder",
            str(tmp_path / "train"),
            "--output_dir",
            str(tmp_path / "lora"),
            "--lora_r",
            "8",
            "--max_steps",
            "8",
            "--per_device_train_batch_size",
            "4",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--use_cpu",
            "--disable_tqdm",
            "true",
        ]
    )
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {LORA_DEFAULT_LEARNING_RATE}
    after = fixed_noise_loss(trainer.model, batch)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert after < before, (before, after, logged)


def test_every_command_drops_the_bitsandbytes_missing_kernels_warning():
    # The adapter commands (llada-v generate --adapter, serve, lmms-eval) import PEFT, hence bitsandbytes, through
    # llada_v.inference without the training package: a fresh process with only that import must drop the line too.
    script = (
        "import logging, sys; logging.basicConfig(stream=sys.stdout, format='%(message)s'); import llada_v.inference; "
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops'); "
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s.', 'No module named kernels'); "
        "log.warning('another bitsandbytes warning')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["another bitsandbytes warning"]


def test_training_package_drops_the_bitsandbytes_missing_kernels_warning(caplog):
    # This machine's CPU lacks AVX512-BF16, so bitsandbytes never logs it here: log the record it logs instead.
    import logging

    import llada_v.training  # noqa: F401  (installs the filter)

    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        bnb_logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
            "already `pip install kernels` and the kernels >= 0.11.1",
            "No module named 'kernels'",
        )
        bnb_logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
