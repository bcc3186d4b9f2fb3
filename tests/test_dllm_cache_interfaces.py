"""dLLM-Cache through every entry point: `generate()` and the pipeline (remote code), the CLI's `--dllm-cache`,
the server's `dllm_cache` request field and the lmms-eval `dllm_cache=` model argument. Each answer equals the
sampler called directly with the same settings."""

import pytest
import torch
from test_cli import build_demo_like_checkpoint, reference_answer, run
from test_generate_api import _pipeline_matches_diffusion_generate, demo_inputs
from test_lmms_eval import doc_to_visual, make_model, request
from test_serving_api import chat_body, demo_jobs, parse, single_answer

from llada_v import cli
from llada_v.serving.batching import run_batch
from llada_v.serving.openai_api import ApiError
from llada_v.serving.options import ServeOptions
from llada_v.serving.service import ChatService

SETTINGS = {"prompt_interval_steps": 2, "gen_interval_steps": 2, "transfer_ratio": 0.5}
SCHEDULE = dict(max_new_tokens=8, steps=8, block_length=4)


@pytest.fixture(scope="module")
def demo_ck(tmp_path_factory):
    return build_demo_like_checkpoint(tmp_path_factory.mktemp("dllm") / "demo_like")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("dllm_images")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "red.png")
    return folder


# ---------------------------------------------------------------------------------------------- generate, pipeline


def test_generate_and_the_pipeline_pass_dllm_cache_to_the_sampler():
    from llada_v.demo.app import load_demo
    from llada_v.demo.model import demo_model_dir

    model, processor = load_demo()
    inputs, _ = demo_inputs(processor, seed=1)
    direct = model.diffusion_generate(**inputs, **SCHEDULE, dllm_cache=SETTINGS, return_dict_in_generate=True)
    via_generate = model.generate(**inputs, **SCHEDULE, dllm_cache=SETTINGS, return_dict_in_generate=True)
    assert torch.equal(via_generate.sequences, direct.sequences)
    assert via_generate.num_decoder_tokens == direct.num_decoder_tokens
    exact = model.generate(**inputs, **SCHEDULE, return_dict_in_generate=True)
    assert direct.num_decoder_tokens < exact.num_decoder_tokens  # the cache was used
    from test_generate_api import demo_messages

    messages, _ = demo_messages(seed=1)
    # The pipeline loads the checkpoint's own remote code (dllm_cache_llada_v.py among it).
    _pipeline_matches_diffusion_generate(demo_model_dir(), messages, **SCHEDULE, dllm_cache=SETTINGS)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_dllm_cache_flag_reaches_the_sampler(capsys, demo_ck, images):
    parser = cli.build_parser()
    base = ["generate", "--model", str(demo_ck), "--prompt", "hi"]
    assert cli._generation_overrides(parser.parse_args(base))["dllm_cache"] is None
    assert cli._generation_overrides(parser.parse_args([*base, "--dllm-cache"]))["dllm_cache"] == {}
    assert cli._generation_overrides(parser.parse_args([*base, "--dllm-cache", "2,2,0.5"]))["dllm_cache"] == SETTINGS
    argv = ["generate", "--model", demo_ck, "--image", images / "red.png", "--prompt", "What color is the circle?",
            "--max-new-tokens", "8", "--steps", "8", "--block-length", "4", "--dllm-cache", "2,2,0.5"]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    expected = reference_answer(demo_ck, "What color is the circle?", [images / "red.png"], **SCHEDULE,
                                dllm_cache=SETTINGS)  # fmt: skip
    assert out.rstrip("\n") == expected


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dllm-cache", "2,2"], "takes PROMPT_INTERVAL,GEN_INTERVAL,TRANSFER_RATIO"),
        (["--dllm-cache", "2,2,1.5"], "transfer_ratio must be a number in [0, 1], got 1.5"),
        (["--dllm-cache", "--fast"], "dllm_cache ({}) and kv_cache='dual' are two caches"),
        (["--dllm-cache", "--cfg-scale", "1"], "dllm_cache ({}) is not supported with cfg_scale=1.0"),
    ],
)
def test_cli_bad_dllm_cache_is_one_line_and_exit_2(capsys, demo_ck, flags, message):
    code, _, err = run(capsys, "generate", "--model", demo_ck, "--prompt", "hi", *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message in err, err


# ---------------------------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def service():
    return ChatService(ServeOptions())


def test_server_request_dllm_cache_runs_like_a_direct_call(service):
    request = parse(chat_body("?", dllm_cache={"gen_interval_steps": 3}))
    assert request.overrides["dllm_cache"] == {"gen_interval_steps": 3}
    assert service.settings(request).dllm_cache == {"gen_interval_steps": 3}
    assert service.settings(parse(chat_body("?"))).dllm_cache is None
    cached, _ = demo_jobs(service, 2, max_tokens=8, steps=8, block_length=4, dllm_cache=SETTINGS)
    plain, _ = demo_jobs(service, 1, max_tokens=8, steps=8, block_length=4)
    jobs = [cached[0], plain[0], cached[1]]
    results = run_batch(service.model, service.processor, jobs)
    assert [r.batch_size for r in results] == [2, 1, 2]  # the settings differ: two groups
    assert [r.text for r in results] == [single_answer(service, job) for job in jobs]


def test_server_bad_dllm_cache_is_400_naming_it(service):
    for value, message in [
        ({"gen_interval": 3}, "unknown keys ['gen_interval']"),
        ({"transfer_ratio": 2}, "transfer_ratio must be a number in [0, 1], got 2"),
        ("fast", "dllm_cache must be None or a dict"),
    ]:
        with pytest.raises(ApiError) as info:
            service.settings(parse(chat_body("?", dllm_cache=value)))
        assert info.value.status == 400 and message in info.value.message, info.value.message


# ---------------------------------------------------------------------------------------------- lmms-eval


@pytest.fixture(scope="module")
def docs():
    from PIL import Image

    return [{"image": Image.new("RGB", (40 + 8 * i, 30), rgb), "question": "What color is the circle?"}
            for i, rgb in enumerate([(255, 0, 0), (0, 0, 255)])]  # fmt: skip


def test_lmms_eval_dllm_cache_model_arg(demo_ck, docs):
    from llada_v.inference import chat_prompt, generate_texts, generation_config_for, user_message

    assert make_model(demo_ck, docs, dllm_cache=True).dllm_cache == {}
    assert make_model(demo_ck, docs, dllm_cache="false").dllm_cache is None
    model = make_model(demo_ck, docs, dllm_cache="2/2/0.5")
    assert model.dllm_cache == SETTINGS
    out = model.generate_until([request("What color?", {"max_new_tokens": 8, "steps": 8, "block_length": 4},
                                        doc_to_visual, 0, "tiny", "test")])  # fmt: skip
    config = generation_config_for(model.model.generation_config, {**SCHEDULE, "dllm_cache": SETTINGS})
    assert config.dllm_cache == SETTINGS
    text = chat_prompt(model.processor, [user_message("What color?", 1)])
    assert out[0].text == generate_texts(model.model, model.processor, [text], [[docs[0]["image"]]], config)[0][0]
    for value, message in [("2/2", "takes true, false or PROMPT_INTERVAL/GEN_INTERVAL/TRANSFER_RATIO"),
                           ("0/2/0.5", "prompt_interval_steps must be a positive integer, got 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make_model(demo_ck, docs, dllm_cache=value)
