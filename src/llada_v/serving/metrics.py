"""A replica's serving metrics, in the Prometheus text format at `GET /metrics` and, on a Ray cluster that collects
metrics, through `ray.serve.metrics` (the same names, scraped from Ray's metrics export like every Ray Serve metric).

Both schedulers fill them (docs/serving.md, "Metrics"): requests running and waiting, rows per forward, the time of
an engine step, answer tokens, time to first streamed text and request latency. Counters only grow; the
rows-per-forward mean over an interval is the change of `llada_v_forward_rows_total` over the change of
`llada_v_forward_passes_total`.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Histogram:
    """Cumulative buckets as Prometheus defines them (`le` upper bounds, `+Inf` last), with sum and count."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


# name -> (type, help); the one list of what a replica exports.
METRICS = {
    "llada_v_running_requests": ("gauge", "Requests in the running batch (being denoised)."),
    "llada_v_waiting_requests": ("gauge", "Requests admitted and waiting to join the running batch."),
    "llada_v_requests_total": ("counter", "Requests finished (answered, failed or cancelled)."),
    "llada_v_requests_cancelled_total": ("counter", "Requests whose client went away before the answer was done."),
    "llada_v_forward_passes_total": ("counter", "Decoder calls (forward passes) run by the replica."),
    "llada_v_forward_rows_total": ("counter", "Rows summed over the decoder calls."),
    "llada_v_answer_tokens_total": ("counter", "Answer tokens returned (up to each answer's stop)."),
    "llada_v_admission_seconds_total": (
        "counter",
        "Step scheduler: time spent starting joining requests (their prompts and images encoded).",
    ),
    "llada_v_pass_seconds_total": (
        "counter",
        "Step scheduler: time spent in denoising passes (forwards, predictions, commits, streaming callbacks).",
    ),
    "llada_v_rows_per_forward": ("histogram", "Rows of each decoder call."),
    "llada_v_step_seconds": ("histogram", "Duration of one scheduler step (step scheduler) or call (call scheduler)."),
    "llada_v_time_to_first_token_seconds": ("histogram", "From admission to the first streamed text."),
    "llada_v_request_seconds": ("histogram", "From admission to the end of the answer."),
}


class ServingMetrics:
    """Thread-safe metrics of one replica; `render()` is the Prometheus exposition text."""

    def __init__(self, scheduler: str, replica: str = "") -> None:
        self.scheduler, self.replica = scheduler, replica
        self._lock = threading.Lock()
        self.values: dict[str, float] = {n: 0.0 for n, (kind, _) in METRICS.items() if kind != "histogram"}
        self.histograms = {
            "llada_v_rows_per_forward": Histogram(ROWS_BUCKETS),
            "llada_v_step_seconds": Histogram(SECONDS_BUCKETS),
            "llada_v_time_to_first_token_seconds": Histogram(SECONDS_BUCKETS),
            "llada_v_request_seconds": Histogram(SECONDS_BUCKETS),
        }
        self._ray = _RayMetrics.create()

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self.values[name] = value
        self._ray.set(name, value)

    def add(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self.values[name] += value
        self._ray.add(name, value)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.histograms[name].observe(value)
        self._ray.observe(name, value)

    def forwards(self, rows: list[int]) -> None:
        """Count decoder calls of `rows` rows each."""
        if not rows:
            return
        self.add("llada_v_forward_passes_total", len(rows))
        self.add("llada_v_forward_rows_total", sum(rows))
        for n in rows:
            self.observe("llada_v_rows_per_forward", n)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.values)

    def render(self) -> str:
        labels = f'scheduler="{self.scheduler}"' + (f',replica="{self.replica}"' if self.replica else "")
        lines = []
        with self._lock:
            for name, (kind, text) in METRICS.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind != "histogram":
                    lines.append(f"{name}{{{labels}}} {_number(self.values[name])}")
                    continue
                histogram, cumulative = self.histograms[name], 0
                for bound, count in zip((*histogram.buckets, float("inf")), histogram.counts):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else _number(bound)
                    lines.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
                lines.append(f"{name}_sum{{{labels}}} {_number(histogram.total)}")
                lines.append(f"{name}_count{{{labels}}} {histogram.count}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _RayMetrics:
    """The same metrics through `ray.serve.metrics` when running in a Ray Serve replica (no-ops elsewhere)."""

    def __init__(self, objects: dict) -> None:
        self.objects = objects

    @classmethod
    def create(cls) -> _RayMetrics:
        try:
            from ray import serve
            from ray.serve import metrics

            serve.get_replica_context()  # raises outside a replica
        except Exception:  # noqa: BLE001 - no Ray, or not in a replica: the /metrics text only
            return cls({})
        objects = {}
        try:
            for name, (kind, text) in METRICS.items():
                if kind == "gauge":
                    objects[name] = metrics.Gauge(name, description=text)
                elif kind == "counter":
                    objects[name] = metrics.Counter(name, description=text)
                else:
                    bounds = ROWS_BUCKETS if name == "llada_v_rows_per_forward" else SECONDS_BUCKETS
                    objects[name] = metrics.Histogram(name, description=text, boundaries=list(bounds))
        except Exception as err:  # noqa: BLE001 - metrics must never stop a replica from serving
            logger.warning("Ray Serve metrics unavailable (%s: %s); /metrics still works", type(err).__name__, err)
            return cls({})
        return cls(objects)

    def set(self, name: str, value: float) -> None:
        if name in self.objects:
            self.objects[name].set(value)

    def add(self, name: str, value: float) -> None:
        if name in self.objects and value > 0:
            self.objects[name].inc(value)

    def observe(self, name: str, value: float) -> None:
        if name in self.objects:
            self.objects[name].observe(value)
