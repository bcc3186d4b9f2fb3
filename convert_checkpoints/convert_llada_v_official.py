#!/usr/bin/env python
"""Convert a released LLaDA-V checkpoint into the llada-v format (see `llada_v/convert_official.py`).

    python convert_checkpoints/convert_llada_v_official.py --input-dir DIR --output-dir DIR \
        [--vision-config PATH] [--dtype bfloat16|float32]
"""

import sys
from pathlib import Path

try:
    from llada_v.conversion.official import main
except ImportError:
    # Running from a source checkout without `pip install -e .`: use the repository's src/ explicitly.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from llada_v.conversion.official import main

if __name__ == "__main__":
    sys.exit(main())
