"""benchmarks/bench_serve.py's pure pieces (arrival schedule, percentiles, the event-stream reader, the summary,
the target ratios, the table) and its open-loop client against a small loopback OpenAI-style server that answers
slowly: requests leave at their scheduled times whatever the earlier ones are doing, and the time to first token
is the first chunk with text. Expected values are computed here by hand or with numpy, never by the script."""

import http.server
import importlib.util
import json
import math
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from paths import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "benchmarks" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


# ---------------------------------------------------------------------------------------------- arrivals


def test_poisson_schedule_is_seeded_and_its_gaps_are_exponential_with_mean_one_over_rate(bench):
    rate = 8.0
    times = bench.poisson_schedule(rate, seed=3, count=20_000)
    assert times == bench.poisson_schedule(rate, seed=3, count=20_000)
    assert times != bench.poisson_schedule(rate, seed=4, count=20_000)
    gaps = np.diff([0.0, *times])
    assert len(times) == 20_000 and (gaps > 0).all()
    assert abs(gaps.mean() - 1 / rate) < 0.03 / rate  # standard error of the mean: 0.7% of 1/rate
    # exponential: P(gap > mean) = e^-1, and the standard deviation equals the mean
    assert abs((gaps > 1 / rate).mean() - math.exp(-1)) < 0.015
    assert abs(gaps.std() - 1 / rate) < 0.05 / rate


def test_poisson_schedule_stops_at_the_duration_or_the_count(bench):
    times = bench.poisson_schedule(50.0, seed=0, duration=10.0)
    assert times and max(times) < 10.0 and times == sorted(times)
    assert abs(len(times) - 500) < 5 * math.sqrt(500)  # Poisson count: mean 500, sd ~22
    assert len(bench.poisson_schedule(50.0, seed=0, duration=10.0, count=7)) == 7
    assert bench.poisson_schedule(50.0, seed=0, duration=10.0, count=7) == times[:7]
    for rate, kwargs, message in [
        (0.0, {"count": 3}, "rate must be a finite number > 0"),
        (float("inf"), {"count": 3}, "rate must be"),
        (1.0, {}, "give a duration or a count"),
        (1.0, {"count": 0}, "count >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            bench.poisson_schedule(rate, seed=0, **kwargs)


def test_split_schedule_puts_each_arrival_in_its_window_shifted_to_the_window_start(bench):
    times = [0.1, 0.9, 1.0, 2.5, 2.99, 5.9]
    split = bench.split_schedule(times, duration=6.0, parts=3)
    assert [len(part) for part in split] == [3, 2, 1]
    assert [at for part in split for at in part] == pytest.approx([0.1, 0.9, 1.0, 0.5, 0.99, 1.9])
    assert bench.split_schedule(times, duration=6.0, parts=1) == [times]
    assert bench.split_schedule([0.5, 5.5], duration=6.0, parts=3) == [[0.5], [1.5]]  # the empty middle left out
    many = bench.poisson_schedule(20.0, seed=1, duration=30.0)
    assert sum(len(part) for part in bench.split_schedule(many, 30.0, 4)) == len(many)
    with pytest.raises(ValueError, match="parts must be >= 1 and duration > 0, got 0 and 6.0"):
        bench.split_schedule(times, 6.0, 0)


# ---------------------------------------------------------------------------------------------- figures


def test_percentile_interpolates_between_ranks_as_numpy(bench):
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)  # rank 2.85: 3 + 0.85 * (4 - 3)
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([], 50) is None
    values = list(np.random.default_rng(0).exponential(size=101))
    for q in (0, 50, 95, 99, 100):
        assert bench.percentile(values, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError, match="q must be within 0..100, got 101"):
        bench.percentile(values, 101)


def test_sse_lines_give_content_errors_and_the_end(bench):
    def chunk(**body):
        return ("data: " + json.dumps({"object": "chat.completion.chunk", **body}) + "\n").encode()

    assert bench.parse_sse_line(chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}])) == (
        "delta",
        "",
    )
    assert bench.parse_sse_line(chunk(choices=[{"index": 0, "delta": {"content": "green"}}])) == ("delta", "green")
    assert bench.parse_sse_line(chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])) == ("delta", "")
    assert bench.parse_sse_line(chunk(choices=[], usage={"completion_tokens": 2})) is None
    assert bench.parse_sse_line(b"event: llada.canvas\n") is None
    assert bench.parse_sse_line(b"\n") is None
    assert bench.parse_sse_line(b"data: [DONE]\n") == ("done", "")
    error = b'data: {"error": {"message": "generation failed: boom", "type": "server_error"}}\n'
    assert bench.parse_sse_line(error) == ("error", "generation failed: boom")


