"""transformers' diffusion-LM interface (DiffusionGemma's): `model.generate` with a streamer and
`tokens_per_forward`, the `image-text-to-text` pipeline, and `llada-v generate --stream` through the streamer.

Every id is compared with `diffusion_generate`, the sampler the golden tests pin to the official outputs.
"""

import io
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from llada_v.generation_utils import LladaVDiffusionStep, _StreamerFeed

from paths import llada_v_command
from tiny import image_prompt, tiny_model

EXACT = {}
FAST = {"kv_cache": "dual", "confidence_threshold": 0.5}


class Recorder:
    """A streamer that records what `generate` sends (the interface of transformers' streamers)."""

    def __init__(self):
        self.events = []

    def put(self, value):
        self.events.append(("put", value.clone()))

    def put_draft(self, value):
        self.events.append(("draft", value.clone()))

    def end(self):
        self.events.append(("end", None))

    def puts(self):
        return [v for kind, v in self.events if kind == "put"]

    def drafts(self):
        return [v for kind, v in self.events if kind == "draft"]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def demo():
    from llada_v.demo.model import demo_model_dir
    from llada_v.inference import load_pretrained

    model, processor = load_pretrained(str(demo_model_dir()))
    return model, processor


def demo_messages(seed=0, turn=0):
    from llada_v.demo.scenes import make_sample

    sample = make_sample(seed)
    question, answer = sample["qa"][turn]
    content = [{"type": "image", "image": sample["image"]}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}], answer


def demo_inputs(processor, seed=0, turn=0):
    messages, answer = demo_messages(seed, turn)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return dict(inputs), answer


def tiny_inputs(tiny):
    ids, pixel_values, image_sizes = image_prompt(tiny.config)
    return {"input_ids": ids, "pixel_values": pixel_values, "image_sizes": image_sizes}


# ---------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("mode", [EXACT, FAST], ids=["exact", "fast"])
def test_generate_equals_diffusion_generate_on_a_tiny_random_model(tiny, mode):
    inputs = tiny_inputs(tiny)
    settings = dict(max_new_tokens=8, steps=8, block_length=4, **mode)
    expected = tiny.diffusion_generate(**inputs, **settings)
    assert torch.equal(tiny.generate(**inputs, **settings), expected)
    output = tiny.generate(**inputs, **settings, return_dict_in_generate=True)
    assert torch.equal(output.sequences, expected)


def test_generate_equals_diffusion_generate_on_a_padded_batch(tiny):
    ids, pixel_values, image_sizes = image_prompt(tiny.config)
    short = ids[:, 2:]  # same image, two fewer text tokens: left-padded below
    batch = torch.cat((ids, torch.cat((torch.full((1, 2), 122), short), dim=1)))
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    inputs = {"input_ids": batch, "attention_mask": mask, "pixel_values": torch.cat((pixel_values, pixel_values)),
              "image_sizes": torch.cat((image_sizes, image_sizes))}  # fmt: skip
    settings = dict(max_new_tokens=8, steps=4, block_length=8)
    assert torch.equal(tiny.generate(**inputs, **settings), tiny.diffusion_generate(**inputs, **settings))


@pytest.mark.slow
@pytest.mark.parametrize("mode", [EXACT, {"kv_cache": "dual", "confidence_threshold": 0.9}], ids=["exact", "fast"])
def test_generate_equals_diffusion_generate_on_the_demo_model(demo, mode):
    model, processor = demo
    for seed in (0, 1):
        inputs, _ = demo_inputs(processor, seed)
        expected = model.diffusion_generate(**inputs, **mode)
        assert torch.equal(model.generate(**inputs, **mode), expected)


