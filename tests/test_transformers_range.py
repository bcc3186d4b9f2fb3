"""The remote code under the installed transformers: exact where the version is supported, one clear line where not.

CI runs this module (`-m transformers_range`) once in the test environment and again with the oldest and the newest
supported transformers (and one unsupported release) overlaid on it (.ci/run, docs/usage.md#supported-transformers-
versions). The checkpoint is the golden tiny one as our converter writes it: `$LLADA_V_RANGE_CHECKPOINT` when set
(CI converts it once under the pinned transformers, as a Hub checkpoint is written once and then loaded by every
user's transformers), else converted here.

Everything the checkpoint does runs in one fresh process that cannot import `llada_v` (only the folder's code
counts): text and image forwards, the golden generation cases, the image processor's pixels. The tests below compare
what it recorded with the official golden outputs.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

pytestmark = pytest.mark.transformers_range

# The supported range as docs/usage.md states it (the remote code's own constant is what is under test).
SUPPORTED = ((4, 57, 1), (6, 0, 0))
INSTALLED = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", transformers.__version__).groups())
IN_RANGE = SUPPORTED[0] <= INSTALLED < SUPPORTED[1]
needs_supported = pytest.mark.skipif(not IN_RANGE, reason=f"transformers {transformers.__version__} is unsupported")

FORWARD_CASES = ["text_only", "wide_300x100"]
GENERATION_CASES = [
    "wide_s8_g16_b8",
    "test_jpg_s16_g32_b32",
    "text_s32_g32_b16_stop",
    "wide_s8_g16_b8_cfg1",
    "text_s16_g16_b8_suffix_stop",
]
PIXEL_IMAGES = {"wide_300x100": "images/wide_300x100.png", "tall_500x700": "images/tall_500x700.png"}

# Runs in the fresh process: argv = checkpoint folder, golden folder, output folder.
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, time
    sys.modules["llada_v"] = None  # only the checkpoint folder's code may be used
    from pathlib import Path
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    import transformers
    from transformers import AutoConfig, AutoModel
    # `from transformers import AutoImageProcessor` is a torchvision placeholder in some 5.x releases without it.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    folder, golden, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    forward_ids, generation_ids, pixel_images = json.loads(sys.argv[4])
    torch.set_num_threads(2)  # the golden outputs were produced with 2 threads
    start = time.perf_counter()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    classes = {type(o).__name__: type(o).__module__ for o in (config, model, image_processor)}
    cases = json.loads((golden / "cases.json").read_text())
    image_id = config.image_token_id

    def expand(ids, counts):
        counts, out = iter(counts), []
        for t in ids:
            out += [image_id] * next(counts) if t == -200 else [t]
        return torch.tensor([out])

    def images(files):
        if not files:
            return {}
        processed = image_processor([Image.open(golden / f) for f in files])
        return {k: processed[k] for k in ("pixel_values", "image_sizes", "image_layouts", "image_num_crops")}

    tensors = {}
    with torch.no_grad():
        for case in (c for c in cases["forward"] if c["id"] in forward_ids):
            ids = expand(case["input_ids"], case["image_tokens_per_placeholder"])
            logits = model(input_ids=ids, **images(case["images"])).logits[0]
            top2 = logits.topk(2, -1).values
            tensors[f"forward/{case['id']}/argmax"] = logits.argmax(-1)
            tensors[f"forward/{case['id']}/last8"] = logits[-8:].contiguous()
            tensors[f"forward/{case['id']}/logsumexp"] = torch.logsumexp(logits, -1)
    generations = {}
    for case in (c for c in cases["generation"] if c["id"] in generation_ids):
        counts = [{"images/wide_300x100.png": 981, "images/test.jpg": 3633}[f] for f in case["images"]]
        ids = expand(case["input_ids"], counts)
        s = case["settings"]
        result = model.diffusion_generate(
            ids, **images(case["images"]), steps=s["steps"], max_new_tokens=s["gen_length"],
            block_length=s["block_length"], temperature=s["temperature"], remasking=s["remasking"],
            cfg_scale=s["cfg_scale"], mask_token_id=s["mask_id"], stop_token_ids=s["stop_token_ids"],
            suffix_token_ids=s["suffix_token_ids"], return_dict_in_generate=True,
        )
        n = int(result.answer_lengths[0]) + len(s["suffix_token_ids"] or [])
        generations[case["id"]] = {
            "ids": result.sequences[0, ids.shape[1] : ids.shape[1] + n].tolist(),
            "forward_passes": int(result.num_forward_passes),
        }
    for name, file in pixel_images.items():
        tensors[f"pixels/{name}"] = image_processor(Image.open(golden / file))["pixel_values"]
    save_file(tensors, str(out / "tensors.safetensors"))
    (out / "results.json").write_text(json.dumps({
        "transformers": transformers.__version__, "classes": classes, "generations": generations,
        "seconds": time.perf_counter() - start,
    }))
    """
)


def _fresh_env(tmp_path: Path) -> dict:
    """The environment with `src/` removed from PYTHONPATH (overlays such as a transformers release stay)."""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    src = Path(__file__).resolve().parents[1] / "src"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != src]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@pytest.fixture(scope="module")
def checkpoint(request) -> Path:
    """The converted golden checkpoint; its `*.py` files are exactly the remote code."""
    given = os.environ.get("LLADA_V_RANGE_CHECKPOINT")
    if given:
        return Path(given)
    if not IN_RANGE:
        pytest.skip("set LLADA_V_RANGE_CHECKPOINT: the converter needs a supported transformers")
    return request.getfixturevalue("golden_checkpoint")


