"""Smoke test of the LM benchmark's pieces (benchmarks/lm), in seconds.

The benchmark itself stays out of CI; this checks that its parts work: the corpus and
tokenizer cache (on a tiny corpus made here), the model, one step of every compared
optimizer that is installed, a short training run through the cached runner, and the
report's tables and claims.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
LM = Path(__file__).resolve().parents[2] / "benchmarks" / "lm"
for path in (LM.parent, LM):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import _optimizers  # noqa: E402
import llama  # noqa: E402
import lm_harness  # noqa: E402
import lm_report  # noqa: E402
import stdlib_corpus  # noqa: E402

VOCAB = 300
METHODS = ("AdamW(foreach)", "AdamW8bit", "Adafactor+momentum", "GaLoreAdamW", "APOLLO",
           "APOLLO-Mini", "FloraAdam", "FloraAdam(factored)", "FloraAdafactor")  # fmt: skip
SOURCES = ("json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py",
           "textwrap.py", "bisect.py", "colorsys.py", "keyword.py")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A few stdlib files under names chosen so both splits get some."""
    root = tmp_path_factory.mktemp("corpus")
    texts = [(stdlib_corpus.stdlib_root() / s).read_text("utf-8") for s in SOURCES]
    valid = train = 0
    for i in range(10_000):
        name = f"pkg/mod{i}.py"
        is_valid = stdlib_corpus.is_validation(name)
        if (is_valid and valid >= 2) or (not is_valid and train >= len(texts)):
            continue
        text = texts[(valid + train) % len(texts)]
        (root / "pkg").mkdir(exist_ok=True)
        (root / name).write_text(f"# {name}\n{text}", encoding="utf-8")
        valid, train = valid + is_valid, train + (not is_valid)
        if valid >= 2 and train >= len(texts):
            break
    (root / "site-packages").mkdir()
    (root / "site-packages" / "x.py").write_text("excluded = True\n")
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8: skipped
    return root


