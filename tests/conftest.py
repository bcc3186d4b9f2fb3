"""Shared test fixtures: where the golden fixtures live, tiny configs, the converted golden checkpoint; the report of
unmarked slow tests (slow_report.py)."""

from pathlib import Path

import pytest
import torch

from paths import GOLDEN
from slow_report import UnmarkedSlowTests, limit_seconds

torch.set_num_threads(2)  # the golden outputs were produced with 2 threads


def pytest_configure(config):
    # A warning line in the terminal summary for each unmarked test over 10 s (slow_report.py).
    config.pluginmanager.register(UnmarkedSlowTests(limit_seconds()), "unmarked-slow-tests")


def require_golden() -> Path:
    if not (GOLDEN / "cases.json").is_file():
        pytest.skip(f"golden fixtures not found at {GOLDEN} (set LLADA_V_SHARED)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require_golden()


@pytest.fixture(scope="session")
def golden_checkpoint(tmp_path_factory, golden_dir) -> Path:
    """The official tiny checkpoint converted by our converter (float32, as the golden run computed)."""
    from llada_v.conversion.official import convert

    out = tmp_path_factory.mktemp("golden_ck") / "ck"
    src = golden_dir / "official_tiny"
    return convert(src, out, src / "vision_config.json", dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def golden_model(golden_checkpoint):
    from llada_v import LladaVModel

    return LladaVModel.from_pretrained(golden_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def demo():
    """The embedded demo model, its processor and its generation settings (the serving tests' in-process oracle)."""
    from llada_v.demo.app import load_demo
    from llada_v.inference import generation_config_for

    model, processor = load_demo()
    return model, processor, generation_config_for(model.generation_config, {})
