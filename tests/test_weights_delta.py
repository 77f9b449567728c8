"""Deltas: dense, sparse and low-rank cells; exact application for dense and sparse in every
dtype; a delta refuses any base but its own."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
import torch

import dynlm
from dynlm.errors import CheckpointError
from dynlm.weights import apply_delta, diff, export_code_checkpoint
from dynlm.weights.delta import Delta, apply_cell, diff_cell
from dynlm.weights.format import from_float
from dynlm.weights.store import CodeCheckpoint


def tiny(dtype: torch.dtype = torch.float32) -> dynlm.models.base.DynModel:
    torch.manual_seed(0)
    model = dynlm.build_model("standard-tiny", vocab_size=64, hidden_size=32, num_layers=2, intermediate_size=64)
    return model.to(dtype).eval()


def tuned_pair(tmp_path, dtype=torch.float32):
    base = tiny(dtype)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight[3, 5] += 0.5  # one element: sparse
        base.model.layers[1].self_attn.q_proj.weight.add_(  # a rank-2 update everywhere: low rank
            (torch.randn(32, 2) @ torch.randn(2, 32) * 0.01).to(dtype))
        base.model.norm.weight.mul_(1.1)  # every element: dense
    base.save_pretrained(tmp_path / "tuned")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["auto", "dense", "sparse"])
def test_exact_kinds_reproduce_the_tuned_model(tmp_path, dtype, kind):
    tuned_pair(tmp_path, dtype)
    delta = diff(tmp_path / "base", tmp_path / "tuned", tmp_path / "delta", kind=kind)
    assert delta.exact and len(delta.cells) == 3
    if kind != "auto":
        assert {c.kind for c in delta.cells} == {kind}
    else:  # one changed element is cheapest as sparse, a full rescale as dense
        kinds = {c.name: c.kind for c in delta.cells}
        assert kinds["model.layers.0.mlp.up_proj.weight"] == "sparse" and kinds["model.norm.weight"] == "dense"
    apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "tuned2")
    assert filecmp.cmp(tmp_path / "tuned" / "model.safetensors", tmp_path / "tuned2" / "model.safetensors",
                       shallow=False)


def test_lowrank_reports_its_error_and_auto_uses_it_within_bounds(tmp_path):
    tuned_pair(tmp_path)
    delta = diff(tmp_path / "base", tmp_path / "tuned", tmp_path / "lr", kind="lowrank", rank=2)
    q = next(c for c in delta.cells if c.name == "model.layers.1.self_attn.q_proj.weight")
    assert q.kind == "lowrank" and q.rel_error < 1e-5 and q.stats["rank"] == 2 and not delta.exact
    norm = next(c for c in delta.cells if c.name == "model.norm.weight")
    assert norm.kind == "dense"  # a vector has no low-rank form: the exact one instead
    rank1 = diff(tmp_path / "base", tmp_path / "tuned", tmp_path / "lr1", kind="lowrank", rank=1)
    assert next(c for c in rank1.cells if c.name == q.name).rel_error > 0.05  # a rank-2 change at rank 1
    auto = diff(tmp_path / "base", tmp_path / "tuned", tmp_path / "auto", max_rel_error=1e-3)
    assert next(c for c in auto.cells if c.name == q.name).kind == "lowrank"
    out = apply_delta(tmp_path / "base", tmp_path / "lr", tmp_path / "approx")
    got = dynlm.load_pretrained(out).model.layers[1].self_attn.q_proj.weight
    want = dynlm.load_pretrained(tmp_path / "tuned").model.layers[1].self_attn.q_proj.weight
    assert (got - want).norm() / want.norm() < 1e-5
    with pytest.raises(CheckpointError, match="low-rank"):
        apply_delta(tmp_path / "base", tmp_path / "lr", tmp_path / "x", allow_approximate=False)


def test_delta_refuses_another_base(tmp_path):
    tuned_pair(tmp_path)
    diff(tmp_path / "base", tmp_path / "tuned", tmp_path / "delta")
    with pytest.raises(CheckpointError, match="a delta applies only to its own base"):
        apply_delta(tmp_path / "tuned", tmp_path / "delta", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_dense_fixups_keep_it_exact():
    """Where base + (new - base) does not round back to new, the delta stores the new value."""
    base = np.array([1.0, 1e-10, 3.0, -2.0], np.float32)
    new = np.array([1e-10, 1.0, 3.0000002, 5.0], np.float32)
    cell, parts = diff_cell("w", base, new, "float32", kind="dense")
    assert {p.name for p in cell.parts} >= {"w:difference", "w:fix_index_gaps", "w:fix_values"}
    assert apply_cell(cell, base, parts, "test").tobytes() == new.tobytes()
    for dtype in ("bfloat16", "float16"):
        b, n = from_float(base, dtype), from_float(new, dtype)
        cell, parts = diff_cell("w", b, n, dtype, kind="dense")
        assert apply_cell(cell, b, parts, "test").tobytes() == n.tobytes()


def test_integer_and_bool_cells():
    rng = np.random.default_rng(0)
    for base, new, dtype in [(rng.integers(-100, 100, 50).astype(np.int64), rng.integers(-100, 100, 50), "int64"),
                             (rng.random(50) > 0.5, rng.random(50) > 0.5, "bool")]:
        new = np.asarray(new, dtype=base.dtype)
        for kind in ("dense", "sparse"):
            cell, parts = diff_cell("t", base, new, dtype, kind=kind)
            assert apply_cell(cell, base, parts, "test").tobytes() == new.tobytes()


def test_applying_to_a_code_checkpoint_records_lineage(tmp_path):
    tuned_pair(tmp_path)
    export_code_checkpoint(tmp_path / "base", tmp_path / "base_code", mode="hybrid")
    diff(tmp_path / "base_code", tmp_path / "tuned", tmp_path / "delta", mode="hybrid")
    assert (tmp_path / "delta" / "delta.safetensors").is_file()  # hybrid: large parts as raw tensors
    out = apply_delta(tmp_path / "base_code", tmp_path / "delta", tmp_path / "tuned_code")
    ckpt = CodeCheckpoint(out)
    assert ckpt.model_info["mode"] == "hybrid"
    assert ckpt.model_info["parents"][-1]["relation"] == "delta"
    assert ckpt.cells["model.norm.weight"].history[-1]["event"] == "delta applied"
    assert len(ckpt.cells["model.embed_tokens.weight"].history) == 1  # untouched
    x = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(dynlm.load_pretrained(out)(x).logits, dynlm.load_pretrained(tmp_path / "tuned")(x).logits)


def test_delta_file_is_safe_and_checked(tmp_path):
    tuned_pair(tmp_path)
    diff(tmp_path / "base", tmp_path / "tuned", tmp_path / "delta")
    path = tmp_path / "delta" / "delta.py"
    text = path.read_text()
    path.write_text(text.replace('kind="sparse"', 'kind=__import__("os").getcwd()', 1))
    with pytest.raises(CheckpointError, match="line .*a call to '.getcwd'"):
        Delta(tmp_path / "delta")
    path.write_text(text.replace('"base_weights_sha256": "', '"base_weights_sha256": "0', 1))
    with pytest.raises(CheckpointError):
        apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "x")


def test_different_architectures_refused(tmp_path):
    tiny().save_pretrained(tmp_path / "a")
    dynlm.build_model("standard-tiny", vocab_size=64, hidden_size=32, num_layers=3,
                      intermediate_size=64).save_pretrained(tmp_path / "b")
    with pytest.raises(CheckpointError, match="different model configs.*num_layers"):
        diff(tmp_path / "a", tmp_path / "b", tmp_path / "d")
