"""Quality retained and throughput gained, AR against mask diffusion, in one run (issue #5).

The README's table and plot come from this script; it takes the same options as `twotower bench`:

    python benchmarks/bench_quality_speed.py --json bench.json --plot bench.png
    python benchmarks/bench_quality_speed.py --thresholds 0.8 --block-sizes 16 --limit 4   # a quick look

See `twotower.bench` (eval set, metrics, runner, report) for what is measured and how.
"""

from __future__ import annotations

import sys

from twotower.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
