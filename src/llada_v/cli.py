"""The `llada-v` command line: one entry point with subcommands.

Subcommands available now: `convert` (official checkpoint -> llada-v format) and `demo` (reports that the
embedded demo model has not landed yet). `generate` and `chat` arrive with the sampler and deployment
issues.
"""

from __future__ import annotations

import argparse
import sys

from . import convert_official


def _demo(args: argparse.Namespace) -> int:
    print(
        "llada-v demo: not yet available. The embedded demo model (a tiny LLaDA-V trained in this repository) "
        "lands with the training/demo issue; until then there is nothing real to run.",
        file=sys.stderr,
    )
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada-v", description="LLaDA-V for Hugging Face Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = sub.add_parser(
        "convert",
        help="convert a released LLaDA-V checkpoint (GSAI-ML/LLaDA-V format) to the llada-v format",
        description=convert_official.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert_official.build_arg_parser(convert)
    convert.set_defaults(func=convert_official.run_from_args)
    demo = sub.add_parser("demo", help="run the demo on the embedded default model (not yet available)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