def record(bench, spec, latency, ttft=None, text="yes", error=None, sent=0.0, scheduled=0.0, rows=0):
    return bench.RequestRecord(spec, scheduled, sent, latency, ttft, None if error else text, error, rows)


def test_summarize_counts_failures_percentiles_throughput_and_rows_per_forward(bench):
    records = [record(bench, i, latency=0.1 * (i + 1), ttft=0.05 * (i + 1), rows=4) for i in range(10)]
    records.append(record(bench, 10, latency=2.0, error="HTTP 503: busy"))
    records.append(record(bench, 11, latency=2.0, error="HTTP 503: busy"))
    before = {"forward_passes": 10, "forward_rows": 30, "generate_seconds": 1.0}
    after = {"forward_passes": 30, "forward_rows": 110, "generate_seconds": 3.0}
    r = bench.summarize("step", "closed c=4", records, 4.0, before, after, concurrency=4)
    assert (r.sent, r.answered, r.failed) == (12, 10, 2)
    assert r.answers_per_s == pytest.approx(10 / 4.0)
    latencies = [100.0 * (i + 1) for i in range(10)]  # ms, of the answered ones only
    assert r.p50_ms == pytest.approx(550.0)
    assert r.p95_ms == pytest.approx(np.percentile(latencies, 95))
    assert r.p99_ms == pytest.approx(np.percentile(latencies, 99))
    assert r.ttft_p50_ms == pytest.approx(275.0)
    assert r.rows_per_forward == pytest.approx(80 / 20)
    assert r.busy_share == pytest.approx(2.0 / 4.0)
    assert r.mean_call_rows == pytest.approx(4.0)
    assert r.send_lag_p95_ms is None  # closed loop
    assert r.errors == ["HTTP 503: busy"]
    # a server without the forward counters, requests not streamed, an open level: n/a, and the send lag
    lagging = [record(bench, i, latency=0.2, scheduled=1.0 * i, sent=1.0 * i + 0.01 * i) for i in range(5)]
    r = bench.summarize("call", "open 60%", lagging, 5.0, {}, {"status": "ok"}, load=0.6, offered_per_s=1.0)
    assert r.rows_per_forward is None and r.ttft_p50_ms is None and r.busy_share is None
    assert r.send_lag_p95_ms == pytest.approx(np.percentile([0, 10, 20, 30, 40], 95))


def test_count_equal_compares_answered_requests_with_their_single_answers(bench):
    records = [record(bench, 0, 0.1, text="red"), record(bench, 1, 0.1, text="two"), record(bench, 1, 0.1, text="3")]
    records.append(record(bench, 2, 0.1, error="HTTP 500"))
    assert bench.count_equal(records, {0: "red", 1: "two", 2: "blue"}) == (2, 3)


def level(bench, server, name, answers_per_s=1.0, p95=None, load=None, concurrency=None):
    return bench.LevelResult(
        server=server, level=name, concurrency=concurrency, load=load, offered_per_s=None if load is None else 1.0,
        sent=10, answered=10, failed=0, seconds=10.0, answers_per_s=answers_per_s, p50_ms=None, p95_ms=p95,
        p99_ms=None, ttft_p50_ms=None, ttft_p95_ms=None, send_lag_p95_ms=None, rows_per_forward=None,
        mean_call_rows=None, busy_share=None,
    )  # fmt: skip


