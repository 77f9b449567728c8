"""The evaluator: exact bits per byte for byte and BPE tokenizers, sliding windows, both inputs
(texts and token splits), and the `dynlm eval` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import dynlm
from dynlm.cli import main
from dynlm.data.tokenizers import ByteTokenizer, train_bpe
from dynlm.eval import evaluate
from dynlm.eval.evaluate import sliding_windows

TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3,
    "Café, naïve, Straße — ğüşöçı İstanbul; مرحبا بالعالم.\n" * 2,
    "A short one.",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS * 20, vocab_size=300, show_progress=False)


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return dynlm.build_model("standard-tiny", vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                             num_kv_heads=1, intermediate_size=64).eval()


def brute_force_nats(model, tokenizer, texts):
    """Sum of next-token losses of every text token, each document fed whole after a separator."""
    total = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tokenizer.separator_id, *tokenizer.encode(text)]])
            logits = model(ids).logits[0, :-1].float()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    return total


def test_sliding_windows_score_every_token_once_with_context():
    seq_len, stride = 16, 5
    windows = sliding_windows([1, 2, 16, 17, 60], seq_len, stride)
    for doc, n in enumerate([1, 2, 16, 17, 60]):
        mine = [w for w in windows if w.doc == doc]
        scored = [p for w in mine for p in range(w.first_target, w.end)]
        assert scored == list(range(1, n))  # each position 1..n-1 once, in order; the separator never
        for w in mine:
            assert 0 <= w.start < w.first_target <= w.end <= n and w.length <= seq_len
            if w.start > 0:  # later windows: every scored token has >= seq_len - stride - 1 tokens before it
                assert w.first_target - w.start >= seq_len - stride
                assert w.end - w.first_target <= stride


def test_byte_model_bits_per_byte_is_loss_over_ln2():
    tokenizer = ByteTokenizer()
    model = tiny_model(tokenizer.vocab_size)
    result = evaluate(model, tokenizer, TEXTS, seq_len=512)
    num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert result["num_bytes"] == num_bytes and result["num_tokens"] == num_bytes  # one target per byte
    assert result["bpb"] == pytest.approx(result["loss_nats"] / math.log(2), rel=1e-12)
    assert result["total_nats"] == pytest.approx(brute_force_nats(model, tokenizer, TEXTS), rel=1e-5)
    # bits per character is reported too: above bits per byte here, where characters and bytes differ
    num_chars = sum(len(t) for t in TEXTS)
    assert result["num_chars"] == num_chars < num_bytes
    assert result["bpc"] == pytest.approx(result["total_nats"] / (math.log(2) * num_chars))
    ascii_result = evaluate(model, tokenizer, ["plain ascii text"], seq_len=64)
    assert ascii_result["bpc"] == ascii_result["bpb"]  # one byte per character


def test_bpe_model_bits_per_byte_is_total_nats_over_total_bytes(bpe):
    model = tiny_model(bpe.vocab_size)
    result = evaluate(model, bpe, TEXTS, seq_len=512)
    num_tokens = sum(len(bpe.encode(t)) for t in TEXTS)
    num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert result["num_tokens"] == num_tokens < num_bytes
    total = brute_force_nats(model, bpe, TEXTS)
    assert result["total_nats"] == pytest.approx(total, rel=1e-5)
    assert result["bpb"] == pytest.approx(total / (math.log(2) * num_bytes), rel=1e-5)
    assert result["loss_nats"] == pytest.approx(total / num_tokens, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / num_tokens), rel=1e-5)


def test_byte_and_bpe_models_are_compared_per_byte(bpe):
    """Models that know nothing (uniform next-token distributions) over the same text: per token
    they differ by the vocabulary sizes, per byte by the tokens each spends on the text."""
    byte_tok = ByteTokenizer()
    results = {}
    for name, tokenizer in (("bytes", byte_tok), ("bpe", bpe)):
        model = tiny_model(tokenizer.vocab_size)
        torch.nn.init.zeros_(model.lm_head.weight)  # tied: zero logits everywhere, a uniform model
        results[name] = evaluate(model, tokenizer, TEXTS, seq_len=512)
    num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    bpe_tokens = sum(len(bpe.encode(t)) for t in TEXTS)
    assert results["bytes"]["bpb"] == pytest.approx(math.log2(byte_tok.vocab_size))
    assert results["bpe"]["bpb"] == pytest.approx(math.log2(bpe.vocab_size) * bpe_tokens / num_bytes)
    assert results["bpe"]["num_bytes"] == results["bytes"]["num_bytes"] == num_bytes
    # per token the BPE model looks worse (bigger vocabulary); per byte it is better (fewer tokens)
    assert results["bpe"]["loss_nats"] > results["bytes"]["loss_nats"]
    assert results["bpe"]["bpb"] < results["bytes"]["bpb"]


def test_sliding_window_batches_match_window_by_window_scoring(bpe):
    model = tiny_model(bpe.vocab_size)
    seq_len, stride = 24, 8
    result = evaluate(model, bpe, TEXTS, seq_len=seq_len, stride=stride, batch_size=3)
    documents = [[bpe.separator_id, *bpe.encode(t)] for t in TEXTS]
    expected, count = 0.0, 0
    with torch.no_grad():
        for w in sliding_windows([len(d) for d in documents], seq_len, stride):
            ids = torch.tensor([documents[w.doc][w.start:w.end]])
            log_probs = torch.log_softmax(model(ids).logits[0].float(), -1)
            for p in range(w.first_target, w.end):  # position p is predicted by the logits at p - 1
                expected -= log_probs[p - 1 - w.start, documents[w.doc][p]].item()
                count += 1
    assert result["num_tokens"] == count == sum(len(d) - 1 for d in documents)
    assert result["total_nats"] == pytest.approx(expected, rel=1e-5)
    assert result["stride"] == stride and result["seq_len"] == seq_len


def test_token_split_and_texts_give_the_same_figures(tmp_path, bpe):
    from dynlm.data.shards import prepare_corpus

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(TEXTS * 2):
        (folder / f"d{i}.txt").write_text(text, encoding="utf-8")
    splits = prepare_corpus(str(folder), bpe, show_progress=False)
    model = tiny_model(bpe.vocab_size)
    from_split = evaluate(model, bpe, splits, split="train", seq_len=32)
    from_texts = evaluate(model, bpe, splits["train"].texts(), seq_len=32)
    for key in ("num_tokens", "num_bytes", "num_chars", "num_docs"):
        assert from_split[key] == from_texts[key]
    assert from_split["total_nats"] == pytest.approx(from_texts["total_nats"], rel=1e-6)


def test_eval_command(tmp_path, capsys):
    tokenizer = ByteTokenizer()
    model = tiny_model(tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(TEXTS[0], encoding="utf-8")
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--text", str(text), "--seq-len", "64",
                 "--device", "cpu", "-o", str(tmp_path / "out.json")]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result == json.loads((tmp_path / "out.json").read_text())
    assert result["num_bytes"] == len(TEXTS[0].encode()) and result["seq_len"] == 64 and result["stride"] == 32
    assert "bits per byte" in captured.err
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
