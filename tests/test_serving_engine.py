"""The step scheduler behind a real `llada-v serve` (the default) and `--scheduler call` side by side: requests that
arrive while others are being denoised get their single answers, a client that goes away frees its row, and
`/metrics` is Prometheus text. Expected answers come from plain in-process calls, never from the server."""

import concurrent.futures
import http.client
import json
import random
import time
import urllib.request

import pytest

pytest.importorskip("ray.serve", reason="the serving tests need Ray Serve: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the serving tests use the openai client: pip install -e '.[serve]'")

from llada_v.demo.scenes import make_sample  # noqa: E402
from llada_v.inference import chat_prompt, generate_texts, generation_config_for, user_message  # noqa: E402

from helpers import png_data_url  # noqa: E402
from serving_helpers import API_KEY, AUTH, MODEL, Server, get_json, messages, single_answer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    (root / "media").mkdir()
    step = Server(root, root / "media", ("--max-batch-tokens", "4000"))
    call_root = root / "call"
    call_root.mkdir()
    call = Server(call_root, root / "media", ("--scheduler", "call"))
    try:
        step.wait_ready()
        call.wait_ready()
        yield step, call
    finally:
        step.kill_everything()
        call.kill_everything()


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def metrics(server) -> dict[str, float]:
    """`/metrics` parsed as Prometheus text: `name{labels}` -> value (every line must parse)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def metric(values: dict, name: str) -> float:
    return sum(v for k, v in values.items() if k.split("{")[0] == name)


# Mixed settings: lengths, schedules, stops, a seeded sample, the fast preset.
SETTINGS = [
    {},
    {"max_tokens": 8},
    {"max_tokens": 16, "extra_body": {"steps": 8, "block_length": 8}},
    {"max_tokens": 12, "stop": ["square"], "extra_body": {"steps": 12, "block_length": 4}},
    {"max_tokens": 8, "extra_body": {"fast": True}},
    {"max_tokens": 8, "temperature": 0.8, "seed": 3},
]


def _expected(demo, question: str, image, settings: dict) -> str:
    """The in-process answer to a request with these OpenAI parameters (no server code)."""
    model, processor, _ = demo
    extra = dict(settings.get("extra_body", {}))
    fast = extra.pop("fast", False)
    overrides = {"max_new_tokens": settings.get("max_tokens"), "stop_strings": settings.get("stop"),
                 "temperature": settings.get("temperature"), **extra}  # fmt: skip
    config = generation_config_for(model.generation_config, overrides, fast=fast)
    prompt = chat_prompt(processor, [user_message(question, 1)], system_prompt="")
    return generate_texts(model, processor, [prompt], [[image]], config, seed=settings.get("seed"))[0][0]


def test_requests_arriving_while_others_run_get_their_single_answers(servers, demo):
    step, call = servers
    samples = [make_sample(900 + i) for i in range(18)]
    jobs = []
    for i, sample in enumerate(samples):
        question = sample["qa"][0][0] if i % 3 else "Which shapes are there?"
        jobs.append((question, sample["image"], SETTINGS[i % len(SETTINGS)], i % 2 == 0))
    before = metrics(step)
    delays = random.Random(0).choices([0.0, 0.01, 0.03, 0.08], k=len(jobs))  # arrivals spread over the steps

    def ask(index):
        question, image, settings, stream = jobs[index]
        time.sleep(sum(delays[: index + 1]))
        request = dict(model=MODEL, messages=messages(question, png_data_url(image)), **settings)
        client = _client(step)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **request))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(**request).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, range(len(jobs))))
    expected = [_expected(demo, question, image, settings) for question, image, settings, _ in jobs]
    assert answers == expected
    after = metrics(step)
    passes = metric(after, "llada_v_forward_passes_total") - metric(before, "llada_v_forward_passes_total")
    rows = metric(after, "llada_v_forward_rows_total") - metric(before, "llada_v_forward_rows_total")
    assert rows / passes > 1.5  # requests shared forwards
    assert metric(after, "llada_v_running_requests") == 0 == metric(after, "llada_v_waiting_requests")
    health = get_json(f"{step.url}/health")[2]
    assert health["scheduler"] == "step" and health["forward_rows"] >= rows


def test_a_client_that_goes_away_frees_its_row_and_changes_no_other_answer(servers, demo):
    step, _ = servers
    sample = make_sample(950)
    # Random remasking, one token per pass over one 900-token block: the stop is complete only after most of the
    # 900 passes (seconds), so the request is still running when its client leaves. The canvas events start the
    # stream at the first pass.
    long_body = json.dumps({
        "model": MODEL, "messages": messages("Which shapes are there?", png_data_url(sample["image"])),
        "max_tokens": 900, "steps": 900, "block_length": 900, "remasking": "random", "seed": 1,
        "stream": True, "stream_canvas": True,
    })  # fmt: skip
    before = metric(metrics(step), "llada_v_requests_cancelled_total")
    connection = http.client.HTTPConnection("127.0.0.1", step.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", long_body, {"Content-Type": "application/json", **AUTH})
    response = connection.getresponse()
    assert response.status == 200
    response.readline()  # the first event: the request is running
    assert metric(metrics(step), "llada_v_running_requests") == 1
    other = make_sample(951)
    question = other["qa"][0][0]
    answer = _client(step).chat.completions.create(
        model=MODEL, messages=messages(question, png_data_url(other["image"]))
    )
    connection.close()  # the client goes away mid-answer
    deadline = time.time() + 60
    while time.time() < deadline:
        values = metrics(step)
        if metric(values, "llada_v_requests_cancelled_total") == before + 1:
            break
        time.sleep(0.2)
    assert metric(values, "llada_v_requests_cancelled_total") == before + 1
    assert metric(values, "llada_v_running_requests") == 0
    assert get_json(f"{step.url}/health")[2]["active_requests"] == 0
    assert answer.choices[0].message.content == single_answer(demo, question, other["image"])


def test_the_call_scheduler_still_answers_and_reports_its_forwards(servers, demo):
    _, call = servers
    sample = make_sample(960)
    question = sample["qa"][0][0]
    answer = _client(call).chat.completions.create(
        model=MODEL, messages=messages(question, png_data_url(sample["image"]))
    )
    assert answer.choices[0].message.content == single_answer(demo, question, sample["image"])
    health = get_json(f"{call.url}/health")[2]
    assert health["scheduler"] == "call" and health["forward_passes"] >= 1
    values = metrics(call)
    assert metric(values, "llada_v_requests_total") >= 1
    assert 'scheduler="call"' in next(k for k in values if k.startswith("llada_v_requests_total"))


def test_a_stop_string_counts_the_same_tokens_on_both_schedulers(servers):
    """`usage.completion_tokens` runs through the stop string (docs/serving.md) whether the step scheduler or a
    whole call stopped the answer: the sampler's id search finds "square" in the description's first block."""
    url = png_data_url(make_sample(0)["image"])
    results = []
    for server in servers:
        client = _client(server)
        full = client.chat.completions.create(model=MODEL, messages=messages("Which shapes are there?", url))
        words = full.choices[0].message.content.split()
        assert len(words) >= 3, words
        stopped = client.chat.completions.create(model=MODEL, messages=messages("Which shapes are there?", url),
                                                 stop=[words[2]])  # fmt: skip
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].message.content == " ".join(words[:2])
        results.append(stopped.usage.completion_tokens)
    assert results == [3, 3]  # two words, then the stop string's one token (the tokenizer is word-level)
