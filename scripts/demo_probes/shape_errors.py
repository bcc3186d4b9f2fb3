"""What a demo checkpoint answers to "Which shape is <colour>?" with two or three objects, by the position of the
object asked about (counted from the left): right, the leftmost shape, another shape in the scene, or an absent one.

    python scripts/demo_probes/shape_errors.py DIR [--seed 12345] [--n 200]

Takes the first `n` held-out shape and existence questions with two or three objects of the seed (as the tally
in docs/demo.md, runs 24-26) and prints one count per (objects, position, outcome).
"""

import argparse
from collections import Counter

import torch

from llada_v.demo.app import answer_questions, held_out_sample, load_demo
from llada_v.demo.task import normalise_answer

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model_dir")
parser.add_argument("--seed", type=int, default=12345)
parser.add_argument("--n", type=int, default=200)
args = parser.parse_args()
torch.set_num_threads(1)
model, processor = load_demo(args.model_dir)
pool = (held_out_sample(args.seed, i) for i in range(100 * args.n))
samples = [s for s in pool if s["types"][0] in ("shape", "exists") and len(s["objects"]) > 1][: args.n]
samples = [s for s in samples if s["types"][0] == "shape"]
answers = answer_questions(model, processor, [s["image"] for s in samples], [s["qa"][0][0] for s in samples])
tally = Counter()
for sample, answer in zip(samples, answers):
    answer, truth = normalise_answer(answer.text), sample["qa"][0][1]
    by_left = sorted(sample["objects"], key=lambda o: o.center_x)
    position = [o.shape for o in by_left].index(truth)
    if answer == truth:
        outcome = "right"
    elif answer == by_left[0].shape:
        outcome = "leftmost"
    elif answer in {o.shape for o in by_left}:
        outcome = "other-present"
    else:
        outcome = "absent"
    tally[(len(by_left), f"position {position}", outcome)] += 1
print(f"{len(samples)} shape questions")
for key, count in sorted(tally.items()):
    print(*key, count)
