"""Where the tests find things: the repository root and `shared/` (the golden fixtures, the reference
config and tokenizer metadata), `../shared` next to the clone unless `$LLADA_V_SHARED` says otherwise."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLADA_V_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
