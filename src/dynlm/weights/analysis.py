"""Measured statistics of a model's weights and, given sample text, of its activations.

    report = analyze(model_or_path, texts=["..."], tokenizer=tok)
    write_report(report, "report/")          # report.json, report.md (+ PNG plots with matplotlib)

Per tensor: mean, std, RMS, max |w|, Frobenius norm, fraction near zero (|w| < 1% of the tensor's
RMS), and for matrices whose smaller side is at most `rank_cap`: spectral norm and effective rank
(Roy & Vetterli 2007: exp of the entropy of the normalised singular values). Per layer: totals
and means of the above. Consecutive layers: cosine similarity of same-named weights. With text:
MLP activation sparsity (fraction of |activation| below 10% of that layer's activation RMS), dead
neurons (never above that threshold on the sample), attention entropy per head (nats, mean over
query positions after the first), and cosine similarity of consecutive layers' hidden states.

Reports contain numbers and definitions only; each sentence of the Markdown summary quotes the
number it rests on.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynlm.checkpoint import model_state_dict
from dynlm.errors import DataError
from dynlm.nn import Attention, SwiGLU, apply_rotary, attention_mask
from dynlm.weights.loading import load_pretrained, load_tokenizer

DEFINITIONS = {
    "near_zero": "fraction of elements with |w| < 0.01 * RMS(w)",
    "effective_rank": "exp(entropy of s / sum(s)) over the singular values s (Roy & Vetterli 2007); "
                      "computed when min(rows, cols) <= rank_cap",
    "spectral_norm": "largest singular value",
    "weight_similarity": "cosine similarity of the flattened weights of layer i and layer i+1 (same name)",
    "mlp_sparsity": "fraction of MLP activations (input of down_proj) with |a| < 0.1 * RMS of that layer's activations",
    "dead_neurons": "fraction of MLP neurons whose |a| never exceeds that threshold on the sample",
    "attention_entropy": "entropy in nats of each head's attention distribution, mean over query positions >= 1; "
                         "normalized = entropy / log(number of visible keys)",
    "hidden_similarity": "mean over tokens of the cosine similarity between the outputs of layer i and layer i+1",
}
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(2)) if match else None


def _round(x: float, digits: int = 5) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


# ---------------------------------------------------------------------------------------------
# Weights


def tensor_report(name: str, tensor: torch.Tensor, rank_cap: int) -> dict[str, Any]:
    w = tensor.detach().float().cpu()
    flat = w.reshape(-1).double()
    rms = float(flat.pow(2).mean().sqrt()) if flat.numel() else 0.0
    out: dict[str, Any] = {
        "name": name, "layer": _layer_of(name), "shape": list(w.shape), "numel": w.numel(),
        "mean": _round(float(flat.mean())) if flat.numel() else None,
        "std": _round(float(flat.std(unbiased=False))) if flat.numel() else None,
        "rms": _round(rms), "abs_max": _round(float(flat.abs().max())) if flat.numel() else None,
        "fro_norm": _round(float(flat.norm())),
        "near_zero": _round(float((flat.abs() < 0.01 * rms).double().mean())) if rms > 0 else None,
    }
    if w.dim() == 2 and min(w.shape) <= rank_cap and w.numel():
        # singular values from the Gram matrix of the smaller side, in float64
        m = w.double()
        gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
        s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
        total = float(s.sum())
        if total > 0:
            p = s / total
            p = p[p > 0]
            erank = math.exp(float(-(p * p.log()).sum()))
            out.update(spectral_norm=_round(float(s[0])), effective_rank=_round(erank, 4),
                       effective_rank_fraction=_round(erank / min(w.shape), 4))
    return out


def weight_similarities(tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Cosine similarity of layer i and i+1 for every weight name that repeats across layers."""
    kinds: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        layer = _layer_of(name)
        if layer is not None and t.dim() >= 2:
            kinds.setdefault(_LAYER.sub(r"\1layers.{i}.", name, count=1), {})[layer] = t
    out = []
    for kind, by_layer in kinds.items():
        for i in sorted(by_layer):
            if i + 1 in by_layer and by_layer[i].shape == by_layer[i + 1].shape:
                a, b = by_layer[i].detach().double().reshape(-1), by_layer[i + 1].detach().double().reshape(-1)
                cos = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
                out.append({"kind": kind, "layers": [i, i + 1], "cosine": _round(cos, 4)})
    return out


# ---------------------------------------------------------------------------------------------
# Activations


