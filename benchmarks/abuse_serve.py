"""`llada-v serve` under hostile requests: does a steady stream of normal requests still get its answers in time,
and does the replica stay small and alive? (docs/serving.md, "Limits and security").

One server starts on 127.0.0.1 with the demo model and its default limits. Two phases of `--phase-seconds`
each send the same steady stream of normal requests (demo scenes as data URLs, `--normal-rate` per second):

- clean: only the normal stream;
- abuse: the normal stream plus, at the same time, every hostile kind (each at most `--hostile-each` requests,
  `--hostile-concurrency` at once, none launched after the phase ends):
  `thin` (two 1 x `--thin-width` PNGs in one prompt), `huge` (`--huge-images` PNGs of `--huge-side` squared
  pixels), `trickle` (an http image URL on a local server that sends its headers, then one byte every
  `--trickle-interval` s), `overlong` (a `--overlong-mib` MiB text prompt, under the body limit), `cross_site`
  (a normal body posted as `text/plain` with a foreign `Origin`, what a web page can send without a CORS
  preflight), `nested` (JSON nested `--nest-depth` levels deep).

Printed: per kind the count and the status codes, the normal requests' p50/p95 latency in both phases, the
replica's peak RSS in both phases (sampled every 0.2 s), the 5xx answers (the target is none), and whether the
server still answers a normal request at the end. The run is bounded by count and by time; the server is stopped
at the end and the script checks that none of its processes is left.

    python benchmarks/abuse_serve.py --phase-seconds 40 --json abuse_serve.json
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import http.server
import io
import json
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import MODEL, ServerProcess, health, request_bodies  # noqa: E402

REPLICA_MARK = "ServeReplica:llada-v"
TARGET_RSS_GROWTH = 1.5 * 2**30
TARGET_P95_RATIO = 2.0


# ---------------------------------------------------------------------------------------------- request bodies


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(question: str, urls: list[str] = ()) -> bytes:
    content = [*({"type": "image_url", "image_url": {"url": url}} for url in urls), {"type": "text", "text": question}]
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode()


class Trickle:
    """A loopback HTTP server whose images never finish: headers, then one byte every `interval` s (at most
    `limit` s per connection, so the benchmark ends even if the server under test waited forever)."""

    def __init__(self, interval: float, limit: float = 120) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server name
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                started = time.time()
                try:
                    while time.time() - started < limit:
                        self.wfile.write(b"\x89")
                        self.wfile.flush()
                        time.sleep(interval)
                except OSError:  # the server under test gave up: good
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slow.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hostile_requests(args: argparse.Namespace, trickle_url: str, normal: bytes) -> dict[str, tuple[bytes, dict]]:
    """Each hostile kind: (body, extra headers)."""
    thin = png_url(Image.new("RGB", (1, args.thin_width), (200, 30, 30)))
    huge = png_url(Image.new("RGB", (args.huge_side, args.huge_side), (30, 30, 200)))
    overlong = "What color is the triangle ? " * (args.overlong_mib * 2**20 // 29)
    depth = args.nest_depth
    return {
        "thin": (chat("Which colors are there?", [thin, thin]), {}),
        "huge": (chat("Which colors are there?", [huge] * args.huge_images), {}),
        "trickle": (chat("Which colors are there?", [trickle_url]), {}),
        "overlong": (chat(overlong), {}),
        "cross_site": (normal, {"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://evil.example"}),
        "nested": (b"[" * depth + b"]" * depth, {}),
    }


# ---------------------------------------------------------------------------------------------- sending


def post(url: str, body: bytes, headers: dict, timeout: float) -> tuple[float, str]:
    """(latency s, status) of one POST; the status is the HTTP code or the client-side error's name."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json", **headers})  # fmt: skip
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return time.perf_counter() - started, str(response.status)
    except urllib.error.HTTPError as err:
        err.read()
        return time.perf_counter() - started, str(err.code)
    except OSError as err:  # connection reset, timeout: no answer at all
        return time.perf_counter() - started, type(err).__name__


