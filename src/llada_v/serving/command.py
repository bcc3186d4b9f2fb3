"""The `llada-v serve` command: its arguments (`add_serve_arguments`, the hook `cli.py` calls) and its run.

Ray is imported only when the command runs, so `llada-v --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..arguments import add_model_arguments

EPILOG = """\
examples:
  llada-v serve                                   # the embedded demo model on http://127.0.0.1:8000/v1
  llada-v serve --model llada-v-hf --dtype bfloat16 --num-gpus-per-replica 1 --num-replicas 2
  llada-v serve --model llada-v-hf --load-in-4bit --num-gpus-per-replica 1 --min-replicas 1 --max-replicas 4
  serve run llada_v.serving.app:app_builder model=llada-v-hf   # the same application, through Ray's CLI

docs/serving.md has the API (curl and openai examples), clusters, GPUs and the limits.
"""


def add_serve_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` command to the `llada-v` subparsers (its function imports Ray only when it runs).

    The model group (`--model`, `--processor`, `--adapter`, `--dtype`, `--load-in-4bit/8bit`, `--device`,
    `--attn-implementation`) is the one every command shares (`arguments.add_model_arguments`).
    """
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible chat server on Ray Serve (batching, replicas, streaming)",
        description="Serve a llada-v checkpoint (default: the embedded demo) with an OpenAI-compatible API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    _add_serving_model_group(parser)
    _add_server_group(parser)
    _add_limits_group(parser)
    parser.set_defaults(func=_run)
    return parser


def _add_serving_model_group(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (serving)")
    group.add_argument("--fast", action="store_true", help="fast-decoding preset by default (requests may override)")
    group.add_argument(
        "--system-prompt", metavar="TEXT", help="default system prompt (demo: none; else the template's)"
    )
    group.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: --model)")


def _add_server_group(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server and replicas")
    group.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    group.add_argument("--api-key", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on /v1 routes (default: the LLADA_V_API_KEY "
                            "environment variable; unset: no key, fine on 127.0.0.1 only)")  # fmt: skip
    group.add_argument("--address", metavar="RAY_ADDRESS", help="join this Ray cluster ('auto': the running one)")
    group.add_argument("--num-replicas", type=int, metavar="N", help="fixed number of model replicas (default 1)")
    group.add_argument("--min-replicas", type=int, metavar="N", help="autoscaling lower bound")
    group.add_argument("--max-replicas", type=int, metavar="N", help="autoscaling upper bound")
    group.add_argument("--target-ongoing-requests", type=float, metavar="N",
                       help="autoscaling target per replica (default: --max-batch-size)")  # fmt: skip
    group.add_argument("--num-cpus-per-replica", type=float, default=1.0, metavar="N",
                       help="Ray CPUs per replica, also its torch threads on CPU (default 1)")  # fmt: skip
    group.add_argument("--num-gpus-per-replica", type=float, default=0.0, metavar="N",
                       help="Ray GPUs per replica (1: one replica per GPU)")  # fmt: skip
    group.add_argument("--web", action="store_true",
                       help="also serve the web page (llada-v web) at / (needs pip install 'llada-v[web]')")  # fmt: skip


def _add_limits_group(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batching and limits")
    group.add_argument("--scheduler", choices=("step", "call"), default="step",
                       help="step (default): requests join and leave the running batch at every denoising step; "
                            "call: batches of requests that arrived together run whole calls")  # fmt: skip
    group.add_argument("--max-batch-tokens", type=int, default=16384, metavar="N",
                       help="step scheduler: canvas tokens (prompt with image tokens + max_tokens) of the running "
                            "batch; a request waits while it would exceed them (default 16384)")  # fmt: skip
    group.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                       help="requests in the running batch (step) / rows per diffusion_generate call (call)")  # fmt: skip
    group.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="MS",
                       help="call scheduler: wait this long to fill a batch")  # fmt: skip
    group.add_argument("--max-queued-requests", type=int, default=64, metavar="N",
                       help="per replica beyond the running batch; more get 503 + Retry-After")  # fmt: skip
    group.add_argument("--max-request-bytes", type=int, default=20 * 2**20, metavar="N", help="larger bodies get 413")
    group.add_argument("--max-images-per-request", type=int, default=8, metavar="N")
    group.add_argument("--max-image-bytes", type=int, default=10 * 2**20, metavar="N",
                       help="per image: a data URL's decoded bytes, a download, a local file")  # fmt: skip
    group.add_argument("--image-fetch-timeout-s", type=float, default=10.0, metavar="S",
                       help="a request's http(s) image downloads, in all (default 10)")  # fmt: skip
    group.add_argument("--no-remote-images", dest="remote_images", action="store_false",
                       help="refuse http(s) image URLs")  # fmt: skip
    group.add_argument("--allowed-local-media-path", metavar="DIR",
                       help="allow file:// image URLs under this folder (default: none)")  # fmt: skip
    group.add_argument("--max-tokens-limit", type=int, default=1024, metavar="N", help="largest max_tokens accepted")
    group.add_argument("--max-prompt-chars", type=int, default=256 * 1024, metavar="N",
                       help="characters of all message texts together, refused before tokenising (the token "
                            "count is then checked against the model's context)")  # fmt: skip
    group.add_argument("--max-request-pixels", type=int, default=50_000_000, metavar="N",
                       help="pixels one request's images may cost (from their headers; more gets 400)")  # fmt: skip
    group.add_argument("--max-queued-pixels", type=int, default=100_000_000, metavar="N",
                       help="the same, over all requests a replica holds (more gets 503 + Retry-After)")  # fmt: skip


def options_from_args(args: argparse.Namespace) -> Any:
    """`ServeOptions` from parsed `llada-v serve` arguments."""
    from .options import ServeOptions

    names = {f.name for f in dataclasses.fields(ServeOptions)}
    values = {name: value for name, value in vars(args).items() if name in names}
    values["quantization"] = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None
    return ServeOptions(**values)


def _run(args: argparse.Namespace) -> int:
    from ..inference import InputError

    options = options_from_args(args)
    if options.web:
        from ..web.command import check_gradio

        check_gradio("llada-v serve --web")
    try:
        from .app import run_server
    except ImportError as err:
        raise InputError(f"llada-v serve needs Ray Serve: pip install 'llada-v[serve]' ({err})") from None
    return run_server(options)
