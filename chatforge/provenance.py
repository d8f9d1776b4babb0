"""Where a stage ran: every stage report carries it under `provenance`.

A metrics review needs it because the same commit gives different numbers on different machines: bf16 kernels
differ by CPU (AMX, AVX512-BF16, none), and the rounding grows through every stage downstream. These fields are
not metrics; the report card and `chatforge pr-report` keep them out of every metric table and diff.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from chatforge.files import write_json

KEY = "provenance"
# what decides the numbers' rounding; pr-report warns when any of these differ between base and head
HARDWARE_FIELDS = ("cpu", "bf16_path", "device")
PACKAGES = ("torch", "transformers", "trl", "accelerate", "peft", "tokenizers", "datasets", "numpy", "datatrove",
            "dvc")


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) from /proc/cpuinfo; elsewhere the platform's processor name and no flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)  # the last core's, the same as the first's
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name", platform.machine()), frozenset(fields.get("flags", "").split())


def bf16_path() -> str:
    """The CPU's native bf16 matmul instructions, which training's `precision: auto` follows (runtime.py)."""
    flags = cpu_info()[1]
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "none (fp32)"


def device() -> str:
    """The accelerator the stage could use; torch is asked only when the stage loaded it (collect and clean don't)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} devices)"
    return "cpu"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance() -> dict:
    """Strings only, so `dvc metrics diff` never mistakes them for numbers to compare."""
    torch = sys.modules.get("torch")
    return {
        "cpu": cpu_info()[0],
        "cpu_cores": str(os.cpu_count()),
        "bf16_path": bf16_path(),
        "torch_cpu_kernels": torch.backends.cpu.get_cpu_capability() if torch is not None else "torch not loaded",
        "device": device(),
        "python": platform.python_version(),
        "packages": {package: version(package) for package in PACKAGES},
    }


def hardware(report: dict) -> dict | None:
    """The hardware fields of a stage report's provenance; None for a report written before provenance was."""
    recorded = report.get(KEY)
    return {field: recorded.get(field) for field in HARDWARE_FIELDS} if isinstance(recorded, dict) else None


def write_report(path: str | os.PathLike, report: dict) -> None:
    """A stage report, written atomically, with where it ran."""
    write_json(path, {**report, KEY: provenance()})
