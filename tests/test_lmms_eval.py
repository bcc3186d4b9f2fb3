"""The lmms-eval plugin `llada_v`: per-task presets, batched generate_until, Monte-Carlo loglikelihood, and an
end-to-end `python -m lmms_eval` run on a local task (no downloads).

The plugin class is tested directly (it imports without lmms-eval); the end-to-end run needs lmms-eval installed.
"""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llada_v.evaluation.lmms_eval_plugin import (
    LladaV,
    LoglikelihoodResult,
    resolve_generation,
    task_preset,
    truncate_at_stops,
)

from helpers import COLORS, build_demo_like_checkpoint, write_local_task
from paths import REPO


@pytest.fixture(scope="module")
def demo_ck(tmp_path_factory):
    return build_demo_like_checkpoint(tmp_path_factory.mktemp("lmms") / "demo_like")


@pytest.fixture(scope="module")
def docs():
    return [
        {
            "image": Image.new("RGB", (40 + 8 * i, 30), rgb),
            "question": "What color is the circle?",
            "answer": name,
            "choices": list(COLORS),
        }
        for i, (name, rgb) in enumerate(COLORS.items())
    ]


def make_model(path, docs, **kwargs):
    model = LladaV(pretrained=str(path), device="cpu", **kwargs)
    model.task_dict = {"tiny": {"test": docs}, "chartqa_tiny": {"test": docs}}
    return model


def request(*args):
    return SimpleNamespace(args=args)


def doc_to_visual(doc):
    return [doc["image"]]


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "task, expected",
    [
        ("chartqa", (16, 16, 16, ("\n",))),
        ("chartqa_lite", (16, 16, 16, ("\n",))),
        ("docvqa_val", (32, 16, 32, ())),
        ("mathvista_testmini", (96, 48, 96, ())),
        ("mathverse_testmini", (64, 32, 64, ())),
        ("mmmu_val", (2, 2, 2, ())),
        ("ai2d", (2, 2, 2, ())),
        ("mmstar", (2, 2, 2, ())),
    ],
)
def test_official_task_settings(task, expected):
    preset = task_preset(task)
    assert (preset.max_new_tokens, preset.steps, preset.block_length, preset.stop_strings) == expected


def test_generation_settings_precedence():
    # Unknown task: the demo default, or the task's max_new_tokens decoded one token per step.
    assert resolve_generation("my_task", {}) == ({"max_new_tokens": 128, "steps": 128, "block_length": 128}, [], [])
    overrides, sampler, cut = resolve_generation("my_task", {"max_new_tokens": 8, "until": "\n\n", "do_sample": False})
    assert overrides == {"max_new_tokens": 8, "steps": 8, "block_length": 8} and sampler == cut == ["\n\n"]
    # A known task uses the official setting whatever max_new_tokens its YAML says; the sampler stops as officially
    # (ChartQA: "\n"), the task's `until` only cuts the text.
    overrides, sampler, cut = resolve_generation("chartqa", {"max_new_tokens": 1024, "until": ["Q:", "\n"]})
    assert overrides == {"max_new_tokens": 16, "steps": 16, "block_length": 16}
    assert sampler == ["\n"] and cut == ["\n", "Q:"]
    assert resolve_generation("mathverse_testmini", {"until": ["Q:"]})[1:] == ([], ["Q:"])
    overrides, *_ = resolve_generation("chartqa", {"max_new_tokens": 8}, use_presets=False)
    assert overrides["max_new_tokens"] == 8
    # Explicit diffusion keys (from --gen_kwargs) win over the preset.
    overrides, *_ = resolve_generation("mathvista_testmini", {"gen_length": 32, "temperature": 0.5, "cfg_scale": 1})
    assert overrides == {"max_new_tokens": 32, "steps": 32, "block_length": 32, "temperature": 0.5, "cfg_scale": 1}
    overrides, *_ = resolve_generation("docvqa_val", {"steps": 8})
    assert (overrides["max_new_tokens"], overrides["steps"], overrides["block_length"]) == (32, 8, 32)
    with pytest.raises(ValueError, match="until"):
        resolve_generation("x", {"until": 3})


def test_truncate_at_the_earliest_stop():
    assert truncate_at_stops("12\nQ: next", ["Q:", "\n"]) == "12"
    assert truncate_at_stops("no stop", ["\n"]) == "no stop"


def test_entry_point_registers_llada_v():
    entries = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="lmms_eval.models")}
    assert entries.get("llada_v") == "llada_v.evaluation.lmms_eval_plugin:manifest"


