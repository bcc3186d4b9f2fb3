"""Held-out accuracy per question type x number of objects for a demo checkpoint dir."""
import sys, json, torch
from collections import defaultdict
from llada_v.demo import load_demo, held_out_sample, answer_questions
from llada_v.demo_task import normalise_answer
torch.set_num_threads(2)
path, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, processor = load_demo(path)
samples = [held_out_sample(seed, i) for i in range(n)]
c, t = defaultdict(int), defaultdict(int)
for s0 in range(0, n, 64):
    b = samples[s0:s0+64]
    ans = answer_questions(model, processor, [s["image"] for s in b], [s["qa"][0][0] for s in b])
    for s, a in zip(b, ans):
        k = (s["types"][0], len(s["objects"]))
        t[k] += 1; c[k] += normalise_answer(a.text) == s["qa"][0][1]
tot = sum(c.values()) / n
print(f"{path} seed {seed} n {n}: {100*tot:.1f}%")
for kind in ("color", "shape", "count", "exists", "leftmost"):
    print(kind, " ".join(f"{k}obj {100*c[(kind,k)]/max(1,t[(kind,k)]):.0f}% ({t[(kind,k)]})" for k in (1,2,3)),
          f"all {100*sum(c[(kind,k)] for k in (1,2,3))/max(1,sum(t[(kind,k)] for k in (1,2,3))):.1f}%")
