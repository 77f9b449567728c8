"""Times `dynlm arena quick` (what `make quickstart` runs) and commits its report.

    python benchmarks/arena_quick_cpu.py [--out benchmarks/results] [--arena-dir runs/arena-quick] [-- ARENA ARGS]

Runs the arena in a fresh folder as a child process, measures its wall time and CPU time (user +
system, all threads), and writes arena_quick_cpu.json (the timing, the machine and the arena's
report.json) and arena_quick_cpu.md (the timing, then the arena's report.md) with the arena's
plots as arena_quick_cpu_<plot>.png into --out. The corpus cache is used as found (say which).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dynlm.train.bench import source_commit
from quickstart_cpu import cpu_model  # this folder: the script's own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--arena-dir", type=Path, default=Path("runs/arena-quick"))
    parser.add_argument("arena_args", nargs="*", help="extra `dynlm arena quick` arguments")
    args = parser.parse_args(argv)
    if args.arena_dir.exists():
        shutil.rmtree(args.arena_dir)
    command = [sys.executable, "-m", "dynlm", "arena", "quick", "--out", str(args.arena_dir), *args.arena_args]
    load_before, commit = os.getloadavg(), source_commit()  # the code that runs, not HEAD at the end
    start = time.perf_counter()
    completed = subprocess.run(command, check=False)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    report = json.loads((args.arena_dir / "report.json").read_text())
    timing = {"command": "dynlm arena quick " + " ".join(args.arena_args), "exit_code": completed.returncode,
              "wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "cpu": cpu_model(),
              "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in load_after], "commit": commit,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arena_quick_cpu.json").write_text(json.dumps({"timing": timing, "report": report}, indent=2) + "\n")
    body = (args.arena_dir / "report.md").read_text()
    for plot in report["plots"]:
        shutil.copyfile(args.arena_dir / plot, args.out / f"arena_quick_cpu_{plot}")
        body = body.replace(f"]({plot})", f"](arena_quick_cpu_{plot})")
    minutes, seconds = divmod(wall, 60)
    header = [f"# `{timing['command'].strip()}` on CPU", "",
              f"{timing['cpu']}, {timing['cpus']} CPUs, OMP_NUM_THREADS={timing['omp_num_threads']}; commit "
              f"{timing['commit']}, {timing['time']}. Wall time **{int(minutes)} min {seconds:.0f} s**, CPU time "
              f"{timing['cpu_seconds']:.0f} s (all threads), exit code {timing['exit_code']}. Load average before / "
              f"after: {timing['load_average_before']} / {timing['load_average_after']}: the machine was shared "
              "with other jobs, so the wall time is an upper bound for a quiet machine. Produced by "
              "`benchmarks/arena_quick_cpu.py`.", "", "---", ""]
    (args.out / "arena_quick_cpu.md").write_text("\n".join(header) + body)
    print("\n".join(header))
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
