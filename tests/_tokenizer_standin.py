"""Test helpers: the stand-in LLaDA tokenizer (real special ids, byte-level BPE).

The real `tokenizer.json` is not available here; `llada_v.conversion.tokenizer` writes a stand-in of the released
tokenizer folder, and `build_converted_tokenizer` adds `<image>` at 126349 exactly as the converter does.
Model tests may use `standin_processor(crop_size=...)` too.
"""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from llada_v.conversion.tokenizer import build_converted_tokenizer, build_processor, write_standin_released_tokenizer
from llada_v.image_processing_llada_v import LladaVImageProcessor


@functools.lru_cache(maxsize=1)
def standin_released_tokenizer_dir() -> Path:
    """A stand-in of the released tokenizer folder, written once per test session."""
    folder = Path(tempfile.mkdtemp(prefix="llada_v_standin_tok_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_standin_released_tokenizer(folder)


def standin_tokenizer():
    """A fresh converted stand-in tokenizer (`<image>` at 126349, LLaDA-V chat template)."""
    return build_converted_tokenizer(standin_released_tokenizer_dir())


def standin_processor(crop_size: int = 28, patch_size: int = 14, **image_kwargs):
    """A `LladaVProcessor` with the stand-in tokenizer and an image processor of the given crop size."""
    image_processor = LladaVImageProcessor(crop_size=crop_size, patch_size=patch_size, **image_kwargs)
    return build_processor(standin_tokenizer(), image_processor=image_processor)
