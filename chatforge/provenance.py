"""Where a stage ran and the memory it took: every stage report carries both under `provenance`.

A metrics review needs where it ran because the same commit gives different numbers on different machines: bf16
kernels differ by CPU (AMX, AVX512-BF16, none), and the rounding grows through every stage downstream. Peak memory
(`peak_memory`) is a resource of the machine, like `wall_seconds`. None of these fields is a metric; the report
card and `chatforge pr-report` keep them out of every metric table and diff, and show peak memory beside the times.
"""
from __future__ import annotations

import functools
import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path

from chatforge.files import write_json

KEY = "provenance"
PEAK_MEMORY = "peak_memory"
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


def megabytes_of_maxrss(maxrss: int) -> float:
    """getrusage's ru_maxrss in MB (10^6 bytes): Linux counts it in KiB, macOS in bytes."""
    return round(maxrss * (1 if sys.platform == "darwin" else 1024) / 1e6, 1)


def peak_memory() -> dict[str, float]:
    """The stage's peak memory so far, in MB (10^6 bytes).

    `rss_mb`: the largest resident set of this process or of any child it has waited for (what `/usr/bin/time`
    reports as the maximum resident set size); `children_rss_mb`: the largest child's alone (datatrove's workers,
    data-loader workers), 0 without children. The kernel keeps one peak per process, never a sum, so children that
    ran at the same time as their parent may together have held more. `cuda_allocated_mb`: on CUDA, the peak
    memory torch allocated on this process's GPU (0 when the stage never used it); torch is asked only when the
    stage loaded it.
    """
    process = megabytes_of_maxrss(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    children = megabytes_of_maxrss(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    peak = {"rss_mb": max(process, children), "children_rss_mb": children}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        peak["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 1e6, 1)
    return peak


def peak_rss_mb(report: dict) -> float | None:
    """A stage report's peak resident memory in MB; None for a report written before it was recorded."""
    recorded = (report.get(KEY) or {}).get(PEAK_MEMORY) or {}
    return recorded.get("rss_mb")


def hardware(report: dict) -> dict | None:
    """The hardware fields of a stage report's provenance; None for a report written before provenance was."""
    recorded = report.get(KEY)
    return {field: recorded.get(field) for field in HARDWARE_FIELDS} if isinstance(recorded, dict) else None


def write_report(path: str | os.PathLike, report: dict) -> None:
    """A stage report, written atomically, with where it ran and its peak memory up to this moment (stages write
    their report last)."""
    write_json(path, {**report, KEY: {**provenance(), PEAK_MEMORY: peak_memory()}})
