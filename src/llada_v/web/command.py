"""The `llada-v web` command's arguments (standard library only: `llada-v --help` never imports Gradio)."""

from __future__ import annotations

import argparse
from typing import Any

from ..arguments import Parser, add_generation_arguments, add_model_arguments, lazy_command

EPILOG = """\
examples:
  llada-v web                                   # the embedded demo model on http://127.0.0.1:7860
  llada-v web --model llada-v-hf --dtype bfloat16 --port 8080
  llada-v web --model llada-v-hf --load-in-4bit --fast --max-new-tokens 64 --share

The generation flags set the page's starting settings (the page can change them per question).
docs/web.md has the page, the Space file and `llada-v serve --web`.
"""


def add_web_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `web` command to the `llada-v` subparsers: the model group `generate` uses, the sampler settings
    (the page's starting values) and the server's address."""
    parser = subparsers.add_parser(
        "web",
        help="a web page (Gradio): image chat and the denoising shown live",
        description="Chat about images in the browser and watch every denoising step (Gradio).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    add_generation_arguments(parser, stream=False)
    group = parser.add_argument_group("web server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    group.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    group.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.set_defaults(func=_run)
    return parser


def parse_web_args(argv: list[str]) -> argparse.Namespace:
    """`llada-v web ARGV` parsed (for the Space file, which has no command line of its own)."""
    parser = Parser(prog="llada-v")
    add_web_arguments(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["web", *argv])


def check_gradio(what: str) -> None:
    """`InputError` saying how to install the `web` extra when Gradio is missing."""
    import importlib.util

    from ..inference import InputError

    if importlib.util.find_spec("gradio") is None:
        raise InputError(f"{what} needs Gradio: pip install 'llada-v[web]'")


def _run(args: argparse.Namespace) -> int:
    check_gradio("llada-v web")
    return lazy_command("web.app", "run_web")(args)