def test_generate_with_a_length_alone_fits_the_schedule_and_says_so(tiny, caplog):
    import logging

    inputs = tiny_inputs(tiny)
    config = tiny.generation_config
    assert (config.max_new_tokens, config.steps, config.block_length) == (128, 128, 128)  # the released schedule
    with caplog.at_level(logging.WARNING):
        ids = tiny.generate(**inputs, max_new_tokens=64)
    assert torch.equal(ids, tiny.diffusion_generate(**inputs, max_new_tokens=64, steps=64, block_length=64))
    assert (
        "max_new_tokens=64: the configured schedule (steps=128, block_length=128) does not fit, using steps=64, "
        "block_length=64"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a given setting is kept, the missing one fitted
        assert torch.equal(
            tiny.generate(**inputs, max_new_tokens=64, steps=32),
            tiny.diffusion_generate(**inputs, max_new_tokens=64, steps=32, block_length=64),
        )
    assert "using steps=32, block_length=64" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the configured schedule fits: used silently
        tiny.generate(**inputs, max_new_tokens=128)
    assert "does not fit" not in caplog.text
    with pytest.raises(ValueError, match=r"max_new_tokens \(64\) must be divisible by block_length \(128\)"):
        tiny.diffusion_generate(**inputs, max_new_tokens=64)  # the sampler itself stays strict
    with pytest.raises(ValueError, match=r"steps \(5\) must be divisible by the number of blocks"):
        tiny.generate(**inputs, max_new_tokens=64, steps=5, block_length=32)  # an explicit misfit is an error


def test_pipeline_max_new_tokens_alone_fits_the_schedule():
    from transformers import AutoProcessor, pipeline

    from llada_v.demo.model import demo_model_dir

    path = demo_model_dir()  # generation_config.json: 4 / 4 / 4
    pipe = pipeline("image-text-to-text", model=str(path), trust_remote_code=True)
    messages, _ = demo_messages(seed=0)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    ids = pipe(text=messages, max_new_tokens=3, return_tensors=True)[0]["generated_token_ids"]
    assert torch.equal(ids, pipe.model.diffusion_generate(**inputs, max_new_tokens=3, steps=3, block_length=3)[0])


def test_generate_honours_a_generation_config_and_refuses_unknown_settings(tiny):
    from llada_v import LladaVGenerationConfig

    inputs = tiny_inputs(tiny)
    config = LladaVGenerationConfig.from_model_config(tiny.config)
    config.update(max_new_tokens=4, steps=2, block_length=4, return_dict_in_generate=True)
    output = tiny.generate(**inputs, generation_config=config)
    assert torch.equal(output.sequences, tiny.diffusion_generate(**inputs, max_new_tokens=4, steps=2, block_length=4))
    with pytest.raises(TypeError, match=r"\['beam_width'\]"):
        tiny.generate(**inputs, beam_width=3)
    with pytest.raises(ValueError, match="num_beams=4 has no meaning in masked diffusion"):
        tiny.generate(**inputs, num_beams=4)


def test_tokens_per_forward_is_answer_tokens_over_counted_forward_calls(demo):
    model, processor = demo
    inputs, _ = demo_inputs(processor, seed=2)
    calls = []
    handle = model.register_forward_hook(lambda module, args, kwargs: calls.append(1))
    try:
        output = model.generate(**inputs, return_dict_in_generate=True, output_history=True)
    finally:
        handle.remove()
    # The answer length, counted here from the last canvas: tokens before the first <|eot_id|>.
    prompt_length = inputs["input_ids"].shape[1]
    answer = output.history[-1][0, prompt_length:].tolist()
    eot = model.config.eot_token_id
    length = answer.index(eot) if eot in answer else len(answer)
    assert 0 < length < len(answer) and len(calls) >= 1  # the demo answers in fewer tokens than it may use
    assert output.tokens_per_forward.shape == (1,)
    assert output.tokens_per_forward.item() == pytest.approx(length / len(calls))


def test_tokens_per_forward_of_a_batch_row_is_that_of_the_row_alone(tiny):
    ids, pixel_values, image_sizes = image_prompt(tiny.config)
    settings = dict(max_new_tokens=8, steps=8, block_length=4, stop_token_ids=[[7]], return_dict_in_generate=True)
    alone = tiny.generate(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, **settings)
    batch = tiny.generate(input_ids=torch.cat((ids, ids)), pixel_values=torch.cat((pixel_values, pixel_values)),
                          image_sizes=torch.cat((image_sizes, image_sizes)), **settings)  # fmt: skip
    assert batch.tokens_per_forward.tolist() == alone.tokens_per_forward.tolist() * 2
    expected = alone.answer_lengths.float() / alone.forward_passes_per_row
    assert torch.equal(alone.tokens_per_forward, expected)


# ---------------------------------------------------------------------------------------------- streamer


@pytest.mark.parametrize("seed", [0, 3])
def test_streamer_gets_the_prompt_then_the_answer_in_order_then_end(demo, seed):
    model, processor = demo
    inputs, _ = demo_inputs(processor, seed)
    recorder = Recorder()
    output = model.generate(**inputs, streamer=recorder, return_dict_in_generate=True)
    assert torch.equal(output.sequences, model.diffusion_generate(**inputs))
    puts = recorder.puts()
    assert torch.equal(puts[0], inputs["input_ids"])  # the prompt first, as DiffusionGemma (TextStreamer skips it)
    streamed = [i for value in puts[1:] for i in value[0].tolist()]
    assert all(value.dim() == 2 and value.shape[0] == 1 and value.shape[1] > 0 for value in puts[1:])
    assert streamed == output.answer_ids()[0]
    text = "".join(processor.tokenizer.decode(value[0], skip_special_tokens=True) + " " for value in puts[1:])
    assert text.split() == processor.tokenizer.decode(output.answer_ids()[0], skip_special_tokens=True).split()
    assert recorder.events[-1][0] == "end" and sum(kind == "end" for kind, _ in recorder.events) == 1


def test_drafts_come_after_every_forward_pass_with_the_answer_ahead(tiny):
    inputs = tiny_inputs(tiny)
    recorder = Recorder()
    output = tiny.generate(**inputs, max_new_tokens=8, steps=8, block_length=4, streamer=recorder,
                           return_dict_in_generate=True, output_history=True)  # fmt: skip
    drafts = recorder.drafts()
    assert len(drafts) == output.num_forward_passes == 8
    prompt_length = inputs["input_ids"].shape[1]
    sent, step = 0, 0
    for kind, value in recorder.events[1:]:
        if kind == "put":
            sent += value.shape[1]
            continue
        if kind != "draft":
            continue
        block_end = 4 if step < 4 else 8  # the draft ends with the block being decoded (2 steps of 4 each)
        assert value.dim() == 2 and value.shape == (1, block_end - sent)
        assert not bool((value == tiny.config.mask_token_id).any())
        canvas = output.history[step][0, prompt_length + sent : prompt_length + block_end]
        committed = canvas != tiny.config.mask_token_id
        assert torch.equal(value[0][committed], canvas[committed])  # committed tokens as they are
        step += 1


def test_streamer_holds_back_what_may_become_a_multi_token_stop():
    """Scripted steps: `[7, 8]` is the stop; `7` is committed before `8` and must not be streamed."""
    recorder = Recorder()
    feed = _StreamerFeed(recorder, mask_token_id=0, stop_sequences=[[7, 8]], suffix_length=0, block_length=4)
    steps = [([5, 7, 0, 0], None), ([5, 7, 8, 0], 1)]  # answer region after each step, the stop found
    for number, (answer, stop) in enumerate(steps):
        canvas = torch.tensor([[1, 2, *answer]])
        feed(LladaVDiffusionStep(step=number, block=0, block_step=number, rows=torch.tensor([0]),
                                 positions=torch.arange(2, 6), logits=torch.zeros(1, 4, 9),
                                 tokens=torch.tensor([[5, 7, 8, 3]]), committed=torch.zeros(1, 4, dtype=torch.bool),
                                 canvas=canvas, stop_indices=[stop], prompt_length=2))  # fmt: skip
    feed.finish([5], torch.tensor([[1, 2]]))
    assert [v.tolist() for v in recorder.puts()] == [[[1, 2]], [[5]]]


def test_a_streamer_needs_a_batch_of_one(tiny):
    ids, pixel_values, image_sizes = image_prompt(tiny.config)
    with pytest.raises(ValueError, match=r"batch of one prompt .* shape \(2, \d+\)"):
        tiny.generate(input_ids=torch.cat((ids, ids)), pixel_values=torch.cat((pixel_values, pixel_values)),
                      image_sizes=torch.cat((image_sizes, image_sizes)), streamer=Recorder())  # fmt: skip


def test_transformers_text_streamer_prints_the_answer(demo, capsys):
    from transformers import TextStreamer

    model, processor = demo
    inputs, _ = demo_inputs(processor, seed=4)
    output = model.generate(**inputs, streamer=TextStreamer(processor.tokenizer, skip_prompt=True),
                            return_dict_in_generate=True)  # fmt: skip
    answer = processor.tokenizer.decode(output.answer_ids()[0], skip_special_tokens=True)
    assert capsys.readouterr().out.split() == answer.split() != []


# ---------------------------------------------------------------------------------------------- pipeline


def _pipeline_matches_diffusion_generate(path, messages, **settings):
    from transformers import AutoProcessor, pipeline

    pipe = pipeline("image-text-to-text", model=str(path), trust_remote_code=True)
    assert type(pipe.model).__module__.startswith("transformers_modules.")  # the checkpoint's own code
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    expected = pipe.model.diffusion_generate(**inputs, **settings)
    # The sampler's own settings (steps, block_length) are no pipeline arguments: they go in generate_kwargs.
    ids = pipe(text=messages, return_tensors=True, generate_kwargs=settings)[0]["generated_token_ids"]
    assert torch.equal(ids, expected[0])
    text = pipe(text=messages, return_full_text=False, generate_kwargs=settings)[0]["generated_text"]
    answer = expected[0, inputs["input_ids"].shape[1] :]
    assert text.strip() == processor.tokenizer.decode(answer, skip_special_tokens=True).strip()
    return text.strip()


def test_pipeline_on_the_demo_model_answers_as_diffusion_generate():
    from llada_v.demo.model import demo_model_dir

    messages, expected_answer = demo_messages(seed=0)
    assert _pipeline_matches_diffusion_generate(demo_model_dir(), messages) == expected_answer


@pytest.mark.slow
def test_pipeline_on_a_converted_checkpoint_answers_as_diffusion_generate(tmp_path, golden_checkpoint):
    from PIL import Image

    from llada_v import LladaVConfig
    from llada_v.checkpoint_io import write_remote_code
    from llada_v.conversion.tokenizer import build_processor

    from _tokenizer_standin import standin_tokenizer

    path = tmp_path / "converted"
    shutil.copytree(golden_checkpoint, path)
    build_processor(standin_tokenizer(), config=LladaVConfig.from_pretrained(path)).save_pretrained(path)
    write_remote_code(path)
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}]
    _pipeline_matches_diffusion_generate(path, messages, max_new_tokens=8, steps=4, block_length=8)


