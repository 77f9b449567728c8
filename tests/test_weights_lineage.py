"""Lineage: clones remember their parent, shared cells load from another folder after hash
verification, and specialize fine-tunes with the trainer and stores a delta."""

from __future__ import annotations

import shutil

import pytest
import torch

import dynlm
from dynlm.data.tokenizers import load_tokenizer
from dynlm.errors import CheckpointError
from dynlm.weights import apply_delta, clone, export_code_checkpoint, share_cells
from dynlm.weights.lineage import CodeFormSaver, lineage_of, specialize
from dynlm.weights.store import CodeCheckpoint


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return dynlm.build_model("standard-tiny", vocab_size=258, hidden_size=32, num_layers=1,
                             intermediate_size=64).eval()


def test_clone_records_its_parent_and_lineage_verifies_it(tmp_path):
    export_code_checkpoint(tiny(), tmp_path / "base")
    clone(tmp_path / "base", tmp_path / "child", note="experiment 1")
    clone(tmp_path / "child", tmp_path / "grandchild")
    child = CodeCheckpoint(tmp_path / "child")
    parent = child.model_info["parents"][0]
    assert parent["relation"] == "clone" and parent["note"] == "experiment 1"
    assert parent["weights_sha256"] == CodeCheckpoint(tmp_path / "base").weights_sha256
    assert child.model_info["history"][-1]["event"] == "cloned"
    chain = lineage_of(tmp_path / "grandchild")
    assert [e["path"] for e in chain] == [str(tmp_path / p) for p in ("grandchild", "child", "base")]
    assert all(e["verified"] for e in chain)
    export_code_checkpoint(tiny(seed=1), tmp_path / "base")  # the parent folder now holds other weights
    assert not lineage_of(tmp_path / "child")[1]["verified"]


def test_shared_cells_load_after_hash_verification(tmp_path):
    model = tiny()
    export_code_checkpoint(model, tmp_path / "a")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)  # b differs from a except for the embedding
    export_code_checkpoint(model, tmp_path / "b")
    x = torch.randint(0, 258, (1, 7))
    with torch.no_grad():
        expected = {n: dynlm.load_pretrained(tmp_path / n)(x).logits for n in ("a", "b")}
    shared = share_cells([tmp_path / "a", tmp_path / "b"], ["embedding"], tmp_path / "shared" / "embedding.py")
    for name in ("a", "b"):
        cell = CodeCheckpoint(tmp_path / name).cells["model.embed_tokens.weight"]
        assert type(cell.data).__name__ == "Shared" and cell.data.path == "../shared/embedding.py"
        text = (tmp_path / name / "weights.py").read_text()
        assert 'b85="' not in text.split('name="model.embed_tokens.weight"')[1].split("Cell(")[0]
        with torch.no_grad():
            assert torch.equal(dynlm.load_pretrained(tmp_path / name)(x).logits, expected[name])
    with pytest.raises(CheckpointError, match="only identical cells"):
        share_cells([tmp_path / "a", tmp_path / "b"], ["model.layers.0.mlp.up_proj.weight"], shared)
    # a shared file whose cell holds other values is caught by the referencing cell's own hash
    export_code_checkpoint(tiny(seed=1), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "weights.py", shared)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        dynlm.load_pretrained(tmp_path / "a")
    # a shared file outside the allowed root is refused when sharing
    with pytest.raises(CheckpointError, match="outside"):
        share_cells([tmp_path / "a"], ["model.norm.weight"], tmp_path.parent / "elsewhere.py")


def test_shared_path_outside_the_root_is_refused_on_load(tmp_path):
    export_code_checkpoint(tiny(), tmp_path / "models" / "a")
    export_code_checkpoint(tiny(), tmp_path / "models" / "b")
    share_cells([tmp_path / "models" / "a", tmp_path / "models" / "b"], ["embedding"],
                tmp_path / "models" / "shared.py")
    moved = tmp_path / "deep" / "nested"
    moved.mkdir(parents=True)
    shutil.move(str(tmp_path / "models" / "a"), str(moved / "a"))
    # the relative path now points outside deep/nested/: refused, not followed
    with pytest.raises(CheckpointError, match="Shared path .* leads outside|Shared file"):
        dynlm.load_pretrained(moved / "a")


def test_specialize_fine_tunes_with_the_trainer_and_stores_a_delta(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "base", tokenizer=load_tokenizer("bytes"))
    export_code_checkpoint(tmp_path / "base", tmp_path / "code")
    corpus = tmp_path / "legal.txt"
    corpus.write_text("\n\n".join(f"The party of the first part shall pay {i} dollars to the second part."
                                  for i in range(150)))
    saver = CodeFormSaver(tmp_path / "trained_code", mode="inline")
    overrides = ["data.seq_len=32", "train.batch_size=4", "train.eval_every=0", "train.eval_bytes=1024",
                 "train.final_eval=[]", "train.sample_tokens=0", "train.plot=false", "train.progress=false",
                 "train.warmup_steps=0", "train.save_every=2", "train.device=cpu", "train.lr=3e-3"]
    delta = specialize(tmp_path / "code", "legal", str(corpus), tmp_path / "delta", steps=4, overrides=overrides,
                       callbacks=[saver])
    lineage = delta.header["lineage"]
    assert lineage["relation"] == "specialize" and lineage["domain"] == "legal" and lineage["steps"] == 4
    assert delta.header["base_weights_sha256"] == CodeCheckpoint(tmp_path / "code").weights_sha256
    assert delta.exact and delta.cells
    # the trainer saved in code form twice (steps 2 and 4); each save appended a "trained" event
    trained = CodeCheckpoint(tmp_path / "trained_code")
    events = [h for h in trained.model_info["history"] if h["event"] == "trained"]
    assert [e["step"] for e in events] == [2, 4] and events[0]["corpus"] == str(corpus)
    cell = trained.cells["model.layers.0.mlp.up_proj.weight"]
    assert [h["event"] for h in cell.history] == ["trained", "trained"]
    # the delta applied to the parent gives the fine-tuned weights: the same as the last code-form save
    out = apply_delta(tmp_path / "code", tmp_path / "delta", tmp_path / "legal_model")
    assert CodeCheckpoint(out).weights_sha256 == trained.weights_sha256
