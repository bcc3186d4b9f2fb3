"""Train several demo-model variants side by side and measure each one's held-out accuracy.

    python scripts/demo_sweep.py --out DIR [--device cuda] [--workers 2] [--parallel 6] \
        [--eval-seeds 12345,777] [--eval-n 200] NAME:KEY=VALUE,KEY=VALUE ...

Each NAME:... is one run of `python -m llada_v.demo.train` with the given options (KEY is the option without
the leading dashes, e.g. `vision-lr=2e-4,stage2-steps=6000`); runs start as subprocesses, at most `--parallel`
at a time. After a run trains, its checkpoint is evaluated with `llada_v.demo.app.evaluate` on every
`--eval-seeds` held-out set. Results are appended to `DIR/results.jsonl` as they arrive (one JSON line per
run: the options, wall time, first/last loss, accuracy per seed and per question type), so a sweep cut short
still reports the finished runs. This is an exploration tool: the shipped model comes from the CPU default
run of `llada_v.demo.train`, and a CUDA run is not bit-identical to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def parse_run(spec: str) -> tuple[str, list[str]]:
    name, _, options = spec.partition(":")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"run name must be letters, digits, '-' or '_', got {name!r} in {spec!r}")
    argv = []
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {item!r} in {spec!r}")
        argv += [f"--{key}", value]
    return name, argv


def evaluate_checkpoint(path: str, device: str, seeds: list[int], n: int) -> dict:
    import torch

    from llada_v import LladaVModel, LladaVProcessor
    from llada_v.demo.app import evaluate

    model = LladaVModel.from_pretrained(path, dtype=torch.float32).eval().to(device)
    processor = LladaVProcessor.from_pretrained(path)
    return {str(seed): evaluate(model, processor, seed, n) for seed in seeds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers per run")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--eval-seeds", default="12345")
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--evaluate", help=argparse.SUPPRESS)
    parser.add_argument("runs", nargs="*")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.eval_seeds.split(",")]
    if args.evaluate:
        print(json.dumps(evaluate_checkpoint(args.evaluate, args.device, seeds, args.eval_n)))
        return 0
    if not args.runs or args.out is None:
        parser.error("give --out and at least one NAME:KEY=VALUE,... run")
    runs = [parse_run(spec) for spec in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pending, active = list(runs), {}
    while pending or active:
        while pending and len(active) < args.parallel:
            name, options = pending.pop(0)
            log = open(args.out / f"{name}.log", "w")  # noqa: SIM115 - closed when the run ends
            command = [sys.executable, "-m", "llada_v.demo.train", "--output-dir", str(args.out / name),
                       "--device", args.device, "--dataloader-workers", str(args.workers), *options]  # fmt: skip
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            active[name] = (proc, log, options, time.time())
            print(f"started {name}: {' '.join(options)}", flush=True)
        time.sleep(2)
        for name, (proc, log, options, started) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[name]
            record = {"name": name, "options": options, "returncode": proc.returncode,
                      "train_seconds": round(time.time() - started, 1)}  # fmt: skip
            text = (args.out / f"{name}.log").read_text()
            if proc.returncode == 0:
                summary = json.loads(text[text.rindex("\n{") :])
                record.update(first_loss=summary["first_loss"], last_loss=summary["last_loss"])
                evaluation = subprocess.run(
                    [sys.executable, __file__, "--evaluate", str(args.out / name), "--device", args.device,
                     "--eval-seeds", args.eval_seeds, "--eval-n", str(args.eval_n)],
                    capture_output=True, text=True, env=env, check=False,
                )  # fmt: skip
                if evaluation.returncode == 0:
                    record["eval"] = json.loads(evaluation.stdout.strip().splitlines()[-1])
                else:
                    record["eval_error"] = evaluation.stderr[-2000:]
            else:
                record["log_tail"] = text[-2000:]
            with results_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            accuracy = {s: round(100 * r["accuracy"], 1) for s, r in record.get("eval", {}).items()}
            print(f"finished {name}: rc {proc.returncode}, {record['train_seconds']} s, accuracy {accuracy}",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
