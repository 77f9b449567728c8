"""What travels with every checkpoint form: the run's facts (training.json: the sequence length
above all), through dynlm directories and weights-as-code folders alike."""

from __future__ import annotations

import json

import dynlm
from dynlm.checkpoint import save_checkpoint
from dynlm.cli import main
from dynlm.data.tokenizers import load_tokenizer
from dynlm.weights import export_code_checkpoint, import_code_checkpoint, read_training_info


def run_checkpoint(tmp_path):
    """A checkpoint as the trainer writes it: weights, tokenizer and training.json."""
    model = dynlm.build_model("standard-tiny", vocab_size=258, num_layers=1, hidden_size=32, num_heads=2,
                              num_kv_heads=1, intermediate_size=64)
    info = {"step": 8, "seq_len": 48, "corpus": "somewhere", "splits": [0.9, 0.05, 0.05]}
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=load_tokenizer("bytes"),
                    extra_files={"training.json": json.dumps(info).encode()})
    return tmp_path / "ckpt", info


def test_training_info_travels_through_the_code_form(tmp_path):
    ckpt, info = run_checkpoint(tmp_path)
    code = export_code_checkpoint(ckpt, tmp_path / "code")
    assert not (code / "training.json").exists()  # it lives in config.py
    assert read_training_info(ckpt) == info
    assert read_training_info(code) == info
    back = import_code_checkpoint(code, tmp_path / "back")
    assert read_training_info(back) == info
    assert read_training_info(tmp_path) == {}  # not a checkpoint of a run


def test_eval_of_a_code_checkpoint_uses_the_runs_sequence_length(tmp_path):
    ckpt, _ = run_checkpoint(tmp_path)
    code = export_code_checkpoint(ckpt, tmp_path / "code")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 8)
    for path in (ckpt, code):
        out = tmp_path / f"{path.name}.json"
        assert main(["eval", "--model", str(path), "--text", str(text), "--output", str(out)]) == 0
        assert json.loads(out.read_text())["seq_len"] == 48, path
