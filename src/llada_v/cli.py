"""The `llada-v` command line: one entry point with subcommands.

- `generate`: answer one prompt about zero or more images, optionally streaming the answer as it is
  decoded (`--stream`);
- `chat`: a multi-turn conversation read from stdin (`/image PATH` attaches an image to the next turn, `/reset`,
  `/quit`);
- `convert`: official checkpoint -> llada-v format, optional Hub upload;
- `demo` / `eval-demo`: the embedded demo model;
- `serve`: an OpenAI-compatible server on Ray Serve (`serving/`; Ray is imported only when it runs);
- `web`: the Gradio page, chat and the denoising live (`web/`; Gradio is imported only when it runs).

Bad input (a path that does not exist, a checkpoint of another kind, missing files, an unreadable image,
bitsandbytes missing, conflicting flags, an invalid generation setting) is reported as one line on stderr with
exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, TextIO

from .arguments import (
    CONVERT_DESCRIPTION,
    Parser,
    add_convert_arguments,
    add_debug_argument,
    add_demo_arguments,
    add_generation_arguments,
    add_model_arguments,
    lazy_command,
)
from .serving.command import add_serve_arguments
from .web.command import add_web_arguments

EPILOG_GENERATE = """\
examples:
  llada-v generate --model llada-v-hf --image cat.jpg --prompt "What is in the picture?"
  llada-v generate --model llada-v-hf --image a.png --image b.png --prompt "What differs?" --stream
  llada-v generate --model you/llada-v-hf --load-in-4bit --fast --image cat.jpg --prompt "Describe it."
  llada-v generate --model llada-v-hf --video frames/ --prompt "What happens in the video?"

Without --model the embedded demo checkpoint is used. When only --max-new-tokens is given, the checkpoint's
steps and block length are kept if they fit the new length; otherwise they become --max-new-tokens (one block,
one token per step, the released demo schedule).
"""

EPILOG_CHAT = """\
commands (one per line on stdin):
  /image PATH   attach an image to the next message (repeat for several)
  /reset        forget the conversation and pending images
  /quit         leave (end of input does too)

example:
  printf '/image cat.jpg\\nWhat animal is this?\\nWhat colour is it?\\n' | llada-v chat --model llada-v-hf
"""


def build_parser() -> argparse.ArgumentParser:
    """The `llada-v` parser (standard library only: `--help` and argument errors never import torch)."""
    parser = Parser(
        prog="llada-v",
        description="LLaDA-V (a masked-diffusion multimodal LLM) for Hugging Face Transformers.",
        epilog="run `llada-v COMMAND --help` for the options of a command",
    )
    add_debug_argument(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = sub.add_parser(
        "generate",
        help="answer a prompt about images (optionally streaming the answer)",
        description="Answer one prompt about zero or more images with diffusion_generate.",
        epilog=EPILOG_GENERATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument(
        "--image", action="append", default=[], metavar="PATH",
        help="an image for the prompt (repeat for several; they go before the text)",
    )  # fmt: skip
    generate.add_argument(
        "--video", metavar="PATH",
        help="a video for the prompt: a folder of frame images (sorted by name) or a multi-frame image such as an "
             "animated GIF; the processor keeps at most the model's max_frames, spread evenly",
    )  # fmt: skip
    generate.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction")
    generate.add_argument("--stop", action="append", metavar="S",
                          help="end the answer before the first occurrence of S (repeat for several)")  # fmt: skip
    add_model_arguments(generate)
    add_generation_arguments(generate)
    add_debug_argument(generate, argparse.SUPPRESS)
    generate.set_defaults(func=run_generate)

    chat = sub.add_parser(
        "chat",
        help="multi-turn chat on stdin, images attached per turn with /image PATH",
        description="A multi-turn conversation: one message per line on stdin.",
        epilog=EPILOG_CHAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(chat)
    add_generation_arguments(chat)
    add_debug_argument(chat, argparse.SUPPRESS)
    chat.set_defaults(func=run_chat)

    convert = sub.add_parser(
        "convert",
        help="convert a released LLaDA-V checkpoint (GSAI-ML/LLaDA-V format) to the llada-v format",
        description=CONVERT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_convert_arguments(convert)
    convert.set_defaults(func=lazy_command("conversion.official", "run_from_args"))
    demo = sub.add_parser(
        "demo", help="ask the embedded demo model about a scene and watch the answer emerge from masks"
    )
    evaluation = sub.add_parser("eval-demo", help="held-out accuracy of the embedded demo model")
    add_demo_arguments(demo, evaluation)
    add_serve_arguments(sub)
    add_web_arguments(sub)
    for command in sub.choices.values():  # `llada-v COMMAND ... --debug` as well as `llada-v --debug COMMAND`
        if "--debug" not in command._option_string_actions:
            add_debug_argument(command, argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------- helpers


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Model, processor and generation settings (`inference.load_from_args`, imported when a command runs)."""
    from .inference import load_from_args

    return load_from_args(args)


