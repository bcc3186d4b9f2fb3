"""Every `llada-v` command line's arguments, with the standard library only.

`llada-v --help`, a subcommand's `--help` and argument errors are answered from this module alone, without
importing torch or transformers (seconds of start-up); a command imports what it needs when it runs
(`lazy_command`). The flags that several commands share are defined once here: the model group (`generate`,
`chat`, `serve`, `web`), the sampler settings (`generate`, `chat`, `web`), the output folder (`convert`, `compose`).
`inference.load_from_args` loads what they name.

Package-only code (never part of a checkpoint's remote code).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The weight dtypes accepted by name on command lines and in configs (`checkpoint_io.DTYPES` maps them to torch).
DTYPE_NAMES = ("float32", "bfloat16", "float16")

CONVERT_DESCRIPTION = """\
Convert a released LLaDA-V checkpoint (GSAI-ML/LLaDA-V format) into the llada-v format.

Every official tensor goes through one key table (an unknown or missing key is an error); the folder gets
sharded safetensors, config.json, the released generation defaults, the image processor (the full processor
when a tokenizer is found or given), and the remote code. A fresh process loads it
with AutoModel/AutoProcessor and compares every tensor before the folder is renamed into place.
"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def lazy_command(module: str, function: str) -> Callable[[argparse.Namespace], Any]:
    """A subcommand function that imports `llada_v.<module>` only when the command runs."""

    def run(args: argparse.Namespace) -> Any:
        return getattr(importlib.import_module(f"llada_v.{module}"), function)(args)

    run.__qualname__ = f"{module}.{function}"
    return run


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


TRUE_WORDS = ("yes", "true", "1")
FALSE_WORDS = ("no", "false", "0")


def parse_bool(name: str, value: Any) -> bool:
    """A yes/no setting given as text or a value: yes/no, true/false, 1/0 (any case), a bool, or the integers 1
    and 0 (what `key=1` becomes in lmms-eval's model_args). Anything else is a `ValueError` naming the setting."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be one of yes/no, true/false, 1/0, got {value!r}")


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


def seed_int(text: str) -> int:
    """argparse type: a random seed torch accepts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
    return value


def dllm_cache_value(text: str) -> dict[str, Any]:
    """argparse type of `--dllm-cache [P,G,R]`: no value -> `{}` (the official 25/7/0.25), "P,G,R" -> the prompt
    interval, the answer interval and the transfer ratio (their ranges are checked by the generation config)."""
    if text == "":
        return {}
    parts = text.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        return {"prompt_interval_steps": int(parts[0]), "gen_interval_steps": int(parts[1]),
                "transfer_ratio": float(parts[2])}  # fmt: skip
    except ValueError:
        raise argparse.ArgumentTypeError(
            "takes PROMPT_INTERVAL,GEN_INTERVAL,TRANSFER_RATIO (two integers and a number, e.g. 25,7,0.25), "
            f"got {text!r}"
        ) from None


def tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's `disable` for a `--progress/--no-progress` value: None (neither flag) lets tqdm show the bar only
    when its stream is a terminal, so logs and pipes stay quiet."""
    return None if progress is None else not progress


# ---------------------------------------------------------------------------------------------- shared groups


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--processor`, `--adapter`, `--dtype`, `--load-in-4bit/8bit`, `--device`, `--attn-implementation`."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=None, metavar="PATH_OR_ID",
        help="converted llada-v checkpoint folder or Hub id (default: the embedded demo checkpoint)",
    )  # fmt: skip
    group.add_argument(
        "--processor", default=None, metavar="PATH_OR_ID", help="load the processor from here (default: --model)"
    )
    group.add_argument(
        "--adapter", default=None, metavar="DIR",
        help="a PEFT LoRA adapter folder (adapter_config.json) to apply to --model (needs peft)",
    )  # fmt: skip
    group.add_argument(
        "--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
        help="weights and compute dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )  # fmt: skip
    quant = group.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 weights for the language model")
    quant.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes int8 weights for the language model")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument(
        "--attn-implementation", default=None, metavar="NAME",
        help="eager, sdpa or flash_attention_2 (default: the transformers choice)",
    )  # fmt: skip


def add_generation_arguments(parser: argparse.ArgumentParser, stream: bool = True) -> None:
    """The sampler settings (validated by the generation config when the command runs) and `--stream`
    (`stream=False`: without it, for `web`)."""
    group = parser.add_argument_group("generation (default: the checkpoint's generation_config.json)")
    group.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="answer length (gen_length)")
    group.add_argument("--steps", type=int, default=None, metavar="N", help="denoising steps in total")
    group.add_argument("--block-length", type=int, default=None, metavar="N", help="semi-autoregressive block size")
    group.add_argument(
        "--temperature", type=float, default=None, metavar="T", help="0 = argmax; > 0 = Gumbel-max sampling"
    )
    group.add_argument(
        "--remasking", default=None, metavar="NAME", help="which predictions a step keeps: low_confidence or random"
    )
    group.add_argument("--cfg-scale", type=float, default=None, metavar="S", help="classifier-free guidance scale")
    group.add_argument(
        "--seed", type=seed_int, default=None, metavar="N", help="random seed (temperature > 0, random remasking)"
    )
    group.add_argument(
        "--fast", action="store_true",
        help="fast decoding preset: dual KV cache + confidence threshold 0.9 (approximate; docs/performance.md)",
    )  # fmt: skip
    group.add_argument(
        "--dllm-cache", nargs="?", const="", default=None, type=dllm_cache_value, metavar="P,G,R",
        help="dLLM-Cache, the official demo's acceleration: refresh the prompt every P passes, the answer every G, "
        "and the share R of the answer in between (default 25,7,0.25; approximate; docs/generation.md)",
    )  # fmt: skip
    group.add_argument(
        "--system-prompt", default=None, metavar="TEXT", help="replace LLaDA-V's default system prompt ('' drops it)"
    )
    if not stream:
        return
    parser.add_argument(
        "--stream",
        action="store_true",
        help="write the answer as its tokens become final (on a terminal with the current draft after it)",
    )


def add_debug_argument(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks on errors")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`--output-dir`, `--tokenizer-dir`, `--dtype`, `--max-shard-size`, `--overwrite`, `--progress/--no-progress`."""
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to create (must not exist)")
    parser.add_argument(
        "--tokenizer-dir", type=Path, default=None,
        help="released LLaDA tokenizer folder (default: the input folder if it has one); without a tokenizer only "
        "the image processor is written",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 200MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress bars (default: only when stderr is a terminal)",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- commands


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """`llada-v convert` / `python -m llada_v.conversion.official`."""
    parser.add_argument(
        "--input-dir", required=True, type=Path, help="folder with the official config.json + safetensors"
    )
    parser.add_argument(
        "--vision-config", type=Path, default=None, help="SigLIP vision config JSON (default: so400m-patch14-384)"
    )
    add_output_arguments(parser)
    parser.add_argument(
        "--push-to-hub", metavar="REPO", default=None, help="after converting, upload the folder to this Hub repo"
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def add_demo_arguments(demo: argparse.ArgumentParser, evaluation: argparse.ArgumentParser) -> None:
    """`llada-v demo` and `llada-v eval-demo`."""
    demo.add_argument("--image", type=Path, default=None, help="ask about this image instead of a rendered scene")
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="which rendered scene (default 0: the same scene every run; change it for others)",
    )
    demo.add_argument("--model", type=Path, default=None, help="demo checkpoint folder (default: the shipped one)")
    demo.add_argument("--save-gif", type=Path, default=None, help="write an animation of the denoising")
    demo.add_argument("--save-png", type=Path, default=None, help="write the denoising steps as one picture")
    demo.set_defaults(func=lazy_command("demo.app", "run_demo"))
    evaluation.add_argument("--seed", type=int, required=True, help="seed of the held-out set")
    evaluation.add_argument(
        "--n", type=positive_int, default=200, help="number of held-out one-word questions (default 200)"
    )
    evaluation.add_argument(
        "--n-descriptions", type=positive_int, default=200,
        help="number of held-out scenes to describe (default 200)",
    )  # fmt: skip
    evaluation.add_argument(
        "--model", type=Path, default=None, help="demo checkpoint folder (default: the shipped one)"
    )
    evaluation.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="a progress bar (default: only when stderr is a terminal)",
    )  # fmt: skip
    evaluation.set_defaults(func=lazy_command("demo.app", "run_eval"))


__all__ = [
    "CONVERT_DESCRIPTION",
    "DTYPE_NAMES",
    "Parser",
    "add_convert_arguments",
    "add_debug_argument",
    "add_demo_arguments",
    "add_generation_arguments",
    "add_model_arguments",
    "add_output_arguments",
    "lazy_command",
    "parse_bool",
    "positive_int",
    "seed_int",
    "tqdm_disable",
]
