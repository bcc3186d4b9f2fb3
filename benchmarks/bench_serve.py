"""Latency and throughput of `llada-v serve` on the demo model, its schedulers side by side in one run
(docs/performance.md, "Serving"; docs/serving.md).

Two servers start side by side on 127.0.0.1 (separate local Ray instances, one replica each, the same CPU
threads): by default `--scheduler call` (whole `diffusion_generate` calls, Ray Serve's `@serve.batch`) and
`--scheduler step` (requests join and leave the running batch at every denoising step); `--servers` picks others
(`sequential`: the call scheduler with `--max-batch-size 1`). Every request streams (`stream: true`), so the time
to the first token is measured with the latency.

1. Closed loop (`--concurrency`, default 32): that many clients each sending one request after another. The
   highest level is each server's maximum sustained throughput; the call server's answers/s there is the
   capacity the open-loop rates are fractions of.
2. Open loop (`--loads`, default 0.3,0.6,0.9 of that capacity, or `--rate` in requests/s): Poisson arrivals
   (exponential gaps from a `random.Random(--seed)`), each request sent at its scheduled time on its own
   thread, whatever the earlier ones are doing. A level is `--duration` seconds of arrivals (at most
   `--requests`).

Every level runs in `--rounds` parts (open loop: its time in equal windows), the servers taking turns in
alternating order, so both meet the same machine load. Reported per server and level: answers/s over the level's
wall time, latency p50/p95/p99 (send to last byte), time to first token p50/p95 (the first chunk with text), mean
rows per model forward (the replica's `/health` counters `forward_passes` / `forward_rows`, where the server has
them), failures, and how many answers equal the same prompt answered alone by `generate_texts` in this process.
At the top closed-loop level a third turn, as long as a server's, runs `generate_texts` in this process in batches
of 1, 8 and 32 (no server, the replica's threads, the same prompts and settings): the ceiling batching in a
server can reach on this machine. The ratio lines
compare the step scheduler with the call scheduler (p95 latency at 60% load, maximum throughput) and with that
ceiling. Both servers are stopped at the end and the script checks that none of their processes is left.

    python benchmarks/bench_serve.py --duration 20 --json bench_serve.json
    python benchmarks/bench_serve.py --mixed --loads 0.6 --duration 10                # max_tokens 4/8/16, some not streamed
    python benchmarks/bench_serve.py --servers call,sequential --concurrency 1,8,32 --loads none --no-stream
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

import psutil

from llada_v.demo.scenes import make_sample

MODEL = "llada-v-demo"
BATCH_SIZE_HEADER = "x-llada-batch-size"
MIXED_MAX_TOKENS = (4, 8, 16)
CEILING_SIZES = [1, 8, 32]  # batch sizes of the in-process measurement; 32 is the ceiling
# what each kind of server is started with, on top of the shared options (ServerProcess)
SERVER_KINDS = ("call", "step", "sequential")
TARGETS = {"p95_step_over_call_at_60": 0.6, "max_step_over_call": 1.2, "max_step_over_ceiling": 0.9}


# ---------------------------------------------------------------------------------------------- pure pieces


def poisson_schedule(rate: float, seed: int, duration: float | None = None, count: int | None = None) -> list[float]:
    """Send times (seconds from the start of a level) of a Poisson process of `rate` requests/s: exponential
    gaps drawn from `random.Random(seed)`, the arrivals before `duration` and at most `count` of them (at least
    one bound must be given)."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a finite number > 0 requests/s, got {rate}")
    if duration is None and count is None:
        raise ValueError("give a duration or a count of arrivals")
    if (duration is not None and duration <= 0) or (count is not None and count < 1):
        raise ValueError(f"duration must be > 0 and count >= 1, got {duration} and {count}")
    rng, times, now = random.Random(seed), [], 0.0
    while count is None or len(times) < count:
        now += rng.expovariate(rate)
        if duration is not None and now >= duration:
            break
        times.append(now)
    return times


