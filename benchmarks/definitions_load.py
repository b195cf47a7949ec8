"""What loading the Dagster definitions costs: `dagster dev`, `dg check defs` and every code-location
reload import ``pipelines.definitions`` (issue 20: under 2 s and 300 MB, without torch).

Each repetition is a fresh ``python -c "import pipelines.definitions"`` under ``/usr/bin/time``:
wall time and peak RSS, which heavy modules it loaded, and ``import dagster`` alone as the floor.
``--baseline PATH`` measures another checkout (e.g. the commit before) in the same loop, turn about,
so both sides see the same load.

    .venv/bin/python benchmarks/definitions_load.py --reps 3 [--baseline ../main]

Writes the "definitions_load" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _images import ROOT, write_section

HEAVY = ("torch", "torchvision", "matplotlib", "mlflow", "pandas", "zarr")
PROBE = f"import sys, pipelines.definitions; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"


def measure(root: Path, code: str) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, heavy modules loaded) of ``python -c code`` in ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-c", code], cwd=root, env=env,
                          capture_output=True, text=True, check=True)
    wall, kb = done.stderr.strip().splitlines()[-1].split()
    return float(wall), int(kb) / 1024, done.stdout.strip() or "none"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="another checkout to measure in the same loop")
    args = p.parse_args()
    sides = {"this checkout": ROOT, **({f"baseline ({args.baseline})": args.baseline.resolve()} if args.baseline else {})}
    runs: dict[str, list] = {name: [] for name in [*sides, "import dagster alone"]}
    loads = []
    for _ in range(args.reps):
        loads.append(os.getloadavg()[0])
        for name, root in sides.items():
            runs[name].append(measure(root, PROBE))
        runs["import dagster alone"].append(measure(ROOT, "import dagster"))
    lines = ["| import | wall s, median (min-max) | peak RSS MiB, median | heavy modules loaded |", "|---|---:|---:|---|"]
    for name, rs in runs.items():
        walls = [r[0] for r in rs]
        lines.append(f"| {name} | {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) "
                     f"| {statistics.median(r[1] for r in rs):.0f} | {rs[-1][2] if name != 'import dagster alone' else '-'} |")
    notes = (f"`python -c \"import pipelines.definitions\"`, {args.reps} fresh processes per row, turn about; "
             f"{os.cpu_count()} CPUs shared with other work, load average {min(loads):.1f}-{max(loads):.1f} during the "
             "runs (wall times grow with load; peak RSS does not). Heavy modules looked for: " + ", ".join(HEAVY) + ".")
    table = "\n".join(lines)
    write_section("definitions_load", f"{notes}\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
