"""Accuracy of a demo checkpoint on colour and shape questions with two or three objects, on training scenes
(seed 0's single-turn QA samples of `train_demo.write_training_data`, default settings) and on held-out scenes:
tells overfitting (right on training scenes only) from not having learned (wrong on both).

    python scripts/demo_probes/train_vs_held_out.py DIR [--n 400]
"""

import argparse
from collections import defaultdict

import torch

from llada_v.demo.app import answer_questions, held_out_sample, load_demo
from llada_v.demo.task import make_sample, normalise_answer
from llada_v.demo.train import DESCRIPTION_EVERY, QUESTION_WEIGHTS, TRAIN_SEED_OFFSET

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model_dir")
parser.add_argument("--n", type=int, default=400)
parser.add_argument(
    "--question-weights",
    choices=("default", "uniform"),
    default="default",
    help="the weights the checkpoint was trained with (runs <= 23: uniform)",
)
args = parser.parse_args()
torch.set_num_threads(2)
model, processor = load_demo(args.model_dir)
weights = dict(QUESTION_WEIGHTS) if args.question_weights == "default" else None


def wanted(sample: dict) -> bool:
    return sample["types"][0] in ("shape", "color") and len(sample["objects"]) > 1


def report(name: str, samples: list[dict]) -> None:
    correct, total = defaultdict(int), defaultdict(int)
    answers = answer_questions(model, processor, [s["image"] for s in samples], [s["qa"][0][0] for s in samples])
    for sample, answer in zip(samples, answers):
        key = f"{sample['types'][0]} {len(sample['objects'])} objects"
        total[key] += 1
        correct[key] += normalise_answer(answer.text) == sample["qa"][0][1]
    print(name, ", ".join(f"{k}: {100 * correct[k] / total[k]:.0f}% ({total[k]})" for k in sorted(total)))


train = []
for i in range(32_000):  # write_training_data's default number of samples
    # The single-turn QA samples of write_training_data (seed 0): not descriptions, not two-turn.
    if i % DESCRIPTION_EVERY == DESCRIPTION_EVERY - 1 or i % 4 == 3:
        continue
    sample = make_sample(TRAIN_SEED_OFFSET + i, turns=1, weights=weights)
    if wanted(sample):
        train.append(sample)
    if len(train) == args.n:
        break
report("training scenes:", train)
report("held-out scenes:", [s for s in (held_out_sample(12345, i) for i in range(10 * args.n)) if wanted(s)][: args.n])