def encode_texts(tokenizer: Any, texts: Iterable[str], seq_len: int, max_tokens: int) -> list[list[int]]:
    """Token sequences of at most `seq_len` (each text starts with the separator when the
    tokenizer's models were trained that way), `max_tokens` in all."""
    sequences, total = [], 0
    prefix = [tokenizer.separator_id] if getattr(tokenizer, "prepend_separator", False) else []
    for text in texts:
        if total >= max_tokens:
            break
        ids = prefix + tokenizer.encode(text)
        for start in range(0, len(ids), seq_len):
            chunk = ids[start: start + seq_len]
            if len(chunk) < 2 or total >= max_tokens:
                continue
            chunk = chunk[: max_tokens - total]
            sequences.append(chunk)
            total += len(chunk)
    return sequences


class ActivationRecorder:
    """Forward hooks that record MLP activations (input of each SwiGLU's down_proj), attention
    entropies (recomputed from each Attention's q and k) and layer outputs, for one sequence at
    a time (batch 1, fresh state)."""

    def __init__(self, model: torch.nn.Module, attention: bool = True, hidden: bool = True):
        self.mlp: dict[str, list[torch.Tensor]] = {}
        self.entropy: dict[str, list[torch.Tensor]] = {}  # [H, T-1] per sequence
        self.norm_entropy: dict[str, list[torch.Tensor]] = {}
        self.hidden: dict[int, list[torch.Tensor]] = {}
        self.skipped_attention: set[str] = set()
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, SwiGLU):
                self._handles.append(module.down_proj.register_forward_pre_hook(self._mlp_hook(name)))
            elif isinstance(module, Attention) and attention:
                self._handles.append(module.register_forward_pre_hook(self._attention_hook(name, module)))
        layers = getattr(getattr(model, "model", None), "layers", None)
        if hidden and isinstance(layers, torch.nn.ModuleList):
            for i, layer in enumerate(layers):
                self._handles.append(layer.register_forward_hook(self._hidden_hook(i)))

    def _mlp_hook(self, name: str):
        def hook(module, args):
            self.mlp.setdefault(name, []).append(args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu())
        return hook

    def _hidden_hook(self, index: int):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self.hidden.setdefault(index, []).append(output.detach().float().reshape(-1, output.shape[-1]).cpu())
        return hook

    def _attention_hook(self, name: str, module: Attention):
        def hook(mod, args):
            x, cos, sin = args[0], args[1], args[2]
            cache = args[3] if len(args) > 3 else None
            key_valid = args[4] if len(args) > 4 else None
            if x.shape[0] != 1 or cos.dim() != 2 or key_valid is not None or (cache is not None and cache.length):
                self.skipped_attention.add(name)  # routed or continued calls: not a plain causal sequence
                return
            b, t, _ = x.shape
            q = module.q_proj(x).view(b, t, module.num_heads, module.head_dim).transpose(1, 2)
            k = module.k_proj(x).view(b, t, module.num_kv_heads, module.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            k = k.repeat_interleave(module.num_heads // module.num_kv_heads, dim=1)
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(module.head_dim)  # [1, H, T, T]
            pos = torch.arange(t, device=x.device)
            allowed = attention_mask(pos, pos, module.sliding_window)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)[0]  # [H, T, T]
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [H, T]
            visible = allowed.sum(-1).float()  # [T]
            if t > 1:
                self.entropy.setdefault(name, []).append(entropy[:, 1:].cpu())
                self.norm_entropy.setdefault(name, []).append((entropy[:, 1:] / visible[1:].log()).cpu())
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def run(self, model: torch.nn.Module, sequences: list[list[int]]) -> None:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for ids in sequences:
                model(torch.tensor([ids], device=device))
        finally:
            model.train(was_training)


def activation_report(model: torch.nn.Module, sequences: list[list[int]]) -> dict[str, Any]:
    recorder = ActivationRecorder(model)
    try:
        recorder.run(model, sequences)
    finally:
        recorder.close()
    mlp = []
    for name, chunks in recorder.mlp.items():
        a = torch.cat(chunks).abs()  # [tokens, neurons]
        threshold = 0.1 * float(a.pow(2).mean().sqrt())
        mlp.append({"module": name, "layer": _layer_of(name + "."), "tokens": a.shape[0], "neurons": a.shape[1],
                    "sparsity": _round(float((a < threshold).double().mean()), 4),
                    "dead_neurons": _round(float((a.max(0).values < threshold).double().mean()), 4),
                    "mean_abs": _round(float(a.mean()))})
    attention = []
    for name, chunks in recorder.entropy.items():
        entropy = torch.cat(chunks, dim=1)  # [H, queries]
        normalized = torch.cat(recorder.norm_entropy[name], dim=1)
        per_head = entropy.mean(1)
        attention.append({"module": name, "layer": _layer_of(name + "."), "queries": entropy.shape[1],
                          "entropy_per_head": [_round(float(v), 4) for v in per_head],
                          "normalized_per_head": [_round(float(v), 4) for v in normalized.mean(1)],
                          "mean_entropy": _round(float(per_head.mean()), 4)})
    hidden = []
    for i in sorted(recorder.hidden):
        if i + 1 in recorder.hidden:
            a, b = torch.cat(recorder.hidden[i]).double(), torch.cat(recorder.hidden[i + 1]).double()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
            hidden.append({"layers": [i, i + 1], "cosine": _round(float(cos), 4)})
    return {"sequences": len(sequences), "tokens": sum(len(s) for s in sequences), "mlp": mlp,
            "attention": attention, "attention_skipped": sorted(recorder.skipped_attention),
            "hidden_similarity": hidden}


# ---------------------------------------------------------------------------------------------
# The report


def analyze(model: Any, texts: Iterable[str] | None = None, tokenizer: Any = None, rank_cap: int = 1024,
            seq_len: int = 256, max_tokens: int = 4096) -> dict[str, Any]:
    """Measure a model (a module, or any path `dynlm.load_pretrained` reads). With `texts` and
    a tokenizer (default: the checkpoint's), activations are measured on up to `max_tokens`."""
    source = None
    if isinstance(model, (str, Path)):
        source = str(model)
        if texts is not None and tokenizer is None:
            tokenizer = load_tokenizer(model)
        model = load_pretrained(model)
    tensors = model_state_dict(model)
    per_tensor = [tensor_report(n, t, rank_cap) for n, t in tensors.items()]
    layers: dict[int, list[dict[str, Any]]] = {}
    for r in per_tensor:
        if r["layer"] is not None:
            layers.setdefault(r["layer"], []).append(r)
    per_layer = []
    for i in sorted(layers):
        rows = layers[i]
        ranks = [r["effective_rank_fraction"] for r in rows if r.get("effective_rank_fraction") is not None]
        per_layer.append({"layer": i, "parameters": sum(r["numel"] for r in rows),
                          "fro_norm": _round(math.sqrt(sum(r["fro_norm"] ** 2 for r in rows))),
                          "mean_effective_rank_fraction": _round(sum(ranks) / len(ranks), 4) if ranks else None,
                          "max_spectral_norm": _round(max((r.get("spectral_norm") or 0.0) for r in rows))})
    report: dict[str, Any] = {
        "model": {"source": source, "architecture": getattr(model, "architecture", type(model).__name__),
                  "parameters": sum(t.numel() for t in tensors.values()), "tensors": len(tensors)},
        "settings": {"rank_cap": rank_cap, "seq_len": seq_len, "max_tokens": max_tokens},
        "definitions": DEFINITIONS, "tensors": per_tensor, "layers": per_layer,
        "weight_similarity": weight_similarities(tensors),
    }
    if texts is not None:
        if tokenizer is None:
            raise ValueError("analyzing activations needs a tokenizer")
        sequences = encode_texts(tokenizer, texts, seq_len, max_tokens)
        if not sequences:
            raise DataError("the sample text gives no sequence of at least 2 tokens")
        report["activations"] = activation_report(model, sequences)
    report["findings"] = findings(report)
    return report


def findings(report: dict[str, Any]) -> list[str]:
    """Sentences, each quoting the measured number it states."""
    out = []
    model = report["model"]
    out.append(f"{model['tensors']} tensors, {model['parameters']:,} parameters.")
    ranked = [t for t in report["tensors"] if t.get("spectral_norm") is not None]
    if ranked:
        top = max(ranked, key=lambda t: t["spectral_norm"])
        out.append(f"Largest spectral norm: {top['spectral_norm']} ({top['name']}).")
        low = min(ranked, key=lambda t: t["effective_rank_fraction"])
        out.append(f"Lowest effective rank relative to its maximum: {low['effective_rank_fraction']} "
                   f"({low['name']}, effective rank {low['effective_rank']} of {min(low['shape'])}).")
    sims = report["weight_similarity"]
    if sims:
        top = max(sims, key=lambda s: abs(s["cosine"]))
        out.append(f"Most similar consecutive weights: cosine {top['cosine']} ({top['kind']}, layers "
                   f"{top['layers'][0]} and {top['layers'][1]}).")
    near = [t for t in report["tensors"] if t.get("near_zero") is not None and t["numel"] > 1]
    if near:
        top = max(near, key=lambda t: t["near_zero"])
        out.append(f"Highest near-zero fraction: {top['near_zero']} ({top['name']}).")
    act = report.get("activations")
    if act:
        out.append(f"Activations measured on {act['tokens']:,} tokens in {act['sequences']} sequences.")
        if act["mlp"]:
            lo = min(act["mlp"], key=lambda m: m["sparsity"])
            hi = max(act["mlp"], key=lambda m: m["sparsity"])
            out.append(f"MLP activation sparsity ranges from {lo['sparsity']} ({lo['module']}) to "
                       f"{hi['sparsity']} ({hi['module']}).")
            dead = max(act["mlp"], key=lambda m: m["dead_neurons"])
            out.append(f"Largest dead-neuron fraction: {dead['dead_neurons']} ({dead['module']}).")
        if act["attention"]:
            heads = [(e, a["module"], h) for a in act["attention"] for h, e in enumerate(a["entropy_per_head"])]
            e, module, h = min(heads)
            out.append(f"Lowest attention entropy: {e} nats ({module}, head {h}).")
            e, module, h = max(heads)
            out.append(f"Highest attention entropy: {e} nats ({module}, head {h}).")
        if act["hidden_similarity"]:
            top = max(act["hidden_similarity"], key=lambda s: s["cosine"])
            out.append(f"Most similar consecutive hidden states: cosine {top['cosine']} (layers "
                       f"{top['layers'][0]} and {top['layers'][1]}).")
    return out


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    def cell(v: Any) -> str:
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["# Model analysis", ""]
    if report["model"].get("source"):
        lines += [f"Source: `{report['model']['source']}`", ""]
    lines += ["## Findings", ""] + [f"- {f}" for f in report["findings"]] + [""]
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()] + [""]
    lines += ["## Layers", ""] + _table(report["layers"], ["layer", "parameters", "fro_norm",
                                                           "mean_effective_rank_fraction", "max_spectral_norm"])
    lines += ["", "## Tensors", ""] + _table(report["tensors"], [
        "name", "shape", "mean", "std", "rms", "abs_max", "near_zero", "spectral_norm", "effective_rank",
        "effective_rank_fraction"])
    if report["weight_similarity"]:
        lines += ["", "## Consecutive-layer weight similarity", ""]
        lines += _table(report["weight_similarity"], ["kind", "layers", "cosine"])
    act = report.get("activations")
    if act:
        lines += ["", f"## Activations ({act['tokens']:,} tokens)", "", "### MLP", ""]
        lines += _table(act["mlp"], ["module", "tokens", "neurons", "sparsity", "dead_neurons", "mean_abs"])
        lines += ["", "### Attention entropy (nats per head)", ""]
        lines += _table(act["attention"], ["module", "queries", "mean_entropy", "entropy_per_head",
                                           "normalized_per_head"])
        if act["hidden_similarity"]:
            lines += ["", "### Consecutive-layer hidden-state similarity", ""]
            lines += _table(act["hidden_similarity"], ["layers", "cosine"])
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path, plots: bool = True) -> list[Path]:
    """report.json, report.md and, with matplotlib installed, PNG plots. Returns the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "report.json", out_dir / "report.md"]
    files[0].write_text(json.dumps(report, indent=2) + "\n")
    files[1].write_text(to_markdown(report))
    if plots:
        files += _plots(report, out_dir)
    return files


def _plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    layers = [r for r in report["layers"] if r["mean_effective_rank_fraction"] is not None]
    if layers:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["layer"] for r in layers], [r["mean_effective_rank_fraction"] for r in layers], marker="o")
        ax.set(xlabel="layer", ylabel="mean effective rank / max", title="Effective rank per layer")
        fig.tight_layout()
        fig.savefig(out_dir / "effective_rank.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "effective_rank.png")
    act = report.get("activations")
    if act and act["attention"]:
        grid = np.array([a["entropy_per_head"] for a in act["attention"]], dtype=float)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set(xlabel="head", ylabel="attention module (in order)", title="Attention entropy (nats)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "attention_entropy.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "attention_entropy.png")
    if act and act["mlp"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(len(act["mlp"])), [m["sparsity"] for m in act["mlp"]])
        ax.set(xlabel="MLP module (in order)", ylabel="near-zero fraction", title="MLP activation sparsity")
        fig.tight_layout()
        fig.savefig(out_dir / "mlp_sparsity.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "mlp_sparsity.png")
    return written