def test_target_ratios_take_the_load_nearest_60_percent_and_the_highest_concurrency(bench):
    results = [
        level(bench, "call", "closed c=8", answers_per_s=5.0, concurrency=8),
        level(bench, "step", "closed c=8", answers_per_s=50.0, concurrency=8),
        level(bench, "call", "closed c=32", answers_per_s=10.0, concurrency=32),
        level(bench, "step", "closed c=32", answers_per_s=13.0, concurrency=32),
        level(bench, "call", "open 30%", p95=100.0, load=0.3),
        level(bench, "step", "open 30%", p95=10.0, load=0.3),
        level(bench, "call", "open 50%", p95=400.0, load=0.5),
        level(bench, "step", "open 50%", p95=200.0, load=0.5),
        level(bench, "call", "open 75%", p95=800.0, load=0.75),
        level(bench, "step", "open 75%", p95=100.0, load=0.75),
    ]
    ratios = bench.target_ratios(results, ceiling=26.0)
    assert ratios["p95_load"] == 0.5 and ratios["p95_step_over_call_at_60"] == pytest.approx(0.5)
    assert ratios["max_concurrency"] == 32 and ratios["max_step_over_call"] == pytest.approx(1.3)
    assert ratios["max_step_over_ceiling"] == pytest.approx(0.5)
    lines = bench.format_ratios(ratios)
    assert lines == [
        "step p95 / call p95 latency at 50% load: 0.50 (target <= 0.6: met)",
        "step / call maximum throughput (closed loop, concurrency 32): 1.30 (target >= 1.2: met)",
        "step maximum throughput / in-process batches of 32: 0.50 (target >= 0.9: NOT met)",
    ]
    # no step server (batched against sequential), no ceiling: every ratio n/a
    only_call = [r for r in results if r.server == "call"]
    ratios = bench.target_ratios(only_call, ceiling=None)
    assert [ratios[k] for k in bench.TARGETS] == [None, None, None]
    assert all(": n/a (target" in line for line in bench.format_ratios(ratios))


