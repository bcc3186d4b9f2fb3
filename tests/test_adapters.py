"""LoRA adapters the way a PEFT user has them: the adapter folder a LoRA run writes, used through
`PeftModel.from_pretrained`, `AutoModel.from_pretrained(adapter_dir)`, `llada-v generate --adapter DIR`,
`llada-v generate --model ADAPTER_DIR` and a merged folder. Every path must give the answer of the reference:
PEFT's own unmerged wrapper around the demo model."""

import json
import shutil
import subprocess

import pytest
import torch

from llada_v.checkpoint_io import write_remote_code
from llada_v.demo.model import demo_model_dir
from llada_v.inference import (
    InputError,
    generate_texts,
    load_pretrained,
    resolve_adapter,
    user_message,
)

from helpers import build_demo_like_checkpoint
from paths import REPO, llada_v_command

peft = pytest.importorskip("peft")

IMAGE = REPO / "examples" / "lmms_eval_task" / "images" / "scene00.png"
QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Which shape is on the left?"]


def _prompts(processor, images):
    from llada_v.inference import chat_prompt

    texts = [chat_prompt(processor, [user_message(q, 1)], system_prompt="") for q in QUESTIONS]
    return texts, [list(images) for _ in QUESTIONS]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """An adapter folder as `save_pretrained` of a LoRA-wrapped demo model writes it (the LoRA B matrices set to
    random values: a freshly initialised adapter is a no-op), and the base's and the adapter's answers."""
    from llada_v.inference import read_image
    from llada_v.training.trainer import apply_lora

    folder = tmp_path_factory.mktemp("adapters") / "out_lora"
    model, processor = load_pretrained(demo_model_dir(), device="cpu")
    image = read_image(IMAGE)
    texts, images = _prompts(processor, [image])
    base_answers, _ = generate_texts(model, processor, texts, images, model.generation_config)
    wrapped = apply_lora(model, r=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():  # A and B both from the seeded generator: reproducible
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    wrapped.save_pretrained(folder)
    return folder, processor, image, base_answers


@pytest.fixture(scope="module")
def reference(adapter):
    """The answers of `PeftModel.from_pretrained(base, folder)` (unmerged: PEFT's own forward)."""
    from peft import PeftModel

    folder, processor, image, base_answers = adapter
    base, _ = load_pretrained(demo_model_dir(), device="cpu", need_processor=False)
    wrapped = PeftModel.from_pretrained(base, str(folder)).eval()
    texts, images = _prompts(processor, [image])
    with torch.no_grad():
        answers, _ = generate_texts(wrapped, processor, texts, images, base.generation_config)
    assert answers != base_answers, "the adapter must change some answer, else this test proves nothing"
    assert all(answers), answers
    return answers


def _cli_answers(*model_args):
    answers = []
    for question in QUESTIONS:
        result = subprocess.run(
            [*llada_v_command(), "generate", *model_args, "--image", str(IMAGE), "--prompt", question,
             "--system-prompt", ""],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("\n"), result.stdout
        answers.append(result.stdout[:-1])  # the answer, as printed (it may be empty)
    return answers


def test_load_pretrained_with_an_adapter_merges_it(adapter, reference):
    folder, processor, image, _ = adapter
    model, _ = load_pretrained(demo_model_dir(), device="cpu", need_processor=False, adapter=folder)
    assert type(model).__name__ == "LladaVModel" and not any("lora" in n for n, _ in model.named_parameters())
    texts, images = _prompts(processor, [image])
    answers, _ = generate_texts(model, processor, texts, images, model.generation_config)
    assert answers == reference


@pytest.mark.slow
def test_cli_adapter_flag_and_adapter_folder_as_model(adapter, reference):
    folder = adapter[0]
    assert _cli_answers("--adapter", str(folder)) == reference
    assert _cli_answers("--model", str(folder)) == reference  # the base named in adapter_config.json


@pytest.mark.slow
def test_automodel_on_the_adapter_folder(adapter, reference):
    """transformers loads the base named in adapter_config.json and attaches the adapter (peft installed)."""
    from transformers import AutoModel

    folder, processor, image, _ = adapter
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    texts, images = _prompts(processor, [image])
    with torch.no_grad():
        answers, _ = generate_texts(model, processor, texts, images, model.generation_config)
    assert answers == reference


@pytest.mark.slow
def test_merged_folder_answers_like_the_adapter(adapter, reference, tmp_path):
    from llada_v.training.trainer import merge_saved_lora

    folder, processor, _, _ = adapter
    base, _ = load_pretrained(demo_model_dir(), device="cpu", need_processor=False)
    merged = tmp_path / "merged"
    merge_saved_lora(base, folder).save_pretrained(merged)
    processor.save_pretrained(merged)
    write_remote_code(merged)
    assert _cli_answers("--model", str(merged)) == reference


def test_bad_adapters_are_one_line_errors(adapter, tmp_path):
    folder = adapter[0]
    demo = str(demo_model_dir())
    with pytest.raises(InputError, match="has no adapter_config.json: not a PEFT adapter folder"):
        resolve_adapter(demo, tmp_path)
    with pytest.raises(InputError, match="is an adapter folder and --adapter .* is another"):
        resolve_adapter(str(folder), folder)
    nameless = tmp_path / "nameless"
    shutil.copytree(folder, nameless)
    config = json.loads((nameless / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (nameless / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="does not name its base model"):
        resolve_adapter(str(nameless), None)
    config["peft_type"] = "IA3"
    (nameless / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="is a 'IA3' adapter; llada-v loads LoRA adapters"):
        resolve_adapter(demo, nameless)
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert resolve_adapter(str(folder), None) == (base, str(folder))


def test_an_adapter_of_another_shape_says_which_weights_do_not_fit(adapter, tmp_path):
    # The adapter was trained on the demo model (128 wide); this base is 64 wide.
    folder = adapter[0]
    other = build_demo_like_checkpoint(tmp_path / "narrow")
    with pytest.raises(InputError, match=r"cannot apply adapter .*: size mismatch for .*lora_A.*\(and \d+ more\)"):
        load_pretrained(str(other), device="cpu", adapter=str(folder))
    result = subprocess.run(
        [*llada_v_command(), "generate", "--model", str(other), "--adapter", str(folder), "--prompt", "hi"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"llada-v generate: error: cannot apply adapter {folder}: size mismatch for "), line


def test_an_adapter_applied_to_another_base_of_the_same_shape_warns(adapter, tmp_path):
    folder = adapter[0]
    copy = tmp_path / "another_base"
    shutil.copytree(demo_model_dir(), copy)  # same shapes, another checkpoint as far as names tell
    with pytest.warns(
        UserWarning,
        match=f"adapter {folder} was trained on {demo_model_dir()} but is applied to "
        f"{copy}: it loads because the shapes match",
    ):
        load_pretrained(str(copy), device="cpu", adapter=str(folder))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own base: no warning
        load_pretrained(str(demo_model_dir()), device="cpu", adapter=str(folder))


def test_cli_reports_a_bad_adapter_in_one_line(tmp_path):
    result = subprocess.run(
        [*llada_v_command(), "generate", "--adapter", str(tmp_path), "--prompt", "hi"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"llada-v generate: error: adapter {tmp_path} has no adapter_config.json: not a PEFT adapter folder"
    )


def test_lmms_eval_model_args_take_an_adapter(adapter, reference):
    """`--model_args pretrained=BASE,adapter=DIR`: the plugin answers as the adapter does (with the settings
    of the checkpoint's generation config, which the reference uses)."""
    from types import SimpleNamespace

    from llada_v.evaluation.lmms_eval_plugin import LladaV

    folder, _, image, _ = adapter
    model = LladaV(pretrained=str(demo_model_dir()), adapter=str(folder), device="cpu", system_prompt="")
    model.task_dict = {"scenes": {"test": [{"image": image}]}}
    settings = {"max_new_tokens": 32, "steps": 32, "block_length": 8, "until": []}  # the checkpoint's defaults
    requests = [
        SimpleNamespace(args=(question, settings, lambda doc: [doc["image"]], 0, "scenes", "test"))
        for question in QUESTIONS
    ]
    assert [result.text for result in model.generate_until(requests)] == reference
