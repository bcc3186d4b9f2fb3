"""`llada-v serve` against hostile images, for real (the CLI, Ray, the openai client, 127.0.0.1): image URLs that
trickle one byte per second are cut off at the fetch deadline and hold up no request without a remote image,
the per-request pixel budget is checked from the image headers (400 naming the values, thin images counted by
the square they are padded to), malformed file:// URLs are JSON 400s, and the budgets are given back.

Its own server (tight budgets, a short fetch timeout) beside test_serving.py's.
"""

import concurrent.futures
import time

import pytest

pytest.importorskip("ray.serve", reason="the serving tests need Ray Serve: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the serving tests use the openai client: pip install -e '.[serve]'")
pytest.importorskip("psutil", reason="the serving tests watch processes with psutil")

from PIL import Image  # noqa: E402

from llada_v.demo.scenes import make_sample  # noqa: E402

from helpers import TricklingHost, png_data_url  # noqa: E402
from serving_helpers import API_KEY, MODEL, Server, get_json, messages, single_answer  # noqa: E402

FETCH_TIMEOUT, REQUEST_PIXELS, QUEUED_PIXELS = 8.0, 1_000_000, 4_000_000
TRICKLERS = 8  # twice the media threads of the server before downloads got threads of their own
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_media")
    (root / "media").mkdir()
    return root


@pytest.fixture(scope="module")
def server(media_root):
    extra = ("--image-fetch-timeout-s", str(FETCH_TIMEOUT), "--max-request-pixels", str(REQUEST_PIXELS),
             "--max-queued-pixels", str(QUEUED_PIXELS))  # fmt: skip
    running = Server(media_root, media_root / "media", extra)  # the later --image-fetch-timeout-s wins
    try:
        running.wait_ready()
        yield running
    finally:
        running.kill_everything()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def trickler():
    host = TricklingHost()
    yield host
    host.close()


def chat_error(client, content: list) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}])
    return info.value


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_data_url_request_is_answered_while_trickling_downloads_are_in_flight(server, client, demo, trickler):  # noqa: F811
    def slow(index):
        started = time.monotonic()
        try:
            client.chat.completions.create(model=MODEL, messages=messages("Which colors are there?", trickler.url))
        except openai.APIStatusError as err:
            return err, time.monotonic() - started
        return None, time.monotonic() - started

    sample = make_sample(21)
    question = sample["qa"][0][0]
    with concurrent.futures.ThreadPoolExecutor(TRICKLERS) as pool:
        slow_requests = [pool.submit(slow, i) for i in range(TRICKLERS)]
        deadline = time.monotonic() + FETCH_TIMEOUT / 2
        while get_json(f"{server.url}/health")[2]["active_requests"] < TRICKLERS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get_json(f"{server.url}/health")[2]["active_requests"] == TRICKLERS  # all downloading
        started = time.monotonic()
        answer = client.chat.completions.create(model=MODEL, messages=messages(question, png_data_url(sample["image"])))
        latency = time.monotonic() - started
        still_downloading = not any(future.done() for future in slow_requests)
        results = [future.result() for future in slow_requests]
    assert answer.choices[0].message.content == single_answer(demo, question, sample["image"])
    assert still_downloading and latency < FETCH_TIMEOUT / 2, latency
    for error, seconds in results:
        assert error is not None and error.status_code == 400, error
        assert f"{trickler.url} took longer than {FETCH_TIMEOUT} s to download" in error.message
        assert error.body["param"] == "messages[0].content[0].image_url"
        assert FETCH_TIMEOUT - 0.5 < seconds < FETCH_TIMEOUT + 4, seconds  # cut off at the deadline


def test_a_request_over_the_pixel_budget_is_400_naming_the_values(server, client):
    big = png_data_url(Image.new("RGB", (1100, 1000), (0, 0, 255)))  # 1,100,000 pixels, a few KB of PNG
    error = chat_error(client, [image_part(big), {"type": "text", "text": "?"}])
    assert error.status_code == 400 and error.body["code"] == "image_too_large" and error.body["param"] == "messages"
    assert ("the request's images need 1100000 pixels (messages[0].content[0].image_url: 1100000), more than this "
            f"server's limit of {REQUEST_PIXELS} pixels per request (max_request_pixels)") in error.message  # fmt: skip
    thin = png_data_url(Image.new("RGB", (1, 800)))  # 800 pixels, padded to 800 x 800 beside another image
    error = chat_error(client, [image_part(thin), image_part(thin), {"type": "text", "text": "?"}])
    assert error.status_code == 400 and "need 1280000 pixels" in error.message


def test_malformed_file_urls_are_json_400s(server, client, media_root):
    folder = media_root / "media"
    for url, reason in [
        (f"file://{folder}/a%00b.png", "embedded null byte"),
        (f"file://{folder}/" + "a/" * 3000 + "x.png", "File name too long"),
        (f"file://{folder}/" + "n" * 5000 + ".png", "File name too long"),
    ]:
        error = chat_error(client, [image_part(url), {"type": "text", "text": "?"}])
        assert error.status_code == 400 and error.body["type"] == "invalid_request_error", error.message
        assert "unusable file URL" in error.message and reason in error.message


def test_the_budgets_are_given_back_and_the_server_still_answers(server, client, demo):  # noqa: F811
    health = get_json(f"{server.url}/health")[2]
    assert (health["active_requests"], health["queued_pixels"]) == (0, 0)
    sample = make_sample(22)
    question = sample["qa"][0][0]
    answer = client.chat.completions.create(model=MODEL, messages=messages(question, png_data_url(sample["image"])))
    assert answer.choices[0].message.content == single_answer(demo, question, sample["image"])
