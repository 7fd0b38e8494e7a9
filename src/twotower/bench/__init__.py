"""Benchmarks as library code.

Quality versus speed (issue #5): a fixed held-out eval set (math, code, text), automatic scores,
AR and diffusion decoding side by side with interleaved timing, and the paper-style table. Modules:
`evalset` (the committed items and their builder), `metrics` (how an output is scored), `runner`
(the settings grid, each setting a `DecodeSpec`, timing and token counts), `report` (Markdown,
JSON, plot), `baseline` (transformers `generate`). The `twotower bench` verb is `twotower.cli.bench`.

Speed at the release's shape (issue #19): `costmodel` (re-exports `costmodel_machine`: machines and
precisions, `costmodel_layers`: bytes and FLOPs per layer and forward, `costmodel_ratios`: the
diffusion/AR and speculative/AR throughput ratios), `costmodel_cpu` (the calibrated CPU model),
`cpu_probes` (its microbenchmarks), `optrace` (operators of a traced call), `random_model` (random
real-width layers for `benchmarks/real_shape.py` and `benchmarks/gpu_check.py`).
"""