# ---------------------------------------------------------------------------------------------- CLI --stream


@pytest.mark.slow
def test_cli_stream_in_a_pipe_prints_the_same_line_as_without(tmp_path):
    from llada_v.demo.model import demo_model_dir
    from llada_v.demo.scenes import make_sample

    sample = make_sample(5)
    sample["image"].save(tmp_path / "scene.png")
    question, answer = sample["qa"][0]
    argv = [*llada_v_command(), "generate", "--model", str(demo_model_dir()), "--image", str(tmp_path / "scene.png"),
            "--prompt", question]  # fmt: skip
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    streamed = subprocess.run([*argv, "--stream"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == streamed.returncode == 0, streamed.stderr[-2000:]
    assert streamed.stdout == plain.stdout == answer + "\n"


def test_cli_stream_on_a_terminal_draws_drafts_through_the_streamer(demo, monkeypatch):
    from llada_v import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model, processor = demo
    inputs, _ = demo_inputs(processor, seed=6)
    screen = Terminal()
    printer = cli.StreamPrinter(processor.tokenizer, out=screen, prefix="assistant> ")
    recorder = Recorder()
    chained = SimpleNamespace(put=lambda v: (recorder.put(v), printer.put(v)),
                              put_draft=lambda value: (recorder.put_draft(value), printer.put_draft(value)),
                              end=lambda: (recorder.end(), printer.end()))  # fmt: skip
    output = model.generate(**inputs, streamer=chained, return_dict_in_generate=True)
    answer = processor.tokenizer.decode(output.answer_ids()[0], skip_special_tokens=True).strip()
    text = screen.getvalue()
    drawn = text.count("\x1b7\x1b[2m")  # a draft drawn dim after the cursor was saved (empty ones are not)
    assert 1 <= drawn <= len(recorder.drafts()) == output.num_forward_passes
    assert text.count("\x1b8\x1b[J") == drawn  # each erased before what follows
    visible = text
    while "\x1b7" in visible:  # what stays on the screen: drop every erased draft
        start = visible.index("\x1b7")
        visible = visible[:start] + visible[visible.index("\x1b8\x1b[J", start) + 5 :]
    assert visible == f"assistant> {answer}\n"


# ---------------------------------------------------------------------------------------------- dLLM-Cache

DLLM_SETTINGS = {"prompt_interval_steps": 2, "gen_interval_steps": 2, "transfer_ratio": 0.5}
DLLM_SCHEDULE = dict(max_new_tokens=8, steps=8, block_length=4)


def test_generate_and_the_pipeline_pass_dllm_cache_to_the_sampler():
    from llada_v.demo.app import load_demo
    from llada_v.demo.model import demo_model_dir

    model, processor = load_demo()
    inputs, _ = demo_inputs(processor, seed=1)
    direct = model.diffusion_generate(**inputs, **DLLM_SCHEDULE, dllm_cache=DLLM_SETTINGS, return_dict_in_generate=True)
    via_generate = model.generate(**inputs, **DLLM_SCHEDULE, dllm_cache=DLLM_SETTINGS, return_dict_in_generate=True)
    assert torch.equal(via_generate.sequences, direct.sequences)
    assert via_generate.num_decoder_tokens == direct.num_decoder_tokens
    exact = model.generate(**inputs, **DLLM_SCHEDULE, return_dict_in_generate=True)
    assert direct.num_decoder_tokens < exact.num_decoder_tokens  # the cache was used
    messages, _ = demo_messages(seed=1)
    # The pipeline loads the checkpoint's own remote code (dllm_cache_llada_v.py among it).
    _pipeline_matches_diffusion_generate(demo_model_dir(), messages, **DLLM_SCHEDULE, dllm_cache=DLLM_SETTINGS)
