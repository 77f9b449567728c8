"""`dynlm info`: architectures, presets, corpora, device."""

from __future__ import annotations

import argparse
import json
import os
import platform


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architectures, presets, corpora and the compute device")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run)


def collect() -> dict:
    import torch

    import dynlm

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = f"cpu ({os.cpu_count()} cores)"
    info = {
        "dynlm": dynlm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "architectures": dynlm.list_architectures(),
        "model_presets": dynlm.list_presets(),
    }
    try:
        from dynlm.data.corpora import cache_dir, list_corpora

        info["corpora"] = list_corpora()
        info["cache"] = str(cache_dir())
    except ImportError:
        pass
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        print(f"{key:<{width}}  {value}")
    return 0
