"""Provenance every benchmark result carries: command, machine, versions, date."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def commit() -> str:
    """The repository's commit, with ``+changes`` when the tree differs from it
    ("unknown" outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=root, capture_output=True,
                                  text=True, check=True).stdout.strip()  # fmt: skip

        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def provenance(*packages: str) -> dict[str, object]:
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "commit": commit(),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "versions": versions("numpy", *packages),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }


def markdown_header(title: str, meta: dict) -> str:
    machine = meta["machine"]
    vers = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return (
        f"# {title}\n\n"
        f"- Command: `{meta['command']}`\n"
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({machine['platform']}), no GPU;"
        f" load average {machine.get('load_average_1m', '?')} at the start (other jobs"
        " share this machine: compare ratios within one run, not across runs)\n"
        f"- Commit: {meta.get('commit', 'unknown')}\n"
        f"- Versions: {vers}\n"
        f"- Date: {meta['date']}\n\n"
    )
