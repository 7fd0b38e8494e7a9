"""Which machine a benchmark ran on, for its JSON record.

The same script measures very different figures on different hosts. Two 2-core cloud VMs of this
project: one measured a float32 matmul peak of 311 GFLOP/s and a 28 GB/s read; the other, an AMD
EPYC (Zen 4), 140-166 GFLOP/s through MKL and a 33 GB/s read, where MKL's float32 GEMV reads at
about half that (`layers/linear.py`). Whether a GEMM at a given rows-per-weight can reach a
bandwidth goal at all, and which kernel is the faster, change with the host, so the records say
which one it was.
"""

from __future__ import annotations

import os
import platform

import torch

from ..cpuinfo import field, vendor

# instruction-set extensions that decide which CPU kernels can run and how fast (x86 names)
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name: /proc/cpuinfo's first `model name` (Linux), else `platform.processor()`,
    else "unknown". `cpuinfo` is the file's text (tests pass their own)."""
    return field("model name", cpuinfo) or platform.processor() or "unknown"


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """Which of FLAGS_OF_INTEREST the CPU reports (/proc/cpuinfo's first `flags` line; empty where
    there is none)."""
    have = set(field("flags", cpuinfo).split())
    return [f for f in FLAGS_OF_INTEREST if f in have]


def describe_host() -> dict:
    """The host as a JSON-ready dict: CPU vendor and model, its flags of interest, logical CPUs, the torch
    threads in use, torch's version and its CPU capability (the widest vector ISA it dispatches to),
    Python and the platform."""
    return {
        "cpu_vendor": vendor(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def host_line(host: dict | None = None) -> str:
    """One line for a report's header, e.g. `host: AMD EPYC (avx512f, avx512_bf16), 2 CPUs, torch
    2.13.0+cpu (AVX512)`."""
    h = describe_host() if host is None else host
    flags = f" ({', '.join(h['cpu_flags'])})" if h["cpu_flags"] else ""
    return f"host: {h['cpu_model']}{flags}, {h['logical_cpus']} CPUs, torch {h['torch']} ({h['torch_cpu_capability']})"
