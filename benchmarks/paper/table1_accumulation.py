"""Table 1 at small scale: compressing gradient accumulation (τ = 16), fine-tuning.

    nice python benchmarks/paper/table1_accumulation.py [--quick] [--workers 2]

A checkpoint is first pre-trained in the benchmark (Adafactor + momentum on the
pretraining distribution of ``data.py``), then fine-tuned for one epoch on the
shifted distribution (target order changed, a quarter of the dictionary replaced),
as the paper fine-tunes T5/GPT-2 on XSum/IWSLT. Adafactor without momentum, as the
paper's accumulation setting:

- None: no accumulation, one update per micro-batch (the physical batch);
- Naive: full-size accumulation over τ = 16 micro-batches (``accumulation_steps=16``
  with ``rank=None``: a full ``acc`` buffer per parameter);
- LoRA(r): adapters on every attention/feed-forward matrix, naive accumulation of
  the adapters' (and the other trainable parameters') gradients;
- FLORA(r): ``FloraAdafactor(accumulation_steps=16, rank=r)`` on the matrices:
  compressed accumulation (Algorithm 1) inside backward.

Naive's learning rate is swept on validation loss and applied to None and FLORA;
LoRA is swept per rank. Writes ``benchmarks/results/paper_table1_accumulation.*``.
"""

from __future__ import annotations

import math

import _paths  # noqa: F401
import data
import report
import torch
from common import Scale, accumulation_base, parse, rank_table
from flora_torch import FloraAdafactor
from harness import MIN_FACTOR, Runner
from model import GPT, split_params

from flora_core import accumulation
from flora_core._xp import namespace_for

STEM = "paper_table1_accumulation"
TITLE = "Table 1 (small scale): compressing gradient accumulation, fine-tuning"


def describe(scale: Scale, pre: dict) -> str:
    test = pre["test"]
    return (
        f"Width-64 GPT (2 blocks, 0.1 M parameters). Pre-trained in the benchmark "
        f"for {scale.pretrain_steps} updates of 8 examples (Adafactor + momentum, "
        f"lr 3e-2): test loss {test['pretrain']['loss']:.3f} on its own distribution, "
        f"{test['shifted']['loss']:.3f} (exact match {test['shifted']['exact']:.3f}) on "
        f"the shifted one before fine-tuning. Fine-tuning: one epoch of "
        f"{scale.accumulation_micro} micro-batches of {scale.accumulation_batch} "
        f"examples, τ = {scale.tau} ({scale.accumulation_micro // scale.tau} updates; "
        f"None: {scale.accumulation_micro} updates), Adafactor without momentum. Mem = "
        f"optimizer-state bytes including the accumulators; ΔM vs None. Final rows: "
        f"{len(scale.seeds)} seed(s), mean ± half-range; sweeps: seed 0.\n\n"
    )


def reconstruction(scale: Scale, pre: dict, cycles: int = 4) -> list[dict]:
    """Relative error of one cycle's compressed accumulation, per rank.

    On the pre-trained model and the first fine-tuning micro-batches: the τ
    micro-batch gradients of every compressed matrix are accumulated with
    ``flora_core.accumulation`` under the plans ``FloraAdafactor`` makes (what its
    hooks do), decompressed, and compared with their exact mean:
    ``||Ĝ - Ḡ||_F / ||Ḡ||_F`` over all matrices, averaged over ``cycles`` cycles
    (cycle c uses projection A_c). A Gaussian projection gives about sqrt((d+1)/r).
    """
    torch.manual_seed(0)
    xp, tau, batch = namespace_for("torch"), scale.tau, scale.accumulation_batch
    model = GPT()
    model.load_state_dict(torch.load(pre["path"], weights_only=True))
    inputs, targets = data.dataset("shifted", batch * tau * cycles, data.TRAIN_SEED)
    matrices, others = split_params(model)
    grads = []  # grads[c][j][i]: cycle c, micro-batch j, matrix i
    for c in range(cycles):
        grads.append([])
        for j in range(tau):
            rows = slice((c * tau + j) * batch, (c * tau + j + 1) * batch)
            model.zero_grad()
            model(inputs[rows], targets[rows]).backward()
            grads[c].append([p.grad.clone() for p in matrices])
    out = []
    for r in scale.ranks:
        groups = [{"params": matrices, "rank": r}, {"params": others}]
        opt = FloraAdafactor(groups, rank=None, min_dim_size_to_factor=MIN_FACTOR)
        plans = [opt.plan_of(p) for p in matrices]
        errors = []
        for c in range(cycles):
            num = den = 0.0
            for i, plan in enumerate(plans):
                acc = torch.zeros(accumulation.accumulator_shape(plan))
                for j in range(tau):
                    acc = accumulation.accumulate(
                        acc, grads[c][j][i], c, plan=plan, xp=xp
                    )
                approx = accumulation.accumulated_gradient(
                    acc, c, tau, plan=plan, xp=xp
                )
                exact = sum(grads[c][j][i] for j in range(tau)) / tau
                num += float((approx - exact).square().sum())
                den += float(exact.square().sum())
            errors.append(math.sqrt(num / den))
        d = min(plans[0].matrix_shape)
        out.append(
            {"rank": r, "error": sum(errors) / cycles, "theory": math.sqrt((d + 1) / r)}
        )
    return out


def main(runner: Runner, scale: Scale) -> dict:
    base, pre = accumulation_base(scale, runner)
    table = rank_table(runner, scale, base)
    meta, md = report.header(TITLE)
    claims = report.rank_claims(table["rows"], scale.ranks)
    errors = reconstruction(scale, pre)
    md += (
        describe(scale, pre)
        + report.rows_markdown(table["rows"], "Accumulation")
        + "\nRelative error of one cycle's compressed accumulation on the real "
        "gradients (`reconstruction()`: ||Ĝ - Ḡ|| / ||Ḡ|| over the matrices, mean of "
        "4 cycles; a Gaussian projection gives about sqrt((d+1)/r), d = 64):\n\n"
        "| r | error | sqrt((d+1)/r) |\n|---|---|---|\n"
        + "".join(f"| {e['rank']} | {e['error']:.3f} | {e['theory']:.3f} |\n" for e in errors)
        + "\nLearning-rate sweeps (best validation loss):\n\n"
        + report.sweeps_markdown(table["sweeps"])
        + "\nClaims:\n\n" + "\n".join(claims) + "\n"
    )  # fmt: skip
    payload = {**table, "pretrained": pre, "reconstruction": errors, "claims": claims}
    report.write(STEM, meta, payload, md)
    report.plot_rank_table(STEM, "Table 1: accumulation (τ=16)", table, scale.ranks)
    return {**table, "claims": claims, "markdown": md, "pretrained": pre}


if __name__ == "__main__":
    args, scale = parse(__doc__.splitlines()[0])
    print(main(Runner(args.workers), scale)["markdown"])
