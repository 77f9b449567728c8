"""AGIFORMER beyond the shared conformance module: byte causality by perturbation, streaming
across patch boundaries in uneven pieces, plasticity, numerics at small alpha."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.errors import ConfigError

VOCAB = 258  # the byte tokenizer's ids


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return dynlm.build_model("agiformer-tiny", vocab_size=VOCAB, **overrides)


def byte_ids(batch: int = 2, length: int = 23, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


@pytest.mark.parametrize("halting", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_no_prediction_depends_on_its_own_byte_or_a_later_one(mode, halting):
    # logits[t] predict byte t+1. Perturbing byte s must leave logits[0 .. s-1] (the predictions
    # of bytes 1 .. s) unchanged, and must change logits[s] (the model does read byte s).
    # 23 bytes = 5 full patches + 3: every offset inside a patch and the tail are covered.
    model = tiny(halting=halting).train(mode == "train")
    x = byte_ids(batch=1)[0]  # [T]
    t = x.shape[0]
    changed = x.repeat(t, 1)  # row s has byte s perturbed (one batched forward; rows are independent)
    changed[torch.arange(t), torch.arange(t)] = (x + 97) % 256
    with torch.no_grad():
        base = model(x[None]).logits[0]
        out = model(changed).logits
    for s in range(t):
        torch.testing.assert_close(out[s, :s], base[:s], atol=1e-6, rtol=0)
        assert (out[s, s] - base[s]).abs().max() > 1e-5, f"logits[{s}] ignore byte {s}"


@pytest.mark.parametrize("pieces", [[1] * 19, [3, 1, 6, 2, 7], [4, 4, 4, 7], [19]])
def test_streaming_in_any_pieces_equals_one_forward(pieces):
    model = tiny().eval()
    x = byte_ids(length=sum(pieces))
    with torch.no_grad():
        full = model(x).logits
        state = model.init_state(2)
        outs, sizes, start = [], [], 0
        for n in pieces:
            out = model(x[:, start:start + n], state=state)
            outs.append(out.logits)
            state = out.state
            sizes.append(model.state_nbytes(state))
            start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert state.position == sum(pieces)
    assert len(set(sizes)) == 1, "the state must not grow with the bytes consumed"


def test_use_cache_returns_a_state_and_a_plain_forward_does_not():
    model = tiny().eval()
    x = byte_ids(length=10)
    with torch.no_grad():
        assert model(x).state is None
        out = model(x[:, :6], use_cache=True)
        rest = model(x[:, 6:], state=out.state)
        full = model(x).logits
    torch.testing.assert_close(torch.cat([out.logits, rest.logits], dim=1), full, atol=1e-5, rtol=1e-5)


def test_plasticity_is_explicit_saved_and_validated(tmp_path: Path):
    model = tiny().eval()
    x = byte_ids(length=40)
    with torch.no_grad():
        at_one = model(x).logits
        model.set_plasticity(0.1)
        at_small = model(x).logits
    assert (at_one - at_small).abs().max() > 1e-4  # alpha reaches the memory
    model.save_pretrained(tmp_path / "ckpt")
    loaded = dynlm.load_pretrained(tmp_path / "ckpt")
    assert loaded.plasticity == 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, at_small)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ConfigError, match="plasticity"):
            model.set_plasticity(bad)
        with pytest.raises(ConfigError, match="plasticity"):
            tiny(plasticity=bad)


def test_training_at_small_alpha_stays_finite():
    # 256 bytes = 64 patches at alpha = 0.1: the reference's parallel form overflowed here
    model = tiny(plasticity=0.1).train()
    x = byte_ids(batch=2, length=256)
    out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_model_configs_are_one_line_errors():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        tiny(num_kv_heads=2)
    with pytest.raises(ConfigError, match="patch_size"):
        tiny(patch_size=0)


@pytest.mark.parametrize("bias, steps", [(30.0, 1), (-30.0, 3)])
def test_halting_stops_each_position_at_its_step_and_charges_the_ponder_cost(bias, steps):
    # h = sigmoid(bias): ~1 halts every position after step 1 (output = one refinement step);
    # ~0 never reaches 1 - eps, so the forced last step takes the remainder R ~ 1 (output = all 3
    # steps). Either way the result equals the plain model run for that many steps.
    halting = tiny(halting=True, reasoning_steps=3, ponder_cost=0.5).eval()
    torch.nn.init.zeros_(halting.model.halt.weight)
    torch.nn.init.constant_(halting.model.halt.bias, bias)
    plain = tiny(reasoning_steps=steps).eval()
    plain.load_state_dict({k: v for k, v in halting.state_dict().items() if ".halt." not in k})
    x = byte_ids(length=24)
    with torch.no_grad():
        out = halting(x)
        expected = plain(x).logits
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert out.metrics["ponder_steps"].item() == steps
    # ponder = N + R with R = 1 (halting at step 1 with nothing before) or 1 - 2 sigmoid(-30) ~ 1
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.5 * (steps + 1.0)))
    assert plain(x).aux_loss is None  # halting off: no ponder cost (existing results stand)


def test_halting_mixes_steps_and_the_ponder_cost_has_a_gradient():
    model = tiny(halting=True, reasoning_steps=3).train()
    x = byte_ids(length=24)
    out = model(x, labels=x)
    assert 1.0 < out.metrics["ponder_steps"].item() < 3.0  # h ~ 0.5 at init: halts at step 2
    out.aux_loss.backward()
    assert model.model.halt.weight.grad.abs().sum() > 0  # the cost pushes on the halting unit
    with pytest.raises(ConfigError, match="reasoning_steps"):
        tiny(halting=True, reasoning_steps=0)


def test_halting_output_is_the_act_mixture_of_the_steps():
    # h = sigmoid(0) = 0.5 everywhere: step 1 adds 0.5, step 2 reaches 1 >= 1 - eps and halts
    # with the remainder R = 0.5, so out = 0.5 z_1 + 0.5 z_2 and ponder = N + R = 2.5
    model = tiny(halting=True, reasoning_steps=3, ponder_cost=0.1).eval()
    torch.nn.init.zeros_(model.model.halt.weight)
    torch.nn.init.zeros_(model.model.halt.bias)
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        out, metrics = model.refine(x)
        z1 = model.model.refine(x)
        z2 = model.model.refine(z1)
    torch.testing.assert_close(out, 0.5 * z1 + 0.5 * z2)
    torch.testing.assert_close(metrics["ponder_aux_loss"], torch.tensor(0.1 * 2.5))


# A corpus whose files are not all valid UTF-8: a stray 0xFF, a truncated 2-byte character, a
# lone continuation byte, next to Turkish text. A byte model must see exactly these bytes.
RAW_FILES = {
    "a.txt": b"Merhaba d\xc3\xbcnya \xff ve \xc3 yar\xc4\xb1m " * 6,
    "b.txt": b"\x80\x80 latin-1 caf\xe9 " * 6 + "Kaşgarlı Mahmud ".encode() * 2,
    "c.txt": b"plain ascii \xfe\xfd end " * 6,
}


def raw_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    for name, data in RAW_FILES.items():
        (folder / name).write_bytes(data)
    return folder


def test_invalid_utf8_corpus_is_modelled_as_its_exact_bytes(tmp_path: Path):
    from dynlm.data.shards import prepare_corpus
    from dynlm.data.tokenizers import ByteTokenizer, train_bpe
    from dynlm.eval.evaluate import evaluate

    folder = raw_corpus(tmp_path)
    tokenizer = ByteTokenizer()
    splits = prepare_corpus(str(folder), tokenizer, cache_dir=tmp_path / "shards", show_progress=False)
    seen = {}
    for split in splits.values():
        offsets = [*split.doc_offsets, len(split.tokens)]
        for i, doc_id in enumerate(split.doc_ids):  # each document: the separator, then its bytes
            seen[doc_id] = bytes(split.tokens[offsets[i] + 1:offsets[i + 1]].astype("uint8").tolist())
        assert split.num_bytes == sum(len(RAW_FILES[d]) for d in split.doc_ids)
    assert seen == RAW_FILES  # every byte as itself: no U+FFFD (3 bytes) in place of a bad byte
    text = splits["val"].texts()[0]
    assert tokenizer.decode(tokenizer.encode(text), errors="surrogateescape") == text

    model = tiny().eval()
    val_bytes = sum(len(RAW_FILES[d]) for d in splits["val"].doc_ids)
    for max_bytes in (None, 10_000):  # the token-shard path and the text path of the evaluator
        result = evaluate(model, tokenizer, str(folder), split="val", seq_len=32, max_bytes=max_bytes)
        assert result["num_bytes"] == val_bytes  # bits per byte divide by the file's bytes
        # a byte model: every byte is one token, so bits per byte = nats per token / ln 2
        assert result["bpb"] == pytest.approx(result["loss_nats"] / 0.6931471805599453)
        assert result["num_chars"] == sum(len(t) for t in splits["val"].texts())  # a raw byte: one char
        assert result["bpc"] > result["bpb"]
    # a BPE tokenizer cannot take raw bytes: they reach it as U+FFFD, and bits per byte still
    # divide by the file's bytes
    bpe = train_bpe([t for s in splits.values() for t in s.texts()], vocab_size=300, show_progress=False)
    assert bpe.decode(bpe.encode("a\udcffb")) == "a\ufffdb"
    assert bpe.count_bytes("a\udcffb") == 3


@pytest.mark.slow
def test_training_on_an_invalid_utf8_corpus(tmp_path: Path):
    from dynlm.train.run import train

    folder = raw_corpus(tmp_path)
    run = train("quick", ["model.type=agiformer", "model.preset=agiformer-tiny", f"data.corpus={folder}",
                          "data.seq_len=32", "train.batch_size=2", "train.max_steps=2", "train.warmup_steps=1",
                          "train.eval_every=0", "train.eval_bytes=256", "train.progress=false",
                          "train.plot=false", "train.sample_prompt=null", f"out_dir={tmp_path / 'runs'}",
                          "run_name=raw"])
    assert (run / "best").is_dir() and (run / "eval.json").is_file()


def test_bf16_autocast_training_and_bf16_decoding():
    # what the GPU benchmark runs: a training step under bf16 autocast, and decoding with bf16
    # weights and state (an earlier version failed here with "expected scalar type Float but
    # found BFloat16")
    model = tiny(halting=True)
    x = byte_ids(length=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    (out.loss + out.aux_loss).backward()
    assert torch.isfinite(out.loss)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        state = model.init_state(2, dtype=torch.bfloat16)
        first = model(x[:, :9], state=state)
        step = model(x[:, 9:10], state=first.state)
    assert step.logits.shape == (2, 1, VOCAB) and torch.isfinite(step.logits).all()
