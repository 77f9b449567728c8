"""Tokenizers: byte tokenizer, byte-level BPE, Hugging Face checkpoint folders, loading errors."""

from __future__ import annotations

import json

import pytest
import tokenizers

from dynlm.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    render_chat_template,
    train_bpe,
)
from dynlm.errors import ConfigError, DataError

TURKISH = "Çalışkan öğrenciler İstanbul'da ağır kitapları okudular; ışık, gölge ve üzüm. Yegâne hedefimizdir."
ARABIC = "الحَمْدُ للهِ رَبِّ العَالَمِينَ، الثناء على الله بصفاته التي كلُّها أوصاف كمال."
ENGLISH = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
UNSEEN = ["漢字とかな 😀 \u200d\t\r\n  trailing  ", "\x00\x7f", "", " ", "a" * 300, "İı ğĞ şŞ çÇ öÖ üÜ âîû"]
CHATML = ("{%- for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{%- endif %}")


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    texts = [TURKISH, ARABIC, ENGLISH] * 30
    return train_bpe(texts, vocab_size=400, show_progress=False)


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 258 and tok.separator_id == tok.bos_id == tok.eos_id == 256 and tok.pad_id == 257
    assert tok.eos_ids == [256]
    for text in [TURKISH, ARABIC, ENGLISH, *UNSEEN]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    ids = tok.encode("a<|endoftext|>ğ<|pad|>")
    assert ids == [97, 256, 0xC4, 0x9F, 257]
    assert tok.decode(ids) == "ağ"
    assert tok.decode(ids, skip_special_tokens=False) == "a<|endoftext|>ğ<|pad|>"
    assert tok.encode_batch(["ğ", "x"]) == [[0xC4, 0x9F], [120]]
    assert tok.decode([0xC4]) == "\ufffd"  # half a character decodes, it does not raise
    assert tok.decode([104, 9999, 105]) == "hi"  # ids outside the vocabulary are ignored


def test_byte_tokenizer_save_load(tmp_path):
    tok = ByteTokenizer()
    tok.save(tmp_path)
    content = json.loads((tmp_path / "tokenizer.json").read_text())
    assert content["dynlm_tokenizer"] == "bytes"
    for source in (tmp_path, tmp_path / "tokenizer.json", "bytes"):
        loaded = load_tokenizer(source)
        assert isinstance(loaded, ByteTokenizer)
        assert loaded.fingerprint() == tok.fingerprint()


def test_count_bytes():
    for tok in (ByteTokenizer(), None):
        if tok is None:
            tok = train_bpe(["abc"], vocab_size=300, show_progress=False)
        assert tok.count_bytes("ğ") == 2
        assert tok.count_bytes("ع") == 2
        assert tok.count_bytes("😀") == 4
        assert tok.count_bytes(TURKISH) == len(TURKISH.encode("utf-8")) > len(TURKISH)


def test_bpe_round_trip_on_turkish_and_arabic(bpe):
    assert bpe.vocab_size <= 400
    assert bpe.bos_id == bpe.eos_id == bpe.separator_id == bpe.token_to_id("<|endoftext|>")
    assert bpe.pad_id == bpe.token_to_id("<|pad|>") and bpe.prepend_separator
    for text in [TURKISH, ARABIC, ENGLISH, *UNSEEN]:
        assert bpe.decode(bpe.encode(text)) == text, text
    # merges were learned: fewer tokens than bytes on the training text
    for text in (TURKISH, ARABIC):
        assert len(bpe.encode(text)) < 0.6 * bpe.count_bytes(text)
    assert bpe.encode_batch([TURKISH, ARABIC]) == [bpe.encode(TURKISH), bpe.encode(ARABIC)]
    ids = bpe.encode("x<|endoftext|>y")
    assert bpe.separator_id in ids
    assert bpe.decode(ids, skip_special_tokens=False) == "x<|endoftext|>y"


def test_bpe_save_load(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, HFTokenizer)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert loaded.encode(TURKISH + ARABIC) == bpe.encode(TURKISH + ARABIC)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.prepend_separator) == \
        (bpe.bos_id, bpe.eos_id, bpe.pad_id, True)
    other = train_bpe([ENGLISH] * 10, vocab_size=300, show_progress=False)
    assert other.fingerprint() != bpe.fingerprint()


def test_bpe_vocab_too_small():
    with pytest.raises(ConfigError, match="at least 258"):
        train_bpe(["abc"], vocab_size=100)


def test_bpe_loads_in_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.encode(TURKISH, add_special_tokens=False) == bpe.encode(TURKISH)


def _hf_checkpoint_dir(tmp_path, bpe, config: dict, generation: dict | None = None):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    backend = tokenizers.Tokenizer.from_str(bpe.backend.to_str())
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def test_hf_checkpoint_folder_with_chat_template(bpe, tmp_path):
    config = {"bos_token": None, "pad_token": {"__type": "AddedToken", "content": "<|pad|>"},
              "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
              "chat_template": CHATML}
    directory = _hf_checkpoint_dir(tmp_path, bpe, config, generation={"eos_token_id": [0, bpe.vocab_size + 1]})
    tok = load_tokenizer(directory)
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.bos_id is None and tok.eos_id == im_end and tok.separator_id == im_end
    assert tok.pad_id == tok.token_to_id("<|pad|>")
    assert tok.eos_ids == [im_end, 0]  # generation_config adds <|endoftext|>
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Merhaba!"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nMerhaba!<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected.rsplit("<|im_start|>", 1)[0]
    ids = tok.encode(tok.apply_chat_template(messages))
    assert ids[0] == tok.token_to_id("<|im_start|>") and im_end in ids
    # the hand-written ChatML fallback (no jinja2) renders the same text
    from dynlm.data.tokenizers import _render_chatml

    assert _render_chatml(messages, True) == expected
    # save + load keeps roles, template and the extra EOS id
    tok.save(tmp_path / "again")
    again = load_tokenizer(tmp_path / "again")
    assert again.eos_ids == tok.eos_ids and again.chat_template == CHATML
    assert again.fingerprint() == tok.fingerprint()


def test_chat_template_errors():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    with pytest.raises(DataError, match="first message must be user"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}], True, {})
    with pytest.raises(DataError, match="no chat template"):
        ByteTokenizer().apply_chat_template([{"role": "user", "content": "hi"}])
    assert ByteTokenizer(chat_template=CHATML).apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_tokenizer_from_parts(bpe):
    backend = tokenizers.Tokenizer.from_str(bpe.backend.to_str())
    tok = HFTokenizer(backend, eos_token="<|endoftext|>", chat_template=CHATML)
    assert tok.bos_id is None and tok.separator_id == tok.eos_id == 0
    with pytest.raises(DataError, match="not in the tokenizer's vocabulary"):
        HFTokenizer(backend, bos_token="<s>")
    with pytest.raises(DataError, match="neither a BOS nor an EOS"):
        _ = HFTokenizer(backend).separator_id


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing-dir"):
        load_tokenizer(tmp_path / "missing-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad/tokenizer\.json: not readable JSON"):
        load_tokenizer(bad.parent)
    bad.write_text(json.dumps({"dynlm_tokenizer": "words"}))
    with pytest.raises(DataError, match="unknown dynlm tokenizer kind 'words'"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"model": "nothing like a tokenizer"}))
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(bad)
