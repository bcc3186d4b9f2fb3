"""The web page in a real browser: `llada-v web` and `llada-v serve --web` started as a user starts them (CLI,
127.0.0.1, a free port), driven by Playwright on the system's Chromium (Debian's `chromium` package; nothing is
downloaded). A rendered demo scene is uploaded, a question asked: the canvas must show at least two different
intermediate states, then the answer, equal to `diffusion_generate`'s for the same settings; a second turn
without a new image answers from the history; an invalid setting shows the generation config's one-line
message; Clear empties the chat. A screenshot is saved (`LLADA_V_WEB_SCREENSHOT=path` writes it there too).

Expected answers and messages come from the library in this process (`diffusion_generate`,
`generation_config_for`), never from the page.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web page needs Gradio: pip install -e '.[web]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests drive Chromium with playwright")
psutil = pytest.importorskip("psutil", reason="the browser tests stop the servers' processes with psutil")

from llada_v.demo.app import load_demo  # noqa: E402
from llada_v.demo.scenes import make_sample  # noqa: E402
from llada_v.inference import InputError, chat_prompt, generation_config_for, read_image, user_message  # noqa: E402

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).is_file()), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
# one short block (the checkpoint's own schedule is 32 tokens in 4 blocks of 8)
SETTINGS = {"max_new_tokens": 4, "steps": 4, "block_length": 4}
BAD_SETTINGS = {"max_new_tokens": 4, "steps": 4, "block_length": 3}
SCENE_SEED = 3
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (Debian's package)")

# Every state of the canvas, recorded in the page as it is drawn (the live updates are too quick to poll).
RECORD_CANVASES = """
window.__canvases = [];
const record = () => {
  const node = document.querySelector('#canvas .llada-canvas');
  if (!node) return;
  const item = {html: node.outerHTML, state: node.dataset.state, step: node.dataset.step,
                text: node.innerText};
  const last = window.__canvases[window.__canvases.length - 1];
  if (!last || last.html !== item.html) window.__canvases.push(item);
};
new MutationObserver(record).observe(document, {subtree: true, childList: true, characterData: true,
                                                     attributes: true});
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A command started for the test; `stop` ends it and every process it started (by pid)."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        self.log_path = log
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.seen: dict[int, psutil.Process] = {}

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_for(self, url: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.tail()}")
            self.remember()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"{url} not ready after {timeout} s:\n{self.tail()}")

    def remember(self) -> None:
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> None:
        if self.process.poll() is None:
            self.remember()
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for child in self.seen.values():
            try:
                if child.is_running():
                    child.kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("web") / "scene.png"
    make_sample(SCENE_SEED)["image"].save(path)
    return path


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium: apt-get install chromium (Debian's package)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def diffusion_answer(demo, messages: list[dict], images: list, settings: dict) -> str:
    """The answer of `model.diffusion_generate` for the conversation (the demo takes no system prompt)."""
    model, processor = demo
    config = generation_config_for(model.generation_config, settings)
    text = chat_prompt(processor, messages, system_prompt="")
    inputs = processor(images=[images] if images else None, text=[text], return_tensors="pt")
    sequences = model.diffusion_generate(**inputs, generation_config=config)
    return processor.tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def set_number(page, elem_id: str, value: int) -> None:
    field = page.locator(f"#{elem_id} input")
    field.fill(str(value))
    field.press("Tab")


def upload(page, path: Path) -> None:
    """Attach `path` to the image field and wait until the page lists it (uploaded to the server)."""
    with page.expect_response(lambda response: "/upload" in response.url and response.ok, timeout=60_000):
        page.locator("#image input[type=file]").set_input_files(str(path))
    page.wait_for_selector(f"#image [aria-label='{path.name}']", timeout=60_000)  # the file list's entry


def ask(page, question: str, timeout_ms: int = 120_000) -> list[dict]:
    """Ask `question`; returns the canvases drawn until the run was done."""
    page.evaluate("window.__canvases = []")
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    page.wait_for_selector('#canvas .llada-canvas[data-state="done"]', timeout=timeout_ms)
    return page.evaluate("window.__canvases")


def bot_messages(page) -> list[str]:
    return [text.strip() for text in page.locator("#chat .bot-row").all_inner_texts()]


def check_page(browser, url: str, demo, scene: Path, screenshot: Path) -> dict:
    """The whole user story on the page at `url`; returns what was seen."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script(RECORD_CANVASES)
    page.goto(url)
    page.wait_for_selector("#question textarea", timeout=60_000)
    page.locator("#settings button").first.click()  # open the settings (closed, they are not in the page)
    page.wait_for_selector("#max_new_tokens input", timeout=30_000)
    for elem_id in ("image", "question", "send", "chat", "canvas", "settings", "max_new_tokens", "steps",
                    "block_length", "preset"):  # fmt: skip
        assert page.locator(f"#{elem_id}").count() == 1, elem_id
    for name, value in SETTINGS.items():
        set_number(page, name, value)
    upload(page, scene)

    image = read_image(scene)
    question = make_sample(SCENE_SEED)["qa"][0][0]
    expected = diffusion_answer(demo, [user_message(question, 1)], [image], SETTINGS)
    canvases = ask(page, question)
    running = {c["html"] for c in canvases if c["state"] == "running"}
    assert len(running) >= 2, canvases
    assert canvases[-1]["state"] == "done"
    page.wait_for_function("document.querySelectorAll('#chat .bot-row').length == 1", timeout=30_000)
    assert bot_messages(page) == [expected]
    page.screenshot(path=str(screenshot))

    # A second turn without a new image: the history (and its image) carries over.
    follow_up = "How many shapes are there?"
    history = [user_message(question, 1), {"role": "assistant", "content": expected}, user_message(follow_up, 0)]
    expected_2 = diffusion_answer(demo, history, [image], SETTINGS)
    ask(page, follow_up)
    page.wait_for_function("document.querySelectorAll('#chat .bot-row').length == 2", timeout=30_000)
    assert bot_messages(page) == [expected, expected_2]

    # An invalid combination: the generation config's own one-line message, and no new answer.
    with pytest.raises(InputError) as invalid:
        generation_config_for(demo[0].generation_config, BAD_SETTINGS)
    for name, value in BAD_SETTINGS.items():
        set_number(page, name, value)
    page.locator("#question textarea").fill("What color is the square?")
    page.locator("#send").click()
    page.wait_for_selector("#error .llada-error", timeout=30_000)
    message = page.locator("#error .llada-error").inner_text().strip()
    assert message == str(invalid.value) and "\n" not in message and "Traceback" not in page.content()
    assert len(bot_messages(page)) == 2

    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll('#chat .bot-row').length == 0", timeout=30_000)
    page.close()
    return {"canvases": canvases, "answers": [expected, expected_2], "error": message}


def save_screenshot(path: Path) -> None:
    target = os.environ.get("LLADA_V_WEB_SCREENSHOT")
    if target:
        shutil.copyfile(path, target)


@needs_chromium
def test_llada_v_web_in_chromium(browser, demo, scene, tmp_path):
    port = free_port()
    server = Process([sys.executable, "-m", "llada_v.cli", "web", "--port", str(port)], tmp_path / "web.log")
    try:
        url = f"http://127.0.0.1:{port}/"
        server.wait_for(url, timeout=180)
        seen = check_page(browser, url, demo, scene, tmp_path / "web.png")
        assert (tmp_path / "web.png").stat().st_size > 0
        save_screenshot(tmp_path / "web.png")
        print(f"answers {seen['answers']}, {len(seen['canvases'])} canvases, error {seen['error']!r}")
    finally:
        server.stop()
    assert server.process.returncode is not None


@needs_chromium
def test_llada_v_serve_web_in_chromium(browser, demo, scene, tmp_path):
    pytest.importorskip("ray.serve", reason="llada-v serve needs Ray Serve: pip install -e '.[serve]'")
    port = free_port()
    command = [sys.executable, "-m", "llada_v.cli", "serve", "--web", "--port", str(port),
               "--num-cpus-per-replica", "1"]  # fmt: skip
    server = Process(command, tmp_path / "serve.log")
    try:
        base = f"http://127.0.0.1:{port}"
        server.wait_for(f"{base}/health", timeout=300)
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as response:  # the API keeps its routes
            assert b"llada-v-demo" in response.read()
        check_page(browser, f"{base}/", demo, scene, tmp_path / "serve-web.png")
        with urllib.request.urlopen(f"{base}/health", timeout=30) as response:  # the replica served both questions
            assert json.loads(response.read())["requests"] == 2
    finally:
        server.stop()
    left = [p.pid for p in server.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left


def test_the_space_app_file_serves_the_page(tmp_path):
    """examples/space/app.py run as a Space runs it (`python app.py`, the port from GRADIO_SERVER_PORT)."""
    port = free_port()
    command = [sys.executable, str(REPO / "examples" / "space" / "app.py")]
    server = Process(command, tmp_path / "space.log", {"GRADIO_SERVER_PORT": str(port)})
    try:
        server.wait_for(f"http://127.0.0.1:{port}/", timeout=180)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            config = json.loads(response.read())
        elem_ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"image", "question", "send", "chat", "canvas", "settings", "max_new_tokens", "steps", "block_length",
                "preset"} <= elem_ids  # fmt: skip
    finally:
        server.stop()
