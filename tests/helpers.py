"""Helpers that several test modules share (tiny tokenizer and processor, checkpoints and data on disk, demo-like
checkpoints, images as data URLs, a local lmms-eval task, multi-process training runs, the user doc pages).

Test modules import from here, never from each other: importing a test module would also collect its tests
where it is imported. The tiny model and inputs are in tiny.py, where files are in paths.py.
"""

import base64
import http.server
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llada_v import LladaVGenerationConfig, LladaVModel
from llada_v.conversion.tokenizer import _SPLIT_PATTERN, _byte_level_alphabet
from llada_v.image_processing_llada_v import LladaVImageProcessor
from llada_v.processing_llada_v import CHAT_TEMPLATE, LladaVProcessor

from paths import REPO
from tiny import tiny_config

# ---------------------------------------------------------------------------------------------- tiny tokenizer,
# processor, checkpoint and LLaVA-format training data (test_data, test_training, test_fsdp, test_deepspeed)

SPECIALS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|mdm_mask|>",
    "<image>",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: 256 bytes, `\\n\\n`, the role words as single tokens, then the LLaDA special tokens."""
    vocab = {char: i for i, char in enumerate(_byte_level_alphabet())}
    merges = [("Ċ", "Ċ")]
    vocab["ĊĊ"] = len(vocab)
    for word in ("system", "user", "assistant"):
        prefix = word[0]
        for char in word[1:]:
            merges.append((prefix, char))
            prefix += char
            vocab.setdefault(prefix, len(vocab))
    first = len(vocab)
    vocab.update({token: first + i for i, token in enumerate(SPECIALS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[1]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_processor(**config_overrides):
    """A `LladaVProcessor` on `tiny_tokenizer` and the matching tiny `LladaVConfig` (vocab 320, 28-px crops)."""
    tok = tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    config = tiny_config(
        text_config=dict(
            vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
        image_token_id=ids["<image>"],
        mask_token_id=ids["<|mdm_mask|>"],
        bos_token_id=ids["<|startoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        start_header_token_id=ids["<|start_header_id|>"],
        end_header_token_id=ids["<|end_header_id|>"],
        eot_token_id=ids["<|eot_id|>"],
        user_role_token_id=tok.convert_tokens_to_ids("user"),
        assistant_role_token_id=tok.convert_tokens_to_ids("assistant"),
        tokenizer_vocab_size=len(tok),
        **config_overrides,
    )
    processor = LladaVProcessor(image_processor=LladaVImageProcessor.from_model_config(config), tokenizer=tok)
    return processor, config


def write_image(path: Path, size_wh, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size_wh, (20, 20, 20))
    image.paste(color, (0, 0, size_wh[0] // 2, size_wh[1] // 2))
    image.save(path)
    return path


def write_training_folder(folder: Path, n_records: int = 8) -> tuple[Path, Path]:
    """Images (several sizes) and a LLaVA JSON mixing single-image, multi-turn, two-image and text-only samples."""
    images = folder / "images"
    sizes = [(40, 30), (30, 60), (28, 28), (70, 30)]
    colors = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (220, 220, 20)]
    names = ["red", "green", "blue", "yellow"]
    for i, (size, color) in enumerate(zip(sizes, colors)):
        write_image(images / f"img{i}.png", size, color)
    records = []
    for i in range(n_records):
        k = i % 4
        if i % 4 == 3:
            records.append(
                {
                    "id": f"t{i}",
                    "conversations": [
                        {"from": "human", "value": f"Say {names[k]}."},
                        {"from": "gpt", "value": names[k]},
                    ],
                }
            )
        elif i % 4 == 2:
            records.append(
                {
                    "id": f"m{i}",
                    "image": [f"img{k}.png", f"img{(k + 1) % 4}.png"],
                    "conversations": [
                        {"from": "human", "value": "<image> <image>\nColours?"},
                        {"from": "gpt", "value": f"{names[k]} {names[(k + 1) % 4]}"},
                    ],
                }
            )
        else:
            records.append(
                {
                    "id": f"s{i}",
                    "image": f"img{k}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat colour?"},
                        {"from": "gpt", "value": names[k]},
                        {"from": "human", "value": "Sure?"},
                        {"from": "gpt", "value": "yes"},
                    ],
                }
            )
    data = folder / "data.json"
    data.write_text(json.dumps(records))
    return data, images


def write_tiny_checkpoint_and_data(root: Path):
    """The tiny model (seed 0) with its processor in `root/ck` and `write_training_folder` data in `root/data`.

    Returns (processor, config, checkpoint folder, data file, image folder).
    """
    processor, config = tiny_processor()
    torch.manual_seed(0)
    LladaVModel(config).save_pretrained(root / "ck")
    processor.save_pretrained(root / "ck")
    data, images = write_training_folder(root / "data", n_records=8)
    return processor, config, root / "ck", data, images


# ---------------------------------------------------------------------------------------------- a demo-like
# random checkpoint (test_cli, test_lmms_eval, test_lmms_eval_parallel)


def build_demo_like_checkpoint(path):
    """A random-weight model with the demo's tokenizer, processor and sampler defaults (4/4/4).

    The language model is 64 wide so that bitsandbytes' packed CPU 4-bit kernel can run it.
    """
    from llada_v.demo.model import build_demo_processor, build_demo_tokenizer, demo_config
    from llada_v.demo.train import DEMO_GENERATION, save_demo

    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    torch.manual_seed(0)
    model = LladaVModel(config).eval()
    model.generation_config = LladaVGenerationConfig.from_model_config(config)
    model.generation_config.update(**DEMO_GENERATION)
    save_demo(model, build_demo_processor(config, tokenizer), path)
    return path


# ---------------------------------------------------------------------------------------------- images as PNG
# bytes and data URLs (test_serving_api, test_serving)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


# ---------------------------------------------------------------------------------------------- a local lmms-eval
# task on three coloured images (test_lmms_eval, test_lmms_eval_parallel)

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}

TASK_UTILS = """
import os
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [Image.open(os.path.join(HERE, doc["image"])).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""

TASK_GEN = """task: tiny_colors_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_utils.doc_to_visual
doc_to_text: !function tiny_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n\\n"]
process_results: !function tiny_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_MC = """task: tiny_colors_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function tiny_utils.doc_to_visual
doc_to_text: !function tiny_utils.doc_to_text
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


def write_local_task(folder):
    """Two tasks over three local images, loaded by `datasets` from a JSON-lines file (no Hub access)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.jsonl", "w") as f:
        for i, (name, rgb) in enumerate(COLORS.items()):
            Image.new("RGB", (40, 30), rgb).save(folder / f"img{i}.png")
            f.write(
                json.dumps(
                    {
                        "image": f"img{i}.png",
                        "question": "What color is the circle?",
                        "answer": name,
                        "choices": list(COLORS),
                        "label": i,
                    }
                )
                + "\n"
            )
    (folder / "tiny_utils.py").write_text(TASK_UTILS)
    (folder / "tiny_colors_gen.yaml").write_text(TASK_GEN.format(data=folder / "data.jsonl"))
    (folder / "tiny_colors_mc.yaml").write_text(TASK_MC.format(data=folder / "data.jsonl"))
    return folder


# ---------------------------------------------------------------------------------------------- training in
# several processes (test_fsdp, test_deepspeed): the environment, the common flags, checked runs, each rank's log

SCALE_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def accelerate_launch(num_processes: int) -> list[str]:
    """`accelerate launch` with `num_processes` local processes (`--multi_gpu` when more than one: the CPU gets
    gloo with `ACCELERATE_USE_CPU=true` or `CUDA_VISIBLE_DEVICES=""`), no mixed precision, no dynamo, any free port."""
    multi = ["--multi_gpu"] if num_processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
            "--num_machines", "1", *multi, "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0"]  # fmt: skip


def scale_setup(root: Path) -> SimpleNamespace:
    """`write_tiny_checkpoint_and_data` under `root`, as the `setup` fixture of the multi-process tests."""
    _, _, ck, data, images = write_tiny_checkpoint_and_data(root)
    return SimpleNamespace(root=root, ck=ck, data=data, images=images)


def scale_flags(setup, out, *extra):
    return [
        "--model_name_or_path",
        str(setup.ck),
        "--data_path",
        str(setup.data),
        "--image_folder",
        str(setup.images),
        "--output_dir",
        str(out),
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
        "--padding",
        "masked",
        "--train_sampling_strategy",
        "sequential",
        "--lr_scheduler_type",
        "constant",
        *extra,
    ]


def run_ok(command, timeout=300, env=SCALE_ENV):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def rank_logs(out, n):
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(n)]


# ---------------------------------------------------------------------------------------------- the user pages
# (test_docs, test_docs_paths)

ARCHIVES = ("docs/history/",)  # an archive of run logs, not user pages (test_docs.py says why)


def doc_files(root: Path = REPO) -> list[Path]:
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file() and not any(f.relative_to(root).as_posix().startswith(a) for a in ARCHIVES)]


# ---------------------------------------------------------------------------------------------- golden generation cases

GOLDEN_PLACEHOLDER = -200
GOLDEN_IMAGE_TOKENS = {"images/wide_300x100.png": 981, "images/test.jpg": 3633}


def expand_golden_ids(ids, image_files, image_token_id):
    """A golden case's ids with each image placeholder expanded to its image tokens, `(1, L)`."""
    out, images = [], iter(image_files)
    for t in ids:
        out += [image_token_id] * GOLDEN_IMAGE_TOKENS[next(images)] if t == GOLDEN_PLACEHOLDER else [t]
    return torch.tensor([out])


def golden_image_inputs(golden_dir, image_file):
    """The image inputs of a golden generation case: the official pixels of the wide image, else the processor's."""
    if image_file == "images/wide_300x100.png":
        pixels = load_file(golden_dir / "tensors" / "pixels_wide_300x100.safetensors")["pixel_values"][0]
        return {"pixel_values": pixels, "image_sizes": torch.tensor([[100, 300]])}  # (height, width)
    out = LladaVImageProcessor()(Image.open(golden_dir / image_file))
    return {k: out[k] for k in ("pixel_values", "image_sizes", "image_layouts", "image_num_crops")}


# ---------------------------------------------------------------------------------------------- slow servers


class TricklingHost:
    """A loopback HTTP server that sends an image's headers (1000 bytes promised), then one byte per second."""

    def __init__(self, seconds: int = 60) -> None:
        self.stop = threading.Event()
        stop = self.stop

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server name
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(seconds):
                    try:
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                    except OSError:  # the server under test hung up
                        return
                    if stop.wait(1):
                        return

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/trickle.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
