"""`make demo` end to end, after install: wall time and peak memory.

Runs ``make demo`` (the .venv is already installed, so no pip step) as a subprocess under
``/usr/bin/time -v`` with a fresh ``PRECOMPUTE_HOME`` in ``benchmarks/out/demo_home`` (so the
digits are written out, every activation computed, every stage trained, the report rendered), and
polls the whole process tree's RSS with psutil at 10 Hz: the peak of the tree's summed RSS (what
the machine must hold at once; shared pages count once per process, so this overstates a little)
and the peak of the largest single process. ``/usr/bin/time``'s maximum RSS is the largest
process's own peak, from the kernel, a cross-check of the polled one. The recipe's own time is
parsed from the demo's last lines ("finished in N s"); the difference to the wall time is
interpreter start, imports and Dagster's instance set-up.

    .venv/bin/python benchmarks/demo_e2e.py             # ~2-6 min on 2 cores, depending on load
    .venv/bin/python benchmarks/demo_e2e.py --reps 3    # best and median of 3

Writes its table to the "demo_e2e" section of benchmarks/RESULTS.md, and the demo's own printed
table with the last run's timing to the README's demo block (between ``<!-- BEGIN demo -->`` and
``<!-- END demo -->``), which tests/test_readme_demo.py checks against a fresh `make demo`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import time

import psutil

from _images import OUT, ROOT, commit, write_section

HOME = OUT / "demo_home"
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- BEGIN demo -->", "<!-- END demo -->"
# the demo's result lines: "recipe for partition ... finished in 69s" and one line per evaluated stage
TABLE_LINE = re.compile(r"^(recipe for partition .* finished in \d+s|\s+.+?\s+valid accuracy [\d.]+\s+loss [\d.]+)$", re.M)


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(sum of RSS over the process and its descendants, largest single RSS)."""
    total = largest = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        total, largest = total + rss, max(largest, rss)
    return total, largest


def run_demo() -> dict:
    shutil.rmtree(HOME, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "PRECOMPUTE_DATA", "PRECOMPUTE_STORE",
                                                             "MLFLOW_TRACKING_URI")}
    env["PRECOMPUTE_HOME"] = str(HOME)
    OUT.mkdir(parents=True, exist_ok=True)  # benchmarks/out is git-ignored: absent on a fresh clone
    log = OUT / "demo_e2e.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(["/usr/bin/time", "-v", "make", "demo"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        ps = psutil.Process(proc.pid)
        peak_tree = peak_one = 0
        while proc.poll() is None:
            total, largest = tree_rss(ps)
            peak_tree, peak_one = max(peak_tree, total), max(peak_one, largest)
            time.sleep(0.1)
    wall = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"make demo failed ({proc.returncode}); see {log}:\n{text[-3000:]}")
    recipe = re.search(r"finished in (\d+)s", text)
    maxrss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    accuracy = re.findall(r"^\s+(\w+)\s+valid accuracy ([\d.]+)", text, re.M)
    r = dict(wall=wall, recipe=float(recipe.group(1)) if recipe else float("nan"), tree=peak_tree / 2**20,
             one=peak_one / 2**20, time_maxrss=int(maxrss.group(1)) / 1024 if maxrss else float("nan"),
             accuracy=dict(accuracy), table=[m.group(1) for m in TABLE_LINE.finditer(text)],
             load=os.getloadavg()[0])
    print(f"  make demo: {wall:.0f} s wall (recipe {r['recipe']:.0f} s), peak tree RSS {r['tree']:.0f} MiB, largest "
          f"process {r['one']:.0f} MiB (time -v: {r['time_maxrss']:.0f} MiB); accuracy {r['accuracy']}", flush=True)
    return r


def write_readme(r: dict) -> None:
    """The README's demo block: the last run's printed table, as `make demo` printed it, and its timing."""
    when = time.strftime("%Y-%m-%d")
    block = "\n".join([
        README_BEGIN,
        f"Measured {when} at commit {commit()} by `benchmarks/demo_e2e.py`, on {psutil.cpu_count()} CPU cores "
        f"shared with other work (load average {r['load']:.1f}): {r['wall']:.0f} s wall, {r['recipe']:.0f} s for the "
        f"recipe, {r['tree'] / 1024:.2f} GiB peak memory.",
        "",
        "```",
        *r["table"],
        "report:        var/reports/tf_efficientnet_lite0/cut=0/report.md",
        "MLflow run:    ... in sqlite:///.../var/mlflow.db",
        "model:         models:/precompute-tf_efficientnet_lite0-cut0/1  (.venv/bin/precompute serve -m ...)",
        "```",
        README_END])
    text = README.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{README} has no {README_BEGIN} ... {README_END} block to write")
    README.write_text(pattern.sub(lambda _: block, text))
    print(f"wrote the demo block of {README}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    runs = [run_demo() for _ in range(args.reps)]
    stat = lambda k, f: f(r[k] for r in runs)
    lines = ["| make demo (installed .venv, fresh PRECOMPUTE_HOME) | best | median |", "|---|---:|---:|",
             f"| wall time, s | **{stat('wall', min):.0f}** | {stat('wall', statistics.median):.0f} |",
             f"| recipe as the demo reports it, s | {stat('recipe', min):.0f} | {stat('recipe', statistics.median):.0f} |",
             f"| start-up, imports, Dagster set-up (wall - recipe), s | {min(r['wall'] - r['recipe'] for r in runs):.0f} "
             f"| {statistics.median(r['wall'] - r['recipe'] for r in runs):.0f} |",
             f"| peak RSS, whole process tree (psutil, 10 Hz), MiB | **{stat('tree', min):.0f}** "
             f"| {stat('tree', statistics.median):.0f} |",
             f"| peak RSS, largest process (psutil), MiB | {stat('one', min):.0f} | {stat('one', statistics.median):.0f} |",
             f"| peak RSS, largest process (/usr/bin/time -v), MiB | {stat('time_maxrss', min):.0f} "
             f"| {stat('time_maxrss', statistics.median):.0f} |"]
    acc = ", ".join(f"{k} {v}" for k, v in runs[-1]["accuracy"].items())
    notes = (f"`make demo` on scikit-learn's digits (the demo's settings: tf_efficientnet_lite0, 64 px), {args.reps} run(s), "
             f"each with a fresh PRECOMPUTE_HOME under benchmarks/out/, {psutil.cpu_count()} CPUs shared with other "
             f"work (load average at the end: {os.getloadavg()[0]:.1f}). Validation accuracy of the last run: {acc}.")
    table = "\n".join(lines)
    shown = "\n".join(runs[-1]["table"])
    write_section("demo_e2e", f"{notes}\n\n{table}\n\nWhat the last run printed:\n\n```\n{shown}\n```")
    write_readme(runs[-1])
    print(f"\n{table}")


if __name__ == "__main__":
    main()
