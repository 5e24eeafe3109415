"""The core and every adapter against the independent reference (``reference.py``).

The committed vectors are the core's own output, so they catch drift between
frameworks but not a mistake in the algorithm. ``conformance/reference.py`` is a
second implementation written from the papers and the spec, importing nothing from
``flora_core``. Here:

- the reference's RNG meets the spec's known answers, and its projections and
  policy equal the core's bit for bit (the only place the two are compared below
  the level of whole trajectories);
- each problem's tolerance is at least four times what float32 rounding alone does
  to it (NOTE [reference tolerances]);
- each option a problem sets changes its trajectory by more than the tolerance, so
  an implementation that ignored it would fail;
- (a) the numpy core (Python and traced counts) follows the reference on every
  problem (the adapters run the core on the other backends);
- (b) every registered adapter follows the reference on every problem it supports.

NOTE [reference tolerances]: a problem passes when, for every parameter after every
update, ``|got - want| <= atol + rtol·|want| + peak_rtol·max|want|``. The defaults
``rtol = 1e-4, atol = 1e-5, peak_rtol = 0`` are the suite's: parameters are O(1) and
move by O(lr) = 0.02 per update, and the linear loss's gradients do not depend on the
parameters, so rounding errors add up over the updates instead of growing. What
float32 rounding alone does to a problem is measured by running the reference in
float64 (same float32 projections): ``test_tolerance_covers_float32_rounding``
requires the tolerance to be at least four times that distance (two correct float32
implementations may each be that far from exact, in opposite directions, with a
factor 2 to spare). Measured, max over parameters and updates:

==========================================  ==========================  ==========
problem                                     float32 vs float64          core vs
                                                                        reference
==========================================  ==========================  ==========
bounded (``PROBLEMS``) but adam_rademacher  <= 5.4e-7                   <= 2.4e-7
adam_rademacher (bounded)                   1.3e-5 at p = 0.84          1.2e-7
adam_realistic                              1.0e-5 at p = -0.04         1.2e-7
adam_realistic_eps_before_bias_correction   7.5e-6                      2.4e-7
the other realistic ones but the next       <= 3.4e-6                   <= 7.2e-7
adam_realistic_gradient_moment              5.4 at max|p| = 4e5         1.8e-2
==========================================  ==========================  ==========

With the projected second moment (FloraAdam's default) realistic gradients stay well
conditioned despite their zeros and near-zeros: within a resample interval ``m`` and
``v`` are EMAs of the same ``ĝ`` (|m / sqrt(v)| = O(1)), and at a resample ``v`` is
levelled. Adafactor normalises element-wise and clips globally. The exceptions are
entries where ``|ĝ|`` lands near Adam's eps = 1e-8: the first step, ``lr·ĝ/(|ĝ| +
eps)``, changes by ``lr/(4 eps)`` per unit of ``ĝ`` there, and ``ĝ`` carries a
rounding error of about 1e-7 of its row's size (the r-term sums of compress and
decompress). In the bounded adam_rademacher one entry of ``ĝ`` nearly cancels
(a rademacher ``AᵀA`` holds multiples of 1/r): the default tolerance covers it 6
times over. In adam_realistic, whose second parameter has gradients of size 1e-3,
a few entries land there and move their parameter by 1e-5 whatever its size: that
problem takes ``atol = 5e-5``, and so does its copy with Keras' epsilon
(``eps_before_bias_correction``).

``second_moment="gradient"`` is ill-conditioned by design (NOTE [projected second
moment] in ``flora_core/rules.py``): ``v`` comes from the raw ``g`` and ``m`` from
``ĝ``, which mixes the compressed axis, so where ``g`` is zero (dead rows, exact
zeros) and ``ĝ`` is not, the step is ``lr·m̂/eps``: the rounding of ``m̂`` is
multiplied by ``lr/eps = 2e6``, and such parameters reach 4e5 in ten updates.
Entry-wise relative error says nothing there (float32 vs float64 needs an rtol of
3e-4 at entries where tiny steps cancel), but relative to the parameter's largest
entry float32 is within 1.7e-7 of float64, so that problem adds ``peak_rtol =
1e-5``: an error of 1e-5 of the parameter's scale fails.

Adapters are compared with the tolerance of their registry entry or the problem's,
whichever is larger. Measured on CPU (error / tolerance, worst entry of a problem):
float32 against float64 uses at most 0.18 of a problem's tolerance (adam_realistic),
the numpy core against the reference 0.03, torch 0.15, optax and Keras-on-JAX 0.26
(the adam_rademacher entry above, 2.4e-5 from the reference), Keras on TensorFlow
and torch as torch.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from conformance import reference
from conformance.problems import PROBLEMS, REALISTIC, Problem, oracle
from conformance.registry import ADAPTERS, run_once
from conformance.test_adapters import LOADED

EVERY: dict[str, Problem] = {**PROBLEMS, **REALISTIC}
SPEC = Path(__file__).resolve().parents[1] / "docs" / "spec.md"
Trajectory = list[list[np.ndarray]]


@functools.cache
def expected(name: str) -> Trajectory:
    return reference.run(EVERY[name])


def expected_of(problem: Problem) -> Trajectory:
    """``expected`` of a problem that may differ from its registered one."""
    if problem == EVERY[problem.name]:
        return expected(problem.name)
    return reference.run(problem)


def assert_follows(
    got: Trajectory,
    want: Trajectory,
    problem: Problem,
    label: str,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    share: float = 1.0,
) -> None:
    """``got`` is within the problem's tolerance (NOTE [reference tolerances]) of
    ``want``; ``rtol``/``atol`` raise it (an adapter's own), ``share`` scales it."""
    rtol, atol = max(rtol, problem.rtol), max(atol, problem.atol)
    assert len(got) == len(want), f"{label}: {len(got)} updates, expected {len(want)}"
    for t, (params_got, params_want) in enumerate(zip(got, want, strict=True)):
        for i, (g, w) in enumerate(zip(params_got, params_want, strict=True)):
            g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
            assert g.shape == w.shape, f"{label}: update {t}, parameter {i}: shape"
            bound = share * (
                atol + rtol * np.abs(w) + problem.peak_rtol * np.abs(w).max()
            )
            error = np.abs(g - w)
            bad = ~(error <= bound)  # NaN fails too
            if bad.any():
                k = np.unravel_index(
                    np.argmax(np.where(bad, error / bound, 0)), w.shape
                )
                raise AssertionError(
                    f"{label}: update {t}, parameter {i} (shape {w.shape}): "
                    f"{int(bad.sum())} of {w.size} entries off; worst at {k}: got "
                    f"{g[k]!r}, want {w[k]!r}, error {error[k]:.3g} > bound {bound[k]:.3g}"
                )


# --------------------------------------------------------------------------------------
# The reference's own RNG against the spec, its projections and policy against the core
# --------------------------------------------------------------------------------------


def test_reference_imports_nothing_of_the_library():
    """Its independence, checked: only the standard library and numpy."""
    tree = ast.parse(Path(reference.__file__).read_text(encoding="utf-8"))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}  # fmt: skip
    modules |= {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)}  # fmt: skip
    roots = {name.split(".")[0] for name in modules}
    assert roots <= {"__future__", "dataclasses", "functools", "math", "numpy",
                     "statistics"}, roots  # fmt: skip


