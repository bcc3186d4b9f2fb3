"""The web page's parts without a browser: the canvas drawing (mask / committed in this step / committed earlier),
the settings checked by the generation config, a question answered through the page's handler equal to
`diffusion_generate`, the GIF; and, where Gradio is not installed, the one-line install hint of `llada-v web` and
`llada-v serve --web`. The browser tests are in tests/test_web.py."""

import asyncio
import importlib.util
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from llada_v.demo.scenes import make_sample
from llada_v.inference import InputError, generation_config_for

from paths import llada_v_command

HAS_GRADIO = importlib.util.find_spec("gradio") is not None


@pytest.mark.skipif(HAS_GRADIO, reason="Gradio is installed: the page starts instead (tests/test_web.py)")
@pytest.mark.parametrize("command", [["web"], ["serve", "--web"]])
def test_without_gradio_the_commands_say_how_to_install_it(command):
    result = subprocess.run([*llada_v_command(), *command, "--port", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith("needs Gradio: pip install 'llada-v[web]'"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def web():
    pytest.importorskip("gradio", reason="the web page needs Gradio: pip install -e '.[web]'")
    from llada_v.web import app

    return app


def canvas(step, ids, stop=None):
    return {"step": step, "block": 0, "ids": ids, "tokens": [None if i is None else f"t{i}" for i in ids], "stop": stop}


def classes(html: str) -> list[str]:
    return [part.split('"')[0] for part in html.split('class="tok ')[1:]]


def test_the_canvas_marks_masks_new_and_earlier_tokens(web):
    first, second = canvas(0, [None, 7, None, None]), canvas(1, [5, 7, 9, None], stop=2)
    assert classes(web.canvas_html(first)) == ["mask", "new", "mask", "mask"]
    assert classes(web.canvas_html(second, first)) == ["new", "old", "new", "mask after-stop"]
    assert 'data-step="1"' in web.canvas_html(second, first)
    assert 'data-state="done"' in web.canvas_html(second, done=True)
    assert "&lt;b&gt;" in web.canvas_html({**first, "tokens": [None, "<b>", None, None]})  # token text is escaped


class FakeEngine:
    """Records the job instead of generating: for the settings check."""

    def __init__(self, model, processor):
        self.model, self.processor, self.system_prompt = model, processor, ""
        self.concurrency_limit = 1

    @property
    def base_config(self):
        return self.model.generation_config


@pytest.fixture(scope="module")
def demo():
    from llada_v.demo.app import load_demo

    return load_demo()


def test_settings_are_checked_by_the_generation_config(web, demo, tmp_path):
    handlers = web.Handlers(FakeEngine(*demo), tmp_path)
    base = demo[0].generation_config
    with pytest.raises(InputError) as library:
        generation_config_for(base, {"max_new_tokens": 8, "steps": 8, "block_length": 3})
    with pytest.raises(InputError) as page:
        handlers.settings(8, 8, 3, "exact", 0.0, 0.0, "low_confidence")
    assert str(page.value) == str(library.value) == "max_new_tokens (8) must be divisible by block_length (3)"
    fast = handlers.settings(8, 8, 8, "fast", 0.0, 0.0, "low_confidence")
    assert fast.confidence_threshold is not None and fast.kv_cache is not None


def run_turn(handler, *args):
    async def collect():
        return [update async for update in handler(*args)]

    return asyncio.run(collect())


def test_a_question_through_the_handler_equals_diffusion_generate(web, demo, tmp_path):
    model, processor = demo
    engine = web.LocalEngine(model, processor, system_prompt="")
    handlers = web.Handlers(engine, tmp_path)
    sample = make_sample(11)
    path = tmp_path / "scene.png"
    sample["image"].save(path)
    question = sample["qa"][0][0]
    updates = run_turn(handlers.respond, [str(path)], question, [], web._empty_conversation(), 4, 4, 4, "exact",
                       0.0, None, 0.0, "low_confidence")  # fmt: skip
    chat, canvas_html, error, _, _, conversation, frames, gif = updates[-1]
    config = generation_config_for(model.generation_config, {"max_new_tokens": 4, "steps": 4, "block_length": 4})
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=False, system_prompt="",
    )  # fmt: skip
    inputs = processor(images=[[Image.open(path).convert("RGB")]], text=[text], return_tensors="pt")
    ids = model.diffusion_generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]
    expected = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert chat[-1] == {"role": "assistant", "content": expected}
    assert conversation["messages"][-1]["content"] == expected and len(conversation["images"]) == 1
    assert len(frames) >= 2 and 'data-state="done"' in canvas_html
    with Image.open(gif) as animation:
        assert animation.n_frames == len(frames)
    assert Path(gif).parent == tmp_path
