"""Quality-versus-speed benchmark (issue #5): a fixed held-out eval set (math, code, text), automatic
scores, AR and diffusion decoding side by side with interleaved timing, and the paper-style table.

Modules: `evalset` (the committed items and their builder), `metrics` (how an output is scored),
`runner` (the settings grid, timing and token counts), `report` (Markdown, JSON, plot). The
`twotower bench` verb is `twotower.cli.bench`.
"""