@pytest.fixture(scope="module")
def tiny_corpus(tiny_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return stdlib_corpus.load(VOCAB, cache=cache, root=tiny_root, verbose=False), cache


def test_corpus_split_by_file_and_tokenizer_round_trip(tiny_root, tiny_corpus):
    corpus, _ = tiny_corpus
    meta = corpus.meta
    assert meta["files"] == {"train": 8, "valid": 2, "skipped_not_utf8": 1}
    assert meta["vocab_size"] <= VOCAB and corpus.train.dtype.name == "uint16"
    files = stdlib_corpus.read_files(tiny_root)
    train_rels, valid_rels = files.split()
    assert not set(train_rels) & set(valid_rels)
    assert all(not r.startswith("site-packages") for r in train_rels + valid_rels)
    # Byte-level BPE is lossless: the first validation file decodes back exactly.
    ids = corpus.valid.tolist()
    first = ids[: ids.index(corpus.eos)]
    assert corpus.tokenizer().decode(first) == files.texts[valid_rels[0]]
    assert corpus.train.size == meta["tokens"]["train"]


def test_corpus_cache_is_reused_and_keyed(tiny_root, tiny_corpus, monkeypatch):
    corpus, cache = tiny_corpus

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(stdlib_corpus, "_train_tokenizer", refuse)
    again = stdlib_corpus.load(VOCAB, cache=cache, root=tiny_root, verbose=False)
    assert again.meta == corpus.meta and (again.train == corpus.train).all()
    with pytest.raises(AssertionError, match="trained again"):  # another vocab: new key
        stdlib_corpus.load(VOCAB + 1, cache=cache, root=tiny_root, verbose=False)


def test_batches_are_deterministic_windows(tiny_corpus):
    corpus, _ = tiny_corpus
    x, y = stdlib_corpus.train_batch(corpus.train, step=3, seed=1, batch=4, context=16)
    x2, _ = stdlib_corpus.train_batch(corpus.train, step=3, seed=1, batch=4, context=16)
    assert x.shape == y.shape == (4, 16) and (x == x2).all()
    assert (x[:, 1:] == y[:, :-1]).all()
    windows = stdlib_corpus.valid_windows(corpus.valid, 5, 16)
    assert windows.shape == (5, 17)


def tiny_model(vocab: int = VOCAB) -> llama.Llama:
    torch.manual_seed(0)
    return llama.Llama(
        llama.Config(vocab=vocab, width=32, depth=2, heads=2, context=16)
    )


def test_model_shapes_gradients_and_causality():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 12))
    logits = model.logits(tokens)
    assert logits.shape == (2, 12, VOCAB)
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % VOCAB  # the future must not leak back
    assert torch.allclose(model.logits(changed)[:, :8], logits[:, :8], atol=1e-5)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.ndim == 0 and abs(loss.item() - math.log(VOCAB)) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(llama.block_matrices(model)) == 7 * 2
    counts = llama.count(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["other"] == 2 * 2 * 32 + 32  # the RMSNorm gains
    assert llama.Config(width=128).hidden == 352


def config(optimizer: str, rank: int | None, corpus_key: str = "x", **kw) -> dict:
    model = llama.Config(vocab=VOCAB, width=32, depth=2, heads=2, context=16)
    return dict(
        size="t", model=model.as_dict(), vocab=VOCAB, corpus=corpus_key, steps=6,
        batch=2, warmup=2, min_lr_ratio=0.1, clip=1.0, kappa=3, weight_decay=0.0,
        eval_every=3, eval_windows=4, final_windows=6, optimizer=optimizer,
        rank=rank, lr=3e-3, seed=0,
    ) | kw  # fmt: skip


@pytest.mark.parametrize("name", METHODS)
def test_one_step_of_each_installed_optimizer(name):
    reason = _optimizers.missing(name)
    if reason:
        pytest.skip(reason)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = lm_harness.build(config(name, 8), model)
    tokens = torch.randint(0, VOCAB, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    assert _optimizers.state_bytes(optimizer) > 0
    moved = [
        not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)
    ]
    assert all(moved)


def test_run_benchmark_methods_match_the_smoke_list():
    import run

    assert set(run.METHODS) == set(METHODS)
    assert set(run.METHODS) <= set(_optimizers.NAMES)


def test_schedule_warms_up_then_decays():
    f = [lm_harness.lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert f[-1] > 0.1


def test_training_run_cache_and_report(tiny_corpus, tmp_path, monkeypatch):
    corpus, cache = tiny_corpus
    key = corpus.meta["key"][:16]
    monkeypatch.setattr(lm_harness.stdlib_corpus, "load", lambda *a, **k: corpus)
    monkeypatch.setattr(lm_harness, "_worker_init", lambda: None)  # keep this process
    runner = lm_harness.Runner(tmp_path, workers=1)
    cfgs = [config(n, r, key, seed=s) for n, r in (("AdamW(foreach)", None),
            ("FloraAdam", 8)) for s in (0, 1)]  # fmt: skip
    results = runner(cfgs)
    assert runner.ran == 4 and all("error" not in r for r in results)
    for r in results:
        assert [c[0] for c in r["curve"]] == [0, 3, 6]
        assert len(r["train_loss"]) == 6 and math.isfinite(r["final_valid_loss"])
        assert r["state_bytes"] > 0 and r["step_seconds"] > 0
    flora = results[2]
    assert flora["state_bytes"] < results[0]["state_bytes"]
    again = lm_harness.Runner(tmp_path, workers=1)(cfgs)  # all from the disk cache
    assert [r["final_valid_loss"] for r in again] == [
        r["final_valid_loss"] for r in results]  # fmt: skip
    broken = lm_harness.Runner(tmp_path, workers=1)([config("AdamW(foreach)", None)])
    assert "corpus" in broken[0]["error"]  # errors are returned, not cached
    sweeps = {"t|AdamW|None": results[:1], "t|FloraAdam|8": results[2:3]}
    seeds = {"t|AdamW|None": results[:2], "t|FloraAdam|8": results[2:]}
    rows = lm_report.rows_of(sweeps, seeds)
    assert rows[1]["name"] == "FloraAdam r=8" and rows[1]["seeds"] == [0, 1]
    claims = lm_report.claims(rows, ["t"])
    assert len(claims) == 5
    assert claims[1]["verdict"] == "not measured"  # no GaLore run
    assert all(c["verdict"] for c in claims)
