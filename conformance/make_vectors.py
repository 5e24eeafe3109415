"""Regenerate the committed conformance vectors: ``python -m conformance.make_vectors``.

Writes ``conformance/vectors/oracle_<problem>.npz`` (the numpy core's trajectory:
``step{t}_param{i}``) and ``conformance/vectors/rng.json`` (FLORA-RNG v1 golden words).
A changed vector needs a reason in the commit message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conformance.problems import PROBLEMS, oracle
from flora_core import rng

VECTORS = Path(__file__).parent / "vectors"
RNG_CASES = (
    (0, 0, 0),
    (1, 2, 3),
    (2**64 - 1, 2**32 - 1, 2**32 - 1),
    (0xDEADBEEF12345678, 7, 41),
)


def oracle_path(name: str) -> Path:
    return VECTORS / f"oracle_{name}.npz"


def load_oracle(name: str) -> list[list[np.ndarray]]:
    with np.load(oracle_path(name)) as data:
        steps = 1 + max(int(k.split("_")[0][4:]) for k in data.files)
        params = 1 + max(int(k.split("_")[1][5:]) for k in data.files)
        return [
            [data[f"step{t}_param{i}"] for i in range(params)] for t in range(steps)
        ]


def rng_vectors() -> list[dict]:
    cases = []
    for seed, step, stream in RNG_CASES:
        words = rng.random_bits(seed, step, stream, (3, 9), xp=np, offset=(5, 3))
        cases.append(
            {
                "seed": seed,
                "step": step,
                "stream": stream,
                "shape": [3, 9],
                "offset": [5, 3],
                "words": [[f"{int(w):08x}" for w in row] for row in words],
            }
        )
    return cases


def main() -> None:
    VECTORS.mkdir(exist_ok=True)
    for name, problem in PROBLEMS.items():
        arrays = {
            f"step{t}_param{i}": p
            for t, params in enumerate(oracle(problem))
            for i, p in enumerate(params)
        }
        np.savez_compressed(oracle_path(name), **arrays)
    (VECTORS / "rng.json").write_text(json.dumps(rng_vectors(), indent=1) + "\n")
    print(f"wrote {len(PROBLEMS)} oracle trajectories and rng.json to {VECTORS}")


if __name__ == "__main__":
    main()
