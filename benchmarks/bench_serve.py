"""Throughput and latency of `llada-v serve` on the demo model: batching on vs `--max-batch-size 1`, measured in
one run (docs/performance.md, "Serving").

Two servers start side by side on 127.0.0.1 (separate local Ray instances, one replica each, the same CPU
threads), then for each concurrency level the same requests (demo scenes as data URLs, the demo's default
settings) go to both servers in `--rounds` parts, the servers taking turns, so both meet the same machine load.
Each level sends at most `--requests` requests per server and stops launching new ones after `--max-seconds`. Reported: requests/s, latency p50/p95,
the mean rows per `diffusion_generate` call (the `x-llada-batch-size` header) and the share of the wall time
the replica spent inside `generate_texts` (its `/health` counters). Both servers are stopped at the end and the
script checks that none of their processes is left. Last, the same prompts go through `generate_texts` in this
process in batches of 1, 8 and 32 (no server): the ceiling that batching in a server can reach on this machine.

    python benchmarks/bench_serve.py --concurrency 1,8,32 --requests 64 --json bench_serve.json
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

import psutil

from llada_v.demo.task import make_sample

MODEL = "llada-v-demo"


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    failed: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    mean_batch: float
    generate_share: float  # of the wall time, inside generate_texts on the replica


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_sample(index: int) -> dict:
    return make_sample(f"bench-{index}")


def request_bodies(count: int) -> list[bytes]:
    bodies = []
    for index in range(count):
        sample = bench_sample(index)
        buffer = io.BytesIO()
        sample["image"].save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": sample["qa"][0][0]}]
        bodies.append(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode())
    return bodies


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


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.loads(response.read())


def post(url: str, body: bytes, timeout: float) -> tuple[float, int, int]:
    """(latency s, status, batch size) of one chat completion."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return time.perf_counter() - started, response.status, int(response.headers["x-llada-batch-size"])
    except urllib.error.HTTPError as err:
        return time.perf_counter() - started, err.code, 0


@dataclass
class Tally:
    """What one server answered at one level, over the rounds."""

    latencies: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    failed: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0


def run_round(server: ServerProcess, concurrency: int, bodies: list[bytes], max_seconds: float, tally: Tally) -> None:
    """`concurrency` clients each sending one request after another, until `bodies` or `max_seconds` run out."""
    before = health(server.url)
    results: list[tuple[float, int, int]] = []
    queue = iter(range(len(bodies)))
    started = time.perf_counter()

    def client() -> None:
        for index in queue:  # the iterator is shared: each request is sent once
            if time.perf_counter() - started > max_seconds:
                return
            results.append(post(server.url, bodies[index], timeout=300))

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    tally.seconds += time.perf_counter() - started
    tally.generate_seconds += health(server.url)["generate_seconds"] - before["generate_seconds"]
    for latency, status, batch in results:
        if status == 200:
            tally.latencies.append(latency * 1000)
            tally.batches.append(batch)
        else:
            tally.failed += 1


