"""Needle-in-a-haystack recall: prompt construction, the grid API on any architecture, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import dynlm
from dynlm.cli import main
from dynlm.data.tokenizers import ByteTokenizer
from dynlm.errors import ConfigError
from dynlm.eval.recall import NEEDLE, QUESTION, build_prompt, recall_grid

HAYSTACK = ["It was the best of times, it was the worst of times, it was the age of wisdom. " * 40]


def test_prompt_has_the_exact_length_and_the_needle_at_its_depth():
    tok = ByteTokenizer()
    hay = tok.encode(HAYSTACK[0])
    needle, question = tok.encode(NEEDLE.format(code="1453")), tok.encode(QUESTION)
    for depth in (0.0, 0.25, 1.0):
        prompt = build_prompt(hay, 7, 300, depth, needle, question, tok.separator_id)
        assert len(prompt) == 300 and prompt[0] == tok.separator_id
        assert prompt[-len(question):] == question
        text = tok.decode(prompt[1:-len(question)])
        room = 300 - 1 - len(needle) - len(question)
        assert text.index("The secret code is 1453.") - 1 == round(depth * room)  # "\n" opens the needle
    with pytest.raises(ConfigError, match="no room"):
        build_prompt(hay, 0, 20, 0.5, needle, question, tok.separator_id)


@pytest.mark.parametrize("arch", ["standard", "agiformer"])
def test_grid_shape_baseline_and_unmeasurable_cells(arch):
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=tok.vocab_size, max_position_embeddings=256)
    result = recall_grid(model, tok, HAYSTACK, lengths=[96, 400], depths=[0.0, 0.5], samples=2)
    assert [len(row) for row in result["accuracy"]] == [2, 2]
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"][0])
    assert result["accuracy"][1] == [None, None]  # 400 > the model's 256 positions: not measured
    assert all(0.0 <= v <= 1.0 for v in result["baseline_no_needle"][0])
    with pytest.raises(ConfigError, match="depths"):
        recall_grid(model, tok, HAYSTACK, lengths=[96], depths=[1.5])


@pytest.mark.slow
def test_recall_command_writes_json_and_heat_map(tmp_path, capsys):
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = dynlm.build_model("agiformer-tiny", vocab_size=tok.vocab_size)
    model.set_plasticity(0.5)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    haystack = tmp_path / "hay"
    haystack.mkdir()
    for i in range(3):
        (haystack / f"d{i}.txt").write_text(HAYSTACK[0] + f" part {i}\n")
    out = tmp_path / "out"
    args = ["recall", "--model", str(tmp_path / "ckpt"), "--lengths", "128,256", "--depths", "0.1,0.9",
            "--samples", "2", "--corpus", str(haystack), "--split", "train", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "recall.json").read_text())
    assert result["architecture"] == "agiformer" and result["plasticity"] == 0.5
    assert len(result["accuracy"]) == 2 and (out / "recall.png").stat().st_size > 1000
    assert main(args) == 2  # the folder is not empty now
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert main([*args[:-2], "--depths", "0.1,2", "--out", str(tmp_path / "o2")]) == 2
