"""The real `llada-v serve` harness shared by the serving test modules: the server process on 127.0.0.1 (demo
model, test limits, the API key in the environment), JSON requests without the openai client, and the plain
in-process answer a server response must equal. Imported only by modules that have the serve extra."""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from PIL import Image

from llada_v.inference import chat_prompt, generate_texts, generation_config_for, user_message

from helpers import png_bytes

MODEL = "llada-v-demo"
MAX_BATCH, MAX_QUEUED, MAX_BODY, FETCH_TIMEOUT = 32, 8, 1_000_000, 15
MAX_PROMPT_CHARS = 20_000
API_KEY = "test-key-1234"  # given through LLADA_V_API_KEY, as an operator keeps it out of the process list
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def messages(question: str, url: str | None) -> list[dict]:
    content = [{"type": "text", "text": question}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


class ImageHost:
    """A loopback HTTP server for test images; `/slow.png` waits until `release` is set."""

    def __init__(self, image: Image.Image) -> None:
        body, self.release = png_bytes(image), threading.Event()
        release = self.release

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server name
                if self.path == "/slow.png":
                    release.wait(60)
                if self.path not in ("/scene.png", "/slow.png"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class Server:
    """The `llada-v serve` process, its descendants and how to reach it."""

    def __init__(self, tmp: Path, media: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "serve.log"
        command = [
            sys.executable, "-m", "llada_v.cli", "serve", "--port", str(self.port),
            "--max-batch-size", str(MAX_BATCH), "--batch-wait-ms", "200", "--max-queued-requests", str(MAX_QUEUED),
            "--max-request-bytes", str(MAX_BODY), "--allowed-local-media-path", str(media),
            "--image-fetch-timeout-s", str(FETCH_TIMEOUT), "--num-cpus-per-replica", "1",
            "--max-prompt-chars", str(MAX_PROMPT_CHARS), *extra_args,
        ]  # fmt: skip
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "LLADA_V_API_KEY": API_KEY}
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.seen: dict[int, psutil.Process] = {}

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"llada-v serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if get_json(f"{self.url}/health", timeout=5)[0] == 200:
                    self.remember_processes()
                    return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"llada-v serve not ready after {timeout} s:\n{self.log_tail()}")

    def remember_processes(self) -> None:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            self.seen.setdefault(child.pid, child)

    def replica(self) -> psutil.Process:
        self.remember_processes()
        replicas = [p for p in self.seen.values() if _live(p) and "ServeReplica:llada-v" in " ".join(_cmdline(p))]
        assert len(replicas) == 1, [(_cmdline(p), p.pid) for p in replicas]
        return replicas[0]

    def alive(self) -> list[str]:
        left = []
        for pid, process in self.seen.items():
            if _live(process):
                left.append(f"{pid} {' '.join(_cmdline(process))[:80]}")
        return left

    def kill_everything(self) -> None:
        """Teardown after a failure: end the server and every process it started (by pid, nothing else)."""
        if self.process.poll() is None:
            self.remember_processes()
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for process in self.seen.values():
            if process.is_running():
                process.kill()
        self.log.close()


def _live(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def get_json(url: str, timeout: float = 30, headers: dict | None = None) -> tuple[int, Any, dict]:
    return _request(urllib.request.Request(url, headers=headers or {}), timeout)


def post_raw(url: str, data: bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, Any, dict]:
    """POST with the server's key and a JSON content type unless `headers` says otherwise (None drops one)."""
    merged = {"Content-Type": "application/json", **AUTH, **(headers or {})}
    request = urllib.request.Request(url, data=data, headers={k: v for k, v in merged.items() if v is not None})
    return _request(request, timeout)


def _request(request: urllib.request.Request, timeout: float) -> tuple[int, Any, dict]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError:
            parsed = {"raw": body.decode(errors="replace")}
        return err.code, err.headers, parsed  # headers: case-insensitive


def single_answer(demo, question: str, image: Image.Image | None, **overrides) -> str:
    """The plain one-prompt answer (no server code), as the server must reproduce it."""
    model, processor, config = demo
    if overrides:
        config = generation_config_for(model.generation_config, overrides)
    images = [] if image is None else [image]
    text = chat_prompt(processor, [user_message(question, len(images))], system_prompt="")
    return generate_texts(model, processor, [text], [images], config)[0][0]
