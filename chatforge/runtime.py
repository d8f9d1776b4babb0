"""Device, precision, threads and seeding: where and how models run, in training and in inference.

On CPU, bf16 autocast is used when the CPU has native bf16 matmul (AVX512-BF16 or AMX), which on our
machines is several times faster than fp32; otherwise fp32, and the log says so. On CUDA, bf16.
Parameters and optimizer state stay fp32 (autocast only), so checkpoints are exact.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import random

import numpy as np
import torch

from chatforge.console import log
from chatforge.provenance import cpu_info


def default_device() -> torch.device:
    """Where models run, in training and in inference: the GPU when there is one (`accelerate launch` places
    each process on its own)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit


def set_threads(threads: int | None) -> None:
    """Torch threads (`threads` 0 or None keeps torch's default, one per core), and an allocator that keeps
    freed tensors for reuse (`keep_freed_memory`). Every training stage starts with this."""
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()


def keep_freed_memory() -> None:
    """Make glibc keep freed blocks of up to 32 MB in the process. By default it unmaps a large freed tensor and
    page-faults the memory back in when the next step allocates it again: zeroing the 16 MB logits gradient
    took ~20 ms of a ~300 ms CPU pretraining step, and the step ran ~10% faster without that (docs/pretraining.md).
    Other C libraries (macOS, musl) keep their own policy."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


def start_stage(seed: int, threads: int | None) -> None:
    """How every training and evaluation stage starts: torch threads and the allocator policy, then every RNG
    seeded."""
    set_threads(threads)
    seed_everything(seed)


def stage_precision(stage: str, device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The stage's autocast dtype (`autocast_dtype`), said in its log."""
    dtype = autocast_dtype(device, precision)
    describe_precision(stage, device, dtype)
    return dtype


def release_freed_memory() -> None:
    """Hand memory freed by a phase that is over back to the system (`keep_freed_memory` keeps it otherwise): a
    phase of many small Python objects leaves a heap whose holes the next phase's tensors do not fit."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` in {auto, bf16, fp32}; None means plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and (precision == "bf16" or cpu_has_fast_bf16()):
        return torch.bfloat16
    return None


def training_attention(device: torch.device, choice: str = "auto") -> str:
    """The attention kernel to train with: `auto` is sdpa on GPUs and eager on CPU, where the
    flash-attention backward is slower than eager's batched matmuls (~12% of a step at context 128,
    benchmarks/train_throughput.py). Saved models always say sdpa: generation keeps its fast path."""
    if choice != "auto":
        return choice
    return "eager" if device.type == "cpu" else "sdpa"


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe_precision(stage: str, device: torch.device, dtype: torch.dtype | None) -> None:
    if dtype is None and device.type == "cpu" and not cpu_has_fast_bf16():
        log(stage, "precision: fp32 (this CPU has no native bf16 matmul; bf16 autocast would be slower)")
    elif dtype is None:
        log(stage, f"precision: fp32 on {device} (as set by the stage's `precision` param)")
    else:
        log(stage, f"precision: {'fp32' if dtype is None else str(dtype).removeprefix('torch.')} autocast on {device}")


# trl's fused LM head (sft, dpo) projects 4096 tokens x 32768 vocabulary entries per tile. Without Triton (CPUs)
# its torch fallback makes ~6 fp32 temporaries of a tile: 3 GB for SmolLM2's 49K vocabulary, for a result of a
# few floats per token. 256-token tiles keep them at 0.2 GB; every token's log-probability is the same.
CPU_FUSED_HEAD_TOKENS = 256


def bound_fused_head_tiles(device: torch.device) -> None:
    """Smaller tiles for trl's fused LM head on a CPU (a module constant of trl's kernel, read at each call)."""
    from trl.kernels import chunked_logprob

    if device.type == "cpu":
        chunked_logprob.TOKEN_CHUNK_SIZE = min(chunked_logprob.TOKEN_CHUNK_SIZE, CPU_FUSED_HEAD_TOKENS)