class StreamPrinter:
    """The `--stream` output: a streamer for `model.generate` (put / put_draft / end, as transformers' streamers).

    The answer's text is written as its tokens become final (`put`; the first `put` is the prompt and is
    skipped). On a terminal the draft (the current predictions ahead of it) is drawn dim after it and replaced at
    every step; elsewhere only the final text is written, so a pipe receives exactly the answer line that
    `generate` prints without `--stream`. `prefix` is written before the answer (`assistant> ` in `chat`).
    """

    def __init__(self, tokenizer: Any, out: TextIO | None = None, prefix: str = "", stop_strings: Any = None) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings  # text from the first one on is never written
        self.out = out if out is not None else sys.stdout
        self.prefix = prefix
        self.in_place = bool(getattr(self.out, "isatty", lambda: False)())
        self.ids: list[int] = []
        self.printed = ""  # answer text written so far
        self.started = False  # the prompt was received (and the prefix written)
        self._draft_shown = False

    def _text(self, ids: list[int], final: bool = False) -> str:
        # Decoded as a whole, then cut: tokens decoded one by one lose the spaces between words.
        from .inference import cut_at_stop_strings, stop_string_prefix_length

        decoded = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        text, found = cut_at_stop_strings(decoded, self.stop_strings)
        if found is None and not final:  # the end may be the start of a stop string: it waits
            text = text[: len(text) - stop_string_prefix_length(text, self.stop_strings)]
        return text

    def _write(self, text: str) -> None:
        """Write what `text` adds to what is already written (held back while it ends in a partial character
        or differs from it: only text that stays is written)."""
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed) :])
            self.printed = text
        self.out.flush()

    def _clear_draft(self) -> None:
        if self._draft_shown:
            self.out.write("\x1b8\x1b[J")  # back to the saved cursor, erase the draft
            self._draft_shown = False

    def put(self, value: Any) -> None:
        if not self.started:
            self.started = True
            self.out.write(self.prefix)
            return
        self._clear_draft()
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._write(self._text(self.ids).rstrip())  # trailing spaces wait: the final answer is stripped

    def put_draft(self, value: Any) -> None:
        if not self.in_place:
            return
        self._clear_draft()
        text = self._text(self.ids + [int(i) for i in value.reshape(-1).tolist()])
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(f"\x1b7\x1b[2m{text[len(self.printed) :]}\x1b[0m")  # save cursor, dim draft
            self._draft_shown = True
        self.out.flush()

    def end(self) -> None:
        self._clear_draft()
        if not self.started:
            self.out.write(self.prefix)
        self._write(self._text(self.ids, final=True).strip())
        self.out.write("\n")
        self.out.flush()