# ---------------------------------------------------------------------------------------------- generate_until


def test_generate_until_batches_equal_singles_and_keep_request_order(demo_ck, docs):
    requests = [
        request(
            f"{d['question']}" + " " * i, {"max_new_tokens": 4, "until": ["\n\n"]}, doc_to_visual, i, "tiny", "test"
        )
        for i, d in enumerate(docs)
    ]
    requests.append(request(docs[0]["question"], {"max_new_tokens": 8}, doc_to_visual, 0, "tiny", "test"))
    batched = make_model(demo_ck, docs, batch_size=3).generate_until(requests)
    single = make_model(demo_ck, docs, batch_size=1)
    singles = [single.generate_until([r])[0] for r in requests]
    assert [r.text for r in batched] == [r.text for r in singles]
    assert [r.token_counts.output_tokens <= n for r, n in zip(batched, (4, 4, 4, 8))] == [True] * 4


def test_generate_until_matches_the_sampler_with_the_task_preset(demo_ck, docs):
    from llada_v.inference import chat_prompt, generate_texts, generation_config_for, user_message

    model = make_model(demo_ck, docs)
    out = model.generate_until(
        [request("What color?", {"max_new_tokens": 99}, doc_to_visual, 1, "chartqa_tiny", "test")]
    )
    config = generation_config_for(
        model.model.generation_config, {"max_new_tokens": 16, "steps": 16, "block_length": 16}
    )
    text = chat_prompt(model.processor, [user_message("What color?", 1)])
    expected = generate_texts(model.model, model.processor, [text], [[docs[1]["image"]]], config)[0][0]
    assert out[0].text == expected.split("\n")[0]


# ---------------------------------------------------------------------------------------------- loglikelihood


def test_loglikelihood_is_reproducible_and_order_independent(demo_ck, docs):
    model = make_model(demo_ck, docs, mc_num=4, mc_batch_size=3, check_greedy=False)
    requests = [
        request(d["question"], f" {c}", doc_to_visual, i, "tiny", "test")
        for i, d in enumerate(docs[:2])
        for c in d["choices"]
    ]
    first = model.loglikelihood(requests)
    reverse = model.loglikelihood(requests[::-1])[::-1]
    assert first == reverse
    for result in first:
        loss, greedy = result  # unpacks like the (float, bool) tuple
        assert isinstance(result, LoglikelihoodResult) and result[0] == loss
        assert loss > 0 and isinstance(greedy, bool)  # a loss: lmms-eval ranks options by argmin
    model.mc_batch_size = 4  # the Monte-Carlo samples in one forward instead of two
    other_batching = model.loglikelihood(requests)
    torch.testing.assert_close(torch.tensor([r[0] for r in other_batching]), torch.tensor([r[0] for r in first]))


def test_one_token_continuation_is_exact_log_softmax(demo_ck, docs):
    # With L = 1 every sample masks the one token with weight 1: the estimate is its exact log-probability, and
    # lmms-eval gets minus that (the loss per token) to rank with argmin.
    model = make_model(demo_ck, docs, mc_num=4, check_greedy=False)
    ((loss, _),) = model.loglikelihood([request("What color?", " red", doc_to_visual, 0, "tiny", "test")])
    log_likelihood = model.score("What color?", " red", [docs[0]["image"]]).log_likelihood
    assert loss == pytest.approx(-log_likelihood)
    from llada_v.inference import chat_prompt, prepare_inputs, user_message

    text = chat_prompt(model.processor, [user_message("What color?", 1)])
    inputs = prepare_inputs(model.processor, [text], [[docs[0]["image"]]], model.device)
    mask = model.model.config.mask_token_id
    target = model.tokenizer.encode("red", add_special_tokens=False)
    assert len(target) == 1
    ids = torch.cat((inputs["input_ids"], torch.tensor([[mask]])), dim=1)
    with torch.no_grad():
        logits = model.model(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            image_layouts=inputs["image_layouts"],
            image_num_crops=inputs["image_num_crops"],
        ).logits
    expected = F.log_softmax(logits[0, -1].float(), -1)[target[0]]
    assert log_likelihood == pytest.approx(float(expected), abs=1e-4)