def spec_block(name: str) -> list[str]:
    """The non-empty lines of the fenced block after ``<!-- spec:name -->``."""
    after = SPEC.read_text(encoding="utf-8").split(f"<!-- spec:{name} -->", 1)[1]
    body = after.lstrip("\n").split("\n", 1)[1].split("\n```", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def hex_words(text: str) -> list[int]:
    return [int(w, 16) for w in text.split()]


@pytest.mark.parametrize("line", spec_block("kat"))
def test_reference_philox_meets_random123(line):
    counter, rest = line.split("|")
    key, out = rest.split("->")
    got = reference.philox([[x] for x in hex_words(counter)], tuple(hex_words(key)))
    assert [int(w[0]) for w in got] == hex_words(out)


def test_reference_layout_meets_spec_rows_and_block():
    rows = [hex_words(line) for line in spec_block("golden-rows")]
    assert reference.words(0, 0, 0, 2, 8).tolist() == rows
    header, *lines = spec_block("block")
    fields = dict(re.findall(r"(\w+)=(\w+)", header))
    seed, step, stream = (int(fields[k], 0) for k in ("seed", "step", "stream"))
    r0, c0 = int(fields["row0"]), int(fields["col0"])
    block = [hex_words(line) for line in lines]
    full = reference.words(seed, step, stream, r0 + len(block), c0 + len(block[0]))
    assert full[r0:, c0:].tolist() == block


def test_reference_floats_meet_spec():
    table = reference.gaussian_table()
    lines = spec_block("gaussian-table")
    digest = next(line.split()[-1] for line in lines if line.startswith("SHA-256"))
    assert hashlib.sha256(table.astype("<f4").tobytes()).hexdigest() == digest
    assert np.all(table[::-1] == -table)
    floats = {line.split()[0]: hex_words(" ".join(line.split()[1:])) for line in
              spec_block("floats")}  # fmt: skip
    for name in ("gaussian", "rademacher"):
        got = reference.draw(0, 0, 0, 1, 4, name)[0]
        assert got.view(np.uint32).tolist() == floats[name], name


PROJECTIONS = [
    # shape, param_index, rank, seed, distribution, axis, resample index, role
    ((48, 40), 0, 6, 1234, "gaussian", None, 0, 0),
    ((24, 56), 1, 6, 1234, "gaussian", None, 3, 1),
    ((20, 3, 24), 4, 5, 2**64 - 1, "rademacher", None, 2**32 - 1, 0),
    ((32, 32), 5, 7, 0x0123456789ABCDEF, "gaussian", 0, 9, 1),
    ((300, 130), 2**30 - 1, 16, 7, "rademacher", 1, 1, 0),
]


@pytest.mark.parametrize("case", PROJECTIONS, ids=range(len(PROJECTIONS)))
def test_reference_projection_is_the_cores_bit_for_bit(case):
    from flora_core import policy, projection

    shape, index, rank, seed, distribution, axis, step, role = case
    ours = reference.parameter(
        shape, index, rank=rank, seed=seed, distribution=distribution, axis=axis
    )
    plan = policy.plan(
        shape, index, rank=rank, seed=seed, distribution=distribution, axis=axis
    )
    assert (ours.rank, ours.axis) == (plan.rank, plan.axis)
    a = ours.projection(step, role)
    want = projection.projection(plan, step, role, xp=np)
    assert a.dtype == np.float32 and a.shape == want.shape
    np.testing.assert_array_equal(a.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_reference_policy_is_the_cores(axis):
    from flora_core import policy

    shapes = [(7,), (48, 40), (40, 48), (32, 32), (5, 24), (24, 5), (6, 6), (7, 7),
              (16, 4, 3, 3), (2, 3, 4), (20, 3, 24), (8, 1)]  # fmt: skip
    for shape in shapes:
        for rank in (1, 5, 6, 7, 30):
            try:
                plan = policy.plan(shape, 0, rank=rank, axis=axis)
            except ValueError:  # a forced axis not longer than the rank
                continue
            ours = reference.parameter(
                shape, 0, rank=rank, seed=0, distribution="gaussian", axis=axis
            )
            assert (ours.rank, ours.axis) == (plan.rank, plan.axis), (shape, rank)


# --------------------------------------------------------------------------------------
# The problems: tolerances above float32's own rounding, options that matter
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EVERY))
def test_tolerance_covers_float32_rounding(name):
    problem = EVERY[name]
    exact = reference.run(problem, real=np.float64)
    assert_follows(expected(name), exact, problem, f"float32/{name}", share=0.25)


