"""Where the tests find things: the repository root and `shared/` (the golden fixtures, the reference
config and tokenizer metadata), `../shared` next to the clone unless `$LLADA_V_SHARED` says otherwise."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLADA_V_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"


def llada_v_command() -> list[str]:
    """The installed `llada-v` script (beside this interpreter), else the module: what a user runs."""
    script = Path(sys.executable).with_name("llada-v")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llada_v.cli"]