def split_schedule(times: list[float], duration: float, parts: int) -> list[list[float]]:
    """The arrivals of a level in `parts` equal windows of its `duration`, each shifted to start at 0 (a
    Poisson process's arrivals in a window are again one); empty windows are left out."""
    if parts < 1 or duration <= 0:
        raise ValueError(f"parts must be >= 1 and duration > 0, got {parts} and {duration}")
    window = duration / parts
    split: list[list[float]] = [[] for _ in range(parts)]
    for at in times:
        index = min(int(at // window), parts - 1)
        split[index].append(at - index * window)
    return [part for part in split if part]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between the closest ranks (numpy's default);
    None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_sse_line(line: bytes | str) -> tuple[str, str] | None:
    """One line of an OpenAI chat-completion event stream: ("delta", text) for a chunk's content (may be ""),
    ("error", message) for an error event, ("done", "") for `[DONE]`; None for anything else (blank lines,
    `event:` names, chunks without choices such as usage or `llada.canvas`)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return ("done", "")
    body = json.loads(payload)
    if "error" in body:
        error = body["error"]
        return ("error", error.get("message", str(error)) if isinstance(error, dict) else str(error))
    choices = body.get("choices") or []
    if not choices:
        return None
    return ("delta", (choices[0].get("delta") or {}).get("content") or "")


@dataclass
class RequestSpec:
    """One benchmark prompt: demo scene `index`, its first question, the answer length (None: the server's
    default) and whether it streams."""

    index: int
    question: str
    max_tokens: int | None
    stream: bool


def request_specs(count: int, mixed: bool, seed: int, stream: bool = True) -> list[RequestSpec]:
    """`count` prompts on the scenes `make_sample(f"bench-{i}")`. Plain: the demo's default settings, all
    streamed (none with `stream=False`). `mixed`: max_tokens drawn from 4/8/16 and every other request on average
    not streamed, from `random.Random(seed)`."""
    rng = random.Random(seed)
    specs = []
    for index in range(count):
        question = make_sample(f"bench-{index}")["qa"][0][0]
        if mixed:
            specs.append(RequestSpec(index, question, rng.choice(MIXED_MAX_TOKENS), rng.random() < 0.5 and stream))
        else:
            specs.append(RequestSpec(index, question, None, stream))
    return specs


@dataclass
class RequestRecord:
    """What one request met: times in seconds from its level's start / its own send."""

    spec: int  # index into the specs
    scheduled: float  # when it was due (open loop), or when it was sent (closed loop)
    sent: float
    latency: float | None = None  # send -> last byte
    ttft: float | None = None  # send -> first chunk with text (streamed requests)
    text: str | None = None
    error: str | None = None
    call_rows: int = 0  # the x-llada-batch-size header

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


@dataclass
class LevelResult:
    server: str
    level: str  # "closed c=32", "open 60%" or "open 4.0/s"
    concurrency: int | None
    load: float | None  # fraction of the call server's capacity (open loop)
    offered_per_s: float | None  # Poisson rate (open loop)
    sent: int
    answered: int
    failed: int
    seconds: float
    answers_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    send_lag_p95_ms: float | None  # open loop: how late this process sent, p95 (should be ~0)
    rows_per_forward: float | None  # /health forward_rows / forward_passes, over the level
    mean_call_rows: float | None  # the x-llada-batch-size header
    busy_share: float | None  # /health generate_seconds over the level's wall time
    pass_share: float | None = None  # step scheduler: /health pass_seconds (denoising passes) over the wall time
    admission_share: float | None = None  # step scheduler: /health admission_seconds (starting requests) over it
    cpu_cores: dict | None = None  # CPU seconds per wall second over the level: replica, proxy, other Ray, client
    equal_to_singles: int | None = None
    compared: int | None = None
    errors: list = field(default_factory=list)  # up to 5 distinct messages


def _ms(value: float | None) -> float | None:
    return None if value is None else 1000 * value


def _delta_ratio(before: dict, after: dict, numerator: str, denominator: str) -> float | None:
    if numerator not in after or denominator not in after:
        return None
    den = after[denominator] - before.get(denominator, 0)
    return (after[numerator] - before.get(numerator, 0)) / den if den else None


def summarize(server: str, level: str, records: list[RequestRecord], seconds: float, before: dict, after: dict,
              concurrency: int | None = None, load: float | None = None,
              offered_per_s: float | None = None) -> LevelResult:  # fmt: skip
    """One server's figures at one level from its request records, the level's wall time and the replica's
    `/health` before and after (counters it lacks are None)."""
    answered = [r for r in records if r.ok]
    latencies = [r.latency for r in answered]
    ttfts = [r.ttft for r in answered if r.ttft is not None]
    lags = [r.sent - r.scheduled for r in records] if offered_per_s is not None else []
    rows = [r.call_rows for r in answered if r.call_rows]
    generate = None
    if "generate_seconds" in after and seconds > 0:
        generate = (after["generate_seconds"] - before.get("generate_seconds", 0)) / seconds
    errors = list(dict.fromkeys(r.error for r in records if r.error is not None))[:5]
    step = after.get("scheduler") == "step"  # the time split exists for the step scheduler only
    return LevelResult(
        server=server, level=level, concurrency=concurrency, load=load, offered_per_s=offered_per_s,
        sent=len(records), answered=len(answered), failed=len(records) - len(answered), seconds=seconds,
        answers_per_s=len(answered) / seconds if seconds > 0 else 0.0,
        p50_ms=_ms(percentile(latencies, 50)), p95_ms=_ms(percentile(latencies, 95)),
        p99_ms=_ms(percentile(latencies, 99)), ttft_p50_ms=_ms(percentile(ttfts, 50)),
        ttft_p95_ms=_ms(percentile(ttfts, 95)), send_lag_p95_ms=_ms(percentile(lags, 95)),
        rows_per_forward=_delta_ratio(before, after, "forward_rows", "forward_passes"),
        mean_call_rows=sum(rows) / len(rows) if rows else None, busy_share=generate, errors=errors,
        pass_share=_delta_share(before, after, "pass_seconds", seconds) if step else None,
        admission_share=_delta_share(before, after, "admission_seconds", seconds) if step else None,
    )  # fmt: skip


def _delta_share(before: dict, after: dict, name: str, seconds: float) -> float | None:
    """The increase of the `/health` counter `name` over `seconds` of wall time (None where the server lacks it)."""
    if name not in after or seconds <= 0:
        return None
    return (after[name] - before.get(name, 0)) / seconds


def count_equal(records: list[RequestRecord], singles: dict[int, str]) -> tuple[int, int]:
    """(answers equal to their single answer, answers compared)."""
    answered = [r for r in records if r.ok]
    return sum(r.text == singles[r.spec] for r in answered), len(answered)


def target_ratios(results: list[LevelResult], ceiling: float | None) -> dict:
    """The ratios the targets are about, from the call and step servers' results: step p95 / call p95 at the open
    level whose load is nearest 60%, step / call answers/s at the highest closed-loop concurrency (the maximum
    sustained throughput), and step's maximum / `ceiling` (in-process answers/s in batches of 32). A ratio whose
    figures are missing is None."""
    by_key = {(r.server, r.level): r for r in results}
    ratios: dict = {"p95_step_over_call_at_60": None, "p95_load": None, "max_step_over_call": None,
                    "max_step_over_ceiling": None, "max_concurrency": None}  # fmt: skip
    loads = sorted({r.load for r in results if r.load is not None}, key=lambda load: (abs(load - 0.6), load))
    for load in loads:
        call, step = (next((r for r in results if r.server == s and r.load == load), None) for s in ("call", "step"))
        if call and step and call.p95_ms and step.p95_ms is not None:
            ratios.update(p95_step_over_call_at_60=step.p95_ms / call.p95_ms, p95_load=load)
            break
    closed = [r.concurrency for r in results if r.concurrency is not None]
    if closed:
        top = max(closed)
        level = f"closed c={top}"
        call, step = by_key.get(("call", level)), by_key.get(("step", level))
        ratios["max_concurrency"] = top
        if call and step and call.answers_per_s > 0:
            ratios["max_step_over_call"] = step.answers_per_s / call.answers_per_s
        if step and ceiling:
            ratios["max_step_over_ceiling"] = step.answers_per_s / ceiling
    return ratios


def _cell(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(results: list[LevelResult]) -> str:
    """The results as one Markdown table."""
    lines = [
        "| server | level | offered req/s | sent | failed | answers/s | p50 ms | p95 ms | p99 ms | TTFT p50 ms | "
        "TTFT p95 ms | rows per forward | rows per call | busy | equal to singles |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in results:
        equal = "n/a" if r.compared is None else f"{r.equal_to_singles}/{r.compared}"
        busy = "n/a" if r.busy_share is None else f"{100 * r.busy_share:.0f}%"
        if r.busy_share is not None and r.pass_share is not None and r.admission_share is not None:
            busy += f" ({100 * r.pass_share:.0f}% passes, {100 * r.admission_share:.0f}% admission)"
        lines.append(
            f"| {r.server} | {r.level} | {_cell(r.offered_per_s, 2)} | {r.sent} | {r.failed} | "
            f"{r.answers_per_s:.2f} | {_cell(r.p50_ms)} | {_cell(r.p95_ms)} | {_cell(r.p99_ms)} | "
            f"{_cell(r.ttft_p50_ms)} | {_cell(r.ttft_p95_ms)} | {_cell(r.rows_per_forward, 2)} | "
            f"{_cell(r.mean_call_rows, 1)} | {busy} | {equal} |"
        )  # fmt: skip
    return "\n".join(lines)


def format_cpu_table(results: list[LevelResult]) -> str:
    """Where the CPU went at each level: cores busy (CPU seconds per wall second) in the model replica, the HTTP
    proxy, the rest of Ray and the benchmark's clients, and the replica's CPU milliseconds per answer."""
    lines = ["| server | level | replica cores | proxy cores | other Ray cores | client cores | replica CPU ms per answer |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        if not r.cpu_cores:
            continue
        cores = r.cpu_cores
        per_answer = 1000 * cores["replica"] / r.answers_per_s if r.answers_per_s else None
        lines.append(
            f"| {r.server} | {r.level} | {cores['replica']:.2f} | {cores['proxy']:.2f} | {cores['ray']:.2f} | "
            f"{cores['client']:.2f} | {_cell(per_answer, 1)} |"
        )
    return "\n".join(lines)


def format_ratios(ratios: dict) -> list[str]:
    """The ratio lines, each with its target and whether it is met."""

    def line(name: str, text: str, higher: bool) -> str:
        value, target = ratios.get(name), TARGETS[name]
        if value is None:
            return f"{text}: n/a (target {'>=' if higher else '<='} {target})"
        met = value >= target if higher else value <= target
        return f"{text}: {value:.2f} (target {'>=' if higher else '<='} {target}: {'met' if met else 'NOT met'})"

    load = ratios.get("p95_load")
    at = "60%" if load is None else f"{100 * load:.0f}%"
    top = ratios.get("max_concurrency")
    return [
        line("p95_step_over_call_at_60", f"step p95 / call p95 latency at {at} load", higher=False),
        line("max_step_over_call", f"step / call maximum throughput (closed loop, concurrency {top})", higher=True),
        line("max_step_over_ceiling", "step maximum throughput / in-process batches of 32", higher=True),
    ]


def parse_list(text: str, kind: type, name: str) -> list:
    """A comma-separated list ("" or "none": empty), every value > 0; ValueError naming `name`."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if any(not value > 0 for value in values):
        raise ValueError(f"{name} must all be > 0, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------- the servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_sample(index: int) -> dict:
    return make_sample(f"bench-{index}")


def image_url(index: int) -> str:
    buffer = io.BytesIO()
    bench_sample(index)["image"].save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def spec_body(spec: RequestSpec) -> bytes:
    content = [
        {"type": "image_url", "image_url": {"url": image_url(spec.index)}},
        {"type": "text", "text": spec.question},
    ]
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    if spec.max_tokens is not None:
        body["max_tokens"] = spec.max_tokens
    if spec.stream:
        body["stream"] = True
    return json.dumps(body).encode()


def request_bodies(count: int) -> list[bytes]:
    """`count` non-streamed requests with the demo's default settings (benchmarks/abuse_serve.py sends them)."""
    return [spec_body(RequestSpec(i, bench_sample(i)["qa"][0][0], None, False)) for i in range(count)]


def kind_arguments(kind: str, args: argparse.Namespace) -> list[str]:
    """The `llada-v serve` options of a server kind."""
    if kind == "call":
        return ["--scheduler", "call", "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms",
                str(args.batch_wait_ms)]  # fmt: skip
    if kind == "sequential":
        return ["--scheduler", "call", "--max-batch-size", "1"]
    if kind == "step":
        return ["--scheduler", "step", "--max-batch-size", str(args.max_batch_size),
                *(["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else [])]  # fmt: skip
    raise ValueError(f"unknown server kind {kind!r}; choose from {', '.join(SERVER_KINDS)}")


class ServerProcess:
    def __init__(self, name: str, extra: list[str], threads: int, log_dir: str) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(log_dir, f"{name}.log"), "w")
        command = [sys.executable, "-m", "llada_v.cli", "serve", "--port", str(self.port),
                   "--num-cpus-per-replica", str(threads), "--max-queued-requests", "256", *extra]  # fmt: skip
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.children: dict[int, psutil.Process] = {}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.process.returncode} (see {self.log.name})")
            try:
                health(self.url)
                self.children = {p.pid: p for p in psutil.Process(self.process.pid).children(recursive=True)}
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"{self.name} server not ready after {timeout} s (see {self.log.name})")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by the server's processes, by role: the model replica, the
        HTTP proxy, the rest of Ray (and the CLI process), and this benchmark process (the clients)."""
        used = {"replica": 0.0, "proxy": 0.0, "ray": 0.0}
        try:
            processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            processes = []
        for process in processes:
            try:
                command, times = " ".join(process.cmdline()), process.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            role = "replica" if "ServeReplica" in command else "proxy" if "ProxyActor" in command else "ray"
            used[role] += times.user + times.system
        client = psutil.Process().cpu_times()
        used["client"] = client.user + client.system
        return used

    def stop(self) -> list[int]:
        """SIGINT, wait, and return the pids of its processes still alive (should be none)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
        time.sleep(2)
        left = [pid for pid, p in self.children.items() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for pid in left:
            self.children[pid].kill()
        self.log.close()
        return left


def snapshot(server: ServerProcess) -> dict:
    """The replica's `/health` and, for a server this script started, the CPU its processes used so far."""
    cpu = getattr(server, "cpu_seconds", None)
    return {**health(server.url), **({"cpu": cpu()} if cpu is not None else {})}


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.loads(response.read())


def send(url: str, body: bytes, stream: bool, record: RequestRecord, started: float, timeout: float) -> None:
    """Send one chat completion now and fill `record` (times from `started`, the level's start)."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    sent = time.perf_counter()
    record.sent = sent - started
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            record.call_rows = int(response.headers.get(BATCH_SIZE_HEADER) or 0)
            if stream:
                parts, done = [], False
                for line in response:
                    event = parse_sse_line(line)
                    if event is None:
                        continue
                    kind, text = event
                    if kind == "done":
                        done = True
                    elif kind == "error":
                        record.error = f"stream error: {text}"
                    elif kind == "delta" and text:
                        if record.ttft is None:
                            record.ttft = time.perf_counter() - sent
                        parts.append(text)
                record.text = "".join(parts)
                if not done and record.error is None:
                    record.error = "the event stream ended without data: [DONE]"
            else:
                record.text = json.loads(response.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as err:
        record.error = f"HTTP {err.code}: {err.read()[:200].decode('utf-8', 'replace')}"
    except (OSError, ValueError, KeyError) as err:
        record.error = f"{type(err).__name__}: {err}"
    record.latency = time.perf_counter() - sent


@dataclass
class Workload:
    specs: list[RequestSpec]
    bodies: list[bytes]
    timeout: float

    def send(self, url: str, spec: int, record: RequestRecord, started: float) -> None:
        send(url, self.bodies[spec], self.specs[spec].stream, record, started, self.timeout)


def run_closed(server: ServerProcess, concurrency: int, work: Workload, first: int, count: int | None,
               seconds: float) -> tuple[list[RequestRecord], float, dict, dict]:  # fmt: skip
    """`concurrency` clients each sending one request after another (prompts from `first` on, cycling), until
    `count` requests are sent or `seconds` have passed. Returns the records, the wall time and `/health` before
    and after."""
    before = snapshot(server)
    records: list[RequestRecord] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def client() -> None:
        while time.perf_counter() - started < seconds:
            with lock:
                if count is not None and len(records) >= count:
                    return
                record = RequestRecord((first + len(records)) % len(work.specs), 0.0, 0.0)
                records.append(record)
            record.scheduled = time.perf_counter() - started
            work.send(server.url, record.spec, record, started)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    return records, wall, before, snapshot(server)


def run_open(server: ServerProcess, schedule: list[float], work: Workload,
             first: int) -> tuple[list[RequestRecord], float, dict, dict]:  # fmt: skip
    """Request i sent at `schedule[i]` seconds after the start on a thread of its own (the pool has one per
    request, so a send never waits for an earlier answer). The wall time runs from the start to the last
    answer."""
    before = snapshot(server)
    records = [RequestRecord((first + i) % len(work.specs), at, 0.0) for i, at in enumerate(schedule)]
    with concurrent.futures.ThreadPoolExecutor(max(1, len(schedule))) as pool:
        started = time.perf_counter()
        futures = []
        for record in records:
            delay = started + record.scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(work.send, server.url, record.spec, record, started))
        for future in futures:
            future.result()
    wall = max(r.sent + (r.latency or 0.0) for r in records) if records else 0.0
    return records, wall, before, snapshot(server)


# ---------------------------------------------------------------------------------------------- in this process


class InProcess:
    """The demo model in this process (`threads` torch threads, as a replica): the prompts answered alone, and
    `generate_texts` on `ceiling_specs` (the servers' first prompts, their settings) in batches of each size, one
    settings group after another, no server: the ceiling batching in a server can reach on this machine. The
    ceiling is measured in parts (`run_part`) that take turns with the servers, so that all meet the same machine
    load."""

    def __init__(self, threads: int, ceiling_specs: list[RequestSpec], fast: bool) -> None:
        import torch

        from llada_v.demo.app import load_demo

        torch.set_num_threads(threads)
        self.model, self.processor = load_demo()
        self.fast, self.seconds, self.rows = fast, {}, {}
        self.batch = [(self.prompt(s.question), [bench_sample(s.index)["image"]], s.max_tokens) for s in ceiling_specs]
        for max_tokens in dict.fromkeys(item[2] for item in self.batch):  # warm-up: a new batch shape is slower
            group = [item for item in self.batch if item[2] == max_tokens]
            for size in CEILING_SIZES:
                self.generate(group[:size], self.config(max_tokens))

    def config(self, max_tokens: int | None):
        """The settings the server gives a request: the demo's generation config with its max_tokens."""
        from llada_v.inference import generation_config_for

        overrides = {} if max_tokens is None else {"max_new_tokens": max_tokens}
        return generation_config_for(self.model.generation_config, overrides, fast=self.fast)

    def prompt(self, question: str) -> str:
        from llada_v.inference import chat_prompt, user_message

        return chat_prompt(self.processor, [user_message(question, 1)], system_prompt="")

    def generate(self, items: list, config) -> list[str]:
        import torch

        from llada_v.inference import generate_texts

        texts, images = [item[0] for item in items], [item[1] for item in items]
        with torch.inference_mode():
            return generate_texts(self.model, self.processor, texts, images, config)[0]

    def run_part(self, part: int, parts: int, sizes: list[int], seconds: float = 0.0) -> None:
        """Part `part` of `parts` of the prompts, in batches of each size (order alternating by part) within
        each settings group; each size repeats whole passes over the part until `seconds / len(sizes)` have
        passed (at least one pass), so that the turn lasts as long as a server's."""
        size_of_part = -(-len(self.batch) // parts)
        items = self.batch[part * size_of_part : (part + 1) * size_of_part]
        groups: dict = {}
        for item in items:
            groups.setdefault(item[2], []).append(item)
        configs = {max_tokens: self.config(max_tokens) for max_tokens in groups}
        for size in sizes if part % 2 == 0 else sizes[::-1]:
            started = time.perf_counter()
            while True:
                for max_tokens, group in groups.items():
                    for start in range(0, len(group), size):
                        self.generate(group[start : start + size], configs[max_tokens])
                self.rows[size] = self.rows.get(size, 0) + len(items)
                if time.perf_counter() - started >= seconds / len(sizes):
                    break
            self.seconds[size] = self.seconds.get(size, 0.0) + time.perf_counter() - started

    def rates(self) -> list[tuple[int, float]]:
        """(batch size, rows/s) over the parts run."""
        return [(size, self.rows[size] / self.seconds[size]) for size in self.seconds if self.seconds[size] > 0]

    def singles(self, specs: list[RequestSpec], used: set[int]) -> dict[int, str]:
        """Each used prompt answered alone (batch of 1, the settings the server gives it, no system prompt,
        `fast` as the servers)."""
        answers = {}
        for index in sorted(used):
            spec = specs[index]
            item = (self.prompt(spec.question), [bench_sample(spec.index)["image"]], spec.max_tokens)
            answers[index] = self.generate([item], self.config(spec.max_tokens))[0]
        return answers


# ---------------------------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="call,step", help=f"two or more of {', '.join(SERVER_KINDS)}")
    parser.add_argument("--concurrency", default="32", help="closed-loop client counts; the highest is the "
                        "maximum-throughput level and the call server's capacity ('none': skip)")  # fmt: skip
    parser.add_argument("--loads", default="0.3,0.6,0.9", help="open-loop rates as fractions of the call "
                        "server's capacity ('none': no open loop)")  # fmt: skip
    parser.add_argument("--rate", default=None, help="open-loop rates in requests/s (instead of --loads)")
    parser.add_argument("--duration", "--max-seconds", type=float, default=20.0,
                        help="seconds per level and server: open loop, of arrivals; closed loop, of sending")  # fmt: skip
    parser.add_argument("--requests", type=int, default=None, help="at most this many requests per level and server")
    parser.add_argument("--rounds", type=int, default=2, help="every level in parts, the servers taking turns")
    parser.add_argument("--seed", type=int, default=0, help="of the arrivals and of --mixed")
    parser.add_argument("--mixed", action="store_true", help="max_tokens 4/8/16 and half the requests not streamed")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="no request streams (no TTFT)")
    parser.add_argument("--prompts", type=int, default=128, help="distinct prompts (requests cycle over them)")
    parser.add_argument("--fast", action="store_true", help="servers and singles with the fast-decoding preset")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="call server: rows per call; step server: requests in the running batch",
    )
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, help="of the call server")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="of the step server (default: its own)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each replica")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--model-only-rows", type=int, default=192,
                        help="prompts for the in-process ceiling (0: skip)")  # fmt: skip
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        args.server_kinds = args.servers.split(",")
        for kind in args.server_kinds:
            kind_arguments(kind, args)
        if len(set(args.server_kinds)) != len(args.server_kinds):
            raise ValueError(f"--servers names a kind twice: {args.servers!r}")
        args.levels = parse_list(args.concurrency, int, "--concurrency")
        args.load_list = [] if args.rate else parse_list(args.loads, float, "--loads")
        args.rate_list = parse_list(args.rate, float, "--rate") if args.rate else []
    except ValueError as err:
        parser.error(str(err))
    if args.load_list and not args.levels:
        parser.error("--loads needs a closed-loop level (--concurrency) to measure the call server's capacity; "
                     "give --rate instead")  # fmt: skip
    if args.load_list and "call" not in args.server_kinds:
        parser.error(f"--loads are fractions of the call server's capacity, but --servers is {args.servers!r}")
    if (args.requests is not None and args.requests < 1) or args.rounds < 1 or args.prompts < 1 or args.duration <= 0:
        parser.error(f"--requests, --rounds and --prompts must be >= 1 and --duration > 0, got {args.requests}, "
                     f"{args.rounds}, {args.prompts}, {args.duration}")  # fmt: skip
    if args.model_only_rows < 0 or 0 < args.model_only_rows < max(CEILING_SIZES) * args.rounds:
        parser.error(f"--model-only-rows must be 0 or at least {max(CEILING_SIZES)} per round "
                     f"({max(CEILING_SIZES) * args.rounds} for {args.rounds} rounds), got {args.model_only_rows}")  # fmt: skip
    if args.json and os.path.exists(args.json) and not os.path.isfile(args.json):
        parser.error(f"--json {args.json!r} exists and is not a file")
    return args


def write_json(path: str, data: dict) -> None:
    """Written to a temporary file next to `path`, then renamed: never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".bench_serve.", dir=folder)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=1)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


@dataclass
class Tally:
    """One server's parts of one level, added up."""

    records: list = field(default_factory=list)
    seconds: float = 0.0
    before: dict | None = None  # /health before its first part
    after: dict | None = None  # and after its last
    cpu: dict = field(default_factory=dict)  # CPU seconds by role, summed over its own parts only

    def add(self, got: tuple[list[RequestRecord], float, dict, dict]) -> None:
        records, seconds, before, after = got
        self.records += records
        self.seconds += seconds
        self.before = self.before if self.before is not None else before
        self.after = after
        for role, used in after.get("cpu", {}).items():
            self.cpu[role] = self.cpu.get(role, 0.0) + used - before["cpu"][role]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs = request_specs(args.prompts, args.mixed, args.seed, args.stream)
    work = Workload(specs, [spec_body(spec) for spec in specs], args.timeout)
    # the model in this process, loaded before the servers start (no load on them yet); its ceiling prompts are
    # the servers' first ones, with their settings
    local = InProcess(args.threads, request_specs(args.model_only_rows, args.mixed, args.seed, args.stream), args.fast)
    log_dir = tempfile.mkdtemp(prefix="bench_serve_")
    fast = ["--fast"] if args.fast else []
    servers = [ServerProcess(kind, kind_arguments(kind, args) + fast, args.threads, log_dir)
               for kind in args.server_kinds]  # fmt: skip
    results: list[LevelResult] = []
    records: dict[tuple[str, str], list[RequestRecord]] = {}
    next_prompt = 0

    def record_level(level: str, tallies: dict[str, Tally], **where) -> None:
        for server in servers:
            tally = tallies[server.name]
            records[(server.name, level)] = tally.records
            results.append(summarize(server.name, level, tally.records, tally.seconds, tally.before, tally.after,
                                     **where))  # fmt: skip
            r = results[-1]
            if tally.cpu and tally.seconds > 0:
                r.cpu_cores = {role: used / tally.seconds for role, used in tally.cpu.items()}
            print(f"{server.name} {level}: {r.answers_per_s:.2f} answers/s, p95 {_cell(r.p95_ms)} ms", file=sys.stderr)

    try:
        for server in servers:
            server.wait_ready(300)
            for spec in range(min(4, len(specs))):  # warm-up
                warm = RequestRecord(spec, 0.0, 0.0)
                work.send(server.url, spec, warm, time.perf_counter())
                if not warm.ok:
                    raise RuntimeError(f"{server.name} server: a warm-up request failed: {warm.error}")
        # closed loop, in parts, the servers (and at the top level the in-process ceiling) taking turns
        for concurrency in args.levels:
            tallies = {server.name: Tally() for server in servers}
            count = None if args.requests is None else -(-args.requests // args.rounds)
            for part in range(args.rounds):
                sent = {name: len(t.records) for name, t in tallies.items()}
                for server in servers if part % 2 == 0 else servers[::-1]:
                    tallies[server.name].add(run_closed(server, concurrency, work, next_prompt, count,
                                                        args.duration / args.rounds))  # fmt: skip
                next_prompt += max(len(t.records) - sent[name] for name, t in tallies.items())
                if concurrency == max(args.levels) and args.model_only_rows:
                    local.run_part(part, args.rounds, CEILING_SIZES, args.duration / args.rounds)
            record_level(f"closed c={concurrency}", tallies, concurrency=concurrency)
        # open loop: Poisson arrivals, the level's time split in parts, the servers taking turns
        rates: list[tuple[str, float | None, float]] = [(f"open {rate:g}/s", None, rate) for rate in args.rate_list]
        if args.load_list:
            top = f"closed c={max(args.levels)}"
            capacity = next(r.answers_per_s for r in results if r.server == "call" and r.level == top)
            if capacity <= 0:
                raise RuntimeError(f"the call server answered nothing at {top}; no capacity to take fractions of")
            rates = [(f"open {100 * load:.0f}%", load, load * capacity) for load in args.load_list]
        for number, (level, load, rate) in enumerate(rates):
            schedule = poisson_schedule(rate, args.seed + number, args.duration, args.requests)
            tallies = {server.name: Tally() for server in servers}
            for part, times in enumerate(split_schedule(schedule, args.duration, args.rounds)):
                for server in servers if (number + part) % 2 == 0 else servers[::-1]:
                    tallies[server.name].add(run_open(server, times, work, next_prompt))
                next_prompt += len(times)
            record_level(level, tallies, load=load, offered_per_s=rate)
    finally:
        left = {server.name: server.stop() for server in servers}
    if args.model_only_rows and not args.levels:  # no closed loop to take turns with
        for part in range(args.rounds):
            local.run_part(part, args.rounds, CEILING_SIZES, args.duration / args.rounds)
    used = {r.spec for got in records.values() for r in got if r.ok}
    print(f"servers stopped; answering {len(used)} prompts alone in this process", file=sys.stderr)
    alone = local.singles(specs, used)
    by_level = {(r.server, r.level): r for r in results}
    for key, got in records.items():
        by_level[key].equal_to_singles, by_level[key].compared = count_equal(got, alone)
    ceiling = local.rates()
    ratios = target_ratios(results, dict(ceiling).get(32))
    print(format_table(results))
    print(format_cpu_table(results))
    for size, rate in ceiling:
        print(f"generate_texts in-process, batches of {size}: {rate:.2f} rows/s ({rate / ceiling[0][1]:.2f}x batch 1)")
    for line in format_ratios(ratios):
        print(line)
    for r in results:
        for error in r.errors:
            print(f"{r.server} {r.level}: failed: {error}")
    print(f"processes left after stopping: {left}; server logs in {log_dir}")
    if args.json:
        write_json(args.json, {"args": vars(args), "results": [asdict(r) for r in results], "ratios": ratios,
                               "targets": TARGETS, "left": left, "model_only_rows_per_s": dict(ceiling)})  # fmt: skip
    return 0 if not any(left.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
