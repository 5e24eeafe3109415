"""Tables, the memory-loss picture and the claims of the LM benchmark, from its runs.

Every claim is decided here from the measured numbers by a stated rule; nothing is
written by hand. Noise is the seed range: a row's ``spread`` is half the range of its
final validation losses over the seeds; two rows differ only when their means are
further apart than the sum of their spreads.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

from _meta import markdown_header, provenance  # noqa: E402

STEM = "lm_frontier"
TITLE = "Pre-training on real text at equal optimizer memory (LM frontier)"
PACKAGES = ("torch", "tokenizers", "galore-torch", "apollo-torch", "bitsandbytes",
            "matplotlib")  # fmt: skip
DISPLAY = {
    "AdamW(foreach)": "AdamW",
    "AdamW8bit": "AdamW 8-bit (bitsandbytes)",
    "Adafactor+momentum": "Adafactor + momentum",
    "GaLoreAdamW": "GaLore",
    "APOLLO": "APOLLO",
    "APOLLO-Mini": "APOLLO-Mini (r=1)",
    "FloraAdam": "FloraAdam",
    "FloraAdam(factored)": "FloraAdam(factored)",
    "FloraAdafactor": "FloraAdafactor",
}
# "pre-trains": recovers at least this share of AdamW's drop in validation loss.
PRETRAIN_SHARE = 0.9
# "equal memory": a FLORA point counts against another method's when its optimizer
# state is at most this factor of the other's.
EQUAL_MEMORY = 1.05


def is_flora(row: dict) -> bool:
    return row["optimizer"].startswith("Flora")


def name_of(optimizer: str, rank: int | None) -> str:
    return DISPLAY.get(optimizer, optimizer) + (f" r={rank}" if rank else "")


def _ok(run: dict) -> bool:
    return "error" not in run and not run["diverged"]


def summarise(sweep: list[dict], seeds: list[dict]) -> dict:
    """One row: the method at its best learning rate, over seeds."""
    first = seeds[0]
    good = [r for r in seeds if _ok(r)]
    losses = [r["final_valid_loss"] if _ok(r) else math.inf for r in seeds]
    finite = [x for x in losses if math.isfinite(x)]
    grid = sorted(r["lr"] for r in sweep)
    lr = first["lr"]
    row = {
        "size": first["size"], "optimizer": first["optimizer"], "rank": first["rank"],
        "name": name_of(first["optimizer"], first["rank"]), "lr": lr,
        "lr_at_grid_edge": len(grid) > 1 and lr in (grid[0], grid[-1]),
        "sweep": [{"lr": r["lr"], "final_valid_loss": r.get("final_valid_loss"),
                   "diverged": r.get("diverged"), "error": r.get("error")}
                  for r in sweep],
        "seeds": [r["seed"] for r in seeds], "final_valid_loss": losses,
        "mean": statistics.fmean(finite) if finite else math.inf,
        "spread": (max(finite) - min(finite)) / 2 if len(finite) > 1 else 0.0,
        "min": min(finite, default=math.inf), "max": max(finite, default=math.inf),
        "diverged": len(seeds) - len(good),
        "errors": [r["error"] for r in seeds if "error" in r],
    }  # fmt: skip
    if good:
        ref = good[0]
        row.update(
            params=ref["params"], state_bytes=ref["state_bytes"],
            state_bytes_per_param=ref["state_bytes_per_param"],
            step_seconds=statistics.median(r["step_seconds"] for r in good),
            optimizer_step_seconds=statistics.median(
                r["optimizer_step_seconds"] for r in good),
            curve=[(tokens, loss) for _, tokens, loss in ref["curve"]],
            curve_start=statistics.fmean(r["curve"][0][2] for r in good),
            curve_end=statistics.fmean(r["curve"][-1][2] for r in good),
            tokens=ref["steps"] * ref["batch"] * ref["model"]["context"],
            load_average_1m=[r["load_average_1m"] for r in good],
        )  # fmt: skip
    return row


def rows_of(sweeps: dict, seeds: dict) -> list[dict]:
    return [summarise(sweeps[k], seeds[k]) for k in sweeps]


def _fmt_loss(row: dict) -> str:
    if not math.isfinite(row["mean"]):
        return "diverged" if not row["errors"] else "failed"
    text = f"{row['mean']:.3f}"
    if len(row["seeds"]) > 1:
        text += f" ± {row['spread']:.3f}"
    return text + (f" ({row['diverged']} diverged)" if row["diverged"] else "")


def _close(a: dict, b: dict) -> bool:
    return abs(a["mean"] - b["mean"]) <= a["spread"] + b["spread"]


def verdict(held: int, total: int) -> str:
    if total == 0:
        return "not measured"
    if held == total:
        return "held"
    return "not held" if held == 0 else f"held in {held} of {total}"


def claims(rows: list[dict], sizes: list[str]) -> list[dict]:
    """The issue's questions, answered from ``rows`` by the rules in their text."""
    out = []
    measured = [r for r in rows if "state_bytes" in r and math.isfinite(r["mean"])]

    def at(size: str) -> list[dict]:
        return [r for r in measured if r["size"] == size]

    # 1. Does FLORA pre-train?
    held = total = 0
    details = []
    for size in sizes:
        adamw = next((r for r in at(size) if r["optimizer"] == "AdamW(foreach)"), None)
        if adamw is None:
            continue
        drop = adamw["curve_start"] - adamw["curve_end"]
        others = [r for r in at(size) if not is_flora(r)]  # AdamW is one of them
        top = max(others, key=lambda r: r["curve_start"] - r["curve_end"])
        top_drop = top["curve_start"] - top["curve_end"]
        if not any(is_flora(r) for r in rows if r["size"] == size):
            continue
        for r in (r for r in rows if r["size"] == size and is_flora(r)):
            total += 1
            own = (r["curve_start"] - r["curve_end"]
                   if "curve_end" in r and math.isfinite(r["mean"]) else 0.0)  # fmt: skip
            held += own / drop >= PRETRAIN_SHARE
            details.append(
                f"{size} {r['name']} {own / drop:.0%} ({own / top_drop:.0%})"
            )
        details[-1] += f" [best other at {size}: {top['name']}]"
    out.append({
        "claim": "FLORA pre-trains: each FLORA optimizer, at its best learning rate, "
                 f"recovers at least {PRETRAIN_SHARE:.0%} of AdamW's drop in validation "
                 "loss over the run (mean over seeds; in brackets: share of the drop of "
                 "the non-FLORA optimizer that dropped most)",
        "verdict": verdict(held, total), "detail": ", ".join(details),
    })  # fmt: skip
    # 2-3. At equal memory, is FLORA as good as GaLore / APOLLO / APOLLO-Mini?
    for other in ("GaLoreAdamW", "APOLLO", "APOLLO-Mini"):
        held = total = 0
        details = []
        for size in sizes:
            for o in (r for r in at(size) if r["optimizer"] == other):
                cands = [f for f in at(size) if is_flora(f)
                         and f["state_bytes"] <= EQUAL_MEMORY * o["state_bytes"]]  # fmt: skip
                total += 1
                if not cands:
                    details.append(f"{size} {o['name']}: no FLORA point at "
                                   f"<= {o['state_bytes'] / 2**20:.2f} MiB")  # fmt: skip
                    continue
                f = min(cands, key=lambda r: r["mean"])
                ok = f["mean"] <= o["mean"] or _close(f, o)
                held += ok
                how = ("lower" if f["mean"] < o["mean"] and not _close(f, o) else
                       "within the seed range" if _close(f, o) else "higher")  # fmt: skip
                details.append(
                    f"{size} {o['name']} {o['mean']:.3f} at "
                    f"{o['state_bytes'] / 2**20:.2f} MiB vs {f['name']} {f['mean']:.3f} "
                    f"at {f['state_bytes'] / 2**20:.2f} MiB ({how})"
                )
        out.append({
            "claim": f"At equal or lower optimizer memory (state <= {EQUAL_MEMORY:g}x), "
                     f"the best FLORA point matches or beats {DISPLAY[other]} (final "
                     "validation loss lower, or within the seed ranges)",
            "verdict": verdict(held, total), "detail": "; ".join(details),
        })  # fmt: skip
    # 4. Is FLORA on the memory-loss frontier?
    held = total = 0
    details = []
    for size in sizes:
        total += 1
        free = []
        for f in (r for r in at(size) if is_flora(r)):
            dominated = any(
                not is_flora(o) and o["state_bytes"] <= f["state_bytes"]
                and o["mean"] < f["mean"] and not _close(o, f)
                for o in at(size)
            )  # fmt: skip
            if not dominated:
                free.append(f["name"])
        held += bool(free)
        details.append(f"{size}: {', '.join(free) or 'none'}")
    out.append({
        "claim": "FLORA is on the memory-loss frontier: at each size some FLORA point "
                 "is not beaten by another method with no more optimizer state (lower "
                 "loss beyond the seed ranges)",
        "verdict": verdict(held, total),
        "detail": "undominated FLORA points: " + "; ".join(details),
    })  # fmt: skip
    return out


