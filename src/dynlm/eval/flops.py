"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

    MFU = tokens/s x FLOPs per token / peak FLOP/s

FLOPs per token come from the model (`model.flops_per_token(seq_len)`, nanoGPT's formula
6·N + 12·L·H·Q·T for a transformer; routed models override it). Peaks are the dense bf16
tensor-core figures of NVIDIA's datasheets (no sparsity); a GPU not in the table, or a CPU, gets
no MFU unless a peak is given explicitly."""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name, dense bf16 peak in TFLOP/s), most specific first
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float | None, str]:
    """(peak FLOP/s, where the figure comes from) of a device, or (None, why not)."""
    if device.type != "cuda":
        return None, f"no MFU on {device.type}: no meaningful peak"
    if dtype != torch.bfloat16:
        return None, "peaks are tabulated for bf16 only"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{key} dense bf16 datasheet peak, {tflops:g} TFLOP/s"
    return None, f"peak of '{name}' unknown (give --peak-tflops)"


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    """Fraction of the peak achieved (None without a peak)."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_second * flops_per_token / peak
