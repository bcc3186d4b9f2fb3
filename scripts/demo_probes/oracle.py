"""Oracle vision: train the demo's projector + language model on perfect per-patch scene labels instead of the
vision tower's features, then measure held-out accuracy by question type and number of objects.

    python scripts/demo_probes/oracle.py OUT [--stage2-steps 2000] [--description-every 3] [--mask-sampling count]

Every crop's patch token gets the 13 numbers of `train_demo.patch_targets` (shape, colour and order-from-left
distributions of the patch) times `--scale`, zero-padded to the vision width; they travel through the pipeline
inside `pixel_values` (the first pixels of each patch) and a replaced `LladaVModel.encode_vision` reads them back.
Everything else is `train_demo` (Stage 0 skipped). It tells whether the language side can learn the task at all.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

import llada_v.demo.train as td
from llada_v.demo.app import held_out_sample
from llada_v.demo.model import DEMO_CROP
from llada_v.demo.task import QUESTION_TYPES, normalise_answer
from llada_v.generation_utils import LladaVGenerationConfig
from llada_v.inference import chat_prompt, user_message
from llada_v.modeling_llada_v import LladaVModel

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--stage2-steps", type=int, default=2000)
parser.add_argument("--description-every", type=int, default=td.DESCRIPTION_EVERY)
parser.add_argument("--mask-sampling", default="count")
parser.add_argument("--scale", type=float, default=3.0)
parser.add_argument("--n", type=int, default=600)
args = parser.parse_args()
work = args.out.parent / (args.out.name + "_work")
PATCH = 14
SIDE = DEMO_CROP // PATCH
ORDERS = 4  # the shapes task: background and up to three objects from the left
DIM = len(td.SHAPE_CLASSES) + len(td.COLOR_CLASSES) + ORDERS


def oracle(size, objects, processor):
    targets = td.patch_targets(td.object_coverage(size, objects, processor), objects)[:3]  # shape, colour, order
    return torch.cat(targets, -1)  # (crops, 16, DIM)


def embed(pixel_values, features):
    out = torch.zeros_like(pixel_values)
    grid = features.view(features.shape[0], SIDE, SIDE, DIM)
    for r in range(SIDE):
        for c in range(SIDE):
            out[:, 0, r * PATCH, c * PATCH : c * PATCH + DIM] = grid[:, r, c]
    return out


def encode_vision(self, pixel_values):
    n = pixel_values.shape[0]
    feats = pixel_values[:, 0, ::PATCH, :].reshape(n, SIDE, SIDE, PATCH)[..., :DIM].reshape(n, SIDE * SIDE, DIM)
    return torch.nn.functional.pad(feats, (0, self.config.vision_config.hidden_size - DIM)) * args.scale


LladaVModel.encode_vision = encode_vision
_getitem = td.AnswerOnlyLabels.__getitem__
_records = {}


def getitem(self, index):
    if "all" not in _records:
        _records["all"] = json.loads((work / "data" / "data.json").read_text())
    item = _getitem(self, index)
    record = _records["all"][index]
    with Image.open(work / "data" / record["image"]) as image:
        size = image.size
    item["pixel_values"] = embed(item["pixel_values"], oracle(size, record["objects"], self.dataset.processor))
    return item


td.AnswerOnlyLabels.__getitem__ = getitem
summary = td.train_demo(
    args.out,
    stage2_steps=args.stage2_steps,
    vision_pretrain_steps=0,
    work_dir=work,
    description_every=args.description_every,
    mask_sampling=args.mask_sampling,
)
print("seconds", round(summary["seconds"]), {k: (v[0], v[-1]) for k, v in summary["losses"].items()})

model = LladaVModel.from_pretrained(str(args.out)).eval()
model.generation_config = LladaVGenerationConfig.from_pretrained(str(args.out))
processor = td.build_demo_processor(model.config, td.build_demo_tokenizer())
samples = [held_out_sample(12345, i) for i in range(args.n)]
correct, total = defaultdict(int), defaultdict(int)
for start in range(0, args.n, 50):
    batch = samples[start : start + 50]
    inputs = processor(
        images=[[s["image"]] for s in batch],
        text=[chat_prompt(processor, [user_message(s["qa"][0][0], 1)], system_prompt="") for s in batch],
        return_tensors="pt",
    )
    objects = [[{"shape": o.shape, "color": o.color, "box": list(o.box)} for o in s["objects"]] for s in batch]
    features = torch.cat([oracle(s["image"].size, objs, processor) for s, objs in zip(batch, objects)])
    inputs["pixel_values"] = embed(inputs["pixel_values"], features)
    with torch.no_grad():
        out = model.diffusion_generate(**inputs, return_dict_in_generate=True)
    for sample, ids in zip(batch, out.answer_ids()):
        answer = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        key = (sample["types"][0], len(sample["objects"]))
        total[key] += 1
        correct[key] += normalise_answer(answer) == sample["qa"][0][1]
print(f"oracle accuracy {100 * sum(correct.values()) / args.n:.1f}% (seed 12345, n {args.n})")
for kind in QUESTION_TYPES:
    print(
        kind,
        " ".join(
            f"{k} obj {100 * correct[(kind, k)] / max(1, total[(kind, k)]):.0f}% ({total[(kind, k)]})"
            for k in (1, 2, 3)
        ),
    )
