"""Quality retained and throughput gained, AR against mask diffusion, in one run (issue #5).

The README's table and plot come from this script; it takes the same options as `twotower bench`:

    python benchmarks/bench_quality_speed.py --json bench.json --plot bench.png
    python benchmarks/bench_quality_speed.py --thresholds 0.8 --block-sizes 16 --limit 4   # a quick look

See `twotower.bench` (eval set, metrics, runner, report) for what is measured and how.
"""

from __future__ import annotations

import sys

from twotower.cli import main as twotower_main


def main(argv: list[str] | None = None) -> int:
    """The same options as `twotower bench`."""
    return twotower_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
