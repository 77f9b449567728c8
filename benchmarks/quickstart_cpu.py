"""The quickstart, timed as a user runs it: `dynlm train quick` on CPU, from an empty cache.

    python benchmarks/quickstart_cpu.py --out benchmarks/results            # writes quickstart_cpu.json/.md
    python benchmarks/quickstart_cpu.py --out /tmp/q -- train.max_steps=50  # extra overrides (experiments)

The command runs in a subprocess with a fresh DYNLM_CACHE (so the wall time includes fetching the
corpus, training the BPE tokenizer and tokenizing), trains, evaluates the best checkpoint on the
full validation and test splits and generates a sample. The script records the wall time, the
figures from the run's eval.json, the machine (CPU, cores, load average before and after: other
processes on the machine slow the run down) and the targets: at most 5 minutes, test bits per byte
<= 2.1 (nanoGPT's 4 x 192 model reached 2.15 with a 2048-token BPE in 3 minutes on this corpus)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynlm.train.bench import source_commit

TARGET_SECONDS = 300
TARGET_BPB = 2.1
NANOGPT = {"bytes": 2.36, "bpe2048": 2.15}  # 4 layers x 192, block 128, batch 16, 3 minutes, same corpus


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for quickstart_cpu.json and .md")
    parser.add_argument("--warm-cache", action="store_true", help="reuse $DYNLM_CACHE instead of an empty one")
    parser.add_argument("--name", default="quickstart_cpu", help="result file name (default quickstart_cpu)")
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE overrides (after --)")
    args = parser.parse_args(argv)

    dynlm_bin = Path(sys.executable).with_name("dynlm")
    with tempfile.TemporaryDirectory(prefix="dynlm-quickstart-") as tmp:
        env = dict(os.environ)
        if not args.warm_cache:
            env["DYNLM_CACHE"] = str(Path(tmp) / "cache")
        command = [str(dynlm_bin), "train", "quick", f"out_dir={tmp}/runs", *args.overrides]
        load_before = os.getloadavg()
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-4000:])
            return result.returncode
        report = json.loads((Path(tmp) / "runs" / "quick" / "eval.json").read_text())
        config = (Path(tmp) / "runs" / "quick" / "config.yaml").read_text()

    evaluation = report["evaluation"]
    record = {
        "command": "dynlm train quick" + "".join(f" {o}" for o in args.overrides),
        "wall_seconds": wall, "train_seconds": report["train_seconds"], "steps": report["step"],
        "tokens": report["tokens"], "best_step": evaluation.get("step"),
        "val": evaluation.get("val"), "test": evaluation.get("test"),
        "sample": report.get("sample"),
        "targets": {"wall_seconds_max": TARGET_SECONDS, "test_bpb_max": TARGET_BPB,
                    "met": wall <= TARGET_SECONDS and evaluation["test"]["bpb"] <= TARGET_BPB},
        "nanogpt_reference_bpb": NANOGPT,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_after,
                    "fresh_cache": not args.warm_cache},
        "commit": source_commit(), "config": config, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(record) + "\n")
    print(markdown(record))
    return 0


def markdown(r: dict) -> str:
    val, test = r["val"], r["test"]
    machine = r["machine"]
    minutes, seconds = divmod(r["wall_seconds"], 60)
    lines = [
        "# Quickstart on CPU: `dynlm train quick`", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; load average "
        f"{machine['load_average_before'][0]:.2f} before, {machine['load_average_after'][0]:.2f} after "
        f"({'fresh' if machine['fresh_cache'] else 'warm'} cache). Commit {r['commit']}, {r['time']}.", "",
        f"Command: `{r['command']}`", "",
        "| | figure | target |", "|---|---|---|",
        f"| wall time, everything included | {int(minutes)} min {seconds:04.1f} s | <= 5 min |",
        f"| of which training | {r['train_seconds']:.0f} s ({r['steps']} steps, {r['tokens']:,} tokens) | |",
        f"| **test bits per byte** | **{test['bpb']:.4f}** | <= {r['targets']['test_bpb_max']} |",
        f"| val bits per byte | {val['bpb']:.4f} | |",
        f"| test nats/token, perplexity | {test['loss_nats']:.4f}, {test['ppl']:.2f} | |",
        f"| test tokens scored (stride {test['stride']}, window {test['seq_len']}) | {test['num_tokens']:,} over "
        f"{test['num_bytes']:,} bytes | |",
        "", f"Targets met: **{'yes' if r['targets']['met'] else 'no'}**. For scale, nanoGPT's model (4 layers x 192, "
        f"block 128, batch 16) trained for 3 minutes on this corpus reached {r['nanogpt_reference_bpb']['bytes']} "
        f"bits per byte on bytes and {r['nanogpt_reference_bpb']['bpe2048']} with a 2048-token BPE tokenizer.", "",
        "Sample (temperature 0.8, top-k 50):", "", "```text", (r["sample"] or "").strip(), "```",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
