"""Where the time goes: torch.profiler tables for one model's decode step and training step.

    python benchmarks/profile_step.py --preset gpt2-small-like --out DIR   (CUDA; --smoke on CPU)

Writes profile_<preset>.txt (the top operators by device and host time) into DIR."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import dynlm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-small-like")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    preset = "standard-tiny" if args.smoke else args.preset
    dtype = torch.bfloat16 if cuda else torch.float32
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    report = [f"# {preset} on {torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch {torch.__version__}\n"]

    model = dynlm.build_model(preset).to(device=device, dtype=dtype).eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.context), device=device)
    with torch.inference_mode():
        out = model(prompt, state=model.init_state(1, max_length=args.context + 64))
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(8):  # warm-up
            out = model(token, state=out.state)
            token = out.logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(16):
                out = model(token, state=out.state)
                token = out.logits[:, -1:].argmax(-1)
            if cuda:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    report.append(f"## decode, context {args.context}: {1000 * seconds / 16:.2f} ms/token (profiled)\n")
    report.append(prof.key_averages().table(sort_by=sort, row_limit=25))
    report.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))

    model = dynlm.build_model(preset).to(device).train()
    x = torch.randint(0, vocab, (8 if cuda else 2, 1024 if cuda else 64), device=device)
    for _ in range(3):
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            model(x, labels=x).loss.backward()
    with profile(activities=activities) as prof:
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            model(x, labels=x).loss.backward()
        if cuda:
            torch.cuda.synchronize()
    report.append(f"## eager training forward+backward, batch {x.shape[0]} x {x.shape[1]}\n")
    report.append(prof.key_averages().table(sort_by=sort, row_limit=30))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{preset}.txt"
    path.write_text("\n".join(report))
    print("\n".join(report[:3]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