# Each option a problem sets, changed: the reference's trajectory must move by more
# than the tolerance, or an adapter that ignored the option would still pass.
VARIANTS = [
    ("adam_realistic", {"transfer": "paper"}),
    ("adam_realistic", {"transfer": "norm"}),
    ("adam_realistic", {"kappa": 1000}),  # no resample
    ("adam_realistic", {"second_moment": "gradient"}),
    ("adam_realistic", {"weight_decay": 0.0}),
    (
        "adam_realistic_eps_before_bias_correction",
        {"eps_before_bias_correction": False},
    ),
    ("adam_realistic_factored_axis0", {"axis": None}),
    ("adam_realistic_factored_axis0", {"transfer": "least_squares"}),
    ("adam_realistic_factored_axis0", {"factored": False}),
    ("adam_realistic_gradient_moment", {"second_moment": "projected"}),
    ("adam_realistic_accumulate_rademacher", {"transfer": "paper"}),
    ("adam_realistic_accumulate_rademacher", {"projection": "gaussian"}),
    ("adam_realistic_accumulate_rademacher", {"kappa": 1000}),
    ("adafactor_realistic", {"clip_after_momentum": False}),
    ("adafactor_realistic", {"transfer": "paper"}),
    ("adafactor_realistic", {"factored": False}),
    ("adafactor_realistic", {"weight_decay": 0.0}),
    ("adafactor_realistic_optax_order_axis1", {"axis": None}),
    ("adafactor_realistic_optax_order_axis1", {"transfer": "least_squares"}),
    ("adafactor_realistic_optax_order_axis1", {"clip_after_momentum": True}),
    ("adafactor_realistic_accumulate_no_momentum", {"momentum": 0.9}),
    ("adafactor_realistic_accumulate_no_momentum", {"projection": "identity"}),
]


@pytest.mark.parametrize(
    "name,change", VARIANTS, ids=[f"{n}-{next(iter(c))}" for n, c in VARIANTS]
)
def test_problem_options_matter(name, change):
    problem = EVERY[name]
    with pytest.raises(AssertionError):
        assert_follows(
            reference.run(dataclasses.replace(problem, **change)),
            expected(name),
            problem,
            f"{name} with {change}",
        )


# --------------------------------------------------------------------------------------
# (a) the core, (b) every adapter
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EVERY))
def test_numpy_core_follows_reference(name):
    problem = EVERY[name]
    for traced in (False, True):
        got = oracle(problem, traced_count=traced)
        assert_follows(got, expected(name), problem, f"core/{name} traced={traced}")


@pytest.mark.parametrize("adapter", LOADED)
@pytest.mark.parametrize("name", sorted(EVERY))
def test_adapter_follows_reference(adapter, name):
    entry, problem = ADAPTERS[adapter], EVERY[name]
    if not entry.supports(problem):
        pytest.skip(f"{adapter} does not support {name}")
    assert_follows(
        run_once(adapter, problem), expected_of(entry.solves(problem)), problem,
        f"{adapter}/{name}",
        rtol=entry.rtol, atol=entry.atol,
    )  # fmt: skip
