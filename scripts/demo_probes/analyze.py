"""Held-out accuracy per question type x number of objects for a demo checkpoint dir.

python scripts/demo_probes/analyze.py DIR SEED N
"""

import sys
from collections import defaultdict

import torch

from llada_v.demo.app import answer_questions, held_out_sample, load_demo
from llada_v.demo.task import QUESTION_TYPES, normalise_answer

torch.set_num_threads(2)
path, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, processor = load_demo(path)
samples = [held_out_sample(seed, i) for i in range(n)]
correct, total = defaultdict(int), defaultdict(int)
for start in range(0, n, 64):
    batch = samples[start : start + 64]
    answers = answer_questions(model, processor, [s["image"] for s in batch], [s["qa"][0][0] for s in batch])
    for sample, answer in zip(batch, answers):
        key = (sample["types"][0], len(sample["objects"]))
        total[key] += 1
        correct[key] += normalise_answer(answer.text) == sample["qa"][0][1]
print(f"{path} seed {seed} n {n}: {100 * sum(correct.values()) / n:.1f}%")
for kind in QUESTION_TYPES:
    by_objects = " ".join(
        f"{k}obj {100 * correct[(kind, k)] / max(1, total[(kind, k)]):.0f}% ({total[(kind, k)]})" for k in (1, 2, 3)
    )
    right, asked = (sum(counts[(kind, k)] for k in (1, 2, 3)) for counts in (correct, total))
    print(kind, by_objects, f"all {100 * right / max(1, asked):.1f}%")
