"""GGUF files with a SentencePiece ("llama"-type) vocabulary: the tokenizer rebuilt from the GGUF
metadata (pieces, scores, token types, byte fallback, added tokens) tokenizes and decodes exactly
as `sentencepiece` does with the model the file was made from. The test trains that model itself
(BPE with byte fallback, as Llama's) and writes the GGUF file with the `gguf` package, the way
llama.cpp's converter does."""

from __future__ import annotations

import io
import random

import pytest

import dynlm
from dynlm.data.tokenizers import tokenizer_from_gguf

spm = pytest.importorskip("sentencepiece")  # the hf extra (not a dynlm module)
gguf = pytest.importorskip("gguf")

USER_DEFINED = ["<think>", "</think>"]
TEXTS = [
    "Hello world",
    "To be, or not to be, that is the question.",
    "  two leading spaces, three   inside and two trailing  ",
    " one leading space",
    "tabs\tand\nnewlines\n\nstay",
    "digits 1234567890 and 3.14159",
    "bytes for unseen characters: ☃ € 中文 🙂 ß",
    "a <think>user-defined</think> piece",
    "",
    " ",
    "Zürich, naïve café; «quotes» — dashes",
]


@pytest.fixture(scope="module")
def sentencepiece_model():
    rng = random.Random(0)
    words = ["the", "king", "queen", "shall", "not", "be", "love", "night", "day", "sweet", "hello", "world",
             "question", "noble", "heart", "to", "or", "is", "that", "café", "naïve", "1234", "spaces"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, user_defined_symbols=USER_DEFINED, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def token_type(sp, i: int) -> int:
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    if sp.is_unused(i):
        return gguf.TokenType.UNUSED
    if sp.id_to_piece(i) in USER_DEFINED:
        return gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL


@pytest.fixture(scope="module")
def gguf_file(sentencepiece_model, tmp_path_factory):
    """A GGUF file holding the vocabulary as llama.cpp's converter writes it (no tensors needed)."""
    sp = sentencepiece_model
    path = tmp_path_factory.mktemp("gguf") / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types([token_type(sp, i) for i in range(sp.get_piece_size())])
    writer.add_unk_token_id(sp.unk_id())
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("text", TEXTS, ids=[repr(t)[:30] for t in TEXTS])
def test_tokenizes_and_decodes_like_sentencepiece(sentencepiece_model, gguf_file, text):
    sp = sentencepiece_model
    ours = tokenizer_from_gguf(gguf_file)
    ids = ours.encode(text)
    assert ids == sp.encode(text), [sp.id_to_piece(i) for i in sp.encode(text)]
    assert ours.decode(ids) == sp.decode(ids) == text


def test_byte_fallback_and_added_tokens_are_used(sentencepiece_model, gguf_file):
    sp = sentencepiece_model
    ours = tokenizer_from_gguf(gguf_file)
    pieces = [sp.id_to_piece(i) for i in ours.encode("☃ <think>")]
    assert "<0xE2>" in pieces and "<0x98>" in pieces and "<0x83>" in pieces  # ☃ = e2 98 83, no piece of its own
    assert "<think>" in pieces  # a user-defined piece stays whole


def test_special_ids_and_bos(sentencepiece_model, gguf_file):
    sp = sentencepiece_model
    ours = dynlm.load_tokenizer(gguf_file)  # the public entry point reads .gguf too
    assert (ours.bos_id, ours.eos_id) == (sp.bos_id(), sp.eos_id())
    assert ours.prepend_separator  # llama vocabularies start every prompt with BOS
    assert ours.vocab_size == sp.get_piece_size()
    assert ours.decode([sp.bos_id(), *sp.encode("Hello")]) == "Hello"  # specials skipped when decoding


def test_saved_and_reloaded_it_still_matches(sentencepiece_model, gguf_file, tmp_path):
    """`dynlm convert` writes the tokenizer as tokenizer.json + tokenizer_config.json: the
    SentencePiece behaviour (the dummy prefix above all) survives the round trip."""
    sp = sentencepiece_model
    tokenizer_from_gguf(gguf_file).save(tmp_path)
    again = dynlm.load_tokenizer(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == sp.encode(text), text
        assert again.decode(again.encode(text)) == text