class RssSampler:
    """The replica's resident memory, sampled every `every` s while `start`ed; `peak()` since the last `reset`."""

    def __init__(self, server: ServerProcess, every: float = 0.2) -> None:
        self.server, self.every = server, every
        self.values: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def replica(self) -> psutil.Process | None:
        for child in psutil.Process(self.server.process.pid).children(recursive=True):
            try:
                if REPLICA_MARK in " ".join(child.cmdline()):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return None

    def _run(self) -> None:
        process = None
        while not self.stop.wait(self.every):
            try:
                process = process if process is not None and process.is_running() else self.replica()
                if process is not None:
                    self.values.append(process.memory_info().rss)
            except psutil.NoSuchProcess:
                process = None

    def reset(self) -> None:
        self.values = []

    def peak(self) -> int:
        return max(self.values, default=0)


def run_phase(url: str, normal: list[bytes], args: argparse.Namespace,
              hostile: dict[str, tuple[bytes, dict]] | None) -> dict:  # fmt: skip
    """The normal stream for `--phase-seconds` (one request every 1/rate s, whatever the answers take), with the
    hostile kinds beside it; waits for every answer. Returns latencies and statuses per kind."""
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies: list[float] = []
    lock = threading.Lock()
    started = time.perf_counter()
    end = started + args.phase_seconds

    def record(kind: str, outcome: tuple[float, str]) -> None:
        with lock:
            statuses[kind][outcome[1]] += 1
            if kind == "normal" and outcome[1] == "200":
                latencies.append(outcome[0])

    def hostile_worker(kind: str, body: bytes, headers: dict, counter: collections.Counter) -> None:
        while time.perf_counter() < end:
            with lock:
                if counter[kind] >= args.hostile_each:
                    return
                counter[kind] += 1
            record(kind, post(url, body, headers, timeout=args.request_timeout))

    workers = args.hostile_concurrency * len(hostile or {})
    with concurrent.futures.ThreadPoolExecutor(max(1, workers) + 64) as pool:
        futures = []
        launched: collections.Counter = collections.Counter()
        for kind, (body, headers) in (hostile or {}).items():
            for _ in range(args.hostile_concurrency):
                futures.append(pool.submit(hostile_worker, kind, body, headers, launched))
        index = 0
        while time.perf_counter() < end:
            body = normal[index % len(normal)]
            futures.append(pool.submit(lambda b=body: record("normal", post(url, b, {}, args.request_timeout))))
            index += 1
            time.sleep(max(0.0, started + index / args.normal_rate - time.perf_counter()))
        for future in futures:
            future.result()
    return {"seconds": time.perf_counter() - started, "latencies": sorted(latencies),
            "statuses": {kind: dict(counter) for kind, counter in statuses.items()}}  # fmt: skip


def percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(round(share * (len(values) - 1))))] if values else float("nan")


def still_answers(url: str, body: bytes) -> bool:
    try:
        return health(url)["status"] == "ok" and post(url, body, {}, timeout=120)[1] == "200"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- report


