#!/usr/bin/env python
"""Build an untrained LLaDA-V (the Stage 1 starting point) from LLaDA-8B-Instruct and SigLIP
(see `llada_v/compose.py` and docs/training.md).

    python convert_checkpoints/compose_from_llada.py --llada-dir DIR --siglip-dir DIR --output-dir DIR \
        [--tokenizer-dir DIR] [--dtype bfloat16|float32|float16] [--seed 0] [--max-shard-size 5GB]
"""

import sys
from pathlib import Path

try:
    from llada_v.conversion.compose import main
except ImportError:
    # Running from a source checkout without `pip install -e .`: use the repository's src/ explicitly.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from llada_v.conversion.compose import main

if __name__ == "__main__":
    sys.exit(main())