def test_is_greedy_is_true_exactly_for_the_sampler_answer(demo_ck, docs):
    model = make_model(demo_ck, docs, mc_num=2)
    answer = model.generate_until(
        [request("What color?", {"max_new_tokens": 2, "until": []}, doc_to_visual, 2, "tiny", "test")]
    )[0].text
    ids = model.tokenizer.encode(answer, add_special_tokens=False)
    assert len(ids) == 2  # the demo tokenizer is word level: the decoded answer re-encodes to the same ids
    wrong = "red" if answer.split()[0] != "red" else "blue"
    results = model.loglikelihood(
        [
            request("What color?", answer, doc_to_visual, 2, "tiny", "test"),
            request("What color?", f"{wrong} {wrong}", doc_to_visual, 2, "tiny", "test"),
        ]
    )
    assert [greedy for _, greedy in results] == [True, False]


def test_cfg_and_text_only_requests(demo_ck, docs):
    model = make_model(demo_ck, docs, mc_num=4, cfg_scale=1.0)
    results = model.loglikelihood(
        [request("What color?", " red", doc_to_visual, 0, "tiny", "test"), request("", "red")]
    )  # unconditional request of acc_mutual_info
    assert all(torch.isfinite(torch.tensor(r[0])) for r in results)
    out = model.generate_until([request("Say something.", {"max_new_tokens": 4}, lambda doc: [], 0, "tiny", "test")])
    assert isinstance(out[0].text, str)


def test_unknown_model_args_and_videos_are_refused(demo_ck, docs):
    with pytest.raises(ValueError, match="unknown model_args"):
        LladaV(pretrained=str(demo_ck), device="cpu", conv_template="llava")
    model = make_model(demo_ck, docs)
    with pytest.raises(ValueError, match="images only"):
        model.generate_until([request("q", {}, lambda doc: ["clip.mp4"], 0, "tiny", "test")])


BOOL_MODEL_ARGS = ("load_in_4bit", "load_in_8bit", "fast", "task_presets", "check_greedy", "progress")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("no", False),
        ("NO", False),
        ("false", False),
        ("0", False),
        ("yes", True),
        ("Yes", True),
        ("TRUE", True),
        ("1", True),
    ],
)
def test_yes_no_model_args_read_as_lmms_eval_hands_them_over(demo_ck, text, expected):
    # lmms-eval builds the model from the --model_args string (its parser turns true/false/1/0 into values and
    # leaves yes/no as text): `fast=no` must switch the fast preset off, not on as bool("no") would.
    pytest.importorskip("lmms_eval")
    model = LladaV.create_from_arg_string(f"pretrained={demo_ck},device=cpu,fast={text},check_greedy={text}")
    assert model.fast is expected and model.check_greedy is expected


@pytest.mark.parametrize("name", BOOL_MODEL_ARGS)
def test_unknown_yes_no_values_are_refused_by_name(demo_ck, name):
    pytest.importorskip("lmms_eval")
    with pytest.raises(ValueError, match=f"{name} must be one of yes/no, true/false, 1/0, got 'maybe'"):
        LladaV.create_from_arg_string(f"pretrained={demo_ck},device=cpu,{name}=maybe")
    with pytest.raises(ValueError, match=f"{name} must be one of .*got 2"):
        LladaV.create_from_arg_string(f"pretrained={demo_ck},device=cpu,{name}=2")


@pytest.mark.slow
def test_python_m_lmms_eval_refuses_an_unknown_yes_no_value(tmp_path):
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("lmms-eval is not installed (pip install 'llada-v[eval]', see docs/evaluation.md)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "llada_v", "--model_args", "pretrained=unused,fast=maybe",
         "--tasks", "mme", "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert "llada_v: model_args fast must be one of yes/no, true/false, 1/0, got 'maybe'" in result.stderr, (
        result.stderr[-3000:]
    )


# ---------------------------------------------------------------------------------------------- end to end


def test_documented_lmms_eval_commands_write_results_outside_the_working_tree():
    # A relative --output_path writes `results/` into whatever folder the user runs from (the repository, for the
    # example): every documented command names a temporary or explicit folder instead.
    import re

    commands = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")
        commands += [(path.name, line) for line in text.splitlines() if "-m lmms_eval" in line and "--tasks" in line]
    targets = [
        (name, m.group(1).strip("\"'")) for name, line in commands if (m := re.search(r"--output_path\s+(\S+)", line))
    ]  # without one, lmms-eval writes nothing
    assert len(targets) >= 2
    for name, target in targets:
        assert target.startswith(("/", "~", "$")), f"{name}: --output_path {target} is inside the working folder"


