"""Import paths for the paper benchmarks (repo root, adapters, benchmarks, this folder)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (HERE, ROOT / "benchmarks", ROOT / "adapters", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