def run_level(servers: list[ServerProcess], concurrency: int, bodies: list[bytes], rounds: int,
              max_seconds: float) -> list[LevelResult]:  # fmt: skip
    """The level in `rounds` parts, the servers taking turns (order alternating), so that both meet the same
    machine load; per server the parts are added up."""
    tallies = {server.name: Tally() for server in servers}
    size = -(-len(bodies) // rounds)
    for part in range(rounds):
        order = servers if part % 2 == 0 else servers[::-1]
        for server in order:
            run_round(server, concurrency, bodies[part * size : (part + 1) * size], max_seconds / rounds,
                      tallies[server.name])  # fmt: skip
    results = []
    for name, tally in tallies.items():
        latencies = sorted(tally.latencies)
        results.append(LevelResult(
            mode=name, concurrency=concurrency, requests=len(latencies), failed=tally.failed, seconds=tally.seconds,
            requests_per_s=len(latencies) / tally.seconds, p50_ms=statistics.median(latencies),
            p95_ms=latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
            mean_batch=statistics.mean(tally.batches), generate_share=tally.generate_seconds / tally.seconds,
        ))  # fmt: skip
    return results


def model_only(batch_sizes: list[int], rows: int, threads: int, rounds: int) -> list[tuple[int, float]]:
    """Rows/s of `generate_texts` in this process on the benchmark prompts, per batch size (no server); the batch
    sizes take turns in `rounds` parts, as the servers do."""
    import torch

    from llada_v.demo.app import load_demo
    from llada_v.inference import chat_prompt, generate_texts, generation_config_for, user_message

    torch.set_num_threads(threads)
    model, processor = load_demo()
    config = generation_config_for(model.generation_config, {})
    samples = [bench_sample(index) for index in range(rows)]
    texts = [chat_prompt(processor, [user_message(s["qa"][0][0], 1)], system_prompt="") for s in samples]
    images = [[s["image"]] for s in samples]
    generate_texts(model, processor, texts[:4], images[:4], config)  # warm-up
    seconds = dict.fromkeys(batch_sizes, 0.0)
    part = -(-rows // rounds)
    for index in range(rounds):
        lo, hi = index * part, min(rows, (index + 1) * part)
        for size in batch_sizes if index % 2 == 0 else batch_sizes[::-1]:
            started = time.perf_counter()
            for start in range(lo, hi, size):
                end = min(hi, start + size)
                generate_texts(model, processor, texts[start:end], images[start:end], config)
            seconds[size] += time.perf_counter() - started
    return [(size, rows / seconds[size]) for size in batch_sizes]


def print_table(results: list[LevelResult]) -> None:
    print("| mode | concurrency | requests | failed | req/s | p50 ms | p95 ms | mean rows per generate call | "
          "time in generate_texts |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.mode} | {r.concurrency} | {r.requests} | {r.failed} | {r.requests_per_s:.2f} | {r.p50_ms:.0f} | "
              f"{r.p95_ms:.0f} | {r.mean_batch:.1f} | {100 * r.generate_share:.0f}% |")  # fmt: skip
    by_key = {(r.mode, r.concurrency): r for r in results}
    for concurrency in sorted({r.concurrency for r in results}):
        batched, single = by_key.get(("batched", concurrency)), by_key.get(("sequential", concurrency))
        if batched and single:
            print(f"concurrency {concurrency}: batched / sequential throughput = "
                  f"{batched.requests_per_s / single.requests_per_s:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per level and server (at most)")
    parser.add_argument("--rounds", type=int, default=3, help="parts of each level, the servers taking turns")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="per level and server: stop launching after")
    parser.add_argument("--max-batch-size", type=int, default=32, help="of the batched server")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, help="of the batched server")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each replica")
    parser.add_argument(
        "--model-only-rows", type=int, default=96, help="prompts for the no-server measurement (0: skip)"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in levels) or args.requests < 1 or args.rounds < 1:
        parser.error(f"concurrency levels, --requests and --rounds must be >= 1, got {levels}, {args.requests}, "
                     f"{args.rounds}")  # fmt: skip
    bodies = request_bodies(args.requests)
    log_dir = tempfile.mkdtemp(prefix="bench_serve_")
    servers = [
        ServerProcess(
            "batched",
            ["--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms)],
            args.threads,
            log_dir,
        ),  # fmt: skip
        ServerProcess("sequential", ["--max-batch-size", "1"], args.threads, log_dir),
    ]
    results: list[LevelResult] = []
    try:
        for server in servers:
            server.wait_ready(300)
            for body in bodies[:4]:  # warm-up
                post(server.url, body, timeout=300)
        for concurrency in levels:
            for result in run_level(servers, concurrency, bodies, args.rounds, args.max_seconds):
                results.append(result)
                print(f"{result.mode} c={concurrency}: {result.requests_per_s:.2f} req/s", file=sys.stderr)
    finally:
        left = {server.name: server.stop() for server in servers}
    print_table(results)
    print(f"processes left after stopping: {left}; server logs in {log_dir}")
    ceiling = model_only([1, 8, 32], args.model_only_rows, args.threads, args.rounds) if args.model_only_rows else []
    for size, rate in ceiling:
        print(f"generate_texts in-process, batches of {size}: {rate:.2f} rows/s ({rate / ceiling[0][1]:.2f}x batch 1)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": [asdict(r) for r in results], "left": left,
                       "model_only_rows_per_s": dict(ceiling)}, handle, indent=1)  # fmt: skip
    return 0 if not any(left.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