@pytest.mark.slow
def test_python_m_lmms_eval_runs_a_local_task_end_to_end(demo_ck, tmp_path):
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("lmms-eval is not installed (pip install 'llada-v[eval]', see docs/evaluation.md)")
    task_dir = write_local_task(tmp_path / "task")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "llada_v",
            "--model_args",
            f"pretrained={demo_ck},device=cpu,mc_num=4",
            "--tasks",
            "tiny_colors_gen,tiny_colors_mc",
            "--include_path",
            str(task_dir),
            "--batch_size",
            "2",
            "--output_path",
            str(tmp_path / "results"),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Error during evaluation" not in result.stderr, result.stderr[-4000:]
    results_file = next((tmp_path / "results").rglob("*_results.json"))
    results = json.loads(results_file.read_text())["results"]
    assert 0.0 <= results["tiny_colors_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["tiny_colors_mc"]["acc,none"] <= 1.0
    samples = [json.loads(line) for line in next((tmp_path / "results").rglob("*_samples_tiny_colors_mc.jsonl")).open()]
    assert len(samples) == 3 and all(len(s["filtered_resps"]) == 3 for s in samples)


@pytest.mark.slow
def test_the_shipped_example_task_scores_the_demo_model_high_and_a_reversed_ranking_low(tmp_path):
    # The example of docs/evaluation.md as a user runs it: from the repository root, on the shipped demo model.
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("lmms-eval is not installed (pip install 'llada-v[eval]', see docs/evaluation.md)")
    from llada_v.demo.model import demo_model_dir

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "llada_v",
         "--model_args", f"pretrained={demo_model_dir()},device=cpu,system_prompt=",
         "--tasks", "demo_scenes_gen,demo_scenes_mc", "--include_path", "examples/lmms_eval_task",
         "--batch_size", "8", "--output_path", str(tmp_path / "results"), "--log_samples"],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = json.loads(next((tmp_path / "results").rglob("*_results.json")).read_text())["results"]
    assert results["demo_scenes_gen"]["exact_match,none"] >= 0.9
    assert results["demo_scenes_mc"]["acc,none"] >= 0.9
    # The same logged values ranked the other way (argmax: what returning a log-likelihood would do) score low.
    samples = [json.loads(line) for line in next((tmp_path / "results").rglob("*_samples_demo_scenes_mc.jsonl")).open()]
    losses = [[float(loss) for loss, _ in s["filtered_resps"]] for s in samples]
    assert all(
        min(range(len(row)), key=row.__getitem__) == int(s["target"]) for row, s in zip(losses, samples) if s["acc"]
    )
    reversed_acc = sum(max(range(len(row)), key=row.__getitem__) == int(s["target"]) for row, s in zip(losses, samples))
    assert len(samples) == 24 and reversed_acc / len(samples) <= 0.25


# ---------------------------------------------------------------------------------------------- dLLM-Cache

DLLM_SETTINGS = {"prompt_interval_steps": 2, "gen_interval_steps": 2, "transfer_ratio": 0.5}
DLLM_SCHEDULE = dict(max_new_tokens=8, steps=8, block_length=4)


def test_lmms_eval_dllm_cache_model_arg(demo_ck, docs):
    from llada_v.inference import chat_prompt, generate_texts, generation_config_for, user_message

    assert make_model(demo_ck, docs, dllm_cache=True).dllm_cache == {}
    assert make_model(demo_ck, docs, dllm_cache="false").dllm_cache is None
    model = make_model(demo_ck, docs, dllm_cache="2/2/0.5")
    assert model.dllm_cache == DLLM_SETTINGS
    out = model.generate_until([request("What color?", {"max_new_tokens": 8, "steps": 8, "block_length": 4},
                                        doc_to_visual, 0, "tiny", "test")])  # fmt: skip
    config = generation_config_for(model.model.generation_config, {**DLLM_SCHEDULE, "dllm_cache": DLLM_SETTINGS})
    assert config.dllm_cache == DLLM_SETTINGS
    text = chat_prompt(model.processor, [user_message("What color?", 1)])
    assert out[0].text == generate_texts(model.model, model.processor, [text], [[docs[0]["image"]]], config)[0][0]
    for value, message in [("2/2", "takes true, false or PROMPT_INTERVAL/GEN_INTERVAL/TRANSFER_RATIO"),
                           ("0/2/0.5", "prompt_interval_steps must be a positive integer, got 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make_model(demo_ck, docs, dllm_cache=value)
