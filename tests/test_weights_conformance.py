"""Every registered architecture survives the code form: export -> import gives the same files,
and a model loaded from the code checkpoint gives identical logits. New architectures are
covered as soon as they register (and ship an `<arch>-tiny` preset)."""

from __future__ import annotations

import filecmp

import pytest
import torch

import dynlm
from dynlm.data.tokenizers import load_tokenizer
from dynlm.weights import export_code_checkpoint, import_code_checkpoint

VOCAB = 97


@pytest.fixture(params=dynlm.list_architectures())
def arch(request) -> str:
    return request.param


@pytest.mark.parametrize("mode, dtype", [("inline", torch.float32), ("hybrid", torch.float32),
                                         ("inline", torch.bfloat16)])
def test_code_form_round_trip(arch, mode, dtype, tmp_path):
    torch.manual_seed(0)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=VOCAB)
    with torch.no_grad():  # move every parameter off its initial value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model = model.to(dtype).eval()
    model.save_pretrained(tmp_path / "orig", tokenizer=load_tokenizer("bytes"))
    export_code_checkpoint(tmp_path / "orig", tmp_path / "code", mode=mode)
    import_code_checkpoint(tmp_path / "code", tmp_path / "back")
    for f in (tmp_path / "orig").iterdir():
        assert filecmp.cmp(f, tmp_path / "back" / f.name, shallow=False), f.name
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dynlm.load_pretrained(tmp_path / "orig")(x).logits
        got = dynlm.load_pretrained(tmp_path / "code")(x).logits
    assert torch.equal(got, expected)
