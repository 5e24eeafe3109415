"""Provenance every benchmark result carries: command, machine, versions, date."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import sys


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


def provenance(*packages: str) -> dict[str, object]:
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
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
        f"- Versions: {vers}\n"
        f"- Date: {meta['date']}\n\n"
    )
