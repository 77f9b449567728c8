"""The worked example of docs/weights_as_code.md, run as a user runs it, with its figures recorded.

    python benchmarks/weights_as_code_example.py --out benchmarks/results   # weights_as_code_example.json/.md

In a temporary folder: `dynlm train quick train.max_steps=N` (no final evaluation: the example
evaluates on its own), export the best checkpoint as code,
show the final norm's cell, edit its first value to 40.0 by hand, load it (refused: the hash no
longer matches), rehash, evaluate and sample the original and the edited model, diff them, roll
back with a reverse delta, and read the lineage. Every command and its output goes into the
Markdown file; the JSON holds the figures the guide quotes. Uses $DYNLM_CACHE (or the default
cache) for the corpus and tokenizer, so a warm cache skips the downloads."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from quickstart_cpu import cpu_model  # benchmarks/ is on sys.path when a script there runs

ROOT = Path(__file__).resolve().parents[1]
EDITED_CELL = "model.norm.weight"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class Transcript:
    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.steps: list[dict[str, object]] = []

    def dynlm(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "dynlm", *args], cwd=self.cwd, env=self.env,
                                capture_output=True, text=True)
        if result.returncode != expect:
            raise SystemExit(f"dynlm {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        self.steps.append({"command": "dynlm " + " ".join(args), "stdout": result.stdout, "stderr": result.stderr})
        return result


def edit_first_value(weights: Path, cell: str, value: str) -> str:
    """Replace the first value of `cell`'s Literal in weights.py, as a person would in an editor."""
    text = weights.read_text()
    start = text.index(f'name="{cell}"')
    literal = text.index("data=Literal([", start) + len("data=Literal([")
    match = re.compile(r"\s*([-0-9.e]+)").match(text, literal)
    assert match is not None
    weights.write_text(text[:match.start(1)] + value + text[match.end(1):])
    return match.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dynlm-wac-") as tmp:
        t = Transcript(Path(tmp))
        train = ["train", "quick", f"train.max_steps={args.steps}", "train.final_eval=[]", "train.plot=false"]
        t.dynlm(*train)
        export = t.dynlm("weights", "export", "runs/quick/best", "code/", "--mode", "inline").stdout
        shown = t.dynlm("weights", "show", "code/", "--cell", EDITED_CELL, "--json").stdout
        cell = json.loads(shown)
        t.dynlm("weights", "show", "code/", "--cell", EDITED_CELL)
        model_before = json.loads(t.dynlm("weights", "show", "code/", "--json").stdout)["model"]
        original = edit_first_value(Path(tmp) / "code" / "weights.py", EDITED_CELL, "40.0")
        refused = t.dynlm("generate", "--model", "code/", "--prompt", "ROMEO:", expect=2).stderr.strip()
        t.dynlm("weights", "rehash", "code/")
        edited_cell = json.loads(t.dynlm("weights", "show", "code/", "--cell", EDITED_CELL, "--json").stdout)
        model_after = json.loads(t.dynlm("weights", "show", "code/", "--json").stdout)["model"]
        t.dynlm("weights", "import", "code/", "edited/")
        rows = {}
        for name, model in (("original", "runs/quick/best"), ("edited", "code/")):
            result = json.loads(t.dynlm("eval", "--model", model, "--corpus", "shakespeare", "--split", "val",
                                        "--max-bytes", "50000", "--seq-len", "256").stdout)
            # sampled (a short run's greedy continuation is mostly line breaks), the same seed for both
            sample = t.dynlm("generate", "--model", model, "--prompt", "ROMEO:", "--max-new-tokens", "40",
                             "--temperature", "0.8", "--top-k", "40", "--seed", "0", "--no-stream").stdout
            rows[name] = {"loss_nats": result["loss_nats"], "bpb": result["bpb"], "num_bytes": result["num_bytes"],
                          "sample": sample.split("\n", 1)[1].removesuffix("\n\n")}
        forward = t.dynlm("weights", "diff", "runs/quick/best", "code/", "-o", "edit-delta/").stdout
        t.dynlm("weights", "diff", "code/", "runs/quick/best", "-o", "undo/")
        t.dynlm("weights", "apply", "code/", "undo/", "-o", "restored/")
        lineage = t.dynlm("weights", "lineage", "restored/").stdout
        refused_overwrite = t.dynlm("weights", "apply", "code/", "undo/", "-o", "restored/", expect=2).stderr.strip()
        config = json.loads((Path(tmp) / "runs" / "quick" / "best" / "config.json").read_text())

    parameters = model_before.get("parameters")
    result = {
        "script": "benchmarks/weights_as_code_example.py", "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs (shared with other work)",
        "train": "dynlm " + " ".join(train), "parameters": parameters,
        "hidden_size": config.get("hidden_size") or config.get("dynlm", {}).get("config", {}).get("hidden_size"),
        "export": export.strip(), "cell": cell, "original_value": original, "edited_cell": edited_cell,
        "weights_sha256_before": model_before.get("weights_sha256"),
        "weights_sha256_after": model_after.get("weights_sha256"),
        "refused_load": refused, "evaluation": rows, "diff": forward.strip(), "lineage": lineage.strip(),
        "refused_overwrite": refused_overwrite,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weights_as_code_example.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Weights as code: the worked example\n",
             f"Produced by `{result['script']}` at commit `{result['commit']}` on {result['date']}; "
             f"{result['machine']}. Model: `{result['train']}`, {parameters:,} parameters.\n",
             "| model | validation loss (nats/token) | bits per byte | bytes scored | sampled continuation of "
             "\"ROMEO:\" (temperature 0.8, top-k 40, seed 0) |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        sample = row["sample"].strip().replace("\n", " / ").replace("|", "\\|")
        lines.append(f"| {name} | {row['loss_nats']:.4f} | {row['bpb']:.4f} | {row['num_bytes']:,} | {sample} |")
    lines.append("\n## Transcript\n")
    for step in t.steps:
        lines.append(f"```text\n$ {step['command']}\n{(step['stdout'] + step['stderr']).strip()[-4000:]}\n```\n")
    (args.out / "weights_as_code_example.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'weights_as_code_example.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
