"""Write the example lmms-eval task's data: 24 rendered demo scenes with one question each (held-out seeds
`example-0` .. `example-23`, disjoint from the demo's training scenes).

    python examples/lmms_eval_task/make_task.py      # rewrites images/ and scenes.jsonl beside this file

Each record has the question and its one-word answer (for `demo_scenes_gen`) and the question's answer choices
with the index of the right one (for `demo_scenes_mc`): every colour, every shape, the counts one to five, or
yes/no. The scenes are those of the shipped demo model's task (`llada_v.demo.tasks.SHIPPED_TASK`).
"""

import json
from pathlib import Path

from llada_v.demo.tasks import SHIPPED_TASK, get_task

TASK = get_task(SHIPPED_TASK)

HERE = Path(__file__).resolve().parent
NUM_SCENES = 24


def choices_for(kind: str) -> list[str]:
    return {
        "color": sorted(TASK.COLORS),
        "shape": list(TASK.SHAPES),
        "leftmost": list(TASK.SHAPES),
        "count": list(TASK.NUMBER_WORDS[1 : TASK.MAX_OBJECTS + 1]),
        "exists": ["yes", "no"],
    }[kind]


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    records = []
    for i in range(NUM_SCENES):
        sample = TASK.make_sample(f"example-{i}")
        (question, answer), kind = sample["qa"][0], sample["types"][0]
        image = f"images/scene{i:02d}.png"
        sample["image"].save(HERE / image)
        choices = choices_for(kind)
        records.append({"id": i, "image": image, "question": question, "answer": answer, "type": kind,
                        "choices": choices, "label": choices.index(answer)})  # fmt: skip
    with open(HERE / "scenes.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    print(f"wrote {len(records)} scenes to {HERE}")


if __name__ == "__main__":
    main()
