"""`dynlm weights ...`: every action end to end, and one-line errors for user mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.cli import main
from dynlm.data.tokenizers import load_tokenizer
from dynlm.weights.store import CodeCheckpoint


@pytest.fixture
def base(tmp_path) -> Path:
    torch.manual_seed(0)
    model = dynlm.build_model("standard-tiny", vocab_size=258, hidden_size=32, num_layers=2, intermediate_size=64)
    model.save_pretrained(tmp_path / "base", tokenizer=load_tokenizer("bytes"))
    return tmp_path / "base"


def run(capsys, *argv: str) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_export_import_show_annotate_generate(tmp_path, base, capsys):
    code = tmp_path / "code"
    assert "wrote" in run(capsys, "weights", "export", base, code, "--mode", "inline")
    out = run(capsys, "weights", "show", code)
    assert "standard (inline)" in out and "model.embed_tokens.weight" in out
    out = run(capsys, "weights", "show", code, "--cell", "model.layers.0.mlp.up_proj.weight")
    assert "sha256" in out and "Inline" in out and "values" in out
    run(capsys, "weights", "annotate", code, "model.embed_tokens.weight", "trained 2,000 steps on shakespeare")
    info = json.loads(run(capsys, "weights", "show", code, "--cell", "model.embed_tokens.weight", "--json"))
    assert info["note"] == "trained 2,000 steps on shakespeare" and info["history"][-1]["event"] == "annotated"
    run(capsys, "weights", "import", code, tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    out = run(capsys, "generate", "--model", code, "--prompt", "Hi", "--max-new-tokens", "4", "--no-stream")
    assert "Hi" in out
    hybrid = tmp_path / "hybrid"
    run(capsys, "weights", "export", code, hybrid, "--mode", "hybrid", "--dtype", "bfloat16",
        "--event", '{"event": "converted for serving"}')
    assert (hybrid / "blobs.safetensors").is_file()
    assert CodeCheckpoint(hybrid).model_info["history"][-1]["event"] == "converted for serving"


def test_diff_apply_load_only_rehash(tmp_path, base, capsys):
    code = tmp_path / "code"
    run(capsys, "weights", "export", base, code)
    tuned = dynlm.load_pretrained(base)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight[2, 3] = 1.0
    tuned.save_pretrained(tmp_path / "tuned", tokenizer=load_tokenizer("bytes"))
    out = run(capsys, "weights", "diff", code, tmp_path / "tuned", "-o", tmp_path / "delta", "--kind", "auto")
    assert "1 sparse" in out and "exact: True" in out
    run(capsys, "weights", "apply", code, tmp_path / "delta", "-o", tmp_path / "tuned2")
    assert CodeCheckpoint(tmp_path / "tuned2").cells["model.layers.1.mlp.down_proj.weight"].history[-1]["event"] \
        == "delta applied"
    result = json.loads(run(capsys, "weights", "load-only", code, "--cells", "model.embed_tokens.*,layer_0",
                            "--json"))
    assert result["cells_decoded"] == len(result["cells"]) == 10 and result["cells_total"] == 20
    assert run(capsys, "weights", "rehash", code).startswith("0 cell(s)")
    out = run(capsys, "weights", "diff", code, tmp_path / "tuned", "-o", tmp_path / "lr", "--kind", "lowrank",
              "--rank", "1")
    assert "lowrank" in out and "rel error" in out


def test_analyze_find_neurons_numpy_run(tmp_path, base, capsys):
    code = tmp_path / "code"
    run(capsys, "weights", "export", base, code)
    (tmp_path / "sample.txt").write_text("To be, or not to be, that is the question. " * 10)
    out = run(capsys, "weights", "analyze", code, "--text", tmp_path / "sample.txt", "--out", tmp_path / "report",
              "--no-plots", "--max-tokens", "200")
    assert "parameters" in out and (tmp_path / "report" / "report.md").is_file()
    (tmp_path / "cats.txt").write_text("the cat sat\na cat purrs\n")
    (tmp_path / "bg.txt").write_text("the dog runs over the hills and far away " * 5)
    run(capsys, "weights", "find-neurons", code, "--examples", tmp_path / "cats.txt", "--background",
        tmp_path / "bg.txt", "--concept", "cat", "--top", "3", "--out", tmp_path / "neurons")
    result = json.loads((tmp_path / "neurons" / "neurons.json").read_text())
    assert len(result["neurons"]) == 3 and result["concept_tokens"] == 6
    out = run(capsys, "weights", "numpy-run", code, "--prompt", "Hi", "--max-new-tokens", "3")
    assert out.startswith("Hi")


def test_clone_lineage_share(tmp_path, base, capsys):
    models = tmp_path / "models"
    run(capsys, "weights", "export", base, models / "a")
    run(capsys, "weights", "clone", models / "a", models / "b", "--note", "copy")
    out = run(capsys, "weights", "lineage", models / "b")
    assert out.count("verified") == 2
    run(capsys, "weights", "share", models / "shared" / "embedding.py", models / "a", models / "b",
        "--cells", "embedding")
    assert type(CodeCheckpoint(models / "b").cells["model.embed_tokens.weight"].data).__name__ == "Shared"
    dynlm.load_pretrained(models / "b")


@pytest.mark.parametrize("argv, message", [
    (["weights", "show", "{code}", "--cell", "model.embed_token.weight"], "no cell 'model.embed_token.weight'"),
    (["weights", "export", "{base}", "{tmp}/x", "--event", "{{not json"], "--event is not valid JSON"),
    (["weights", "import", "{tmp}/nothing", "{tmp}/y"], "no such file|not a code checkpoint|no weights.py"),
    (["weights", "diff", "{code}", "{code}", "-o", "{tmp}/d", "--kind", "lowrank"], "needs a rank"),
    (["weights", "load-only", "{code}", "--cells", "layer_9"], "no cell matches 'layer_9'"),
    (["weights", "analyze", "{code}", "--text", "{tmp}/missing.txt", "--out", "{tmp}/r"], "not found"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, base, capsys, argv, message):
    code = tmp_path / "code"
    assert main(["weights", "export", str(base), str(code)]) == 0
    capsys.readouterr()
    argv = [a.format(code=code, base=base, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynlm: error:") and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