def test_table_has_one_row_per_result_and_n_a_for_missing_figures(bench):
    first = level(bench, "call", "open 60%", answers_per_s=2.5, p95=123.4, load=0.6)
    first.equal_to_singles, first.compared, first.busy_share, first.rows_per_forward = 9, 10, 0.5, 3.25
    rows = bench.format_table([first, level(bench, "step", "closed c=32", concurrency=32)]).splitlines()
    assert len(rows) == 4 and len({row.count("|") for row in rows}) == 1
    cells = [cell.strip() for cell in rows[2].strip("|").split("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    row = dict(zip(header, cells))
    assert row["server"] == "call" and row["answers/s"] == "2.50" and row["p95 ms"] == "123"
    assert row["equal to singles"] == "9/10" and row["busy"] == "50%" and row["rows per forward"] == "3.25"
    first.pass_share, first.admission_share = 0.375, 0.0625  # the step scheduler's split of its busy time
    assert "| 50% (38% passes, 6% admission) |" in bench.format_table([first])
    assert row["p50 ms"] == "n/a" and row["TTFT p50 ms"] == "n/a"
    assert "| n/a | n/a |" in rows[3] and rows[3].endswith("| n/a |")


def test_request_specs_plain_and_mixed(bench):
    plain = bench.request_specs(6, mixed=False, seed=0)
    assert [s.index for s in plain] == list(range(6))
    assert all(s.max_tokens is None and s.stream for s in plain)
    assert not any(s.stream for s in bench.request_specs(6, mixed=True, seed=0, stream=False))
    mixed = bench.request_specs(40, mixed=True, seed=1)
    assert mixed == bench.request_specs(40, mixed=True, seed=1)
    assert {s.max_tokens for s in mixed} == {4, 8, 16} and {s.stream for s in mixed} == {True, False}
    assert [s.question for s in mixed[:6]] == [s.question for s in plain]
    body = json.loads(bench.spec_body(mixed[0]))
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert body.get("max_tokens") == mixed[0].max_tokens and body.get("stream", False) == mixed[0].stream


def test_bad_arguments_are_refused_naming_the_values(bench, capsys):
    for argv, message in [
        (["--servers", "call,batched"], "unknown server kind 'batched'"),
        (["--servers", "step,step"], "names a kind twice"),
        (["--loads", "0.3,x"], "--loads must be a comma-separated list of floats, got '0.3,x'"),
        (["--loads", "0.3,-1"], "--loads must all be > 0"),
        (["--servers", "step,sequential"], "fractions of the call server's capacity"),
        (["--concurrency", "none"], "--loads needs a closed-loop level"),
        (["--requests", "0"], "got 0, 2, 128, 20.0"),
        (["--model-only-rows", "-1"], "--model-only-rows must be 0 or at least 32 per round (64 for 2 rounds), got -1"),
        (["--model-only-rows", "90", "--rounds", "3"], "(96 for 3 rounds), got 90"),
    ]:
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err
    args = bench.parse_args(["--servers", "step,sequential", "--rate", "2,4", "--concurrency", "none"])
    assert args.rate_list == [2.0, 4.0] and args.load_list == [] and args.levels == []


def test_json_is_written_whole(bench, tmp_path):
    path = tmp_path / "out.json"
    bench.write_json(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


# ---------------------------------------------------------------------------------------------- the client


class SlowChatServer:
    """A loopback server in the OpenAI shape: every chat answer takes `delay` s before its first text and
    `tail` s more to finish; streamed as SSE when asked. `/health` counts forwards as one per request."""

    def __init__(self, delay: float, tail: float, cut: bool = False) -> None:
        owner = self
        self.lock, self.arrivals, self.requests = threading.Lock(), [], 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - the http.server name
                with owner.lock:
                    body = {"status": "ok", "forward_passes": owner.requests, "forward_rows": 2 * owner.requests}
                self._send(200, "application/json", json.dumps(body).encode())

            def do_POST(self):  # noqa: N802
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.arrivals.append(time.perf_counter())
                    owner.requests += 1
                time.sleep(delay)
                if not request.get("stream"):
                    time.sleep(tail)
                    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "red circle"}}]}
                    return self._send(200, "application/json", json.dumps(answer).encode())
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("x-llada-batch-size", "3")
                self.end_headers()
                for delta, pause in [({"role": "assistant", "content": ""}, 0), ({"content": "red"}, tail), ({}, 0)]:
                    self.wfile.write(f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(pause)
                self.wfile.write(b'data: {"choices": [{"index": 0, "delta": {"content": " circle"}}]}\n\n')
                if not cut:  # else the connection closes mid-stream
                    self.wfile.write(b"data: [DONE]\n\n")

            def _send(self, status, kind, data):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_open_loop_sends_on_schedule_while_earlier_answers_are_slow_and_times_the_first_token(bench):
    server = SlowChatServer(delay=0.4, tail=0.3)
    try:
        specs = [bench.RequestSpec(0, "q", None, True), bench.RequestSpec(1, "q", 8, False)]
        work = bench.Workload(specs, [json.dumps({"stream": s.stream}).encode() for s in specs], timeout=10)
        schedule = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]  # every answer takes >= 0.7 s: six in flight at once
        started = time.perf_counter()
        records, wall, before, after = bench.run_open(SimpleNamespace(url=server.url), schedule, work, first=0)
        arrivals = [t - started for t in server.arrivals]
    finally:
        server.close()
    assert all(r.ok for r in records), [r.error for r in records]
    # each request reached the server near its scheduled time (sent on its own thread), not after earlier answers
    for due, arrived in zip(schedule, sorted(arrivals)):
        assert due <= arrived + 0.01 and arrived < due + 0.15
    assert [r.text for r in records] == ["red circle"] * 6
    streamed = [r for r in records if specs[r.spec].stream]
    assert len(streamed) == 3 and all(0.35 < r.ttft < 0.65 and r.latency >= r.ttft + 0.25 for r in streamed)
    assert all(r.ttft is None and r.latency >= 0.65 for r in records if not specs[r.spec].stream)
    assert all(r.call_rows == 3 for r in streamed)
    assert 1.15 < wall < 2.5  # the last one due at 0.5 s, answered >= 0.7 s later
    result = bench.summarize("call", "open 60%", records, wall, before, after, load=0.6, offered_per_s=10.0)
    assert result.rows_per_forward == pytest.approx(2.0) and result.answered == 6 and result.send_lag_p95_ms < 100
    # the closed loop: 2 clients, 4 requests, one after another per client
    server = SlowChatServer(delay=0.2, tail=0.1)
    try:
        records, wall, _, _ = bench.run_closed(SimpleNamespace(url=server.url), 2, work, 1, count=4, seconds=30)
    finally:
        server.close()
    assert len(records) == 4 and all(r.ok for r in records) and [r.spec for r in records] == [1, 0, 1, 0]
    assert 0.6 < wall < 1.6  # two rounds of >= 0.3 s each


