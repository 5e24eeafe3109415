"""Table 2 at small scale: compressing momentum, training from scratch.

    nice python benchmarks/paper/table2_momentum.py [--quick] [--workers 2]

None (Adafactor without momentum), Naive (Adafactor with full momentum β = 0.9),
LoRA(r) (adapters on every attention/feed-forward matrix of a frozen *random* init,
trained with Adafactor + momentum: the paper's from-scratch protocol) and FLORA(r)
(``FloraAdafactor``: momentum compressed to rank r, κ = 100). Naive's learning rate
is swept on validation loss and applied to None and FLORA; LoRA is swept per rank.
Writes ``benchmarks/results/paper_table2_momentum.{json,md,png}``.
"""

from __future__ import annotations

import _paths  # noqa: F401
import report
from common import Scale, momentum_base, parse, rank_table
from harness import Runner

STEM = "paper_table2_momentum"
TITLE = "Table 2 (small scale): compressing momentum, from scratch"


def main(runner: Runner, scale: Scale) -> dict:
    table = rank_table(runner, scale, momentum_base(scale))
    meta, md = report.header(TITLE)
    claims = report.rank_claims(table["rows"], scale.ranks)
    md += (
        f"Width-64 GPT (2 blocks, 0.1 M parameters) trained from scratch on the "
        f"generated translation task (`benchmarks/paper/data.py`), "
        f"{scale.momentum_steps} updates of {scale.momentum_batch} examples, "
        f"Adafactor (factored second moment, `min_dim_size_to_factor=32`), κ = "
        f"{scale.kappa}. Mem = optimizer-state bytes (moments and second moments) "
        f"after training; ΔM vs None. Loss = cross-entropy per target character of "
        f"the checkpoint with the lowest validation loss; exact match = the whole "
        f"translation right (teacher-forced argmax = greedy decoding). Final rows: "
        f"{len(scale.seeds)} seed(s), mean ± half-range; sweeps: seed 0.\n\n"
        + report.rows_markdown(table["rows"], "Momentum")
        + "\nLearning-rate sweeps (best validation loss):\n\n"
        + report.sweeps_markdown(table["sweeps"])
        + "\nClaims:\n\n" + "\n".join(claims) + "\n"
    )  # fmt: skip
    report.write(STEM, meta, {**table, "claims": claims}, md)
    report.plot_rank_table(STEM, "Table 2: momentum", table, scale.ranks)
    return {**table, "claims": claims, "markdown": md}


if __name__ == "__main__":
    args, scale = parse(__doc__.splitlines()[0])
    print(main(Runner(args.workers), scale)["markdown"])