@pytest.fixture(scope="module")
def remote(checkpoint, golden_dir, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("range")
    cases = json.dumps([FORWARD_CASES, GENERATION_CASES, PIXEL_IMAGES])
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(checkpoint), str(golden_dir), str(tmp), cases],
        cwd=tmp,
        env=_fresh_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {**json.loads((tmp / "results.json").read_text()), "tensors": load_file(tmp / "tensors.safetensors")}


def _golden_cases(golden_dir: Path, family: str) -> dict:
    return {c["id"]: c for c in json.loads((golden_dir / "cases.json").read_text())[family]}


@needs_supported
def test_checkpoint_code_is_what_loads(remote):
    assert remote["transformers"] == transformers.__version__
    assert set(remote["classes"]) == {"LladaVConfig", "LladaVModel", "LladaVImageProcessor"}
    for name, module in remote["classes"].items():
        assert module.startswith("transformers_modules."), (name, module)
    print(f"transformers {remote['transformers']}: remote-code parity subset in {remote['seconds']:.1f} s")


@needs_supported
@pytest.mark.parametrize("case_id", FORWARD_CASES)
def test_forward_logits_match_the_official_ones(remote, golden_dir, case_id):
    golden = load_file(golden_dir / _golden_cases(golden_dir, "forward")[case_id]["tensors_file"])
    got = {k.rsplit("/", 1)[1]: v for k, v in remote["tensors"].items() if k.startswith(f"forward/{case_id}/")}
    # Positions whose top-1/top-2 margin is below 2e-4 may flip under 1e-4 noise (golden README).
    confident = golden["top1_top2_margin"] >= 2e-4
    assert torch.equal(got["argmax"][confident], golden["argmax"][confident])
    torch.testing.assert_close(got["last8"], golden["logits_last8"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["logsumexp"], golden["logsumexp"], atol=1e-4, rtol=0)


@needs_supported
@pytest.mark.parametrize("case_id", GENERATION_CASES)
def test_generation_returns_the_official_ids(remote, golden_dir, case_id):
    case = _golden_cases(golden_dir, "generation")[case_id]
    got = remote["generations"][case_id]
    assert got["ids"] == case["generated_ids"]
    assert got["forward_passes"] == case["trace"]["num_forward_calls"]


@needs_supported
def test_processor_pixels_are_the_official_ones(remote, golden_dir):
    wide = load_file(golden_dir / "tensors" / "pixels_wide_300x100.safetensors")["pixel_values"][0]
    assert torch.equal(remote["tensors"]["pixels/wide_300x100"], wide)
    tall = load_file(golden_dir / "tensors" / "pixels_tall_500x700.safetensors")
    expected = tall["lut_f32"][tall["pixel_codes_u8"].long()][0]
    assert torch.equal(remote["tensors"]["pixels/tall_500x700"], expected)


@pytest.mark.skipif(IN_RANGE, reason=f"transformers {transformers.__version__} is supported")
def test_unsupported_transformers_stops_at_import_with_one_line(checkpoint, tmp_path):
    """Under an unsupported release, loading the checkpoint ends in one ImportError line naming both versions."""
    code = (
        "import sys; sys.modules['llada_v'] = None\n"
        "from transformers import AutoConfig\n"
        f"AutoConfig.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_fresh_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: LLaDA-V's remote code supports transformers >=4.57.1,<6 "), last
    assert f"the installed version is {transformers.__version__}:" in last, last


# ------------------------------------------------------------------ the gate, with a stand-in transformers

ENTRY_MODULES = ["configuration_llada_v", "modeling_llada_v", "processing_llada_v", "image_processing_llada_v"]


def _import_with_fake_transformers(
    checkpoint: Path, tmp_path: Path, version: str, module: str
) -> subprocess.CompletedProcess:
    """Import `module` of the checkpoint's code (as a package) beside a `transformers` that has only a version."""
    fake, package = tmp_path / "fake" / "transformers", tmp_path / "ckpt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"__version__ = {version!r}\n")
    package.mkdir()
    (package / "__init__.py").write_text("")
    for path in checkpoint.glob("*.py"):
        shutil.copyfile(path, package / path.name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), str(tmp_path)]))
    return subprocess.run(
        [sys.executable, "-c", f"import ckpt.{module}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "version, module",
    [("4.56.2", m) for m in ENTRY_MODULES] + [(v, "configuration_llada_v") for v in ("4.57.0", "6.0.0", "3.5.1")],
)
def test_every_entry_module_stops_first_with_the_one_line_message(checkpoint, tmp_path, version, module):
    result = _import_with_fake_transformers(checkpoint, tmp_path, version, module)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if re.match(r"\w+Error\b", line)]
    assert errors == [
        f"ImportError: LLaDA-V's remote code supports transformers >=4.57.1,<6 (tested 4.57.1 to 5.25.0); the "
        f"installed version is {version}: pip install 'transformers>=4.57.1,<6'"
    ], result.stderr[-2000:]


@pytest.mark.parametrize("version", ["4.57.1", "5.0.0", "5.26.0.dev0", "5.99.3"])
def test_a_supported_version_passes_the_gate(checkpoint, tmp_path, version):
    # The stand-in has no GenerationConfig: getting that far means the version check let it through.
    result = _import_with_fake_transformers(checkpoint, tmp_path, version, "configuration_llada_v")
    assert result.returncode != 0
    assert "LLaDA-V's remote code supports" not in result.stderr
    assert "cannot import name" in result.stderr.splitlines()[-1], result.stderr[-2000:]


def test_config_and_model_card_state_the_range(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["supported_transformers"] == ">=4.57.1,<6"
    card = (checkpoint / "README.md").read_text()
    assert "transformers `>=4.57.1,<6`" in card
