"""The `llada-v` command line: generate, chat, quantised loading and one-line errors for bad input."""

import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from llada_v import LladaVModel, cli
from llada_v.inference import InputError, generation_config_for, generation_overrides

from helpers import build_demo_like_checkpoint
from paths import llada_v_command


@pytest.fixture(scope="module")
def demo_ck(tmp_path_factory):
    return build_demo_like_checkpoint(tmp_path_factory.mktemp("cli") / "demo_like")


@pytest.fixture(scope="module")
def golden_ck(tmp_path_factory, golden_checkpoint):
    """The converted golden tiny checkpoint plus the processor the converter writes when given a tokenizer (the
    stand-in LLaDA tokenizer here)."""
    import shutil

    from llada_v import LladaVConfig
    from llada_v.conversion.tokenizer import build_processor

    from _tokenizer_standin import standin_tokenizer

    out = tmp_path_factory.mktemp("cli") / "golden_with_processor"
    shutil.copytree(golden_checkpoint, out)
    build_processor(standin_tokenizer(), config=LladaVConfig.from_pretrained(out)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (56, 56), (0, 0, 255)).save(folder / "blue.png")
    (folder / "broken.png").write_text("not an image")
    return folder


@pytest.fixture(autouse=True)
def _no_progress_bars():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def run(capsys, *argv):
    """`llada-v ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def reference_answer(path, prompt, image_paths, **overrides):
    """What `generate` should print: the same pipeline called directly."""
    from transformers import AutoModel, AutoProcessor

    from llada_v.inference import chat_prompt, generate_texts, user_message

    model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    fast = overrides.pop("fast", False)
    config = generation_config_for(model.generation_config, overrides, fast=fast)
    pictures = [Image.open(p).convert("RGB") for p in image_paths]
    text = chat_prompt(processor, [user_message(prompt, len(pictures))])
    return generate_texts(model, processor, [text], [pictures], config)[0][0]


# ---------------------------------------------------------------------------------------------- help


def test_help_lists_every_command_and_the_generation_knobs(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("generate", "chat", "convert", "demo", "eval-demo"):
        assert command in out
    parser = cli.build_parser()
    helps = {
        name: action.format_help()
        for action in parser._subparsers._group_actions
        for name, action in action.choices.items()
    }
    for flag in (
        "--model",
        "--image",
        "--prompt",
        "--max-new-tokens",
        "--steps",
        "--block-length",
        "--temperature",
        "--remasking",
        "--cfg-scale",
        "--seed",
        "--fast",
        "--dtype",
        "--load-in-4bit",
        "--load-in-8bit",
        "--device",
        "--stream",
        "--debug",
    ):
        assert flag in helps["generate"], flag
    assert "/image PATH" in helps["chat"] and "--push-to-hub" in helps["convert"]


# ---------------------------------------------------------------------------------------------- generate


def test_generate_prints_what_the_pipeline_answers(capsys, demo_ck, images):
    code, out, err = run(
        capsys, "generate", "--model", demo_ck, "--image", images / "red.png", "--prompt", "What color is the circle?"
    )
    assert code == 0, err
    assert out.rstrip("\n") == reference_answer(demo_ck, "What color is the circle?", [images / "red.png"])


def test_generate_knobs_reach_the_sampler(capsys, demo_ck, images):
    argv = [
        "generate",
        "--model",
        demo_ck,
        "--image",
        images / "red.png",
        "--image",
        images / "blue.png",
        "--prompt",
        "What color?",
        "--max-new-tokens",
        "8",
        "--steps",
        "4",
        "--block-length",
        "4",
        "--temperature",
        "0.7",
        "--remasking",
        "random",
        "--cfg-scale",
        "0.5",
        "--seed",
        "3",
    ]
    first = run(capsys, *argv)
    second = run(capsys, *argv)
    assert first[0] == 0 and first[1] == second[1]  # seeded sampling is reproducible
    code, out, _ = run(capsys, *argv[:-1], "4")
    assert code == 0


def test_generate_fast_uses_the_fast_preset(capsys, demo_ck, images):
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        demo_ck,
        "--image",
        images / "red.png",
        "--prompt",
        "How many shapes are there?",
        "--fast",
    )
    assert code == 0, err
    expected = reference_answer(demo_ck, "How many shapes are there?", [images / "red.png"], fast=True)
    assert out.rstrip("\n") == expected


def test_stream_in_a_pipe_prints_only_the_answer_line(capsys, demo_ck, images):
    # Through model.generate's streamer: committed text only when stdout is no terminal (tests/test_generate_api.py
    # has the terminal drafts and the subprocess run).
    argv = ("generate", "--model", demo_ck, "--image", images / "red.png", "--prompt", "What color is the circle?")
    code, plain, _ = run(capsys, *argv)
    code_streamed, streamed, err = run(capsys, *argv, "--stream")
    assert code == code_streamed == 0, err
    assert streamed == plain and plain.count("\n") == 1


def test_stream_printer_draws_drafts_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        encoding = "utf-8"

        def isatty(self):
            return True

    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))
    screen = Terminal()
    printer = cli.StreamPrinter(tokenizer, out=screen)
    printer.put(torch.tensor([[9, 9]]))  # the prompt: not shown
    printer.put_draft(torch.tensor([[5, 6]]))
    printer.put(torch.tensor([[5]]))
    printer.put_draft(torch.tensor([[7]]))
    printer.end()
    assert screen.getvalue() == "\x1b7\x1b[2m5 6\x1b[0m\x1b8\x1b[J5\x1b7\x1b[2m 7\x1b[0m\x1b8\x1b[J\n"


def test_generate_on_the_converted_golden_checkpoint(capsys, golden_ck, images):
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        golden_ck,
        "--image",
        images / "red.png",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "8",
        "--steps",
        "4",
        "--stream",
    )
    assert code == 0, err
    expected = reference_answer(golden_ck, "hi", [images / "red.png"], max_new_tokens=8, steps=4)
    assert out == expected + "\n"


def test_processor_can_come_from_another_folder(capsys, golden_checkpoint, golden_ck, images):
    # The converter writes no processor without a tokenizer: say so, or take it from --processor.
    code, _, err = run(capsys, "generate", "--model", golden_checkpoint, "--prompt", "hi")
    assert code == 2 and "has no processor" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        golden_checkpoint,
        "--processor",
        golden_ck,
        "--image",
        images / "red.png",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
        "--steps",
        "2",
    )
    assert code == 0, err


@pytest.mark.parametrize("mode", ["--load-in-4bit", "--load-in-8bit"])
def test_generate_quantised_on_cpu(capsys, demo_ck, images, mode):
    pytest.importorskip("bitsandbytes")
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        demo_ck,
        "--image",
        images / "red.png",
        "--prompt",
        "What color is the circle?",
        mode,
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert out.strip()


@pytest.mark.parametrize("mode", ["--load-in-8bit", "--load-in-4bit"])
def test_generate_quantised_on_the_narrow_golden_checkpoint(capsys, golden_ck, images, mode):
    # hidden 32: the 4-bit layers cannot use bitsandbytes' packed CPU kernel (it needs in_features % 64 == 0);
    # `LladaVModel.from_pretrained` keeps them on the portable path.
    pytest.importorskip("bitsandbytes")
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        golden_ck,
        "--image",
        images / "red.png",
        "--prompt",
        "hi",
        mode,
        "--max-new-tokens",
        "4",
        "--steps",
        "2",
        "--device",
        "cpu",
    )
    assert code == 0, err


# ---------------------------------------------------------------------------------------------- bad input


def _bad_input_cases(tmp, demo, images):
    (tmp / "llama").mkdir()
    (tmp / "llama" / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    (tmp / "no_config").mkdir()
    (tmp / "no_weights").mkdir()
    (tmp / "no_weights" / "config.json").write_text((demo / "config.json").read_text())
    return {
        "missing folder": (["--model", tmp / "nope", "--prompt", "hi"], "no such checkpoint folder"),
        "another model type": (["--model", tmp / "llama", "--prompt", "hi"], "'llama' checkpoint, not 'llada_v'"),
        "no weights": (["--model", tmp / "no_weights", "--prompt", "hi"], "has no weights"),
        "no config": (["--model", tmp / "no_config", "--prompt", "hi"], "has no config.json"),
        "a file as model": (["--model", images / "red.png", "--prompt", "hi"], "is a file"),
        "missing image": (["--model", demo, "--image", tmp / "nope.png", "--prompt", "hi"], "no such image"),
        "unreadable image": (
            ["--model", demo, "--image", images / "broken.png", "--prompt", "hi"],
            "cannot read image",
        ),
        "4bit and 8bit": (["--model", demo, "--prompt", "hi", "--load-in-4bit", "--load-in-8bit"], "not allowed with"),
        "schedule": (
            ["--model", demo, "--prompt", "hi", "--max-new-tokens", "6", "--block-length", "4"],
            "max_new_tokens (6) must be divisible by block_length (4)",
        ),
        "steps": (["--model", demo, "--prompt", "hi", "--steps", "0"], "steps must be a positive integer"),
        "fast and random": (
            ["--model", demo, "--prompt", "hi", "--fast", "--remasking", "random"],
            "needs remasking='low_confidence', got remasking='random'",
        ),
        "bad dtype": (["--model", demo, "--prompt", "hi", "--dtype", "float64"], "invalid choice"),
        "no prompt": (["--model", demo], "required: --prompt"),
    }


BAD_INPUT_CASES = [
    "missing folder",
    "another model type",
    "no weights",
    "no config",
    "a file as model",
    "missing image",
    "unreadable image",
    "4bit and 8bit",
    "schedule",
    "steps",
    "fast and random",
    "bad dtype",
    "no prompt",
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, demo_ck, images, case):
    cases = _bad_input_cases(tmp_path, demo_ck, images)
    assert sorted(cases) == sorted(BAD_INPUT_CASES)
    argv, message = cases[case]
    code, _, err = run(capsys, "generate", *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_official_checkpoint_is_refused_with_a_hint(capsys, golden_dir):
    code, _, err = run(capsys, "generate", "--model", golden_dir / "official_tiny", "--prompt", "hi")
    assert code == 2 and "official LLaDA-V checkpoint" in err and "llada-v convert" in err


def test_unavailable_device_is_refused(capsys, demo_ck):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run(capsys, "generate", "--model", demo_ck, "--prompt", "hi", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_4bit_without_bitsandbytes_says_how_to_install(capsys, demo_ck, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    code, _, err = run(capsys, "generate", "--model", demo_ck, "--prompt", "hi", "--load-in-4bit")
    assert code == 2 and "needs bitsandbytes" in err and "pip install" in err


def test_hub_id_that_cannot_be_reached_is_one_line(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    code, _, err = run(capsys, "generate", "--model", "no-such-owner/no-such-model", "--prompt", "hi")
    assert code == 2 and "cannot load 'no-such-owner/no-such-model'" in err
    assert len(err.strip().splitlines()) == 1


def test_entry_point_reports_one_line_without_traceback(tmp_path):
    argv = [*llada_v_command(), "generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"llada-v generate: error: no such checkpoint folder: {tmp_path / 'missing'}"
    ]


def test_debug_flag_reraises(demo_ck):
    with pytest.raises(InputError, match="no such image"):
        cli.main(["--debug", "generate", "--model", str(demo_ck), "--image", "/nope.png", "--prompt", "hi"])


def test_generate_without_model_uses_the_embedded_demo(capsys):
    from llada_v.demo.model import demo_model_dir

    code, out, err = run(capsys, "generate", "--prompt", "How many shapes are there?", "--device", "cpu")
    if (demo_model_dir() / "config.json").is_file():
        assert code == 0 and out.strip(), err
    else:
        assert code == 2 and "no --model given" in err


def test_generate_stop_ends_the_answer_before_the_stop_string(capsys):
    # The embedded demo describes scene00 in several words over 4 blocks; `--stop WORD` must print what comes
    # before the first WORD (the stop string excluded), streamed or not.
    scene = Path(__file__).resolve().parents[1] / "examples" / "lmms_eval_task" / "images" / "scene00.png"
    argv = ("generate", "--prompt", "Which shapes are there?", "--image", scene, "--max-new-tokens", "32")
    code, full, err = run(capsys, *argv)
    words = full.split()
    assert code == 0 and len(words) >= 3, (full, err)
    expected = full[: full.index(words[2])].rstrip() + "\n"
    for extra in ((), ("--stream",)):
        code, out, err = run(capsys, *argv, "--stop", words[2], *extra)
        assert code == 0 and out == expected and out.strip(), (extra, out, err)
    code, out, err = run(capsys, *argv, "--stop", "no such words", "--stop", words[1])  # the earliest of several
    assert code == 0 and out == full[: full.index(words[1])].rstrip() + "\n", (out, err)
    code, _, err = run(capsys, *argv, "--stop", "")
    assert code == 2 and "stop_strings must be a list of non-empty strings" in err


# ---------------------------------------------------------------------------------------------- chat


def test_chat_keeps_history_attaches_images_per_turn_and_resets(capsys, demo_ck, images, monkeypatch):
    import llada_v.inference as inference

    calls = []

    def fake_generate(model, processor, texts, image_lists, config, step_callback=None, seed=None):
        calls.append((texts[0], len(image_lists[0])))
        return [f"answer{len(calls)}"], None

    monkeypatch.setattr(inference, "generate_texts", fake_generate)
    script = (
        f"/image {images / 'red.png'}\nWhat color?\n/image {images / 'missing.png'}\n/bogus\n"
        f"And now?\n/reset\nHello\n/quit\nnever read\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run(capsys, "chat", "--model", demo_ck)
    assert code == 0
    assert [c[1] for c in calls] == [1, 1, 0]  # the image stays in the conversation; /reset drops it
    assert "answer1" in calls[1][0] and "What color?" in calls[1][0]  # the history is in the second prompt
    assert "answer1" not in calls[2][0] and "What color?" not in calls[2][0]
    assert [line for line in out.splitlines() if line.startswith("assistant> ")] == [
        "assistant> answer1",
        "assistant> answer2",
        "assistant> answer3",
    ]
    assert "no such image" in err and "unknown command /bogus" in err and "Traceback" not in err


def test_chat_runs_the_model_from_piped_stdin(demo_ck, images):
    script = f"/image {images / 'red.png'}\nWhat color is the circle?\nHow many shapes are there?\n"
    result = subprocess.run(
        [*llada_v_command(), "chat", "--model", str(demo_ck), "--stream"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [line for line in result.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(answers) == 2
    others = [line for line in result.stdout.splitlines() if not line.startswith("assistant> ")]
    assert [line.split(":")[0] for line in others] == ["(image attached to the next message"]  # no frames in a pipe


def test_cuda_smoke_test_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: run scripts/cuda_smoke_test.py itself")
    script = Path(__file__).resolve().parents[1] / "scripts" / "cuda_smoke_test.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("SKIP: CUDA is not available")


# ---------------------------------------------------------------------------------------------- hardening


def _odd_images(folder):
    """Images whose pixels depend on how they are decoded: 16-bit grey, RGBA, a palette with transparency."""
    grey16 = Image.fromarray((torch.arange(40 * 30).reshape(30, 40) * 50).numpy().astype("uint16"))
    rgba = Image.new("RGBA", (40, 30), (200, 30, 90, 255))
    rgba.paste((10, 240, 20, 0), (0, 0, 20, 30))  # the left half fully transparent
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    palette.info["transparency"] = 1
    paths = {"grey16": folder / "grey16.png", "rgba": folder / "rgba.png", "palette": folder / "palette.png"}
    for (name, path), image in zip(paths.items(), (grey16, rgba, palette)):
        image.save(path)
    return paths


@pytest.mark.parametrize("kind", ["grey16", "rgba", "palette"])
def test_the_cli_feeds_the_model_the_pixels_the_processor_makes(capsys, demo_ck, tmp_path, monkeypatch, kind):
    import llada_v.inference as inference

    path = _odd_images(tmp_path)[kind]
    seen = []

    def capture(model, processor, texts, image_lists, config, step_callback=None, seed=None):
        seen.append(processor(images=image_lists, text=texts)["pixel_values"])
        return ["x"], None

    monkeypatch.setattr(inference, "generate_texts", capture)
    code, _, err = run(capsys, "generate", "--model", demo_ck, "--image", path, "--prompt", "hi")
    assert code == 0, err
    processor = inference.load_pretrained(str(demo_ck), device="cpu")[1]
    expected = processor(images=[[str(path)]], text=["<image>\nhi"])["pixel_values"]
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


@pytest.mark.slow
def test_chat_survives_invalid_utf8_a_literal_placeholder_and_a_closed_stdin(demo_ck):
    script = b"\xff\xfe broken\nWhat is <image> here?\nHow many shapes are there?\n"
    result = subprocess.run([*llada_v_command(), "chat", "--model", str(demo_ck)], input=script,
                            capture_output=True, timeout=300)  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "not valid UTF-8" in err and "cannot contain <image>" in err
    assert sum(line.startswith(b"assistant> ") for line in result.stdout.splitlines()) == 1
    closed = subprocess.run([*llada_v_command(), "chat", "--model", str(demo_ck)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert closed.returncode == 0 and "Traceback" not in closed.stderr


def test_a_corrupt_generation_config_is_named_not_ignored(capsys, demo_ck, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(demo_ck, broken)
    (broken / "generation_config.json").write_text("{not json")
    code, _, err = run(capsys, "generate", "--model", broken, "--prompt", "hi")
    assert code == 2 and "generation_config.json cannot be loaded" in err
    with pytest.raises(ValueError, match="generation_config.json cannot be loaded"):
        LladaVModel.from_pretrained(broken)


def test_demo_arguments_fail_before_the_demo_runs(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--save-gif", tmp_path / "missing" / "x.gif")
    assert code == 2 and "the folder" in err and "does not exist" in err and "Q:" not in out
    code, _, err = run(capsys, "eval-demo", "--seed", "1", "--n", "0")
    assert code == 2 and "must be a positive integer, got 0" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- bad values, URLs


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: checks that must come first do."""
    import llada_v.inference

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(llada_v.inference, "load_pretrained", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", str(10**23)], f"argument --seed: must be between {-(2**63)} and {2**64 - 1}, got {10**23}"),
        (["--seed", "x"], "argument --seed: must be an integer, got 'x'"),
        (
            ["--max-new-tokens", "100000000"],
            "--max-new-tokens 100000000 leaves no room for the prompt: the model has "
            "max_position_embeddings 1024 for prompt + answer",
        ),
        (["--image", "/no/such/image.png"], "no such image: /no/such/image.png"),
    ],
)
def test_bad_values_are_one_line_and_exit_2_before_the_model_loads(capsys, demo_ck, no_model_load, argv, message):
    code, _, err = run(capsys, "generate", "--model", demo_ck, "--prompt", "hi", *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err


def test_an_answer_that_does_not_fit_after_the_prompt_is_one_line_and_exit_2(capsys, demo_ck):
    code, _, err = run(capsys, "generate", "--model", demo_ck, "--prompt", "hi", "--max-new-tokens", "1020")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "+ max_new_tokens (1020) + suffix (0) = " in err and "exceeds max_position_embeddings (1024)" in err


def test_debug_after_any_subcommand_shows_the_traceback(capsys, demo_ck, tmp_path):
    with pytest.raises(InputError, match="no such image"):
        cli.main(["generate", "--model", str(demo_ck), "--image", "/nope.png", "--prompt", "hi", "--debug"])
    with pytest.raises(Exception, match="does not exist"):
        cli.main(["demo", "--save-gif", str(tmp_path / "missing" / "x.gif"), "--debug"])
    with pytest.raises(Exception, match="does not exist"):
        cli.main(["convert", "--input-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out"), "--debug"])


