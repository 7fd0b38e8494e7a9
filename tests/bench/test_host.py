"""twotower.bench.host: the host description that benchmark records carry."""

from __future__ import annotations

import json

import torch

from twotower.bench import host

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni
processor\t: 1
model name\t: not the first one
flags\t\t: fpu
"""


def test_cpu_model_and_flags_from_cpuinfo():
    assert host.cpu_model(CPUINFO) == "AMD EPYC 9R14"
    # the first flags line, in FLAGS_OF_INTEREST's order; amx and avx512_fp16 are absent here
    assert host.cpu_flags(CPUINFO) == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"]


def test_missing_cpuinfo_fields():
    assert host.cpu_flags("processor : 0\n") == []
    assert host.cpu_model("processor : 0\nmodel name :   \n")  # empty name: platform's, or "unknown"


def test_describe_host_is_json_and_names_this_process():
    h = host.describe_host()
    assert json.loads(json.dumps(h)) == h
    assert h["torch"] == torch.__version__ and h["torch_threads"] == torch.get_num_threads()
    assert h["logical_cpus"] >= 1 and h["cpu_model"]
    assert set(h["cpu_flags"]) <= set(host.FLAGS_OF_INTEREST)


def test_host_line():
    h = {**host.describe_host(), "cpu_model": "X", "cpu_flags": ["avx2"], "logical_cpus": 2}
    line = host.host_line(h)
    assert line.startswith("host: X (avx2), 2 CPUs, torch ") and h["torch_cpu_capability"] in line
    assert "()" not in host.host_line({**h, "cpu_flags": []})