def read_video(path: str) -> list:
    """The frames of `--video PATH`: a folder of frame images (sorted by name) or a multi-frame image file
    (animated GIF, APNG, WebP, TIFF; a still image is a one-frame video). Every frame is decoded here, before
    the model loads, so a bad file fails fast; `InputError` naming the path otherwise."""
    from pathlib import Path

    from PIL import Image, ImageSequence

    from .inference import InputError, read_image

    video = Path(path).expanduser()
    if not video.exists():
        raise InputError(f"no such video: {video}")
    if video.is_dir():
        files = sorted(f for f in video.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise InputError(f"the video folder {video} holds no frame files")
        return [read_image(f) for f in files]
    try:
        with Image.open(video) as image:
            frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise InputError(
            f"could not read video {video}: {err} (give a folder of frames or a multi-frame image such as an "
            "animated GIF; decode video files to frames first)"
        ) from err
    return frames


def _answer(
    model: Any,
    processor: Any,
    config: Any,
    text: str,
    images: list,
    args: argparse.Namespace,
    prefix: str = "",
    videos: list | None = None,
) -> str:
    """The answer to one prompt; with `--stream` it is also written (after `prefix`) as it is generated."""
    from .inference import generate_texts

    printer = StreamPrinter(processor.tokenizer, prefix=prefix, stop_strings=config.stop_strings)
    extra = {"streamer": printer} if args.stream else {}
    if videos is not None:
        extra["videos"] = [videos]
    answers, _ = generate_texts(model, processor, [text], [images], config, seed=args.seed, **extra)
    return answers[0]


# ---------------------------------------------------------------------------------------------- commands


def run_generate(args: argparse.Namespace) -> int:
    from .inference import InputError, chat_prompt, read_image, user_message

    if args.video is not None and args.image:
        raise InputError(
            f"--image and --video cannot be combined (got --image {' '.join(args.image)} and --video "
            f"{args.video}): ask about one video or about images"
        )
    images = [read_image(path) for path in args.image]  # before loading the model: fail fast
    frames = read_video(args.video) if args.video is not None else None
    model, processor, config = _load(args)
    message = user_message(args.prompt, len(images))
    if frames is not None:
        message["content"].insert(0, {"type": "video"})
    text = chat_prompt(processor, [message], args.system_prompt)
    try:
        answer = _answer(model, processor, config, text, images, args, videos=None if frames is None else [frames])
    except ValueError as err:  # the sampler refuses this prompt with these settings (e.g. too long)
        raise InputError(str(err)) from None
    if not args.stream:  # streamed: already written
        print(answer)
    return 0


def _read_line() -> str | None:
    """The next stdin line, stripped; None at the end of input (or when stdin is closed); "" for a line that
    is not UTF-8 (reported, the session goes on)."""
    stream = getattr(sys.stdin, "buffer", None)
    try:
        raw = stream.readline() if stream is not None else sys.stdin.readline()
    except ValueError:  # I/O on a closed stdin
        return None
    if not raw:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            print(f"error: the line is not valid UTF-8 ({err.reason} at byte {err.start}); it was skipped",
                  file=sys.stderr)  # fmt: skip
            return ""
    return raw.strip()


class _Chat:
    """The state of `llada-v chat`: the conversation, its images, and the images attached to the next message."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.images: list = []  # every image of the conversation, in order
        self.pending: list = []  # attached to the next user message

    def command(self, line: str) -> bool:
        """Run a `/command`; returns False for `/quit`."""
        from .inference import InputError, read_image

        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            self.__init__()
            print("(conversation reset)")
        elif command == "/image" and rest.strip():
            try:
                self.pending.append(read_image(rest.strip()))
                print(f"(image attached to the next message: {rest.strip()})")
            except InputError as err:
                print(f"error: {err}", file=sys.stderr)
        elif command == "/image":
            print("error: /image needs a path", file=sys.stderr)
        elif command == "/help":
            print(EPILOG_CHAT.split("\n\n")[0])
        else:
            print(f"error: unknown command {command} (/image PATH, /reset, /quit)", file=sys.stderr)
        return True

    def say(self, line: str, model: Any, processor: Any, config: Any, args: argparse.Namespace) -> None:
        from .inference import chat_prompt, user_message

        placeholders = [token for token in (processor.image_token, processor.video_token) if token in line]
        if placeholders:
            print(f"error: a message cannot contain {' or '.join(placeholders)}: it is the placeholder the processor "
                  "fills with an image; attach images with /image PATH", file=sys.stderr)  # fmt: skip
            return
        turn = [*self.messages, user_message(line, len(self.pending))]
        text = chat_prompt(processor, turn, args.system_prompt)
        try:
            answer = _answer(model, processor, config, text, [*self.images, *self.pending], args, "assistant> ")
        except ValueError as err:  # e.g. the conversation no longer fits the context: the turn is dropped
            print(f"error: {err} (the message was not added; /reset starts over)", file=sys.stderr)
            return
        self.messages = [*turn, {"role": "assistant", "content": answer}]
        self.images, self.pending = [*self.images, *self.pending], []
        if not args.stream:  # streamed: already written
            print(f"assistant> {answer}", flush=True)


def run_chat(args: argparse.Namespace) -> int:
    model, processor, config = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("llada-v chat: type a message; /image PATH attaches an image to the next one, /reset, /quit")
    chat = _Chat()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = _read_line()
        if line is None:
            break
        if line.startswith("/"):
            if not chat.command(line):
                break
        elif line:
            chat.say(line, model, processor, config, args)
    return 0


# ---------------------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    if not debug and not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no weight-loading bars in logs and pipes
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # nor in the processes it starts (serve's replicas)
    started = time.time()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI reports every failure as one line unless --debug
        if debug:
            raise
        from .inference import InputError

        if isinstance(err, (InputError, FileNotFoundError)):
            print(f"llada-v {args.command}: error: {err}", file=sys.stderr)
            return 2
        first_line = (str(err).strip().splitlines() or [""])[0]
        print(
            f"llada-v {args.command}: error: {type(err).__name__}: {first_line} "
            f"(after {time.time() - started:.1f} s; rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