def markdown(payload: dict) -> str:
    meta, scale, corpus = payload["meta"], payload["scale"], payload["corpus"]
    md = markdown_header(TITLE, meta)
    if payload["quick"]:
        md += "**`--quick` smoke run: toy scale, the numbers mean nothing.**\n\n"
    sizes = ", ".join(
        f"{s['name']}: width {s['model']['width']}, {s['model']['depth']} blocks, "
        f"{s['model']['heads']} heads, context {s['model']['context']}, batch "
        f"{s['batch']}, {s['steps']} steps, ranks {s['ranks']}"
        for s in scale["sizes"]
    )
    names = [s["name"] for s in scale["sizes"]]
    swept = ", ".join(names[: scale["swept"]])
    borrowed = (
        f"{', '.join(names[scale['swept'] :])} takes each method's best lr at "
        f"{names[0]} (the same rank fraction), seeds {scale['seeds']}, no sweep; "
        if len(names) > scale["swept"] else ""
    )  # fmt: skip
    md += (
        f"Corpus: the Python {corpus['python']} standard library's `*.py` files "
        f"({corpus['files']['train']} train / {corpus['files']['valid']} validation "
        f"files, split by a hash of the path; {corpus['files']['skipped_not_utf8']} "
        f"not UTF-8 skipped), byte-level BPE with {corpus['vocab_size']} tokens "
        f"trained here on the training files: {corpus['tokens']['train']:,} train / "
        f"{corpus['tokens']['valid']:,} validation tokens (corpus sha256 "
        f"`{corpus['corpus_sha256'][:16]}`, tokenizer sha256 "
        f"`{corpus['tokenizer_sha256'][:16]}`).\n\n"
        f"Model: LLaMA-style decoder (RMSNorm, SwiGLU, rotary positions, untied "
        f"embeddings), {sizes}. Schedule: linear warm-up over "
        f"{scale['warmup_fraction']:.0%} of the steps, cosine to "
        f"{scale['min_lr_ratio']:g} x the peak; gradient clipping {scale['clip']:g}; "
        f"weight decay {scale['weight_decay']:g}. GaLore, APOLLO and FLORA project the "
        f"attention and feed-forward matrices; embeddings, head and norms get each "
        f"method's base optimizer. κ = update_proj_gap = {scale['kappa']}. Learning "
        f"rate: at {swept}, each method and rank swept over its grid with seed 0 "
        f"(final validation loss), then seeds {scale['seeds']} at the best one; "
        f"{borrowed}`*` marks a best lr at the edge of its grid. Validation loss: "
        f"nats per token on "
        f"{scale['final_windows']} fixed windows spread over the validation files. "
        f"Seconds per step: median over the run (forward, backward, clipping, step), "
        f"1 torch thread per run, {payload['runs']['workers']} runs at a time.\n\n"
        "Adafactor + momentum is `flora_torch.FloraAdafactor(rank=None, momentum=0.9)`, "
        "which is exactly `optax.adafactor(momentum=0.9)` (the conformance suite checks "
        "it); AdamW is `torch.optim.AdamW`; GaLore is `galore_torch.GaLoreAdamW` "
        "(scale 0.25); APOLLO / APOLLO-Mini are `apollo_torch.APOLLOAdamW` with its "
        "README's settings; the 8-bit AdamW is `bitsandbytes.optim.AdamW8bit` (tensors "
        "under 4096 elements stay 32-bit there).\n\n"
    )
    if payload["unavailable"]:
        md += "Could not run here:\n\n" + "".join(
            f"- {k}: `{v}`\n" for k, v in payload["unavailable"].items()) + "\n"  # fmt: skip
    if payload["errors"]:
        md += "Runs that failed:\n\n" + "".join(
            f"- {what}: `{err}`\n" for what, err in payload["errors"]) + "\n"  # fmt: skip
    for size in [s["name"] for s in scale["sizes"]]:
        rows = [r for r in payload["rows"] if r["size"] == size]
        if not rows:
            continue
        params = next((r["params"] for r in rows if "params" in r), None)
        head = f"## {size}"
        if params:
            head += (f": {params['total'] / 1e6:.2f} M parameters "
                     f"({params['block_matrices'] / 1e6:.2f} M in attention/feed-forward "
                     f"matrices, {params['embedding_and_head'] / 1e6:.2f} M embedding "
                     f"and head), {rows[0].get('tokens', 0):,} training tokens")  # fmt: skip
        md += head + "\n\n"
        md += ("| optimizer | lr | state MiB | state B/param | s/step | step() s "
               "| final valid loss |\n|---|---:|---:|---:|---:|---:|---:|\n")  # fmt: skip
        for r in sorted(rows, key=lambda r: -r.get("state_bytes", 0)):
            if "state_bytes" not in r:
                md += f"| {r['name']} | {r['lr']:g} | | | | | {_fmt_loss(r)} |\n"
                continue
            md += (
                f"| {r['name']} | {r['lr']:g}{'*' if r['lr_at_grid_edge'] else ''} "
                f"| {r['state_bytes'] / 2**20:.3f} | {r['state_bytes_per_param']:.2f} "
                f"| {r['step_seconds']:.3f} | {r['optimizer_step_seconds']:.3f} "
                f"| {_fmt_loss(r)} |\n"
            )
        md += "\n"
    md += "## Claims\n\n" + "".join(
        f"- {c['claim']}: **{c['verdict']}**. {c['detail']}.\n" for c in payload["claims"]
    )  # fmt: skip
    md += "\n## Learning-rate sweeps (seed 0, final validation loss)\n\n"
    md += "| size | optimizer | lr: loss |\n|---|---|---|\n"
    for r in payload["rows"]:
        if not r["sweep"]:
            continue
        cells = ", ".join(
            f"{p['lr']:g}: " + ("failed" if p["error"] else "diverged" if p["diverged"]
                                else f"{p['final_valid_loss']:.3f}")
            for p in r["sweep"]
        )  # fmt: skip
        md += f"| {r['size']} | {r['name']} | {cells} |\n"
    runs = payload["runs"]
    md += (f"\n{runs['ran']} runs trained, {runs['reused']} reused from the cache; "
           f"wall time {payload['wall_seconds'] / 60:.1f} min.\n")  # fmt: skip
    return md


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    sizes = [s["name"] for s in payload["scale"]["sizes"]]
    fig, axes = plt.subplots(2, len(sizes), figsize=(7.5 * len(sizes), 10),
                             squeeze=False)  # fmt: skip
    colors = dict(zip(DISPLAY, plt.get_cmap("tab10").colors, strict=False))
    for col, size in enumerate(sizes):
        rows = [r for r in payload["rows"] if r["size"] == size
                and "state_bytes" in r and math.isfinite(r["mean"])]  # fmt: skip
        ax = axes[0, col]
        for optimizer in DISPLAY:
            group = sorted((r for r in rows if r["optimizer"] == optimizer),
                           key=lambda r: r["state_bytes"])  # fmt: skip
            if not group:
                continue
            xs = [r["state_bytes"] / 2**20 for r in group]
            ys = [r["mean"] for r in group]
            err = [[r["mean"] - r["min"] for r in group],
                   [r["max"] - r["mean"] for r in group]]  # fmt: skip
            flora = optimizer.startswith("Flora")
            ax.errorbar(xs, ys, yerr=err, fmt="o-" if flora else "s--", capsize=3,
                        color=colors[optimizer], label=DISPLAY[optimizer],
                        mfc=colors[optimizer] if flora else "white")  # fmt: skip
            for r, x, y in zip(group, xs, ys, strict=True):
                if r["rank"]:
                    ax.annotate(f"r={r['rank']}", (x, y), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)  # fmt: skip
        ax.set(xscale="log", xlabel="optimizer state (MiB, log)",
               ylabel="final validation loss (nats/token)",
               title=f"{size}: loss against optimizer memory (seed range)")  # fmt: skip
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1, col]
        top, bottom = [], []
        for r in rows:
            tokens, losses = zip(*r["curve"], strict=True)
            flora = r["optimizer"].startswith("Flora")
            ranks = sorted(
                {x["rank"] for x in rows if x["optimizer"] == r["optimizer"]}
            )
            lighter = len(ranks) > 1 and r["rank"] == ranks[0]  # the lower rank
            ax.plot(tokens, losses, "-" if flora else "--", color=colors[r["optimizer"]],
                    label=r["name"], lw=1.2, alpha=0.5 if lighter else 1.0)  # fmt: skip
            top.append(losses[min(2, len(losses) - 1)])
            bottom.append(min(losses))
        if top:
            ax.set_ylim(min(bottom) - 0.05, max(top) + 0.1)
        ax.set(xlabel="training tokens", ylabel="validation loss (curve windows)",
               title=f"{size}: validation curves (seed 0, best lr)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    if payload["quick"]:
        fig.suptitle("--quick smoke run: the numbers mean nothing")
    meta = payload["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    footer = textwrap.fill(
        f"{meta['command']} | {meta['date']} | {meta['machine']['cpu']}, "
        f"{meta['machine']['cores']} cores, load {meta['machine']['load_average_1m']} "
        f"at the start | {versions}", width=150 * len(sizes))  # fmt: skip
    fig.text(0.01, 0.003, footer, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(value):
    """``value`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write(out: Path, *, scale: dict, corpus: dict, sweeps: dict, seeds: dict,
          unavailable: dict, errors: list, wall_seconds: float, runs: dict,
          quick: bool) -> dict:  # fmt: skip
    rows = rows_of(sweeps, seeds)
    sizes = [s["name"] for s in scale["sizes"]]
    payload = {
        "meta": provenance(*PACKAGES), "quick": quick, "scale": scale,
        "corpus": corpus, "rows": rows, "claims": claims(rows, sizes),
        "unavailable": unavailable, "errors": errors, "wall_seconds": wall_seconds,
        "runs": runs,
    }  # fmt: skip
    md = markdown(payload)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite(payload), indent=1, default=str, allow_nan=False)
    (out / f"{STEM}.json").write_text(text + "\n")
    (out / f"{STEM}.md").write_text(md)
    plot(payload, out / f"{STEM}.png")
    return dict(payload, markdown=md)
