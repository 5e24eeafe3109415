"""One nox session per stack; plain ``nox`` runs what CI runs.

Each session installs one stack and runs the conformance suite with
``FLORA_BACKEND`` set to it, plus the tests of the packages that stack serves.
Keras runs once per backend, each in its own process (Keras reads
``KERAS_BACKEND`` at import). torch is pinned to the CPU build 2.13.0, which this
project's machines carry locally; any other version pulls CUDA wheels.
"""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = [
    "lint",
    "numpy",
    "torch",
    "jax",
    "tensorflow",
    "keras",
    "conformance",
    "gpu_kernels",
]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

TORCH = "torch==2.13.0"
JAX = ("jax", "jaxlib", "optax", "flax")
TENSORFLOW = "tensorflow-cpu"
PYTEST = ("pytest", "-q", "-p", "no:cacheprovider")
HAS_GPU = shutil.which("nvidia-smi") is not None


def _install(session: nox.Session, *packages: str) -> None:
    # torch first and pinned, so nothing later resolves a CUDA build.
    if TORCH in packages:
        session.install(TORCH)
    session.install("-e", ".[test]", *(p for p in packages if p != TORCH))


def _pytest(session: nox.Session, backend: str, *paths: str, **env: str) -> None:
    present = [p for p in paths if os.path.exists(p.split("::")[0])]
    session.run(
        *PYTEST, *present, *session.posargs, env={"FLORA_BACKEND": backend, **env}
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format) on everything, mypy on flora_core."""
    session.install("ruff", "mypy", "numpy", "array-api-compat")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "flora_core")


@nox.session
def numpy(session: nox.Session) -> None:
    """The core on numpy: RNG, projections, rules, state; numpy-only VeLoRA."""
    _install(session)
    _pytest(
        session,
        "numpy",
        "conformance",
        "tests/core",
        "tests/velora/test_velora_core.py",
        FLORA_ADAPTERS="none",
    )


@nox.session
def torch(session: nox.Session) -> None:
    """The core on torch, flora_torch, its VeLoRA, DDP, the HF Trainer client and the
    pieces of the LM benchmark (tokenizer cache, model, one step per optimizer)."""
    hf = ("transformers", "accelerate", "safetensors", "peft", "tokenizers")
    _install(session, TORCH, *hf)
    _pytest(
        session,
        "torch",
        "conformance",
        "tests/torch",
        "tests/bench",
        "tests/velora/test_velora_torch.py",
        "tests/scale/test_fsdp.py",
        "tests/scale/test_tensor_parallel.py",
        FLORA_ADAPTERS="torch",
    )


@nox.session
def jax(session: nox.Session) -> None:
    """The core on JAX (x64 off), flora_optax, its VeLoRA and a flax client."""
    _install(session, *JAX)
    _pytest(
        session,
        "jax",
        "conformance",
        "tests/optax",
        "tests/velora/test_velora_jax.py",
        "tests/scale/test_jax_mesh.py",
        FLORA_ADAPTERS="optax",
    )


@nox.session
def tensorflow(session: nox.Session) -> None:
    """The core on TensorFlow, checked against TF's own Philox raw op."""
    _install(session, TENSORFLOW)
    _pytest(session, "tensorflow", "conformance", FLORA_ADAPTERS="none")


@nox.session
@nox.parametrize("backend", ["tensorflow", "jax", "torch"])
def keras(session: nox.Session, backend: str) -> None:
    """flora_keras on one Keras backend (one process per backend)."""
    stack = {"tensorflow": (TENSORFLOW,), "jax": JAX, "torch": (TORCH,)}[backend]
    _install(session, "keras", *stack)
    _pytest(
        session,
        backend,
        "conformance/test_adapters.py",
        "conformance/test_reference.py",
        "tests/keras",
        "tests/velora/test_velora_keras.py",
        "tests/scale/test_keras_distribution.py",
        KERAS_BACKEND=backend,
        FLORA_ADAPTERS="keras",
    )


@nox.session
def conformance(session: nox.Session) -> None:
    """Every installable stack in one environment: adapters agree pairwise and
    checkpoints move between frameworks."""
    _install(session, TORCH, *JAX, TENSORFLOW, "keras", "safetensors")
    _pytest(session, "numpy", "tests/cross")


@nox.session
def gpu_kernels(session: nox.Session) -> None:
    """The Triton kernels (in Triton's CPU interpreter when there is no GPU) and the
    CuPy kernel source (compiled for the host by g++)."""
    _install(session, TORCH, "triton", "transformers")
    interpret = {} if HAS_GPU else {"TRITON_INTERPRET": "1"}
    _pytest(session, "torch", "tests/gpu", **interpret)


@nox.session
def cupy(session: nox.Session) -> None:
    """The core on CuPy; only where an NVIDIA GPU is present."""
    if not HAS_GPU:
        session.skip("no NVIDIA GPU on this machine")
    _install(session, "cupy-cuda12x")
    _pytest(session, "cupy", "conformance")