def report(clean: dict, abuse: dict, rss: dict, answers_at_end: bool, leftover: list[int]) -> dict:
    kinds = sorted(set(clean["statuses"]) | set(abuse["statuses"]), key=lambda k: (k != "normal", k))
    print(f"{'phase':<7} {'kind':<11} {'count':>5}  status codes")
    for phase, result in (("clean", clean), ("abuse", abuse)):
        for kind in kinds:
            counts = result["statuses"].get(kind)
            if counts:
                codes = ", ".join(f"{code} x{n}" for code, n in sorted(counts.items()))
                print(f"{phase:<7} {kind:<11} {sum(counts.values()):>5}  {codes}")
    summary = {
        "normal_p50_ms": {p: 1000 * percentile(r["latencies"], 0.5) for p, r in (("clean", clean), ("abuse", abuse))},
        "normal_p95_ms": {p: 1000 * percentile(r["latencies"], 0.95) for p, r in (("clean", clean), ("abuse", abuse))},
        "replica_peak_rss_mib": {p: v / 2**20 for p, v in rss.items()},
        "server_errors": sum(
            n
            for r in (clean, abuse)
            for c in r["statuses"].values()
            for code, n in c.items()
            if code.isdigit() and int(code) >= 500
        ),  # fmt: skip
        "no_answer": sum(
            n for r in (clean, abuse) for c in r["statuses"].values() for code, n in c.items() if not code.isdigit()
        ),  # fmt: skip
        "answers_at_end": answers_at_end,
        "processes_left": leftover,
    }
    p50, p95, peak = summary["normal_p50_ms"], summary["normal_p95_ms"], summary["replica_peak_rss_mib"]
    growth = peak["abuse"] - peak["clean"]
    ratio = p95["abuse"] / p95["clean"]
    print(
        f"normal latency p50 / p95: clean {p50['clean']:.0f} / {p95['clean']:.0f} ms, "
        f"abuse {p50['abuse']:.0f} / {p95['abuse']:.0f} ms (p95 x{ratio:.2f}; target <= {TARGET_P95_RATIO})"
    )
    print(
        f"replica peak RSS: clean {peak['clean']:.0f} MiB, abuse {peak['abuse']:.0f} MiB "
        f"(+{growth:.0f} MiB; target < {TARGET_RSS_GROWTH / 2**20:.0f})"
    )
    print(f"5xx answers: {summary['server_errors']} (target 0); no answer at all: {summary['no_answer']}")
    print(f"server answers at the end: {'yes' if answers_at_end else 'NO'}; processes left after stop: {leftover}")
    summary["targets_met"] = bool(
        summary["server_errors"] == 0
        and growth * 2**20 < TARGET_RSS_GROWTH
        and ratio <= TARGET_P95_RATIO
        and answers_at_end
    )
    print(f"targets met: {'yes' if summary['targets_met'] else 'NO'}")
    return {**summary, "clean": clean, "abuse": abuse}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-seconds", type=float, default=40, help="length of each phase (default 40)")
    parser.add_argument("--normal-rate", type=float, default=2.0, help="normal requests per second (default 2)")
    parser.add_argument("--hostile-each", type=int, default=6, help="at most this many requests per hostile kind")
    parser.add_argument("--hostile-concurrency", type=int, default=2, help="requests of one kind at once")
    parser.add_argument("--thin-width", type=int, default=6000, help="the thin images are 1 x N (default 6000)")
    parser.add_argument("--huge-side", type=int, default=9400, help="the huge images are N x N (default 9400)")
    parser.add_argument("--huge-images", type=int, default=8, help="huge images per request (default 8)")
    parser.add_argument("--overlong-mib", type=int, default=19, help="text of an overlong prompt (default 19 MiB)")
    parser.add_argument("--nest-depth", type=int, default=100_000, help="levels of the nested JSON")
    parser.add_argument("--trickle-interval", type=float, default=3.0, help="s between the slow server's bytes")
    parser.add_argument("--request-timeout", type=float, default=180.0, help="client timeout per request")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the replica (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)

    normal = request_bodies(16)
    trickle = Trickle(args.trickle_interval)
    hostile = hostile_requests(args, trickle.url, normal[0])
    with tempfile.TemporaryDirectory() as logs:
        server = ServerProcess("abuse", ["--max-queued-requests", "64"], args.threads, logs)
        try:
            server.wait_ready(300)
            sampler = RssSampler(server)
            post(server.url, normal[0], {}, 120)  # warm-up, outside both phases
            sampler.reset()
            clean = run_phase(server.url, normal, args, None)
            rss = {"clean": sampler.peak()}
            sampler.reset()
            abuse = run_phase(server.url, normal, args, hostile)
            rss["abuse"] = sampler.peak()
            sampler.stop.set()
            answers_at_end = still_answers(server.url, normal[1])
        finally:
            leftover = server.stop()
            trickle.close()
    summary = report(clean, abuse, rss, answers_at_end, leftover)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if summary["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
