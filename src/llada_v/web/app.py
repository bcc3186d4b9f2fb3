"""The web page: chat about images beside the answer canvas, redrawn at every denoising step (docs/web.md).

`build_blocks(engine, ...)` is the Gradio Blocks page; an engine answers one `GenerationJob` and feeds its sink
the sampler's per-step canvases (`serving.batching.StreamingCallback`, the library's step callback: no second
sampler). Two engines:

- `LocalEngine`: the model in this process (`llada-v web`, a Space), one generating thread;
- `ReplicaEngine`: a `llada-v serve --web` replica, whose `@serve.batch` queue the page's questions share with
  the OpenAI API's requests (`serving/http_app.py` mounts the page at `/`).

Sampler settings are validated by `LladaVGenerationConfig` (through `inference.generation_config_for`); an
invalid combination is shown as its one-line message. The finished run can be replayed with a delay and
downloaded as the animation `llada-v demo --save-gif` draws (`demo.app.denoising_frames`).

Package-only code (never part of a checkpoint's remote code).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import os
import shlex
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from ..demo.app import Answer, denoising_frames
from ..demo.tasks import SHIPPED_TASK, get_task
from ..inference import InputError, chat_prompt, generation_config_for, load_from_args, read_image, user_message
from ..serving.batching import GenerationJob, JobResult, next_event, run_batch
from .command import parse_web_args

# The ids a test (or a user script) drives the page by.
ELEMENT_IDS = ("image", "question", "send", "chat", "canvas", "settings", "max_new_tokens", "steps", "block_length",
               "preset")  # fmt: skip
PRESETS = ("exact", "fast")
REMASKING = ("low_confidence", "random")
EXAMPLE_SEEDS = (0, 1, 2, 3)  # demo scenes offered as examples (the shipped task's `make_sample`)
# The live canvas is redrawn at most this often: a small model takes milliseconds per step, faster than a
# browser draws; the generation itself never waits for the page.
LIVE_FRAME_SECONDS = 0.05
GIF_FRAME_MS = 600  # as `llada-v demo --save-gif`

# Inline styles (the classes name the state for scripts and tests): a mask, a token committed in this step, one
# committed earlier, and positions after the stop (never filled: the sampler stops there).
STYLES = {
    "mask": "background:#e0e0e0;color:#9e9e9e",
    "new": "background:#ffca28;color:#000;font-weight:bold;outline:2px solid #ff8f00",
    "old": "background:#c8e6c9;color:#1b5e20",
}
TOKEN_STYLE = "display:inline-block;margin:2px;padding:2px 6px;border-radius:4px;font-family:monospace;min-width:1.5em"


# ---------------------------------------------------------------------------------------------- engines


class LocalEngine:
    """The model in this process: jobs run one at a time on one generating thread (`serving.batching.run_batch`,
    the path a serving replica uses)."""

    concurrency_limit: int | None = 1

    def __init__(self, model: Any, processor: Any, system_prompt: str | None) -> None:
        self.model, self.processor, self.system_prompt = model, processor, system_prompt
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llada-v-web")

    @property
    def base_config(self) -> Any:
        return self.model.generation_config

    def _run(self, job: GenerationJob) -> JobResult:
        with torch.inference_mode():
            return run_batch(self.model, self.processor, [job])[0]

    async def submit(self, job: GenerationJob) -> JobResult:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, job)


class ReplicaEngine:
    """A `llada-v serve --web` replica (`serving.app.LladaVServer`): a question is admitted like an API request
    (the replica's capacity) and joins the replica's `@serve.batch` queue, so it is batched with the API's."""

    concurrency_limit: int | None = None  # the replica's admission and batching decide

    def __init__(self, server: Any) -> None:
        self.server = server
        self.model, self.processor = server.service.model, server.service.processor
        self.system_prompt = server.service.options.default_system_prompt

    @property
    def base_config(self) -> Any:
        return self.model.generation_config

    async def submit(self, job: GenerationJob) -> JobResult:
        try:
            slot = self.server.admission.enter(self.server.service.retry_after_seconds(self.server.admission.active))
        except Exception as err:  # noqa: BLE001 - the replica is full (ApiError 503): said on the page
            return JobResult(error=RuntimeError(getattr(err, "message", str(err))))
        try:
            return await self.server.submit(job)
        finally:
            slot.release()


# ---------------------------------------------------------------------------------------------- drawing


def canvas_html(canvas: dict | None, previous: dict | None = None, done: bool = False) -> str:
    """The answer canvas as HTML: one span per position, class `mask`, `new` (committed in this step) or `old`
    (committed earlier), plus `after-stop` past the stop. `canvas` is a `StreamingCallback.canvas` dict."""
    if canvas is None:
        return '<div class="llada-canvas" data-step="none"><em>The answer canvas appears here, step by step.</em></div>'
    before = previous["ids"] if previous is not None else [None] * len(canvas["ids"])
    stop = canvas.get("stop")
    spans = []
    for position, (token_id, text) in enumerate(zip(canvas["ids"], canvas["tokens"])):
        kind = "mask" if token_id is None else "new" if before[position] is None else "old"
        label = "▒" if token_id is None else (text.strip() or "␣")
        after = " after-stop" if stop is not None and position > stop else ""
        style = TOKEN_STYLE + ";" + STYLES[kind] + (";opacity:0.35" if after else "")
        spans.append(f'<span class="tok {kind}{after}" style="{style}">{html.escape(label)}</span>')
    state = "done" if done else "running"
    header = f"step {canvas['step'] + 1} · block {canvas['block'] + 1}" + (" · done" if done else "")
    return (
        f'<div class="llada-canvas" data-step="{canvas["step"]}" data-state="{state}">'
        f'<div style="font-size:0.85em;color:#666">{header}</div><div>{"".join(spans)}</div></div>'
    )


def error_html(message: str) -> str:
    if not message:
        return ""
    return f'<div class="llada-error" style="color:#b71c1c;font-weight:bold">{html.escape(message)}</div>'


def legend_html() -> str:
    items = [("mask", "▒ masked"), ("new", "committed in this step"), ("old", "committed earlier")]
    return " ".join(f'<span style="{TOKEN_STYLE};{STYLES[kind]}">{label}</span>' for kind, label in items)


def write_gif(frames: list[dict], image: Image.Image | None, question: str, answer: str, folder: Path) -> str:
    """The run as `llada-v demo --save-gif` draws it (written to a temporary name, then renamed)."""
    tokens = [["_" if i is None else t.strip() or "␣" for i, t in zip(f["ids"], f["tokens"])] for f in frames]
    thumb = image if image is not None else Image.new("RGB", (160, 100), (128, 128, 128))
    pictures = denoising_frames(thumb, Answer(question, answer, tokens))
    target = folder / f"denoising-{uuid.uuid4().hex[:8]}.gif"
    partial = target.with_suffix(".gif.part")
    pictures[0].save(partial, format="GIF", save_all=True, append_images=pictures[1:], duration=GIF_FRAME_MS, loop=0)
    partial.rename(target)
    return str(target)


def one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ---------------------------------------------------------------------------------------------- the page


def example_files(folder: Path) -> list[list[Any]]:
    """Demo scenes rendered to PNG files, each with its first question: `[[files], question]` rows."""
    rows = []
    for seed in EXAMPLE_SEEDS:
        sample = get_task(SHIPPED_TASK).make_sample(seed)
        path = folder / f"scene-{seed}.png"
        if not path.is_file():
            sample["image"].save(path)
        rows.append([[str(path)], sample["qa"][0][0]])
    return rows


# What a question updates, in this order (`Handlers._out`): chat, canvas, error, question, image, state, run, gif.
OUTPUTS = ("chat", "canvas", "error", "question", "image", "state", "run", "gif")


class Handlers:
    """The page's event handlers for `engine`: a question (streamed: one canvas per denoising step, then the
    answer), the replay and clear. Files (the GIFs) go to `workdir`."""

    def __init__(self, engine: Any, workdir: Path) -> None:
        self.engine, self.processor, self.workdir = engine, engine.processor, workdir

    @staticmethod
    def _out(**values: Any) -> tuple:
        """A value per output of `OUTPUTS`; those not given stay as they are."""
        return tuple(values[name] if name in values else gr.skip() for name in OUTPUTS)

    def settings(self, max_new_tokens, steps, block_length, preset, temperature, cfg_scale, remasking) -> Any:
        """The page's settings as a validated `LladaVGenerationConfig` (`InputError`: the one-line reason)."""
        overrides = {"max_new_tokens": max_new_tokens, "steps": steps, "block_length": block_length,
                     "temperature": temperature, "cfg_scale": cfg_scale, "remasking": remasking}  # fmt: skip
        return generation_config_for(self.engine.base_config, overrides, fast=preset == "fast")

    def _check_question(self, question: str) -> None:
        if not question:
            raise InputError("type a question first")
        placeholders = [t for t in (self.processor.image_token, self.processor.video_token) if t and t in question]
        if placeholders:
            raise InputError(f"a question cannot contain {' or '.join(placeholders)}: attach images instead")

    async def respond(self, files, question, chat, conversation, max_new_tokens, steps, block_length, preset,
                      temperature, seed, cfg_scale, remasking):  # fmt: skip
        question, paths = (question or "").strip(), [getattr(f, "name", f) for f in files or []]
        try:
            self._check_question(question)
            config = self.settings(max_new_tokens, steps, block_length, preset, temperature, cfg_scale, remasking)
            new_images = [read_image(path) for path in paths]
        except InputError as err:
            yield self._out(error=error_html(one_line(err)))
            return
        messages = [*conversation["messages"], user_message(question, len(new_images))]
        images = [*conversation["images"], *new_images]
        job = GenerationJob(text=chat_prompt(self.processor, messages, self.engine.system_prompt), images=images,
                            config=config, seed=None if seed is None else int(seed), stream_canvas=True)  # fmt: skip
        frames: list[dict] = []
        results: list[JobResult] = []
        yield self._out(error="", canvas=canvas_html(None))
        async for frame in self._denoise(job, frames, results):
            yield self._out(canvas=frame)
        result = results[0]
        if result.error is not None:
            yield self._out(error=error_html(one_line(result.error)))
            return
        turn = [{"role": "user", "content": {"path": path}} for path in paths]
        turn += [{"role": "user", "content": question}, {"role": "assistant", "content": result.text}]
        conversation = {"messages": [*messages, {"role": "assistant", "content": result.text}], "images": images}
        gif_path = final = None
        if frames:
            picture = new_images[0] if new_images else (images[-1] if images else None)
            gif_path = write_gif(frames, picture, question, result.text, self.workdir)
            final = canvas_html(frames[-1], frames[-2] if len(frames) > 1 else None, done=True)
        yield self._out(chat=[*chat, *turn], canvas=final or "", question="", image=None, state=conversation,
                        run=frames, gif=gif_path)  # fmt: skip

    async def _denoise(self, job: GenerationJob, frames: list[dict], results: list[JobResult]):
        """Submit `job`; yield the canvas HTML after every step (at most every `LIVE_FRAME_SECONDS`), keeping the
        canvases in `frames`; the `JobResult` is appended to `results`."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.sink = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        task = asyncio.ensure_future(self.engine.submit(job))
        shown = 0.0
        while (event := await next_event(events, task)) is not None:
            if event.kind != "canvas":
                continue
            frames.append(event.canvas)
            wait = LIVE_FRAME_SECONDS - (time.monotonic() - shown)
            if wait > 0:
                await asyncio.sleep(wait)
            yield canvas_html(event.canvas, frames[-2] if len(frames) > 1 else None)
            shown = time.monotonic()
        results.append(await task)

    async def replay(self, frames, delay):
        if not frames:
            yield gr.skip(), error_html("nothing to replay yet: ask a question first")
            return
        for index, frame in enumerate(frames):
            yield canvas_html(frame, frames[index - 1] if index else None, done=index == len(frames) - 1), ""
            await asyncio.sleep(float(delay))

    def clear(self) -> tuple:
        return self._out(chat=[], canvas=canvas_html(None), error="", question="", image=None,
                         state=_empty_conversation(), run=[], gif=None)  # fmt: skip


def _settings_panel(initial: Any, preset: str, seed: int | None) -> list:
    """The settings components (closed accordion `settings`), in `Handlers.settings` order with the seed."""
    with gr.Accordion("Settings", open=False, elem_id="settings"):
        number = {"precision": 0}
        max_new_tokens = gr.Number(initial.max_new_tokens, label="max new tokens", elem_id="max_new_tokens", **number)
        steps = gr.Number(initial.steps, label="steps", elem_id="steps", **number)
        block_length = gr.Number(initial.block_length, label="block length", elem_id="block_length", **number)
        preset_radio = gr.Radio(list(PRESETS), value=preset, label="decoding", elem_id="preset",
                                info="fast: dual KV cache + confidence threshold (approximate)")  # fmt: skip
        temperature = gr.Number(initial.temperature, label="temperature (0 = argmax)", elem_id="temperature")
        seed_box = gr.Number(seed, label="seed (temperature > 0 or random remasking)", elem_id="seed", **number)
        cfg_scale = gr.Number(initial.cfg_scale, label="CFG scale", elem_id="cfg_scale")
        remasking = gr.Dropdown(list(REMASKING), value=initial.remasking, label="remasking", elem_id="remasking")
    return [max_new_tokens, steps, block_length, preset_radio, temperature, seed_box, cfg_scale, remasking]


def build_blocks(engine: Any, initial: Any | None = None, preset: str = "exact", seed: int | None = None,
                 title: str = "LLaDA-V") -> gr.Blocks:  # fmt: skip
    """The page for `engine`; `initial` (a `LladaVGenerationConfig`, default the model's) gives the settings'
    starting values, `preset` ("exact" or "fast") and `seed` theirs."""
    workdir = Path(tempfile.mkdtemp(prefix="llada-v-web-"))
    handlers = Handlers(engine, workdir)
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {title}: chat about images, watch the answer denoise")
        state, run = gr.State(_empty_conversation()), gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="Images (one or more)", file_count="multiple", file_types=["image"],
                                elem_id="image")  # fmt: skip
                question = gr.Textbox(label="Question", placeholder="What color is the circle?", elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
                error = gr.HTML("", elem_id="error")
                settings = _settings_panel(initial if initial is not None else engine.base_config, preset, seed)
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Chat", elem_id="chat", height=320)
                gr.HTML(legend_html())
                canvas = gr.HTML(canvas_html(None), elem_id="canvas")
                with gr.Row():
                    delay = gr.Slider(0.0, 2.0, value=0.4, step=0.05, label="replay delay (s per step)",
                                      elem_id="delay")  # fmt: skip
                    replay = gr.Button("Replay", elem_id="replay")
                gif = gr.File(label="Denoising animation (GIF)", elem_id="gif", interactive=False)
        gr.Examples(example_files(workdir), inputs=[image, question], label="Demo scenes")

        # Handlers.respond's arguments: the settings come in `Handlers.settings` order, the seed at its place.
        max_new_tokens, steps, block_length, preset_radio, temperature, seed_box, cfg_scale, remasking = settings
        inputs = [image, question, chat, state, max_new_tokens, steps, block_length, preset_radio, temperature,
                  seed_box, cfg_scale, remasking]  # fmt: skip
        outputs = [chat, canvas, error, question, image, state, run, gif]  # OUTPUTS
        for trigger in (send.click, question.submit):
            trigger(handlers.respond, inputs, outputs, concurrency_limit=engine.concurrency_limit,
                    show_progress="hidden")  # fmt: skip
        replay.click(handlers.replay, [run, delay], [canvas, error], show_progress="hidden")
        clear.click(handlers.clear, None, outputs)
    return blocks


def _empty_conversation() -> dict:
    return {"messages": [], "images": []}


# ---------------------------------------------------------------------------------------------- entry points


def mount_replica_page(app: Any, server: Any) -> None:
    """Mount the page at `/` of a serving replica's Starlette app (after its routes, which keep priority)."""
    blocks = build_blocks(ReplicaEngine(server), title=f"LLaDA-V ({server.service.options.model_id})")
    blocks.queue(default_concurrency_limit=None)
    gr.mount_gradio_app(app, blocks, path="/", ssr_mode=False, footer_links=[], show_error=False)


def local_app(args: argparse.Namespace) -> tuple[gr.Blocks, dict[str, Any]]:
    """The page on the model `args` name (the `generate` loading flags), and `launch` keyword arguments."""
    model, processor, config = load_from_args(args)  # as `llada-v generate` loads: checks, adapter, quantisation
    # The demo was trained without a system prompt (as `llada-v serve` treats it); other models get the template's.
    system_prompt = args.system_prompt if args.system_prompt is not None else ("" if args.model is None else None)
    engine = LocalEngine(model, processor, system_prompt)
    blocks = build_blocks(engine, config, preset="fast" if args.fast else "exact", seed=args.seed)
    return blocks, {"ssr_mode": False, "footer_links": [], "show_error": False}


def run_web(args: argparse.Namespace) -> int:
    """`llada-v web`: the page on `--host`:`--port` until Ctrl-C."""
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    blocks, launch = local_app(args)
    print(f"llada-v web: http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    blocks.queue().launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True, **launch)
    return 0


def space_app(argv: list[str] | None = None) -> gr.Blocks:
    """The page for a Hugging Face Space (`examples/space/app.py`): `llada-v web` arguments from `argv`, else from
    the variable `LLADA_V_WEB_ARGS` (e.g. "--model you/llada-v-hf --load-in-4bit"; default: the embedded demo).
    `--host`/`--port`/`--share` are ignored there: the Space's `launch` decides."""
    if argv is None:
        argv = shlex.split(os.environ.get("LLADA_V_WEB_ARGS", ""))
    blocks, _ = local_app(parse_web_args(argv))
    return blocks.queue()