@pytest.fixture(scope="module")
def image_server(images):
    """A plain http server on 127.0.0.1 serving the `images` folder."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_generate_reads_an_image_url_as_the_library_does(capsys, demo_ck, images, image_server):
    code, from_url, err = run(
        capsys,
        "generate",
        "--model",
        demo_ck,
        "--image",
        f"{image_server}/red.png",
        "--prompt",
        "What color is the circle?",
    )
    assert code == 0, err
    code, from_file, _ = run(
        capsys, "generate", "--model", demo_ck, "--image", images / "red.png", "--prompt", "What color is the circle?"
    )
    assert from_url == from_file == reference_answer(demo_ck, "What color is the circle?", [images / "red.png"]) + "\n"
    code, _, err = run(
        capsys, "generate", "--model", demo_ck, "--image", f"{image_server}/missing.png", "--prompt", "hi"
    )
    assert code == 2 and f"cannot read image {image_server}/missing.png" in err and "404" in err, err


# ---------------------------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """Three demo scenes as a frame folder and as an animated GIF (few colours: the GIF palette keeps them exact)."""
    import random

    from llada_v.demo.scenes import draw_scene

    folder = tmp_path_factory.mktemp("video")
    frames = [draw_scene(random.Random(seed)).image.resize((64, 48)) for seed in range(3)]
    (folder / "frames").mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / "frames" / f"{i:03d}.png")
    frames[0].save(folder / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    (folder / "empty").mkdir()
    (folder / "broken.gif").write_text("not a gif")
    return SimpleNamespace(folder=folder, frames=frames)


def reference_video_answer(path, prompt, frames):
    """What `generate --video` should print: the processor's `videos=` and `diffusion_generate` called directly."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<video>" in text
    inputs = processor(text=[text], videos=[frames], return_tensors="pt")
    config = generation_config_for(model.generation_config, {})
    config.return_dict_in_generate = True
    output = model.diffusion_generate(**inputs, generation_config=config)
    return processor.tokenizer.decode(output.answer_ids()[0], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_generate_video_from_a_gif_answers_like_the_processor_pipeline(demo_ck, video):
    # The real `llada-v` command in a subprocess, as a user runs it.
    prompt = "How many shapes are there?"
    result = subprocess.run(
        [
            *llada_v_command(),
            "generate",
            "--model",
            str(demo_ck),
            "--video",
            str(video.folder / "clip.gif"),
            "--prompt",
            prompt,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    expected = reference_video_answer(demo_ck, prompt, [f.convert("RGB") for f in video.frames])
    assert result.stdout.strip() == expected


def test_generate_video_from_a_frame_folder_equals_the_gif(capsys, demo_ck, video):
    prompt = "What color is the circle?"
    code, from_folder, err = run(
        capsys, "generate", "--model", demo_ck, "--video", video.folder / "frames", "--prompt", prompt
    )
    assert code == 0, err
    code, from_gif, err = run(
        capsys, "generate", "--model", demo_ck, "--video", video.folder / "clip.gif", "--prompt", prompt
    )
    assert code == 0, err
    assert from_folder == from_gif and from_folder.strip()


def test_read_video_frames_in_name_order():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, value in (("b.png", 20), ("a.png", 10), ("c.png", 30)):
            Image.new("RGB", (8, 8), (value, 0, 0)).save(Path(tmp) / name)
        frames = cli.read_video(tmp)
    assert [f.getpixel((0, 0))[0] for f in frames] == [10, 20, 30]


@pytest.mark.parametrize("case", ["missing", "no frames", "unreadable", "with --image"])
def test_bad_video_input_is_one_line_naming_the_value(capsys, demo_ck, images, video, case):
    argv, message = {
        "missing": (["--video", video.folder / "nope"], f"no such video: {video.folder / 'nope'}"),
        "no frames": (["--video", video.folder / "empty"], f"the video folder {video.folder / 'empty'} holds no frame"),
        "unreadable": (["--video", video.folder / "broken.gif"], f"could not read video {video.folder / 'broken.gif'}"),
        "with --image": (
            ["--video", video.folder / "clip.gif", "--image", images / "red.png"],
            f"--image and --video cannot be combined (got --image {images / 'red.png'}",
        ),
    }[case]
    code, _, err = run(capsys, "generate", "--model", demo_ck, "--prompt", "hi", *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err


# ---------------------------------------------------------------------------------------------- dLLM-Cache

DLLM_SETTINGS = {"prompt_interval_steps": 2, "gen_interval_steps": 2, "transfer_ratio": 0.5}
DLLM_SCHEDULE = dict(max_new_tokens=8, steps=8, block_length=4)


def test_cli_dllm_cache_flag_reaches_the_sampler(capsys, demo_ck, images):
    parser = cli.build_parser()
    base = ["generate", "--model", str(demo_ck), "--prompt", "hi"]
    assert generation_overrides(parser.parse_args(base))["dllm_cache"] is None
    assert generation_overrides(parser.parse_args([*base, "--dllm-cache"]))["dllm_cache"] == {}
    assert generation_overrides(parser.parse_args([*base, "--dllm-cache", "2,2,0.5"]))["dllm_cache"] == DLLM_SETTINGS
    argv = ["generate", "--model", demo_ck, "--image", images / "red.png", "--prompt", "What color is the circle?",
            "--max-new-tokens", "8", "--steps", "8", "--block-length", "4", "--dllm-cache", "2,2,0.5"]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    expected = reference_answer(demo_ck, "What color is the circle?", [images / "red.png"], **DLLM_SCHEDULE,
                                dllm_cache=DLLM_SETTINGS)  # fmt: skip
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
