"""The model card (`README.md`) a converter writes into its output folder, so a pushed checkpoint is documented.

Hub metadata in the YAML front matter (`library_name`, `pipeline_tag`, `license`, `base_model`, `tags`), then a
short card: what the folder is, how to load it with `trust_remote_code=True`, the generation presets (the
folder's `generation_config.json`, the fast preset, the official per-task settings of docs/evaluation.md) and how
it was made (llada-v version and command). `write_model_card` is the one writer; the converters call it inside
their temporary folder, so the card is renamed into place with everything else.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..compat_llada_v import TRANSFORMERS_RANGE, TRANSFORMERS_TESTED

CARD_NAME = "README.md"
TAGS = ("llada-v", "llada", "masked-diffusion", "diffusion-language-model", "vision-language", "custom_code")
# The released weights' terms apply to a conversion; the card links them instead of asserting a licence id.
SOURCE_LICENSE = {"license": "other", "license_name": "same-as-base-model"}


def front_matter(base_model: str | None) -> dict:
    """The Hub metadata of the card, as a dict (written as YAML)."""
    meta: dict = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", **SOURCE_LICENSE}
    if base_model:
        meta["license_link"] = f"https://huggingface.co/{base_model}"
        meta["base_model"] = base_model
    meta["tags"] = list(TAGS)
    return meta


def _yaml(meta: dict) -> str:
    # Flat keys and a list of plain words: JSON scalars are valid YAML, so no YAML library is needed.
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def _presets(generation_config: dict) -> str:
    from ..evaluation.lmms_eval_plugin import TASK_PRESETS

    g = generation_config
    rows = [
        f"| this folder's default (`generation_config.json`) | {g.get('max_new_tokens')} / {g.get('steps')} / "
        f"{g.get('block_length')} | `<|eot_id|>` |"
    ]
    for name, p in TASK_PRESETS:
        stops = ", ".join(f"`{json.dumps(s)}`" for s in p.stop_strings)
        rows.append(
            f"| `{name}*` (official evaluation setting) | {p.max_new_tokens} / {p.steps} / {p.block_length} "
            f"| `<|eot_id|>`{', ' + stops if stops else ''} |"
        )
    return "\n".join(rows)


def render_model_card(folder: Path, base_model: str | None, command: str) -> str:
    """The card for a converted `folder` (reads its `generation_config.json` and whether it has a tokenizer);
    `command` says how it was made (the command line, or the Python call)."""
    folder = Path(folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a LLaDA-V checkpoint"
    processor_note = (
        "The folder holds the full processor (tokenizer with `<image>`, chat template, image processor)."
        if has_tokenizer
        else "The folder holds the image processor only (it was converted without a tokenizer): convert again with "
        "`--tokenizer-dir` for `AutoProcessor` to return the full processor."
    )
    return f"""---
{_yaml(front_matter(base_model))}
---

# LLaDA-V (llada-v format)

LLaDA-V, a diffusion multimodal LLM (SigLIP vision tower, 2-layer MLP projector, the bidirectional LLaDA-8B
language model), converted from {source} for Hugging Face Transformers with remote code. Answers are generated
by masked diffusion: the answer starts as mask tokens and is filled in block by block over several forward passes.
{processor_note} The licence is the source checkpoint's: see its page.

## Load and generate

```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

path = "PATH_OR_REPO_ID"
model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16, device_map="cuda").eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("image.jpg")], text=prompt, return_tensors="pt").to(model.device)
out = model.diffusion_generate(**inputs, return_dict_in_generate=True)
answer = out.sequences[0, inputs["input_ids"].shape[1]:][: out.answer_lengths[0]]
print(processor.tokenizer.decode(answer, skip_special_tokens=True))
```

`llada_v` need not be installed: the folder carries its code (`trust_remote_code=True`). It runs under
transformers `{TRANSFORMERS_RANGE}` (tested with {TRANSFORMERS_TESTED[0]} and {TRANSFORMERS_TESTED[1]}, the same
outputs); under any other version loading stops with an `ImportError` that names the installed version and this
range (`config.json` records it as `supported_transformers`). 4-bit:
`quantization_config=BitsAndBytesConfig(load_in_4bit=True)` (the vision tower, projector and lm_head stay
unquantised).

## Generation presets

Answer tokens / steps / block length, and where the sampler stops. Any field can be passed to
`diffusion_generate` (`max_new_tokens=..., steps=..., block_length=...`).

| setting | tokens / steps / block | stops |
|---|---|---|
{_presets(generation)}

Faster, approximate: `LladaVGenerationConfig.fast(model.generation_config)` (dual KV cache + confidence
threshold 0.9). Details: the llada-v documentation (docs/generation.md, docs/usage.md, docs/evaluation.md).

## How this folder was made

Converted with llada-v {__version__}:

```
{command}
```

Every tensor was compared with its source after writing, and a fresh process loaded the folder with
`AutoModel.from_pretrained(..., trust_remote_code=True)` before it was renamed into place.
"""


def write_model_card(folder: Path, base_model: str | None, command: str) -> Path:
    """Write `README.md` into `folder` (a converter's temporary folder: it is renamed into place with the rest)."""
    path = Path(folder) / CARD_NAME
    path.write_text(render_model_card(folder, base_model, command), encoding="utf-8")
    return path


__all__ = ["CARD_NAME", "front_matter", "render_model_card", "write_model_card"]