def test_a_refused_connection_or_a_cut_stream_is_a_failure_not_an_answer(bench):
    record = bench.RequestRecord(0, 0.0, 0.0)
    bench.send("http://127.0.0.1:9", b"{}", True, record, time.perf_counter(), timeout=2)  # port 9: discard
    assert not record.ok and record.error and record.latency is not None
    server = SlowChatServer(delay=0.0, tail=0.0, cut=True)
    try:
        record = bench.RequestRecord(0, 0.0, 0.0)
        bench.send(server.url, b'{"stream": true}', True, record, time.perf_counter(), timeout=5)
    finally:
        server.close()
    assert not record.ok and record.error == "the event stream ended without data: [DONE]"


def test_in_process_singles_use_the_request_settings_and_the_ceiling_counts_every_row(bench):
    from llada_v.demo.app import load_demo
    from llada_v.demo.scenes import make_sample
    from llada_v.inference import chat_prompt, generate_texts, generation_config_for, user_message

    specs = bench.request_specs(6, mixed=True, seed=2)
    local = bench.InProcess(1, specs, fast=False)
    alone = local.singles(specs, {0, 3, 5})
    model, processor = load_demo()
    for index in (0, 3, 5):
        sample = make_sample(f"bench-{index}")
        config = generation_config_for(model.generation_config, {"max_new_tokens": specs[index].max_tokens})
        text = chat_prompt(processor, [user_message(sample["qa"][0][0], 1)], system_prompt="")
        assert alone[index] == generate_texts(model, processor, [text], [[sample["image"]]], config)[0][0]
    assert set(alone) == {0, 3, 5}
    for part in range(2):
        local.run_part(part, 2, [1, 4])  # one pass each
    assert local.rows == {1: 6, 4: 6} and [size for size, _ in local.rates()] == [1, 4]
    assert all(rate > 0 for _, rate in local.rates())
    started = time.perf_counter()
    local.run_part(0, 2, [4], seconds=0.5)  # passes over 3 rows until half a second has passed
    assert time.perf_counter() - started >= 0.5 and local.rows[4] > 6 and (local.rows[4] - 6) % 3 == 0


def test_cpu_table_gives_cores_by_role_and_replica_milliseconds_per_answer(bench):
    step = level(bench, "step", "closed c=32", answers_per_s=40.0, concurrency=32)
    step.cpu_cores = {"replica": 1.6, "proxy": 0.3, "ray": 0.05, "client": 0.4}
    call = level(bench, "call", "open 60%", load=0.6)  # no CPU figures: no row
    lines = bench.format_cpu_table([step, call]).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| step | closed c=32 | 1.60 | 0.30 | 0.05 | 0.40 | 40.0 |"  # 1.6 cores / 40 answers/s


def test_a_tally_adds_cpu_only_over_its_own_parts(bench):
    tally = bench.Tally()
    cpu = lambda replica, client: {"cpu": {"replica": replica, "proxy": 0.0, "ray": 0.0, "client": client}}  # noqa: E731
    tally.add(([], 1.0, cpu(10.0, 5.0), cpu(11.5, 5.5)))
    tally.add(([], 1.0, cpu(12.0, 7.0), cpu(13.0, 7.25)))  # the other server ran in between (client 5.5 -> 7.0)
    assert tally.cpu == {"replica": 2.5, "proxy": 0.0, "ray": 0.0, "client": 0.75}
