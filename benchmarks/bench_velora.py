"""VeLoRA benchmark: memory, speed and quality of fine-tuning a small GPT on CPU.

A GPT-style transformer (LLaMA layer names) is pre-trained briefly on a procedurally
generated language (a sparse second-order Markov chain), then fine-tuned on a shifted
language (half of its contexts rewired) in four ways from the same checkpoint, with
the same batches: plain training, VeLoRA on the value and MLP down projections (the
paper's layers, §4 and Table 6) with M = 32 (the paper's M for full fine-tuning of
ViT-B, Table 9, and for LLaMA-7B, §4.4) and M = 128 (its M for the d_model = 256
LLaMA-60M, §4.5), and activation checkpointing of every block.

Memory: the bytes autograd holds for backward after one forward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters
excluded; for checkpointing, the stored block inputs are added, since the checkpoint
keeps its own hooks), and the peak of live tensors during one training step from
the torch profiler's memory timeline. Fine-tuning runs the methods in lockstep, one
step each in turn, so machine load affects their step times alike.

Run:  PYTHONPATH=.:adapters python benchmarks/bench_velora.py
Writes benchmarks/results/velora.{json,md,png}.

References:
    Miles et al., "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token
    Projections", NeurIPS 2024 (§4: value and down projections; M per Tables 5, 9).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flora_torch.velora import apply_velora
from torch import nn
from torch.utils.checkpoint import checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = dict(vocab=32, d_model=256, heads=4, layers=2, seq=128, batch=8, branching=3)
METHODS = {  # name -> (VeLoRA group size M or None, activation checkpointing)
    "plain": (None, False),
    "velora_M32": (32, False),
    "velora_M128": (128, False),
    "checkpointing": (None, True),
}


class MarkovLanguage:
    """Tokens from a sparse second-order Markov chain; ``shifted`` rewires contexts."""

    def __init__(self, vocab: int, branching: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.next = rng.integers(0, vocab, (vocab, vocab, branching))
        self.probs = rng.dirichlet(np.full(branching, 0.5), (vocab, vocab))

    def shifted(self, fraction: float, seed: int) -> MarkovLanguage:
        rng = np.random.default_rng(seed)
        other = MarkovLanguage(self.vocab, self.next.shape[-1], seed)
        rewired = rng.random((self.vocab, self.vocab)) < fraction
        other.next = np.where(rewired[..., None], other.next, self.next)
        other.probs = np.where(rewired[..., None], other.probs, self.probs)
        return other

    def sample(self, rng: np.random.Generator, batch: int, length: int) -> torch.Tensor:
        seq = np.empty((batch, length), np.int64)
        seq[:, :2] = rng.integers(0, self.vocab, (batch, 2))
        cum = np.cumsum(self.probs, axis=-1)
        for t in range(2, length):
            a, b = seq[:, t - 2], seq[:, t - 1]
            pick = (rng.random(batch)[:, None] > cum[a, b]).sum(axis=-1)
            seq[:, t] = self.next[a, b, np.minimum(pick, self.next.shape[-1] - 1)]
        return torch.from_numpy(seq)

    def entropy(self, tokens: torch.Tensor) -> float:
        """The best achievable loss (nats/token) on ``tokens``."""
        seq = tokens.numpy()
        p = self.probs[seq[:, :-2], seq[:, 1:-1]]
        return float(-(p * np.log(np.maximum(p, 1e-30))).sum(-1).mean())


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj = (
            nn.Linear(d, d, bias=False),
            nn.Linear(d, d, bias=False),
        )
        self.v_proj, self.o_proj = (
            nn.Linear(d, d, bias=False),
            nn.Linear(d, d, bias=False),
        )
        self.up_proj, self.down_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        b, n, d = h.shape
        q, k, v = (
            p(h).view(b, n, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.down_proj(F.gelu(self.up_proj(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, seq: int,
                 **_: int) -> None:  # fmt: skip
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(seq, d_model)
        self.layers = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)
        self.checkpointing = False
        self.held: dict[int, int] = {}  # block inputs kept by checkpoints

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens[:, :-1]) + self.pos.weight[: tokens.shape[1] - 1]
        for block in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                self.held[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def make_model(method: str, state: dict) -> GPT:
    model = GPT(**CONFIG)
    model.load_state_dict(state)
    group_size, model.checkpointing = METHODS[method]
    if group_size:
        apply_velora(model, group_size=group_size)  # v_proj and down_proj
    return model


def held_for_backward(model: GPT, tokens: torch.Tensor) -> dict[str, int]:
    """Bytes autograd keeps after one forward (unique storages, no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    unique: dict[int, int] = {}
    targets = {"v_proj": 0, "down_proj": 0}
    current: list[str] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            unique[s.data_ptr()] = s.nbytes()
            if current:
                targets[current[-1]] += s.nbytes()
        return t

    def leave(*_: object) -> None:
        current.pop()

    hooks = []
    for name, module in model.named_modules():
        kind = name.rpartition(".")[2]
        if kind in targets:
            enter = lambda *_, k=kind: current.append(k)  # noqa: E731
            hooks.append(module.register_forward_pre_hook(enter))
            hooks.append(module.register_forward_hook(leave))
    model.held = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(tokens)
    for hook in hooks:
        hook.remove()
    total = sum(unique.values()) + sum(model.held.values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {"total": total, **{f"{k}_inputs": v for k, v in targets.items()}}


def evaluate(model: GPT, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        loss = statistics.fmean(float(model.loss(b)) for b in batches)
    model.train()
    return loss


def peak_step_memory(model: GPT, tokens: torch.Tensor) -> float | None:
    """Peak bytes of live tensors in one training step (forward + backward).

    Read from the torch profiler's memory timeline (all CPU tensor allocations,
    temporaries such as VeLoRA's rebuilt x̂ included); None where unavailable.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with profile(activities=activities, profile_memory=True,
                         record_shapes=True, with_stack=True) as prof:  # fmt: skip
                model.loss(tokens).backward()
            path = os.path.join(tmp, "timeline.json")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated, works
                prof.export_memory_timeline(path, device="cpu")
            _, sizes = json.loads(Path(path).read_text())
    except Exception as err:  # noqa: BLE001 - a private-ish profiler API
        log(f"no memory timeline: {err!r}")
        return None
    finally:
        model.zero_grad(set_to_none=True)
    return float(max(sum(row) for row in sizes))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(pretrain_steps: int, finetune_steps: int, eval_every: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    source = MarkovLanguage(CONFIG["vocab"], CONFIG["branching"], seed=0)
    target = source.shifted(0.5, seed=1)
    seq, batch = CONFIG["seq"] + 1, CONFIG["batch"]
    held_out = [
        target.sample(np.random.default_rng(99 + i), batch, seq) for i in range(6)
    ]

    model = GPT(**CONFIG)  # (1) pre-train on the source language
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(pretrain_steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        opt.zero_grad(set_to_none=True)
        model.loss(source.sample(rng, batch, seq)).backward()
        opt.step()
    source_eval = [
        source.sample(np.random.default_rng(7 + i), batch, seq) for i in range(6)
    ]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    log(f"pre-trained {pretrain_steps} steps in {time.perf_counter() - start:.0f} s")
    pretrain = {"steps": pretrain_steps, "source_loss": evaluate(model, source_eval),
                "target_loss": evaluate(model, held_out),
                "seconds": time.perf_counter() - start}  # fmt: skip

    # (2) fine-tune on the shifted language, the methods in lockstep.
    models = {m: make_model(m, state) for m in METHODS}
    opts = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-3, weight_decay=0.0)
            for m in METHODS}  # fmt: skip
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    curves: dict[str, list[tuple[int, float]]] = {m: [] for m in METHODS}
    for step in range(finetune_steps):
        tokens = target.sample(rng, batch, seq)
        for m in METHODS:
            t0 = time.perf_counter()
            opts[m].zero_grad(set_to_none=True)
            models[m].loss(tokens).backward()
            opts[m].step()
            times[m].append(time.perf_counter() - t0)
            if (step + 1) % eval_every == 0 or step == 0:
                curves[m].append((step + 1, evaluate(models[m], held_out)))

        if (step + 1) % eval_every == 0:
            log(f"fine-tuned {step + 1} steps: {[c[-1][1] for c in curves.values()]}")
    probe = held_out[0]
    results = {}
    for m in METHODS:
        group_size, ckpt = METHODS[m]
        results[m] = {
            "group_size": group_size,
            "checkpointing": ckpt,
            "held_for_backward_bytes": held_for_backward(models[m], probe),
            "peak_step_bytes": peak_step_memory(models[m], probe),
            "step_seconds_median": statistics.median(times[m][2:]),
            "final_loss": curves[m][-1][1],
            "curve": curves[m],
        }
    return {
        "config": CONFIG,
        "pretrain": pretrain,
        "finetune_steps": finetune_steps,
        "optimal_target_loss": statistics.fmean(target.entropy(b) for b in held_out),
        "methods": results,
        "seconds": time.perf_counter() - start,
    }


def environment() -> dict:
    import array_api_compat

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": models[0] if models else platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "array_api_compat": array_api_compat.__version__,
        "date": now,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def verdict(data: dict, tolerance: float = 0.01) -> dict:
    """Did VeLoRA hold less memory than plain training with no worse final loss?"""
    plain = data["methods"]["plain"]
    out = {}
    for name, row in data["methods"].items():
        if not row["group_size"]:
            continue
        held = row["held_for_backward_bytes"]["total"]
        ratio = held / plain["held_for_backward_bytes"]["total"]
        gap = (row["final_loss"] - plain["final_loss"]) / plain["final_loss"]
        gain = data["pretrain"]["target_loss"] - plain["final_loss"]
        share = (data["pretrain"]["target_loss"] - row["final_loss"]) / gain
        out[name] = {
            "memory_ratio_vs_plain": ratio,
            "relative_loss_gap_vs_plain": gap,
            "share_of_plain_improvement": share,
            "less_memory": ratio < 1.0,
            "no_quality_loss": gap <= tolerance,
            "tolerance": tolerance,
        }
    return out


def write_report(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data["verdict"] = verdict(data)
    (out / "velora.json").write_text(json.dumps(data, indent=2) + "\n")
    mib = 2.0**20
    env, pre = data["environment"], data["pretrain"]
    lines = [
        "# VeLoRA benchmark: fine-tuning a small GPT on CPU",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {env['nproc']} CPUs ({env['cpu']}), shared (load average "
        f"{env['load_average_at_end']} at the end); {env['date']}  ",
        f"Versions: Python {env['python']}, torch {env['torch']}, numpy "
        f"{env['numpy']}, array-api-compat {env['array_api_compat']}  ",
        f"Model: {data['config']}; whole run {data['seconds']:.0f} s",
        "",
        f"Pre-training: {pre['steps']} steps on the source language (loss "
        f"{pre['source_loss']:.3f}); its loss on the shifted language is "
        f"{pre['target_loss']:.3f} (best achievable {data['optimal_target_loss']:.3f}). "
        f"Fine-tuning: {data['finetune_steps']} AdamW steps (lr 1e-3, as in the "
        "paper), same batches for every method; loss on 6 held-out batches.",
        "",
        "| method | held for backward (MiB) | v_proj inputs | down_proj inputs "
        "| peak in a step (MiB) | step (s, median) | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in data["methods"].items():
        held = row["held_for_backward_bytes"]
        lines.append(
            f"| {name} | {held['total'] / mib:.2f} | {held['v_proj_inputs'] / mib:.3f} "
            f"| {held['down_proj_inputs'] / mib:.3f} | {_mib(row['peak_step_bytes'])} "
            f"| {row['step_seconds_median']:.3f} | {row['final_loss']:.4f} |"
        )
    lines += ["", "## Verdict", ""]
    for name, v in data["verdict"].items():
        held = "held" if v["less_memory"] and v["no_quality_loss"] else "did not hold"
        lines.append(
            f"- **{name}**: the paper's claim (less memory, no loss of quality) "
            f"**{held}** here: it held {v['memory_ratio_vs_plain']:.1%} of plain "
            f"training's backward memory, and its final loss is "
            f"{v['relative_loss_gap_vs_plain']:+.2%} from plain's (tolerance "
            f"{v['tolerance']:.0%}), {v['share_of_plain_improvement']:.0%} of plain's "
            "fine-tuning improvement."
        )
    layers, steps = data["config"]["layers"], data["finetune_steps"]
    lines += ["", CAVEATS.format(layers=layers, steps=steps), "", NOTES]
    (out / "velora.md").write_text("\n".join(lines) + "\n")
    plot(data, out / "velora.png")


CAVEATS = """Context: one seed, a {layers}-layer model, {steps} steps on a strongly shifted
synthetic language, on a shared CPU. Every method sees the same batches from the same
checkpoint; checkpointing retraces plain training's losses exactly (a control), so
the VeLoRA gap is the effect of its compressed weight gradients, not of noise in the
data order. The paper's setting differs (fine-tuning large pre-trained models for a
few epochs), where it reports no loss of quality. VeLoRA's steps here are slower than
plain ones: the projection in forward and the rebuild of x̂ in backward are extra
work that CPU matmuls do not hide. Step times are medians under machine load shared
with other jobs (run in lockstep, so the load hits every method alike)."""

NOTES = """## How memory was measured

*Held for backward*: after one training forward on a held-out batch, the bytes of
every tensor autograd saved (`torch.autograd.graph.saved_tensors_hooks`), each storage
counted once and parameters excluded; for checkpointing, the block inputs the
checkpoints keep are added (their own hooks hide the recomputed tensors). The
*v_proj / down_proj inputs* columns are the bytes saved inside those layers (the
activation VeLoRA compresses; M× smaller with VeLoRA). *Peak in a step* is the
largest total of live tensors during one forward + backward, from the torch
profiler's memory timeline (`export_memory_timeline`): it includes the weights and
their gradients (the same for every method) and transients such as VeLoRA's
rebuilt x̂ and the recomputation of checkpointing.

Note: v_proj's input is the LayerNorm output that q_proj and k_proj also keep, so
compressing v_proj alone frees nothing in a separate-q/k/v model; the saving comes
from down_proj, whose input (the GELU output) nobody else keeps."""


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def plot(data: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the bench extra
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, row in data["methods"].items():
        steps, losses = zip(*row["curve"], strict=True)
        style = "--" if row["checkpointing"] else "-"  # it retraces plain exactly
        left.plot(steps, losses, style, label=name, marker="o", markersize=3)
    left.set(xlabel="fine-tuning step", ylabel="held-out loss (nats/token)")
    left.legend()
    names = list(data["methods"])
    held = [
        data["methods"][n]["held_for_backward_bytes"]["total"] / 2**20 for n in names
    ]
    right.bar(names, held)
    right.set(ylabel="held for backward (MiB)")
    right.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=120)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true",
                        help="re-render velora.md/png from an existing velora.json")  # fmt: skip
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((args.out / "velora.json").read_text()), args.out)
        sys.exit(0)
    data = main(args.pretrain_steps, args.finetune_steps, args.eval_every)
    data["environment"] = environment()
    command = "PYTHONPATH=.:adapters python benchmarks/bench_velora.py"
    data["command"] = " ".join([command, *sys.argv[1:]])
    write_report(data, args.out)
